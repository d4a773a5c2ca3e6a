"""The LoCoRe re-ranking stage: feature gathering, batched model, fusion, windows.

Per call (reference-spec §6.4-6.6):

1. junk ids have been moved to the end of each shortlist by the chain (``rerank.chain``, stable,
   similarities travel with them) and never take part in re-ranking;
2. the first ``topk`` remaining entries are re-ranked by the list model, one window of ``window``
   images at a time (``sliding`` strategy) or once at the top (``sliding=None``), fusing every
   window's raw logits with the similarities of the ranking this stage received;
3. entries past the re-ranked part keep their order.

The official loop re-ranks the first ``topk`` of the junk-reordered list even when junk reaches
into it; here the re-ranked part stops before the first junk id, so junk never takes a slot and
never moves up. The two agree whenever the shortlist holds ``topk`` non-junk entries.

Gallery locals come from the local store (first ``num_local`` rows, the highest weights), gallery
globals from ``Database.global_desc``, query locals from ``Queries.local_rows``; the model runs in
inference mode on many queries' windows at once.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from locore.core.device import autocast, resolve_device
from locore.core.errors import UserError
from locore.core.layout import NUM_META
from locore.rerank.base import Database, LogitReranker, Queries, RerankResult, WindowLogits
from locore.rerank.inputs import gather_rows, junk_mask
from locore.rerank.locore.checkpoint import read_fusion
from locore.rerank.locore.model import MODES, LocoreInputs, LocoreModel
from locore.rerank.sliding import sliding_rerank, window_starts

if TYPE_CHECKING:
    from locore.indexing.shortlist import Shortlist

logger = logging.getLogger(__name__)

AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class LocoreOptions:
    """How the stage re-ranks; checked on construction, before any model is loaded."""

    alpha: float = 0.5  # fusion weight of the incoming similarity (§6.5)
    temp: float = 0.1  # fusion temperature on the raw logits
    sliding: str | None = "end-to-start"  # a locore.rerank.sliding strategy, None = single window
    topk: int = 400  # leading shortlist entries re-ranked (K)
    window: int = 100  # images per model call (W)
    stride: int = 50  # step between windows (S)
    num_local: int = 48  # local descriptors per image (the store's first rows)
    batch_size: int = 8  # queries whose windows go through the model together
    mode: str = "max-end"  # which per-image score (reference-spec §4.11)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown locore mode {self.mode!r}; choose one of {list(MODES)}")
        if self.dtype not in AUTOCAST:
            raise UserError(f"unknown locore dtype {self.dtype!r}; choose one of {list(AUTOCAST)}")
        if min(self.topk, self.num_local, self.batch_size) < 1:
            raise UserError(
                f"locore topk ({self.topk}), num_local ({self.num_local}) and batch_size "
                f"({self.batch_size}) must all be at least 1"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"locore alpha {self.alpha} must lie in [0, 1]")
        window_starts(self.sliding, 1, self.window, self.stride)  # strategy, window, stride


class LocoreScorer:
    """A :class:`~locore.rerank.sliding.ListScorer` backed by a LoCoRe model.

    Query tensors are built once; each call gathers the gallery images of one batch of windows
    from the store and the global table and runs one forward pass.
    """

    def __init__(
        self, model: LocoreModel, queries: Queries, database: Database, options: LocoreOptions
    ):
        if queries.local_rows is None:
            raise UserError(
                "locore needs query local descriptors; extract queries with local features"
            )
        if database.store is None:
            raise UserError("locore needs the index's local store; rebuild the index with locals")
        rows = np.asarray(queries.local_rows, dtype=np.float32)
        if rows.shape[-1] - NUM_META != database.store.dim:
            raise UserError(
                f"query local descriptors are {rows.shape[-1] - NUM_META}-D but the store's are "
                f"{database.store.dim}-D; extract queries with the index's extractor"
            )
        if database.store.num_local < options.num_local:
            raise UserError(
                f"locore num_local {options.num_local} exceeds the {database.store.num_local} "
                "locals per image in the store; set num_local to at most that"
            )
        self.model = model
        self.database = database
        self.options = options
        self.device = next(model.parameters()).device
        self.use_global = bool(getattr(model.config, "use_global", True))
        n = options.num_local
        trained = getattr(model.config, "num_local", n)
        if trained != n:
            logger.warning(
                "locore: re-ranking with %d locals per image, trained with %d", n, trained
            )
        self.query_local, self.query_scales, self.query_mask = query_locals(rows, n)
        self.query_global = np.asarray(queries.global_desc, dtype=np.float32)
        # Official sliding mode divides max-sum by the tokens of a block (50 = 48 locals + global
        # + SEP) although one fewer values are summed; single-window mode does not (P7).
        sliding_sum = options.mode == "max-sum" and options.sliding is not None
        self.scale = 1.0 / (n + int(self.use_global) + 1) if sliding_sum else 1.0

    def _check_rows(self, scales: np.ndarray, descriptors: np.ndarray, ids: np.ndarray) -> None:
        """Refuse damaged rows (a store without checksums, overwritten in place): scale ids must
        index the model's scale table and descriptors must be finite, or the forward pass would
        fail deep inside the model or score garbage. ``scales`` ``[B, G, L]``, ids ``[B, G]``."""
        num_scales = self.model.config.num_scales
        bad = ((scales < 0) | (scales >= num_scales)).any(-1) | ~np.isfinite(descriptors).all(
            (-2, -1)
        )
        if bad.any():
            image = int(ids[np.nonzero(bad)][0])
            raise UserError(
                f"local store {self.database.store.path}: image id {image} holds scale ids outside "
                f"0..{num_scales - 1} or non-finite values, so the store is damaged; rebuild it "
                "with `locore index`"
            )

    def __call__(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Raw ``mode`` scores ``[B, G]`` of gallery ``ids`` ``[B, G]`` for query ``rows``."""
        local = self.database.store.gather(ids, self.options.num_local)
        self._check_rows(local.scales, local.descriptors, ids)
        glob = self.use_global
        inputs = LocoreInputs(
            query_local=self._tensor(self.query_local[rows]),
            query_scales=self._tensor(self.query_scales[rows]),
            query_mask=self._tensor(self.query_mask[rows]),
            gallery_local=self._tensor(local.descriptors, torch.float32),
            gallery_scales=self._tensor(local.scales, torch.int64),
            gallery_mask=self._tensor(local.mask, torch.bool),
            query_global=self._tensor(self.query_global[rows]) if glob else None,
            gallery_global=(
                self._tensor(gather_rows(self.database.global_desc, ids), torch.float32)
                if glob
                else None
            ),
        )
        with torch.inference_mode(), autocast(self.device, AUTOCAST[self.options.dtype]):
            scores = self.model(inputs).scores[self.options.mode]
        return scores.double().cpu().numpy() * self.scale

    def _tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=dtype, device=self.device)


def query_locals(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First ``n`` official rows ``[Q, K, 5 + D]`` -> descriptors, scale ids, mask (True = pad).

    Rows are sorted by weight, so the prefix holds the best ``n``; queries with fewer rows are
    padded with masked zero rows.
    """
    num_q, num_k, width = rows.shape
    if num_k < n:
        pad = np.zeros((num_q, n - num_k, width), np.float32)
        pad[:, :, 3] = 1.0  # padding flag
        rows = np.concatenate([rows, pad], axis=1)
    rows = rows[:, :n]
    return rows[..., NUM_META:], rows[..., 2].astype(np.int64), rows[..., 3] != 0


class LocoreReranker(LogitReranker):
    """LoCoRe list-wise re-ranking of a shortlist, fused with the incoming similarities.

    Args:
        model: a :class:`~locore.rerank.locore.model.LocoreModel` (or anything with its ``forward``
            contract and ``config.use_global``), already on its device.
        options: see :class:`LocoreOptions`.
    """

    name = "locore"

    def __init__(self, model: LocoreModel, options: LocoreOptions | None = None):
        self.model = model.eval()
        self.options = options or LocoreOptions()

    def rerank(self, queries: Queries, shortlist: Shortlist, database: Database) -> RerankResult:
        """Re-rank each query's leading ``topk`` non-junk entries; scores are the fused ones.

        Entries never scored keep their incoming similarity as score.
        """
        opts = self.options
        logger.debug("locore: %s", opts)
        ids = np.asarray(shortlist.ids, dtype=np.int64)
        new_ids, scores = sliding_rerank(
            ids,
            shortlist.sims,
            LocoreScorer(self.model, queries, database, opts),
            lengths=rerank_lengths(ids, queries.junk, opts.topk),
            strategy=opts.sliding,
            window=opts.window,
            stride=opts.stride,
            alpha=opts.alpha,
            temp=opts.temp,
            batch_size=opts.batch_size,
        )
        return RerankResult(ids=new_ids, scores=scores.astype(np.float32), before=ids)

    def window_logits(
        self, queries: Queries, shortlist: Shortlist, database: Database
    ) -> WindowLogits:
        """Raw logits of the window :meth:`rerank` scores with ``sliding=None``.

        Window lengths and scorer calls (batches included) are those of a ``sliding=None`` run
        (official single-window mode, no max-sum rescaling, P7), whatever this stage's own
        ``sliding``: only the first window's logits do not depend on (alpha, temp).
        """
        opts = dataclasses.replace(self.options, sliding=None)
        ids = np.asarray(shortlist.ids, dtype=np.int64)
        sims = np.asarray(shortlist.sims, dtype=np.float64)
        lengths = rerank_lengths(ids, queries.junk, opts.topk)
        scorer = LocoreScorer(self.model, queries, database, opts)
        width = min(opts.window, int(lengths.max(initial=0)))
        logits = np.full((len(ids), width), np.nan)

        def record(rows: np.ndarray, window_ids: np.ndarray) -> np.ndarray:
            out = scorer(rows, window_ids)
            logits[rows, : out.shape[1]] = out
            return out

        sliding_rerank(
            ids,
            sims,
            record,
            lengths=lengths,
            strategy=None,
            window=opts.window,
            stride=opts.stride,
            alpha=opts.alpha,
            temp=opts.temp,
            batch_size=opts.batch_size,
        )
        return WindowLogits(ids, sims, logits, np.minimum(lengths, width))


def rerank_lengths(ids: np.ndarray, junk: list[set[int]] | None, topk: int) -> np.ndarray:
    """``[Q]`` leading entries of each row of ``ids`` ``[Q, M]`` that may be re-ranked: at most
    ``topk``, ending at the first junk or padding (-1) entry (junk sits at the end already)."""
    blocked = junk_mask(ids, junk) | (ids < 0)
    first_blocked = np.where(blocked.any(1), blocked.argmax(1), ids.shape[1])
    return np.minimum(first_blocked, topk)


def locore(
    checkpoint: str = "vislang/locore_dinov2_base",
    alpha: float | None = None,
    temp: float | None = None,
    sliding: str | None = LocoreOptions.sliding,
    topk: int = LocoreOptions.topk,
    window: int = LocoreOptions.window,
    stride: int = LocoreOptions.stride,
    num_local: int = LocoreOptions.num_local,
    batch_size: int = LocoreOptions.batch_size,
    device: str = "auto",
    backend: str = "fast",
    mode: str = LocoreOptions.mode,
    dtype: str = LocoreOptions.dtype,
) -> LocoreReranker:
    """Registry factory: load a LoCoRe checkpoint and wrap it as a re-ranking stage.

    Args:
        checkpoint: Hugging Face id, local folder or ``.safetensors`` file.
        alpha, temp: fusion weight and temperature; None takes the pair stored with the
            checkpoint (``fusion.json``, chosen on held-out data), else :class:`LocoreOptions`'s.
        device: ``"auto"`` (cuda when available), ``"cpu"``, ``"cuda:1"``, ...
        backend: attention backend, ``"fast"`` or ``"hf"``.
        sliding, topk, window, stride, num_local, batch_size, mode, dtype: see
            :class:`LocoreOptions`.

    Example:
        >>> import rerank
        >>> stage = rerank.create("locore", checkpoint="vislang/locore_dinov2_base", window=100)
    """
    stored = read_fusion(checkpoint) if alpha is None or temp is None else {}
    options = LocoreOptions(
        alpha=stored.get("alpha", LocoreOptions.alpha) if alpha is None else alpha,
        temp=stored.get("temp", LocoreOptions.temp) if temp is None else temp,
        sliding=sliding,
        topk=topk,
        window=window,
        stride=stride,
        num_local=num_local,
        batch_size=batch_size,
        mode=mode,
        dtype=dtype,
    )
    model = LocoreModel.from_pretrained(
        checkpoint, backend=backend, device=str(resolve_device(device))
    )
    return LocoreReranker(model, options)
