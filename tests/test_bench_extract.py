"""``locore bench extract`` at toy size: both sources time real extraction and report it."""

from __future__ import annotations

import json

import pytest

from locore.cli import main


@pytest.mark.parametrize("source", ["tensors", "jpeg"])
def test_bench_extract_times_both_sources(tmp_path, source):
    out = tmp_path / "r.json"
    args = "--model efficientnet_lite0 --weights packaged --imsize 128 --batch 2 --count 4"
    args += f" --workers 0 --device cpu --source {source} --json {out}"
    assert main(["bench", "extract", *args.split()]) == 0
    result = json.loads(out.read_text())
    assert (result["model"], result["source"], result["batch"]) == ("efficientnet_lite0", source, 2)
    assert result["images"] == 4  # every requested image was extracted and timed
    assert result["seconds"] > 0 and result["images_per_s"] > 0


def test_bench_extract_rejects_a_dtype_the_model_lacks(capsys):
    args = "--model efficientnet_lite0 --weights packaged --dtype bf16 --device cpu"
    assert main(["bench", "extract", *args.split()]) == 2
    assert "efficientnet_lite0 has no dtype option" in capsys.readouterr().err
