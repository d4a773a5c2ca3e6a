"""Join extraction shards into one extraction folder, however the shards were made.

Shards come from ``locore extract --shard i/N`` run by hand, from a scheduler, or from
``locore extract --ray`` (one shard per chunk of the image list). Each shard is an extraction
folder (``local.h5``, ``global.f32``, ``skipped.tsv``). The joined folder has the same three files:
the local store is an HDF5 virtual dataset over the shards' committed rows (no descriptor is
copied, so the shard folders must stay where they are, relative to the joined folder), the global
rows are concatenated in shard order, and the skipped lists are merged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from locore.core.atomic import atomic_open, write_text
from locore.core.errors import UserError
from locore.core.layout import GLOBAL_FILE, LOCAL_FILE
from locore.engine.extract import SKIPPED_FILE
from locore.indexing.local_store import LocalStore, join_shards
from locore.indexing.shortlist import read_raw_globals

COPY_ROWS = 65_536  # global rows copied per step (bounded memory at any collection size)


@dataclasses.dataclass(frozen=True)
class JoinReport:
    """What a join produced."""

    shards: int  # shard folders joined (empty shards included)
    images: int  # rows in the joined store
    skipped: int  # names listed in the merged skipped.tsv


def join_extractions(shard_dirs: Sequence[Path], out: Path) -> JoinReport:
    """Join extraction folders ``shard_dirs`` (in this order) into the extraction folder ``out``.

    Raises a :class:`UserError` naming the shard when one is not an extraction folder, when two
    shards hold the same image, or when their global descriptor sizes differ.
    """
    out = Path(out)
    dirs = [Path(d) for d in shard_dirs]
    if not dirs:
        raise UserError("nothing to join: pass at least one shard folder")
    for d in dirs:
        if not (d / LOCAL_FILE).is_file():
            raise UserError(
                f"{d} is not an extraction folder (no {LOCAL_FILE}); pass shard folders"
            )
        if d.resolve() == out.resolve():
            raise UserError(f"the joined folder {out} cannot also be one of its shards")
    counts, dims = [], set()
    for d in dirs:
        with LocalStore(d / LOCAL_FILE) as store:
            counts.append(len(store))
        if counts[-1]:
            dims.add((d / GLOBAL_FILE).stat().st_size // (4 * counts[-1]))
    if len(dims) > 1:
        raise UserError(
            f"shards hold global descriptors of sizes {sorted(dims)}; join one extraction"
        )
    filled = [d for d, n in zip(dirs, counts) if n]
    out.mkdir(parents=True, exist_ok=True)
    if filled:
        join_shards([d / LOCAL_FILE for d in filled], out / LOCAL_FILE)
        (dim,) = dims
        with atomic_open(out / GLOBAL_FILE, "wb") as f:
            for d, n in zip(dirs, counts):
                rows = read_raw_globals(d / GLOBAL_FILE, dim, n, prefix=True)
                for start in range(0, n, COPY_ROWS):
                    f.write(rows[start : start + COPY_ROWS].tobytes())
    skipped = {}
    for d in dirs:
        if (d / SKIPPED_FILE).is_file():
            for line in (d / SKIPPED_FILE).read_text().splitlines():
                name, _, reason = line.partition("\t")
                skipped[name] = reason
    write_text(out / SKIPPED_FILE, "".join(f"{n}\t{r}\n" for n, r in skipped.items()))
    return JoinReport(len(dirs), sum(counts), len(skipped))
