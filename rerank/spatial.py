"""Spatial verification, the field's classic training-free re-ranker (Philbin et al., CVPR 2007).

For each query and each of its leading ``topk`` shortlisted images:

1. tentative matches = mutual nearest neighbours of the stored local descriptors (cosine, valid
   rows only, similarity above ``min_sim``), computed for the whole shortlist of a query at once;
2. one robust fit of a geometric model to the matched stored positions by OpenCV
   (``cv2.estimateAffine2D`` or ``cv2.findHomography`` with MAGSAC++ or RANSAC); its inliers are
   the matches that agree with one geometry;
3. fusion with the incoming similarity ``s``:

       score = s + weight * min(inliers, cap) / cap      (inliers < min_inliers count as 0)

   so an image moves up by at most ``weight``, verified images pass unverified ones, and images
   the fit cannot tell apart keep their incoming order (stable sort).

Works with any extractor whose stored rows carry positions (columns 0-1 of the official layout).
Position units are the extractor's: ``threshold`` is in those units; the default, 0.05, is about
one feature cell of EfficientNet-Lite0 (stride 16 at 384 px) for positions normalised by the image
size, as EfficientNet-Lite0 and DINOv2 store them (use pixels, e.g. 16, for CVNet). Both models
offered, a homography (default: the views are perspective) and a full affine map, are unchanged
by the per-axis normalisation of those positions; a similarity (``estimateAffinePartial2D``) is
not, so it is not offered. Defaults (``locore bench offline``, benchmarks/RESULTS.md; homography,
0.05, 196 locals per image): unrelated images reach 9 inliers at the 99th percentile, matching
views a median of 26 on the demo collection (6 on the held-out one, whose rotated and blurred
queries defeat the descriptors), hence ``min_inliers=10`` and ``cap=30``. With the demo's 49
locals per image few mutual matches exist to verify: index with ``num_local`` of 150 or more.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import cv2
import numpy as np

from locore.core.errors import UserError
from locore.core.layout import NUM_META
from locore.rerank.base import Database, Queries, Reranker, RerankResult
from locore.rerank.fusion import rank_desc
from locore.rerank.locore.reranker import rerank_lengths

if TYPE_CHECKING:
    from locore.indexing.shortlist import Shortlist

logger = logging.getLogger(__name__)

MODELS = {"affine": 3, "homography": 4}  # geometric model -> matches needed for one fit
METHODS = {"magsac": cv2.USAC_MAGSAC, "ransac": cv2.RANSAC}


def mutual_matches(
    query: np.ndarray,
    query_valid: np.ndarray,
    images: np.ndarray,
    valid: np.ndarray,
    min_sim: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours between one query and a batch of images.

    Args:
        query: ``[K, D]`` query descriptors; query_valid: ``[K]`` bool.
        images: ``[M, L, D]`` descriptors of the shortlisted images; valid: ``[M, L]`` bool.
        min_sim: a match needs a cosine similarity above this.

    Returns:
        ``nn``: ``[M, K]`` the image row each query row matches; ``mutual``: ``[M, K]`` bool,
        True where that match is mutual, above ``min_sim`` and between valid rows.
    """
    sims = np.einsum("kd,mld->mkl", query, images)
    sims = np.where(query_valid[None, :, None] & valid[:, None, :], sims, -np.inf)
    nn = sims.argmax(2)  # [M, K] best image row per query row
    back = sims.argmax(1)  # [M, L] best query row per image row
    best = np.take_along_axis(sims, nn[..., None], 2)[..., 0]
    mutual = np.take_along_axis(back, nn, 1) == np.arange(query.shape[0])[None, :]
    return nn, mutual & (best > min_sim) & np.isfinite(best)


class SpatialReranker(Reranker):
    """Re-rank each query's leading ``topk`` non-junk entries by geometrically verified matches.

    Args:
        topk: leading shortlist entries verified (junk and padding end the list earlier).
        weight: most the fused score can rise over the incoming similarity (``lambda``).
        cap: inliers at which the bonus saturates.
        min_inliers: fewer inliers count as none (a chance fit).
        threshold: inlier reprojection error, in the stored position units.
        model: ``"affine"`` (``cv2.estimateAffine2D``) or ``"homography"``
            (``cv2.findHomography``).
        method: ``"magsac"`` (``cv2.USAC_MAGSAC``) or ``"ransac"`` (``cv2.RANSAC``).
        min_sim: cosine similarity a mutual match must exceed.
        num_local: local rows per image used (None = all stored).
        max_iters: most iterations of the robust fit.
        confidence: stopping confidence of the robust fit.
        seed: OpenCV's random seed, set before every fit so results do not depend on order.

    Example:
        >>> stage = rerank.create("spatial", topk=64, weight=0.15, cap=20)
    """

    name = "spatial"

    def __init__(
        self,
        topk: int = 100,
        weight: float = 0.2,
        cap: int = 30,
        min_inliers: int = 10,
        threshold: float = 0.05,
        model: str = "homography",
        method: str = "magsac",
        min_sim: float = 0.0,
        num_local: int | None = None,
        max_iters: int = 2000,
        confidence: float = 0.999,
        seed: int = 0,
    ):
        if model not in MODELS:
            raise UserError(f"unknown spatial model {model!r}; choose one of {sorted(MODELS)}")
        if method not in METHODS:
            raise UserError(f"unknown spatial method {method!r}; choose one of {sorted(METHODS)}")
        if topk < 1 or cap < 1 or min_inliers < 0 or threshold <= 0 or max_iters < 1:
            raise UserError(
                "spatial needs topk >= 1, cap >= 1, min_inliers >= 0, threshold > 0, "
                f"max_iters >= 1; got topk={topk}, cap={cap}, min_inliers={min_inliers}, "
                f"threshold={threshold}, max_iters={max_iters}"
            )
        if num_local is not None and num_local < 1:
            raise UserError(f"spatial num_local must be >= 1 or None, got {num_local}")
        self.topk, self.weight, self.cap, self.min_inliers = topk, weight, cap, min_inliers
        self.threshold, self.model, self.method, self.min_sim = threshold, model, method, min_sim
        self.num_local, self.max_iters, self.confidence, self.seed = (
            num_local,
            max_iters,
            confidence,
            seed,
        )

    def rerank(self, queries: Queries, shortlist: Shortlist, database: Database) -> RerankResult:
        """Verify each query's leading entries, fuse (module doc) and re-sort them; the other
        entries keep their order and their incoming similarity as score."""
        ids = before = np.asarray(shortlist.ids, dtype=np.int64)
        sims = np.asarray(shortlist.sims, dtype=np.float32)
        lengths = rerank_lengths(ids, queries.junk, self.topk)
        inliers = self.inliers(queries, ids, database, lengths)
        bonus = self.weight * np.minimum(inliers, self.cap) / self.cap
        bonus[inliers < self.min_inliers] = 0.0
        fused = sims[:, : inliers.shape[1]].astype(np.float64) + bonus
        new_ids, scores = ids.copy(), sims.copy()
        for q, n in enumerate(lengths):
            order = rank_desc(fused[q, :n])
            new_ids[q, :n] = ids[q, :n][order]
            scores[q, :n] = fused[q, :n][order]
        return RerankResult(ids=new_ids, scores=scores, before=before)

    def inliers(
        self, queries: Queries, ids: np.ndarray, database: Database, lengths: np.ndarray
    ) -> np.ndarray:
        """``[Q, max(lengths)]`` int64 inlier counts of the leading ``lengths[q]`` entries of
        each row of ``ids`` (0 elsewhere)."""
        if queries.local_rows is None:
            raise UserError(
                "spatial needs query local descriptors; extract queries with local features"
            )
        store = database.store
        if store is None:
            raise UserError("spatial needs the index's local store; rebuild the index with locals")
        rows = np.asarray(queries.local_rows, dtype=np.float32)
        if rows.shape[-1] - NUM_META != store.dim:
            raise UserError(
                f"query local descriptors are {rows.shape[-1] - NUM_META}-D but the store's are "
                f"{store.dim}-D; extract queries with the index's extractor"
            )
        num_local = store.num_local if self.num_local is None else self.num_local
        if num_local > store.num_local:
            raise UserError(
                f"spatial num_local {num_local} exceeds the {store.num_local} locals per image "
                "in the store; set num_local to at most that"
            )
        head = int(lengths.max(initial=0))
        counts = np.zeros((ids.shape[0], head), dtype=np.int64)
        if head == 0:
            return counts
        wanted = np.unique(np.concatenate([ids[q, :n] for q, n in enumerate(lengths)]))
        table = store.rows(wanted, num_local)  # [n, L, 5 + D], each image read once
        for q, n in enumerate(lengths):
            if n == 0:
                continue
            query = rows[q, :num_local]
            images = table[np.searchsorted(wanted, ids[q, :n])]
            nn, mutual = mutual_matches(
                query[:, NUM_META:],
                query[:, 3] == 0,
                images[..., NUM_META:],
                images[..., 3] == 0,
                self.min_sim,
            )
            for m in range(n):
                keep = np.flatnonzero(mutual[m])
                src = query[keep, :2]
                dst = images[m, nn[m, keep], :2]
                counts[q, m] = self.fit(src, dst)
        return counts

    def fit(self, src: np.ndarray, dst: np.ndarray) -> int:
        """Inliers of one robust fit of the configured model from ``src`` ``[n, 2]`` to ``dst``;
        0 when there are too few matches or no model fits (degenerate positions)."""
        if len(src) < max(MODELS[self.model], self.min_inliers, 1):
            return 0
        cv2.setRNGSeed(self.seed)
        src, dst = src.astype(np.float32), dst.astype(np.float32)
        method = METHODS[self.method]
        try:
            if self.model == "affine":
                matrix, mask = cv2.estimateAffine2D(
                    src,
                    dst,
                    method=method,
                    ransacReprojThreshold=self.threshold,
                    maxIters=self.max_iters,
                    confidence=self.confidence,
                )
            else:
                matrix, mask = cv2.findHomography(
                    src,
                    dst,
                    method,
                    self.threshold,
                    maxIters=self.max_iters,
                    confidence=self.confidence,
                )
        except cv2.error:  # degenerate input (e.g. every position equal): no geometry
            return 0
        if matrix is None or mask is None:
            return 0
        return int(np.count_nonzero(mask))


# The registry factory is the class itself: its signature is the list of options.
spatial = SpatialReranker
