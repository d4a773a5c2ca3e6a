"""A benchmark collection from raw images: the engine's stages, each cached in ``--out``.

db/          local store + raw globals of the database (``engine.extract``; resumes mid-way)
queries/     the same for the query images, cropped to their boxes
index/       the configured global index over the database globals (``engine.stages``)
shortlist_*  first-stage ranking, ``depth`` columns per query (.npy pair), database rows
nn_first_stage_*  the same in dataset ids (gnd ``imlist`` order, then distractors): what
             ``--shortlist-file`` reads, like an official ``nn_*.pkl``
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from locore.benchmarks.collection import Collection, dataset_files, first_stage, invert
from locore.benchmarks.protocols import evaluation_of
from locore.benchmarks.settings import Settings, cached_stage, digest
from locore.core import config as cfg
from locore.core.layout import LOCAL_FILE
from locore.engine.config import PipelineConfig
from locore.engine.extract import Item, extract
from locore.engine.pipeline import build_extractor
from locore.engine.stages import index_globals, read_extraction, read_rows, search_index
from locore.indexing.global_index import GlobalIndex
from locore.indexing.local_store import LocalStore
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Database, Queries


def from_images(settings: Settings, config: PipelineConfig) -> Collection:
    """Extract, index and search a raw-image collection (each stage cached in ``out``)."""
    out = settings.out
    gnd, db_items, query_items = dataset_files(settings)
    qimlist = list(gnd["qimlist"])
    boxes = [it.box for it in query_items]

    extractor_config = cfg.to_dict(config)["extractor"]
    # Built on first use only: a resumed run whose extraction is done never loads the model.
    extractor = functools.cache(lambda: build_extractor(config.extractor))

    def run_extract(items: list[Item], where: Path) -> Callable[[], None]:
        def work() -> None:
            extract(
                extractor(),
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
        "images": digest({"names": [it.name for it in db_items]}),
        "with_1m": settings.with_1m,
    }
    cached_stage(out, "extract_db", db_params, run_extract(db_items, out / "db"))
    q_params = {"extractor": extractor_config, "queries": qimlist, "boxes": boxes}
    cached_stage(out, "extract_queries", q_params, run_extract(query_items, out / "queries"))

    db_names, db_globals = read_extraction(out / "db")
    position = {it.name: i for i, it in enumerate(db_items)}
    row_to_eval = np.array([position[n] for n in db_names], dtype=np.int64)
    q_globals, q_rows = read_rows(out / "queries", qimlist, settings.locore.get("num_local", 48))
    queries = Queries(global_desc=q_globals.astype(np.float32), local_rows=q_rows)

    cached_stage(
        out,
        "index",
        {**db_params, "index": cfg.to_dict(config)["index"]},
        lambda: index_globals(db_globals, config.index, db_names, out / "index"),
    )
    shortlist = first_stage(
        settings,
        lambda depth: search_index(GlobalIndex.load(out / "index"), queries.global_desc, depth),
        len(db_items),
        {**db_params, **q_params},
        cut=evaluation_of(settings).file_depth(settings),
        eval_to_row=invert(row_to_eval, len(db_items)),
    )
    # The same shortlist in dataset ids, for --shortlist-file of another run (e.g. a SuperGlobal
    # first stage made with another extractor): database rows are this run's own numbering.
    found = shortlist.ids >= 0
    in_dataset_ids = np.where(found, row_to_eval[np.where(found, shortlist.ids, 0)], -1)
    Shortlist(in_dataset_ids, shortlist.sims).save(out / "nn_first_stage")
    paths = {it.name: it.path for it in db_items}
    return Collection(
        gnd,
        queries,
        Database(db_globals, LocalStore(out / "db" / LOCAL_FILE)),
        db_names,
        row_to_eval,
        [it.path for it in query_items],
        paths.get,
        shortlist,
        len(db_items),
        digest({**db_params, **q_params}),
    )
