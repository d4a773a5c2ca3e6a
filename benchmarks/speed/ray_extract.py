"""``locore bench ray``: extraction throughput on Ray with 1, 2, ... workers against one process.

Each setting extracts the same image folder into a fresh output folder (nothing resumed) and
reports images per second of wall time, including actor start-up and the final join, which is
what a user waits for. Run it on an otherwise idle machine: the workers share its cores.

    locore bench ray --images demo_out/collection/jpg --workers 1 2 --json ray.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from locore.core.atomic import write_text
from locore.distributed import RayOptions, connect, extract_on_ray
from locore.engine.config import load_pipeline
from locore.engine.extract import Item, extract
from locore.engine.pipeline import build_extractor
from locore.feature_extractors.io import list_images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, required=True, help="folder of images to extract")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="actor counts")
    parser.add_argument("--chunk", type=int, default=16, help="images per shard (--ray-chunk)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")


def run(args: argparse.Namespace) -> int:
    """Measure one process, then each worker count, and print a markdown table."""
    config = load_pipeline(args.config, args.overrides).extractor
    files = list_images(args.images)
    items = [Item(p.relative_to(args.images).as_posix(), p) for p in files]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)
        start = time.perf_counter()
        extract(build_extractor(config), items, Path(tmp) / "single", config.batch_size)
        rows.append({"setting": "one process, 1 thread", "seconds": time.perf_counter() - start})
        connect(None)
        for workers in args.workers:
            out = Path(tmp) / f"ray{workers}"
            start = time.perf_counter()
            extract_on_ray(config, items, out, RayOptions(workers=workers, chunk=args.chunk))
            rows.append(
                {"setting": f"Ray, {workers} worker(s)", "seconds": time.perf_counter() - start}
            )
    for row in rows:
        row["images"] = len(items)
        row["images_per_s"] = len(items) / row["seconds"]
    print("| setting | images | seconds | images/s |\n|---|---|---|---|")
    for row in rows:
        seconds, rate = row["seconds"], row["images_per_s"]
        print(f"| {row['setting']} | {row['images']} | {seconds:.1f} | {rate:.2f} |")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=1))
    return 0
