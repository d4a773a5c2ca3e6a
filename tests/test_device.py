"""Device names and reduced precision: ``autocast`` works around torch's AMX bfloat16 attention bug
only where that bug is, and means full precision when no dtype is asked for."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from locore.core import device
from locore.core.device import autocast


def flash_allowed() -> bool:
    return torch.backends.cuda.flash_sdp_enabled()  # the flag covers CPU flash attention too


@pytest.mark.parametrize(
    ("amx", "capability", "expected"),
    [
        (True, "DEFAULT", True),
        (True, "AVX2", True),
        (True, "AVX512", False),
        (False, "AVX2", False),
    ],
)
def test_the_bug_condition_is_amx_with_kernels_below_avx512(monkeypatch, amx, capability, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert device.amx_without_avx512() is expected


@pytest.mark.parametrize(
    ("bug", "dtype", "math_only"),
    [(True, torch.bfloat16, True), (False, torch.bfloat16, False), (True, torch.float16, False)],
)
def test_math_attention_only_under_the_bug(monkeypatch, bug, dtype, math_only):
    monkeypatch.setattr(device, "amx_without_avx512", lambda: bug)
    before = flash_allowed()
    with autocast(torch.device("cpu"), dtype):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
        assert flash_allowed() is (before and not math_only)
    assert flash_allowed() is before and not torch.is_autocast_enabled("cpu")


def test_no_dtype_is_full_precision_inside_an_outer_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast(torch.device("cpu"), None):
            x = torch.randn(4, 4)
            assert (x @ x).dtype == torch.float32
        assert (x @ x).dtype == torch.bfloat16


def test_bf16_attention_runs_with_portable_kernels():
    """On a CPU with AMX this failed inside torch before the guard (pack_vnni2); elsewhere it
    checks that the guarded call gives the unguarded result."""
    code = (
        "import torch, torch.nn.functional as F\n"
        "from locore.core.device import autocast\n"
        "q = torch.randn(1, 2, 257, 64, generator=torch.Generator().manual_seed(0))\n"
        "with autocast(torch.device('cpu'), torch.bfloat16):\n"
        "    out = F.scaled_dot_product_attention(q, q, q)\n"
        "ref = F.scaled_dot_product_attention(q.double(), q.double(), q.double())\n"
        "err = (out.double() - ref).abs().max().item()\n"
        "assert out.dtype == torch.bfloat16 and err < 0.05 * ref.abs().max().item(), err\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
