"""``locore demo``: the whole pipeline on the embedded collection, offline, in minutes.

Steps (each is also a CLI command, printed as it runs): generate the scikit-image collection
(cached), ``locore index`` its database, ``locore search`` one query image (top 10 printed,
``results.jsonl`` and a PNG grid written), then ``locore eval`` over all queries (mAP
Easy/Medium/Hard, before and after re-ranking when the config has a re-ranking chain).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from locore.benchmarks.datasets.demo import DemoSpec, generate
from locore.benchmarks.visualize import grid_for_result
from locore.core import config as cfg
from locore.engine.config import PipelineConfig
from locore.engine.evaluate import evaluate_index, format_metrics, load_gnd
from locore.engine.pipeline import build_index, open_index, search
from locore.engine.results import format_table, result_records, write_jsonl

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated collection")


def run(args: argparse.Namespace) -> int:
    config_name = args.config or "demo"
    config = cfg.load(PipelineConfig, config_name, args.overrides)
    out: Path = args.out
    start = time.perf_counter()
    collection = generate(out / "collection", DemoSpec(seed=args.seed))
    gnd_path = collection / "gnd_demo.pkl"
    print(f"[1/4] collection: {collection} (database jpg/, queries queries/, gnd_demo.pkl)")

    print(
        f"[2/4] locore index --config {config_name} --images {collection / 'jpg'} "
        f"--out {out / 'index'}"
    )
    cfg.save(config, out / "config.yaml")
    summary = build_index(collection / "jpg", out / "index", config)
    print(f"      indexed {summary.size} images, skipped {len(summary.extract.skipped)}")

    gt = load_gnd(gnd_path)
    query = gt["qimlist"][0]
    box = tuple(gt["gnd"][0]["bbx"])
    query_path = collection / "queries" / f"{query}.jpg"
    box_text = ",".join(f"{v:.0f}" for v in box)
    print(f"[3/4] locore search {query_path} --box {box_text} --index {out / 'index'}")
    handle = open_index(out / "index", [*args.overrides])
    try:
        results = search(handle, [query_path], [box])
        records = result_records(results, handle.names)
        print(format_table(records[0], config.search.show))
        write_jsonl(records, out / "results.jsonl")
        grid_for_result(
            results[0],
            handle,
            out / "grid.png",
            limit=config.search.show,
            images_root=collection / "jpg",
            gnd_entry=gt["gnd"][0],
            imlist=gt["imlist"],
            title=f"{query}: top {config.search.show}",
        )
        print(f"      results -> {out / 'results.jsonl'}, grid -> {out / 'grid.png'}")

        print(
            f"[4/4] locore eval --index {out / 'index'} --gnd {gnd_path} "
            f"--queries {collection / 'queries'}"
        )
        report = evaluate_index(handle, gnd_path, collection / "queries", out=out / "eval")
    finally:
        handle.close()
    print(format_metrics(report))
    print(f"demo finished in {time.perf_counter() - start:.1f} s; outputs in {out}")
    return 0
