"""Training lists (reference-spec §5.2-5.3): each query with its nearest global neighbours.

For query i: candidates are its global nearest neighbours with i removed, scanned in order,
keeping negatives always and positives while fewer than ``max_positives`` are kept, until
``list_length`` candidates; optionally random positives replace negatives when fewer than
``min_positives`` are present. Gallery shuffling (on by default) permutes each list, so position
in the sequence does not leak global similarity. Every random choice uses a generator seeded by
``(seed, sample index)``, which makes a resumed run draw exactly what the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from engine.extract import read_globals
from indexing.local_store import LocalStore
from rerank.locore.model import LocoreInputs


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training descriptors are and how lists are built."""

    features: str  # extraction folder: local.h5 + global.f32 (locore extract)
    labels: str  # text file "name,class" per line (names as stored in local.h5)
    list_length: int = 100  # gallery images per list
    num_local: int = 48  # local descriptors per image
    max_positives: int = 100  # cap on positives kept per list
    min_positives: int = 0  # inject random positives up to this many
    shuffle_gallery: bool = True  # permute each list (the official augmentation)


class ListDataset:
    """Builds :class:`LocoreInputs` batches of training lists from an extraction folder."""

    def __init__(self, config: DataConfig, seed: int = 0):
        self.config, self.seed = config, seed
        folder = Path(config.features)
        self.store = LocalStore(folder / "local.h5")
        names = self.store.names or []
        labels = {}
        for line in Path(config.labels).read_text().splitlines():
            name, _, cls = line.strip().rpartition(",")
            if name:
                labels[name] = int(cls)
        missing = [n for n in names if Path(n).stem not in labels and n not in labels]
        if missing:
            raise UserError(f"{config.labels} has no label for {missing[0]!r}; add 'name,class'")
        self.labels = np.array([labels.get(n, labels.get(Path(n).stem)) for n in names])
        if len(names) <= config.list_length:
            raise UserError(
                f"{len(names)} training images cannot fill lists of {config.list_length}; "
                "lower data.list_length"
            )
        globals_ = np.asarray(read_globals(folder, self._global_dim(folder), len(names)))
        self.globals = globals_
        sims = globals_ @ globals_.T
        np.fill_diagonal(sims, -np.inf)
        self.neighbours = np.argsort(-sims, axis=1, kind="stable")[:, :-1]

    def _global_dim(self, folder: Path) -> int:
        size = (folder / "global.f32").stat().st_size
        return size // (4 * len(self.store))

    def __len__(self) -> int:
        return len(self.labels)

    def list_ids(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Gallery ids ``[G]`` and labels ``[G]`` of sample ``i``."""
        c = self.config
        rng = np.random.default_rng([self.seed, i])
        same = self.labels == self.labels[i]
        kept, positives = [], 0
        for j in self.neighbours[i]:
            if same[j]:
                if positives >= c.max_positives:
                    continue
                positives += 1
            kept.append(j)
            if len(kept) == c.list_length:
                break
        kept = np.array(kept)
        if positives < c.min_positives:
            pool = np.setdiff1d(np.flatnonzero(same), np.append(kept, i))
            slots = np.flatnonzero(~same[kept])
            n = min(c.min_positives - positives, len(pool), len(slots))
            kept[rng.choice(slots, n, replace=False)] = rng.choice(pool, n, replace=False)
        if c.shuffle_gallery:
            kept = kept[rng.permutation(len(kept))]
        return kept, same[kept].astype(np.int64)

    def batch(self, indices: np.ndarray) -> LocoreInputs:
        """Stack samples ``indices`` into one :class:`LocoreInputs` with ``positive_mask``."""
        n = self.config.num_local
        lists = [self.list_ids(int(i)) for i in indices]
        gallery = np.stack([ids for ids, _ in lists])
        query = self.store.gather(np.asarray(indices)[:, None], n)
        gal = self.store.gather(gallery, n)
        return LocoreInputs(
            query_local=torch.from_numpy(query.descriptors[:, 0]),
            query_scales=torch.from_numpy(query.scales[:, 0]),
            query_mask=torch.from_numpy(query.mask[:, 0]),
            gallery_local=torch.from_numpy(gal.descriptors),
            gallery_scales=torch.from_numpy(gal.scales),
            gallery_mask=torch.from_numpy(gal.mask),
            query_global=torch.from_numpy(self.globals[np.asarray(indices)]),
            gallery_global=torch.from_numpy(self.globals[gallery]),
            positive_mask=torch.from_numpy(np.stack([lab for _, lab in lists])),
        )
