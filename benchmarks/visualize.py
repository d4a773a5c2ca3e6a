"""Pictures of search results (ranked grids), built on ``locore.benchmarks.plots``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from locore.benchmarks.plots import ranked_grid
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
    root = Path(images_root) if images_root is not None else _images_root(handle)
    pos = {name: i for i, name in enumerate(imlist)}
    names = [handle.names[int(i)] for i in result.ids[:limit]]
    ranked_grid(
        query_image=load_image(Path(result.query)),
        query_box=result.box,
        result_images=[load_image(root / n) for n in names],
        labels=[label_of(n, gnd_entry, pos) for n in names],
        scores=[float(s) for s in result.scores[:limit]],
        out_png=Path(out_png),
        title=title,
    )
    return Path(out_png)


def _images_root(handle: IndexHandle) -> Path:
    """Folder the index was built from (stored in the store's attrs by ``build_index``)."""
    root = handle.database.store.attrs.get("images_root") if handle.database.store else None
    if root is None:
        raise UserError(f"index {handle.directory} does not record its image folder; rebuild it")
    return Path(root)
