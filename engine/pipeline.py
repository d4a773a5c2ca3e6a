"""The engine's stages as functions joined by files: index a folder, search it, evaluate.

An index directory holds everything a search needs:

    config.yaml   the merged configuration that built it (extractor options included)
    local.h5      local descriptors (locore.indexing.local_store), global.f32 global descriptors
    faiss/        the global index (locore.indexing.global_index) with the id -> name table
    skipped.tsv   files that could not be indexed, with the reason

Every function here is called by the CLI and by tests; none prints.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from locore.core import config as cfg
from locore.core.device import resolve_device
from locore.core.errors import UserError
from locore.core.layout import GLOBAL_FILE
from locore.engine.config import ExtractorConfig, PipelineConfig, StageConfig
from locore.engine.extract import ExtractReport, Item, extract
from locore.feature_extractors import Extractor, create
from locore.feature_extractors.io import list_images, load_image
from locore.indexing.global_index import GlobalIndex
from locore.indexing.local_store import LocalStore
from locore.indexing.shortlist import Shortlist, read_raw_globals
from locore.rerank.base import Database, Queries, RerankResult
from locore.rerank.chain import build_chain

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
INDEX_SUBDIR = "faiss"


def build_extractor(config: ExtractorConfig) -> Extractor:
    """The configured extractor on the configured device."""
    extractor = create(config.name, **config.options)
    return extractor.to(resolve_device(config.device))


@dataclasses.dataclass
class IndexSummary:
    """What ``build_index`` did."""

    directory: Path
    size: int
    extract: ExtractReport


def build_index(images: Path, out: Path, config: PipelineConfig) -> IndexSummary:
    """Extract every file below ``images`` and build the global index in ``out``.

    Resumable: names already extracted are skipped; unreadable files are listed in
    ``skipped.tsv`` and the rest is indexed.
    """
    images, out = Path(images), Path(out)
    files = list_images(images)
    if not files:
        raise UserError(
            f"image folder {images} is empty; put images in it or pass another --images"
        )
    out.mkdir(parents=True, exist_ok=True)
    previous = out / CONFIG_FILE
    if previous.exists():
        old = cfg.read_yaml(previous).get("extractor")
        if old is not None and old != cfg.to_dict(config)["extractor"]:
            raise UserError(
                f"index {out} was built with another extractor config; use a new --out folder"
            )
    cfg.save(config, previous)
    extractor = build_extractor(config.extractor)
    items = [Item(str(p.relative_to(images)), p) for p in files]
    report = extract(
        extractor,
        items,
        out,
        batch_size=config.extractor.batch_size,
        num_workers=config.extractor.num_workers,
        store_dtype=config.extractor.store_dtype,
        attrs={
            "extractor": config.extractor.name,
            "images_root": str(images.resolve()),
            "config": str(cfg.to_dict(config)),
        },
    )
    with LocalStore(out / "local.h5") as store:
        names = list(store.names)
    if not names:
        raise UserError(f"no image in {images} could be indexed; see {out / 'skipped.tsv'}")
    globals_ = read_raw_globals(out / GLOBAL_FILE, extractor.global_dim, len(names), prefix=True)
    index = GlobalIndex.build(extractor.global_dim, kind=config.index.kind, **config.index.options)
    index.train(np.asarray(globals_))
    index.add(np.asarray(globals_), names=names)
    index.save(out / INDEX_SUBDIR)
    logger.info("indexed %d images into %s (%d skipped)", len(names), out, len(report.skipped))
    return IndexSummary(out, len(names), report)


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
    e.g. to choose a re-ranking chain at search time."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / INDEX_SUBDIR).is_dir():
        raise UserError(f"{directory} is not an index; build one with `locore index`")
    config = cfg.load(PipelineConfig, directory / CONFIG_FILE, overrides)
    index = GlobalIndex.load(directory / INDEX_SUBDIR)
    store = LocalStore(directory / "local.h5")
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
