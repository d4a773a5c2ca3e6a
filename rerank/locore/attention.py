"""The ``fast`` attention backend: Longformer local + global attention, exactly (spec §4.9).

Semantics reproduced (HF ``LongformerSelfAttention`` with merged mask m in {0, 1, 2}):

* a *local* row i (m_i = 1) attends, with the normal ``query``/``key``/``value`` projections, to
  the non-masked non-global tokens j with ``|i - j| <= w`` (w = window / 2) plus every global
  token (m_j = 2), one softmax over both;
* a *global* row (m_i = 2) is replaced by attention of ``query_global`` over ``key_global`` /
  ``value_global`` of every non-masked token;
* masked rows (m_i = 0) output zeros.

How it is made fast without changing the result:

* **Global tokens first.** Everything outside attention works per token, so the whole encoder
  runs on a permuted sequence: the global tokens (query block + SEPs, fixed by the layout) in
  front, the other tokens after them in their original order. The band then only touches the
  compact run of local tokens, and a 128-token block of local rows needs one contiguous key span
  instead of the whole sequence (perf-anchors §4.3: the original order puts a SEP in every block,
  so nothing can be skipped).
* **Chunked band.** Local rows are cut into chunks of ``chunk`` rows; chunk c attends to the
  global keys plus the local keys ``[c*chunk - w, (c+1)*chunk + w)`` (compact indices, which
  cover the band because dropping the global tokens only shortens distances; a few more keys
  keep the key count a multiple of ``KEY_ALIGN``), with an exact mask on original positions.
  One ``scaled_dot_product_attention`` call covers all chunks.
* **Global rows** are one small SDPA call of the global queries against all keys.

Everything is built from shapes with tensor ops only: no ``.item()``, no ``nonzero``, no
data-dependent shapes, so the forward compiles as one graph and never waits for the device.
SDPA keeps float32 softmax statistics for half-precision inputs, as HF's float32 softmax does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK = 128  # rows per band chunk; one GPU attention tile
KEY_ALIGN = 16  # keys per chunk rounded up to this (CUDA memory-efficient SDPA pads masks to it)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Token layout of one batch (Python ints only: it comes from shapes, never from data).

    Attributes:
        num_gallery: G images after the query.
        block: T tokens per image (``[GLOBAL] n locals [SEP]``, or without GLOBAL).
        window: full attention window (even); the band is ``+-window // 2``.
        query_global: whether the whole query block (not only SEPs) attends globally.
    """

    num_gallery: int
    block: int
    window: int
    query_global: bool

    @property
    def length(self) -> int:
        """S = (1 + G) * T tokens before window padding."""
        return (1 + self.num_gallery) * self.block

    @property
    def padded_length(self) -> int:
        """S rounded up to a multiple of the window (HF ``_pad_to_window_size``)."""
        return -(-self.length // self.window) * self.window

    @property
    def num_global(self) -> int:
        """Tokens flagged global: the query block (with its SEP) + every gallery SEP."""
        return (self.block if self.query_global else 1) + self.num_gallery

    def global_flags(self, device: torch.device | str) -> Tensor:
        """``[S_pad]`` bool, True at global-attention positions (before validity)."""
        pos = torch.arange(self.padded_length, device=device)
        sep = (pos % self.block) == (self.block - 1)
        flags = sep | (pos < self.block) if self.query_global else sep
        return flags & (pos < self.length)


@dataclasses.dataclass
class AttentionPlan:
    """Permutation and masks shared by every layer of one forward pass.

    Attributes:
        perm: ``[S_pad]`` original index of each permuted slot (global tokens first).
        inverse: ``[S_pad]`` permuted slot of each original index.
        valid: ``[B, S_pad, 1]`` bool validity in permuted order (False rows output zero).
        global_mask: ``[B, 1, 1, S_pad]`` additive mask (0 / -inf) of the global rows' keys
            (every valid token).
        local_mask: ``[B * nc, 1, chunk, NG + span]`` additive mask of each local-row
            chunk's keys. Both are built once, in the attention dtype, so no layer converts them.
        num_global: NG, number of leading global slots.
        chunk: rows per chunk; half_window: w.
        lead: local keys before a chunk's first row (w, plus a few so that NG + span is a
            multiple of ``KEY_ALIGN``; the mask excludes the extra keys).
    """

    perm: Tensor
    inverse: Tensor
    valid: Tensor
    global_mask: Tensor
    local_mask: Tensor
    num_global: int
    chunk: int
    half_window: int
    lead: int

    @property
    def num_local(self) -> int:
        """L = S_pad - NG local rows."""
        return self.perm.shape[0] - self.num_global

    @property
    def span(self) -> int:
        """Local keys of one chunk: ``lead + chunk + w``."""
        return self.lead + self.chunk + self.half_window


def build_plan(
    valid: Tensor, layout: Layout, dtype: torch.dtype, chunk: int | None = None
) -> AttentionPlan:
    """Permutation and attention masks for ``valid`` ``[B, S_pad]`` (original order, bool).

    Args:
        valid: True for GLOBAL/SEP tokens and non-padded locals (spec §4.6 validity a_t).
        layout: the batch's token layout.
        dtype: dtype of the attention inputs (the autocast dtype under autocast).
        chunk: rows per band chunk (default ``min(128, window)``).
    """
    device = valid.device
    batch, length = valid.shape
    w = layout.window // 2
    chunk = chunk or min(DEFAULT_CHUNK, layout.window)
    num_global = layout.num_global
    flags = layout.global_flags(device)
    # Stable sort of "is local" puts the global tokens first, both groups in original order.
    perm = torch.sort((~flags).to(torch.uint8), stable=True).indices
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(length, device=device)
    valid_p = valid[:, perm]

    num_local = length - num_global
    padded = -(-num_local // chunk) * chunk
    num_chunks = padded // chunk
    lead = w + (-(num_global + chunk + 2 * w)) % KEY_ALIGN
    span = lead + chunk + w
    # Band on original positions; padded rows/keys get a position that is never within w.
    far = -4 * length
    pos = perm[num_global:]
    row_pos = F.pad(pos, (0, padded - num_local), value=far).view(num_chunks, chunk)
    key_pos = F.pad(pos, (lead, padded - num_local + w), value=far).unfold(0, span, chunk)
    band = (row_pos[:, :, None] - key_pos[:, None, :]).abs() <= w  # [nc, chunk, span]
    key_ok = F.pad(valid_p[:, num_global:], (lead, padded - num_local + w), value=False)
    local = band[None] & key_ok.unfold(1, span, chunk)[:, :, None, :]  # [B, nc, chunk, span]
    glob = valid_p[:, None, None, :num_global].expand(batch, num_chunks, chunk, num_global)
    local_mask = torch.cat([glob, local], dim=-1).view(batch * num_chunks, 1, chunk, -1)
    return AttentionPlan(
        perm=perm,
        inverse=inverse,
        valid=valid_p[:, :, None],
        global_mask=additive(valid_p[:, None, None, :], dtype),
        local_mask=additive(local_mask, dtype),
        num_global=num_global,
        chunk=chunk,
        half_window=w,
        lead=lead,
    )


def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask -> 0 where allowed, -inf elsewhere (what SDPA adds to the scores)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, float("-inf"))


def longformer_attention(
    h: Tensor,
    weights: dict[str, tuple[Tensor, Tensor]],
    num_heads: int,
    plan: AttentionPlan,
    dropout_p: float = 0.0,
) -> Tensor:
    """Exact Longformer self-attention on permuted hidden states ``h`` ``[B, S_pad, H]``.

    Args:
        weights: ``(weight, bias)`` of ``query``, ``key``, ``value``, ``query_global``,
            ``key_global``, ``value_global`` (HF names, ``[H, H]`` / ``[H]``).
        num_heads: attention heads.
        plan: from :func:`build_plan` (``h`` must be in ``plan.perm`` order).
        dropout_p: attention-probability dropout (pass 0 in eval mode).

    Returns:
        ``[B, S_pad, H]`` attention output (before the output projection), zero on masked rows.
    """
    batch, length, hidden = h.shape
    ng, w, chunk = plan.num_global, plan.half_window, plan.chunk
    nl = plan.num_local
    d = hidden // num_heads
    # key/value with both projection sets over every token in one GEMM.
    names = ("key", "value", "key_global", "value_global")
    kv = F.linear(
        h,
        torch.cat([weights[n][0] for n in names]),
        torch.cat([weights[n][1] for n in names]),
    ).view(batch, length, 4, num_heads, d)
    k, v, k_glob, v_glob = kv.unbind(2)

    # Global rows: separate projections over all valid keys.
    q_glob = F.linear(h[:, :ng], *weights["query_global"]).view(batch, ng, num_heads, d)
    out_glob = F.scaled_dot_product_attention(
        q_glob.transpose(1, 2),
        k_glob.transpose(1, 2),
        v_glob.transpose(1, 2),
        attn_mask=plan.global_mask,
        dropout_p=dropout_p,
    ).transpose(1, 2)

    # Local rows: chunks of rows against [global keys | local key span].
    padded = plan.local_mask.shape[0] // batch * chunk
    num_chunks = padded // chunk
    span = plan.span
    q = F.linear(h[:, ng:], *weights["query"])
    q = F.pad(q, (0, 0, 0, padded - nl)).view(batch * num_chunks, chunk, num_heads, d)

    def spans(x: Tensor) -> Tensor:
        """``[B, S_pad, nh, d]`` -> ``[B * nc, NG + span, nh, d]`` keys of each chunk."""
        local = F.pad(x[:, ng:], (0, 0, 0, 0, plan.lead, padded - nl + w)).unfold(1, span, chunk)
        local = local.permute(0, 1, 4, 2, 3)  # [B, nc, span, nh, d]
        glob = x[:, None, :ng].expand(batch, num_chunks, ng, num_heads, d)
        return torch.cat([glob, local], dim=2).view(batch * num_chunks, ng + span, num_heads, d)

    out_local = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        spans(k).transpose(1, 2),
        spans(v).transpose(1, 2),
        attn_mask=plan.local_mask,
        dropout_p=dropout_p,
    ).transpose(1, 2)
    out_local = out_local.reshape(batch, padded, hidden)[:, :nl]
    out = torch.cat([out_glob.reshape(batch, ng, hidden), out_local.to(out_glob.dtype)], dim=1)
    return out.masked_fill(~plan.valid, 0.0)
