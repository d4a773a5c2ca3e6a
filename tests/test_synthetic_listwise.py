"""The synthetic list generator: who shares descriptors with whom, seeding, scoring helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locore.benchmarks.synthetic_listwise import mean_ap, run_benchmark
from locore.rerank.train.synthetic import (
    COMPANION,
    EASY,
    HARD,
    RANDOM,
    TRANSITIVE,
    SyntheticLists,
    SyntheticPairs,
    SyntheticSpec,
    make_list,
)

SPEC = SyntheticSpec()


def _shared(a: np.ndarray, b: np.ndarray) -> int:
    """Locals of ``a`` that are noisy copies of some local of ``b``."""
    return int(((a @ b.T).max(1) > 0.7).sum())


def test_each_kind_shares_what_it_should():
    for index in range(20):
        item = make_list(SPEC, seed=3, index=index)
        q, g, kinds = item["query_local"], item["gallery_local"], item["kinds"]
        with_query = np.array([_shared(img, q) for img in g])
        assert (with_query[kinds == EASY] == SPEC.easy_shared).all()
        assert (with_query[kinds == HARD] == SPEC.hard_shared).all()
        assert (with_query[np.isin(kinds, (TRANSITIVE, COMPANION, RANDOM))] == 0).all()
        for j in np.flatnonzero(kinds == TRANSITIVE):
            partners = [k for k in range(len(g)) if k != j and _shared(g[j], g[k])]
            assert {kinds[k] for k in partners} == {EASY}  # linked to an easy positive only
        for j in np.flatnonzero(kinds == COMPANION):
            partners = [k for k in range(len(g)) if k != j and _shared(g[j], g[k])]
            assert {kinds[k] for k in partners} == {HARD}


def test_lists_are_seeded_and_shuffled_per_draw():
    a, b = SyntheticLists(SPEC, 4, seed=1), SyntheticLists(SPEC, 4, seed=1)
    x, y = a.batch(np.array([2]), np.array([5])), b.batch(np.array([2]), np.array([5]))
    assert all(
        np.array_equal(getattr(x, f), getattr(y, f)) for f in ("gallery_local", "positive_mask")
    )
    z = a.batch(np.array([2]), np.array([6]))
    assert not np.array_equal(x.positive_mask, z.positive_mask) or not np.array_equal(
        x.gallery_local, z.gallery_local
    )
    assert int(x.positive_mask.sum()) == SPEC.easy + SPEC.transitive
    pairs = SyntheticPairs(a)
    assert len(pairs) == 4 * SPEC.gallery
    p = pairs.batch(np.arange(SPEC.gallery))
    assert (
        p.gallery_local.shape[1] == 1 and int(p.positive_mask.sum()) == SPEC.easy + SPEC.transitive
    )


def test_mean_ap_overall_and_transitive():
    kinds = np.array([[EASY, TRANSITIVE, RANDOM, HARD]])
    perfect = mean_ap(np.array([[4.0, 3, 2, 1]]), kinds)
    assert perfect == (1.0, 1.0)
    # Transitive ranked after both negatives: easy positives are left out of its ranking.
    overall, transitive = mean_ap(np.array([[4.0, 1, 3, 2]]), kinds)
    assert transitive < 0.5 and overall < 1.0


@pytest.fixture
def one_thread():
    """Models this small train several times faster on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # 203 s on 2 cores: run with -m slow (the full proof is `locore bench listwise`)
def test_listwise_beats_pairwise_and_global(tmp_path, one_thread):
    """The short version of ``locore bench listwise``: smaller lists, 3,000 steps per model.

    Only LoCoRe sees the easy positive that links a transitive positive to the query, so it must
    rank best overall. At this budget LoCoRe has only just left the constant prior (measured:
    mAP 74.2 vs pair-wise 64.4 and global 70.2; transitive 42.7 vs 45.1 and 43.5), so the margin
    on transitive positives is left to the full benchmark (benchmarks/results/training.md).
    """
    spec = SyntheticSpec(easy=2, transitive=2, hard=1, companions=1, random=2, global_noise=1.0)
    r = run_benchmark(tmp_path, steps=3000, train_lists=2000, test_lists=200, spec=spec)
    maps = {k: (r[k]["map"], r[k]["map_transitive"]) for k in ("global", "pairwise", "locore")}
    assert maps["locore"][0] > maps["pairwise"][0] + 0.02, maps
    assert maps["locore"][0] > maps["global"][0] + 0.02, maps
