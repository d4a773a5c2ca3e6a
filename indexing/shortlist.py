"""Shortlists ``(ids, sims) [Q, M]`` as ``.npy`` pairs, and the official files around them.

Ours: ``<prefix>_ids.npy`` (int64) and ``<prefix>_sims.npy`` (float32), readable with
``np.load(allow_pickle=False)``. The official ``nn_*.pkl`` files (reference-spec §1.5) are pickles
of a ``[2, Q, M]`` array, similarities then ids stored as floats, either a numpy array or a torch
tensor; they are read with an unpickler that only rebuilds arrays and tensors, so a tampered file
cannot run code. The official global descriptor files (``*.pt``, reference-spec §1.4) are raw
headerless float32 ``[N, D]`` arrays, read here as memory maps.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

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
        """Write ``<path>_ids.npy`` and ``<path>_sims.npy`` (each via a temporary file)."""
        prefix = _prefix(path)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        ids = np.asarray(self.ids)
        if ids.ndim != 2 or np.shape(self.sims) != ids.shape:
            raise UserError(f"shortlist ids {ids.shape} and sims {np.shape(self.sims)} differ")
        for suffix, array in zip(
            SUFFIXES, (ids.astype(np.int64), np.asarray(self.sims, np.float32))
        ):
            target = Path(f"{prefix}{suffix}")
            tmp = target.with_name(f".{target.name}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, target)

    @classmethod
    def load(cls, path: Path) -> Shortlist:
        """Read our ``.npy`` pair (give the prefix or either file) or an official ``nn_*.pkl``."""
        path = Path(path)
        if path.suffix == ".pkl":
            return read_official(path)
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
        return cls(ids.astype(np.int64), sims.astype(np.float32))

    def truncate(self, m: int) -> Shortlist:
        """The first ``m`` columns (all of them when there are fewer)."""
        return Shortlist(self.ids[:, :m], self.sims[:, :m])


def _prefix(path: Path) -> Path:
    text = str(path)
    for suffix in SUFFIXES:
        text = text.removesuffix(suffix)
    return Path(text)


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and torch tensors only; any other global is refused."""

    NUMPY = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
    TORCH = {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "Tensor"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.NUMPY:
            return super().find_class(module, name)
        if (module, name) in self.TORCH:
            import torch  # noqa: F401 (the rebuild functions need torch imported)

            return super().find_class(module, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _storage_from_bytes(data: bytes) -> Any:
    """A tensor storage pickled by ``pickle.dump(tensor)``: torch.save bytes, read safely."""
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_official(path: Path) -> Shortlist:
    """An official ``nn_*.pkl``: ``[2, Q, M]``, row 0 similarities, row 1 ids stored as floats
    (numpy array or torch tensor; ``pickle.dump`` or ``torch.save`` containers)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"shortlist {path} does not exist")
    try:
        if zipfile.is_zipfile(path):  # written with torch.save
            import torch

            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                data = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
        raise UserError(f"shortlist {path} is not an official nn_*.pkl array ({err})") from None
    if hasattr(data, "detach"):
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    if data.ndim != 3 or data.shape[0] != 2 or not np.issubdtype(data.dtype, np.number):
        raise UserError(f"shortlist {path} has shape {data.shape}; official files are [2, Q, M]")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    np.ascontiguousarray(x, dtype="<f4").tofile(tmp)
    os.replace(tmp, path)
    return path
