"""Sliding-window list-wise re-ranking (reference-spec §6.6), batched over queries.

A list model scores at most ``W`` images at once, so a shortlist of ``K`` is re-ranked window by
window: each window is re-scored jointly, fused with the global similarities, sorted, and written
back before the next window reads the current ranking. With ``end-to-start`` the top of every
window is carried into the next, higher window, so a strong image can climb from rank ~400 to 1.

Differences from the official loop (P5): window starts are clamped to ``[0, K − W]``, always
include both ends and are deduplicated, so every ``K``, ``W`` and ``S`` works (``K < W`` is one
window of ``K``); for the official settings (K 400, W 100, S 50) the lists are unchanged. The
windows of one step are independent across queries, so many queries go through the model together;
the result equals the per-query loop.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from locore.core.errors import UserError
from locore.rerank.fusion import fuse, rank_desc

logger = logging.getLogger(__name__)

STRATEGIES = ("start-to-end", "end-to-start", "start-to-end-to-start", "end-to-start-to-end")


class ListScorer(Protocol):
    """Anything that scores lists of database images jointly for some queries.

    Scores may depend on the whole list (LoCoRe's do), so the sliding loop calls the scorer again
    whenever an image enters a new window.
    """

    def __call__(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Score ``ids`` ``[B, G]`` (database ids, list order) for query rows ``rows`` ``[B]``.

        Returns ``[B, G]`` scores, higher = more relevant (raw logits for LoCoRe).
        """


def _forward(last: int, stride: int) -> list[int]:
    # 0, S, 2S, ... below the last start, then the last start itself (P5: always end at K).
    return [*range(0, last, stride), last]


def _backward(last: int, stride: int) -> list[int]:
    # K − W, K − W − S, ... above 0, then 0 itself (P5: never a negative start).
    return [*range(last, 0, -stride), 0]


def window_starts(strategy: str | None, length: int, window: int, stride: int) -> list[int]:
    """First list positions of the windows, in processing order.

    Args:
        strategy: one of :data:`STRATEGIES`, or None for a single window at the top.
        length: ``K``, the number of leading list entries to re-rank.
        window: ``W``, images per window; a list shorter than ``W`` is one window of ``K``.
        stride: ``S``, step between consecutive starts.

    Example:
        >>> window_starts("end-to-start", 400, 100, 50)
        [300, 250, 200, 150, 100, 50, 0]
    """
    if window < 1 or stride < 1:
        raise UserError(f"sliding window {window} and stride {stride} must both be at least 1")
    if strategy is not None and strategy not in STRATEGIES:
        raise UserError(f"unknown sliding strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    if length <= 0:
        return []
    last = max(length - window, 0)
    if strategy is None:
        return [0]
    forward, backward = _forward(last, stride), _backward(last, stride)
    if strategy == "start-to-end":
        return forward
    if strategy == "end-to-start":
        return backward
    # The turning window is shared by both passes; it runs once, as in the official lists.
    if strategy == "start-to-end-to-start":
        return forward + backward[1:]
    return backward + forward[1:]


def sliding_rerank(
    ids: np.ndarray,
    sims: np.ndarray,
    scorer: ListScorer,
    *,
    lengths: np.ndarray | int | None = None,
    strategy: str | None = "end-to-start",
    window: int = 100,
    stride: int = 50,
    alpha: float = 0.5,
    temp: float = 0.1,
    batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank the leading ``lengths[q]`` entries of every row of ``ids`` window by window.

    Each window's images are scored jointly, fused with their incoming similarities
    (:func:`~rerank.fusion.fuse`), stably sorted and written back in place. Windows of the same
    step are scored for ``batch_size`` queries at a time; queries never interact, so the result is
    the per-query loop's.

    Args:
        ids: ``[Q, M]`` database ids in the incoming order.
        sims: ``[Q, M]`` incoming similarities (the fusion's global term).
        scorer: the list model (:class:`ListScorer`).
        lengths: per query (``[Q]``) or for all, how many leading entries take part; default all
            ``M``. Entries past it never move.
        strategy: one of :data:`STRATEGIES`, or None for a single window at the top.
        window: images per window (``W``).
        stride: step between windows (``S``).
        alpha: fusion weight of the global term.
        temp: fusion temperature on the scores.
        batch_size: queries scored together per call of ``scorer``.

    Returns:
        ``(ids, scores)``, both ``[Q, M]``: the new order and, per entry, the fused score from the
        last window that scored it (incoming similarity for entries never scored). The order, not
        the scores, is the result: windows score in different contexts, so later positions can
        hold higher fused scores.
    """
    ids = np.asarray(ids)
    sims = np.asarray(sims, dtype=np.float64)
    if ids.shape != sims.shape or ids.ndim != 2:
        raise ValueError(f"ids {ids.shape} and sims {sims.shape} must be the same [Q, M] shape")
    if batch_size < 1:
        raise UserError(f"batch_size {batch_size} must be at least 1")
    num_q, num_m = ids.shape
    if lengths is None:
        lengths = num_m
    lengths = np.clip(np.broadcast_to(np.asarray(lengths, dtype=np.int64), (num_q,)), 0, num_m)

    order = np.tile(np.arange(num_m), (num_q, 1))  # current ranking as positions into ids
    by_position = sims.copy()  # latest fused score of each incoming position
    # Queries re-ranking the same length share one start list: batch them together.
    groups = [(int(n), np.flatnonzero(lengths == n)) for n in np.unique(lengths) if n > 0]
    plans = [(n, members, window_starts(strategy, n, window, stride)) for n, members in groups]
    total = sum(len(starts) * -(-len(members) // batch_size) for _, members, starts in plans)
    with tqdm(total=total, desc="re-rank windows", unit="batch", leave=False, disable=None) as bar:
        for n, members, starts in plans:
            width = min(window, n)
            for start in starts:
                for lo in range(0, len(members), batch_size):
                    batch = members[lo : lo + batch_size]
                    sel = order[batch, start : start + width]  # [B, w] positions
                    local = np.asarray(scorer(batch, np.take_along_axis(ids[batch], sel, 1)))
                    if local.shape != sel.shape:
                        raise ValueError(f"scorer returned {local.shape} for a {sel.shape} window")
                    fused = fuse(np.take_along_axis(sims[batch], sel, 1), local, alpha, temp)
                    perm = rank_desc(fused)
                    order[batch, start : start + width] = np.take_along_axis(sel, perm, 1)
                    by_position[batch[:, None], sel] = fused
                    bar.update()
    return np.take_along_axis(ids, order, 1), np.take_along_axis(by_position, order, 1)
