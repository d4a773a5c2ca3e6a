"""Float comparisons scaled to what they compare, with the float32 rounding bound they allow.

Two implementations of one float32 computation (another summation order, another BLAS kernel,
another SIMD width, another thread split) differ by rounding, and rounding grows with the size of
the numbers summed, not with each output: a logit near 0 that came from cancelling terms of size
10 carries their rounding. So every tolerance here is ``rel x scale``, ``scale`` the largest
magnitude of the reference, and ``rel`` comes from :func:`float32_bound`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

U32 = 2.0**-24  # float32 unit roundoff (half of machine epsilon)


def float32_bound(steps: int, length: int) -> float:
    """Relative error float32 promises for ``steps`` chained reductions of ``length`` terms.

    The probabilistic rounding bound of Higham & Mary (SIAM J. Sci. Comput. 2019): a dot product of
    n terms errs by ``~ sqrt(n) u`` of the magnitudes summed (the worst case ``n u`` needs every
    rounding to go the same way, which no real kernel does), and chained steps add their errors.
    """
    return steps * math.sqrt(length) * U32


def max_abs(x) -> float:
    """Largest magnitude of a tensor or array (1 for an empty or all-zero one)."""
    a = np.abs(as_f64(x))
    return max(float(a.max()) if a.size else 0.0, 1e-30) or 1.0


def as_f64(x) -> np.ndarray:
    """A float64 numpy copy of a tensor, array or number."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(ours, ref, tol, what: str = "") -> None:
    """``|ours - ref| <= tol`` elementwise (``tol`` a number or an array shaped like ``ref``)."""
    ours, ref = as_f64(ours), as_f64(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    err = np.abs(ours - ref)
    excess = err - np.broadcast_to(np.asarray(tol, dtype=np.float64), err.shape)
    if excess.size and excess.max() > 0:
        i = np.unravel_index(int(excess.argmax()), err.shape)
        allowed = float(np.broadcast_to(tol, err.shape)[i])
        raise AssertionError(
            f"{what}: |error| {err[i]:.3g} > allowed {allowed:.3g} at {i} "
            f"(ours {ours[i]:.7g}, reference {ref[i]:.7g}; max error {err.max():.3g})"
        )


def assert_close_to_scale(ours, ref, rel: float, what: str = "") -> None:
    """``|ours - ref| <= rel x max|ref|`` elementwise (see the module docstring)."""
    assert_close(ours, ref, rel * max_abs(ref), what)


def locore_score_tolerances(class1, eps: float) -> dict[str, np.ndarray | float]:
    """Tolerances of LoCoRe's outputs when every logit may be off by ``eps``.

    ``class1``: ``[B, G, T]`` reference class-1 logits of the gallery blocks (GLOBAL, locals,
    SEP). A score of one logit inherits ``eps``; max-sum adds T - 1 of them; max-prod, to first
    order, ``sum_i |prod_{j != i} x_j|`` times it (plus its own T - 1 roundings); the mean
    cross-entropy moves by at most 2x it (its gradient has l1 norm <= 2 per token).
    """
    c = as_f64(class1)[..., :-1]  # the SEP token is no score's
    others = np.stack([np.delete(c, i, -1).prod(-1) for i in range(c.shape[-1])], -1)
    return {
        "token_logits": eps,
        "max-prod": eps * np.abs(others).sum(-1) + c.shape[-1] * U32 * np.abs(c.prod(-1)),
        "max-sum": c.shape[-1] * eps,
        "max-start": eps,
        "max-end": eps,
        "loss": 2 * eps,
    }
