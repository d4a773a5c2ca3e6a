"""SuperGlobal re-ranking (Shao et al., ICCV 2023), the published algorithm, batched over queries.

Training-free and global-only (superglobal-delg-spec §1.5). For each query's top ``M`` shortlist:

1. every shortlisted descriptor is refined by a similarity-weighted mean with its ``K`` nearest
   shortlist neighbours: weight 1 for the best match (itself), ``β·sim`` for the others; the mean
   is not re-normalised (``d̃``);
2. stage-A score ``q·d̃``;
3. the query is refined as the elementwise max of the ``K + 1`` best refined items under the
   stage-A score (``q̃``; ``q`` itself is not included, nothing is normalised);
4. final score ``½(q·d̃ + q̃·d̃)``; the top ``M`` are re-sorted by it, the rest keep their order.

All queries of a batch go through the same matrix operations (no per-query loop), on the GPU when
one is available. Ties are broken by the incoming rank (P20); the official code's unstable sorts
only differ from this on exact ties.

Junk (superglobal-delg-spec §1.5, "evaluation detail"): SuperGlobal's own evaluation takes the
top 400 *without* removing the Revisited junk images, so junk takes part in the neighbour
refinement; its published ROxf/RPar numbers use that (``junk="keep"``, the default).
LoCoRe, CVNet, RRT and DELG move junk out of the shortlist first (reference-spec §6.4;
``junk="partition"``): the top ``M`` are then the first ``M`` non-junk images and junk never
enters the refinement. The move itself is the chain's (``rerank.chain.stage_input``); the junk
mode only says whether this stage asks for it.

Small collections (issue #15): the published ``K = 9`` neighbours and ``K + 1 = 10`` pooled items
assume at least ten relevant images among the top ``M = 400``, as on ROxf/RPar (4,993 / 6,322
images, dozens of positives per query). On a collection smaller than ``M`` the whole collection
is the shortlist and a query may have only a handful of positives (five in the demo and held-out
collections): most of the ten refined items max-pooled into ``q̃`` are then negatives, and since
the elementwise max of non-negative GeM descriptors (EfficientNet-Lite0's, not whitened) keeps
every negative's strongest channels, ``q̃`` drifts toward them. Issue #15 measured -10.1
Medium mAP on a 58-image collection; ``locore bench offline`` (benchmarks/RESULTS.md) gives
+0.71 / +0.07 Medium on the demo / held-out collections with the published counts, +1.03 /
+2.62 with the scaled ones (SuperGlobal + LoCoRe: -0.02 / -1.83, then +1.03 / +1.58). So by
default (``k=None``, ``qe_k=None``) both counts keep their published share of ``M``: on a
database of ``N < M`` images ``K = max(1, round(9·N/M))`` and the pooled count is
``max(1, round(10·N/M))``; from ``N >= M`` on they are the published 9 and 10. An explicit ``k``
keeps the published ``qe_k = k + 1``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from locore.core.device import resolve_device
from locore.core.errors import UserError
from locore.rerank.base import Database, Queries, Reranker, RerankResult
from locore.rerank.fusion import rank_desc
from locore.rerank.inputs import gather_rows, junk_mask

if TYPE_CHECKING:
    from locore.indexing.shortlist import Shortlist

logger = logging.getLogger(__name__)

JUNK_MODES = ("keep", "partition")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
PUBLISHED_K = 9  # neighbours per refined descriptor at M = 400 (the pooled count is K + 1)


@dataclasses.dataclass
class SuperGlobalScores:
    """Per-shortlist-entry outputs, aligned with the input order (not sorted).

    Attributes:
        final: ``[Q, M]`` ``½(q·d̃ + q̃·d̃)``; ``-inf`` where the entry is not valid.
        stage_a: ``[Q, M]`` ``q·d̃``; ``-inf`` where the entry is not valid.
        refined: ``[Q, M, D]`` refined descriptors ``d̃``.
        query: ``[Q, D]`` refined query ``q̃``.
    """

    final: torch.Tensor
    stage_a: torch.Tensor
    refined: torch.Tensor
    query: torch.Tensor


def superglobal_scores(
    query: torch.Tensor,
    shortlist: torch.Tensor,
    valid: torch.Tensor | None = None,
    k: int = 9,
    beta: float = 0.15,
    qe_k: int | None = None,
) -> SuperGlobalScores:
    """SuperGlobal scores of shortlisted descriptors, for a batch of queries at once.

    Args:
        query: ``[Q, D]`` query descriptors (unit norm).
        shortlist: ``[Q, M, D]`` descriptors of each query's shortlist (unit norm).
        valid: ``[Q, M]`` bool, False for entries that must neither be refined nor act as
            neighbours (junk moved out, padding); None = all valid.
        k: neighbours per refined descriptor besides its best match (``K``).
        beta: weight factor of the neighbours' similarities (``β``).
        qe_k: refined items max-pooled into the refined query; default ``k + 1`` as published.

    Returns:
        The scores, in the order of ``shortlist`` (so they do not depend on that order).
    """
    num_q, num_m, _ = shortlist.shape
    gram = shortlist @ shortlist.transpose(1, 2)  # [Q, M, M] cosine similarities
    if valid is not None:
        gram = gram.masked_fill(~valid[:, None, :], float("-inf"))
    sims, nbrs = torch.topk(gram, min(k + 1, num_m), dim=-1)  # best match first
    weights = torch.where(torch.isfinite(sims), beta * sims, torch.zeros_like(sims))
    weights[..., 0] = 1.0  # the best match (normally the item itself) counts fully
    # A sparse [M, M] matrix of normalised weights turns the neighbour means into one batched
    # matmul instead of materialising the [Q, M, K+1, D] neighbour tensor.
    weights = weights / weights.sum(-1, keepdim=True)
    refined = torch.zeros_like(gram).scatter_(-1, nbrs, weights) @ shortlist
    stage_a = torch.einsum("qd,qmd->qm", query, refined)
    if valid is not None:
        stage_a = stage_a.masked_fill(~valid, float("-inf"))

    top = torch.sort(stage_a, dim=-1, descending=True, stable=True).indices
    top = top[:, : min(qe_k if qe_k is not None else k + 1, num_m)]
    pooled = torch.take_along_dim(refined, top[..., None], 1)
    if valid is not None:
        pooled = pooled.masked_fill(~torch.take_along_dim(valid, top, 1)[..., None], float("-inf"))
    refined_query = pooled.amax(1)
    final = 0.5 * (stage_a + torch.einsum("qd,qmd->qm", refined_query, refined))
    if valid is not None:
        # A query without valid entries pools only -inf; mask the NaNs that follow.
        final = final.masked_fill(~valid, float("-inf"))
    return SuperGlobalScores(final, stage_a, refined, refined_query)


class SuperGlobalReranker(Reranker):
    """Re-rank the top ``m`` of a shortlist with SuperGlobal, from any global descriptors.

    ``database.global_desc`` (any dimension, unit norm) provides the shortlisted descriptors and
    ``queries.global_desc`` the queries; nothing else is needed.

    Args:
        m: shortlist entries re-ranked (``M``).
        k: neighbours averaged into each refined descriptor besides itself (``K``); None = the
            published 9, scaled down on a database smaller than ``m`` (module doc).
        beta: weight factor on neighbour similarities (``β``).
        qe_k: refined items max-pooled into the refined query; None = ``k + 1`` (published)
            for an explicit ``k``, else 10 scaled down like ``K``.
        junk: ``"keep"`` (SuperGlobal's own evaluation) or ``"partition"`` (Revisited protocol as
            in LoCoRe: the chain moves junk out of the shortlist before this stage).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        dtype: ``"float32"`` or ``"float64"`` for the matrix work.
        batch_size: queries per batched computation (bounds memory: about ``2·M·D + 2·M²``
            values per query).

    Example:
        >>> import rerank
        >>> stage = rerank.create("superglobal", m=400, k=9, beta=0.15)  # published, any size
    """

    name = "superglobal"

    def __init__(
        self,
        m: int = 400,
        k: int | None = None,
        beta: float = 0.15,
        qe_k: int | None = None,
        junk: str = "keep",
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 64,
    ):
        if junk not in JUNK_MODES:
            raise UserError(f"unknown superglobal junk mode {junk!r}; choose one of {JUNK_MODES}")
        if dtype not in DTYPES:
            raise UserError(f"unknown superglobal dtype {dtype!r}; choose one of {list(DTYPES)}")
        if m < 1 or (k is not None and k < 0) or batch_size < 1 or (qe_k is not None and qe_k < 1):
            raise UserError(
                f"superglobal needs m >= 1, k >= 0, qe_k >= 1, batch_size >= 1; "
                f"got m={m}, k={k}, qe_k={qe_k}, batch_size={batch_size}"
            )
        self.m, self.k, self.beta, self.qe_k, self.junk = m, k, beta, qe_k, junk
        self.partitions_junk = junk == "partition"
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        self.batch_size = batch_size

    def neighbours(self, num_db: int) -> tuple[int, int]:
        """``(K, pooled count)`` used on a database of ``num_db`` images (module doc)."""
        scale = min(1.0, num_db / self.m)
        k = self.k if self.k is not None else max(1, round(PUBLISHED_K * scale))
        if self.qe_k is not None:
            return k, self.qe_k
        if self.k is not None:
            return k, k + 1
        return k, max(1, round((PUBLISHED_K + 1) * scale))

    @torch.inference_mode()
    def rerank(self, queries: Queries, shortlist: Shortlist, database: Database) -> RerankResult:
        """Re-sort each query's top ``m`` by the SuperGlobal score; later entries keep their order.

        Scores: the final SuperGlobal score for re-ranked entries, the incoming similarity for the
        others. With ``junk="partition"``, junk ids (already at the end) are neither refined nor
        neighbours even when they reach into the top ``m``.
        """
        k, qe_k = self.neighbours(len(database))
        logger.debug(
            "superglobal: m=%d k=%d beta=%g qe_k=%d junk=%s on %s/%s",
            self.m,
            k,
            self.beta,
            qe_k,
            self.junk,
            self.device,
            self.dtype,
        )
        ids = before = np.asarray(shortlist.ids, dtype=np.int64)
        sims = np.asarray(shortlist.sims, dtype=np.float32)
        num_q, num_total = ids.shape
        if queries.global_desc.shape[1] != database.global_desc.shape[1]:
            raise UserError(
                f"query global descriptors are {queries.global_desc.shape[1]}-D but the "
                f"database's are {database.global_desc.shape[1]}-D; extract both with one model"
            )
        num_m = min(self.m, num_total)
        block = ids[:, :num_m]
        valid = block >= 0
        if self.partitions_junk:
            valid &= ~junk_mask(block, queries.junk)
        if num_m == 0:
            return RerankResult(ids=ids, scores=sims, before=before)
        order = np.empty_like(block)
        scores = sims.copy()
        for lo in tqdm(
            range(0, num_q, self.batch_size), desc="superglobal", leave=False, disable=None
        ):
            hi = min(lo + self.batch_size, num_q)
            mask = None if valid[lo:hi].all() else torch.from_numpy(valid[lo:hi]).to(self.device)
            out = superglobal_scores(
                self._tensor(queries.global_desc[lo:hi]),
                self._tensor(gather_rows(database.global_desc, block[lo:hi])),
                mask,
                k=k,
                beta=self.beta,
                qe_k=qe_k,
            )
            final = out.final.double().cpu().numpy()
            order[lo:hi] = rank_desc(final)
            scores[lo:hi, :num_m] = np.where(valid[lo:hi], final, sims[lo:hi, :num_m])
        return RerankResult.head_reordered(ids, scores, order)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), device=self.device).to(self.dtype)


# The registry factory is the class itself: its signature is the list of options.
superglobal = SuperGlobalReranker
