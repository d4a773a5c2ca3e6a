"""Lists without subjects (``data.source: pasted``): positives made by pasting the query's locals.

Supervised lists teach a re-ranker the training subjects as much as comparing, and with few
subjects it learns the subjects (rerank/checkpoints/locore_offline/MODEL_CARD.md). Here every
list takes a random query image of an extraction and ``list_length`` other random images of it,
and pastes noisy copies of locals into each gallery image (``paste`` of its valid rows):

* positives (1 to ``max_positives``): every pasted row is one of the query's locals;
* hard negatives (``hard``): ``hard_paste`` of them are the query's, the rest another image's;
* other negatives: all from another image.

Every gallery image carries pasted rows, so being pasted is no cue (a first version that pasted
only into positives was learnt from that alone); only matching them to the query tells a
positive, and no subject, photo or label is left to memorise. A pasted row is
``normalise(source + sigma * noise / sqrt(D))`` with ``sigma`` drawn from ``noise`` (cosine to
its source about 0.55-0.9 at the default). Globals lean towards the query's: ``normalise(g +
lean * g_query)`` with ``lean`` from ``lean_positive`` for positives and hard negatives and from
``lean_negative`` for the rest, so the global similarity helps a little and matching decides.
All draws of list ``draw`` come from a generator seeded by ``(seed, draw)`` (resumable).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from locore.indexing.local_store import LocalStore
from locore.rerank.locore.model import LocoreInputs


@dataclasses.dataclass(frozen=True)
class PastedSpec:
    """How the lists are made (ranges are inclusive)."""

    max_positives: int = 8  # positives per list: 1 .. this
    hard: int = 4  # hard negatives per list
    paste: tuple[int, int] = (8, 32)  # pasted rows per gallery image
    hard_paste: tuple[int, int] = (1, 4)  # of which the query's, in a hard negative
    noise: tuple[float, float] = (0.5, 1.5)  # sigma of a pasted row's noise
    lean_positive: tuple[float, float] = (0.2, 1.0)  # global lean, positives and hard negatives
    lean_negative: tuple[float, float] = (0.0, 0.8)  # global lean, other negatives


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class PastedLists:
    """``count`` lists of ``list_length`` images over one extraction (the :class:`Lists`
    protocol of :mod:`rerank.train.data`); ``use_global`` False leaves the globals out of the
    batches, as ``data.use_global`` does for the other sources."""

    def __init__(
        self,
        store: LocalStore,
        globals_: np.ndarray,
        count: int,
        list_length: int,
        num_local: int,
        seed: int = 0,
        spec: PastedSpec = PastedSpec(),
        use_global: bool = True,
    ):
        self.store, self.globals = store, globals_
        self.count, self.length, self.num_local = count, list_length, num_local
        self.seed, self.spec, self.use_global = seed, spec, use_global

    def __len__(self) -> int:
        return self.count

    def make(self, draw: int) -> dict[str, np.ndarray]:
        """List ``draw``: query and gallery locals, masks, globals and ``labels`` ``[G]``."""
        spec, rng = self.spec, np.random.default_rng([self.seed, draw])
        n_images, g = len(self.store), self.length
        query = int(rng.integers(n_images))
        others_all = np.delete(np.arange(n_images), query)  # donors, too: never the query
        others = rng.choice(others_all, g, replace=False)
        donors = rng.choice(others_all, g)  # whose locals fill gallery image j's other pastes
        # One read of the list's images: [query, gallery (G), donors (G)].
        read = self.store.gather(np.concatenate([[query], others, donors])[None], self.num_local)
        all_desc, all_scales, all_mask = read.descriptors[0], read.scales[0], read.mask[0]
        q_desc, q_scales, q_mask = all_desc[0], all_scales[0], all_mask[0]
        q_valid = np.flatnonzero(~q_mask)
        desc, scales, mask = all_desc[1 : g + 1].copy(), all_scales[1 : g + 1], all_mask[1 : g + 1]
        positives = int(rng.integers(1, spec.max_positives + 1))
        hard_end = min(positives + spec.hard, g)
        for j in range(g):
            rows = np.flatnonzero(~mask[j])
            k = min(int(rng.integers(spec.paste[0], spec.paste[1] + 1)), len(rows))
            if j < positives:
                from_query = k
            elif j < hard_end:
                from_query = int(rng.integers(spec.hard_paste[0], spec.hard_paste[1] + 1))
            else:
                from_query = 0
            from_query = min(from_query, k, len(q_valid))
            donor = all_desc[g + 1 + j][~all_mask[g + 1 + j]]
            take = k - from_query
            sources = np.concatenate(
                [
                    q_desc[rng.choice(q_valid, from_query, replace=False)],
                    donor[rng.choice(len(donor), take, replace=len(donor) < take)],
                ]
            )
            sigma = rng.uniform(*spec.noise, size=(k, 1))
            noise = rng.normal(size=sources.shape) / np.sqrt(sources.shape[1])
            desc[j, rng.choice(rows, k, replace=False)] = _unit(sources + sigma * noise)
        labels = (np.arange(g) < positives).astype(np.int64)
        lean = np.where(
            np.arange(g) < hard_end,
            rng.uniform(*spec.lean_positive, size=g),
            rng.uniform(*spec.lean_negative, size=g),
        )
        q_global = self.globals[query].astype(np.float32)
        g_global = _unit(self.globals[others] + lean[:, None] * q_global[None])
        order = rng.permutation(g)  # no position tells a positive
        return {
            "query_local": q_desc,
            "query_scales": q_scales,
            "query_mask": q_mask,
            "gallery_local": desc[order],
            "gallery_scales": scales[order],
            "gallery_mask": mask[order],
            "query_global": q_global,
            "gallery_global": g_global[order].astype(np.float32),
            "labels": labels[order],
        }

    def batch(self, indices: np.ndarray, draws: np.ndarray | None = None) -> LocoreInputs:
        """Lists drawn at ``draws`` (default: at ``indices``) as one :class:`LocoreInputs`."""
        draws = np.asarray(indices if draws is None else draws)
        lists = [self.make(int(d)) for d in draws]

        def stack(key: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([item[key] for item in lists]))

        return LocoreInputs(
            query_local=stack("query_local").float(),
            query_scales=stack("query_scales").long(),
            query_mask=stack("query_mask"),
            gallery_local=stack("gallery_local").float(),
            gallery_scales=stack("gallery_scales").long(),
            gallery_mask=stack("gallery_mask"),
            query_global=stack("query_global") if self.use_global else None,
            gallery_global=stack("gallery_global") if self.use_global else None,
            positive_mask=stack("labels"),
        )
