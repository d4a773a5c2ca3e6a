"""Pictures of search results (ranked grids), built on ``locore.benchmarks.plots``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from locore.benchmarks.plots import GridRow, ranked_grid
from locore.core.errors import UserError
from locore.engine.pipeline import IndexHandle, QueryResult
from locore.feature_extractors.io import load_image


def label_of(db_name: str, gnd_entry: dict | None, imlist_pos: dict[str, int]) -> str | None:
    """ "positive" / "negative" / "junk" for a database image under a query's ground truth."""
    if gnd_entry is None:
        return None
    i = imlist_pos.get(Path(db_name).with_suffix("").as_posix())
    if i is None:
        return "negative"
    if i in set(gnd_entry.get("easy", [])) | set(gnd_entry.get("hard", [])):
        return "positive"
    if i in set(gnd_entry.get("junk", [])):
        return "junk"
    return "negative"


def grid_for_result(
    result: QueryResult,
    handle: IndexHandle,
    out_png: Path,
    limit: int = 10,
    images_root: Path | None = None,
    gnd_entry: dict | None = None,
    imlist: Sequence[str] = (),
    title: str | None = None,
) -> Path:
    """Query (with box) + top-``limit`` thumbnails, bordered by ground-truth label if known."""
    return grid_for_results(
        [result], handle, out_png, limit, images_root, [gnd_entry], imlist, title
    )


def grid_for_results(
    results: Sequence[QueryResult],
    handle: IndexHandle,
    out_png: Path,
    limit: int = 10,
    images_root: Path | None = None,
    gnd_entries: Sequence[dict | None] | None = None,
    imlist: Sequence[str] = (),
    title: str | None = None,
) -> Path:
    """One PNG, a row per query: the query (with box) then its top-``limit`` results, each
    with its file name under it and bordered by ground-truth label when ``gnd_entries`` are
    given (one per result)."""
    if not results:
        raise UserError("no query to draw; pass at least one query image")
    root = Path(images_root) if images_root is not None else _images_root(handle)
    pos = {name: i for i, name in enumerate(imlist)}
    entries = list(gnd_entries) if gnd_entries is not None else [None] * len(results)
    rows = []
    for result, entry in zip(results, entries, strict=True):
        names = [handle.names[int(i)] for i in result.ids[:limit]]
        rows.append(
            GridRow(
                images=[load_image(root / n) for n in names],
                labels=[label_of(n, entry, pos) for n in names],
                scores=[float(s) for s in result.scores[:limit]],
                name=Path(result.query).name if len(results) > 1 else None,
                names=names,
                query=load_image(Path(result.query)),
                query_box=result.box,
                query_name=Path(result.query).name,
            )
        )
    first = rows[0]
    return ranked_grid(
        first.query,
        first.query_box,
        first.images,
        first.labels,
        first.scores,
        Path(out_png),
        title,
        name=first.name,
        names=first.names,
        query_name=first.query_name,
        rows=rows[1:],
    )


def _images_root(handle: IndexHandle) -> Path:
    """Folder the index was built from (stored in the store's attrs by ``build_index``)."""
    root = handle.database.store.attrs.get("images_root") if handle.database.store else None
    if root is None:
        raise UserError(f"index {handle.directory} does not record its image folder; rebuild it")
    return Path(root)
