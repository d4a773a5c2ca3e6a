"""The AMES local-feature detector ``SpatialAttention2d`` (reference-spec §2.4), run per token.

For each token ``x``: ``f = BN(W1 x + b1)``; descriptor ``f / max(|f|, 1e-15)``; weight
``softplus(w2 . relu(f) + b2)`` (beta 1, threshold 20). Every operation is point-wise, so the
official 2-D pseudo-grid is not needed: tokens ``[B, N, C]`` go through the 1x1 convolutions as
an ``N x 1`` map, and BatchNorm always uses its running statistics (inference only).

Parameter names and shapes are those of the released files (``dinov2_detector.pt`` with C = 768,
the CVNet detector with C = 1024, stored as ``{"state": state_dict}``): ``conv1.weight
[H, C, 1, 1]``, ``conv1.bias``, ``bn.{weight, bias, running_mean, running_var,
num_batches_tracked}``, ``conv2.weight [1, H, 1, 1]``, ``conv2.bias`` with H = C. DELG's attention
head is the same module with H = 512.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from locore.core.weights import RANDOM, load_state, load_strict

logger = logging.getLogger(__name__)

DETECTOR_FILENAMES = ("model.safetensors", "detector.pt", "dinov2_detector.pt")


class Detector(nn.Module):
    """Per-token descriptor head and saliency weight (AMES ``SpatialAttention2d``)."""

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Conv2d(hidden, 1, 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N, C]`` -> (unit descriptors ``[B, N, H]``, weights ``[B, N]``)."""
        # A [B, C, N, 1] map through the 1x1 convolutions: per token by construction, and the
        # same convolution kernels as the official code (bit-identical weights on CPU, where a
        # plain matmul differs by a few ulp).
        x = tokens.transpose(1, 2).unsqueeze(-1)
        bn = self.bn
        f = F.batch_norm(
            self.conv1(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
        desc = F.normalize(f, p=2, dim=1, eps=1e-15)
        weight = F.softplus(self.conv2(F.relu(f)), beta=1.0, threshold=20.0)
        return desc.squeeze(-1).transpose(1, 2), weight[:, 0, :, 0]


class NormDetector(nn.Module):
    """The official fallback without a detector file: raw tokens, weight = their L2 norm."""

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N, C]`` -> (the tokens unchanged, their norms ``[B, N]``)."""
        return tokens, torch.linalg.vector_norm(tokens, dim=-1)


def build_detector(
    source: str | Path | None, channels: int, cache_dir: str | Path | None = None
) -> nn.Module:
    """The detector for ``source``: a file / folder / HF id / URL of AMES weights (loaded
    strictly), ``"random"`` (random init, tests and benchmarks) or None (official fallback)."""
    if source is None:
        logger.warning(
            "no detector given: local descriptors are raw tokens weighted by their norm "
            "(the official fallback, not the LoCoRe setting); pass detector=PATH"
        )
        return NormDetector()
    detector = Detector(channels)
    if source == RANDOM:
        return detector.eval()
    state = load_state(source, "detector", ("state",), DETECTOR_FILENAMES, cache_dir)
    load_strict(detector, state, f"detector {source}")
    return detector.eval()
