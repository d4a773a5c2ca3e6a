"""HDF5 store of local descriptors: our crash-safe layout, and the official AMES/LOCORE files.

Our layout (written by :class:`LocalStoreWriter`, ``attrs["layout"] == "locore-store-v1"``):

* ``features`` ``[N, K, 5 + D]`` float16 (default) or float32, one HDF5 chunk per image, rows in
  the official column order (reference-spec §1.3: position, position, scale id, padding flag
  0 = valid / 1 = padding, detector weight, descriptor) and sorted by weight, so that the prefix
  ``[:, :L]`` holds the top L. Each chunk carries a Fletcher-32 checksum (HDF5's ``fletcher32``
  filter, which appends 4 bytes and leaves the data as it is): a damaged image is reported with
  the file and its name, never used;
* ``names`` ``[N]`` fixed-width UTF-8 image names (no checksum: a names chunk is rewritten by
  every batch, and a torn rewrite must not make the committed names unreadable); ``committed``
  ``[1]`` int64, the number of rows readers may see; the producing config in the file attributes
  (a resumed writer replaces them with its own, e.g. a moved image folder).

Disk: give ``capacity`` (``extract`` gives the whole job) and the file holds what was asked for
and no more: HDF5 never shrinks a file when a dataset is trimmed, so an allocation that grew past
the data would stay on disk. Name chunks are sized from the capacity for the same reason.

Deleting images: the store is append-only. :func:`copy_rows` writes the rows to keep into a new
store (rows read through the checksums, written bit for bit), which the caller renames over the
old one (``locore.engine.extract.prune`` does this for an index folder).

Crash safety: chunks are allocated ahead of the rows (``alloc_time=early``), so appending a batch
writes raw bytes into space that already exists and changes no HDF5 metadata. A batch is flushed
(and fsynced) before ``committed`` is rewritten in place, so a writer killed at any moment leaves
every committed row intact and at most some invisible rows past the counter, which a resumed
writer overwrites. The one metadata change, growing the allocation, is flushed before any row
lands in the new space; give ``capacity`` up front and it happens once, at creation.

:class:`LocalStore` reads our layout, the official flat float32 layout, the compound layout of the
AMES data release (``metadata`` float32 ``[K, 5]`` + ``descriptor`` float16 ``[K, D]`` per image),
and stores joined from shards by :func:`join_shards` (an HDF5 virtual dataset). Reads bypass
HDF5's selection machinery, which costs ~3 ms per image for a scattered selection: the byte
address of every image is taken once from the chunk index, and a batch of images is gathered
with one vectorised numpy read from a memory map, after a read-ahead hint for every range.
Checksummed chunks are verified with a vectorised Fletcher-32 on an image's first read by a
reader (the whole chunk is read then; later reads take only the rows asked for). Compressed or
big-endian files fall back to plain HDF5 reads (which verify checksums themselves).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from locore.core.atomic import TMP_PREFIX, fsync_dir
from locore.core.errors import UserError
from locore.core.layout import NUM_META

logger = logging.getLogger(__name__)

FEATURES, NAMES, COMMITTED = "features", "names", "committed"
LAYOUT = "locore-store-v1"
DTYPES = {"float16": "<f2", "float32": "<f4"}
NAME_BYTES = 256  # default width of a stored name (UTF-8 bytes)
NAME_CHUNK = 4096  # names per HDF5 chunk
MIN_GROWTH = 64  # images allocated at least per growth step
COPY_BYTES = 64 * 2**20  # float32 bytes read per batch by copy_rows
VERIFY_BYTES = 8 * 2**20  # chunk bytes checksummed at once (their int64 words take 4x that)


@dataclasses.dataclass
class LocalBatch:
    """Local descriptors gathered for re-ranking.

    Attributes:
        descriptors: ``[Q, M, L, D]`` float32.
        scales: ``[Q, M, L]`` int64 scale ids.
        mask: ``[Q, M, L]`` bool, True = padding.
        weights: ``[Q, M, L]`` float32.
    """

    descriptors: np.ndarray
    scales: np.ndarray
    mask: np.ndarray
    weights: np.ndarray


def cast(x: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """``x`` as ``dtype``. Large casts from or to float16 go through torch: numpy's run ~8x
    slower (no F16C path) and were the main cost of a batch write and of a gather. Both round
    to nearest even, so the result is the same bits either way."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if np.dtype(np.float16) not in (x.dtype, dtype) or x.size < 2**20:
        return x.astype(dtype)
    import torch

    out = np.empty(x.shape, dtype)
    torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(x)))
    return out


def _decode_names(raw: np.ndarray) -> list[str]:
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]


def _plain_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """HDF5 attributes as Python values (numpy scalars unwrapped, bytes decoded)."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        out[key] = value
    return out


def _attr_value(value: Any) -> Any:
    """Strings and numbers are stored as they are, anything else as JSON text."""
    if isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, sort_keys=True, default=str)


class LocalStoreWriter:
    """Append-only, resumable writer of our layout (use as a context manager).

    Opening an existing store resumes it: ``names`` lists the committed images, which a caller
    skips. Rows are written as given: callers pass them sorted by weight (what
    ``LocalFeatures.from_topk`` produces; :mod:`locore.indexing.convert` sorts official files).

    Args:
        path: the ``.h5`` file (created with its parent folder when missing).
        num_local: K, descriptors stored per image.
        dim: D, descriptor dimension.
        dtype: ``float16`` (default, half the disk) or ``float32``.
        attrs: the producing config, stored as file attributes when the store is created.
        capacity: images expected in total; allocating them at once leaves no metadata write
            during the run (without it the allocation grows by half when full).
        name_bytes: longest image name in UTF-8 bytes (fixed-width storage, see module doc).
        durable: fsync after every batch, so a power cut, not only a crash, keeps the batch.
    """

    def __init__(
        self,
        path: Path,
        num_local: int,
        dim: int,
        dtype: str = "float16",
        attrs: dict | None = None,
        *,
        capacity: int | None = None,
        name_bytes: int = NAME_BYTES,
        durable: bool = True,
    ):
        if dtype not in DTYPES:
            raise UserError(f"store dtype {dtype!r} is not supported; use float16 or float32")
        if num_local < 1 or dim < 1:
            raise UserError(f"a store needs num_local >= 1 and dim >= 1, got {num_local}, {dim}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.durable = durable
        if not self.path.exists():
            self._create_whole(num_local, dim, dtype, attrs or {}, name_bytes, capacity)
        try:
            # No chunk cache: a batch then writes just its bytes (a names chunk holds 4096 names)
            self.file = h5py.File(self.path, "a", rdcc_nbytes=0)
        except OSError as err:
            raise UserError(
                f"cannot open store {self.path} for writing ({err}); make sure no other writer "
                "has it open and that it is an HDF5 file"
            ) from None
        try:
            if FEATURES in self.file:
                self._check_resumable(num_local, dim, dtype, attrs or {})
            else:
                self._create(num_local, dim, dtype, attrs or {}, name_bytes, capacity)
        except BaseException:
            self.file.close()
            raise
        self._features = self.file[FEATURES]
        self._names = self.file[NAMES]
        self._counter = self.file[COMMITTED]
        self._fd = os.open(self.path, os.O_RDONLY)
        self.committed = int(self._counter[0])
        self.names: list[str] = _decode_names(self._names[: self.committed])
        self._known = set(self.names)
        if capacity:
            self.reserve(capacity)

    def _create_whole(
        self,
        num_local: int,
        dim: int,
        dtype: str,
        attrs: dict,
        name_bytes: int,
        capacity: int | None,
    ) -> None:
        """Make a new store in a temporary file and rename it into place: a writer killed while
        HDF5 writes the file's header would leave a file no later writer can open."""
        tmp = self.path.with_name(f"{TMP_PREFIX}{self.path.name}")
        with h5py.File(tmp, "w") as self.file:
            self._create(num_local, dim, dtype, attrs, name_bytes, capacity)
        if self.durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def _create(
        self,
        num_local: int,
        dim: int,
        dtype: str,
        attrs: dict,
        name_bytes: int,
        capacity: int | None,
    ) -> None:
        width = NUM_META + dim
        self._preallocated(
            FEATURES, DTYPES[dtype], (0, num_local, width), (1, num_local, width), checksum=True
        )
        names_chunk = int(np.clip(capacity or MIN_GROWTH, 1, NAME_CHUNK))
        self._preallocated(NAMES, h5py.string_dtype("utf-8", name_bytes), (0,), (names_chunk,))
        # Contiguous and written at creation: the counter has a fixed address and every later
        # update is one in-place write of 8 bytes.
        self.file.create_dataset(COMMITTED, data=np.zeros(1, "<i8"))
        meta = {"layout": LAYOUT, "num_local": num_local, "dim": dim, "dtype": dtype}
        for key, value in {**attrs, **meta}.items():
            self.file.attrs[key] = _attr_value(value)
        self._sync()

    def _preallocated(
        self, name: str, dtype: Any, shape: tuple, chunks: tuple, checksum: bool = False
    ) -> None:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        self.file.create_dataset(
            name,
            shape=shape,
            maxshape=(None, *shape[1:]),
            chunks=chunks,
            dtype=dtype,
            dcpl=dcpl,
            fletcher32=checksum,
            fill_time="never",  # the space is overwritten by rows before it is committed
        )

    def _check_resumable(self, num_local: int, dim: int, dtype: str, attrs: dict) -> None:
        stored = _plain_attrs(self.file.attrs)
        if stored.get("layout") != LAYOUT or COMMITTED not in self.file:
            raise UserError(
                f"{self.path} is not a store written by locore (no {LAYOUT!r} layout); "
                "write to a new file (locore.indexing.convert reads official files)"
            )
        ds = self.file[FEATURES]
        want = (num_local, NUM_META + dim)
        if ds.shape[1:] != want or ds.dtype != np.dtype(DTYPES[dtype]):
            raise UserError(
                f"store {self.path} holds {ds.dtype} rows of shape {ds.shape[1:]}, not "
                f"{dtype} {want}; write to a new file"
            )
        changed = sorted(k for k, v in attrs.items() if stored.get(k) != _attr_value(v))
        if changed:  # one metadata change, flushed before any row is written
            logger.info("resuming %s: replacing its attributes %s", self.path, changed)
            for key in changed:
                self.file.attrs[key] = _attr_value(attrs[key])
            self._sync()

    def _sync(self) -> None:
        """Flush HDF5's buffers and, when durable, the OS page cache to disk."""
        self.file.flush()
        if self.durable and getattr(self, "_fd", None) is not None:
            os.fsync(self._fd)

    def _reserve(self, rows: int, exact: bool = False) -> None:
        """Allocate chunks for ``rows`` images, or half as many more than now when not
        ``exact`` (the only metadata change, flushed at once)."""
        allocated = self._features.shape[0]
        if rows <= allocated:
            return
        size = rows if exact else max(rows, allocated + allocated // 2, MIN_GROWTH)
        self._features.resize(size, axis=0)
        self._names.resize(size, axis=0)
        self._sync()

    def reserve(self, rows: int) -> None:
        """Allocate room for ``rows`` images in total now (the whole job: no growth later)."""
        self._reserve(rows, exact=True)

    def append(self, names: Sequence[str], rows: np.ndarray) -> None:
        """Write ``rows`` ``[B, K, 5 + D]`` (official column order) for ``names``, then commit."""
        rows = np.asarray(rows)
        shape = self._features.shape[1:]
        if rows.ndim != 3 or rows.shape[1:] != shape or len(names) != rows.shape[0]:
            raise UserError(
                f"rows of shape {rows.shape} do not fit store {self.path} "
                f"(needs [B, {shape[0]}, {shape[1]}] with one name per row)"
            )
        if not len(names):
            return
        names = [str(n) for n in names]
        encoded = [n.encode("utf-8") for n in names]
        width = self._names.dtype.itemsize
        for name, raw in zip(names, encoded):
            if len(raw) > width or b"\0" in raw:
                raise UserError(
                    f"image name {name!r} is longer than {width} bytes or holds a NUL; "
                    "use shorter names or a new store with a larger name_bytes"
                )
            if name in self._known:
                raise UserError(f"image {name!r} is already in store {self.path}; names are ids")
        if len(set(names)) != len(names):
            raise UserError(f"a batch for {self.path} names an image twice")
        bad = ~np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
        if bad.any():
            name = names[int(np.argmax(bad))]
            raise UserError(f"descriptors of image {name!r} hold NaN or inf; re-extract it")
        start, end = self.committed, self.committed + len(names)
        self._reserve(end)
        self._features[start:end] = cast(rows, self._features.dtype)
        self._names[start:end] = np.array(encoded, dtype=self._names.dtype)
        self._sync()  # the rows are on disk before the counter says they exist
        self._counter[0] = end
        self._sync()
        self.committed = end
        self.names.extend(names)
        self._known.update(names)

    def close(self) -> None:
        """Trim the allocation to the committed rows and close (safe to call twice)."""
        if self.file.id.valid:
            self._features.resize(self.committed, axis=0)
            self._names.resize(self.committed, axis=0)
            self.file.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LocalStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class _Segment:
    """Images ``[start, stop)`` of a store, held by rows ``[src_start, ...)`` of one dataset."""

    start: int
    stop: int
    src_start: int
    dataset: h5py.Dataset
    path: Path
    addresses: np.ndarray | None = None  # byte address of each image's first row; lazy
    fields: list[tuple[int, np.dtype, int]] | None = None  # (offset, dtype, columns) per part
    fd: int | None = None
    direct: bool | None = None  # None = not examined yet
    checksum: bool = False  # each image's chunk ends with a Fletcher-32 checksum
    verified: np.ndarray | None = None  # [rows] bool: checksum checked by this reader


class _Damaged(Exception):
    """An image's bytes do not match their checksum (``row``: its row in the segment's file)."""

    def __init__(self, row: int):
        super().__init__(row)
        self.row = row


class LocalStore:
    """Read-only view of our layout, the official flat/compound files, or a joined store.

    ``names`` is None for official files (they carry none); ``attrs`` holds the file attributes
    (for our layout: the producing config). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"local store {self.path} does not exist; extract features first")
        self.file = _open_read_only(self.path)
        self._segments: list[_Segment] = []
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        if FEATURES not in self.file or not isinstance(self.file[FEATURES], h5py.Dataset):
            raise UserError(f"{self.path} has no 'features' dataset; it is not a local store")
        self.ds = self.file[FEATURES]
        self.attrs = _plain_attrs(self.file.attrs)
        self.compound = self.ds.dtype.names is not None
        if self.compound:
            fields = set(self.ds.dtype.names)
            if fields != {"metadata", "descriptor"} or self.ds.ndim != 1:
                raise UserError(
                    f"{self.path}: compound features with fields {sorted(fields)} are not the "
                    "AMES layout {metadata [K, 5], descriptor [K, D]}"
                )
            meta, desc = self.ds.dtype["metadata"].shape, self.ds.dtype["descriptor"].shape
            if len(meta) != 2 or len(desc) != 2 or meta != (desc[0], NUM_META):
                raise UserError(
                    f"{self.path}: compound fields of shapes {meta} and {desc} are not "
                    "metadata [K, 5] + descriptor [K, D]"
                )
            self.num_local, self.dim = desc
        else:
            if self.ds.ndim != 3 or self.ds.shape[2] <= NUM_META:
                raise UserError(
                    f"{self.path}: features of shape {self.ds.shape} are not [N, K, 5 + D]"
                )
            self.num_local, self.dim = self.ds.shape[1], self.ds.shape[2] - NUM_META
        if COMMITTED in self.file:
            self.count = int(self.file[COMMITTED][0])
        else:  # official files; stores of the first writer kept the counter as an attribute
            self.count = int(self.attrs.get("committed", self.ds.shape[0]))
        if not 0 <= self.count <= self.ds.shape[0]:
            raise UserError(
                f"{self.path}: counter says {self.count} images but 'features' holds "
                f"{self.ds.shape[0]}; the file is damaged, re-extract it"
            )
        self._names: list[str] | None = None
        self._segments = self._find_segments()

    def _find_segments(self) -> list[_Segment]:
        """One segment per file that physically holds rows (several for a joined store)."""
        if not self.ds.is_virtual:
            return [_Segment(0, self.count, 0, self.ds, self.path)]
        segments = []
        for source in self.ds.virtual_sources():
            (v0, *_), (v1, *_) = source.vspace.get_select_bounds()
            (s0, *_), _ = source.src_space.get_select_bounds()
            src = self.path if source.file_name == "." else Path(source.file_name)
            if not src.is_absolute():  # HDF5 resolves it from the joined file's folder
                src = self.path.parent / src
            if not src.is_file():
                raise UserError(
                    f"store {self.path} maps images {v0}-{v1} to {src}, which is missing; "
                    "keep the shard files beside the joined file or join them again"
                )
            handle = self.file if src == self.path else _open_read_only(src)
            segments.append(_Segment(v0, v1 + 1, s0, handle[source.dset_name], src))
        segments.sort(key=lambda s: s.start)
        return segments

    @property
    def names(self) -> list[str] | None:
        """Image names in store order (None for official files); read on first use."""
        if self._names is None and NAMES in self.file:
            self._names = _decode_names(self.file[NAMES][: self.count])
        return self._names

    def __len__(self) -> int:
        return self.count

    def _check(self, ids: np.ndarray, L: int | None) -> int:
        L = self.num_local if L is None else int(L)
        if not 1 <= L <= self.num_local:
            raise UserError(
                f"asked for {L} descriptors per image; {self.path} stores {self.num_local}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.count):
            bad = int(ids.max() if ids.max() >= self.count else ids.min())
            raise UserError(f"image id {bad} is outside store {self.path} ({self.count} images)")
        return L

    def rows(self, ids: np.ndarray, L: int | None = None) -> np.ndarray:
        """``[n, L, 5 + D]`` float32 rows (the first ``L`` of each image) of images ``ids``."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        L = self._check(ids, L)
        unique, inverse = np.unique(ids, return_inverse=True)
        meta, desc = self._read(unique, L)
        return np.concatenate([meta, cast(desc, np.float32)], axis=2)[inverse]

    def gather(self, ids: np.ndarray, L: int) -> LocalBatch:
        """Images ``ids`` (any shape, e.g. ``[Q, M]``), first ``L`` rows each, as a batch.

        Each distinct image is read once. Negative ids (the -1 of a short shortlist) give
        all-padding entries.
        """
        ids = np.asarray(ids, dtype=np.int64)
        valid = ids >= 0
        L = self._check(ids[valid], L)
        unique, inverse = np.unique(ids[valid], return_inverse=True)
        meta, desc = self._read(unique, L)
        if not valid.all():  # one extra all-padding image for the missing ids
            pad = np.zeros((1, L, NUM_META), np.float32)
            pad[..., 3] = 1
            meta = np.concatenate([meta, pad])
            desc = np.concatenate([desc, np.zeros((1, L, self.dim), desc.dtype)])
            full = np.full(ids.shape, len(unique), np.int64)
            full[valid] = inverse
            inverse = full
        pick = inverse.reshape(ids.shape)
        meta = meta[pick]
        return LocalBatch(
            descriptors=cast(desc[pick], np.float32),
            scales=meta[..., 2].astype(np.int64),
            mask=meta[..., 3] != 0,
            weights=np.ascontiguousarray(meta[..., 4]),
        )

    def _read(self, unique: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct ids -> (metadata float32 ``[n, L, 5]``, descriptors ``[n, L, D]`` in
        the stored dtype)."""
        metas, descs = [], []
        starts = np.array([s.start for s in self._segments])
        where = np.searchsorted(starts, unique, side="right") - 1
        for k in np.unique(where):
            segment = self._segments[k]
            local = unique[where == k] - segment.start + segment.src_start
            try:
                meta, desc = self._read_segment(segment, local, L)
            except _Damaged as err:
                image = err.row - segment.src_start + segment.start
                name = f"{self.names[image]!r} (id {image})" if self.names else f"id {image}"
                raise UserError(
                    f"store {segment.path} is damaged: image {name} fails its checksum; "
                    "delete the store and extract (or `locore index`) again"
                ) from None
            metas.append(meta)
            descs.append(desc)
        if not metas:
            desc_dtype = self.ds.dtype["descriptor"].base if self.compound else self.ds.dtype
            return np.zeros((0, L, NUM_META), np.float32), np.zeros((0, L, self.dim), desc_dtype)
        if len(metas) == 1:
            return metas[0], descs[0]
        return np.concatenate(metas), np.concatenate(descs)

    def _read_segment(
        self, segment: _Segment, ids: np.ndarray, L: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if segment.direct is None:
            segment.direct = _map_segment(segment)
        if not segment.direct:
            return _read_hdf5(segment.dataset, ids, L)
        if segment.checksum:
            _verify(segment, ids[~segment.verified[ids]])
        parts = []
        for offset, dtype, columns in segment.fields:
            addresses = segment.addresses[ids] + offset
            nbytes = L * columns * dtype.itemsize
            block = _pread(segment, addresses, nbytes)
            parts.append(block.view(dtype).reshape(len(ids), L, columns))
        if len(parts) == 1:  # flat rows: split the metadata columns off
            (block,) = parts
            return block[..., :NUM_META].astype(np.float32), block[..., NUM_META:]
        return parts[0].astype(np.float32), parts[1]

    def close(self) -> None:
        """Close the file and every shard it maps (safe to call twice)."""
        for segment in self._segments:
            if segment.fd is not None:
                os.close(segment.fd)
                segment.fd = None
            if segment.dataset.file.id.valid and segment.dataset.file != self.file:
                segment.dataset.file.close()
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_read_only(path: Path) -> h5py.File:
    """Open read-only; when another process holds the writer's lock, open without locking, so a
    reader may watch a store being written (it sees committed rows only). No chunk cache: a
    prefix [:L] of an image is then read on its own instead of its whole chunk."""
    for locking in (False, None):
        try:
            return h5py.File(path, "r", locking=locking, rdcc_nbytes=0)
        except OSError:
            continue
    raise UserError(f"{path} is not an HDF5 file; pass a local-descriptor store")


def _little_endian_float(tid: h5py.h5t.TypeID) -> np.dtype | None:
    """numpy dtype of an HDF5 little-endian float type (array types: of their base), else None."""
    if tid.get_class() == h5py.h5t.ARRAY:
        tid = tid.get_super()
    if tid.get_class() != h5py.h5t.FLOAT or tid.get_order() != h5py.h5t.ORDER_LE:
        return None
    return np.dtype(f"<f{tid.get_size()}") if tid.get_size() in (2, 4, 8) else None


def _map_segment(segment: _Segment) -> bool:
    """Find the byte address of every image of ``segment``; False when the layout cannot be
    read directly (filters, big-endian, nested virtual datasets, unallocated data)."""
    ds = segment.dataset
    dcpl = ds.id.get_create_plist()
    filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    checksum = filters == [h5py.h5z.FILTER_FLETCHER32]
    if ds.is_virtual or (filters and not checksum):
        return False
    tid = ds.id.get_type()
    if tid.get_class() == h5py.h5t.COMPOUND:
        index = {tid.get_member_name(i).decode(): i for i in range(tid.get_nmembers())}
        fields = []
        for name in ("metadata", "descriptor"):
            dtype = _little_endian_float(tid.get_member_type(index[name]))
            if dtype is None:
                return False
            fields.append((tid.get_member_offset(index[name]), dtype, ds.dtype[name].shape[1]))
        record = tid.get_size()
        if checksum:  # verified per image below, which needs flat rows
            return False
    else:
        dtype = _little_endian_float(tid)
        if dtype is None:
            return False
        fields = [(0, dtype, ds.shape[2])]
        record = int(np.prod(ds.shape[1:])) * dtype.itemsize
    n = segment.src_start + segment.stop - segment.start  # rows that may be read
    layout = dcpl.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        base = ds.id.get_offset()
        if base is None:
            return False
        addresses = base + record * np.arange(n, dtype=np.int64)
    elif layout == h5py.h5d.CHUNKED:
        chunks = ds.chunks
        if tuple(chunks[1:]) != tuple(ds.shape[1:]) or not hasattr(ds.id, "chunk_iter"):
            return False  # an image spans several chunks, or HDF5 < 1.14
        per_chunk = chunks[0]
        if checksum and per_chunk != 1:
            return False  # a checksum covers several images: let HDF5 verify whole chunks
        starts = np.full(-(-n // per_chunk), -1, np.int64)

        def visit(info: Any) -> None:
            if info.chunk_offset[0] < n:  # a crashed writer's allocation may reach further
                if info.filter_mask:  # the checksum filter was skipped for this chunk
                    return
                starts[info.chunk_offset[0] // per_chunk] = info.byte_offset

        ds.id.chunk_iter(visit)
        if (starts < 0).any():
            return False
        ids = np.arange(n, dtype=np.int64)
        addresses = starts[ids // per_chunk] + record * (ids % per_chunk)
    else:
        return False
    if n and addresses.max() + record + 4 * checksum > segment.path.stat().st_size:
        return False
    segment.addresses, segment.fields = addresses, fields
    segment.checksum, segment.verified = checksum, np.zeros(n, bool)
    segment.fd = os.open(segment.path, os.O_RDONLY)
    return True


def _pread(segment: _Segment, addresses: np.ndarray, nbytes: int) -> np.ndarray:
    """``[n, nbytes]`` uint8: ``nbytes`` at each address, read with ``pread`` into one buffer.

    Reads, not a memory map: a map would leave every touched page of a 100 GB store in the
    process's RSS (10 GB after one ROxf+1M re-rank, issue #16), and ``pread`` is safe from any
    number of threads on one descriptor. The kernel is first asked to fetch every range ahead,
    in parallel (a cold gather gets ~4x faster; benchmarks/results/indexing.md).
    """
    positions = addresses.tolist()
    if hasattr(os, "posix_fadvise"):
        for address in positions:
            os.posix_fadvise(segment.fd, address, nbytes, os.POSIX_FADV_WILLNEED)
    out = np.empty((len(positions), nbytes), np.uint8)
    for row, address in zip(out, positions):
        if os.preadv(segment.fd, [row], address) != nbytes:
            raise UserError(
                f"store {segment.path} is shorter than its index says (truncated); "
                "delete it and extract (or `locore index`) again"
            )
    return out


def _verify(segment: _Segment, ids: np.ndarray) -> None:
    """Check the whole checksummed chunks of images ``ids`` (one image each), once per reader:
    the first read of an image costs a full-chunk read and a Fletcher-32, later reads only
    their rows. Raises :class:`_Damaged` for the first image that fails."""
    ((_, dtype, columns),) = segment.fields
    record = segment.dataset.shape[1] * columns * dtype.itemsize
    step = max(1, VERIFY_BYTES // (record + 4))
    for start in range(0, len(ids), step):
        part = ids[start : start + step]
        bad = ~_fletcher32_ok(_pread(segment, segment.addresses[part], record + 4))
        if bad.any():
            raise _Damaged(int(part[np.argmax(bad)]))
        segment.verified[part] = True


def _fletcher32_ok(chunks: np.ndarray) -> np.ndarray:
    """``[n]`` True where a chunk's data matches the little-endian Fletcher-32 in its last 4
    bytes, as HDF5 computes it (big-endian 16-bit words; sum1 = sum of words, sum2 = sum of the
    running sum1, both mod 65535, compared mod 65535 since HDF5 may store 0 as 65535)."""
    data, stored = chunks[:, :-4], chunks[:, -4:].copy().view("<u4")[:, 0].astype(np.int64)
    words = data.shape[1] // 2
    # weight of word i in sum2 is (words - i); mod 65535 keeps every product below 2^32, and a
    # block of 2^20 words keeps each partial sum exact in int64
    weights = (words - np.arange(words, dtype=np.int64)) % 65535
    sum1 = np.zeros(len(chunks), np.int64)
    sum2 = np.zeros(len(chunks), np.int64)
    block = 2**20
    for start in range(0, words, block):
        w = data[:, 2 * start : 2 * min(start + block, words)].view(">u2").astype(np.int64)
        sum1 = (sum1 + w.sum(axis=1)) % 65535
        sum2 = (sum2 + w @ weights[start : start + w.shape[1]]) % 65535
    if data.shape[1] % 2:  # an odd last byte counts as the high byte of a word
        last = data[:, -1].astype(np.int64) << 8
        sum1 = (sum1 + last) % 65535
        sum2 = (sum2 + sum1) % 65535
    return (sum1 == (stored & 0xFFFF) % 65535) & (sum2 == (stored >> 16) % 65535)


def _read_hdf5(ds: h5py.Dataset, ids: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """HDF5 reads of sorted distinct ``ids``, one per run of consecutive ids (the fallback).
    A failed read (HDF5 verifies checksums itself) is retried image by image to name it."""
    try:
        return _read_runs(ds, ids, L)
    except OSError:
        for i in ids:
            try:
                ds.read_direct(np.empty((1, *ds.shape[1:]), ds.dtype), np.s_[int(i) : int(i) + 1])
            except OSError:
                raise _Damaged(int(i)) from None
        raise


def _read_runs(ds: h5py.Dataset, ids: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    metas, descs = [], []
    for run in np.split(ids, breaks):
        if not run.size:
            continue
        a, b = int(run[0]), int(run[-1]) + 1
        if ds.dtype.names is not None:
            data = ds[a:b]
            metas.append(data["metadata"][:, :L].astype(np.float32))
            descs.append(data["descriptor"][:, :L])
        else:
            block = ds[a:b, :L]
            metas.append(block[..., :NUM_META].astype(np.float32))
            descs.append(block[..., NUM_META:])
    return np.concatenate(metas), np.concatenate(descs)


def join_shards(shard_paths: Sequence[Path], out: Path) -> Path:
    """Join shard stores (one writer each) into one logical store at ``out``.

    ``out`` holds an HDF5 virtual dataset ``features`` mapping the committed rows of each shard
    in the given order, plus the concatenated names; no descriptor is copied. Shard paths are
    stored relative to ``out``'s folder, so the folder can be moved as a whole. Written to a
    temporary file, fsynced and renamed, so ``out`` is never half-written.
    """
    out = Path(out)
    if not shard_paths:
        raise UserError("join_shards needs at least one shard")
    stores = []
    try:
        for path in shard_paths:
            if Path(path).resolve() == out.resolve():
                raise UserError(f"the joined store {out} cannot also be one of its shards")
            stores.append(LocalStore(path))
        first = stores[0]
        for store in stores[1:]:
            if store.ds.dtype != first.ds.dtype or store.ds.shape[1:] != first.ds.shape[1:]:
                raise UserError(
                    f"shard {store.path} holds {store.ds.dtype} {store.ds.shape[1:]}, shard "
                    f"{first.path} {first.ds.dtype} {first.ds.shape[1:]}; join shards of one "
                    "extraction only"
                )
        named = [s.names is not None for s in stores]
        if any(named) and not all(named):
            raise UserError("some shards carry image names and some do not; convert them first")
        names: list[str] | None = None
        if all(named):
            names, seen = [], {}
            for store in stores:
                for name in store.names:
                    if name in seen:
                        raise UserError(
                            f"image {name!r} is in shards {seen[name]} and {store.path}; "
                            "shards must not overlap"
                        )
                    seen[name] = store.path
                names.extend(store.names)
        total = sum(len(s) for s in stores)
        layout = h5py.VirtualLayout(shape=(total, *first.ds.shape[1:]), dtype=first.ds.dtype)
        offset = 0
        for store in stores:
            if not len(store):  # HDF5 cannot map an empty selection; nothing to map anyway
                continue
            relative = os.path.relpath(store.path.resolve(), out.resolve().parent)
            source = h5py.VirtualSource(relative, FEATURES, shape=store.ds.shape)
            layout[offset : offset + len(store)] = source[: len(store)]
            offset += len(store)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
        with h5py.File(tmp, "w") as f:
            f.create_virtual_dataset(FEATURES, layout, fillvalue=0)
            f.create_dataset(COMMITTED, data=np.array([total], "<i8"))
            if names is not None:
                width = max([first.file[NAMES].dtype.itemsize, *(len(n.encode()) for n in names)])
                dtype = h5py.string_dtype("utf-8", width)
                f.create_dataset(NAMES, data=np.array([n.encode() for n in names], dtype=dtype))
            for key, value in first.attrs.items():
                if key != "committed":
                    f.attrs[key] = _attr_value(value)
            f.attrs["shards"] = json.dumps(
                [os.path.relpath(s.path.resolve(), out.resolve().parent) for s in stores]
            )
        with open(tmp, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        for store in stores:
            store.close()
    return out


def copy_rows(src: Path, dst: Path, ids: Sequence[int], attrs: dict | None = None) -> Path:
    """Write a new store ``dst`` holding images ``ids`` of ``src``, in that order.

    Rows are read through the checksums and written in the source precision, so they are bit for
    bit the stored ones; ``attrs`` update the source's attributes. ``dst`` must not exist (the
    caller writes a temporary file and renames it, see the module doc).
    """
    dst = Path(dst)
    if dst.exists():
        raise UserError(f"{dst} exists; copy_rows writes a new store")
    ids = np.asarray(ids, dtype=np.int64)
    with LocalStore(src) as store:
        if store.names is None or store.attrs.get("layout") != LAYOUT:
            raise UserError(f"{src} is not a store written by locore; convert it first")
        step = max(1, COPY_BYTES // (store.num_local * (NUM_META + store.dim) * 4))
        with LocalStoreWriter(
            dst,
            store.num_local,
            store.dim,
            store.attrs["dtype"],
            {**store.attrs, **(attrs or {})},
            capacity=len(ids),
            name_bytes=store.file[NAMES].dtype.itemsize,
        ) as writer:
            for start in range(0, len(ids), step):
                part = ids[start : start + step]
                writer.append([store.names[i] for i in part], store.rows(part))
    return dst
