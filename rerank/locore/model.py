"""The LoCoRe list-wise re-ranker (reference-spec §4): a Longformer over local descriptors.

One query and G gallery images become one token sequence, ``[GLOBAL] n locals [SEP]`` per image
(query first); a 2-class token classifier marks the tokens of gallery images that match the
query, and per-image scores are read off those token logits (§4.11).

The module tree uses the official state-dict names (``language_model.longformer.encoder.layer.{i}
.attention.self.query`` ...), so the released checkpoint loads 1:1 and both attention backends
share the same parameters:

* ``fast`` (default): our exact implementation in :mod:`locore.rerank.locore.attention`;
* ``hf``: transformers' ``LongformerEncoder`` layers, wired onto the same modules; the reference
  semantics, slow (chunked attention, host syncs every layer).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from locore.core.errors import UserError
from locore.rerank.locore import checkpoint
from locore.rerank.locore.attention import AttentionPlan, Layout, build_plan, longformer_attention
from locore.rerank.locore.config import BACKENDS, LocoreConfig

logger = logging.getLogger(__name__)

MODES = ("max-prod", "max-sum", "max-start", "max-end")
RECALL_AT = (1, 5, 10)
IGNORE = -100  # label of query tokens (cross-entropy ignore index)
POSITION_OFFSET = 2  # HF position ids start after padding_idx 1 (spec §4.7)
INIT_STD = 0.02  # HF initializer_range


@dataclasses.dataclass
class LocoreInputs:
    """One batch of query + gallery lists (B lists, G gallery images, n locals per image).

    Attributes:
        query_local: ``[B, n, Dl]`` float query local descriptors (stored order).
        query_scales: ``[B, n]`` int64 scale ids.
        query_mask: ``[B, n]`` bool, True = padding.
        gallery_local: ``[B, G, n, Dl]``.
        gallery_scales: ``[B, G, n]``.
        gallery_mask: ``[B, G, n]`` bool.
        query_global: ``[B, Dg]`` (the official ``[B, 1, Dg]`` is accepted) or None.
        gallery_global: ``[B, G, Dg]`` (or ``[B, G, 1, Dg]``) or None.
        positive_mask: ``[B, G]`` training labels, 1 (or legacy 2) = positive.
    """

    query_local: Tensor
    query_scales: Tensor
    query_mask: Tensor
    gallery_local: Tensor
    gallery_scales: Tensor
    gallery_mask: Tensor
    query_global: Tensor | None = None
    gallery_global: Tensor | None = None
    positive_mask: Tensor | None = None

    def to(self, device: torch.device | str) -> LocoreInputs:
        """All tensors moved to ``device``."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None
            },
        )


@dataclasses.dataclass
class LocoreOutput:
    """What one forward pass returns.

    Attributes:
        token_logits: ``[B, S, 2]`` classifier output without window padding; float32
            (float64 for a float64 model).
        scores: mode -> ``[B, G]`` raw class-1 logits (``with_softmax=False``, spec §4.11).
        loss: mean 2-class cross-entropy over gallery tokens (§4.12) when labels were given.
        recalls: ``"<mode>/recall@<k>"`` -> fraction of lists with a positive in the top k
            (softmax scores, the official training log) when labels were given.
    """

    token_logits: Tensor
    scores: dict[str, Tensor]
    loss: Tensor | None = None
    recalls: dict[str, float] | None = None


# ----------------------------------------------------------------------------------------------
# Modules (named as in the official checkpoint)
# ----------------------------------------------------------------------------------------------
class _SelfAttention(nn.Module):
    """The six projections of one Longformer attention layer."""

    NAMES = ("query", "key", "value", "query_global", "key_global", "value_global")

    def __init__(self, hidden: int):
        super().__init__()
        for name in self.NAMES:
            setattr(self, name, nn.Linear(hidden, hidden))

    def weights(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``(weight, bias)`` per projection name."""
        return {n: (getattr(self, n).weight, getattr(self, n).bias) for n in self.NAMES}


class _AddNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)`` (post-LN, BERT style)."""

    def __init__(self, width: int, config: LocoreConfig):
        super().__init__()
        self.dense = nn.Linear(width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, config: LocoreConfig):
        super().__init__()
        self.self = _SelfAttention(config.hidden_size)
        self.output = _AddNorm(config.hidden_size, config)


class _Intermediate(nn.Module):
    def __init__(self, config: LocoreConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU, as HF "gelu"


class _Layer(nn.Module):
    """One Longformer layer; its forward is the ``fast`` path on permuted tokens."""

    def __init__(self, config: LocoreConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.attention_dropout = config.dropout
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _AddNorm(config.intermediate_size, config)

    def forward(self, h: Tensor, plan: AttentionPlan) -> Tensor:
        p = self.attention_dropout if self.training else 0.0
        attn = longformer_attention(h, self.attention.self.weights(), self.num_heads, plan, p)
        a = self.attention.output(attn, h)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, config: LocoreConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_layers))


class _Embeddings(nn.Module):
    """``LayerNorm(u + position + token_type[0])`` with positions 2, 3, ... (spec §4.5/4.7)."""

    def __init__(self, config: LocoreConfig):
        super().__init__()
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, u: Tensor) -> Tensor:
        length = u.shape[1]
        pos = self.position_embeddings.weight[POSITION_OFFSET : POSITION_OFFSET + length]
        return self.dropout(self.LayerNorm(u + pos + self.token_type_embeddings.weight[0]))


class _Longformer(nn.Module):
    """The encoder without word embeddings: SEP/PAD vectors are parameters instead."""

    def __init__(self, config: LocoreConfig):
        super().__init__()
        self.sep_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.pad_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)


class _TokenClassifier(nn.Module):
    def __init__(self, config: LocoreConfig):
        super().__init__()
        self.longformer = _Longformer(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, 2)


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}  # transformers' names


def _projection(dim: int, config: LocoreConfig) -> nn.Module:
    """Descriptor -> token projection, by the official priority rule (spec §4.1)."""
    hidden, bottleneck = config.hidden_size, config.bottleneck_dim
    if bottleneck is not None:
        layers: list[nn.Module] = [nn.Linear(dim, bottleneck)]
        if config.linear_activation is not None:
            layers.append(_ACTIVATIONS[config.linear_activation]())
        layers.append(nn.Linear(bottleneck, hidden))
        return nn.Sequential(*layers)
    if config.force_linear or dim != hidden:
        return nn.Linear(dim, hidden)
    return nn.Identity()


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class LocoreModel(nn.Module):
    """LoCoRe: ``LocoreInputs`` -> token logits, per-image scores and (with labels) the loss.

    Args:
        config: the architecture; ``config.backend`` is the default attention backend.

    Example:
        >>> model = build_model("micro")
        >>> out = model(inputs)            # inputs: LocoreInputs
        >>> out.scores["max-end"].shape    # [B, G]
    """

    def __init__(self, config: LocoreConfig):
        super().__init__()
        self.config = config
        self.language_model = _TokenClassifier(config)
        self.scale_encoder = nn.Embedding(config.num_scales, config.hidden_size)
        self.local_to_lm = _projection(config.local_dim, config)
        # Without global tokens the official model has no global projection parameters.
        self.global_to_lm = (
            _projection(config.global_dim, config) if config.use_global else nn.Identity()
        )
        self._hf: list[nn.Module] = []  # transformers encoder sharing our modules, built lazily
        self.reset_parameters()

    # -- construction and I/O -----------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Random init as the official constructor leaves it: the encoder HF-style (N(0, 0.02)
        weights, zero biases, unit LayerNorms), the descriptor projections with PyTorch's
        fan-in-scaled default and zero biases.

        The projections matter for training from scratch: at N(0, 0.02) a unit-norm descriptor
        becomes a token as small as its position embedding, and a model then needs thousands of
        steps before attention starts matching descriptors (benchmarks/results/training.md).
        The scale embedding stays at N(0, 0.02): PyTorch's N(0, 1) would swamp the descriptors.
        """
        projections = {
            id(m)
            for m in (*self.local_to_lm.modules(), *self.global_to_lm.modules())
            if isinstance(m, nn.Linear)
        }
        for module in self.modules():
            if id(module) in projections:
                module.reset_parameters()
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        backbone = self.language_model.longformer
        nn.init.normal_(backbone.sep_embedding, std=INIT_STD)
        nn.init.normal_(backbone.pad_embedding, std=INIT_STD)

    def set_backend(self, name: str) -> None:
        """Make ``name`` (``"fast"`` or ``"hf"``) the default attention backend."""
        self.config = self.config.replace(backend=name)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        backend: str = "fast",
        device: torch.device | str = "cpu",
        config: LocoreConfig | str | Path | None = None,
        dtype: torch.dtype | None = None,
    ) -> LocoreModel:
        """Load trained weights (never a random init), in eval mode.

        Args:
            name_or_path: our folder (``model.safetensors`` + ``config.json``), an official
                ``locore_base.safetensors`` file or folder, or a Hugging Face id such as
                ``"vislang/locore_dinov2_base"`` (downloaded only then).
            backend: attention backend, ``"fast"`` or ``"hf"``.
            device: where the weights go.
            config: architecture of an official checkpoint without our ``config.json`` (a
                :class:`LocoreConfig` or a JSON/YAML path; default: the base model).
            dtype: optional parameter dtype (checkpoints are float32).
        """
        found, tensors = checkpoint.load(name_or_path, config)
        with torch.device("meta"):
            model = cls(found.replace(backend=backend))
        checkpoint.check_keys(model.state_dict(), tensors, name_or_path)
        model.load_state_dict(tensors, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` (official key names) and our ``config.json``."""
        checkpoint.save(self.state_dict(), self.config, Path(directory))

    # -- forward ------------------------------------------------------------------------------
    def forward(self, inputs: LocoreInputs, backend: str | None = None) -> LocoreOutput:
        """Score every gallery image of every list.

        Args:
            inputs: see :class:`LocoreInputs`; labels (``positive_mask``) add the loss.
            backend: ``"fast"`` / ``"hf"`` for this call (default ``config.backend``).
        """
        backend = backend or self.config.backend
        if backend not in BACKENDS:
            raise UserError(f"unknown locore backend {backend!r}; choose one of {BACKENDS}")
        layout, query_global, gallery_global = self._check(inputs)
        u, valid = self._tokens(inputs, query_global, gallery_global, layout)
        backbone = self.language_model.longformer
        h = backbone.embeddings(u)
        if backend == "fast":
            plan = build_plan(valid, layout, attention_dtype(h))
            h = h[:, plan.perm]
            for layer in backbone.encoder.layer:
                h = layer(h, plan)
            h = h[:, plan.inverse[: layout.length]]  # back to the original order, unpadded
        else:
            h = self._hf_encode(h, valid, layout)[:, : layout.length]
        logits = self.language_model.classifier(self.language_model.dropout(h))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> float32
        blocks = logits.view(logits.shape[0], 1 + layout.num_gallery, layout.block, 2)
        out = LocoreOutput(token_logits=logits, scores=score_modes(blocks[..., 1]))
        if inputs.positive_mask is not None:
            out.loss = token_loss(blocks, inputs.positive_mask)
            out.recalls = recalls(score_modes(blocks.softmax(-1)[..., 1]), inputs.positive_mask)
        return out

    def _check(self, x: LocoreInputs) -> tuple[Layout, Tensor | None, Tensor | None]:
        """Shape checks (Python ints only) -> layout and globals in ``[B, (G,) Dg]`` form."""
        cfg = self.config
        if x.query_local.dim() != 3 or x.gallery_local.dim() != 4:
            raise UserError(
                f"query_local must be [B, n, D] and gallery_local [B, G, n, D]; got "
                f"{list(x.query_local.shape)} and {list(x.gallery_local.shape)}"
            )
        batch, n, dim = x.query_local.shape
        num_gallery = x.gallery_local.shape[1]
        if x.gallery_local.shape != (batch, num_gallery, n, dim) or num_gallery < 1:
            raise UserError(
                f"gallery_local {list(x.gallery_local.shape)} does not match query_local "
                f"{list(x.query_local.shape)}; expected [{batch}, G>=1, {n}, {dim}]"
            )
        if dim != cfg.local_dim:
            raise UserError(
                f"local descriptors are {dim}-D but the model expects local_dim={cfg.local_dim}; "
                "use the extractor the checkpoint was trained with"
            )
        for name, shape in (
            ("query_scales", (batch, n)),
            ("query_mask", (batch, n)),
            ("gallery_scales", (batch, num_gallery, n)),
            ("gallery_mask", (batch, num_gallery, n)),
        ):
            if tuple(getattr(x, name).shape) != shape:
                raise UserError(
                    f"{name} has shape {list(getattr(x, name).shape)}, expected {list(shape)}"
                )
        query_global = gallery_global = None
        if cfg.use_global:
            if x.query_global is None or x.gallery_global is None:
                raise UserError(
                    "this locore model uses global tokens: pass query_global and gallery_global"
                )
            query_global = x.query_global.reshape(batch, -1)
            gallery_global = x.gallery_global.reshape(batch, num_gallery, -1)
            for name, t in (("query_global", query_global), ("gallery_global", gallery_global)):
                if t.shape[-1] != cfg.global_dim:
                    raise UserError(
                        f"{name} is {t.shape[-1]}-D but the model expects global_dim="
                        f"{cfg.global_dim}; use the global descriptor it was trained with"
                    )
        layout = Layout(
            num_gallery=num_gallery,
            block=n + int(cfg.use_global) + 1,
            window=cfg.attention_window,
            query_global=cfg.query_global_attention,
        )
        if layout.padded_length + POSITION_OFFSET > cfg.max_positions:
            raise UserError(
                f"{num_gallery} gallery images x {layout.block} tokens need "
                f"{layout.padded_length + POSITION_OFFSET} positions but the model has "
                f"{cfg.max_positions}; re-rank fewer images or descriptors per call"
            )
        if x.positive_mask is not None and tuple(x.positive_mask.shape) != (batch, num_gallery):
            raise UserError(
                f"positive_mask has shape {list(x.positive_mask.shape)}, expected "
                f"{[batch, num_gallery]}"
            )
        return layout, query_global, gallery_global

    def _tokens(
        self,
        x: LocoreInputs,
        query_global: Tensor | None,
        gallery_global: Tensor | None,
        layout: Layout,
    ) -> tuple[Tensor, Tensor]:
        """Input vectors u ``[B, S_pad, H]`` and validity ``[B, S_pad]`` (spec §4.4-4.8)."""
        backbone = self.language_model.longformer
        dtype = backbone.sep_embedding.dtype
        batch = x.query_local.shape[0]
        images = 1 + layout.num_gallery
        local = torch.cat([x.query_local[:, None], x.gallery_local], 1).to(dtype)
        scales = torch.cat([x.query_scales[:, None], x.gallery_scales], 1)
        padding = torch.cat([x.query_mask[:, None], x.gallery_mask], 1).bool()
        tokens = [self.local_to_lm(local) + self.scale_encoder(scales)]
        valid = [~padding]
        always = padding.new_ones(batch, images, 1)
        if query_global is not None:
            glob = torch.cat([query_global[:, None], gallery_global], 1).to(dtype)
            tokens.insert(0, self.global_to_lm(glob)[:, :, None])
            valid.insert(0, always)
        hidden = tokens[0].shape[-1]
        tokens.append(backbone.sep_embedding.expand(batch, images, 1, hidden).to(tokens[0].dtype))
        valid.append(always)
        extra = layout.padded_length - layout.length
        u = torch.cat(
            [
                torch.cat(tokens, 2).view(batch, layout.length, hidden),
                backbone.pad_embedding.expand(batch, extra, hidden).to(tokens[0].dtype),
            ],
            1,
        )
        mask = F.pad(torch.cat(valid, 2).view(batch, layout.length), (0, extra), value=False)
        return u, mask

    def _hf_encode(self, h: Tensor, valid: Tensor, layout: Layout) -> Tensor:
        """transformers' encoder on the original order, with the merged 0/1/2 mask."""
        encoder = self._hf_encoder()
        encoder.train(self.training)
        merged = valid.to(h.dtype) * (1 + layout.global_flags(h.device).to(h.dtype))
        extended = (1.0 - merged) * torch.finfo(h.dtype).min  # HF get_extended_attention_mask
        return encoder(h, attention_mask=extended, padding_len=0).last_hidden_state

    def _hf_encoder(self) -> nn.Module:
        """A transformers ``LongformerEncoder`` whose layers *are* our modules (shared weights)."""
        if self._hf:
            return self._hf[0]
        from transformers.models.longformer.modeling_longformer import (
            LongformerConfig,
            LongformerEncoder,
        )

        cfg = self.config
        hf_config = LongformerConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            attention_window=[cfg.attention_window] * cfg.num_layers,
            hidden_act="gelu",
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            layer_norm_eps=cfg.layer_norm_eps,
            max_position_embeddings=cfg.max_positions,
            type_vocab_size=cfg.type_vocab_size,
        )
        with torch.device("meta"):
            encoder = LongformerEncoder(hf_config)
        for ours, theirs in zip(self.language_model.longformer.encoder.layer, encoder.layer):
            for name in _SelfAttention.NAMES:
                setattr(theirs.attention.self, name, getattr(ours.attention.self, name))
            for mine, hf in (
                (ours.attention.output, theirs.attention.output),
                (ours.output, theirs.output),
            ):
                hf.dense, hf.LayerNorm = mine.dense, mine.LayerNorm
            theirs.intermediate.dense = ours.intermediate.dense
        assert not any(p.is_meta for p in encoder.parameters()), "unshared HF parameter"
        self._hf.append(encoder)
        return encoder


# ----------------------------------------------------------------------------------------------
# Scores, loss, recalls (pure functions of the token logits)
# ----------------------------------------------------------------------------------------------
def score_modes(class1: Tensor) -> dict[str, Tensor]:
    """Per-image scores from class-1 values ``[B, 1 + G, T]`` (spec §4.11).

    The query block and every SEP are dropped; ``max-end`` is the last *local* token.
    """
    c = class1[:, 1:, :-1]
    return {
        "max-prod": c.prod(-1),
        "max-sum": c.sum(-1),
        "max-start": c[..., 0],
        "max-end": c[..., -1],
    }


def token_labels(positive_mask: Tensor, block: int) -> Tensor:
    """``[B, 1 + G, T]`` labels: query -100, every gallery token 1 if positive else 0 (§4.12)."""
    gallery = (positive_mask > 0).long()[:, :, None].expand(-1, -1, block)
    query = gallery.new_full((gallery.shape[0], 1, block), IGNORE)
    return torch.cat([query, gallery], 1)


def token_loss(blocks: Tensor, positive_mask: Tensor) -> Tensor:
    """Mean 2-class cross-entropy over all gallery tokens of logits ``[B, 1 + G, T, 2]``."""
    labels = token_labels(positive_mask.to(blocks.device), blocks.shape[2])
    return F.cross_entropy(blocks.reshape(-1, 2), labels.reshape(-1), ignore_index=IGNORE)


def recalls(scores: dict[str, Tensor], positive_mask: Tensor) -> dict[str, float]:
    """Fraction of lists with a positive among the k best images, per mode and k in 1/5/10."""
    positive = positive_mask.to(next(iter(scores.values())).device) > 0
    values = {}
    for mode, s in scores.items():
        order = s.argsort(dim=-1, descending=True)
        hits = positive.gather(1, order)
        for k in RECALL_AT:
            values[f"{mode}/recall@{k}"] = hits[:, :k].any(1).float().mean()
    # One transfer for all values (this is the training/logging path).
    return dict(zip(values, torch.stack(list(values.values())).tolist()))


def attention_dtype(h: Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype when autocast is on, else ``h``'s."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def build_model(preset_or_config: str | Path | LocoreConfig, **overrides) -> LocoreModel:
    """A randomly initialised model from a preset name/YAML path or a config, in eval mode.

    Example:
        >>> model = build_model("micro", backend="hf")
    """
    config = (
        preset_or_config
        if isinstance(preset_or_config, LocoreConfig)
        else LocoreConfig.from_yaml(preset_or_config)
    )
    if overrides:
        config = config.replace(**overrides)
    return LocoreModel(config).eval()
