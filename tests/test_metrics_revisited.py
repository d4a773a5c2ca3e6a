"""Revisited mAP: golden parity with the official compute_map and hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.metrics import compute_ap, compute_map, evaluate_revisited, revisited_protocols


def test_golden_official_outputs(data_dir):
    golden = json.loads((data_dir / "revisitop_small.json").read_text())
    ranks = np.load(data_dir / "revisitop_small_ranks.npy")
    protocols = revisited_protocols(golden["gnd"])
    for name, expected in golden["results"].items():
        mean_ap, aps, mpr, _ = compute_map(ranks, protocols[name], golden["kappas"])
        assert mean_ap == pytest.approx(expected["map"], abs=1e-9)
        want = np.array([np.nan if a is None else a for a in expected["aps"]])
        np.testing.assert_allclose(aps, want, atol=1e-9)
        np.testing.assert_allclose(mpr, expected["mpr"], atol=1e-9)


def _ap(column, ok, junk=()):
    return compute_map(np.array(column)[:, None], [{"ok": ok, "junk": list(junk)}])[1][0]


def test_hand_computed_cases():
    # positives at positions 0 and 2 of 4: (1 + 1)/2/2 + (1/2 + 2/3)/2/2
    assert _ap([5, 7, 6, 8], [5, 6]) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # junk before a positive is deleted: same as a perfect ranking
    assert _ap([9, 5, 6], [5, 6], junk=[9]) == pytest.approx(1.0)
    # junk between positives: positions 0, 2 -> 0, 1
    assert _ap([5, 9, 6, 1], [5, 6], junk=[9]) == pytest.approx(1.0)
    # truncated ranking: the missing positive contributes nothing
    assert _ap([5, 1, 2], [5, 6]) == pytest.approx(0.5)
    # no positives: excluded (NaN), and the mean skips it
    mean_ap, aps, _, _ = compute_map(np.array([[1, 2], [2, 1]]), [{"ok": []}, {"ok": [1]}])
    assert np.isnan(aps[0]) and mean_ap == pytest.approx(0.5 * (0 / 1 + 1 / 2) + 0.5 * 0)
    # all junk but the positive: AP 1
    assert _ap([3, 4, 5, 6], [6], junk=[3, 4, 5]) == pytest.approx(1.0)


def test_precision_at_k_denominator_rule():
    # positives at 1-based positions 1 and 3: P@5 uses kq = min(max pos, 5) = 3 -> 2/3
    _, _, mpr, _ = compute_map(np.array([[1, 9, 2, 8, 7, 6]]).T, [{"ok": [1, 2]}], (1, 5, 10))
    np.testing.assert_allclose(mpr, [1.0, 2 / 3, 2 / 3])


def test_compute_ap_first_rank():
    assert compute_ap(np.array([0]), 1) == 1.0
    assert compute_ap(np.array([1]), 1) == pytest.approx(0.25)


def test_protocols_and_perfect_ranking():
    gnd = [{"easy": [0, 1], "hard": [2], "junk": [3]}]
    p = revisited_protocols(gnd)
    assert sorted(p["medium"][0]["ok"]) == [0, 1, 2] and sorted(p["hard"][0]["junk"]) == [0, 1, 3]
    perfect = np.array([[2, 0, 1, 3, 4]]).T
    result = evaluate_revisited(perfect, gnd)
    assert result["medium"]["map"] == pytest.approx(100)
    assert result["hard"]["map"] == pytest.approx(100)


def test_junk_order_does_not_matter():
    rng = np.random.default_rng(0)
    column = rng.permutation(30)
    gnd = {"ok": [1, 4, 7], "junk": [2, 3, 5, 8]}
    base = _ap(column, gnd["ok"], gnd["junk"])
    for _ in range(5):
        junk_slots = np.flatnonzero(np.isin(column, gnd["junk"]))
        shuffled = column.copy()
        shuffled[junk_slots] = rng.permutation(column[junk_slots])
        assert _ap(shuffled, gnd["ok"], gnd["junk"]) == pytest.approx(base)
