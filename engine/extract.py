"""Extraction runtime: images -> local store + global descriptors, batched, resumable, sharded.

Any registered extractor plugs in (it only needs ``preprocess`` and ``extract_batch``). Images are
decoded and resized by DataLoader workers; same-size inputs are grouped into buckets so the model
sees full batches even when a collection mixes sizes. Output directory:

    local.h5     local descriptors in our store layout (names inside; locore.indexing.local_store)
    global.f32   raw float32 ``[N, D]`` global descriptors, row i <-> store row i (the official
                 ``*.pt`` format, reference-spec §1.4)
    skipped.tsv  ``name<TAB>reason`` for every file that could not be used

Crash safety: a batch's global rows are written and flushed before the store commits the batch,
and on restart the global file is cut back to the store's committed row count, so the two never
disagree and nothing committed is lost. Names already in the store are skipped. The store is
allocated for the whole job up front, so it never grows (nor wastes disk) during a run.

Removing images (:func:`prune`) rewrites both files without them, as temporary files, then
renames them into place under a journal (``swap.json``): a run killed between the two renames is
completed by the next :func:`recover`, which every writer calls first and which also deletes the
temporary files a killed run left.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from locore.core.atomic import (
    TMP_PREFIX,
    atomic_open,
    clean_leftovers,
    fsync_dir,
    write_bytes,
    write_text,
)
from locore.core.errors import UserError
from locore.core.layout import GLOBAL_FILE, LOCAL_FILE, NUM_META
from locore.feature_extractors.base import Extractor, ImageFeatures
from locore.feature_extractors.io import load_image
from locore.indexing.local_store import LocalStore, LocalStoreWriter, copy_rows
from locore.indexing.shortlist import read_raw_globals

logger = logging.getLogger(__name__)

SKIPPED_FILE = "skipped.tsv"
SWAP_FILE = "swap.json"  # journal of a prune's renames: {temporary name: final name}
PRUNE_ROWS = 65_536  # global rows copied at once by prune
EXPORT_IMAGES = 4096  # images written at once by export_official


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to extract: its stored name, file and optional query box ``x1, y1, x2, y2``."""

    name: str
    path: Path
    box: tuple[float, float, float, float] | None = None


@dataclasses.dataclass
class ExtractReport:
    """What one extraction run did."""

    total: int  # items asked for
    done: int  # items newly extracted in this run
    resumed: int  # items found already in the store
    skipped: list[tuple[str, str]]  # (name, one-line reason)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``."""
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} must look like i/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


def shard_items(items: Sequence[Item], shard: tuple[int, int] | None) -> list[Item]:
    """The contiguous i-th of N slices, so shards joined in order keep the list order."""
    if shard is None:
        return list(items)
    i, n = shard
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return list(items[bounds[i] : bounds[i + 1]])


class _Decode(torch.utils.data.Dataset):
    """Decodes and preprocesses in DataLoader workers; errors travel back as strings."""

    def __init__(self, items: Sequence[Item], extractor: Extractor):
        self.items = items
        self.extractor = extractor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            return i, self.extractor.preprocess(load_image(item.path), item.box), None
        except UserError as err:  # ImageError and extractor size checks
            return i, None, str(err)


class _GlobalAppender:
    """Append-only raw float32 rows, cut back to ``committed`` rows on open."""

    def __init__(self, path: Path, dim: int, committed: int):
        self.path, self.dim = path, dim
        mode = "r+b" if path.exists() else "w+b"
        self.file = open(path, mode)  # noqa: SIM115 - closed in close()
        have = os.path.getsize(path) // (4 * dim)
        if have < committed:
            raise UserError(
                f"{path} holds {have} global rows but the local store committed {committed}; "
                "delete the output folder and extract again"
            )
        self.file.truncate(committed * 4 * dim)
        self.file.seek(0, os.SEEK_END)

    def append(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _buckets(
    loader: Iterator, batch_size: int, bar: tqdm, skipped: list, items: Sequence[Item]
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Group decoded inputs by shape; yield full buckets, then the remainders."""
    pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for batch in loader:
        for i, tensor, error in batch:
            if error is not None:
                skipped.append((items[i].name, error))
                logger.warning("skipped %s: %s", items[i].path, error)
                bar.update(1)
                continue
            bucket = pending.setdefault(tuple(tensor.shape), [])
            bucket.append((i, tensor))
            if len(bucket) == batch_size:
                yield [j for j, _ in bucket], torch.stack([t for _, t in bucket])
                del pending[tuple(tensor.shape)]
    for bucket in pending.values():
        yield [j for j, _ in bucket], torch.stack([t for _, t in bucket])


def extract(
    extractor: Extractor,
    items: Sequence[Item],
    out_dir: Path,
    batch_size: int = 8,
    num_workers: int = 0,
    store_dtype: str = "float16",
    attrs: dict | None = None,
) -> ExtractReport:
    """Extract ``items`` into ``out_dir`` (see module docstring), resuming a previous run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"image name {dup!r} appears twice in the input list; names must be unique")
    skipped: list[tuple[str, str]] = []
    with LocalStoreWriter(
        out_dir / LOCAL_FILE,
        num_local=extractor.num_local,
        dim=extractor.local_dim,
        dtype=store_dtype,
        attrs=attrs,
        capacity=len(items),
    ) as store:
        stored = set(store.names)
        todo = [it for it in items if it.name not in stored]
        store.reserve(store.committed + len(todo))
        globals_out = _GlobalAppender(out_dir / GLOBAL_FILE, extractor.global_dim, len(stored))
        loader = torch.utils.data.DataLoader(
            _Decode(todo, extractor),
            batch_size=max(1, batch_size),
            num_workers=num_workers,
            collate_fn=list,
        )
        device = extractor.device
        try:
            with tqdm(total=len(todo), desc="extract", unit="img", dynamic_ncols=True) as bar:
                for ids, batch in _buckets(iter(loader), batch_size, bar, skipped, todo):
                    feats: list[ImageFeatures] = extractor.extract_batch(batch.to(device))
                    globals_out.append(np.stack([f.global_desc for f in feats]))
                    store.append(
                        [todo[i].name for i in ids], np.stack([f.local.to_rows() for f in feats])
                    )
                    bar.update(len(ids))
        finally:
            globals_out.close()
        stored = set(store.names)
    _update_skipped(out_dir / SKIPPED_FILE, skipped, [n for n in names if n not in stored])
    return ExtractReport(len(items), len(todo) - len(skipped), len(items) - len(todo), skipped)


def _update_skipped(path: Path, skipped: list[tuple[str, str]], missing: list[str]) -> None:
    """One line per name of the list still missing from the store: this run's reason, else the
    one recorded earlier (names since extracted or no longer listed drop out)."""
    known = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, reason = line.partition("\t")
            known[name] = reason
    known.update(dict(skipped))
    lines = [f"{n}\t{known[n]}\n" for n in missing if n in known]
    if lines or path.exists():
        write_text(path, "".join(lines))


def prune(out_dir: Path, keep: Sequence[str], global_dim: int, attrs: dict | None = None) -> None:
    """Keep only the images ``keep`` of an extraction folder, in their stored order.

    Both files are rewritten (the store through its checksums, bit for bit) and swapped in under
    the journal described in the module doc. Ids change: image ``i`` of the result is the
    ``i``-th kept one. ``attrs`` update the store's attributes.
    """
    out_dir = Path(out_dir)
    wanted = set(keep)
    with LocalStore(out_dir / LOCAL_FILE) as store:
        ids = [i for i, name in enumerate(store.names) if name in wanted]
        count = len(store)
    tmp_local = out_dir / f"{TMP_PREFIX}{LOCAL_FILE}"
    tmp_global = out_dir / f"{TMP_PREFIX}{GLOBAL_FILE}"
    for leftover in (tmp_local, tmp_global):
        leftover.unlink(missing_ok=True)
    copy_rows(out_dir / LOCAL_FILE, tmp_local, ids, attrs)
    globals_ = read_raw_globals(out_dir / GLOBAL_FILE, global_dim, count, prefix=True)
    with open(tmp_global, "wb") as f:
        for start in range(0, len(ids), PRUNE_ROWS):
            part = globals_[ids[start : start + PRUNE_ROWS]]
            f.write(np.ascontiguousarray(part, dtype="<f4").tobytes())
        f.flush()
        os.fsync(f.fileno())
    write_text(
        out_dir / SWAP_FILE, json.dumps({tmp_local.name: LOCAL_FILE, tmp_global.name: GLOBAL_FILE})
    )
    recover(out_dir)


def recover(out_dir: Path) -> None:
    """Finish the renames of an interrupted :func:`prune`, then delete temporary files left by
    killed writers. Call it before writing to ``out_dir``, with no other writer running."""
    out_dir = Path(out_dir)
    journal = out_dir / SWAP_FILE
    if journal.exists():
        for src, dst in json.loads(journal.read_text()).items():
            if (out_dir / src).exists():
                os.replace(out_dir / src, out_dir / dst)
        fsync_dir(out_dir)
        journal.unlink()
        fsync_dir(out_dir)
    for path in clean_leftovers(out_dir):
        logger.info("removed %s, left by a killed run", path)


def export_official(out_dir: Path, order: Sequence[str], dest: Path, prefix: str) -> list[Path]:
    """Write the official layouts from an extraction folder, rows in ``order`` (list order).

    ``<prefix>_local.hdf5``: dataset ``features`` float32 ``[N, K, 5 + D]`` (flat layout);
    ``<prefix>_global.pt``: raw float32 ``[N, D]`` (reference-spec §1.3-1.4), so features can be
    compared with official files. Values are exactly the stored ones: a float32 store exports
    the extractor's output bit for bit; the float16 default exports its rounding (within one
    float16 step, ``locore bench precision``), not the float32 an official run would write.
    Written ``EXPORT_IMAGES`` at a time, so a 1M-image store is never held in memory.
    """
    out_dir, dest = Path(out_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with LocalStore(out_dir / LOCAL_FILE) as store:
        position = {name: i for i, name in enumerate(store.names or [])}
        missing = [n for n in order if n not in position]
        if missing:
            raise UserError(f"{missing[0]!r} is not in {out_dir}; extract it before exporting")
        ids = np.array([position[n] for n in order], dtype=np.int64)
        local_path = dest / f"{prefix}_local.hdf5"
        shape = (len(ids), store.num_local, NUM_META + store.dim)
        with atomic_open(local_path, "w+b") as raw, h5py.File(raw, "w") as f:
            features = f.create_dataset("features", shape=shape, dtype="float32")
            for start in range(0, len(ids), EXPORT_IMAGES):
                features[start : start + EXPORT_IMAGES] = store.rows(
                    ids[start : start + EXPORT_IMAGES]
                )
        dim = os.path.getsize(out_dir / GLOBAL_FILE) // (4 * max(len(store), 1))
        globals_ = read_raw_globals(out_dir / GLOBAL_FILE, dim, len(store), prefix=True)
    global_path = dest / f"{prefix}_global.pt"
    write_bytes(global_path, np.ascontiguousarray(globals_[ids], dtype="<f4").tobytes())
    return [local_path, global_path]
