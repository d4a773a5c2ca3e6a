"""Reading the descriptors of shortlisted ids, shared by the re-ranking stages."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from locore.core.errors import UserError


def gather_rows(table: np.ndarray, ids: np.ndarray, what: str = "global descriptors") -> np.ndarray:
    """``table[ids]`` for ids of any shape; negative ids (padding) give zero rows.

    Rows are read once each and in increasing order, which keeps reads from a memory-mapped
    ``[N, D]`` file sequential however the shortlist is ordered.

    Args:
        table: ``[N, D]`` array or memmap.
        ids: int array of any shape ``[...]``; ``-1`` marks a missing entry.
        what: name of ``table`` for the error message.

    Returns:
        ``[..., D]`` array of ``table``'s dtype.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and ids.max() >= len(table):
        raise UserError(
            f"shortlist id {int(ids.max())} is outside the {len(table)} {what}; "
            "re-rank with the database the shortlist was searched in"
        )
    unique, inverse = np.unique(np.maximum(ids, 0), return_inverse=True)
    rows = np.asarray(table[unique])[inverse.reshape(ids.shape)]
    rows[ids < 0] = 0
    return rows


def junk_mask(ids: np.ndarray, junk: Sequence[set[int]] | None) -> np.ndarray:
    """``[Q, M]`` bool, True where ``ids[q, i]`` is in ``junk[q]`` (all False for ``junk=None``)."""
    mask = np.zeros(ids.shape, dtype=bool)
    if junk is None:
        return mask
    if len(junk) != ids.shape[0]:
        raise ValueError(f"junk has {len(junk)} entries for {ids.shape[0]} queries")
    for q, bad in enumerate(junk):
        if bad:
            mask[q] = np.isin(ids[q], np.fromiter(bad, dtype=np.int64, count=len(bad)))
    return mask
