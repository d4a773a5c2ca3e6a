"""Shortlists ``(ids, sims) [Q, M]`` as ``.npy`` pairs, and the official files around them.

Ours: ``<prefix>_ids.npy`` (int64) and ``<prefix>_sims.npy`` (float32), readable with
``np.load(allow_pickle=False)``. The official ``nn_*.pkl`` files (reference-spec §1.5) are pickles
of a ``[2, Q, M]`` array, similarities then ids stored as floats, either a numpy array or a torch
tensor; they are read with an unpickler that only rebuilds arrays and tensors, so a tampered file
cannot run code, and that leaves large payloads in the file, so a reader keeping ``depth`` columns
of a whole-database file reads only those. The official global descriptor files (``*.pt``,
reference-spec §1.4) are raw headerless float32 ``[N, D]`` arrays, read here as memory maps.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from locore.core.atomic import atomic_open, write_bytes
from locore.core.errors import UserError

SUFFIXES = ("_ids.npy", "_sims.npy")


@dataclasses.dataclass
class Shortlist:
    """First-stage results.

    Attributes:
        ids: ``[Q, M]`` int64 database ids, best first (-1 = none).
        sims: ``[Q, M]`` float32 similarities.
    """

    ids: np.ndarray
    sims: np.ndarray

    def save(self, path: Path) -> None:
        """Write ``<path>_ids.npy`` and ``<path>_sims.npy`` (each atomically)."""
        prefix = _prefix(path)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        ids = np.asarray(self.ids)
        if ids.ndim != 2 or np.shape(self.sims) != ids.shape:
            raise UserError(f"shortlist ids {ids.shape} and sims {np.shape(self.sims)} differ")
        for suffix, array in zip(
            SUFFIXES, (ids.astype(np.int64), np.asarray(self.sims, np.float32))
        ):
            with atomic_open(Path(f"{prefix}{suffix}"), "wb") as f:
                np.save(f, array, allow_pickle=False)

    @classmethod
    def load(cls, path: Path, depth: int | None = None) -> Shortlist:
        """Read our ``.npy`` pair (give the prefix or either file) or an official ``nn_*.pkl``;
        ``depth`` keeps the first ``depth`` columns (an ``nn_*.pkl`` is cut while reading)."""
        path = Path(path)
        if path.suffix == ".pkl":
            return read_official(path, depth)
        prefix = _prefix(path)
        ids_path, sims_path = (Path(f"{prefix}{s}") for s in SUFFIXES)
        if not ids_path.is_file() or not sims_path.is_file():
            raise UserError(f"shortlist {path}: need both {ids_path.name} and {sims_path.name}")
        try:
            ids = np.load(ids_path, allow_pickle=False)
            sims = np.load(sims_path, allow_pickle=False)
        except ValueError:
            raise UserError(f"shortlist {prefix}: the .npy files are damaged") from None
        if ids.shape != sims.shape or ids.ndim != 2:
            raise UserError(f"shortlist {path}: ids {ids.shape} and sims {sims.shape} differ")
        if not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"shortlist {ids_path} holds {ids.dtype}, not integer ids")
        return cls(ids[:, :depth].astype(np.int64), sims[:, :depth].astype(np.float32))

    def truncate(self, m: int) -> Shortlist:
        """The first ``m`` columns (all of them when there are fewer)."""
        return Shortlist(self.ids[:, :m], self.sims[:, :m])


def _prefix(path: Path) -> Path:
    text = str(path)
    for suffix in SUFFIXES:
        text = text.removesuffix(suffix)
    return Path(text)


LAZY_BYTES = 1 << 20  # pickled payloads from this size stay in the file until cut
# What a damaged or foreign pickle raises while it is read (a tampered one: UnpicklingError).
_DAMAGED = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    TypeError,
    struct.error,
)


@dataclasses.dataclass(frozen=True)
class _Region:
    """A pickled bytes payload left in the file: ``nbytes`` bytes at ``offset``."""

    offset: int
    nbytes: int


class _Pending:
    """What numpy's ``_reconstruct`` returns here: the array is made when ``BUILD`` hands over
    its state, as a memory map when the data stayed in the file."""

    def __init__(self, path: Path):
        self.path, self.value = path, None

    def __setstate__(self, state: tuple) -> None:
        _, shape, dtype, fortran, raw = state
        self.value = _array(self.path, raw, dtype, shape, "F" if fortran else "C")


@dataclasses.dataclass(frozen=True)
class _InFile:
    """An array whose values stayed in the file: ``shape`` values of ``dtype`` at ``offset``,
    ``strides`` in bytes."""

    path: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    def leading(self, depth: int | None) -> np.ndarray:
        """The first ``depth`` entries of the last axis (all when None), read from the file:
        one ``pread`` per row when rows are contiguous, else through a memory map."""
        *lead, m = self.shape
        d = m if depth is None else min(depth, m)
        item = self.dtype.itemsize
        if self.strides[-1] != item:
            raw = np.memmap(self.path, np.uint8, "r")
            view = np.ndarray(self.shape, self.dtype, raw, self.offset, self.strides)
            return np.array(view[..., :d])
        out = np.empty((*lead, d), self.dtype)
        rows = out.reshape(-1, d)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for r, index in enumerate(np.ndindex(*lead)):
                start = self.offset + sum(i * s for i, s in zip(index, self.strides))
                if os.preadv(fd, [rows[r]], start) != d * item:
                    raise ValueError("the file ends inside the array")
        finally:
            os.close(fd)
        return out


def _array(path: Path, raw: Any, dtype: Any, shape: tuple, order: str = "C") -> Any:
    """An array of pickled bytes, or an :class:`_InFile` over a payload left in the file."""
    dtype, shape = np.dtype(dtype), tuple(shape)
    if not isinstance(raw, _Region):
        return np.frombuffer(raw, dtype).reshape(shape, order=order)
    axes = range(len(shape)) if order == "F" else range(len(shape) - 1, -1, -1)
    strides, step = [0] * len(shape), dtype.itemsize
    for a in axes:
        strides[a], step = step, step * shape[a]
    if step > raw.nbytes:
        raise ValueError(f"an array of {step} bytes in a payload of {raw.nbytes}")
    return _InFile(path, raw.offset, dtype, shape, tuple(strides))


@dataclasses.dataclass(frozen=True)
class _LazyStorage:
    """A torch storage pickled by ``pickle.dump(tensor)``, left in the file: ``numel`` values
    of ``dtype`` at ``offset`` of ``path``."""

    path: Path
    offset: int
    dtype: np.dtype
    numel: int


class _ArrayUnpickler(pickle._Unpickler):
    """Rebuilds numpy arrays and torch tensors only; any other global is refused.

    Pure-Python unpickler so that large ``bytes`` payloads (the array data, outside any pickle
    frame) are skipped rather than read: arrays over them become memory maps of the file, and a
    caller that keeps ``depth`` columns of a whole-database ``[2, Q, N]`` file reads only those.
    """

    NUMPY = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
    TORCH = {
        ("torch._utils", "_rebuild_tensor"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "Tensor"),
        ("collections", "OrderedDict"),
    }
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedReader, path: Path):
        super().__init__(file)
        self._raw, self._path = file, Path(path)

    def _payload(self, size_format: str) -> bytes | _Region:
        (n,) = struct.unpack(size_format, self.read(struct.calcsize(size_format)))
        if n < LAZY_BYTES or self._unframer.current_frame is not None:
            return self.read(n)
        region = _Region(self._raw.tell(), n)
        self._raw.seek(n, io.SEEK_CUR)
        return region

    def _load_binbytes(self) -> None:
        self.append(self._payload("<I"))

    def _load_binbytes8(self) -> None:
        self.append(self._payload("<Q"))

    def _load_bytearray8(self) -> None:
        data = self._payload("<Q")
        self.append(data if isinstance(data, _Region) else bytearray(data))

    dispatch[pickle.BINBYTES[0]] = _load_binbytes
    dispatch[pickle.BINBYTES8[0]] = _load_binbytes8
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return lambda *_: _Pending(self._path)
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return lambda buf, dtype, shape, order: _array(self._path, buf, dtype, shape, order)
        if (module, name) in self.NUMPY:
            return super().find_class(module, name)
        if (module, name) in self.TORCH:
            import torch  # noqa: F401 (the rebuild functions need torch imported)

            return super().find_class(module, name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda data: _storage_from_bytes(self._path, data)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, *rest: Any) -> Any:
    """``torch._utils._rebuild_tensor_v2``; over a storage left in the file, an
    :class:`_InFile`."""
    if not isinstance(storage, _LazyStorage):
        from torch._utils import _rebuild_tensor_v2

        return _rebuild_tensor_v2(storage, offset, size, stride, *rest)
    item, size = storage.dtype.itemsize, tuple(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if min(size, default=1) > 0 and last >= storage.numel:
        raise ValueError("a tensor reaching past its storage")
    strides = tuple(item * s for s in stride)
    return _InFile(storage.path, storage.offset + item * offset, storage.dtype, size, strides)


class _Record(pickle._Unpickler):
    """One small pickle of torch's legacy format (``torch.save(storage)`` inside a
    ``pickle.dump(tensor)``), read exactly to its end; a storage becomes ``(dtype, key)``."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid: tuple) -> tuple:
        import torch

        kind, storage_type, key, *_ = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        with warnings.catch_warnings():  # the legacy typed storage classes warn on every use
            warnings.simplefilter("ignore", UserWarning)
            dtype = storage_type.dtype
        return torch.empty(0, dtype=dtype).numpy().dtype, key


def _storage_from_bytes(path: Path, data: bytes | _Region) -> Any:
    """A tensor storage pickled by ``pickle.dump(tensor)``: torch's legacy ``torch.save`` bytes
    (magic, version, system info, the storage record, its key list, then ``int64`` count + raw
    values). Small ones are read with ``weights_only``; a payload left in the file is mapped
    where its values lie."""
    import torch

    with open(path, "rb") as f:
        if isinstance(data, _Region):
            f.seek(data.offset)
            for _ in range(3):  # magic number, protocol version, system info
                _Record(f).load()
            dtype, key = _Record(f).load()
            keys = _Record(f).load()
            (numel,) = struct.unpack("<q", f.read(8))
            start = f.tell()
            if keys == [key] and start + numel * dtype.itemsize == data.offset + data.nbytes:
                return _LazyStorage(Path(path), start, dtype, numel)
            f.seek(data.offset)
            data = f.read(data.nbytes)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_official(path: Path, depth: int | None = None) -> Shortlist:
    """An official ``nn_*.pkl``: ``[2, Q, M]``, row 0 similarities, row 1 ids stored as floats
    (numpy array or torch tensor; ``pickle.dump`` or ``torch.save`` containers).

    ``depth`` keeps the first ``depth`` columns, cut while reading: a pickled array's values
    are left in the file and only those columns are read (``torch.save`` files are memory-mapped
    and sliced), so a whole-database file (M = every image, GBs at +1M) costs ``2 * Q * depth``
    values of memory, not the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"shortlist {path} does not exist")
    try:
        if zipfile.is_zipfile(path):  # written with torch.save
            import torch

            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            with open(path, "rb") as f:
                data = _ArrayUnpickler(f, path).load()
        if isinstance(data, _Pending):
            data = data.value
        if not hasattr(data, "shape") or not hasattr(data, "dtype"):
            raise UserError(f"shortlist {path} holds {type(data).__name__}, not a [2, Q, M] array")
        if len(data.shape) != 3 or data.shape[0] != 2:
            raise UserError(
                f"shortlist {path} has shape {tuple(data.shape)}; official files are [2, Q, M]"
            )
        if isinstance(data, _InFile):
            data = data.leading(depth)
        else:
            data = data if depth is None else data[:, :, :depth]
            data = data.detach().cpu().numpy() if hasattr(data, "detach") else np.array(data)
    except _DAMAGED as err:
        raise UserError(f"shortlist {path} is not an official nn_*.pkl array ({err})") from None
    if not np.issubdtype(data.dtype, np.number):
        raise UserError(f"shortlist {path} holds {data.dtype}, not numbers")
    ids = data[1]
    if not np.isfinite(ids).all() or (ids != np.rint(ids)).any() or (ids < -1).any():
        raise UserError(f"shortlist {path}: row 1 must hold whole-number ids")
    return Shortlist(ids=ids.astype(np.int64), sims=data[0].astype(np.float32))


def read_raw_globals(
    path: Path, dim: int, count: int | None = None, *, prefix: bool = False
) -> np.ndarray:
    """Memory-map a raw float32 global file (official ``*.pt`` or our ``global.f32``), read-only.

    The files store no shape (reference-spec §1.4): ``dim`` is the descriptor size and ``count``,
    when given (e.g. the matching local store's length), is checked against the file size. With
    ``prefix`` the file may hold more rows than ``count`` (an extraction appends globals before it
    commits their local rows) and the first ``count`` are returned.

    Returns:
        ``[N, dim]`` float32 memmap (``N = count`` when given).
    """
    path = Path(path)
    size = path.stat().st_size if path.is_file() else -1
    if size < 0 or size % (4 * dim):
        raise UserError(f"global file {path} is missing or not a multiple of {dim} float32 values")
    n = size // (4 * dim)
    if count is not None and (n < count if prefix else n != count):
        raise UserError(
            f"global file {path} holds {n} descriptors of dim {dim}, not {count}; re-run extraction"
        )
    return np.memmap(path, dtype="<f4", mode="r", shape=(n, dim))[: n if count is None else count]


def write_raw_globals(path: Path, x: np.ndarray) -> Path:
    """Write ``x`` ``[N, D]`` as a raw little-endian float32 file (the official ``*.pt``),
    via a temporary file so a reader never sees part of it."""
    path = Path(path)
    x = np.asarray(x)
    if x.ndim != 2:
        raise UserError(f"global descriptors must be [N, D], got shape {x.shape}")
    return write_bytes(path, np.ascontiguousarray(x, dtype="<f4").tobytes())
