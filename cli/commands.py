"""``locore extract | index | search | rerank | eval``: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from locore.benchmarks.visualize import grid_for_result
from locore.core import config as cfg
from locore.core.errors import UserError
from locore.engine.config import PipelineConfig, load_pipeline
from locore.engine.evaluate import evaluate_index, format_metrics
from locore.engine.extract import Item, export_official, extract, parse_shard, shard_items
from locore.engine.pipeline import (
    build_extractor,
    build_index,
    extract_queries,
    open_index,
    rerank_chain,
    search,
    to_results,
)
from locore.engine.results import format_table, result_records, write_jsonl
from locore.feature_extractors.io import list_images, load_image
from locore.indexing.shortlist import Shortlist

logger = logging.getLogger(__name__)


def load_config(args: argparse.Namespace, extra: list[str] | None = None) -> PipelineConfig:
    """Defaults <- ``--config`` <- ``--set`` (<- flag shortcuts in ``extra``)."""
    return load_pipeline(args.config, [*args.overrides, *(extra or [])])


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` -> a tuple of floats."""
    if text is None:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--box {text!r} must be four numbers x1,y1,x2,y2") from None
    if x2 <= x1 or y2 <= y1:
        raise UserError(f"--box {text!r} is empty: need x2 > x1 and y2 > y1")
    return x1, y1, x2, y2


def rerank_overrides(value: str | None) -> list[str]:
    """``--rerank superglobal,locore`` -> the equivalent ``--set search.rerank=...``."""
    if not value:
        return []
    stages = [{"name": n.strip()} for n in value.split(",") if n.strip()]
    return [f"search.rerank={json.dumps(stages)}"]


# ----------------------------------------------------------------------------------------------
def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, required=True, help="folder of images")
    p.add_argument("--out", type=Path, required=True, help="output folder (resumed if present)")
    p.add_argument("--shard", default=None, help="i/N: extract the i-th of N contiguous slices")
    p.add_argument(
        "--official",
        default=None,
        metavar="PREFIX",
        help="also write PREFIX_local.hdf5 (flat float32) and PREFIX_global.pt in --out",
    )


def run_extract(args: argparse.Namespace) -> int:
    config = load_config(args)
    files = list_images(args.images)
    items = shard_items(
        [Item(str(p.relative_to(args.images)), p) for p in files], parse_shard(args.shard)
    )
    out = args.out
    cfg.save(config, out / "config.yaml")
    report = extract(
        build_extractor(config.extractor),
        items,
        out,
        batch_size=config.extractor.batch_size,
        num_workers=config.extractor.num_workers,
        store_dtype=config.extractor.store_dtype,
        attrs={"extractor": config.extractor.name},
    )
    if args.official:
        done = {name for name, _ in report.skipped}
        order = [it.name for it in items if it.name not in done]
        for path in export_official(out, order, out, args.official):
            print(f"official layout -> {path}")
    print(
        f"extracted {report.done} new, {report.resumed} already stored, "
        f"{len(report.skipped)} skipped (see {out / 'skipped.tsv'}) -> {out}"
    )
    return 0


# ----------------------------------------------------------------------------------------------
def add_index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, required=True, help="folder of database images")
    p.add_argument("--out", type=Path, required=True, help="index folder (resumed if present)")


def run_index(args: argparse.Namespace) -> int:
    summary = build_index(args.images, args.out, load_config(args))
    skipped = summary.extract.skipped
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    print(f"indexed {summary.size} images ({len(skipped)} skipped) -> {summary.directory}")
    return 0


# ----------------------------------------------------------------------------------------------
def _add_query_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, help="index folder from `locore index`")
    p.add_argument("--rerank", default=None, help="re-ranking chain, e.g. superglobal,locore")
    p.add_argument("--topk", type=int, default=None, help="shortlist length (search.topk)")
    p.add_argument("--out", type=Path, default=None, help="results JSON Lines file")


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", nargs="+", type=Path, help="query image file(s)")
    p.add_argument("--box", default=None, help="x1,y1,x2,y2 query region (one query only)")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the top results")
    _add_query_arguments(p)


def _open(args: argparse.Namespace):
    extra = rerank_overrides(args.rerank)
    if args.topk is not None:
        extra.append(f"search.topk={args.topk}")
    return open_index(args.index, [*args.overrides, *extra])


def run_search(args: argparse.Namespace) -> int:
    box = parse_box(args.box)
    if box is not None and len(args.query) != 1:
        raise UserError("--box applies to a single query; pass one query image with it")
    for path in args.query:
        load_image(path)  # fail early, with one line, on a non-image query
    handle = _open(args)
    try:
        results = search(handle, args.query, [box] * len(args.query) if box else None)
        records = result_records(results, handle.names)
        show = handle.config.search.show
        for record in records:
            print(format_table(record, show))
        if args.out:
            print(f"results -> {write_jsonl(records, args.out)}")
        if args.grid:
            grid_for_result(results[0], handle, args.grid, limit=show)
            print(f"grid -> {args.grid}")
    finally:
        handle.close()
    return 0


# ----------------------------------------------------------------------------------------------
def add_rerank_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shortlist",
        type=Path,
        required=True,
        help="shortlist: our .npy pair prefix or an official nn_*.pkl",
    )
    p.add_argument(
        "--queries",
        type=Path,
        required=True,
        help="folder of query images, in the shortlist's row order (sorted names)",
    )
    _add_query_arguments(p)


def run_rerank(args: argparse.Namespace) -> int:
    handle = _open(args)
    try:
        if not handle.config.search.rerank:
            raise UserError("no re-ranking stage chosen; pass --rerank NAME[,NAME]")
        paths = list_images(args.queries)
        shortlist = Shortlist.load(args.shortlist)
        if shortlist.ids.shape[0] != len(paths):
            raise UserError(
                f"shortlist {args.shortlist} has {shortlist.ids.shape[0]} rows but "
                f"{args.queries} holds {len(paths)} images; they must match one to one"
            )
        if shortlist.ids.max() >= len(handle.names):
            raise UserError(
                f"shortlist {args.shortlist} refers to id {int(shortlist.ids.max())} but the "
                f"index holds {len(handle.names)} images; use the index it was made for"
            )
        shortlist = shortlist.truncate(min(handle.config.search.topk, shortlist.ids.shape[1]))
        queries = extract_queries(build_extractor(handle.config.extractor), paths)
        result = rerank_chain(handle.config.search.rerank, queries, shortlist, handle.database)
        records = result_records(to_results(paths, None, shortlist, result), handle.names)
        for record in records:
            print(format_table(record, handle.config.search.show))
        if args.out:
            print(f"results -> {write_jsonl(records, args.out)}")
    finally:
        handle.close()
    return 0


# ----------------------------------------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, help="index of the database images")
    p.add_argument("--gnd", type=Path, required=True, help="Revisited-format gnd_*.pkl")
    p.add_argument("--queries", type=Path, required=True, help="folder holding qimlist images")
    p.add_argument("--rerank", default=None, help="re-ranking chain, e.g. superglobal,locore")
    p.add_argument("--topk", type=int, default=None, help="shortlist length (search.topk)")
    p.add_argument("--out", type=Path, default=None, help="folder for metrics.json + per-query")


def run_eval(args: argparse.Namespace) -> int:
    handle = _open(args)
    try:
        report = evaluate_index(handle, args.gnd, args.queries, out=args.out)
    finally:
        handle.close()
    print(format_metrics(report))
    return 0
