"""Sliding-window starts (reference-spec §6.6, P5) and the batched sliding re-rank."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locore.core.errors import UserError
from locore.rerank.sliding import STRATEGIES, sliding_rerank, window_starts


def official_starts(strategy: str, k: int, w: int, s: int) -> list[int]:
    """The official `eval_revisitop.py` lists, written from reference-spec §6.6."""
    forward = list(range(0, k - s, s))
    backward = list(range(k - w, -s, -s))
    return {
        "start-to-end": forward,
        "end-to-start": backward,
        "start-to-end-to-start": forward + backward[1:],
        "end-to-start-to-end": backward + forward[1:],
    }[strategy]


def test_official_settings_give_the_official_lists():
    assert window_starts("end-to-start", 400, 100, 50) == [300, 250, 200, 150, 100, 50, 0]
    assert window_starts("start-to-end", 400, 100, 50) == [0, 50, 100, 150, 200, 250, 300]
    assert len(window_starts("start-to-end-to-start", 400, 100, 50)) == 13
    assert len(window_starts("end-to-start-to-end", 400, 100, 50)) == 13
    assert window_starts(None, 400, 100, 50) == [0]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k,w,s", [(400, 100, 50), (200, 100, 50), (300, 60, 30), (60, 20, 10)])
def test_unchanged_wherever_the_official_loop_works(strategy, k, w, s):
    # The official loop is only correct for W = 2S and S dividing K - W (P5).
    assert window_starts(strategy, k, w, s) == official_starts(strategy, k, w, s)


def test_odd_sizes_are_clamped_deduplicated_and_cover_both_ends():
    # Official end-to-start with S = 40 would reach a negative start (P5).
    assert window_starts("end-to-start", 400, 100, 40) == [300, 260, 220, 180, 140, 100, 60, 20, 0]
    # Official start-to-end with S = 25 would run windows past K.
    assert window_starts("start-to-end", 400, 100, 25)[-1] == 300
    assert window_starts("start-to-end", 37, 10, 4) == [0, 4, 8, 12, 16, 20, 24, 27]
    assert window_starts("end-to-start-to-end", 37, 10, 4)[:3] == [27, 23, 19]
    for strategy in (*STRATEGIES, None):
        assert window_starts(strategy, 5, 10, 4) == [0]  # K < W: one window of K
        assert window_starts(strategy, 0, 10, 4) == []


@settings(max_examples=200, deadline=None)
@given(
    strategy=st.sampled_from(STRATEGIES),
    k=st.integers(1, 120),
    w=st.integers(1, 40),
    s=st.integers(1, 50),
)
def test_starts_are_valid_for_any_sizes(strategy, k, w, s):
    starts = window_starts(strategy, k, w, s)
    last = max(k - w, 0)
    assert all(0 <= a <= last for a in starts)
    assert {0, last} <= set(starts)
    assert all(a != b for a, b in zip(starts, starts[1:]))  # no window twice in a row
    ends = {"start": starts[0], "end": starts[-1]}
    if strategy in ("start-to-end", "end-to-start-to-end"):
        assert ends["end"] == last
    else:
        assert ends["end"] == 0
    if s <= w:  # strides no longer than the window leave no position unscored
        covered = np.zeros(k, bool)
        for a in starts:
            covered[a : a + w] = True
        assert covered.all()


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="unknown sliding strategy"):
        window_starts("top-down", 10, 5, 2)
    with pytest.raises(UserError, match="at least 1"):
        window_starts("end-to-start", 10, 5, 0)


class DiversityScorer:
    """A context-dependent stand-in list model: relevance minus similarity to the rest of the list.

    The same image scores differently in different windows, so the order of windows matters and a
    wrong batching or write-back shows up in the ranking.
    """

    def __init__(self, num_queries: int, num_db: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.q = rng.normal(size=(num_queries, 8))
        self.x = rng.normal(size=(num_db, 8))
        self.x /= np.linalg.norm(self.x, axis=1, keepdims=True)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        self.calls.append(ids.shape)
        v = self.x[ids]  # [B, G, 8]
        gram = np.einsum("bgd,bhd->bgh", v, v)
        np.einsum("bgg->bg", gram)[:] = -np.inf  # writable diagonal view: exclude self
        crowd = gram.max(-1) if ids.shape[1] > 1 else np.zeros(ids.shape)
        return 5 * np.einsum("bd,bgd->bg", self.q[rows], v) - 3 * crowd


def per_query_reference(ids, sims, scorer, lengths, strategy, w, s, alpha, temp):
    """The official per-query loop (§6.6) with the generalised starts, one query at a time."""
    out = ids.copy()
    for q in range(ids.shape[0]):
        k = int(lengths[q])
        order = list(range(ids.shape[1]))
        for a in window_starts(strategy, k, w, s):
            sel = order[a : a + min(w, k)]
            x = scorer(np.array([q]), ids[q, sel][None])[0]
            fused = alpha * sims[q, sel] + (1 - alpha) / (1 + np.exp(-temp * x))
            ranked = sorted(range(len(sel)), key=lambda i: -fused[i])  # stable
            order[a : a + len(sel)] = [sel[i] for i in ranked]
        out[q] = ids[q, order]
    return out


def random_shortlists(num_q: int, num_m: int, num_db: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(num_db)[:num_m] for _ in range(num_q)]).astype(np.int64)
    sims = np.sort(rng.uniform(0.3, 0.9, size=(num_q, num_m)), axis=1)[:, ::-1].copy()
    return ids, sims


@pytest.mark.parametrize("strategy", [*STRATEGIES, None])
@pytest.mark.parametrize("k,w,s", [(37, 10, 4), (5, 10, 4), (40, 10, 5), (23, 7, 9)])
def test_batched_equals_the_per_query_loop(strategy, k, w, s):
    num_q, num_m = 7, 45
    ids, sims = random_shortlists(num_q, num_m, 300)
    scorer = DiversityScorer(num_q, 300)
    lengths = np.array([k, k, k - 2, k, 0, k, k - 1]).clip(0)
    expected = per_query_reference(ids, sims, scorer, lengths, strategy, w, s, 0.3, 0.7)
    for batch_size in (1, 3, num_q):
        got, scores = sliding_rerank(
            ids, sims, scorer, lengths=lengths, strategy=strategy, window=w, stride=s,
            alpha=0.3, temp=0.7, batch_size=batch_size,
        )  # fmt: skip
        np.testing.assert_array_equal(got, expected)
        # Entries past each query's length keep their place and their similarity.
        for q, n in enumerate(lengths):
            np.testing.assert_array_equal(got[q, n:], ids[q, n:])
            np.testing.assert_array_equal(scores[q, n:], sims[q, n:])
            assert sorted(got[q, :n]) == sorted(ids[q, :n])


def test_windows_of_many_queries_share_a_model_call():
    ids, sims = random_shortlists(6, 40, 100)
    scorer = DiversityScorer(6, 100)
    sliding_rerank(ids, sims, scorer, strategy="end-to-start", window=10, stride=5, batch_size=4)
    starts = window_starts("end-to-start", 40, 10, 5)
    assert scorer.calls == [(4, 10), (2, 10)] * len(starts)


def test_a_strong_image_climbs_from_the_bottom_only_with_end_to_start():
    num_m, target = 400, 399
    ids = np.arange(num_m)[None]
    sims = np.linspace(0.9, 0.8, num_m)[None]

    def scorer(rows, window_ids):
        return np.where(window_ids == target, 100.0, 0.0)

    def position(strategy):
        got, _ = sliding_rerank(ids, sims, scorer, strategy=strategy, window=100, stride=50)
        return int(np.flatnonzero(got[0] == target)[0])

    assert position("end-to-start") == 0
    assert position("start-to-end") == 300
    assert position("start-to-end-to-start") == 0
    assert position(None) == target  # outside the single window: untouched


def test_scorer_with_wrong_shape_is_reported():
    ids, sims = random_shortlists(2, 20, 50)
    with pytest.raises(ValueError, match="scorer returned"):
        sliding_rerank(ids, sims, lambda r, i: np.zeros((len(r), 3)), window=10, stride=5)
