"""The AMES local-feature detector (``SpatialAttention2d``, reference-spec §2.4), per token.

For each location ``x``: ``f = BN(W1 x + b1)``; descriptor ``f / max(|f|, 1e-15)``; weight
``softplus(w2 . relu(f) + b2)``. Every operation is point-wise, so tokens are processed as a
``[B, C, N, 1]`` map (no spatial layout needed). Parameter names match the released
``dinov2_detector.pt`` / CVNet detector files (``{"state": state_dict}``), loaded strictly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError


class Detector(nn.Module):
    """Per-token descriptor head and saliency weight."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Conv2d(channels, 1, 1)
        self.softplus = nn.Softplus(beta=1, threshold=20)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N, C]`` tokens -> (descriptors ``[B, N, C]`` unit norm, weights ``[B, N]``)."""
        x = tokens.transpose(1, 2).unsqueeze(-1)  # [B, C, N, 1]
        f = self.bn(self.conv1(x))
        desc = F.normalize(f, p=2, dim=1, eps=1e-15)
        weight = self.softplus(self.conv2(F.relu(f)))
        return desc.squeeze(-1).transpose(1, 2), weight[:, 0, :, 0]


def load_detector(path: str | Path, channels: int) -> Detector:
    """Build a detector and load an AMES-format file strictly (clear error on any key mismatch)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"detector weights {path} do not exist; download dinov2_detector.pt "
            "from the AMES release or pass detector=None"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state" not in blob:
        raise UserError(f"detector file {path} has no 'state' key; expected the AMES format")
    detector = Detector(channels)
    strict_load(detector, blob["state"], f"detector {path}")
    return detector.eval()


def strict_load(module: nn.Module, state: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error listing missing/unexpected keys and
    shape mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            k = shapes[0]
            parts.append(f"shape of {k} {tuple(state[k].shape)} != {tuple(own[k].shape)}")
        raise UserError(f"{what} does not fit the model: {'; '.join(parts)}; pass matching weights")
    module.load_state_dict(state, strict=True)
