"""End to end on the demo collection: a query's own scene fills the top ranks."""

from __future__ import annotations

import json

import pytest

from locore.benchmarks.datasets.demo import DemoSpec, generate
from locore.cli import main
from locore.core import config as cfg
from locore.engine.config import PipelineConfig
from locore.engine.evaluate import evaluate_index, load_gnd
from locore.engine.pipeline import build_index, open_index, search

SPEC = DemoSpec(easy=2, hard=1, junk=1, queries=1, train_views=1, distractors=8)


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    collection = generate(root / "collection", SPEC)
    config = cfg.load(PipelineConfig, "demo", ["search.rerank=[]"])
    build_index(collection / "jpg", root / "index", config)
    return collection, root / "index"


def test_round_trip_own_scene_first(demo_index):
    collection, index_dir = demo_index
    gt = load_gnd(collection / "gnd_demo.pkl")
    handle = open_index(index_dir)
    try:
        paths = [collection / "queries" / f"{q}.jpg" for q in gt["qimlist"]]
        results = search(handle, paths, [g["bbx"] for g in gt["gnd"]])
    finally:
        handle.close()
    hits = 0
    for name, result in zip(gt["qimlist"], results):
        scene = name.removeprefix("query_")[:-1]
        top = [handle.names[int(i)] for i in result.ids[:2]]
        hits += all(t.startswith(scene + "_") for t in top)
        assert (result.scores[:-1] >= result.scores[1:]).all()
    assert hits >= len(results) - 1  # the demo has one real viewpoint change (motorcycle)


def test_eval_reports_map_and_files(demo_index, tmp_path):
    collection, index_dir = demo_index
    handle = open_index(index_dir)
    try:
        report = evaluate_index(
            handle, collection / "gnd_demo.pkl", collection / "queries", out=tmp_path
        )
    finally:
        handle.close()
    assert report.num_queries == 7 and report.after is None
    assert 50 < report.before["medium"]["map"] <= 100
    assert report.before["easy"]["map"] >= report.before["hard"]["map"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["before"]["medium"]["map"] == pytest.approx(report.before["medium"]["map"])
    assert len((tmp_path / "per_query.jsonl").read_text().splitlines()) == 7


def test_cli_search_writes_jsonl_and_grid(demo_index, tmp_path, capsys):
    collection, index_dir = demo_index
    query = collection / "queries" / "query_coffee0.jpg"
    out, grid = tmp_path / "r.jsonl", tmp_path / "g.png"
    assert (
        main(
            [
                "search",
                str(query),
                "--index",
                str(index_dir),
                "--out",
                str(out),
                "--grid",
                str(grid),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "coffee_" in printed.splitlines()[2]  # rank 1 line of the table
    record = json.loads(out.read_text())
    assert record["results"][0]["name"].startswith("coffee_")
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_reranker_changes_ranks(demo_index, tmp_path):
    """The demo preset's LoCoRe checkpoint (with its stored fusion) re-ranks the demo."""
    collection, index_dir = demo_index
    demo = cfg.load(PipelineConfig, "demo")
    assert [s.name for s in demo.search.rerank] == ["superglobal", "locore", "diffusion"]
    stage = demo.search.rerank[1]
    # Its stored fusion leans on the global similarity (alpha 0.9): weigh the model's logits
    # more here, so that the checkpoint itself must move images.
    options = {**stage.options, "topk": 16, "window": 8, "stride": 4, "alpha": 0.3, "temp": 1.0}
    override = [f"search.rerank=[{{name: locore, options: {json.dumps(options)}}}]"]
    handle = open_index(index_dir, override)
    try:
        report = evaluate_index(handle, collection / "gnd_demo.pkl", collection / "queries")
    finally:
        handle.close()
    assert report.after is not None and report.rerank == ["locore"]
    changed = sum(r["top10_before"] != r["top10_after"] for r in report.per_query)
    assert changed > 0
