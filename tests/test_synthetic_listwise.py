"""The synthetic list generator: who shares descriptors with whom, seeding, scoring helpers."""

from __future__ import annotations

import numpy as np

from benchmarks.synthetic_listwise import mean_ap
from rerank.train.synthetic import (
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
