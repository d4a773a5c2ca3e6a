"""``locore bench index`` end to end at toy size: every table it promises is filled in."""

from __future__ import annotations

import json

from locore.benchmarks.speed.index import write_store
from locore.cli import main


def test_bench_index_writes_latency_recall_gather_and_capacity(tmp_path, capsys):
    out = tmp_path / "index.json"
    write_store(tmp_path / "s.h5", 10, 8, 16, seed=1)  # a leftover of another size: rewritten
    args = "--n 3000 --dim 32 --kinds flat ivfpq --queries 1 4 --repeats 1 --store-images 60"
    args += " --store-k 8 --store-dim 16 --gather 10 --num-local 4 --trials 1"
    args += f" --store {tmp_path / 's.h5'} --out {out}"
    assert main(["bench", "index", *args.split()]) == 0
    results = json.loads(out.read_text())
    flat, ivfpq = results["index"]
    assert flat["kind"] == "flat" and "recall" not in flat  # exact: no recall to measure
    assert 0.5 < ivfpq["recall"] <= 1 and set(ivfpq["latency_ms"]) == {"1", "4"}
    store = results["store"]
    assert store["images"] == 60 and store["bytes_per_gather"] == 10 * 4 * (5 + 16) * 2
    for method in ("gather", "naive_h5py_loop", "h5py_fancy_index"):
        assert store[f"{method}_warm"]["images_per_s"] > 0
    assert not (tmp_path / "s.h5").exists()  # deleted unless --keep-store
    printed = capsys.readouterr().out.splitlines()
    header = printed.index("| stored L | dtype | bytes per image | ROxf+1M | RPar+1M |")
    rows = [line.split(" | ")[:2] for line in printed[header + 2 : header + 6]]
    assert rows == [
        ["| 48", "float16"],
        ["| 48", "float32"],
        ["| 100", "float16"],
        ["| 100", "float32"],
    ]
