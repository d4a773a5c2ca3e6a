"""The golden and parity verdicts hold under other CPU code paths and thread counts.

Another CPU (AVX-512 instead of AVX2), another MKL kernel or another thread split rounds
differently; the tolerances of the golden and parity tests are float32 bounds scaled to what they
compare, so their verdict must not change. Each run below re-runs those tests in a fresh
interpreter (the code path is chosen when torch loads) with torch's portable kernels
(``ATEN_CPU_CAPABILITY=default``), MKL's reproducible mode (``MKL_CBWR=COMPATIBLE``) and 1 or 2
threads, and reads the verdict from pytest's JUnit XML report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
SELECTED = [
    "test_locore_golden.py",
    "test_extract_golden.py",
    "test_locore_model.py::test_fast_matches_dense_reference_in_float64",
    "test_locore_model.py::test_fast_matches_hf[window-padding]",
    "test_locore_model.py::test_fast_matches_hf[many-chunks]",
    "test_dinov2.py::test_vit_tokens_match_an_independent_forward",
    "test_dinov2.py::test_extraction_matches_the_spec_formulas",
    # bfloat16 attention: torch's AMX packing fails under these kernels (core.device.autocast)
    "test_dinov2.py::test_bf16_autocast_stays_close_and_bad_dtype_is_rejected",
]


@pytest.mark.parametrize("threads", [1, 2])
def test_golden_and_parity_tests_pass_on_portable_kernels(tmp_path, threads):
    report = tmp_path / "report.xml"
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_CBWR": "COMPATIBLE",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "LOCORE_TEST_THREADS": str(threads),
    }
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    args += [str(TESTS / s) for s in SELECTED]
    done = subprocess.run(args, env=env, cwd=TESTS.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    suite = ET.parse(report).getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
    assert counts["tests"] >= 14, counts  # all ran: 14 with one golden file of each kind
