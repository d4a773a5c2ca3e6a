"""``locore extract | index | search | rerank | eval``: arguments, up-front checks, printing.

Every flag is honoured or refused before any work starts. The query commands (search, rerank,
eval) read the index's own ``config.yaml`` and apply, in this order, ``--config`` (a preset laid
over it), the shortcuts ``--rerank``/``--topk``, then ``--set`` (so ``--set`` refines a stage that
``--rerank`` chose). Settings fixed when the index was built cannot change at query time: the
descriptor settings are refused by ``open_index``, the ``index`` section here.

A stage named by ``--rerank`` alone takes its options from the index's config when that has the
stage, else from the preset made for the index's extractor (``configs/pipelines``): an index of
the offline extractor gets the bundled offline re-ranker, never a download.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from huggingface_hub import try_to_load_from_cache

from locore.benchmarks.visualize import grid_for_results
from locore.core import config as cfg
from locore.core.errors import UserError
from locore.core.resources import CONFIG_ROOT, resolve_resource
from locore.engine.config import PipelineConfig, load_pipeline
from locore.engine.evaluate import evaluate_index, format_metrics
from locore.engine.extract import Item, export_official, extract, parse_shard, shard_items
from locore.engine.pipeline import (
    CONFIG_FILE,
    IndexHandle,
    build_extractor,
    build_index,
    check_config,
    extract_queries,
    first_stage,
    open_index,
    rerank_chain,
    to_results,
)
from locore.engine.results import format_table, result_records, write_jsonl
from locore.feature_extractors.io import list_images, load_image
from locore.indexing.shortlist import Shortlist
from locore.rerank import RERANKERS
from locore.rerank.locore import checkpoint as locore_checkpoint
from locore.rerank.locore.config import LocoreConfig
from locore.rerank.locore.reranker import locore as locore_factory

logger = logging.getLogger(__name__)


class Stopwatch:
    """Wall time of a command's named stages, printed as one line at its end; the total is the
    wall time since the stopwatch was made (the stages need not cover all of it)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def line(self) -> str:
        stages = ", ".join(f"{name} {s:.2f} s" for name, s in self.seconds.items())
        return f"times: {stages} (total {time.perf_counter() - self.started:.2f} s)"


# ----------------------------------------------------------------------------------------------
# Up-front checks of paths and values
# ----------------------------------------------------------------------------------------------
def image_folder(path: Path, flag: str = "--images") -> Path:
    """An existing folder of images (a file is refused by name, not as 'does not exist')."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; pass the folder of images")
    if not path.is_dir():
        raise UserError(f"{flag} {path} does not exist; pass an existing folder of images")
    return path


def output_folder(path: Path, flag: str = "--out") -> Path:
    """A folder to write into: created when missing, refused when it is a file."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a folder (it is created if missing)")
    _parents_are_folders(path, flag)
    return path


def output_file(path: Path | None, flag: str) -> Path | None:
    """A file to write: refused when it is a folder or lies below a file."""
    if path is None:
        return None
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name inside it")
    _parents_are_folders(path, flag)
    return path


def _parents_are_folders(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            return


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` (finite pixel coordinates, x2 > x1 and y2 > y1) -> a tuple of floats."""
    if text is None:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--box {text!r} must be four numbers x1,y1,x2,y2") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise UserError(f"--box {text!r} must hold finite pixel coordinates, not nan or inf")
    if x2 <= x1 or y2 <= y1:
        raise UserError(f"--box {text!r} is empty: need x2 > x1 and y2 > y1")
    return x1, y1, x2, y2


def load_config(args: argparse.Namespace) -> PipelineConfig:
    """Defaults <- ``--config`` <- ``--set``, checked."""
    config = load_pipeline(args.config, args.overrides)
    check_config(config)
    return config


# ----------------------------------------------------------------------------------------------
# The configuration of a query command
# ----------------------------------------------------------------------------------------------
def query_overrides(args: argparse.Namespace) -> list[str]:
    """``--config``, ``--rerank``, ``--topk`` and ``--set``, laid over the index's config in that
    order, as overrides of whole sections."""
    stored = Path(args.index) / CONFIG_FILE
    if not stored.is_file():
        return list(args.overrides)  # open_index says it is not an index
    data = cfg.read_yaml(stored)
    if args.config is not None:
        data = cfg.merge(data, cfg.read_yaml(cfg.resolve_path(args.config)))
    sets = cfg.parse_overrides(args.overrides)
    asked = sets.get("search") if isinstance(sets.get("search"), dict) else {}
    if args.rerank is not None:
        if "rerank" in asked and not isinstance(asked["rerank"], dict):
            raise UserError(
                "--rerank and --set search.rerank=[...] both choose the re-ranking chain; "
                "pass one of them (--set search.rerank.N.options.KEY=V refines --rerank)"
            )
        stages = rerank_stages(args.rerank, cfg.from_dict(PipelineConfig, data))
        data = cfg.merge(data, {"search": {"rerank": stages}})
    if args.topk is not None:
        if "topk" in asked:
            raise UserError("--topk and --set search.topk both set the shortlist; pass one")
        data = cfg.merge(data, {"search": {"topk": args.topk}})
    data = cfg.merge(data, sets)
    if args.config is None and args.rerank is None and args.topk is None and not sets:
        return []
    return [f"{section}={json.dumps(value)}" for section, value in data.items()]


def rerank_stages(value: str, base: PipelineConfig) -> list[dict]:
    """``--rerank superglobal,locore`` -> stage specs with each stage's default options."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise UserError(f"--rerank {value!r} names no stage; e.g. --rerank superglobal,locore")
    return [{"name": n, "options": stage_defaults(n, base)} for n in names]


def stage_defaults(name: str, base: PipelineConfig) -> dict:
    """Options of a stage named by ``--rerank`` alone (see the module docstring)."""
    for stage in base.search.rerank:
        if stage.name == name:
            return dict(stage.options)
    return preset_stage(name, base.extractor.name)


def preset_stage(name: str, extractor: str) -> dict:
    """Options of stage ``name`` in the first preset (by file name) made for ``extractor``."""
    for path in sorted((CONFIG_ROOT / "pipelines").glob("*.yaml")):
        preset = cfg.load(PipelineConfig, path)
        if preset.extractor.name == extractor:
            for stage in preset.search.rerank:
                if stage.name == name:
                    return dict(stage.options)
    return {}


def open_query_index(args: argparse.Namespace) -> IndexHandle:
    """Open ``--index`` with the command's settings, refusing what it cannot honour."""
    handle = open_index(args.index, query_overrides(args))
    try:
        stored = cfg.load(PipelineConfig, handle.directory / CONFIG_FILE)
        if handle.config.index != stored.index:
            raise UserError(
                f"the index section is fixed when an index is built (index {handle.directory} "
                f"is {stored.index.kind!r} with {stored.index.options}); drop index settings "
                "from --config/--set or build another index with them"
            )
        check_local_dims(handle)
    except BaseException:
        handle.close()
        raise
    return handle


def check_local_dims(handle: IndexHandle) -> None:
    """Refuse a LoCoRe stage whose checkpoint takes locals of another size than the index's."""
    store = handle.database.store
    default = inspect.signature(locore_factory).parameters["checkpoint"].default
    for i, stage in enumerate(handle.config.search.rerank):
        if store is None or RERANKERS.factory(stage.name) is not locore_factory:
            continue
        source = stage.options.get("checkpoint", default)
        want = checkpoint_local_dim(source)
        if want is None or want == store.dim:
            continue
        bundled = preset_stage(stage.name, handle.config.extractor.name).get("checkpoint")
        hint = f", e.g. {bundled}" if bundled and bundled != source else ""
        raise UserError(
            f"re-ranker {source} takes {want}-D local descriptors but index {handle.directory} "
            f"stores {store.dim}-D ones ({handle.config.extractor.name}); pass a checkpoint "
            f"trained on this extractor with --set search.rerank.{i}.options.checkpoint=...{hint}"
        )


def checkpoint_local_dim(source: str) -> int | None:
    """Local-descriptor width a LoCoRe checkpoint takes, read without loading (or downloading)
    weights: its ``config.json``, else the official base architecture (as the loader assumes).
    None for an unknown source: the loader names that problem."""
    path = Path(resolve_resource(source))
    if path.exists():
        _, config = locore_checkpoint.resolve(source)
    elif locore_checkpoint.HUB_ID.fullmatch(str(source)):
        cached = try_to_load_from_cache(str(source), locore_checkpoint.CONFIG_NAME)
        config = locore_checkpoint.read_config(Path(cached)) if isinstance(cached, str) else None
    else:
        return None
    return (config or LocoreConfig()).local_dim


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
    _add_ray_arguments(p, chunks=True)


def _add_ray_arguments(p: argparse.ArgumentParser, chunks: bool = False) -> None:
    """``--ray`` and its options (docs/DISTRIBUTED.md); Ray itself is the optional extra."""
    group = p.add_argument_group("Ray (pip install locore[ray]; see docs/DISTRIBUTED.md)")
    group.add_argument("--ray", action="store_true", help="run on a Ray cluster")
    group.add_argument(
        "--address",
        default=None,
        help="Ray cluster: auto, ray://head:10001 (default: this machine)",
    )
    group.add_argument("--ray-workers", type=int, default=None, help="actors (default: per GPU)")
    group.add_argument("--ray-cpus-per-worker", type=float, default=1, help="CPUs per actor")
    if chunks:
        group.add_argument("--ray-chunk", type=int, default=1000, help="images per shard")


def _ray_job(args: argparse.Namespace) -> tuple[ModuleType, Any] | None:
    """``(locore.distributed, RayOptions)`` for ``--ray``, else None; Ray options without
    ``--ray`` are refused. Ray is an optional extra, so it is imported only when asked for."""
    given = [f for f in ("address", "ray_workers") if getattr(args, f) is not None]
    if not args.ray:
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} needs --ray")
        return None
    try:
        from locore import distributed
    except ModuleNotFoundError as err:
        raise UserError(f"--ray needs {err.name}: pip install 'locore[ray]'") from None
    options = distributed.RayOptions(
        address=args.address,
        workers=args.ray_workers,
        cpus_per_worker=args.ray_cpus_per_worker,
        chunk=getattr(args, "ray_chunk", 1000),
    )
    return distributed, options


def run_extract(args: argparse.Namespace) -> int:
    images, out = image_folder(args.images), output_folder(args.out)
    config = load_config(args)
    shard = parse_shard(args.shard)
    watch = Stopwatch()
    files = list_images(images)
    items = shard_items([Item(str(p.relative_to(images)), p) for p in files], shard)
    ray_job = _ray_job(args)
    if ray_job and shard is not None:
        raise UserError("--shard and --ray do not go together: Ray splits the work itself")
    check_config(config)  # before anything is written; the extractor is built where it runs
    extractor = None if ray_job else build_extractor(config.extractor)
    cfg.save(config, out / "config.yaml")
    attrs = {"extractor": config.extractor.name}
    with watch("extract"):
        if ray_job:
            distributed, options = ray_job
            report = distributed.extract_on_ray(config.extractor, items, out, options, attrs)
        else:
            report = extract(
                extractor,
                items,
                out,
                batch_size=config.extractor.batch_size,
                num_workers=config.extractor.num_workers,
                store_dtype=config.extractor.store_dtype,
                attrs=attrs,
            )
    if args.official:
        done = {name for name, _ in report.skipped}
        order = [it.name for it in items if it.name not in done]
        with watch("official layout"):
            paths = export_official(out, order, out, args.official)
        for path in paths:
            print(f"official layout -> {path}")
    print(
        f"extracted {report.done} new, {report.resumed} already stored, "
        f"{len(report.skipped)} skipped (see {out / 'skipped.tsv'}) -> {out}"
    )
    print(watch.line())
    return 0


# ----------------------------------------------------------------------------------------------
def add_index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, required=True, help="folder of database images")
    p.add_argument("--out", type=Path, required=True, help="index folder (resumed if present)")


def run_index(args: argparse.Namespace) -> int:
    images, out = image_folder(args.images), output_folder(args.out)
    watch = Stopwatch()
    summary = build_index(images, out, load_config(args))
    watch.seconds.update(summary.seconds)
    skipped = summary.extract.skipped
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    sync = summary.sync
    print(
        f"indexed {summary.size} images: {sync.added} added, {sync.changed} changed, "
        f"{sync.removed} removed, {sync.unchanged} unchanged ({len(skipped)} skipped) "
        f"-> {summary.directory}"
    )
    print(watch.line())
    return 0


# ----------------------------------------------------------------------------------------------
def _add_query_arguments(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--index", type=Path, required=True, help="index folder from `locore index`")
    p.add_argument(
        "--rerank",
        default=None,
        help="re-ranking chain, e.g. superglobal,locore (options: the index's preset)",
    )
    p.add_argument("--topk", type=int, default=None, help="shortlist length (search.topk)")
    p.add_argument("--out", type=Path, default=None, help=out_help)


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", nargs="+", type=Path, help="query image file(s)")
    p.add_argument("--box", default=None, help="x1,y1,x2,y2 query region (one query only)")
    p.add_argument(
        "--grid", type=Path, default=None, help="PNG of the top results, a row per query"
    )
    _add_query_arguments(p, "results as JSON Lines, one query a line (fields: README)")


def run_search(args: argparse.Namespace) -> int:
    box = parse_box(args.box)
    if box is not None and len(args.query) != 1:
        raise UserError("--box applies to a single query; pass one query image with it")
    out, grid = output_file(args.out, "--out"), output_file(args.grid, "--grid")
    for path in args.query:
        height, width = load_image(path).shape[:2]  # fail early, in one line, on a non-image
        if box is not None and (box[0] >= width or box[1] >= height or min(box[2:]) <= 0):
            raise UserError(
                f"--box {args.box} lies outside the {width}x{height} px query {path}; "
                "give pixel coordinates inside the image"
            )
    boxes = [box] if box is not None else None
    watch = Stopwatch()
    with watch("open index"):
        handle = open_query_index(args)
    try:
        config = handle.config
        with watch("load extractor"):
            extractor = build_extractor(config.extractor)
        with watch("extract queries"):
            queries = extract_queries(extractor, args.query, boxes)
        with watch("global search"):
            shortlist = first_stage(handle, queries, config.search.topk)
        with watch("re-rank"):
            result = rerank_chain(config.search.rerank, queries, shortlist, handle.database)
        results = to_results(args.query, boxes, shortlist, result)
        records = result_records(results, handle.names)
        _print_records(records, out, config.search.show)
        if grid:
            with watch("grid"):
                print(f"grid -> {grid_for_results(results, handle, grid, config.search.show)}")
    finally:
        handle.close()
    print(watch.line())
    return 0


def _print_records(records: list[dict], out: Path | None, show: int) -> None:
    """The top ``show`` of every query as a table, and the JSON Lines file when asked for."""
    for record in records:
        print(format_table(record, show))
    if out:
        print(f"results -> {write_jsonl(records, out)}")


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
    _add_query_arguments(p, "results as JSON Lines, one query a line (fields: README)")
    _add_ray_arguments(p)


def run_rerank(args: argparse.Namespace) -> int:
    queries_dir, out = image_folder(args.queries, "--queries"), output_file(args.out, "--out")
    ray_job = _ray_job(args)
    watch = Stopwatch()
    with watch("open index"):
        handle = open_query_index(args)
    try:
        config = handle.config
        if not config.search.rerank:
            raise UserError("no re-ranking stage chosen; pass --rerank NAME[,NAME]")
        paths = list_images(queries_dir)
        shortlist = Shortlist.load(args.shortlist)
        if shortlist.ids.shape[0] != len(paths):
            raise UserError(
                f"shortlist {args.shortlist} has {shortlist.ids.shape[0]} rows but "
                f"{queries_dir} holds {len(paths)} images; they must match one to one"
            )
        if shortlist.ids.max() >= len(handle.names):
            raise UserError(
                f"shortlist {args.shortlist} refers to id {int(shortlist.ids.max())} but the "
                f"index holds {len(handle.names)} images; use the index it was made for"
            )
        shortlist = shortlist.truncate(min(config.search.topk, shortlist.ids.shape[1]))
        with watch("load extractor"):
            extractor = build_extractor(config.extractor)
        with watch("extract queries"):
            queries = extract_queries(extractor, paths)
        with watch("re-rank"):
            if ray_job:
                distributed, options = ray_job
                opener = functools.partial(distributed.index_database, handle.directory)
                result, _ = distributed.rerank_on_ray(
                    opener, config.search.rerank, queries, shortlist, options
                )
            else:
                result = rerank_chain(config.search.rerank, queries, shortlist, handle.database)
        records = result_records(to_results(paths, None, shortlist, result), handle.names)
        _print_records(records, out, config.search.show)
    finally:
        handle.close()
    print(watch.line())
    return 0


# ----------------------------------------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gnd", type=Path, required=True, help="ground truth gnd_*.pkl (see README)")
    p.add_argument("--queries", type=Path, required=True, help="folder holding qimlist images")
    _add_query_arguments(p, "folder for metrics.json + per_query.jsonl")


def run_eval(args: argparse.Namespace) -> int:
    queries_dir = image_folder(args.queries, "--queries")
    out = output_folder(args.out) if args.out is not None else None
    watch = Stopwatch()
    with watch("open index"):
        handle = open_query_index(args)
    try:
        with watch("evaluate (extract, search, re-rank, mAP)"):
            report = evaluate_index(handle, args.gnd, queries_dir, out=out)
    finally:
        handle.close()
    print(format_metrics(report))
    print(watch.line())
    return 0
