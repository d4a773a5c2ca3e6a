"""``locore bench revisitop``: the paper's ROxf/RPar(+1M) and GLDv2 tables, one resumable command.

Stages, each cached in ``--out`` and reused on a rerun when its artifact is complete (a
``<stage>.done.json`` marker holding the stage's parameters is written after the artifact):

    db/          local store + raw globals of the database (locore.engine.extract; resumes mid-way)
    queries/     the same for the query images, cropped to their boxes
    index/       the flat global index over the database globals
    shortlist_*  first-stage ranking, ``depth`` columns per query (.npy pair), database rows
    nn_first_stage_*  the same in dataset ids (gnd ``imlist`` order, then distractors): what
                 ``--shortlist-file`` reads, like an official ``nn_*.pkl``
    rerank/      one ``.npz`` per chain and re-rank setup: every stage's ids and scores
    fusion_logits_hard.npz   with ``--save-logits``: the input of ``locore bench fusion-grid``
    report files results.csv, metrics.json, per_query.jsonl, table.txt, ap_scatter.png, grids/

Hard vs Hard* (reference-spec §6.4, supplementary Table B): every chain runs twice. With the
``hard`` setup, junk images move out of each shortlist before re-ranking; Medium and Hard are
read from that run, so easy images take part in re-ranking and are only ignored by the metric
(Hard). With the ``hard*`` setup, easy images are removed from the shortlist before re-ranking
as well (Hard*, the easy images removed from the database; ``locore.engine.metrics.rerank_junk``).
Without re-ranking the two are equal by construction (the Hard protocol ignores easy images).

GLDv2 (``--dataset gldv2-test``, reference-spec §7.3): mAP@100 of the public (first 379), private
(last 750) and combined queries. The ground truth has only ``ok`` (no junk, no Easy/Hard), so the
two setups would re-rank the same shortlists: one run (the ``hard`` key, which moves nothing here)
serves all three numbers. Each protocol's evaluation, table, per-query fields and plots live in
one :class:`Evaluation` (``EVALUATIONS``), so the pipeline itself never branches on the dataset.

``--from-official DIR`` starts from the AMES data release instead of images: local HDF5 (flat or
compound), raw float32 global ``.pt``, ``nn_<name>.pkl`` shortlists and the gnd pickle. GLDv2 reads
``gldv2-test/`` (queries ``<desc>_local.hdf5`` / ``<desc>_global.pt``, gnd, ``nn_*.pkl``) and
``gldv2-index/`` (the gallery, whole or as ``split`` chunks ``<desc>_xaa_local.hdf5``, ... joined
in sorted order without copying).
"""

from __future__ import annotations

import abc
import argparse
import csv
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from locore.core import config as cfg
from locore.core.errors import UserError
from locore.core.layout import GLOBAL_FILE
from locore.engine.config import PipelineConfig, load_pipeline
from locore.engine.evaluate import to_imlist_ranks
from locore.engine.metrics import GLDV2_DEPTH, RERANK_SETUPS, evaluate_revisited, gldv2_map_at_100
from locore.indexing.shortlist import Shortlist, read_raw_globals
from locore.rerank.base import Database, Queries

if TYPE_CHECKING:
    from locore.indexing.local_store import LocalStore

logger = logging.getLogger(__name__)

DATASETS = ("roxford5k", "rparis6k", "demo", "gldv2-test")
FULL_DEPTH_LIMIT = 200_000  # databases up to this size are ranked in full by the first stage
DEFAULT_DEPTH = 1600  # first-stage depth beyond that (the official shortlist length)
MISSING_IMAGE = np.full((64, 64, 3), 200, np.uint8)  # grid cell of an image we have no file for
DEMO_SOURCE = "python -c 'from locore.benchmarks.datasets.demo import generate; generate(\"DIR\")'"


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


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the benchmark and print the table."""

    settings = Settings.from_args(args)
    report = run_benchmark(settings, load_pipeline(args.config, args.overrides))
    print(report.table)
    print(f"\nartifacts in {settings.out}: " + ", ".join(sorted(report.files)))
    return 0


# ----------------------------------------------------------------------------------------------
# Settings and stage bookkeeping
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the benchmark needs besides the extractor config."""

    dataset: str
    out: Path
    data_root: Path | None = None
    with_1m: bool = False
    shortlist: str = "auto"
    shortlist_file: Path | None = None
    chain: tuple[str, ...] = ("locore_base",)
    locore: dict = dataclasses.field(default_factory=dict)  # options of every locore stage
    device: str = "auto"
    depth: int | None = None
    eval_shortlist_only: bool = False
    from_official: Path | None = None
    desc_name: str = "dinov2"
    grids: int = 3
    save_logits: bool = False

    def __post_init__(self) -> None:
        if self.with_1m and self.metric == "gldv2":
            raise UserError(f"{self.dataset} has no +1M distractors; drop --with-1m")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        chain = [s.strip() for s in args.rerank.split(",") if s.strip() and s.strip() != "none"]
        if args.superglobal and "superglobal" not in chain:
            chain.insert(0, "superglobal")
        sliding = None if args.sliding in ("none", "") else args.sliding
        alpha, temp = args.alpha, args.temp
        if args.fusion_from is not None:
            from locore.benchmarks.fusion_grid import read_best

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
        return cls(
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
        )

    @property
    def name(self) -> str:
        """``roxford5k`` or ``roxford5k+1m`` (the official folder names)."""
        return f"{self.dataset}+1m" if self.with_1m else self.dataset

    @property
    def metric(self) -> str:
        """``"gldv2"`` (mAP@100, public/private) or ``"revisited"`` (Easy/Medium/Hard mAP)."""
        return "gldv2" if self.dataset.startswith("gldv2") else "revisited"

    @property
    def evaluation(self) -> Evaluation:
        """The protocol that evaluates and reports this benchmark."""
        return EVALUATIONS[self.metric]

    def stages(self) -> list[tuple[str, dict]]:
        """The chain as ``(registry name, options)`` pairs."""
        out = []
        for name in self.chain:
            if name.startswith("locore"):
                out.append((name, {**self.locore, "device": self.device}))
            elif name == "superglobal":
                out.append((name, {"m": self.locore.get("topk", 400), "device": self.device}))
            else:
                out.append((name, {}))
        return out


def _digest(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cached_stage(out: Path, name: str, params: dict, work: Callable[[], None]) -> bool:
    """Run ``work`` unless ``<name>.done.json`` records the same ``params``; True if it ran.

    The marker is written only after ``work`` returns, so an interrupted stage runs again (and
    stages that resume internally, like extraction, continue where they stopped).
    """
    marker = out / f"{name}.done.json"
    record = json.loads(json.dumps(params, sort_keys=True, default=str))
    if marker.is_file() and json.loads(marker.read_text()) == record:
        logger.info("stage %s: reusing %s", name, marker.parent)
        return False
    logger.info("stage %s: running", name)
    work()
    marker.write_text(json.dumps(record, sort_keys=True, indent=1))
    return True


# ----------------------------------------------------------------------------------------------
# Inputs: a loaded benchmark collection
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Collection:
    """Queries and database of one benchmark, in database-id space.

    ``db_names[i]`` names database row i; ``row_to_eval[i]`` is its position in the official
    order (``imlist``, then the distractors in list order), the id space of the ground truth and
    of official shortlists. Extraction may store rows in another order (it batches by size).
    """

    gnd: dict
    queries: Queries
    database: Database
    db_names: list[str]
    row_to_eval: np.ndarray
    query_images: list[Path] | None
    image_of: Callable[[str], Path] | None  # database name -> image file (for the grids)
    shortlist: Shortlist
    num_official: int  # size of the official id space (database rows + unreadable images)

    @property
    def eval_to_row(self) -> np.ndarray:
        """Official id -> database row (-1: not in the database, e.g. unreadable)."""
        return invert(self.row_to_eval, self.num_official)

    def junk_sets(self, setup: str) -> list[set[int]]:
        """Per query, the database rows moved out of the shortlist before re-ranking."""
        from locore.engine.metrics import rerank_junk

        table = self.eval_to_row
        out = []
        for ids in rerank_junk(self.gnd["gnd"], setup):
            rows = table[np.fromiter(ids, dtype=np.int64, count=len(ids))]
            out.append({int(r) for r in rows if r >= 0})
        return out


def invert(row_to_eval: np.ndarray, size: int) -> np.ndarray:
    """Inverse of a row -> official-id table (``size`` official ids, -1 where none)."""
    table = np.full(size, -1, dtype=np.int64)
    rows = np.flatnonzero(row_to_eval >= 0)
    table[row_to_eval[rows]] = rows
    return table


def dataset_files(settings: Settings) -> tuple[dict, list, list]:
    """Ground truth, database items (official order) and query items (with boxes) of a raw-image
    collection: the public Revisited layouts (``locore.benchmarks.datasets.revisitop``), the GLDv2
    layouts (``benchmarks.datasets.gldv2``) or the demo collection (``gnd_demo.pkl``, ``jpg/``,
    ``queries/``).

    The ground truth is ``{"qimlist", "imlist", "gnd"}`` in every case (GLDv2: ``gnd[q] =
    {"ok": ids}``, the names are its image ids or list paths, plus ``"n_public"``).
    """
    from locore.benchmarks.datasets.base import check_exist, find_file
    from locore.benchmarks.datasets.revisitop import load_revisitop, read_distractors, read_gnd
    from locore.engine.extract import Item

    root = Path(settings.data_root)
    if settings.dataset == "demo":
        if settings.with_1m:
            raise UserError("the demo collection has no +1M distractors; drop --with-1m")
        gnd_path = find_file(root, "gnd_demo.pkl", [".", "demo"], DEMO_SOURCE)
        gt = read_gnd(gnd_path)
        folder = gnd_path.parent
        queries = [folder / "queries" / f"{n}.jpg" for n in gt["qimlist"]]
        database = [folder / "jpg" / f"{n}.jpg" for n in gt["imlist"]]
        check_exist(queries + database, "demo images", DEMO_SOURCE)
        boxes = [g["bbx"] for g in gt["gnd"]]
        names = list(gt["imlist"])
    elif settings.metric == "gldv2":
        from locore.benchmarks.datasets.gldv2 import load_gldv2

        ds = load_gldv2(root)
        gt = {
            "qimlist": ds.query_names,
            "imlist": ds.db_names,
            "gnd": ds.gnd,
            "n_public": ds.splits["public"][1],
        }
        queries, boxes, database = ds.queries, ds.boxes, ds.database
        names = list(ds.db_names)
    else:
        ds = load_revisitop(root, settings.dataset, settings.with_1m)
        gt = read_gnd(ds.root / f"gnd_{settings.dataset}.pkl")
        queries, boxes, database = ds.queries, ds.boxes, ds.database
        names = list(gt["imlist"]) + (read_distractors(root)[0] if settings.with_1m else [])
    db_items = [Item(n, p) for n, p in zip(names, database)]
    query_items = [
        Item(n, p, tuple(b) if b is not None else None)
        for n, p, b in zip(gt["qimlist"], queries, boxes)
    ]
    return gt, db_items, query_items


def _read_rows(folder: Path, names: Sequence[str], num_local: int) -> tuple[np.ndarray, np.ndarray]:
    """Globals ``[n, D]`` and local rows ``[n, L, 5 + D]`` of ``names`` from an extraction."""
    from locore.indexing.local_store import LocalStore

    with LocalStore(folder / "local.h5") as store:
        position = {n: i for i, n in enumerate(store.names or [])}
        missing = [n for n in names if n not in position]
        if missing:
            raise UserError(f"{missing[0]} could not be extracted; see {folder / 'skipped.tsv'}")
        ids = np.array([position[n] for n in names], dtype=np.int64)
        dim = os.path.getsize(folder / "global.f32") // (4 * max(len(store), 1))
        globals_ = np.asarray(read_raw_globals(folder / GLOBAL_FILE, dim, len(store), prefix=True))[
            ids
        ]
        rows = store.rows(ids, min(num_local, store.num_local))
    return globals_, rows


def from_images(settings: Settings, config: PipelineConfig) -> Collection:
    """Extract, index and search a raw-image collection (each stage cached in ``out``)."""
    from locore.engine.extract import extract
    from locore.engine.pipeline import build_extractor
    from locore.indexing.global_index import GlobalIndex
    from locore.indexing.local_store import LocalStore

    out = settings.out
    gnd, db_items, query_items = dataset_files(settings)
    qimlist = list(gnd["qimlist"])
    boxes = [it.box for it in query_items]

    extractor_config = cfg.to_dict(config)["extractor"]
    # Built on first use only: a resumed run whose extraction is done never loads the model.
    extractor = functools.cache(lambda: build_extractor(config.extractor))

    def run_extract(items: list, where: Path) -> Callable[[], None]:
        def work() -> None:
            x = extractor()
            extract(
                x,
                items,
                where,
                config.extractor.batch_size,
                config.extractor.num_workers,
                config.extractor.store_dtype,
                attrs={"extractor": config.extractor.name},
            )

        return work

    db_params = {
        "extractor": extractor_config,
        "images": _digest({"names": [it.name for it in db_items]}),
        "with_1m": settings.with_1m,
    }
    cached_stage(out, "extract_db", db_params, run_extract(db_items, out / "db"))
    q_params = {"extractor": extractor_config, "queries": qimlist, "boxes": boxes}
    cached_stage(out, "extract_queries", q_params, run_extract(query_items, out / "queries"))

    with LocalStore(out / "db" / "local.h5") as store:
        db_names = list(store.names or [])
    dim = os.path.getsize(out / "db" / "global.f32") // (4 * max(len(db_names), 1))
    db_globals = read_raw_globals(out / "db" / GLOBAL_FILE, dim, len(db_names), prefix=True)
    position = {it.name: i for i, it in enumerate(db_items)}
    row_to_eval = np.array([position[n] for n in db_names], dtype=np.int64)
    q_globals, q_rows = _read_rows(out / "queries", qimlist, settings.locore.get("num_local", 48))
    queries = Queries(global_desc=q_globals.astype(np.float32), local_rows=q_rows)

    def build_index() -> None:
        index = GlobalIndex.build(dim, kind=config.index.kind, **config.index.options)
        index.train(np.asarray(db_globals))
        index.add(np.asarray(db_globals), names=db_names)
        index.save(out / "index")

    cached_stage(out, "index", {**db_params, "index": cfg.to_dict(config)["index"]}, build_index)
    shortlist = _first_stage(
        settings,
        lambda depth: _search(GlobalIndex.load(out / "index"), queries.global_desc, depth),
        len(db_items),
        {**db_params, **q_params},
        invert(row_to_eval, len(db_items)),
    )
    # The same shortlist in dataset ids, for --shortlist-file of another run (e.g. a SuperGlobal
    # first stage made with another extractor): database rows are this run's own numbering.
    found = shortlist.ids >= 0
    in_dataset_ids = np.where(found, row_to_eval[np.where(found, shortlist.ids, 0)], -1)
    Shortlist(in_dataset_ids, shortlist.sims).save(out / "nn_first_stage")
    database = Database(db_globals, LocalStore(out / "db" / "local.h5"))
    paths = {it.name: it.path for it in db_items}
    return Collection(
        gnd,
        queries,
        database,
        db_names,
        row_to_eval,
        [it.path for it in query_items],
        paths.get,
        shortlist,
        len(db_items),
    )


def _search(index, q: np.ndarray, depth: int) -> Shortlist:
    sims, ids = index.search(q, depth)
    return Shortlist(ids=ids, sims=sims)


def _first_stage(
    settings: Settings,
    search: Callable[[int], Shortlist],
    num_db: int,
    params: dict,
    eval_to_row: np.ndarray | None = None,
) -> Shortlist:
    """The cached shortlist: an official ``nn_*.pkl`` when asked for, else our own search.

    Official files hold official ids; ``eval_to_row`` turns them into database rows (ids of
    images missing from the database are dropped, the rest keep their order).
    """
    out = settings.out
    source = settings.shortlist_file
    if source is None and settings.shortlist == "superglobal":
        raise UserError(
            "--shortlist superglobal needs the official nn_superglobal.pkl: pass --from-official "
            "DIR (AMES release) or --shortlist-file; or use --shortlist dinov2"
        )
    depth = settings.depth or (num_db if num_db <= FULL_DEPTH_LIMIT else DEFAULT_DEPTH)
    depth = min(depth, num_db)
    cut = settings.evaluation.file_depth(settings)

    def work() -> None:
        if source is not None:
            shortlist = Shortlist.load(Path(source))
            if cut is not None:
                shortlist = shortlist.truncate(cut)
            if int(shortlist.ids.max()) >= num_db:
                raise UserError(f"{source} holds ids beyond the {num_db}-image database")
            if eval_to_row is not None:
                shortlist = _to_rows(shortlist, eval_to_row)
        else:
            shortlist = search(depth)
        shortlist.save(out / "shortlist")

    record = {**params, "source": str(source), "depth": depth if source is None else cut}
    cached_stage(out, "shortlist", record, work)
    return Shortlist.load(out / "shortlist")


def _to_rows(shortlist: Shortlist, eval_to_row: np.ndarray) -> Shortlist:
    rows = eval_to_row[shortlist.ids]
    if (rows >= 0).all():
        return Shortlist(rows, shortlist.sims)
    order = np.argsort(rows < 0, axis=1, kind="stable")  # missing images to the end, as -1
    rows, sims = np.take_along_axis(rows, order, 1), np.take_along_axis(shortlist.sims, order, 1)
    return Shortlist(np.where(rows >= 0, rows, -1), sims)


@dataclasses.dataclass
class ReleaseFiles:
    """One benchmark's files in the AMES data release (each checked to exist).

    ``gallery_local``/``gallery_global`` hold one file, or the chunks of an extraction split
    with ``split`` (``xaa``, ``xab``, ...) in their database order.
    """

    gnd: dict  # qimlist, imlist (empty: unnamed), gnd; GLDv2 adds n_public
    query_local: Path
    gallery_local: list[Path]
    query_global: Path
    gallery_global: list[Path]
    shortlists: Path  # folder of the nn_<name>.pkl files


def _need(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{path} not found; download the AMES data release (docs/REPRODUCE.md)")
    return path


def _chunks(folder: Path, whole: str, patterns: Sequence[str]) -> list[Path]:
    """``folder/whole``, else the chunk files of the first pattern that matches, sorted."""
    if (folder / whole).is_file():
        return [folder / whole]
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise UserError(
        f"{folder / whole} (or chunks {', '.join(patterns)}) not found; download the AMES data "
        "release (docs/REPRODUCE.md)"
    )


def _revisited_release(settings: Settings) -> ReleaseFiles:
    """``<DIR>/<ds>/`` (queries, gnd) and ``<DIR>/<ds>[+1m]/`` (gallery, ``nn_*.pkl``)."""
    from locore.benchmarks.datasets.revisitop import read_gnd

    root, ds, dsx, prefix = (
        Path(settings.from_official),
        settings.dataset,
        settings.name,
        settings.desc_name,
    )
    base, full = root / ds, root / dsx
    gnd_path = next(
        (p for p in (base / f"gnd_{ds}.pkl", full / f"gnd_{dsx}.pkl") if p.is_file()), None
    )
    return ReleaseFiles(
        gnd=read_gnd(gnd_path or _need(base / f"gnd_{ds}.pkl")),
        query_local=_need(base / f"{prefix}_query_local.hdf5"),
        gallery_local=[_need(full / f"{prefix}_gallery_local.hdf5")],
        query_global=_need(base / f"{prefix}_query_global.pt"),
        gallery_global=[_need(full / f"{prefix}_gallery_global.pt")],
        shortlists=full,
    )


def _gldv2_release(settings: Settings) -> ReleaseFiles:
    """``<DIR>/gldv2-test/`` (queries, gnd, ``nn_*.pkl``; reference-spec §1.1) and
    ``<DIR>/gldv2-index/`` (the gallery, whole or in chunks, §2.9)."""
    from locore.benchmarks.datasets.gldv2 import GND, public_count, read_list_names, read_ok_gnd

    root, prefix = Path(settings.from_official), settings.desc_name
    test, index = root / "gldv2-test", root / "gldv2-index"
    gnd = read_ok_gnd(_need(test / GND))
    if (test / "test_query.txt").is_file() and (test / "test_gallery.txt").is_file():
        qimlist, imlist = read_list_names(test)
    else:  # the image lists only name the images: without them rows are named by number
        qimlist, imlist = [f"query{i}" for i in range(len(gnd))], []
    return ReleaseFiles(
        gnd={"qimlist": qimlist, "imlist": imlist, "gnd": gnd, "n_public": public_count(len(gnd))},
        query_local=_need(test / f"{prefix}_local.hdf5"),
        gallery_local=_chunks(
            index, f"{prefix}_local.hdf5", (f"{prefix}_x??_local.hdf5", f"{prefix}_local_x??.hdf5")
        ),
        query_global=_need(test / f"{prefix}_global.pt"),
        gallery_global=_chunks(
            index, f"{prefix}_global.pt", (f"{prefix}_x??_global.pt", f"{prefix}?_global.pt")
        ),
        shortlists=test,
    )


RELEASES: dict[str, Callable[[Settings], ReleaseFiles]] = {
    "revisited": _revisited_release,
    "gldv2": _gldv2_release,
}


def _gallery_store(settings: Settings, paths: list[Path]) -> LocalStore:
    """The gallery's local store; chunks are joined into one virtual store in ``out``."""
    from locore.indexing.local_store import LocalStore, join_shards

    if len(paths) == 1:
        return LocalStore(paths[0])
    joined = settings.out / f"{settings.desc_name}_gallery_local_joined.h5"
    logger.info("joining %d gallery chunks into %s", len(paths), joined)
    return LocalStore(join_shards(paths, joined))


def _gallery_globals(paths: list[Path], dim: int) -> np.ndarray:
    """Raw globals of the gallery; chunks are concatenated in order (one file stays a memmap)."""
    parts = [read_raw_globals(p, dim) for p in paths]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def from_official(settings: Settings, config: PipelineConfig) -> Collection:
    """Open the AMES data release (:data:`RELEASES` says where each benchmark's files lie);
    features are read in place, never copied."""
    from locore.indexing.global_index import GlobalIndex
    from locore.indexing.local_store import LocalStore

    files = RELEASES[settings.metric](settings)
    gnd = files.gnd
    with LocalStore(files.query_local) as qstore:
        n_q = len(qstore)
        q_rows = qstore.rows(
            np.arange(n_q), min(settings.locore.get("num_local", 48), qstore.num_local)
        )
    if n_q != len(gnd["qimlist"]):
        raise UserError(
            f"{files.query_local.parent} has {n_q} query rows for {len(gnd['qimlist'])} gnd queries"
        )
    store = _gallery_store(settings, files.gallery_local)
    n_db = len(store)
    q_file = files.query_global
    dim = q_file.stat().st_size // (4 * n_q)
    q_globals = np.asarray(read_raw_globals(q_file, dim))
    db_globals = _gallery_globals(files.gallery_global, dim)
    if len(db_globals) != n_db:
        store.close()
        raise UserError(
            f"{files.gallery_global[0].parent}: {len(db_globals)} global rows for {n_db} local rows"
        )
    top = max((int(_positives(g).max(initial=-1)) for g in gnd["gnd"]), default=-1)
    if top >= n_db:
        store.close()
        raise UserError(
            f"the ground truth lists database id {top} but {files.gallery_local[0].parent} holds "
            f"{n_db} images; the files come from different releases"
        )
    gnd["imlist"] = gnd["imlist"] or [f"index{i}" for i in range(n_db)]
    n_im = len(gnd["imlist"])
    row_to_eval = np.arange(n_db)  # official files are in official order
    choice = settings.shortlist
    if choice == "auto":
        choice = "superglobal" if (files.shortlists / "nn_superglobal.pkl").is_file() else "dinov2"
    nn_file = files.shortlists / f"nn_{choice}.pkl"
    shortlist_settings = settings
    if settings.shortlist_file is None and nn_file.is_file():
        shortlist_settings = dataclasses.replace(settings, shortlist_file=nn_file)

    def search(depth: int) -> Shortlist:
        index = GlobalIndex.build(dim, kind="flat")
        index.add(np.asarray(db_globals))
        return _search(index, q_globals, depth)

    shortlist = _first_stage(shortlist_settings, search, n_db, {"official": str(files.shortlists)})
    names = [*gnd["imlist"], *(f"distractor{i}" for i in range(n_db - n_im))]
    image_of = query_images = None
    if settings.data_root is not None:  # images are optional here: only the grids use them
        try:
            _, db_items, query_items = dataset_files(settings)
        except UserError as err:
            logger.warning("no ranked-result grids: %s", err)
        else:
            names = [it.name for it in db_items] if len(db_items) == n_db else names
            query_images = [it.path for it in query_items]
            image_of = {it.name: it.path for it in db_items}.get
    return Collection(
        gnd,
        Queries(global_desc=q_globals.astype(np.float32), local_rows=q_rows),
        Database(db_globals, store),
        names,
        row_to_eval,
        query_images,
        image_of,
        shortlist,
        n_db,
    )


# ----------------------------------------------------------------------------------------------
# Re-ranking runs
# ----------------------------------------------------------------------------------------------
def rerank_runs(
    settings: Settings, data: Collection
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per re-rank setup of the benchmark (``hard`` and ``hard*``; GLDv2: ``hard`` only), every
    stage's ``(ids, scores)``, cached as ``rerank/<tag>_<setup>.npz``."""
    stages = settings.stages()
    if not stages:
        return {}
    from locore.rerank.chain import build_chain

    folder = settings.out / "rerank"
    folder.mkdir(parents=True, exist_ok=True)
    tag = _digest({"stages": stages, "shortlist": _digest({"ids": data.shortlist.ids.tolist()})})
    chain = None
    runs = {}
    for setup in settings.evaluation.setups:
        path = folder / f"{tag}_{setup.replace('*', 'star')}.npz"

        def work(path: Path = path, setup: str = setup) -> None:
            nonlocal chain
            chain = chain or build_chain(stages)
            queries = dataclasses.replace(data.queries, junk=data.junk_sets(setup))
            _, results = chain.run(queries, data.shortlist, data.database)
            arrays = {}
            for i, r in enumerate(results):
                arrays[f"ids{i}"], arrays[f"scores{i}"] = r.ids, r.scores
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)

        cached_stage(folder, path.stem, {"stages": stages, "setup": setup}, work)
        with np.load(path) as z:
            runs[setup] = [(z[f"ids{i}"], z[f"scores{i}"]) for i in range(len(stages))]
    return runs


def _ranks(settings: Settings, data: Collection, ids: np.ndarray) -> np.ndarray:
    """``[n_ranked, Q]`` imlist-space ranking (official shape) over the whole database, or only
    the shortlist with ``eval_shortlist_only`` (the official, truncated evaluation)."""
    full = to_imlist_ranks(ids, data.row_to_eval, data.num_official)
    return full[: ids.shape[1]] if settings.eval_shortlist_only else full


# ----------------------------------------------------------------------------------------------
# Evaluation protocols
# ----------------------------------------------------------------------------------------------
def _positives(g: dict) -> np.ndarray:
    """Ground-truth ids that are correct answers: easy and hard (Revisited) or ok (GLDv2)."""
    return np.asarray([*g.get("easy", []), *g.get("hard", []), *g.get("ok", [])], dtype=np.int64)


def _label(eval_id: int, g: dict) -> str:
    """Frame of a result in the grids. From ground-truth ids rather than names
    (``locore.benchmarks.visualize.label_of`` knows only easy/hard/junk and ``imlist`` names)."""
    if eval_id in _positives(g):
        return "positive"
    if eval_id in set(g.get("junk", [])):
        return "junk"
    return "negative"


class Evaluation(abc.ABC):
    """How one benchmark family is scored and reported; the pipeline only calls these.

    ``setups`` are the re-rank runs of every chain (keys of :func:`rerank_runs`); the first is
    the one whose ranking the per-query report, scatter plot and grids show. ``by_setup`` /
    ``final`` map each setup to what :meth:`evaluate` returned for it.
    """

    setups: tuple[str, ...]

    def file_depth(self, settings: Settings) -> int | None:
        """Columns kept of a shortlist file (``--shortlist-file``, ``nn_*.pkl``); None = all."""
        return None

    def ranks(self, settings: Settings, data: Collection, ids: np.ndarray) -> np.ndarray:
        """``[n_ranked, Q]`` ground-truth-id ranking of database-row ids ``[Q, M]``."""
        return _ranks(settings, data, ids)

    @abc.abstractmethod
    def evaluate(self, settings: Settings, data: Collection, ids: np.ndarray) -> dict:
        """Metrics of one ranking (database rows ``[Q, M]``)."""

    @abc.abstractmethod
    def row(self, label: str, by_setup: dict[str, dict]) -> dict:
        """One row of results.csv / metrics.json."""

    @abc.abstractmethod
    def table(self, settings: Settings, data: Collection, rows: list[dict], ranking: str) -> str:
        """The printed table; ``ranking`` says what was ranked (full database or shortlist)."""

    @abc.abstractmethod
    def query_aps(self, data: Collection, q: int, before: dict, final: dict[str, dict]) -> dict:
        """Query q's AP fields of per_query.jsonl."""

    @abc.abstractmethod
    def scatter(self, before: dict, final: dict[str, dict]) -> tuple[dict, dict]:
        """Per-query APs by scatter panel, before and after re-ranking."""

    @abc.abstractmethod
    def panel_positives(self, g: dict) -> dict[str, list[int]]:
        """Per scatter panel, the ids whose count in the re-ranked part colours a query."""

    @abc.abstractmethod
    def caption(self, metrics: dict, q: int) -> str:
        """Query q's AP on a grid row, e.g. ``AP(M) 50.0``."""


class RevisitedEvaluation(Evaluation):
    """Easy/Medium/Hard mAP (%), Medium and Hard from the ``hard`` run, Hard* from ``hard*``."""

    setups = RERANK_SETUPS

    def evaluate(self, settings: Settings, data: Collection, ids: np.ndarray) -> dict:
        ranks = self.ranks(settings, data, ids)
        return evaluate_revisited(
            ranks, data.gnd["gnd"], shortlist_only=settings.eval_shortlist_only
        )

    def row(self, label: str, by_setup: dict[str, dict]) -> dict:
        row = {"method": label}
        normal, star = by_setup["hard"], by_setup["hard*"]
        for proto, metrics in (("medium", normal), ("hard", normal), ("hard*", star)):
            key = "hard" if proto == "hard*" else proto
            row[f"{proto}_map"] = round(float(metrics[key]["map"]), 3)
            for k, v in zip(metrics[key]["kappas"], metrics[key]["mpk"]):
                row[f"{proto}_mp@{k}"] = round(float(v), 3)
        return row

    def table(self, settings: Settings, data: Collection, rows: list[dict], ranking: str) -> str:
        lines = [
            f"{settings.name}: {len(data.gnd['qimlist'])} queries, mAP (%) over the {ranking}",
            f"{'method':<36}{'Medium':>9}{'Hard':>9}{'Hard*':>9}",
        ]
        for row in rows:
            lines.append(
                f"{row['method']:<36}{row['medium_map']:9.2f}{row['hard_map']:9.2f}"
                f"{row['hard*_map']:9.2f}"
            )
        lines.append(
            "Hard: easy images re-ranked, ignored by the metric; Hard*: easy images removed from "
            "the shortlist before re-ranking (equal without re-ranking)."
        )
        return "\n".join(lines)

    def query_aps(self, data: Collection, q: int, before: dict, final: dict[str, dict]) -> dict:
        normal, star = final["hard"], final["hard*"]
        return {
            "ap_medium_before": _nan_none(before["medium"]["aps"][q]),
            "ap_medium_after": _nan_none(normal["medium"]["aps"][q]),
            "ap_hard_before": _nan_none(before["hard"]["aps"][q]),
            "ap_hard_after": _nan_none(normal["hard"]["aps"][q]),
            "ap_hard*_after": _nan_none(star["hard"]["aps"][q]),
        }

    def scatter(self, before: dict, final: dict[str, dict]) -> tuple[dict, dict]:
        normal, star = final["hard"], final["hard*"]
        return (
            {
                "Medium": before["medium"]["aps"],
                "Hard": before["hard"]["aps"],
                "Hard*": before["hard"]["aps"],
            },
            {
                "Medium": normal["medium"]["aps"],
                "Hard": normal["hard"]["aps"],
                "Hard*": star["hard"]["aps"],
            },
        )

    def panel_positives(self, g: dict) -> dict[str, list[int]]:
        hard = list(g.get("hard", []))
        return {"Medium": [*g.get("easy", []), *hard], "Hard": hard, "Hard*": hard}

    def caption(self, metrics: dict, q: int) -> str:
        return f"AP(M) {100 * metrics['medium']['aps'][q]:.1f}"


class Gldv2Evaluation(Evaluation):
    """GLDv2 mAP@100 (%) of the public, private and combined queries, from one re-rank run."""

    setups = RERANK_SETUPS[:1]  # no junk and no easy images: "hard" moves nothing out
    splits = ("public", "private", "combined")

    def file_depth(self, settings: Settings) -> int | None:
        """The release's ``nn_superglobal.pkl`` ranks the whole 762k-image index (~7 GB of ids)
        but only 100 ranks are scored and ``--topk`` re-ranked: keep ``--depth`` (1600)."""
        return settings.depth or DEFAULT_DEPTH

    def ranks(self, settings: Settings, data: Collection, ids: np.ndarray) -> np.ndarray:
        """Only the first 100 ranks count: a ranking that fills them is used as it is (ranking
        the rest of the 762k-image index for 1,129 queries would take ~7 GB); deeper rows
        only locate positives for the per-query report."""
        depth = min(GLDV2_DEPTH, data.num_official)
        if ids.shape[1] >= depth and (ids[:, :depth] >= 0).all():
            return np.ascontiguousarray(np.where(ids >= 0, data.row_to_eval[ids], -1).T)
        return _ranks(settings, data, ids)

    def evaluate(self, settings: Settings, data: Collection, ids: np.ndarray) -> dict:
        ranks = self.ranks(settings, data, ids)
        return gldv2_map_at_100(ranks, data.gnd["gnd"], n_public=data.gnd["n_public"])

    def row(self, label: str, by_setup: dict[str, dict]) -> dict:
        (metrics,) = by_setup.values()
        return {"method": label, **{f"{k}_map@100": round(metrics[k], 3) for k in self.splits}}

    def table(self, settings: Settings, data: Collection, rows: list[dict], ranking: str) -> str:
        n, n_public = len(data.gnd["qimlist"]), data.gnd["n_public"]
        lines = [
            f"{settings.name}: {n} queries ({n_public} public, {n - n_public} private), "
            f"mAP@100 (%) over the {ranking}",
            f"{'method':<36}{'Public':>9}{'Private':>9}{'Combined':>10}",
        ]
        for row in rows:
            lines.append(
                f"{row['method']:<36}{row['public_map@100']:9.2f}{row['private_map@100']:9.2f}"
                f"{row['combined_map@100']:10.2f}"
            )
        lines.append(
            "Public: the first queries (selects alpha, tau); nan: a split without queries."
        )
        return "\n".join(lines)

    def query_aps(self, data: Collection, q: int, before: dict, final: dict[str, dict]) -> dict:
        (after,) = final.values()
        return {
            "split": "public" if q < data.gnd["n_public"] else "private",
            "ap@100_before": _nan_none(before["aps"][q]),
            "ap@100_after": _nan_none(after["aps"][q]),
        }

    def scatter(self, before: dict, final: dict[str, dict]) -> tuple[dict, dict]:
        (after,) = final.values()
        return {"AP@100": before["aps"]}, {"AP@100": after["aps"]}

    def panel_positives(self, g: dict) -> dict[str, list[int]]:
        return {"AP@100": list(g["ok"])}

    def caption(self, metrics: dict, q: int) -> str:
        return f"AP@100 {100 * metrics['aps'][q]:.1f}"


EVALUATIONS: dict[str, Evaluation] = {
    "revisited": RevisitedEvaluation(),
    "gldv2": Gldv2Evaluation(),
}


# ----------------------------------------------------------------------------------------------
# The benchmark and its reports
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    """What the benchmark printed and wrote."""

    rows: list[dict]
    table: str
    files: list[str]


def run_benchmark(settings: Settings, config: PipelineConfig) -> Report:
    """All stages (cached), then the table, CSV, per-query JSONL, scatter plot and grids."""
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    data = (
        from_official(settings, config)
        if settings.from_official is not None
        else from_images(settings, config)
    )
    try:
        runs = rerank_runs(settings, data)
        if settings.save_logits:
            from locore.benchmarks.fusion_grid import cache_logits

            cache_logits(settings, data, runs)
    finally:
        if data.database.store is not None:
            data.database.store.close()
    evaluation = settings.evaluation
    before = evaluation.evaluate(settings, data, data.shortlist.ids)
    rows = [evaluation.row("global", dict.fromkeys(evaluation.setups, before))]
    stage_metrics = []
    for i in range(len(settings.chain)):
        name = " + ".join(settings.chain[: i + 1])
        by_setup = {
            s: evaluation.evaluate(settings, data, runs[s][i][0]) for s in evaluation.setups
        }
        rows.append(evaluation.row(name, by_setup))
        stage_metrics.append(by_setup)
    files = _write_reports(settings, data, rows, before, stage_metrics, runs)
    table = format_table(settings, data, rows)
    (out / "table.txt").write_text(table + "\n")
    files.append("table.txt")
    return Report(rows, table, files)


def format_table(settings: Settings, data: Collection, rows: list[dict]) -> str:
    """The paper's layout: one row per chain prefix (Revisited: Medium / Hard / Hard* mAP;
    GLDv2: public / private / combined mAP@100)."""
    ranking = (
        f"shortlist of {data.shortlist.ids.shape[1]}"
        if settings.eval_shortlist_only
        else f"full database ({data.num_official:,} images)"
    )
    return settings.evaluation.table(settings, data, rows, ranking)


def _nan_none(v: float) -> float | None:
    return None if np.isnan(v) else round(float(v), 6)


def _write_reports(
    settings: Settings,
    data: Collection,
    rows: list[dict],
    before: dict,
    stage_metrics: list[dict[str, dict]],
    runs: dict,
) -> list[str]:
    out = settings.out
    evaluation = settings.evaluation
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "dataset": settings.name,
        "chain": list(settings.chain),
        "stages": settings.stages(),
        "shortlist_depth": int(data.shortlist.ids.shape[1]),
        "eval_shortlist_only": settings.eval_shortlist_only,
        "rows": rows,
    }
    (out / "metrics.json").write_text(json.dumps(meta, indent=1, default=str))
    files = ["results.csv", "metrics.json"]

    shown = evaluation.setups[0]  # the run whose ranking the reports show
    final = stage_metrics[-1] if stage_metrics else dict.fromkeys(evaluation.setups, before)
    final_ids = runs[shown][-1][0] if runs else data.shortlist.ids
    ranks_before = evaluation.ranks(settings, data, data.shortlist.ids)
    ranks_after = evaluation.ranks(settings, data, final_ids)
    with open(out / "per_query.jsonl", "w") as f:
        for q, name in enumerate(data.gnd["qimlist"]):
            positives = _positives(data.gnd["gnd"][q])
            record = {
                "query": name,
                **evaluation.query_aps(data, q, before, final),
                "positive_ranks_before": _positions(ranks_before[:, q], positives),
                "positive_ranks_after": _positions(ranks_after[:, q], positives),
                "top10_before": [data.db_names[i] for i in data.shortlist.ids[q][:10] if i >= 0],
                "top10_after": [data.db_names[i] for i in final_ids[q][:10] if i >= 0],
            }
            f.write(json.dumps(record) + "\n")
    files.append("per_query.jsonl")
    if runs:
        from locore.benchmarks.plots import ap_scatter

        ap_before, ap_after = evaluation.scatter(before, final)
        ap_scatter(
            ap_before,
            ap_after,
            out / "ap_scatter.png",
            title=f"{settings.name}: global vs {' + '.join(settings.chain)}",
            color=_positives_in_shortlist(settings, data),
            color_label=f"positives in the top {settings.locore.get('topk', 400)}",
        )
        files.append("ap_scatter.png")
    final_scores = runs[shown][-1][1] if runs else data.shortlist.sims
    files += _grids(settings, data, before, final[shown], final_ids, final_scores)
    return files


def _positives_in_shortlist(settings: Settings, data: Collection) -> dict[str, np.ndarray]:
    """Per scatter panel, each query's positives among the re-ranked shortlist entries (the
    colour of the paper's supplementary Figure A)."""
    top = data.shortlist.ids[:, : settings.locore.get("topk", 400)]
    counts: dict[str, list] = {}
    for q, g in enumerate(data.gnd["gnd"]):
        ids = data.row_to_eval[top[q][top[q] >= 0]]
        for panel, positives in settings.evaluation.panel_positives(g).items():
            counts.setdefault(panel, []).append(np.isin(ids, positives).sum())
    return {k: np.asarray(v, dtype=float) for k, v in counts.items()}


def _positions(column: np.ndarray, positives: np.ndarray) -> list[int]:
    """0-based positions of the positives in one ranking column (ground-truth ids)."""
    return [int(p) for p in np.flatnonzero(np.isin(column, positives))]


def _grids(
    settings: Settings,
    data: Collection,
    before: dict,
    after: dict,
    final_ids: np.ndarray,
    final_scores: np.ndarray,
) -> list[str]:
    """One grid per query for the first ``grids`` queries: global top 10 above the re-ranked
    top 10, framed green/red/grey by ground-truth label."""
    if settings.grids <= 0 or data.query_images is None or data.image_of is None:
        return []
    from locore.benchmarks.plots import GridRow, ranked_grid
    from locore.feature_extractors.io import load_image

    evaluation = settings.evaluation
    files = []
    for q in range(min(settings.grids, len(data.query_images))):
        g = data.gnd["gnd"][q]
        rows = []
        for label, ids, scores, metrics in (
            ("global", data.shortlist.ids, data.shortlist.sims, before),
            (" + ".join(settings.chain) or "global", final_ids, final_scores, after),
        ):
            top = [int(i) for i in ids[q][:10] if i >= 0]
            paths = [data.image_of(data.db_names[i]) for i in top]
            rows.append(
                GridRow(
                    [load_image(p) if p is not None else MISSING_IMAGE for p in paths],
                    [_label(int(data.row_to_eval[i]), g) for i in top],
                    [float(s) for s in scores[q][: len(top)]],
                    f"{label}: {evaluation.caption(metrics, q)}",
                )
            )
        name = data.gnd["qimlist"][q]
        png = ranked_grid(
            load_image(data.query_images[q]),
            tuple(g["bbx"]) if g.get("bbx") is not None else None,
            rows[0].images,
            rows[0].labels,
            rows[0].scores,
            settings.out / "grids" / f"{name.replace('/', '_')}.png",  # GLDv2 names are paths
            title=name,
            name=rows[0].name,
            rows=rows[1:],
        )
        files.append(str(png.relative_to(settings.out)))
    return files
