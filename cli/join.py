"""``locore join``: join extraction shards made with ``--shard i/N`` (or any other way)."""

from __future__ import annotations

import argparse
from pathlib import Path

from locore.engine.join import join_extractions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", type=Path, nargs="+", help="extraction folders, joined in this order")
    p.add_argument("--out", type=Path, required=True, help="the joined extraction folder")


def run(args: argparse.Namespace) -> int:
    report = join_extractions(args.shards, args.out)
    print(
        f"joined {report.shards} shards: {report.images} images, {report.skipped} skipped "
        f"-> {args.out} (the store maps the shard files: keep them beside it)"
    )
    return 0
