"""One rule for device names: ``"auto"`` is this process's GPU when there is one, else the CPU."""

from __future__ import annotations

import os

import torch

from locore.core.errors import UserError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when a GPU is visible (torchrun gives each process its own),
    else ``cpu``; other names are checked, and ``cuda`` without a GPU is a user error."""
    text = str(name)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(
            f"device {text!r} is not a device name; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {text!r} asked for but no CUDA device is visible; use cpu or auto")
    return device
