"""SuperGlobal re-ranking (superglobal-delg-spec §1.5): golden parity, hand cases, invariances."""

import json

import numpy as np
import pytest
import torch

from locore import rerank
from locore.core.errors import UserError
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Database, Queries
from locore.rerank.chain import build_chain
from locore.rerank.superglobal import SuperGlobalReranker, superglobal_scores


@pytest.fixture(scope="module")
def golden(data_dir):
    """The official MDescAug + RerankwMDA (SuperGlobal @ 8694696) run in float64 with M 400, K 9,
    beta 0.15 on 900 clustered random unit descriptors (D 32) and 6 queries."""
    meta = json.loads((data_dir / "superglobal_small.json").read_text())
    with np.load(data_dir / "superglobal_small.npz") as z:
        return meta, {k: z[k] for k in z.files}


def shortlist_of(query: np.ndarray, db: np.ndarray, ids: np.ndarray) -> Shortlist:
    sims = np.take_along_axis(query @ db.T, ids, 1)
    return Shortlist(ids=ids.astype(np.int64), sims=sims.astype(np.float32))


def golden_close(actual, expected) -> None:
    """float64 against the official float64 outputs: 1e-12 of the largest value compared (sums
    of a few thousand products, reordered by another BLAS or CPU)."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_golden_stages_and_ranking_in_float64(golden):
    meta, g = golden
    m, top = meta["M"], g["ranks_in"][: meta["M"]].T
    out = superglobal_scores(
        torch.from_numpy(g["Q"]), torch.from_numpy(g["X"][top]), k=meta["K"], beta=meta["beta"]
    )
    golden_close(out.refined.numpy(), g["refined"])
    golden_close(out.stage_a.numpy(), g["stage_a_scores"])
    stage_a_order = np.argsort(-out.stage_a.numpy(), axis=1, kind="stable")
    np.testing.assert_array_equal(np.take_along_axis(top, stage_a_order, 1), g["stage_a_ids"])
    # Final score rebuilt from the golden refined descriptors: q~ = max of the 10 best d~.
    best = np.argsort(-g["stage_a_scores"], axis=1, kind="stable")[:, : meta["K"] + 1]
    q_tilde = np.take_along_axis(g["refined"], best[..., None], 1).max(1)
    final = 0.5 * (g["stage_a_scores"] + np.einsum("qd,qmd->qm", q_tilde, g["refined"]))
    golden_close(out.final.numpy(), final)

    stage = rerank.create("superglobal", m=m, k=meta["K"], beta=meta["beta"], dtype="float64")
    result = stage.rerank(
        Queries(global_desc=g["Q"]),
        shortlist_of(g["Q"], g["X"], g["ranks_in"].T),
        Database(global_desc=g["X"]),
    )
    np.testing.assert_array_equal(result.ids, g["ranks_out"].T)  # all 900 columns
    np.testing.assert_array_equal(result.before, g["ranks_in"].T)


# A 3-item case small enough to do by hand (k = 1 neighbour, beta = 0.5):
#   x0 = e0, x1 = e1, x2 = (0.8, 0.6, 0); cosines x0.x1 = 0, x0.x2 = 0.8, x1.x2 = 0.6.
#   d~0 = (x0 + 0.5*0.8 x2) / 1.4 = (1.32, 0.24, 0) / 1.4
#   d~1 = (x1 + 0.5*0.6 x2) / 1.3 = (0.24, 1.18, 0) / 1.3
#   d~2 = (x2 + 0.5*0.8 x0) / 1.4 = (1.20, 0.60, 0) / 1.4
#   q = (0.6, 0, 0.8): q.d~ = (0.792/1.4, 0.144/1.3, 0.72/1.4)
#   best k + 1 = 2 under q.d~: items 0 and 2, q~ = max(d~0, d~2) = (1.32, 0.60, 0) / 1.4
#   (q's own third component is not pooled: q~[2] = 0)
HAND_X = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.8, 0.6, 0.0]])
HAND_Q = np.array([[0.6, 0.0, 0.8]])
HAND_REFINED = np.array(
    [[1.32, 0.24, 0.0], [0.24 * 1.4 / 1.3, 1.18 * 1.4 / 1.3, 0.0], [1.2, 0.6, 0]]
)
HAND_REFINED = HAND_REFINED / 1.4
HAND_STAGE_A = np.array([0.792 / 1.4, 0.144 / 1.3, 0.72 / 1.4])
HAND_Q_TILDE = np.array([1.32, 0.6, 0.0]) / 1.4
HAND_STAGE_B = np.array(
    [
        (1.32 * 1.32 + 0.6 * 0.24) / 1.96,
        (1.32 * 0.24 + 0.6 * 1.18) / (1.4 * 1.3),
        (1.32 * 1.2 + 0.6 * 0.6) / 1.96,
    ]
)


def close(actual, expected) -> None:
    """float64 hand values: a few ulps of the compared values (other CPUs may fuse or reorder
    the handful of operations), scaled to their magnitude."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-13, atol=1e-13 * np.abs(expected).max())


def hand_scores(**kwargs):
    x = torch.tensor(HAND_X)[None]
    return superglobal_scores(torch.tensor(HAND_Q), x, k=1, beta=0.5, **kwargs)


def test_hand_case_refinement():
    close(hand_scores().refined[0].numpy(), HAND_REFINED)


def test_hand_case_query_expansion_pools_refined_items_only():
    out = hand_scores()
    close(out.stage_a[0].numpy(), HAND_STAGE_A)
    close(out.query[0].numpy(), HAND_Q_TILDE)
    # qe_k = 1 pools the single best refined item only.
    close(hand_scores(qe_k=1).query[0].numpy(), HAND_REFINED[0])


def test_hand_case_final_score_and_resort():
    final = 0.5 * (HAND_STAGE_A + HAND_STAGE_B)  # 0.7641, 0.3369, 0.7531
    close(hand_scores().final[0].numpy(), final)
    # Through the stage, from a shortlist in a poor order with two entries past m = 3.
    db = np.concatenate([HAND_X, np.eye(3)[[2, 2]]])
    ids = np.array([[1, 2, 0, 3, 4]])
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], dtype=np.float32)
    stage = SuperGlobalReranker(m=3, k=1, beta=0.5, dtype="float64", device="cpu")
    out = stage.rerank(Queries(HAND_Q), Shortlist(ids=ids, sims=sims), Database(db))
    np.testing.assert_array_equal(out.ids, [[0, 2, 1, 3, 4]])
    np.testing.assert_allclose(out.scores[0], [*final[[0, 2, 1]], 0.6, 0.5], rtol=1e-6)
    assert out.scores.dtype == np.float32


def clustered(num_db=300, dim=16, num_q=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    db = centres[rng.integers(0, 12, num_db)] + 0.6 * rng.normal(size=(num_db, dim))
    queries = centres[rng.integers(0, 12, num_q)] + 0.6 * rng.normal(size=(num_q, dim))
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = np.argsort(-(queries @ db.T), axis=1, kind="stable")
    return queries, db, ids


def test_invariant_to_the_order_of_the_shortlist():
    queries, db, ids = clustered()
    stage = SuperGlobalReranker(m=60, dtype="float64", device="cpu")
    base = stage.rerank(Queries(queries), shortlist_of(queries, db, ids[:, :80]), Database(db))
    rng = np.random.default_rng(1)
    shuffled = ids[:, :80].copy()
    for row in shuffled:
        row[:60] = rng.permutation(row[:60])  # same top-60 set, any order
    out = stage.rerank(Queries(queries), shortlist_of(queries, db, shuffled), Database(db))
    np.testing.assert_array_equal(out.ids, base.ids)
    np.testing.assert_allclose(out.scores, base.scores, rtol=0, atol=1e-6)
    raw = superglobal_scores(torch.tensor(queries), torch.tensor(db[shuffled[:, :60]]))
    ref = superglobal_scores(torch.tensor(queries), torch.tensor(db[ids[:, :60]]))
    for q in range(len(queries)):
        by_id = dict(zip(ids[q, :60], ref.final[q].numpy()))
        expected = [by_id[i] for i in shuffled[q, :60]]
        np.testing.assert_allclose(raw.final[q].numpy(), expected, rtol=0, atol=1e-12)


def test_batched_equals_per_query():
    queries, db, ids = clustered(num_q=7)
    x = torch.tensor(db[ids[:, :50]])
    batched = superglobal_scores(torch.tensor(queries), x, k=4, beta=0.3)
    for q in range(len(queries)):
        single = superglobal_scores(torch.tensor(queries[q : q + 1]), x[q : q + 1], k=4, beta=0.3)
        np.testing.assert_allclose(single.final.numpy(), batched.final[q : q + 1].numpy(), 0, 1e-12)
    shortlist = shortlist_of(queries, db, ids[:, :70])
    results = [
        SuperGlobalReranker(m=50, k=4, beta=0.3, batch_size=b, device="cpu").rerank(
            Queries(queries), shortlist, Database(db)
        )
        for b in (1, 3, 64)
    ]
    for other in results[1:]:
        np.testing.assert_array_equal(other.ids, results[0].ids)
        np.testing.assert_allclose(other.scores, results[0].scores, rtol=0, atol=1e-6)


def test_float32_agrees_with_float64():
    queries, db, ids = clustered()
    x32 = superglobal_scores(torch.tensor(queries).float(), torch.tensor(db[ids[:, :60]]).float())
    x64 = superglobal_scores(torch.tensor(queries), torch.tensor(db[ids[:, :60]]))
    np.testing.assert_allclose(x32.final.numpy(), x64.final.numpy(), rtol=0, atol=1e-5)


def junk_case():
    queries, db, ids = clustered(num_q=3, seed=2)
    ids = ids[:, :40]
    junk = [set(ids[0, [0, 3, 5]].tolist()), set(), set(ids[2, 10:35].tolist())]
    return queries, db, ids, junk


def _chain(stage, queries, shortlist, database):
    """The stage as the chain runs it (the chain applies the junk partition)."""
    final, _ = build_chain([stage]).run(queries, shortlist, database)
    return final


def test_partition_moves_junk_out_before_refinement():
    queries, db, ids, junk = junk_case()
    m = 20
    stage = SuperGlobalReranker(m=m, junk="partition", dtype="float64", device="cpu")
    out = _chain(stage, Queries(queries, junk=junk), shortlist_of(queries, db, ids), Database(db))
    for q in range(3):
        kept = np.array([i for i in ids[q] if i not in junk[q]])
        stage = SuperGlobalReranker(m=min(m, len(kept)), dtype="float64", device="cpu")
        one = queries[q : q + 1]
        alone = stage.rerank(Queries(one), shortlist_of(one, db, kept[None]), Database(db))
        n = len(kept)
        np.testing.assert_array_equal(out.ids[q, :n], alone.ids[0])
        np.testing.assert_array_equal(out.ids[q, n:], [i for i in ids[q] if i in junk[q]])


def test_keep_mode_refines_with_junk_like_no_junk_at_all():
    queries, db, ids, junk = junk_case()
    stage = SuperGlobalReranker(m=20, junk="keep", dtype="float64", device="cpu")
    with_junk = _chain(
        stage, Queries(queries, junk=junk), shortlist_of(queries, db, ids), Database(db)
    )
    without = stage.rerank(Queries(queries), shortlist_of(queries, db, ids), Database(db))
    np.testing.assert_array_equal(with_junk.ids, without.ids)
    partitioned = _chain(
        SuperGlobalReranker(m=20, junk="partition", device="cpu"),
        Queries(queries, junk=junk),
        shortlist_of(queries, db, ids),
        Database(db),
    )
    assert not np.array_equal(partitioned.ids[0], with_junk.ids[0])


def test_short_shortlists_and_padding_ids():
    queries, db, ids = clustered(num_q=2)
    ids = ids[:, :6].copy()
    ids[1, 4:] = -1  # a first stage that found fewer than k neighbours pads with -1
    shortlist = Shortlist(ids=ids, sims=shortlist_of(queries, db, np.maximum(ids, 0)).sims)
    stage = SuperGlobalReranker(m=400, device="cpu")
    out = stage.rerank(Queries(queries), shortlist, Database(db))
    assert sorted(out.ids[0]) == sorted(ids[0])
    np.testing.assert_array_equal(out.ids[1, 4:], [-1, -1])
    assert np.isfinite(out.scores).all()
    empty = Shortlist(ids=np.zeros((2, 0), np.int64), sims=np.zeros((2, 0), np.float32))
    assert stage.rerank(Queries(queries), empty, Database(db)).ids.shape == (2, 0)


def test_bad_options_and_inputs_are_user_errors():
    with pytest.raises(UserError, match="junk mode"):
        rerank.create("superglobal", junk="drop")
    with pytest.raises(UserError, match="dtype"):
        rerank.create("superglobal", dtype="float16")
    queries, db, ids = clustered(num_q=1)
    stage = SuperGlobalReranker(device="cpu")
    with pytest.raises(UserError, match="-D but the database"):
        stage.rerank(Queries(queries[:, :8]), shortlist_of(queries, db, ids), Database(db))
    bad = Shortlist(ids=ids + 1, sims=shortlist_of(queries, db, ids).sims)
    with pytest.raises(UserError, match="outside the 300"):
        stage.rerank(Queries(queries), bad, Database(db))


@pytest.mark.gpu
def test_gpu_matches_cpu_in_float64(golden, device):
    meta, g = golden
    top = g["ranks_in"][: meta["M"]].T
    cpu = superglobal_scores(torch.from_numpy(g["Q"]), torch.from_numpy(g["X"][top]))
    gpu = superglobal_scores(
        torch.from_numpy(g["Q"]).to(device), torch.from_numpy(g["X"][top]).to(device)
    )
    np.testing.assert_allclose(gpu.final.cpu().numpy(), cpu.final.numpy(), rtol=0, atol=1e-12)


def test_neighbour_counts_shrink_with_small_databases_only():
    """Published K = 9 / 10 pooled from N >= M on; below, their share of M (module doc)."""
    stage = SuperGlobalReranker(m=400, device="cpu")
    assert stage.neighbours(4993) == stage.neighbours(400) == (9, 10)
    assert stage.neighbours(98) == (2, 2)  # 9 * 0.245 = 2.2, 10 * 0.245 = 2.45
    assert stage.neighbours(58) == (1, 1)  # the 58-image collection
    assert stage.neighbours(3) == (1, 1)
    assert SuperGlobalReranker(m=400, k=3, device="cpu").neighbours(58) == (3, 4)  # k + 1
    assert SuperGlobalReranker(m=400, qe_k=5, device="cpu").neighbours(58) == (1, 5)


def test_small_database_reranks_with_the_scaled_counts():
    """On 66 images with M = 400 the default stage is exactly K = 1, 2 pooled, and differs from
    the published K = 9 on these clustered descriptors."""
    queries, db, ids = clustered(num_db=66, num_q=6, seed=3)
    shortlist = shortlist_of(queries, db, ids)

    def run(**options):
        stage = SuperGlobalReranker(dtype="float64", device="cpu", **options)
        return stage.rerank(Queries(queries), shortlist, Database(db))

    default = run()
    np.testing.assert_array_equal(default.ids, run(k=1, qe_k=2).ids)
    np.testing.assert_array_equal(default.scores, run(k=1, qe_k=2).scores)
    assert not np.array_equal(default.ids, run(k=9).ids)
