"""Move protocol-ignored ids out of a shortlist before re-ranking (reference-spec §6.4).

The Revisited protocol ignores junk images (and, for Hard*, easy ones); letting them occupy
re-ranking slots wastes the window. The partition is stable: kept columns and moved columns each
keep their relative order, and similarities travel with their ids. The chain applies it, once, for
every stage that asks (``rerank.chain.stage_input``); stages never call it themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def partition_junk(
    ids: np.ndarray, sims: np.ndarray, junk: Sequence[set[int]] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Stable-partition each row of ``ids`` ``[Q, M]`` so ids in ``junk[q]`` go to the end.

    Returns new ``(ids, sims)`` arrays; the inputs are not modified. ``junk=None`` is a no-op.
    """
    if junk is None:
        return ids, sims
    if len(junk) != ids.shape[0]:
        raise ValueError(f"junk has {len(junk)} entries for {ids.shape[0]} queries")
    is_junk = np.zeros(ids.shape, dtype=bool)
    for q, bad in enumerate(junk):
        if bad:
            is_junk[q] = np.isin(ids[q], np.fromiter(bad, dtype=np.int64, count=len(bad)))
    order = np.argsort(is_junk, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)
