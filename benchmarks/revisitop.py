"""``locore bench revisitop``: the paper's ROxf/RPar(+1M) and GLDv2 tables, one resumable command.

A thin recipe over the engine's stages; every stage is cached in ``--out`` and reused on a rerun
when its artifact is complete (a ``<stage>.done.json`` marker holding the stage's parameters is
written after the artifact, ``benchmarks.settings.cached_stage``):

    collection   raw images (``benchmarks.raw_images``: extract, index, first stage) or the AMES
                 data release (``benchmarks.official_release``, ``--from-official``)
    rerank/      one ``.npz`` per chain and re-rank setup: every stage's ids and scores
                 (``rerank.chain``, which applies the junk partition)
    fusion_logits_hard.npz   with ``--save-logits``: the input of ``locore bench fusion-grid``
    report       results.csv, metrics.json, per_query.jsonl, table.txt, ap_scatter.png, grids/
                 (``benchmarks.report``), per protocol (``benchmarks.protocols``)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from pathlib import Path

import numpy as np

from locore.benchmarks.collection import Collection
from locore.benchmarks.fusion_grid import cache_logits, read_best
from locore.benchmarks.official_release import from_official
from locore.benchmarks.protocols import comparison_columns, evaluation_of
from locore.benchmarks.raw_images import from_images
from locore.benchmarks.report import Report, format_table, write_reports
from locore.benchmarks.settings import (
    DATASETS,
    DEFAULT_DEPTH,
    FULL_DEPTH_LIMIT,
    Settings,
    array_digest,
    cached_stage,
    digest,
)
from locore.core.errors import UserError
from locore.engine.config import PipelineConfig, load_pipeline
from locore.rerank.base import Database
from locore.rerank.chain import build_chain

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench revisitop`` (``--config``/``--set`` choose the extractor)."""
    p = parser
    p.add_argument("--dataset", choices=DATASETS, required=True, help="benchmark to run")
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder holding gnd_<dataset>.pkl and jpg/ (or <dataset>/ or datasets/<dataset>/); "
        "gldv2-test: the CVDF release (retrieval_solution_v2.1.csv, index.csv, index/, test/) or "
        "gldv2-test/gnd_gldv2-test.pkl with test_query.txt and test_gallery.txt",
    )
    p.add_argument("--with-1m", action="store_true", help="add the revisitop1m distractors")
    p.add_argument(
        "--shortlist",
        choices=("auto", "dinov2", "superglobal"),
        default="auto",
        help="first stage: dinov2 = search our global descriptors; superglobal = the official "
        "nn_superglobal.pkl; auto = superglobal with --from-official when present, else dinov2",
    )
    p.add_argument(
        "--shortlist-file",
        type=Path,
        default=None,
        help="first stage in dataset ids: an official nn_*.pkl, or nn_first_stage_ids.npy of "
        "another run",
    )
    p.add_argument(
        "--rerank",
        default="locore_base",
        help="comma-separated re-ranking chain, e.g. superglobal,locore_base; 'none' = global only",
    )
    p.add_argument("--superglobal", action="store_true", help="run SuperGlobal before the chain")
    p.add_argument(
        "--checkpoint",
        default="vislang/locore_dinov2_base",
        help="LoCoRe weights: Hugging Face id or local folder",
    )
    p.add_argument("--sliding", default="end-to-start", help="window order, or 'none' = 1 window")
    p.add_argument("--topk", type=int, default=400, help="leading shortlist entries re-ranked")
    p.add_argument("--stride", type=int, default=50, help="step between windows")
    p.add_argument("--window", type=int, default=100, help="images per LoCoRe window")
    p.add_argument("--alpha", type=float, default=0.5, help="fusion weight of the global term")
    p.add_argument("--temp", type=float, default=0.1, help="fusion temperature")
    p.add_argument(
        "--fusion-from",
        type=Path,
        default=None,
        metavar="JSON",
        help="take alpha and temp from a best.json of `locore bench fusion-grid` (overrides "
        "--alpha/--temp)",
    )
    p.add_argument(
        "--save-logits",
        action="store_true",
        help="also cache one LoCoRe window's raw logits per query (fusion_logits_hard.npz), the "
        "input of `locore bench fusion-grid` (on gldv2-test: the official (alpha, tau) search)",
    )
    p.add_argument("--num-local", type=int, default=48, help="local descriptors per image")
    p.add_argument("--device", default="auto", help="re-ranking device (auto, cpu, cuda)")
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help=f"first-stage ranking length (default: whole database up to {FULL_DEPTH_LIMIT:,} "
        f"images, else {DEFAULT_DEPTH})",
    )
    p.add_argument(
        "--eval-shortlist-only",
        action="store_true",
        help="evaluate the shortlist-length ranking (what the official code does) instead of "
        "the full database ranking",
    )
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="cache + report folder")
    p.add_argument(
        "--from-official",
        type=Path,
        default=None,
        metavar="DIR",
        help="AMES data-release root (<DIR>/<dataset>[+1m]/..., or <DIR>/gldv2-test/ and "
        "<DIR>/gldv2-index/) instead of raw images",
    )
    p.add_argument("--desc-name", default="dinov2", help="prefix of the official feature files")
    p.add_argument("--grids", type=int, default=3, help="queries drawn as ranked-result grids")
    p.add_argument(
        "--ray", action="store_true", help="re-rank on a Ray cluster (docs/DISTRIBUTED.md)"
    )
    p.add_argument("--address", default=None, help="with --ray: auto or ray://head:10001")
    p.add_argument("--ray-workers", type=int, default=None, help="with --ray: actors")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The :class:`Settings` of the command line (``--fusion-from`` overrides alpha and temp)."""
    chain = [s.strip() for s in args.rerank.split(",") if s.strip() and s.strip() != "none"]
    if args.superglobal and "superglobal" not in chain:
        chain.insert(0, "superglobal")
    sliding = None if args.sliding in ("none", "") else args.sliding
    alpha, temp = args.alpha, args.temp
    if args.fusion_from is not None:
        alpha, temp = read_best(args.fusion_from)
        logger.info("fusion alpha=%g temp=%g from %s", alpha, temp, args.fusion_from)
    locore = {
        "checkpoint": args.checkpoint,
        "sliding": sliding,
        "topk": args.topk,
        "stride": args.stride,
        "window": args.window,
        "alpha": alpha,
        "temp": temp,
        "num_local": args.num_local,
    }
    if args.data_root is None and args.from_official is None:
        raise UserError("pass --data-root (images + gnd) or --from-official (AMES release)")
    return Settings(
        dataset=args.dataset,
        out=Path(args.out),
        data_root=args.data_root,
        with_1m=args.with_1m,
        shortlist=args.shortlist,
        shortlist_file=args.shortlist_file,
        chain=tuple(chain),
        locore=locore,
        device=args.device,
        depth=args.depth,
        eval_shortlist_only=args.eval_shortlist_only,
        from_official=args.from_official,
        desc_name=args.desc_name,
        grids=args.grids,
        save_logits=args.save_logits,
        ray=ray_settings(args),
    )


def ray_settings(args: argparse.Namespace) -> dict | None:
    """``--ray`` options as RayOptions fields; Ray options without ``--ray`` are refused."""
    if not args.ray:
        if args.address is not None or args.ray_workers is not None:
            raise UserError("--address and --ray-workers need --ray")
        return None
    return {"address": args.address, "workers": args.ray_workers}


def collection_database(settings: Settings, config: PipelineConfig) -> Database:
    """The benchmark's database opened again (what a Ray actor re-ranks against); every stage is
    cached by the time actors call it, so this only opens files."""
    data = (
        from_official(settings)
        if settings.from_official is not None
        else from_images(settings, config)
    )
    return data.database


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the benchmark and print the table."""
    settings = settings_from_args(args)
    report = run_benchmark(settings, load_pipeline(args.config, args.overrides))
    print(report.table)
    print(f"\nartifacts in {settings.out}: " + ", ".join(sorted(report.files)))
    return 0


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------
def run_benchmark(settings: Settings, config: PipelineConfig) -> Report:
    """Collection, re-ranking runs (and logits), evaluation, then every report file."""
    settings.out.mkdir(parents=True, exist_ok=True)
    data = (
        from_official(settings)
        if settings.from_official is not None
        else from_images(settings, config)
    )
    try:
        runs = rerank_runs(settings, data, config)
        if settings.save_logits:
            cache_logits(settings, data, runs)
    finally:
        data.close()
    evaluation = evaluation_of(settings)
    before = evaluation.evaluate(settings, data, data.shortlist.ids)
    rows = [evaluation.row("global", dict.fromkeys(evaluation.setups, before))]
    stage_metrics, comparisons = [], []
    for i in range(len(settings.chain)):
        name = " + ".join(settings.chain[: i + 1])
        by_setup = {
            s: evaluation.evaluate(settings, data, runs[s][i][0]) for s in evaluation.setups
        }
        compared = evaluation.compare(data, before, by_setup)
        rows.append({**evaluation.row(name, by_setup), **comparison_columns(compared)})
        stage_metrics.append(by_setup)
        comparisons.append(compared)
    files = write_reports(settings, data, rows, before, stage_metrics, runs, comparisons)
    table = format_table(settings, data, rows, comparisons)
    (settings.out / "table.txt").write_text(table + "\n")
    files.append("table.txt")
    return Report(rows, comparisons, table, files)


def rerank_runs(
    settings: Settings, data: Collection, config: PipelineConfig
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per re-rank setup of the benchmark (``hard`` and ``hard*``; GLDv2: ``hard`` only), every
    stage's ``(ids, scores)``, cached as ``rerank/<tag>_<setup>.npz``. With ``settings.ray`` the
    chain runs on Ray actors, each opening the collection's database once."""
    stages = settings.stages()
    if not stages:
        return {}
    folder = settings.out / "rerank"
    folder.mkdir(parents=True, exist_ok=True)
    # the content of the inputs and of the shortlist, never a path or a Python list of 1M ids
    tag = digest(
        {"stages": stages, "inputs": data.inputs, "shortlist": array_digest(data.shortlist.ids)}
    )
    chain = None
    runs = {}
    for setup in evaluation_of(settings).setups:
        path = folder / f"{tag}_{setup.replace('*', 'star')}.npz"
        junk = data.junk_sets(setup)

        def work(path: Path = path, junk: list[set[int]] = junk) -> None:
            nonlocal chain
            queries = dataclasses.replace(data.queries, junk=junk)
            if settings.ray is not None:
                try:  # Ray is an optional extra, imported only with --ray
                    from locore import distributed
                except ModuleNotFoundError as err:
                    raise UserError(f"--ray needs {err.name}: pip install 'locore[ray]'") from None
                opener = functools.partial(collection_database, settings, config)
                options = distributed.RayOptions(**settings.ray)
                _, results = distributed.rerank_on_ray(
                    opener, stages, queries, data.shortlist, options
                )
            else:
                chain = chain or build_chain(stages)
                _, results = chain.run(queries, data.shortlist, data.database)
            arrays = {}
            for i, r in enumerate(results):
                arrays[f"ids{i}"], arrays[f"scores{i}"] = r.ids, r.scores
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)

        moved = digest({"junk": [sorted(ids) for ids in junk]})  # the ground truth decides it
        cached_stage(folder, path.stem, {"stages": stages, "setup": setup, "junk": moved}, work)
        with np.load(path) as z:
            runs[setup] = [(z[f"ids{i}"], z[f"scores{i}"]) for i in range(len(stages))]
    return runs
