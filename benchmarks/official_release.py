"""A benchmark collection from the AMES data release instead of images: local HDF5 (flat or
compound), raw float32 global ``.pt``, ``nn_<name>.pkl`` shortlists and the gnd pickle, read in
place (never copied).

Revisited reads ``<DIR>/<dataset>/`` (queries, gnd) and ``<DIR>/<dataset>[+1m]/`` (gallery,
``nn_*.pkl``). GLDv2 reads ``gldv2-test/`` (queries ``<desc>_local.hdf5`` / ``<desc>_global.pt``,
gnd, ``nn_*.pkl``) and ``gldv2-index/`` (the gallery, whole or as ``split`` chunks
``<desc>_xaa_local.hdf5``, ... joined in sorted order without copying).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from locore.benchmarks.collection import Collection, dataset_files, first_stage, positives
from locore.benchmarks.datasets.gldv2 import GND, public_count, read_list_names, read_ok_gnd
from locore.benchmarks.datasets.revisitop import read_gnd
from locore.benchmarks.protocols import evaluation_of
from locore.benchmarks.settings import Settings, content_key
from locore.core.errors import UserError
from locore.engine.config import IndexConfig
from locore.engine.stages import index_globals, search_index
from locore.indexing.local_store import LocalStore, join_shards
from locore.indexing.shortlist import Shortlist, read_raw_globals
from locore.rerank.base import Database, Queries

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ReleaseFiles:
    """One benchmark's files in the AMES data release (each checked to exist).

    ``gallery_local``/``gallery_global`` hold one file, or the chunks of an extraction split
    with ``split`` (``xaa``, ``xab``, ...) in their database order.
    """

    gnd: dict  # qimlist, imlist (empty: unnamed), gnd; GLDv2 adds n_public
    gnd_file: Path  # the pickle ``gnd`` was read from
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
    gnd_path = gnd_path or _need(base / f"gnd_{ds}.pkl")
    return ReleaseFiles(
        gnd=read_gnd(gnd_path),
        gnd_file=gnd_path,
        query_local=_need(base / f"{prefix}_query_local.hdf5"),
        gallery_local=[_need(full / f"{prefix}_gallery_local.hdf5")],
        query_global=_need(base / f"{prefix}_query_global.pt"),
        gallery_global=[_need(full / f"{prefix}_gallery_global.pt")],
        shortlists=full,
    )


def _gldv2_release(settings: Settings) -> ReleaseFiles:
    """``<DIR>/gldv2-test/`` (queries, gnd, ``nn_*.pkl``; reference-spec §1.1) and
    ``<DIR>/gldv2-index/`` (the gallery, whole or in chunks, §2.9)."""
    root, prefix = Path(settings.from_official), settings.desc_name
    test, index = root / "gldv2-test", root / "gldv2-index"
    gnd = read_ok_gnd(_need(test / GND))
    if (test / "test_query.txt").is_file() and (test / "test_gallery.txt").is_file():
        qimlist, imlist = read_list_names(test)
    else:  # the image lists only name the images: without them rows are named by number
        qimlist, imlist = [f"query{i}" for i in range(len(gnd))], []
    return ReleaseFiles(
        gnd={"qimlist": qimlist, "imlist": imlist, "gnd": gnd, "n_public": public_count(len(gnd))},
        gnd_file=test / GND,
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
    if len(paths) == 1:
        return LocalStore(paths[0])
    joined = settings.out / f"{settings.desc_name}_gallery_local_joined.h5"
    logger.info("joining %d gallery chunks into %s", len(paths), joined)
    return LocalStore(join_shards(paths, joined))


def _gallery_globals(paths: list[Path], dim: int) -> np.ndarray:
    """Raw globals of the gallery; chunks are concatenated in order (one file stays a memmap)."""
    parts = [read_raw_globals(p, dim) for p in paths]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def from_official(settings: Settings) -> Collection:
    """Open the AMES data release (:data:`RELEASES` says where each benchmark's files lie);
    features are read in place, never copied. Without a release shortlist the first stage is an
    exact search of the release's globals. Cached stages are keyed by the content of the files
    (:func:`~locore.benchmarks.settings.content_key`), never by the folder."""
    files = RELEASES[settings.metric](settings)
    inputs = content_key(
        [
            files.gnd_file,
            files.query_local,
            *files.gallery_local,
            files.query_global,
            *files.gallery_global,
        ],
    )
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
    top = max((int(positives(g).max(initial=-1)) for g in gnd["gnd"]), default=-1)
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
        return search_index(index_globals(db_globals, IndexConfig()), q_globals, depth)

    shortlist = first_stage(
        shortlist_settings,
        search,
        n_db,
        {"official": inputs},
        cut=evaluation_of(settings).file_depth(settings),
    )
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
        inputs,
    )
