"""The engine's stages as functions joined by files: index a folder, search it, evaluate.

An index directory holds everything a search needs:

    config.yaml   the merged configuration of the last ``build_index`` (extractor options included)
    files.json    the image folder and a fingerprint (size, mtime, SHA-256) of every file in it
    local.h5      local descriptors (locore.indexing.local_store), global.f32 global descriptors
    faiss/        the global index (locore.indexing.global_index) with the id -> name table
    skipped.tsv   files that could not be indexed, with the reason
    .lock         held by the one ``build_index`` allowed to write the folder at a time

The index mirrors its folder: ``build_index`` on an existing index compares every file's
fingerprint with the one it was extracted from (files whose size and mtime are unchanged are not
read again), extracts new and changed files, removes deleted
ones and refills the global index (without training again when the kind and options are
unchanged). Removing images compacts the store (``locore.engine.extract.prune``): the kept images
keep their order, so ids shift down over the removed ones, and changed or new images are
appended at the end. Only names and descriptors are promised to equal a fresh build's, not ids.
``--images`` may name the same collection at a new path: names are paths relative to it.

Validate, then write: the whole config is checked (and the extractor built) before anything is
written, and a resume is refused only when a setting that changes the stored descriptors differs
(:func:`descriptor_settings`); batch size, device, workers, index and search settings may change.
The same rule refuses a query-time ``--set`` that would describe queries unlike the index.

Every function here is called by the CLI and by tests; none prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import inspect
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from locore.core import config as cfg
from locore.core.atomic import write_text
from locore.core.device import resolve_device
from locore.core.digest import Fingerprint, fingerprint
from locore.core.errors import UserError
from locore.core.layout import GLOBAL_FILE, LOCAL_FILE
from locore.engine.config import ExtractorConfig, PipelineConfig, StageConfig
from locore.engine.extract import SWAP_FILE, ExtractReport, Item, extract, prune, recover
from locore.feature_extractors import Extractor, create
from locore.feature_extractors.io import list_images, load_image
from locore.feature_extractors.registry import EXTRACTORS
from locore.indexing import global_index
from locore.indexing.global_index import GlobalIndex
from locore.indexing.local_store import DTYPES, LocalStore
from locore.indexing.shortlist import Shortlist, read_raw_globals
from locore.rerank import available as available_rerankers
from locore.rerank.base import Database, Queries, RerankResult
from locore.rerank.chain import build_chain

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "files.json"
LOCK_FILE = ".lock"
INDEX_SUBDIR = "faiss"


def build_extractor(config: ExtractorConfig) -> Extractor:
    """The configured extractor on the configured device."""
    extractor = create(config.name, **config.options)
    return extractor.to(resolve_device(config.device))


def check_config(config: PipelineConfig) -> None:
    """The checks that need no model: positive sizes, the store dtype, re-ranking stage names."""
    e, s = config.extractor, config.search
    sizes = {"extractor.batch_size": e.batch_size, "search.topk": s.topk, "search.show": s.show}
    for key, value in sizes.items():
        if value < 1:
            raise UserError(f"config key {key} must be at least 1, got {value}")
    if e.num_workers < 0:
        raise UserError(f"config key extractor.num_workers must be >= 0, got {e.num_workers}")
    if e.store_dtype not in DTYPES:
        raise UserError(
            f"extractor.store_dtype={e.store_dtype!r} is not supported; use one of {list(DTYPES)}"
        )
    for i, stage in enumerate(s.rerank):
        if stage.name not in available_rerankers():
            raise UserError(
                f"search.rerank.{i}.name={stage.name!r} is not a re-ranker; "
                f"choose one of {available_rerankers()}"
            )


def validate(config: PipelineConfig) -> Extractor:
    """Check the whole config (extractor name and options, index kind and options included) and
    return its extractor, so that a mistake fails before anything is written or extracted."""
    check_config(config)
    extractor = build_extractor(config.extractor)
    GlobalIndex.build(extractor.global_dim, config.index.kind, **config.index.options)
    return extractor


def descriptor_settings(config: ExtractorConfig) -> dict[str, Any]:
    """The settings that decide stored descriptors, as ``{config key: value}``: the extractor
    name, its options with the factory's defaults filled in (so ``{}`` equals the defaults
    spelled out) and the store dtype. ``device`` is left out, like batch size and workers."""
    params = inspect.signature(EXTRACTORS.factory(config.name)).parameters
    options = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    options.update(config.options)
    options.pop("device", None)
    settings = {"extractor.name": config.name, "extractor.store_dtype": config.store_dtype}
    settings.update({f"extractor.options.{k}": v for k, v in sorted(options.items())})
    return settings


def descriptor_mismatch(stored: ExtractorConfig, asked: ExtractorConfig) -> str | None:
    """``"key=stored vs key=asked"`` for the first descriptor setting that differs, else None."""
    a, b = descriptor_settings(stored), descriptor_settings(asked)
    for key in [*a, *(k for k in b if k not in a)]:
        if a.get(key) != b.get(key):
            return f"the index has {key}={a.get(key)!r}, this run {key}={b.get(key)!r}"
    return None


@dataclasses.dataclass
class SyncReport:
    """How ``build_index`` brought an index in line with its folder (images now indexed)."""

    added: int  # new files extracted
    changed: int  # files whose content changed, extracted again
    removed: int  # images dropped: file deleted, or changed and now unreadable
    unchanged: int  # images kept as they were


@dataclasses.dataclass
class IndexSummary:
    """What ``build_index`` did."""

    directory: Path
    size: int
    sync: SyncReport
    extract: ExtractReport
    trained: bool  # the global index was (re)built and trained rather than refilled
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # wall time per stage


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold the index folder's lock: one writer at a time, refused at once otherwise."""
    with open(out / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another `locore index` is writing {out}; wait for it to finish"
            ) from None
        yield


def _stored_names(out: Path) -> list[str]:
    if not (out / LOCAL_FILE).exists():
        return []
    with LocalStore(out / LOCAL_FILE) as store:
        return list(store.names or [])


def _check_resumable(out: Path, config: PipelineConfig) -> None:
    """Refuse to add to descriptors made with other descriptor settings."""
    if not _stored_names(out):
        return  # nothing extracted yet: an earlier config does not matter
    try:
        stored = cfg.load(PipelineConfig, out / CONFIG_FILE)
    except UserError as err:
        raise UserError(
            f"index {out} holds descriptors but its {CONFIG_FILE} cannot be read ({err}); "
            "use a new --out folder"
        ) from None
    mismatch = descriptor_mismatch(stored.extractor, config.extractor)
    if mismatch:
        raise UserError(
            f"index {out} was built with another extractor config ({mismatch}); "
            "use a new --out folder or the same settings"
        )


def read_manifest(out: Path) -> dict[str, Fingerprint]:
    """``name -> fingerprint`` of the files the index was last asked to hold."""
    path = Path(out) / MANIFEST_FILE
    if not path.exists():
        return {}
    try:
        files = json.loads(path.read_text())["files"]
        return {name: Fingerprint.from_list(value) for name, value in files.items()}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is damaged; delete it to extract every image again") from None


def _fingerprints(
    files: dict[str, Path], known: dict[str, Fingerprint]
) -> dict[str, Fingerprint | None]:
    """Fingerprints of readable files; None for the others (extraction will report them).

    A file whose size and mtime equal its recorded fingerprint is trusted without being read (as
    make and rsync do), so re-indexing a large folder reads only new and touched files; any
    other file is hashed, which recognises a moved or copied folder by content.
    """
    out: dict[str, Fingerprint | None] = {}
    for name, path in files.items():
        try:
            stat = path.stat()
            old = known.get(name)
            if old is not None and (old.size, old.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                out[name] = old
            else:
                out[name] = fingerprint(path)
        except OSError:
            out[name] = None
    return out


def build_index(images: Path, out: Path, config: PipelineConfig) -> IndexSummary:
    """Make ``out`` an index of exactly the files below ``images`` (see the module doc).

    Resumable: a killed run is completed by running it again; unreadable files are listed in
    ``skipped.tsv`` and the rest is indexed.
    """
    images, out = Path(images), Path(out)
    started = time.perf_counter()
    extractor = validate(config)
    seconds = {"load extractor": time.perf_counter() - started}
    started = time.perf_counter()
    files = {str(p.relative_to(images)): p for p in list_images(images)}
    if not files:
        raise UserError(
            f"image folder {images} is empty; put images in it or pass another --images"
        )
    seconds["scan folder"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        started = time.perf_counter()
        recover(out)
        global_index.recover(out / INDEX_SUBDIR)
        _check_resumable(out, config)
        known = read_manifest(out)
        prints = _fingerprints(files, known)
        before = _stored_names(out)
        same = {
            n for n in before if prints.get(n) is not None and prints[n].same_content(known.get(n))
        }
        changed = {n for n in before if n in files and n not in same}
        attrs = {
            "extractor": config.extractor.name,
            "images_root": str(images.resolve()),
            "config": str(cfg.to_dict(config)),
        }
        if len(same) < len(before):  # stale rows go before the new fingerprints are recorded
            prune(out, [n for n in before if n in same], extractor.global_dim, attrs)
        cfg.save(config, out / CONFIG_FILE)
        manifest = {n: p.to_list() for n, p in prints.items() if p is not None}
        write_text(
            out / MANIFEST_FILE,
            json.dumps({"root": str(images.resolve()), "files": manifest}, indent=0),
        )
        seconds["compare files"] = time.perf_counter() - started
        started = time.perf_counter()
        report = extract(
            extractor,
            [Item(name, path) for name, path in files.items()],
            out,
            batch_size=config.extractor.batch_size,
            num_workers=config.extractor.num_workers,
            store_dtype=config.extractor.store_dtype,
            attrs=attrs,
        )
        names = _stored_names(out)
        if not names:
            raise UserError(f"no image in {images} could be indexed; see {out / 'skipped.tsv'}")
        now = set(names)
        sync = SyncReport(
            added=len(now - set(before)),
            changed=len(changed & now),
            removed=len(before) - len(same) - len(changed & now),
            unchanged=len(same),
        )
        stale = len(same) < len(before) or report.done > 0
        seconds["extract"] = time.perf_counter() - started
        started = time.perf_counter()
        trained = _update_global_index(out, config, extractor.global_dim, names, stale)
        seconds["global index"] = time.perf_counter() - started
    logger.info("indexed %d images into %s (%d skipped)", len(names), out, len(report.skipped))
    return IndexSummary(out, len(names), sync, report, trained, seconds)


def _update_global_index(
    out: Path, config: PipelineConfig, dim: int, names: list[str], stale: bool
) -> bool:
    """Fill the global index with the stored globals; returns True when it was trained anew.

    A saved index of the configured kind and options is kept: when the store only grew (every
    indexed name still first, in order), just the new rows are added, so adding 10,000 images
    to a 1M-image index encodes 10,000 vectors (ivfpq keeps its trained codebooks; a fresh build
    would train them on the new collection). An exact index writes no rows at all: it holds
    ``global.f32`` by a hard link (:meth:`GlobalIndex.add_file`). After removals it is emptied and
    refilled, since ids shift down; it is left alone when no descriptor changed. Any other index
    is rebuilt.
    """
    directory = out / INDEX_SUBDIR
    options = {k: v for k, v in config.index.options.items() if k != "device"}
    index = None
    if global_index.exists(directory):
        try:
            saved = GlobalIndex.load(directory, dim=dim)
        except UserError as err:
            logger.warning("rebuilding the global index: %s", err)
        else:
            same = saved.kind == config.index.kind and all(
                saved.options.get(k) == v for k, v in options.items()
            )
            if same and not stale and saved.names == names:
                return False
            if same:
                index = saved
    globals_ = read_raw_globals(out / GLOBAL_FILE, dim, len(names), prefix=True)
    trained = index is None
    if index is None:
        index = GlobalIndex.build(dim, kind=config.index.kind, **config.index.options)
        index.train(np.asarray(globals_))
    kept = len(index)
    if index.names != names[:kept]:
        index.clear()
        kept = 0
    if kept < len(names):  # an exact index shares global.f32 instead of copying it
        index.add_file(out / GLOBAL_FILE, kept, names[kept:])
    index.save(directory)
    return trained


@dataclasses.dataclass
class IndexHandle:
    """An opened index directory."""

    directory: Path
    config: PipelineConfig
    index: GlobalIndex
    database: Database
    names: list[str]

    def close(self) -> None:
        if self.database.store is not None:
            self.database.store.close()


def open_index(directory: Path, overrides: Sequence[str] = ()) -> IndexHandle:
    """Open an index directory; ``overrides`` (``--set``) apply on top of its stored config,
    e.g. to choose a re-ranking chain at search time. Overrides that would change how queries
    are described (:func:`descriptor_settings`) are refused."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not global_index.exists(directory / INDEX_SUBDIR):
        raise UserError(f"{directory} is not an index; build one with `locore index`")
    if (directory / SWAP_FILE).exists():
        raise UserError(
            f"index {directory} is half-updated by an interrupted `locore index`; "
            "run that command again to finish it"
        )
    config = cfg.load(PipelineConfig, directory / CONFIG_FILE, overrides)
    check_config(config)
    if overrides:
        mismatch = descriptor_mismatch(
            cfg.load(PipelineConfig, directory / CONFIG_FILE).extractor, config.extractor
        )
        if mismatch:
            raise UserError(
                f"queries must be described like the index: {mismatch}; "
                "drop that --set (or build another index with it)"
            )
    index = GlobalIndex.load(directory / INDEX_SUBDIR)
    store = LocalStore(directory / LOCAL_FILE)
    globals_ = read_raw_globals(directory / GLOBAL_FILE, index.dim, len(index), prefix=True)
    return IndexHandle(directory, config, index, Database(globals_, store), list(index.names))


@dataclasses.dataclass
class QueryResult:
    """Ranked results of one query (best first)."""

    query: str
    box: tuple[float, ...] | None
    ids: np.ndarray  # [M] database ids
    scores: np.ndarray  # [M] final scores
    global_sims: np.ndarray  # [M] first-stage similarity of each returned id
    rank_before: np.ndarray  # [M] first-stage rank of each returned id


def extract_queries(
    extractor: Extractor, paths: Sequence[Path], boxes: Sequence | None = None
) -> Queries:
    """Extract query images (cropped to their boxes) into a :class:`Queries` batch."""
    feats = []
    for i, path in enumerate(paths):
        box = boxes[i] if boxes is not None else None
        feats.append(extractor.extract(load_image(Path(path)), box))
    return Queries(
        global_desc=np.stack([f.global_desc for f in feats]).astype(np.float32),
        local_rows=np.stack([f.local.to_rows() for f in feats]),
    )


def first_stage(handle: IndexHandle, queries: Queries, topk: int) -> Shortlist:
    """Global search: the top ``topk`` database ids per query."""
    k = min(topk, len(handle.index))
    sims, ids = handle.index.search(queries.global_desc, k)
    return Shortlist(ids=ids, sims=sims)


def rerank_chain(
    stages: Sequence[StageConfig], queries: Queries, shortlist: Shortlist, database: Database
) -> RerankResult:
    """Run the configured re-ranking stages in order (identity when there are none)."""
    if not stages:
        return RerankResult(shortlist.ids, shortlist.sims, shortlist.ids)

    final, _ = build_chain(stages).run(queries, shortlist, database)
    return final


def search(
    handle: IndexHandle,
    query_paths: Sequence[Path],
    boxes: Sequence | None = None,
    extractor: Extractor | None = None,
) -> list[QueryResult]:
    """Extract, search and re-rank ``query_paths`` against the index."""
    config = handle.config
    extractor = extractor or build_extractor(config.extractor)
    queries = extract_queries(extractor, query_paths, boxes)
    shortlist = first_stage(handle, queries, config.search.topk)
    result = rerank_chain(config.search.rerank, queries, shortlist, handle.database)
    return to_results(query_paths, boxes, shortlist, result)


def to_results(
    query_paths: Sequence[Path], boxes: Sequence | None, shortlist: Shortlist, result: RerankResult
) -> list[QueryResult]:
    """Attach first-stage similarity and rank to each re-ranked id."""
    out = []
    for q, path in enumerate(query_paths):
        position = {int(i): r for r, i in enumerate(shortlist.ids[q])}
        ranks = np.array([position[int(i)] for i in result.ids[q]])
        out.append(
            QueryResult(
                query=str(path),
                box=tuple(boxes[q]) if boxes is not None and boxes[q] is not None else None,
                ids=result.ids[q],
                scores=result.scores[q],
                global_sims=shortlist.sims[q][ranks],
                rank_before=ranks,
            )
        )
    return out
