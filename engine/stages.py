"""Engine stages over an extraction folder (``engine.extract``'s output), for callers that bring
their own image lists: read it back, index its globals, search that index.

``engine.pipeline`` does the same for one image folder per index directory; a benchmark extracts
its database and its queries into two folders and searches one with the other, so it calls these.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from locore.core.errors import UserError
from locore.core.layout import GLOBAL_FILE, LOCAL_FILE
from locore.engine.config import IndexConfig
from locore.engine.extract import SKIPPED_FILE
from locore.indexing.global_index import GlobalIndex
from locore.indexing.local_store import LocalStore
from locore.indexing.shortlist import Shortlist, read_raw_globals


def read_extraction(folder: Path) -> tuple[list[str], np.ndarray]:
    """Names (store row order) and raw globals ``[N, D]`` (a memmap) of an extraction folder."""
    folder = Path(folder)
    with LocalStore(folder / LOCAL_FILE) as store:
        names = list(store.names or [])
    dim = os.path.getsize(folder / GLOBAL_FILE) // (4 * max(len(names), 1))
    return names, read_raw_globals(folder / GLOBAL_FILE, dim, len(names), prefix=True)


def read_rows(folder: Path, names: Sequence[str], num_local: int) -> tuple[np.ndarray, np.ndarray]:
    """Globals ``[n, D]`` and local rows ``[n, L, 5 + D]`` of ``names``, in that order.

    ``L`` is ``num_local`` or the store's count when smaller. A name the extraction skipped is a
    UserError pointing at ``skipped.tsv``.
    """
    folder = Path(folder)
    stored, globals_ = read_extraction(folder)
    position = {n: i for i, n in enumerate(stored)}
    missing = [n for n in names if n not in position]
    if missing:
        raise UserError(f"{missing[0]} could not be extracted; see {folder / SKIPPED_FILE}")
    ids = np.array([position[n] for n in names], dtype=np.int64)
    with LocalStore(folder / LOCAL_FILE) as store:
        rows = store.rows(ids, min(num_local, store.num_local))
    return np.asarray(globals_)[ids], rows


def index_globals(
    globals_: np.ndarray,
    config: IndexConfig,
    names: Sequence[str] | None = None,
    out: Path | None = None,
) -> GlobalIndex:
    """Train and fill the configured global index over ``globals_`` ``[N, D]`` (row i named
    ``names[i]``); saved in ``out`` when given."""
    vectors = np.asarray(globals_)
    index = GlobalIndex.build(vectors.shape[1], kind=config.kind, **config.options)
    index.train(vectors)
    index.add(vectors, names=None if names is None else list(names))
    if out is not None:
        index.save(Path(out))
    return index


def search_index(index: GlobalIndex, global_desc: np.ndarray, depth: int) -> Shortlist:
    """The first stage: the ``depth`` nearest database rows of every query ``[Q, D]``."""
    sims, ids = index.search(global_desc, depth)
    return Shortlist(ids=ids, sims=sims)
