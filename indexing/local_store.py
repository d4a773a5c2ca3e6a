"""HDF5 store of local descriptors, compatible with the official AMES/LOCORE files.

Our layout (written by :class:`LocalStoreWriter`): dataset ``features`` ``[N, K, 5 + D]`` (float16
by default) in the official column order (reference-spec §1.3), one HDF5 chunk per image, rows
sorted by weight so ``[:, :L]`` is the top L; dataset ``names`` (UTF-8); attribute ``committed``
(rows readers may see) updated only after a batch is flushed, so a crash never exposes a
half-written row and a rerun resumes after the last committed one; the producing config in
``attrs``.

:class:`LocalStore` also reads the official files as they are: the flat float32 layout written by
the extraction code, and the compound layout of the AMES data release (``metadata`` float32
``[K, 5]`` + ``descriptor`` float16 ``[K, D]`` per image).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from engine.errors import UserError

NUM_META = 5
DATASET = "features"


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


class LocalStoreWriter:
    """Append-only, resumable writer of our layout (use as a context manager)."""

    def __init__(
        self,
        path: Path,
        num_local: int,
        dim: int,
        dtype: str = "float16",
        attrs: dict | None = None,
    ):
        if dtype not in ("float16", "float32"):
            raise UserError(f"store dtype {dtype!r} is not supported; use float16 or float32")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.path, "a")
        width = NUM_META + dim
        if DATASET in self.file:
            ds = self.file[DATASET]
            if ds.shape[1:] != (num_local, width) or ds.dtype != np.dtype(dtype):
                message = (
                    f"store {self.path} holds {ds.dtype} rows of shape {ds.shape[1:]}, not "
                    f"{dtype} {(num_local, width)}; write to a new file"
                )
                self.file.close()
                raise UserError(message)
        else:
            self.file.create_dataset(
                DATASET,
                shape=(0, num_local, width),
                maxshape=(None, num_local, width),
                dtype=dtype,
                chunks=(1, num_local, width),
            )
            self.file.create_dataset(
                "names", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype()
            )
            self.file.attrs["committed"] = 0
            self.file.attrs["layout"] = "locore-v1"
            for key, value in (attrs or {}).items():
                self.file.attrs[key] = value if isinstance(value, str) else json.dumps(value)
            self.file.flush()
        self.committed = int(self.file.attrs["committed"])
        names = self.file["names"][: self.committed]
        self.names: list[str] = [n.decode() if isinstance(n, bytes) else n for n in names]

    def append(self, names: Sequence[str], rows: np.ndarray) -> None:
        """Write ``rows`` ``[B, K, 5 + D]`` for ``names``, then commit them."""
        ds = self.file[DATASET]
        if rows.ndim != 3 or rows.shape[1:] != ds.shape[1:] or len(names) != rows.shape[0]:
            raise UserError(
                f"rows of shape {rows.shape} do not fit store {self.path} "
                f"(needs [B, {ds.shape[1]}, {ds.shape[2]}] with one name per row)"
            )
        start, end = self.committed, self.committed + len(names)
        # Rows past "committed" are invisible to readers; overwrite leftovers of a crashed run.
        ds.resize(max(end, ds.shape[0]), axis=0)
        ds[start:end] = rows.astype(ds.dtype)
        self.file["names"].resize(max(end, self.file["names"].shape[0]), axis=0)
        self.file["names"][start:end] = list(names)
        self.file.flush()
        self.file.attrs["committed"] = end
        self.file.flush()
        self.committed = end
        self.names.extend(names)

    def close(self) -> None:
        """Drop uncommitted leftovers and close."""
        if self.file.id.valid:
            for key in (DATASET, "names"):
                self.file[key].resize(self.committed, axis=0)
            self.file.close()

    def __enter__(self) -> LocalStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalStore:
    """Read-only view of our layout or of the official flat/compound files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"local store {self.path} does not exist; extract features first")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError:
            raise UserError(
                f"{self.path} is not an HDF5 file; pass a local-descriptor store"
            ) from None
        if DATASET not in self.file:
            self.file.close()
            raise UserError(f"{self.path} has no 'features' dataset; it is not a local store")
        self.ds = self.file[DATASET]
        self.attrs = dict(self.file.attrs)
        self.compound = self.ds.dtype.names is not None
        if self.compound:
            if set(self.ds.dtype.names) != {"metadata", "descriptor"}:
                raise UserError(f"{self.path}: unknown compound fields {self.ds.dtype.names}")
            self.num_local, self.dim = self.ds.dtype["descriptor"].shape
            self.count = self.ds.shape[0]
        else:
            if self.ds.ndim != 3 or self.ds.shape[2] <= NUM_META:
                raise UserError(
                    f"{self.path}: features of shape {self.ds.shape} are not [N, K, 5 + D]"
                )
            self.num_local, self.dim = self.ds.shape[1], self.ds.shape[2] - NUM_META
            self.count = int(self.attrs.get("committed", self.ds.shape[0]))
        self.names: list[str] | None = None
        if "names" in self.file:
            raw = self.file["names"][: self.count]
            self.names = [n.decode() if isinstance(n, bytes) else n for n in raw]

    def __len__(self) -> int:
        return self.count

    def rows(self, ids: np.ndarray, L: int | None = None) -> np.ndarray:
        """``[n, L, 5 + D]`` float32 rows of images ``ids`` (one sorted, de-duplicated read)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        L = self.num_local if L is None else L
        if self.num_local < L:
            raise UserError(
                f"asked for {L} descriptors per image; {self.path} stores {self.num_local}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.count):
            raise UserError(
                f"image id {int(ids.max())} is outside store {self.path} ({self.count})"
            )
        unique, inverse = np.unique(ids, return_inverse=True)
        if self.compound:
            data = self.ds[unique]
            block = np.concatenate(
                [
                    data["metadata"][:, :L].astype(np.float32),
                    data["descriptor"][:, :L].astype(np.float32),
                ],
                axis=2,
            )
        else:
            block = (
                self.ds[unique, :L].astype(np.float32)
                if unique.size
                else np.zeros((0, L, NUM_META + self.dim), np.float32)
            )
        return block[inverse]

    def gather(self, ids: np.ndarray, L: int) -> LocalBatch:
        """Images ``ids`` ``[Q, M]`` (first ``L`` rows each) as a :class:`LocalBatch`."""
        ids = np.asarray(ids)
        rows = self.rows(ids, L).reshape(*ids.shape, L, NUM_META + self.dim)
        return LocalBatch(
            descriptors=rows[..., NUM_META:],
            scales=rows[..., 2].astype(np.int64),
            mask=rows[..., 3] != 0,
            weights=rows[..., 4],
        )

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
