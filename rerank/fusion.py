"""Global-local score fusion and the stable descending sort every stage ranks with.

LoCoRe does not rank by its local logits alone: it mixes them with the global similarity of the
ranking it received (reference-spec §6.5), ``s = α·g + (1 − α)·sigmoid(τ·l)``. The official code
sorts with ``torch.sort``, which is not stable, so equal scores (τ = 0, α = 1, duplicate images)
could swap between runs and devices (P20). Here ties always keep the incoming order.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(−x))`` without overflow for large ``|x|``."""
    return np.exp(-np.logaddexp(0.0, -x))


def fuse(
    global_sims: np.ndarray, local_scores: np.ndarray, alpha: float, temp: float
) -> np.ndarray:
    """``α·g + (1 − α)·sigmoid(τ·l)`` elementwise, in float64 (reference-spec §6.5).

    Args:
        global_sims: ``[..., G]`` similarities of the incoming ranking (the shortlist's, not the
            model's global tokens: P14).
        local_scores: ``[..., G]`` raw class-1 logits of the list model.
        alpha: weight of the global term; 1 keeps the global ranking.
        temp: temperature τ on the logits; 0 makes the local term a constant.
    """
    g = np.asarray(global_sims, dtype=np.float64)
    local = np.asarray(local_scores, dtype=np.float64)
    if g.shape != local.shape:
        raise ValueError(f"global sims {g.shape} and local scores {local.shape} differ in shape")
    return alpha * g + (1.0 - alpha) * sigmoid(temp * local)


def rank_desc(scores: np.ndarray) -> np.ndarray:
    """Indices that sort each row of ``scores`` ``[..., G]`` best first; ties keep their order.

    The incoming column order is the tie-breaker, so a stage never reorders images it cannot tell
    apart (P20).
    """
    scores = np.asarray(scores)
    # A stable ascending sort of the negated scores is a stable descending sort: equal keys keep
    # their column order. Negation is exact for floats and cannot overflow.
    return np.argsort(-scores, axis=-1, kind="stable")
