"""A loaded benchmark collection (queries, database, ground truth, first stage) and the pieces
both of its sources share: the raw-image dataset files and the cached first-stage shortlist.

Two sources build a :class:`Collection`: raw images (``benchmarks.raw_images``: extract, index,
search) and the AMES data release (``benchmarks.official_release``: features read in place).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from locore.benchmarks.datasets.base import check_exist, find_file
from locore.benchmarks.datasets.gldv2 import load_gldv2
from locore.benchmarks.datasets.revisitop import load_revisitop, read_distractors, read_gnd
from locore.benchmarks.settings import (
    DEFAULT_DEPTH,
    FULL_DEPTH_LIMIT,
    Settings,
    cached_stage,
    content_key,
)
from locore.core.errors import UserError
from locore.engine.evaluate import GlobalOrder
from locore.engine.extract import Item
from locore.engine.metrics import rerank_junk
from locore.indexing.shortlist import SUFFIXES, Shortlist
from locore.rerank.base import Database, Queries

DEMO_SOURCE = "python -c 'from locore.benchmarks.datasets.demo import generate; generate(\"DIR\")'"


@dataclasses.dataclass
class Collection:
    """Queries and database of one benchmark, in database-id space.

    ``db_names[i]`` names database row i; ``row_to_eval[i]`` is its position in the official
    order (``imlist``, then the distractors in list order), the id space of the ground truth and
    of official shortlists. Extraction may store rows in another order (it batches by size).
    """

    gnd: dict  # qimlist, imlist, gnd (GLDv2: plus n_public)
    queries: Queries
    database: Database
    db_names: list[str]
    row_to_eval: np.ndarray  # [N] database row -> official id
    query_images: list[Path] | None
    image_of: Callable[[str], Path] | None  # database name -> image file (for the grids)
    shortlist: Shortlist  # the first stage, database rows [Q, depth]
    num_official: int  # size of the official id space (database rows + unreadable images)
    inputs: str  # key of what the features came from (file content, or extraction parameters)

    @functools.cached_property
    def global_order(self) -> GlobalOrder:
        """Each query's exact global ranking of the whole official id space, built on first use
        and shared by every chain and setup evaluated on this collection."""
        return GlobalOrder(
            self.queries.global_desc,
            self.database.global_desc,
            self.row_to_eval,
            self.num_official,
        )

    @property
    def eval_to_row(self) -> np.ndarray:
        """Official id -> database row (-1: not in the database, e.g. unreadable)."""
        return invert(self.row_to_eval, self.num_official)

    def junk_sets(self, setup: str) -> list[set[int]]:
        """Per query, the database rows moved out of the shortlist before re-ranking."""
        table = self.eval_to_row
        out = []
        for ids in rerank_junk(self.gnd["gnd"], setup):
            rows = table[np.fromiter(ids, dtype=np.int64, count=len(ids))]
            out.append({int(r) for r in rows if r >= 0})
        return out

    def close(self) -> None:
        """Close the database's local store (the collection stays readable otherwise)."""
        if self.database.store is not None:
            self.database.store.close()


def invert(row_to_eval: np.ndarray, size: int) -> np.ndarray:
    """Inverse of a row -> official-id table (``size`` official ids, -1 where none)."""
    table = np.full(size, -1, dtype=np.int64)
    rows = np.flatnonzero(row_to_eval >= 0)
    table[row_to_eval[rows]] = rows
    return table


def positives(g: dict) -> np.ndarray:
    """Ground-truth ids that are correct answers: easy and hard (Revisited) or ok (GLDv2)."""
    return np.asarray([*g.get("easy", []), *g.get("hard", []), *g.get("ok", [])], dtype=np.int64)


def dataset_files(settings: Settings) -> tuple[dict, list[Item], list[Item]]:
    """Ground truth, database items (official order) and query items (with boxes) of a raw-image
    collection: the public Revisited layouts (``locore.benchmarks.datasets.revisitop``), the GLDv2
    layouts (``benchmarks.datasets.gldv2``) or the demo collection (``gnd_demo.pkl``, ``jpg/``,
    ``queries/``).

    The ground truth is ``{"qimlist", "imlist", "gnd"}`` in every case (GLDv2: ``gnd[q] =
    {"ok": ids}``, the names are its image ids or list paths, plus ``"n_public"``).
    """
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


def first_stage(
    settings: Settings,
    search: Callable[[int], Shortlist],
    num_db: int,
    params: dict,
    cut: int | None = None,
    eval_to_row: np.ndarray | None = None,
) -> Shortlist:
    """The cached shortlist (``<out>/shortlist_*.npy``): a shortlist file when the settings name
    one, else ``search(depth)``.

    Files hold official ids: ``cut`` keeps their leading columns (None: all), ``eval_to_row``
    turns them into database rows (ids of images missing from the database go to the end as -1,
    the rest keep their order). The cache record names the file's content, never its path, so a
    file regenerated in place is read again.
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

    def work() -> None:
        if source is not None:
            shortlist = Shortlist.load(Path(source), cut)
            if int(shortlist.ids.max()) >= num_db:
                raise UserError(f"{source} holds ids beyond the {num_db}-image database")
            if eval_to_row is not None:
                shortlist = to_rows(shortlist, eval_to_row)
        else:
            shortlist = search(depth)
        shortlist.save(out / "shortlist")

    origin = None if source is None else content_key(shortlist_files(Path(source)))
    record = {**params, "source": origin, "depth": depth if source is None else cut}
    cached_stage(out, "shortlist", record, work)
    return Shortlist.load(out / "shortlist")


def shortlist_files(path: Path) -> list[Path]:
    """The files of a shortlist ``Shortlist.load`` reads: an ``nn_*.pkl``, or our ``.npy`` pair
    (given by prefix or either file)."""
    if path.suffix == ".pkl":
        return [path]
    prefix = str(path)
    for suffix in SUFFIXES:
        prefix = prefix.removesuffix(suffix)
    return [Path(f"{prefix}{suffix}") for suffix in SUFFIXES]


def to_rows(shortlist: Shortlist, eval_to_row: np.ndarray) -> Shortlist:
    """A shortlist of official ids as database rows; missing images move to the end as -1."""
    rows = eval_to_row[shortlist.ids]
    if (rows >= 0).all():
        return Shortlist(rows, shortlist.sims)
    order = np.argsort(rows < 0, axis=1, kind="stable")
    rows, sims = np.take_along_axis(rows, order, 1), np.take_along_axis(shortlist.sims, order, 1)
    return Shortlist(np.where(rows >= 0, rows, -1), sims)
