"""Training lists (reference-spec §5.2-5.3): each query with its nearest global neighbours.

For query i the candidates are its global nearest neighbours with i removed (a shortlist file,
or computed exactly from the globals), scanned in order, keeping negatives always and positives
while fewer than ``max_positives`` are kept, until ``list_length`` candidates; optionally random
positives replace negatives when fewer than ``min_positives`` are present. Gallery shuffling (on
by default) permutes each list, because otherwise the position in the sequence would leak the
global rank. Every random choice uses a generator seeded by ``(seed, draw)``, where ``draw`` is
the sample's position in the training stream: a resumed run draws exactly what the uninterrupted
one did, and a list seen in two epochs is shuffled differently each time.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from locore.core.errors import UserError
from locore.core.layout import GLOBAL_FILE, LOCAL_FILE
from locore.indexing.local_store import LocalStore
from locore.indexing.shortlist import Shortlist, read_raw_globals
from locore.rerank.locore.model import LocoreInputs
from locore.rerank.train.pasted import PastedLists
from locore.rerank.train.synthetic import SyntheticLists, SyntheticSpec

logger = logging.getLogger(__name__)

SOURCES = ("features", "synthetic", "pasted")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training descriptors are and how lists are built."""

    features: str = ""  # extraction folder: local.h5 + global.f32 (`locore extract`)
    labels: str = ""  # text file, one "name,class" line per image (name with or without suffix)
    pairs: str = ""  # or: text file of "name_a,name_b" positive pairs (symmetric), no classes
    shortlist: str = ""  # nearest global neighbours per image (ours or nn_*.pkl); "" = compute
    candidates: int = 1600  # neighbours scanned per image when computing them (official nn depth)
    list_length: int = 100  # gallery images per list (official topk)
    num_local: int = 48  # local descriptors per image (official README: 48)
    use_global: bool = True  # feed the global descriptor (1 global token per image)
    max_positives: int = 100  # cap on positives kept per list (official max_pos_per_topk)
    min_positives: int = 0  # inject random positives up to this many (official: 0, never)
    shuffle_gallery: bool = True  # permute each list per draw (the official augmentation)
    # features: an extraction's images and labels; synthetic: generated descriptors
    # (rerank/train/synthetic.py); pasted: an extraction's images, no labels (train/pasted.py)
    source: str = "features"
    synthetic_lists: int = 2000  # lists generated when source is synthetic or pasted

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise UserError(f"unknown data.source {self.source!r}; choose one of {SOURCES}")
        if self.list_length < 1 or self.num_local < 1:
            raise UserError("data.list_length and data.num_local must be at least 1")
        if self.min_positives > self.list_length:
            raise UserError(
                f"data.min_positives={self.min_positives} exceeds data.list_length="
                f"{self.list_length}; lower it"
            )


def _name_lines(path: Path, what: str) -> list[tuple[int, str, str]]:
    """``(line number, left, right)`` of a two-column ``a,b`` text file (right split on the last
    comma, so names may hold commas)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; write one line per {what[:-1]}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        left, sep, right = line.strip().rpartition(",")
        if not sep or not left or not right.strip():
            raise UserError(f"{path}:{number} is not two comma-separated fields: {line.strip()!r}")
        rows.append((number, left.strip(), right.strip()))
    return rows


def read_labels(path: Path, names: list[str]) -> np.ndarray:
    """Class of each stored image ``names`` from a ``name,class`` file (int64 ``[N]``)."""
    table = {name: cls for _, name, cls in _name_lines(path, "labels")}
    classes: dict[str, int] = {}
    out = np.empty(len(names), np.int64)
    for i, name in enumerate(names):
        cls = table.get(name, table.get(Path(name).stem))
        if cls is None:
            raise UserError(f"{path} has no label for image {name!r}; add a '{name},class' line")
        out[i] = classes.setdefault(cls, len(classes))
    return out


def read_pairs(path: Path, names: list[str]) -> list[np.ndarray]:
    """Positive partners of each stored image from ``name_a,name_b`` lines (symmetric).

    For collections without classes (e.g. verified matches). Images in no pair have no
    positives; their lists are all negatives, as for a class of one.
    """
    ids = {name: i for i, name in enumerate(names)} | {
        Path(name).stem: i for i, name in enumerate(names)
    }
    partners: list[set[int]] = [set() for _ in names]
    for number, a, b in _name_lines(path, "pairs"):
        for name in (a, b):
            if name not in ids:
                raise UserError(f"{path}:{number} names {name!r}, which is not in the store")
        if ids[a] != ids[b]:
            partners[ids[a]].add(ids[b])
            partners[ids[b]].add(ids[a])
    return [np.array(sorted(p), dtype=np.int64) for p in partners]


def nearest_neighbours(globals_: np.ndarray, depth: int, chunk: int = 4096) -> np.ndarray:
    """``[N, depth]`` ids of each row's most similar other rows (dot product, best first).

    Exact and chunked, so memory stays ``chunk x N``; ties keep the lower id first.
    """
    g = torch.from_numpy(np.array(globals_, dtype=np.float32))  # a copy: memmaps are read-only
    depth = min(depth, len(g) - 1)
    out = []
    for start in range(0, len(g), chunk):
        sims = g[start : start + chunk] @ g.T
        rows = torch.arange(start, start + len(sims))
        sims[torch.arange(len(sims)), rows] = -torch.inf  # the query itself
        out.append(torch.topk(sims, depth, dim=1, sorted=True).indices)
    return torch.cat(out).numpy()


class Lists(Protocol):
    """What training and validation read: numbered lists, drawn into batches (a
    :class:`ListDataset` or generated :mod:`synthetic <locore.rerank.train.synthetic>` lists)."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray, draws: np.ndarray | None = None) -> LocoreInputs: ...


def open_features(config: DataConfig) -> tuple[LocalStore, np.ndarray]:
    """The local store and the ``[N, Dg]`` globals of ``config.features``, checked against the
    list length and the locals per image ``config`` asks for."""
    if not config.features:
        raise UserError("set data.features to an extraction folder (local.h5 + global.f32)")
    folder = Path(config.features)
    store = LocalStore(folder / LOCAL_FILE)
    count = len(store)
    if count <= config.list_length:
        raise UserError(
            f"{count} training images cannot fill lists of {config.list_length}; "
            "lower data.list_length"
        )
    if store.num_local < config.num_local:
        raise UserError(
            f"{folder / LOCAL_FILE} stores {store.num_local} locals per image; lower "
            f"data.num_local={config.num_local}"
        )
    size = (folder / GLOBAL_FILE).stat().st_size if (folder / GLOBAL_FILE).is_file() else 0
    if size == 0 or size % (4 * count):
        raise UserError(f"{folder / GLOBAL_FILE} does not hold {count} float32 rows; re-extract")
    globals_ = read_raw_globals(folder / GLOBAL_FILE, size // (4 * count), count, prefix=True)
    return store, np.asarray(globals_)


class ListDataset:
    """Builds :class:`LocoreInputs` batches of training lists from an extraction folder."""

    def __init__(self, config: DataConfig, seed: int = 0):
        self.store, self.globals = open_features(config)
        if bool(config.labels) == bool(config.pairs):
            raise UserError(
                "set exactly one of data.labels ('name,class' lines) and data.pairs "
                "('name_a,name_b' lines of positive pairs)"
            )
        self.config, self.seed = config, seed
        if self.store.names is None:
            raise UserError(f"{config.features}/{LOCAL_FILE} stores no image names; re-extract it")
        count = len(self.store)
        if config.labels:
            self.labels = read_labels(Path(config.labels), self.store.names)
        else:
            self.partners = read_pairs(Path(config.pairs), self.store.names)
        if config.shortlist:
            ids = Shortlist.load(Path(config.shortlist)).ids
            if len(ids) != count:
                raise UserError(
                    f"shortlist {config.shortlist} has {len(ids)} rows for {count} images; "
                    "it must come from the same extraction"
                )
        else:
            ids = nearest_neighbours(self.globals, config.candidates)
        self.neighbours = ids

    def __len__(self) -> int:
        return len(self.store)

    def positives(self, i: int) -> np.ndarray:
        """``[N]`` bool: which images are positives of image ``i`` (itself included)."""
        if self.config.labels:
            return self.labels == self.labels[i]
        same = np.zeros(len(self.store), bool)
        same[self.partners[i]] = True
        same[i] = True
        return same

    def list_ids(self, i: int, draw: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Gallery ids ``[G]`` and 0/1 labels ``[G]`` of query ``i`` at stream position ``draw``."""
        c = self.config
        rng = np.random.default_rng([self.seed, draw])
        same = self.positives(i)
        kept: list[int] = []
        positives = 0
        for j in self.neighbours[i]:
            if j == i or j < 0:  # official shortlists may still hold the query (§5.2 step 2)
                continue
            if same[j]:
                if positives >= c.max_positives:
                    continue
                positives += 1
            kept.append(int(j))
            if len(kept) == c.list_length:
                break
        if len(kept) < c.list_length:
            raise UserError(
                f"image {i} has only {len(kept)} usable neighbours for lists of {c.list_length}; "
                "give a deeper shortlist or lower data.list_length"
            )
        ids = np.array(kept)
        if positives < c.min_positives:
            pool = np.setdiff1d(np.flatnonzero(same), np.append(ids, i))
            slots = np.flatnonzero(~same[ids])
            n = min(c.min_positives - positives, len(pool), len(slots))
            ids[rng.choice(slots, n, replace=False)] = rng.choice(pool, n, replace=False)
        if c.shuffle_gallery:
            ids = ids[rng.permutation(len(ids))]
        return ids, same[ids].astype(np.int64)

    def batch(self, indices: np.ndarray, draws: np.ndarray | None = None) -> LocoreInputs:
        """Lists of queries ``indices`` (drawn at ``draws``) as one :class:`LocoreInputs`."""
        indices = np.asarray(indices, dtype=np.int64)
        draws = np.zeros_like(indices) if draws is None else np.asarray(draws)
        lists = [self.list_ids(int(i), int(d)) for i, d in zip(indices, draws)]
        gallery = np.stack([ids for ids, _ in lists])
        n = self.config.num_local
        query = self.store.gather(indices[:, None], n)
        gal = self.store.gather(gallery, n)
        use_global = self.config.use_global
        return LocoreInputs(
            query_local=torch.from_numpy(query.descriptors[:, 0]),
            query_scales=torch.from_numpy(query.scales[:, 0]),
            query_mask=torch.from_numpy(query.mask[:, 0]),
            gallery_local=torch.from_numpy(gal.descriptors),
            gallery_scales=torch.from_numpy(gal.scales),
            gallery_mask=torch.from_numpy(gal.mask),
            query_global=torch.from_numpy(self.globals[indices].copy()) if use_global else None,
            gallery_global=torch.from_numpy(self.globals[gallery].copy()) if use_global else None,
            positive_mask=torch.from_numpy(np.stack([lab for _, lab in lists])),
        )


def make_dataset(config: DataConfig, seed: int):
    """The lists of ``config``: a :class:`ListDataset`, generated synthetic lists, or pasted
    lists over an extraction."""
    if config.source == "synthetic":
        return SyntheticLists(SyntheticSpec(), config.synthetic_lists, seed)
    if config.source == "pasted":
        store, globals_ = open_features(config)
        return PastedLists(
            store,
            globals_,
            config.synthetic_lists,
            config.list_length,
            config.num_local,
            seed,
            use_global=config.use_global,
        )
    return ListDataset(config, seed)
