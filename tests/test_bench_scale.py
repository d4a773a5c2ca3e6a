"""``locore bench scale`` end to end on the smallest release (no distractors, 8-D, 4 locals):
the real ``bench revisitop`` child runs, its stages are cut and accounted, the report is drawn.
(Reusing a release is tested in test_synthetic_release.py.)"""

import json

import pytest

from locore import cli
from locore.benchmarks import scale


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    argv = [
        "bench", "scale", "--n", "0", "--out", str(out), "--dim", "8", "--num-local", "4",
        "--nn-depth", "20", "--topk", "8", "--window", "4", "--stride", "2",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    return out, scale.read_records(out / "scale.jsonl")


def test_the_real_command_runs_and_every_stage_is_accounted(measured):
    out, (record,) = measured
    assert record["returncode"] == 0 and record["database"] == 4993 and record["cold"]
    assert "bench revisitop --dataset roxford5k --with-1m --from-official" in record["command"]
    assert "Medium" in record["table"] and "superglobal + locore_base" in record["table"]
    names = [s["name"] for s in record["stages"]]
    assert names == [
        "start: import, open the release",
        "first stage: read nn_superglobal.pkl",
        "re-rank hard (superglobal + locore)",
        "re-rank hard* (superglobal + locore)",
        "evaluate + report",
    ]
    # The stages partition the run: their wall times add up to it (float64 sums of <1e3 s).
    total = sum(s["wall_s"] for s in record["stages"])
    assert total == pytest.approx(record["wall_s"], rel=1e-9, abs=1e-6)
    assert all(s["peak_rss_mb"] > 0 for s in record["stages"])
    assert record["peak_rss_mb"] >= max(s["peak_rss_mb"] for s in record["stages"])
    assert (out / "run_n0" / "results.csv").is_file()


def test_the_report_keeps_the_last_record_of_each_n(measured):
    out, (record,) = measured
    assert record["generate_s"] is not None  # a new release
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "scale.md").read_text().count("| 0 | 4,993 |") == 1
    again = {**record, "n": 0, "wall_s": 12345.0, "generate_s": None}
    with open(out / "scale.jsonl", "a") as f:
        f.write(json.dumps(again) + "\n")
    (last,) = scale.read_records(out / "scale.jsonl")
    table = scale.report([last])
    assert "| 0 | 4,993 |" in table and "reused | 12345.0 |" in table
