"""Shortlists ``(ids, sims) [Q, M]`` as ``.npy`` pairs; reads the official ``nn_*.pkl`` too."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np

from engine.errors import UserError


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
        """Write ``<path>_ids.npy`` and ``<path>_sims.npy`` (no pickles)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(f"{path}_ids.npy", self.ids.astype(np.int64))
        np.save(f"{path}_sims.npy", self.sims.astype(np.float32))

    @classmethod
    def load(cls, path: Path) -> Shortlist:
        """Read our ``.npy`` pair (give the prefix or either file) or an official ``nn_*.pkl``
        (``[2, Q, M]``: similarities then ids stored as floats; numpy array or torch tensor)."""
        path = Path(path)
        if path.suffix == ".pkl":
            return _read_official(path)
        prefix = str(path)
        for suffix in ("_ids.npy", "_sims.npy"):
            prefix = prefix.removesuffix(suffix)
        ids_path, sims_path = Path(f"{prefix}_ids.npy"), Path(f"{prefix}_sims.npy")
        if not ids_path.is_file() or not sims_path.is_file():
            raise UserError(f"shortlist {path}: need {ids_path.name} and {sims_path.name}")
        ids, sims = np.load(ids_path), np.load(sims_path)
        if ids.shape != sims.shape or ids.ndim != 2:
            raise UserError(f"shortlist {path}: ids {ids.shape} and sims {sims.shape} differ")
        return cls(ids.astype(np.int64), sims.astype(np.float32))

    def truncate(self, m: int) -> Shortlist:
        """The first ``m`` columns."""
        return Shortlist(self.ids[:, :m], self.sims[:, :m])


def _read_official(path: Path) -> Shortlist:
    if not path.is_file():
        raise UserError(f"shortlist {path} does not exist")
    with open(path, "rb") as f:
        try:
            data = pickle.load(f)
        except Exception:  # torch tensors pickle with torch's reducers
            f.seek(0)
            import torch

            data = torch.load(f, map_location="cpu", weights_only=False)
    if hasattr(data, "numpy"):
        data = data.numpy()
    data = np.asarray(data)
    if data.ndim != 3 or data.shape[0] != 2:
        raise UserError(f"shortlist {path} has shape {data.shape}; official files are [2, Q, M]")
    return Shortlist(ids=np.rint(data[1]).astype(np.int64), sims=data[0].astype(np.float32))


def read_raw_globals(path: Path, dim: int) -> np.ndarray:
    """Memory-map an official raw float32 global file (``*.pt``, headerless ``[N, dim]``)."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else -1
    if size < 0 or size % (4 * dim):
        raise UserError(f"global file {path} is missing or not a multiple of {dim} float32 values")
    return np.memmap(path, dtype="<f4", mode="r", shape=(size // (4 * dim), dim))
