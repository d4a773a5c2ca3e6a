"""Seeded synthetic lists in which list context matters (``data.source: synthetic``).

For a query with ``n`` local descriptors, each list holds:

* easy positives: share ``easy_shared`` locals with the query (plus noise);
* transitive positives: share locals only with one easy positive (its private ones), none with
  the query, so they are positive only because an image that matches the query is in the list;
* hard negatives: share ``hard_shared`` locals with the query;
* companions (negatives): share locals with one hard negative, exactly as transitive positives
  share with an easy one, so "linked to some gallery image" alone is no cue;
* random negatives.

Globals are noisy: positives and hard negatives lean towards the query's global the same way,
transitive positives and companions the same (weaker) way. A pair-wise model can find easy
positives but cannot tell a transitive positive from a companion; a list-wise model can. Used by
``benchmarks/synthetic_listwise.py`` and as a fast, file-free training source (smoke runs,
``torchrun`` checks).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from locore.rerank.locore.model import LocoreInputs

EASY, TRANSITIVE, HARD, COMPANION, RANDOM = range(5)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the generated lists."""

    dim: int = 32  # local descriptor width
    global_dim: int = 16  # global descriptor width
    num_local: int = 3  # locals per image
    easy: int = 2  # easy positives per list
    transitive: int = 2  # transitive positives per list (each linked to one easy positive)
    hard: int = 2  # hard negatives per list
    companions: int = 2  # negatives linked to hard negatives
    random: int = 4  # unrelated negatives
    easy_shared: int = 2  # locals an easy positive shares with the query
    hard_shared: int = 1  # locals a hard negative shares with the query
    link_shared: int = 1  # locals a transitive positive / companion shares with its partner
    local_noise: float = 0.1  # noise added to a shared descriptor (relative to unit norm)
    global_noise: float = 2.0  # noise of the global descriptors (relative to unit norm)

    @property
    def gallery(self) -> int:
        """Images per list."""
        return self.easy + self.transitive + self.hard + self.companions + self.random


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_list(spec: SyntheticSpec, seed: int, index: int) -> dict[str, np.ndarray]:
    """List ``index`` of the set ``seed``: query/gallery locals and globals, kinds ``[G]``."""
    rng = np.random.default_rng([seed, index])
    n, d = spec.num_local, spec.dim

    def fresh(k: int) -> np.ndarray:
        return _unit(rng.normal(size=(k, d)))

    def noisy(x: np.ndarray) -> np.ndarray:
        return _unit(x + spec.local_noise * rng.normal(size=x.shape) / np.sqrt(d))

    def sharing(source: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """An image with ``k`` noisy copies of ``source`` rows, and its other (private) rows."""
        own = fresh(n - k)
        picked = source[rng.choice(len(source), k, replace=False)]
        return rng.permutation(np.concatenate([noisy(picked), own])), own

    query = fresh(n)
    images, kinds, private = [], [], []
    for kind, count, shared in (
        (EASY, spec.easy, spec.easy_shared),
        (HARD, spec.hard, spec.hard_shared),
    ):
        for _ in range(count):
            image, own = sharing(query, shared)
            images.append(image)
            kinds.append(kind)
            private.append(own)
    links = (
        (TRANSITIVE, spec.transitive, 0, spec.easy),
        (COMPANION, spec.companions, spec.easy, spec.hard),
    )
    for kind, count, first, pool in links:
        for j in range(count):
            images.append(sharing(private[first + j % pool], spec.link_shared)[0])
            kinds.append(kind)
    for _ in range(spec.random):
        images.append(fresh(n))
        kinds.append(RANDOM)
    kinds_arr = np.array(kinds)
    centre = _unit(rng.normal(size=spec.global_dim))
    lean = np.select(
        [np.isin(kinds_arr, (EASY, HARD)), np.isin(kinds_arr, (TRANSITIVE, COMPANION))],
        [1.0, 0.6],
        0.0,
    )
    noise = spec.global_noise * rng.normal(size=(len(kinds), spec.global_dim))
    gallery_global = _unit(lean[:, None] * centre + noise / np.sqrt(spec.global_dim))
    order = np.argsort(-(gallery_global @ centre), kind="stable")  # a global shortlist's order
    return {
        "query_local": query.astype(np.float32),
        "query_global": centre.astype(np.float32),
        "gallery_local": np.stack(images)[order].astype(np.float32),
        "gallery_global": gallery_global[order].astype(np.float32),
        "kinds": kinds_arr[order],
    }


def positive(kinds: np.ndarray) -> np.ndarray:
    """Ground truth of gallery kinds."""
    return np.isin(kinds, (EASY, TRANSITIVE))


class SyntheticLists:
    """``count`` generated lists; ``batch`` shuffles each list by its draw (gallery shuffling)."""

    def __init__(self, spec: SyntheticSpec, count: int, seed: int, shuffle: bool = True):
        self.spec, self.seed, self.shuffle = spec, seed, shuffle
        self.lists = [make_list(spec, seed, i) for i in range(count)]

    def __len__(self) -> int:
        return len(self.lists)

    def batch(self, indices: np.ndarray, draws: np.ndarray | None = None) -> LocoreInputs:
        draws = np.zeros(len(indices), np.int64) if draws is None else draws
        picked = []
        for i, draw in zip(indices, draws):
            item = self.lists[int(i)]
            perm = (
                np.random.default_rng([self.seed, 1, int(draw)]).permutation(len(item["kinds"]))
                if self.shuffle
                else np.arange(len(item["kinds"]))
            )
            picked.append(
                {k: (v[perm] if k.startswith(("gallery", "kinds")) else v) for k, v in item.items()}
            )
        return _inputs(picked)


class SyntheticPairs:
    """The same lists cut into single query-candidate pairs (for the pair-wise model)."""

    def __init__(self, lists: SyntheticLists):
        self.lists = lists
        self.gallery = lists.spec.gallery

    def __len__(self) -> int:
        return len(self.lists) * self.gallery

    def batch(self, indices: np.ndarray, draws: np.ndarray | None = None) -> LocoreInputs:
        picked = []
        for i in indices:
            item = self.lists.lists[int(i) // self.gallery]
            j = [int(i) % self.gallery]
            picked.append(
                {k: (v[j] if k.startswith(("gallery", "kinds")) else v) for k, v in item.items()}
            )
        return _inputs(picked)


def _inputs(items: list[dict[str, np.ndarray]]) -> LocoreInputs:
    def stack(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([it[key] for it in items]))

    q, g = stack("query_local"), stack("gallery_local")
    return LocoreInputs(
        query_local=q,
        query_scales=torch.zeros(q.shape[:2], dtype=torch.int64),
        query_mask=torch.zeros(q.shape[:2], dtype=torch.bool),
        gallery_local=g,
        gallery_scales=torch.zeros(g.shape[:3], dtype=torch.int64),
        gallery_mask=torch.zeros(g.shape[:3], dtype=torch.bool),
        query_global=stack("query_global"),
        gallery_global=stack("gallery_global"),
        positive_mask=torch.from_numpy(np.stack([positive(it["kinds"]) for it in items])).long(),
    )
