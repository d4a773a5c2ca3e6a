"""Metrics: golden parity with the official revisitop code, hand-computed cases, properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locore.core.errors import UserError
from locore.engine.metrics import (
    PROTOCOLS,
    compute_ap,
    compute_map,
    compute_rectangular_ap,
    evaluate_metric_learning,
    evaluate_revisited,
    gldv2_map_at_100,
    map_at_r,
    paired_bootstrap,
    ranks_from_scores,
    recall_at_k,
    rerank_junk,
    revisited_protocols,
)


def _ap(column, ok, junk=(), **kw) -> float:
    return compute_map(np.array(column)[:, None], [{"ok": ok, "junk": list(junk)}], **kw)[1][0]


def _mpk(column, ok, junk=(), kappas=(1, 5, 10)) -> np.ndarray:
    return compute_map(np.array(column)[:, None], [{"ok": ok, "junk": list(junk)}], kappas)[2]


# ----------------------------------------------------------------------------------------------
# Golden parity (official revisitop compute_map @ be39832)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden(data_dir):
    data = json.loads((data_dir / "revisitop_small.json").read_text())
    return data, np.load(data_dir / "revisitop_small_ranks.npy")


def _expected_aps(expected: dict) -> np.ndarray:
    return np.array([np.nan if a is None else a for a in expected["aps"]])


def test_compute_map_matches_official(golden):
    data, ranks = golden
    protocols = revisited_protocols(data["gnd"])
    for name in PROTOCOLS:
        expected = data["results"][name]
        mean_ap, aps, mpr, prs = compute_map(ranks, protocols[name], data["kappas"])
        assert mean_ap == pytest.approx(expected["map"], abs=1e-9)
        np.testing.assert_allclose(aps, _expected_aps(expected), atol=1e-9)
        np.testing.assert_allclose(mpr, expected["mpr"], atol=1e-9)
        assert np.isnan(aps).tolist() == np.isnan(prs).any(axis=1).tolist()


def test_evaluate_revisited_matches_official(golden):
    data, ranks = golden
    result = evaluate_revisited(ranks, data["gnd"], data["kappas"])
    for name in PROTOCOLS:
        expected = data["results"][name]
        assert result[name]["map"] == pytest.approx(100 * expected["map"], abs=1e-7)
        np.testing.assert_allclose(result[name]["aps"], _expected_aps(expected), atol=1e-9)
        np.testing.assert_allclose(result[name]["mpk"], 100 * np.array(expected["mpr"]), atol=1e-7)
    # query 0 has no positives at all, query 1 no hard ones: excluded, not zero
    assert np.isnan(result["medium"]["aps"][0]) and np.isnan(result["hard"]["aps"][1])
    assert result["ranking"] == {"length": 200, "shortlist_only": False}


# ----------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------
def test_trapezoidal_ap_by_hand():
    # positives at 0-based positions 0 and 2 of ok = {5, 6}: (1 + 1)/2/2 + (1/2 + 2/3)/2/2
    assert _ap([5, 7, 6, 8], [5, 6]) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    assert compute_ap(np.array([0]), 1) == 1.0
    assert compute_ap(np.array([1]), 1) == pytest.approx((0 + 0.5) / 2)


def test_junk_before_a_positive_is_deleted():
    assert _ap([9, 5, 6], [5, 6], junk=[9]) == pytest.approx(1.0)
    # the same image not marked junk costs precision
    assert _ap([9, 5, 6], [5, 6]) == pytest.approx(((0 + 1 / 2) + (1 / 2 + 2 / 3)) / 4)


def test_junk_between_positives_is_deleted():
    assert _ap([5, 9, 6, 1], [5, 6], junk=[9]) == pytest.approx(1.0)
    # junk after a negative: positions 0, 3 -> 0, 2
    assert _ap([5, 1, 9, 6], [5, 6], junk=[9]) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)


def test_query_without_positives_is_excluded():
    ranks = np.array([[1, 2], [2, 1]])
    mean_ap, aps, mpr, prs = compute_map(ranks, [{"ok": []}, {"ok": [1]}], (1,))
    assert np.isnan(aps[0]) and np.isnan(prs[0, 0])
    assert aps[1] == pytest.approx((0 + 0.5) / 2)
    assert mean_ap == pytest.approx(aps[1]) and mpr[0] == pytest.approx(0.0)
    # every query empty: NaN, not a crash
    assert np.isnan(compute_map(ranks, [{"ok": []}, {"ok": []}])[0])


def test_all_junk_ranking():
    # every image above the positive is junk: a perfect ranking after deletion
    assert _ap([3, 4, 5, 6], [6], junk=[3, 4, 5]) == pytest.approx(1.0)
    # the ranking holds junk only: the positive was never retrieved
    assert _ap([3, 4, 5], [6], junk=[3, 4, 5]) == 0.0
    np.testing.assert_array_equal(_mpk([3, 4, 5], [6], junk=[3, 4, 5]), [0, 0, 0])


def test_truncated_ranking():
    # the missing positive contributes nothing; official n_res = len(ok) = 2
    assert _ap([5, 1, 2], [5, 6]) == pytest.approx(0.5)
    # the divisor never depends on the ranking length (the AMES/LOCORE min(len(ok), n_ranked)
    # would give 1.0 here); max_positives caps it independently of the ranking (GLDv2: 100)
    assert _ap([5], [5, 6]) == pytest.approx(0.5)
    assert _ap([5], [5, 6], max_positives=1) == pytest.approx(1.0)


def test_ties_are_broken_by_database_id():
    # query 0: ids 1 and 2 tie; the stable sort keeps id order, so negative 1 precedes positive 2
    scores = np.array([[0.1, 0.9, 0.9, 0.5, np.nan]])
    ranks = ranks_from_scores(scores)
    np.testing.assert_array_equal(ranks[:, 0], [1, 2, 3, 0, 4])
    assert _ap(ranks[:, 0], [2]) == pytest.approx((0 + 0.5) / 2)
    assert _ap(ranks[:, 0], [1]) == 1.0


def test_precision_at_k_denominator_rule():
    # 1-based positions 1 and 3: P@5 uses kq = min(max pos, 5) = 3 -> 2/3, not 2/5
    np.testing.assert_allclose(_mpk([1, 9, 2, 8, 7, 6], [1, 2]), [1.0, 2 / 3, 2 / 3])
    # positions 2 and 7: P@1 = 0/1, P@5 = 1/5, P@10 = 2/7 (kq = 7)
    column = [0, 1, 20, 21, 22, 23, 2, 24, 25, 26, 27]
    np.testing.assert_allclose(_mpk(column, [1, 2]), [0.0, 1 / 5, 2 / 7])
    # junk is deleted before P@k: positions 1, 3 with junk at 2 -> 1, 2
    np.testing.assert_allclose(_mpk([1, 9, 7, 2], [1, 2], junk=[7]), [1.0, 2 / 3, 2 / 3])


def test_rectangular_ap_and_gldv2_splits():
    # positives at 0-based ranks 1 and 3, three positives: (1/2 + 2/4) / 3
    assert compute_rectangular_ap(np.array([1, 3]), 3) == pytest.approx(1 / 3)
    assert _ap([0, 7, 1, 8], [7, 8, 9], ap="rectangular") == pytest.approx(1 / 3)
    n_db = 300
    ranks = np.tile(np.arange(n_db)[:, None], (1, 3))
    gnd = [
        {"ok": [0, 2]},  # AP (1 + 2/3) / 2
        {"ok": list(range(150))},  # 150 positives, all in the top 100: n_res = 100 -> AP 1
        {"ok": [100]},  # rank 100 is beyond the depth: AP 0
    ]
    out = gldv2_map_at_100(ranks, gnd, n_public=1)
    np.testing.assert_allclose(out["aps"], [(1 + 2 / 3) / 2, 1.0, 0.0])
    assert out["public"] == pytest.approx(100 * 5 / 6)
    assert out["private"] == pytest.approx(50.0)
    assert out["combined"] == pytest.approx(100 * (5 / 6 + 1) / 3)
    assert out["depth"] == 100 and out["n_queries_without_positives"] == 0
    with pytest.raises(UserError, match="n_public"):
        gldv2_map_at_100(ranks, gnd, n_public=5)


def test_gldv2_short_ranking_divides_by_positives_not_depth():
    # 120 positives, a 50-deep ranking holding 50 of them first: AP = 50 / min(120, 100) = 0.5,
    # not 50 / 50 = 1 (the 2x of issue #20)
    ranks = np.arange(200)[:50, None]
    gnd = [{"ok": list(range(120))}]
    with pytest.raises(UserError, match="shallow_ok"):
        gldv2_map_at_100(ranks, gnd, n_public=1)
    out = gldv2_map_at_100(ranks, gnd, n_public=1, shallow_ok=True)
    assert out["aps"][0] == pytest.approx(0.5) and out["depth"] == 50
    # a short ranking that already holds every positive cannot score differently deeper
    small = gldv2_map_at_100(np.array([[3, 1, 0, 2]]).T, [{"ok": [1, 0]}], 1)
    assert small["aps"][0] == pytest.approx((1 / 2 + 2 / 3) / 2) and small["depth"] == 4
    # queries without positives are excluded and counted
    two = gldv2_map_at_100(np.array([[0, 1], [1, 0]]), [{"ok": [0]}, {"ok": []}], n_public=1)
    assert two["combined"] == pytest.approx(100.0) and two["n_queries_without_positives"] == 1
    assert np.isnan(two["private"])


def test_map_at_r_standard_definition():
    # query label 0 with R = 3 relevant images (ids 0, 2, 3); ranking 0(A) 1(B) 2(A) 4(B) 3(A):
    # only the first R = 3 positions count, precision at relevant ones: (1 + 2/3) / 3 = 5/9.
    # (The non-standard helper of P25 would average P over all first R: (1 + 1/2 + 2/3) / 3.)
    db_labels = np.array([0, 1, 0, 0, 1])
    ranks = np.array([[0, 1, 2, 4, 3]]).T
    mean, aps = map_at_r(ranks, np.array([0]), db_labels)
    assert mean == pytest.approx(5 / 9) and aps[0] == pytest.approx(5 / 9)
    # self-retrieval: query 0 is database image 0; it is skipped and not counted in R = 2
    ranks = np.array([[0, 2, 3, 1, 4]]).T
    assert map_at_r(ranks, np.array([0]), db_labels, exclude_self=True)[0] == pytest.approx(1.0)
    ranks = np.array([[1, 0, 2, 3, 4]]).T  # after removing self: 1(B) 2(A) 3(A) -> (1/2)/2
    assert map_at_r(ranks, np.array([0]), db_labels, exclude_self=True)[0] == pytest.approx(0.25)
    with pytest.raises(UserError, match="MAP@R"):
        map_at_r(np.array([[1, 2]]).T, np.array([0]), db_labels)


def test_recall_at_k_with_and_without_self():
    db_labels = np.array([0, 0, 1, 1, 2])
    # queries are the database; columns are the rankings of queries 0..4 (self first)
    ranks = np.array(
        [[0, 1, 2, 3, 4], [2, 0, 3, 2, 0], [1, 2, 0, 4, 1], [3, 3, 1, 0, 2], [4, 4, 4, 1, 3]]
    )
    rec = recall_at_k(ranks, db_labels, db_labels, (1, 2), exclude_self=True)
    # without self: q0 ranks 2, 1, ... (first hit 2nd); q1 ranks 0 first, q2 ranks 3 first,
    # q3 ranks 2 first (hits at 1); q4 has no other label-2 image: excluded, not a miss
    np.testing.assert_allclose(rec, [3 / 4, 4 / 4])
    # counting self would make every query a hit at 1
    assert recall_at_k(ranks, db_labels, db_labels, (1,))[0] == 1.0
    with pytest.raises(UserError, match="Recall@5"):
        recall_at_k(ranks, db_labels, db_labels, (5,), exclude_self=True)
    out = evaluate_metric_learning(ranks, db_labels, db_labels, (1, 2), exclude_self=True)
    assert out["recall@1"] == pytest.approx(75.0) and out["n_queries_without_positives"] == 1
    # R = 1 for q0..q3: R-Precision = P@1 here, MAP@R too
    assert out["r_precision"] == pytest.approx(75.0) and out["map@r"] == pytest.approx(75.0)


# ----------------------------------------------------------------------------------------------
# Protocols, Hard vs Hard*, full vs shortlist ranking
# ----------------------------------------------------------------------------------------------
def test_protocols_with_numpy_fields_are_concatenated_not_added():
    # list + ndarray would broadcast-add (P18); the protocols must concatenate
    gnd = [{"easy": np.array([0, 1]), "hard": [2], "junk": np.array([3, 4])}]
    p = revisited_protocols(gnd)
    assert sorted(p["easy"][0]["junk"]) == [2, 3, 4]
    assert sorted(p["medium"][0]["ok"]) == [0, 1, 2]
    assert sorted(p["hard"][0]["junk"]) == [0, 1, 3, 4]
    perfect = np.array([[2, 0, 1, 3, 4, 5]]).T
    result = evaluate_revisited(perfect, gnd)
    assert result["medium"]["map"] == pytest.approx(100)
    assert result["hard"]["map"] == pytest.approx(100)
    assert result["easy"]["map"] == pytest.approx(100)  # hard image 2 is junk for Easy


def test_rerank_junk_hard_and_hard_star():
    gnd = [{"easy": np.array([0, 1]), "hard": [2], "junk": [3]}, {"easy": [], "hard": [4]}]
    assert rerank_junk(gnd, "hard") == [{3}, set()]
    assert rerank_junk(gnd, "hard*") == [{0, 1, 3}, set()]
    with pytest.raises(UserError, match="Hard setup"):
        rerank_junk(gnd, "medium*")


def test_full_ranking_required_unless_shortlist_only():
    gnd = [{"easy": [7], "hard": [1], "junk": []}]
    shortlist = np.array([[1, 2, 3]]).T  # easy positive 7 is beyond the shortlist
    with pytest.raises(UserError, match="shortlist_only"):
        evaluate_revisited(shortlist, gnd)
    result = evaluate_revisited(shortlist, gnd, shortlist_only=True)
    assert result["ranking"] == {"length": 3, "shortlist_only": True}
    assert result["medium"]["map"] == pytest.approx(50.0)  # 7 counts as never retrieved
    full = np.array([[1, 2, 3, 7]]).T
    assert evaluate_revisited(full, gnd)["medium"]["map"] == pytest.approx(
        100 * (1 + (1 / 3 + 2 / 4) / 2) / 2
    )


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="n_query"):
        compute_map(np.zeros((4, 2), int), [{"ok": [1]}])
    with pytest.raises(UserError, match="AP rule"):
        compute_map(np.zeros((4, 1), int), [{"ok": [1]}], ap="interpolated")


# ----------------------------------------------------------------------------------------------
# Paired bootstrap
# ----------------------------------------------------------------------------------------------
def test_paired_bootstrap_counts_and_degenerate_intervals():
    a = np.array([0.5, 0.2, np.nan, 0.9, 0.4])
    b = np.array([0.7, 0.2, np.nan, 0.8, 0.4])
    cmp = paired_bootstrap(a, b, resamples=2_000)
    assert (cmp.improved, cmp.unchanged, cmp.worsened) == (1, 2, 1)
    assert cmp.n_queries == 4 and cmp.excluded == 1
    assert cmp.delta == pytest.approx(0.1 / 4) and cmp.mean_b == pytest.approx(2.1 / 4)
    assert cmp.ci_low <= cmp.delta <= cmp.ci_high
    assert paired_bootstrap(a, b, resamples=2_000) == cmp  # seeded
    # a constant shift has a zero-width interval at the shift; identical runs at 0
    shifted = paired_bootstrap(a, a + 0.25)
    assert shifted.ci_low == pytest.approx(0.25) and shifted.ci_high == pytest.approx(0.25)
    assert shifted.significant and shifted.improved == 4
    same = paired_bootstrap(a, a)
    assert (same.ci_low, same.ci_high, same.unchanged) == (0.0, 0.0, 4) and not same.significant
    with pytest.raises(UserError, match="exclude different queries"):
        paired_bootstrap(a, np.array([0.7, 0.2, 0.1, 0.8, 0.4]))


def test_paired_bootstrap_matches_the_normal_interval():
    # 70 queries (Revisited): the percentile interval of the mean difference is close to
    # mean +- 1.96 sd / sqrt(n) (CLT); 10,000 resamples put its ends within 5 % of its width
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, 70)
    b = np.clip(a + rng.normal(0.01, 0.05, 70), 0, 1)
    cmp = paired_bootstrap(a, b)
    diff = b - a
    half = 1.96 * diff.std() / np.sqrt(diff.size)
    width = 2 * half
    assert cmp.ci_low == pytest.approx(diff.mean() - half, abs=0.05 * width)
    assert cmp.ci_high == pytest.approx(diff.mean() + half, abs=0.05 * width)
    assert cmp.resamples == 10_000 and cmp.confidence == 0.95
    # seeded: the same APs give the same interval, another seed a slightly different one
    assert paired_bootstrap(a, b) == cmp
    assert paired_bootstrap(a, b, seed=1).ci_low != cmp.ci_low


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------
@st.composite
def labelled_ranking(draw):
    n = draw(st.integers(3, 40))
    column = np.array(draw(st.permutations(range(n))))
    labels = draw(st.lists(st.sampled_from("pnj"), min_size=n, max_size=n))
    ok = [i for i in range(n) if labels[i] == "p"]
    junk = [i for i in range(n) if labels[i] == "j"]
    return column, ok, junk, draw(st.randoms(use_true_random=False))


@settings(max_examples=60, deadline=None)
@given(labelled_ranking())
def test_property_junk_order_and_placement(case):
    column, ok, junk, rnd = case
    base = _ap(column, ok, junk)
    # permuting which junk image sits in which junk slot changes nothing
    slots = np.flatnonzero(np.isin(column, junk))
    shuffled = column.copy()
    values = column[slots].tolist()
    rnd.shuffle(values)
    shuffled[slots] = values
    assert _ap(shuffled, ok, junk) == pytest.approx(base, nan_ok=True)
    # and junk removal equals deleting the junk images from the list
    kept = column[~np.isin(column, junk)]
    if kept.size:
        assert _ap(kept, ok) == pytest.approx(base, nan_ok=True)
    assert np.isnan(base) or 0.0 <= base <= 1.0 + 1e-12


@settings(max_examples=60, deadline=None)
@given(labelled_ranking())
def test_property_perfect_ranking_has_ap_one(case):
    column, ok, junk, rnd = case
    if not ok:
        return
    others = [i for i in column.tolist() if i not in ok]
    rnd.shuffle(others)
    # positives first (any order among them), junk and negatives anywhere after
    perfect = np.array(ok[::-1] + others)
    assert _ap(perfect, ok, junk) == pytest.approx(1.0)
    np.testing.assert_allclose(_mpk(perfect, ok, junk), 1.0)
    assert compute_rectangular_ap(np.arange(len(ok)), len(ok)) == pytest.approx(1.0)
    # interleaving junk among the positives keeps it perfect
    interleaved = np.array([x for pair in zip(junk, ok) for x in pair] + ok[len(junk) :])
    rest = [i for i in column.tolist() if i not in set(interleaved.tolist())]
    assert _ap(np.concatenate([interleaved, rest]).astype(int), ok, junk) == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=25))
def test_property_map_at_r_perfect_and_bounded(labels):
    db_labels = np.array(labels)
    n = db_labels.size
    # perfect self-retrieval ranking: self, then same-label images, then the rest
    columns = []
    for q in range(n):
        same = [i for i in range(n) if i != q and labels[i] == labels[q]]
        rest = [i for i in range(n) if i != q and labels[i] != labels[q]]
        columns.append([q, *same, *rest])
    ranks = np.array(columns).T
    mean, aps = map_at_r(ranks, db_labels, db_labels, exclude_self=True)
    assert np.all(np.isnan(aps) | np.isclose(aps, 1.0))
    reversed_ranks = np.concatenate([ranks[:1], ranks[1:][::-1]])
    _, worse = map_at_r(reversed_ranks, db_labels, db_labels, exclude_self=True)
    assert np.all(np.isnan(worse) | ((worse >= 0) & (worse <= 1 + 1e-12)))
