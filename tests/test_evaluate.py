"""``locore eval`` internals: the one gnd reader, full-database rankings that do not depend on
file order (issue #16), and the printed comparison (issue #20)."""

from __future__ import annotations

import csv
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from locore.core.errors import UserError
from locore.engine.evaluate import (
    FULL_RANKING,
    EvalReport,
    GlobalOrder,
    _descending,
    format_metrics,
    index_to_imlist,
    load_gnd,
    shortlist_ranks,
    write_report,
)
from locore.engine.metrics import (
    PROTOCOLS,
    Placements,
    evaluate_revisited,
    labelled,
    paired_bootstrap,
)


# ----------------------------------------------------------------------------------------------
# Rankings
# ----------------------------------------------------------------------------------------------
def _append_ranks(ids, index_to_imlist, num_db):
    """The former rule: the shortlist, then every other id in ground-truth order (what put all
    of ROxf ahead of the +1M distractors), as the contrast to the exact global order."""
    ranks = np.empty((num_db, ids.shape[0]), dtype=np.int64)
    for q in range(ids.shape[0]):
        mapped = index_to_imlist[ids[q][ids[q] >= 0]]
        head = mapped[mapped >= 0]
        ranks[:, q] = np.concatenate([head, np.setdiff1d(np.arange(num_db), head)])
    return ranks


def test_shortlist_heads_keep_valid_ids_in_order():
    rng = np.random.default_rng(0)
    n_index, num_db = 60, 50
    # index ids 50..59 are not in the ground truth; the index order is shuffled
    mapping = rng.permutation(np.concatenate([np.arange(num_db), np.full(10, -1)]))
    ids = np.stack([rng.permutation(n_index)[:12] for _ in range(5)])
    ids[1, 7:] = -1  # a short shortlist
    # head-only view: the valid ids in order, -1 after
    heads = shortlist_ranks(ids, mapping)
    assert heads.shape == (12, 5)
    valid = mapping[ids[1, :7]]
    np.testing.assert_array_equal(heads[: (valid >= 0).sum(), 1], valid[valid >= 0])
    assert (heads[(valid >= 0).sum() :, 1] == -1).all()
    with pytest.raises(UserError, match="twice"):
        shortlist_ranks(np.array([[3, 3]]), np.arange(num_db))


def _collection(seed: int, n_data: int = 40, n_distractors: int = 400, n_query: int = 6):
    """Descriptors of a dataset (each query has positives among its images) and distractors;
    returned in "dataset first" ground-truth id order."""
    rng = np.random.default_rng(seed)
    dim = 16
    db = rng.normal(size=(n_data + n_distractors, dim)).astype(np.float32)
    queries = rng.normal(size=(n_query, dim)).astype(np.float32)
    gnd = []
    for q in range(n_query):
        ok = rng.choice(n_data, 6, replace=False)
        # positives resemble the query to different degrees, some less than many distractors
        db[ok] = queries[q] * rng.uniform(0.05, 1.0, (6, 1)) + 0.5 * db[ok]
        gnd.append({"easy": ok[:3].tolist(), "hard": ok[3:].tolist(), "junk": []})
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries, db, gnd


def _evaluate(queries, db_index, to_eval, num_eval, gnd, topk, how):
    """First stage = exact top-k in the index, then a full ranking as ``how`` builds it."""
    ids = np.argsort(-(queries @ db_index.T), axis=1, kind="stable")[:, :topk]
    if how == "similarity":
        ranks = GlobalOrder(queries, db_index, to_eval, num_eval, block=37).place(
            ids, labelled(gnd)
        )
    else:
        ranks = _append_ranks(ids, to_eval, num_eval)
    result = evaluate_revisited(ranks, gnd)
    return {p: result[p]["map"] for p in PROTOCOLS}


def test_full_ranking_does_not_depend_on_where_distractors_sit():
    queries, db, gnd = _collection(1)
    n_total, n_data, topk = db.shape[0], 40, 10
    rng = np.random.default_rng(2)
    # ground-truth ids, dataset first (the official +1M layout) ...
    first = np.arange(n_total)
    # ... or distractors first: dataset image i gets id n_distractors + i
    moved = np.concatenate([np.arange(n_data) + n_total - n_data, np.arange(n_total - n_data)])
    moved_gnd = [{k: (moved[v]).tolist() for k, v in g.items()} for g in gnd]
    results = {}
    for how in ("similarity", "append"):
        for label, to_eval, g in (("first", first, gnd), ("moved", moved, moved_gnd)):
            # and the index holds the images in yet another (shuffled) order
            order = rng.permutation(n_total)
            results[how, label] = _evaluate(
                queries, db[order], to_eval[order], n_total, g, topk, how
            )
    for proto in PROTOCOLS:
        assert results["similarity", "first"][proto] == pytest.approx(
            results["similarity", "moved"][proto], rel=1e-12
        )
    # the former appending in ground-truth order is what moved: with the dataset first, every
    # positive past the shortlist sits ahead of all distractors (inflated)
    assert results["append", "first"]["medium"] > results["append", "moved"]["medium"] + 1
    assert results["append", "first"]["medium"] > results["similarity", "first"]["medium"] + 1


def test_full_ranking_is_head_then_exact_similarity():
    queries, db, gnd = _collection(3, n_data=20, n_distractors=30, n_query=2)
    sims = queries @ db.T
    shortlist = np.array([[5, 9, 1, -1], [0, 2, 4, 6]])
    mapping = np.arange(db.shape[0])
    mapping[7] = -1  # index entry 7 is not in the ground truth
    order = GlobalOrder(queries, db, mapping, db.shape[0], block=8)
    ranks = order.ranks(shortlist)
    assert ranks.shape == (db.shape[0], 2)
    np.testing.assert_array_equal(ranks[:3, 0], [5, 9, 1])
    rest = ranks[3:, 0]
    # the rest by descending exact similarity; 7 has no descriptor in ground-truth space: last
    assert rest[-1] == 7
    assert (np.diff(sims[0, rest[:-1]]) <= 0).all()
    assert sorted(ranks[:, 0].tolist()) == list(range(db.shape[0]))
    # a memmap in blocks gives the same as one block
    again = GlobalOrder(queries, db, mapping, db.shape[0], block=10_000)
    np.testing.assert_array_equal(ranks, again.ranks(shortlist))


@pytest.mark.parametrize("seed", range(4))
def test_placements_are_the_positions_in_the_dense_full_ranking(seed):
    """``GlobalOrder.place`` (no 1M-long ranking) puts every wanted id where the dense
    shortlist-then-global ranking has it: with tied similarities, index entries outside the
    ground truth, ground-truth images without a descriptor, -1 padding, shortlists of any
    length (empty included) and wanted ids inside and outside the shortlist."""
    rng = np.random.default_rng(seed)
    n_index, n_eval, n_query = 300, 320, 5
    # coarse values: many exact ties, broken by ground-truth id
    db = rng.integers(-3, 4, size=(n_index, 4)).astype(np.float32)
    queries = rng.integers(-3, 4, size=(n_query, 4)).astype(np.float32)
    mapping = rng.permutation(n_eval)[:n_index]  # 20 evaluated images have no descriptor
    mapping[rng.choice(n_index, 10, replace=False)] = -1  # 10 index entries not evaluated
    ids = np.full((n_query, 40), -1)
    for q in range(n_query):
        length = [0, 1, 17, 40, 33][q]
        ids[q, :length] = rng.choice(n_index, length, replace=False)
    wanted = [rng.choice(n_eval, 25, replace=False) for _ in range(n_query)]
    order = GlobalOrder(queries, db, mapping, n_eval, block=64)
    dense = order.ranks(ids)
    assert sorted(dense[:, 0]) == list(range(n_eval))
    placed, reference = order.place(ids, wanted), Placements.of(dense, wanted)
    for q in range(n_query):
        np.testing.assert_array_equal(placed.ids[q], reference.ids[q])
        np.testing.assert_array_equal(placed.pos[q], reference.pos[q])
    assert placed.length == reference.length == n_eval


def test_descending_order_is_the_stable_argsort():
    rng = np.random.default_rng(4)
    sims = rng.choice(np.float32([0.5, -0.25, 0.0, -0.0, 1.0, -np.inf, np.nan]), 5_000)
    sims[:1000] = rng.normal(size=1000)
    # ties by id; -0.0 ties with 0.0; -inf and NaN last
    np.testing.assert_array_equal(_descending(sims), np.argsort(-sims, kind="stable"))


# ----------------------------------------------------------------------------------------------
# The one gnd reader (issue #14)
# ----------------------------------------------------------------------------------------------
GOOD = {
    "imlist": ["a", "b", "c"],
    "qimlist": ["q0", "q1"],
    "gnd": [
        {"bbx": [1, 2, 3, 4], "easy": np.array([0]), "hard": [1], "junk": []},
        {"bbx": None, "easy": [], "hard": (2,), "junk": [0]},
    ],
}


def _write(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


def test_load_gnd_normalises(tmp_path):
    gt = load_gnd(_write(tmp_path / "gnd.pkl", GOOD))
    assert gt["imlist"] == ["a", "b", "c"] and gt["qimlist"] == ["q0", "q1"]
    assert gt["gnd"][0] == {"bbx": (1.0, 2.0, 3.0, 4.0), "easy": [0], "hard": [1], "junk": []}
    assert gt["gnd"][1] == {"bbx": None, "easy": [], "hard": [2], "junk": [0]}
    json.dumps(gt)  # plain types only


def _without(key):
    return {**GOOD, "gnd": [{k: v for k, v in g.items() if k != key} for g in GOOD["gnd"]]}


def _entry(q: int, **fields) -> bytes:
    """GOOD with ``fields`` replaced in query q's entry, pickled."""
    gnd = [{**g, **fields} if i == q else g for i, g in enumerate(GOOD["gnd"])]
    return pickle.dumps({**GOOD, "gnd": gnd})


BAD = {
    "garbage": b"\x00\x01 this is not a pickle",
    "truncated": pickle.dumps(GOOD)[:40],
    "json": json.dumps({"imlist": ["a"], "qimlist": [], "gnd": []}).encode(),
    "an int": pickle.dumps(7),
    "no qimlist": pickle.dumps({"imlist": ["a"], "gnd": []}),
    "fewer entries": pickle.dumps({**GOOD, "gnd": GOOD["gnd"][:1]}),
    "no hard": pickle.dumps(_without("hard")),
    "an id outside imlist": _entry(1, easy=[9]),
    "names, not ids": _entry(1, junk=["a"]),
    "a 3-number box": _entry(0, bbx=[1, 2, 3]),
}
MESSAGES = {
    "garbage": "cannot be read",
    "truncated": "cannot be read",
    "json": "cannot be read",
    "an int": "holds a int",
    "no qimlist": "no 'qimlist'",
    "fewer entries": "1 gnd entries for 2 queries",
    "no hard": r"query 0 \(q0\) has no 'hard'",
    "an id outside imlist": "easy id 9 outside the 3-image imlist",
    "names, not ids": "'junk' is not a list of image ids",
    "a 3-number box": "bbx is not four numbers",
}


@pytest.mark.parametrize("case", BAD)
def test_bad_gnd_is_one_line_naming_the_file(tmp_path, case):
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(BAD[case])
    with pytest.raises(UserError, match=MESSAGES[case]) as err:
        load_gnd(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_missing_gnd_and_unindexed_images(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_gnd(tmp_path / "nope.pkl")
    names = ["sub/b.jpg", "c.png", "extra.jpg"]
    with pytest.raises(UserError, match=r"1 of 3 imlist images .* \(first: a\)"):
        index_to_imlist(names, ["a", "sub/b", "c"], Path("gnd.pkl"))
    mapping = index_to_imlist([*names, "a.jpg"], ["a", "sub/b", "c"], Path("gnd.pkl"))
    np.testing.assert_array_equal(mapping, [1, 2, -1, 0])


# ----------------------------------------------------------------------------------------------
# The printed comparison
# ----------------------------------------------------------------------------------------------
def test_format_metrics_prints_the_paired_comparison(tmp_path):
    rng = np.random.default_rng(0)
    before = {p: rng.uniform(0, 100, 70) for p in PROTOCOLS}
    after = {p: np.clip(v + rng.normal(2, 3, 70), 0, 100) for p, v in before.items()}
    before["hard"][:2] = after["hard"][:2] = np.nan  # two queries without hard positives
    after["easy"][:5] = before["easy"][:5]
    summary = {
        name: {
            p: {
                "map": float(np.nanmean(aps[p])),
                "mp@k": [0.0, 0.0, 0.0],
                "n_queries_without_positives": int(np.isnan(aps[p]).sum()),
            }
            for p in PROTOCOLS
        }
        for name, aps in (("before", before), ("after", after))
    }
    comparison = {p: dataclasses.asdict(paired_bootstrap(before[p], after[p])) for p in PROTOCOLS}
    report = EvalReport(
        summary["before"], summary["after"], 70, 5000, 100, ["locore"], [], FULL_RANKING,
        comparison,
    )  # fmt: skip
    lines = format_metrics(report).splitlines()
    assert FULL_RANKING in lines[0]
    assert "95 % paired bootstrap CI, 10,000 resamples, seed 0" in lines[4]
    easy = comparison["easy"]
    assert lines[5].split() == [
        "Easy",
        f"{easy['delta']:+.2f}",
        f"[{easy['ci_low']:+.2f},",
        f"{easy['ci_high']:+.2f}]",
        str(easy["improved"]),
        "/",
        "5",
        "/",
        str(easy["worsened"]),
    ]
    assert comparison["hard"]["n_queries"] == 68 and comparison["hard"]["excluded"] == 2
    assert (
        lines[-1] == "queries without positives, excluded from the means: easy 0, medium 0, hard 2"
    )
    # the same numbers in metrics.json and metrics.csv
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["comparison"]["easy"] == pytest.approx(easy)
    assert saved["ranking"] == FULL_RANKING
    assert saved["before"]["hard"]["n_queries_without_positives"] == 2
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["global", "locore"]
    assert rows[0]["easy_delta"] == "" and int(rows[1]["easy_unchanged"]) == 5
    assert float(rows[1]["hard_ci_low"]) == pytest.approx(comparison["hard"]["ci_low"])
    assert float(rows[1]["medium_map"]) == pytest.approx(summary["after"]["medium"]["map"])
