"""Stand-ins shared by the re-ranking tests: an in-memory local store, a context-dependent list
model with LocoreModel's forward contract, and a small random collection."""

import types

import numpy as np
import torch
from torch import nn

from locore.core.layout import NUM_META
from locore.indexing.local_store import LocalBatch
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Database, Queries
from locore.rerank.locore.model import MODES, build_model

DIM, GLOBAL_DIM, STORED = 8, 6, 6


class ArrayStore:
    """In-memory stand-in for ``indexing.local_store.LocalStore``: rows in the official layout."""

    def __init__(self, rows: np.ndarray):
        self.table = rows
        self.path = "<in memory>"
        self.dim = rows.shape[-1] - NUM_META
        self.num_local = rows.shape[1]
        self.requests: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.table)

    def rows(self, ids: np.ndarray, L: int | None = None) -> np.ndarray:  # noqa: N803
        """``[n, L, 5 + D]`` rows of images ``ids``, as ``LocalStore.rows``."""
        self.requests.append(np.asarray(ids).copy())
        return self.table[np.asarray(ids)][:, :L]

    def gather(self, ids: np.ndarray, L: int) -> LocalBatch:  # noqa: N803 (store API name)
        self.requests.append(ids.copy())
        rows = self.table[ids][..., :L, :]
        return LocalBatch(
            descriptors=rows[..., NUM_META:],
            scales=rows[..., 2].astype(np.int64),
            mask=rows[..., 3] != 0,
            weights=rows[..., 4],
        )


class StandInModel(nn.Module):
    """Tiny list model with LocoreModel's forward contract; every score depends on the whole list.

    score = strength * (5 * query.image - 3 * max similarity to another image of the list), on
    masked means of the local descriptors plus the global descriptor.
    """

    def __init__(self, strength: float = 1.0, use_global: bool = True):
        super().__init__()
        self.config = types.SimpleNamespace(use_global=use_global, num_local=4, num_scales=3)
        self.strength = nn.Parameter(torch.tensor(float(strength)))
        self.seen: list[object] = []

    def forward(self, inputs, backend=None):
        self.seen.append(inputs)
        keep_q = (~inputs.query_mask).float()[..., None]
        keep_g = (~inputs.gallery_mask).float()[..., None]
        q = (inputs.query_local * keep_q).sum(1) / keep_q.sum(1).clamp(min=1)
        g = (inputs.gallery_local * keep_g).sum(2) / keep_g.sum(2).clamp(min=1)
        if self.config.use_global:
            q = torch.cat([q, inputs.query_global], -1)
            g = torch.cat([g, inputs.gallery_global], -1)
        rel = torch.einsum("bd,bgd->bg", q, g)
        gram = torch.einsum("bgd,bhd->bgh", g, g)
        gram = gram - 1e9 * torch.eye(g.shape[1])
        crowd = gram.amax(-1) if g.shape[1] > 1 else torch.zeros_like(rel)
        score = self.strength * (5 * rel - 3 * crowd)
        return types.SimpleNamespace(scores=dict.fromkeys(MODES, score))


def official_rows(desc: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``[..., K, 5 + D]`` rows: positions 0, scale id = row % 3, padding flag, weight."""
    k = desc.shape[-2]
    meta = np.zeros((*desc.shape[:-1], NUM_META), np.float32)
    meta[..., 2] = np.arange(k) % 3
    meta[..., 3] = ~valid
    meta[..., 4] = np.where(valid, 1.0 - np.arange(k) / k, 0.0)
    return np.concatenate([meta, np.where(valid[..., None], desc, 0)], -1).astype(np.float32)


def collection(num_db=80, num_q=5, seed=0, dim=DIM, gdim=GLOBAL_DIM, stored=STORED):
    """Random database and queries with some padded local rows; shortlists sorted by global sim."""
    rng = np.random.default_rng(seed)
    valid = rng.random((num_db, stored)) > 0.2
    valid[:, 0] = True
    db_rows = official_rows(rng.normal(size=(num_db, stored, dim)), valid)
    q_rows = official_rows(
        rng.normal(size=(num_q, stored - 1, dim)), np.ones((num_q, stored - 1), bool)
    )
    db_glob = rng.normal(size=(num_db, gdim)).astype(np.float32)
    q_glob = rng.normal(size=(num_q, gdim)).astype(np.float32)
    db_glob /= np.linalg.norm(db_glob, axis=1, keepdims=True)
    q_glob /= np.linalg.norm(q_glob, axis=1, keepdims=True)
    sims_all = q_glob @ db_glob.T
    ids = np.argsort(-sims_all, axis=1, kind="stable")
    sims = np.take_along_axis(sims_all, ids, 1)
    queries = Queries(global_desc=q_glob, local_rows=q_rows)
    database = Database(global_desc=db_glob, store=ArrayStore(db_rows))
    return queries, Shortlist(ids=ids.astype(np.int64), sims=sims.astype(np.float32)), database


def save_micro(path, **dims):
    """A seeded random 1-layer LoCoRe-micro saved like a real checkpoint folder (``dims``: e.g.
    ``local_dim``, ``global_dim``, ``num_local`` for a fake release)."""
    torch.manual_seed(0)
    build_model("micro", num_layers=1, **dims).save_pretrained(path)
    return path
