"""``locore bench precision``: a float32 store re-ranks exactly as the official float32 files;
float16 rounding reaches the scores (issue #16, store precision)."""

from __future__ import annotations

import json

from locore.cli import main


def test_float32_store_agrees_exactly_and_float16_is_measured(tmp_path, capsys):
    out = tmp_path / "precision"
    argv = ["bench", "precision", "--n", "20", "--dim", "8", "--num-local", "4", "--topk", "12",
            "--window", "6", "--stride", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = {r["variant"]: r for r in json.loads((out / "precision.json").read_text())["rows"]}
    assert list(rows) == ["official float32", "store float32", "store float16"]
    same = rows["store float32"]
    assert same["agreement"] == {
        "queries": 70, "order_changed": 0, "positions_moved": 0.0, "max_score_diff": 0.0
    }  # fmt: skip
    assert [same[k] for k in ("medium", "hard", "hard*")] == [
        rows["official float32"][k] for k in ("medium", "hard", "hard*")
    ]
    half = rows["store float16"]
    assert 0 < half["agreement"]["max_score_diff"] < 1e-2
    assert half["bytes_per_image"] < same["bytes_per_image"]
    assert "| store float16 |" in capsys.readouterr().out
    # a rerun reuses the release, the stores and every cached stage
    assert main(argv) == 0
    again = json.loads((out / "precision.json").read_text())["rows"]
    assert again == list(rows.values())
