"""One rule for device names (``"auto"`` is this process's GPU when there is one, else the CPU),
and one way into reduced precision (``autocast``)."""

from __future__ import annotations

import contextlib
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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


def amx_without_avx512() -> bool:
    """True when the CPU has AMX tiles but torch's CPU kernels are held below AVX-512
    (``ATEN_CPU_CAPABILITY=default`` or ``avx2``, as cross-CPU reproducibility checks set)."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return has_amx and not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device`` (None: autocast off, full precision even
    inside an outer autocast), safe on every CPU.

    torch's CPU flash-attention kernel packs bfloat16 for AMX whenever the CPU has AMX tiles, even
    when the kernels are held below AVX-512, and then fails ("pack_vnni2 is only supported when
    avx512 is supported"; torch 2.14.1: at 257 tokens, not at 16). On exactly that combination
    attention runs in torch's math kernel instead; everywhere else torch chooses as usual.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=dtype, enabled=dtype is not None))
    if device.type == "cpu" and dtype == torch.bfloat16 and amx_without_avx512():
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack
