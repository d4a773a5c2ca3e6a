"""Independent spec-formula references shared by the extractor tests (numpy, float64)."""

from __future__ import annotations

import numpy as np
import torch


def detector_state(channels: int, seed: int = 0, hidden: int | None = None) -> dict:
    """Random AMES-detector weights under the released file's keys (reference-spec §2.4)."""
    hidden = hidden or channels
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(hidden, channels, 1, 1, generator=g) / channels**0.5,
        "conv1.bias": torch.randn(hidden, generator=g) * 0.1,
        "bn.weight": torch.rand(hidden, generator=g) + 0.5,
        "bn.bias": torch.randn(hidden, generator=g) * 0.1,
        "bn.running_mean": torch.randn(hidden, generator=g) * 0.1,
        "bn.running_var": torch.rand(hidden, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(1000),
        "conv2.weight": torch.randn(1, hidden, 1, 1, generator=g) / hidden**0.5,
        "conv2.bias": torch.randn(1, generator=g),
    }


def spec_detector(state: dict, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``f = BN(W1 x + b1)``; ``f / max(|f|, 1e-15)``; ``softplus(w2 . relu(f) + b2)`` per token."""
    s = {k: v.double().numpy() for k, v in state.items()}
    f = tokens @ s["conv1.weight"][:, :, 0, 0].T + s["conv1.bias"]
    f = (f - s["bn.running_mean"]) / np.sqrt(s["bn.running_var"] + 1e-5) * s["bn.weight"]
    f = f + s["bn.bias"]
    desc = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-15)
    logit = np.maximum(f, 0) @ s["conv2.weight"][0, :, 0, 0] + s["conv2.bias"][0]
    weight = np.where(logit > 20, logit, np.log1p(np.exp(np.minimum(logit, 20))))
    return desc, weight


def spec_rows(
    desc: np.ndarray, weight: np.ndarray, positions: np.ndarray, scale_ids: np.ndarray, k: int
) -> np.ndarray:
    """Official rows (spec §2.5): top-k by weight, ``[pos0, pos1, scale, 0, w, desc]``, padding
    rows all zero with column 3 = 1."""
    order = np.argsort(-weight, kind="stable")[:k]
    rows = np.zeros((k, 5 + desc.shape[1]))
    n = len(order)
    rows[:n, :2] = positions[order]
    rows[:n, 2] = scale_ids[order]
    rows[:n, 4] = weight[order]
    rows[:n, 5:] = desc[order]
    rows[n:, 3] = 1
    return rows


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
