"""Diffusion re-ranking (Iscen et al., CVPR 2017): an independent sparse-solver oracle, ranks that
must change, what must not move, and bad options."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import spsolve

from locore import rerank
from locore.core.errors import UserError
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Database, Queries
from locore.rerank.diffusion import diffusion_scores


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def oracle(x: np.ndarray, y: np.ndarray, k: int, gamma: float, alpha: float) -> np.ndarray:
    """The published construction with scipy's sparse matrices: mutual k-NN affinity graph,
    symmetric normalisation, one sparse solve of ``(I - alpha S) f = y``."""
    n = len(x)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    rows = np.repeat(np.arange(n), k)
    cols = np.argsort(-sims, axis=1)[:, :k].ravel()
    a = sp.csr_matrix((np.maximum(sims[rows, cols], 0) ** gamma, (rows, cols)), shape=(n, n))
    a = a.minimum(a.T)
    degree = np.asarray(a.sum(1)).ravel()
    d = sp.diags(np.where(degree > 0, 1 / np.sqrt(np.maximum(degree, 1e-300)), 0.0))
    return spsolve((sp.identity(n) - alpha * (d @ a @ d)).tocsc(), y)


def clustered(num: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(num // 5, dim)))
    return unit(np.repeat(centres, 5, 0)[:num] + 0.4 * rng.normal(size=(num, dim)))


@pytest.mark.parametrize("k, gamma, alpha", [(5, 3.0, 0.8), (3, 1.0, 0.5), (10, 3.0, 0.99)])
def test_scores_match_a_sparse_solver_oracle(k, gamma, alpha):
    x = np.stack([clustered(40, 16, seed) for seed in range(3)])
    y = np.zeros((3, 40))
    y[:, :4] = np.random.default_rng(7).uniform(0.2, 1.0, (3, 4))
    f = diffusion_scores(
        torch.from_numpy(x),
        torch.from_numpy(y),
        torch.ones(3, 40, dtype=torch.bool),
        k,
        gamma,
        alpha,
    ).numpy()
    for q in range(3):
        expected = oracle(x[q], y[q], k, gamma, alpha)
        # float64 solves of a 40 x 40 system: the condition number is at most (1+a)/(1-a) = 199.
        np.testing.assert_allclose(f[q], expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def chain_collection() -> tuple[Queries, Shortlist, Database]:
    """A query, a positive like it (0), a positive like only that positive (2), and a negative
    (1) the query resembles more than positive 2, plus three unrelated images (3-5)."""
    e = np.eye(6)
    query = e[0]
    db = unit(
        np.stack(
            [
                e[0] + e[2],  # 0: positive, cosine 0.71 with the query
                0.5 * e[0] + e[3],  # 1: negative, cosine 0.45
                0.3 * e[0] + e[2],  # 2: positive, cosine 0.29; 0.88 with positive 0
                e[4],
                e[5],
                e[3] - 0.5 * e[4],  # 5: the negative's nearest neighbour (0.8)
            ]
        )
    )
    sims = db @ query
    order = np.argsort(-sims, kind="stable")
    shortlist = Shortlist(
        ids=order[None].astype(np.int64), sims=sims[order][None].astype(np.float32)
    )
    return (
        Queries(global_desc=query[None].astype(np.float32)),
        shortlist,
        Database(db.astype(np.float32)),
    )


def test_a_positive_reached_only_through_another_positive_moves_up():
    queries, shortlist, database = chain_collection()
    assert list(shortlist.ids[0, :3]) == [0, 1, 2]  # global: the negative before positive 2
    stage = rerank.create("diffusion", k=1, seeds=1, alpha=0.8, device="cpu")
    result = stage.rerank(queries, shortlist, database)
    assert list(result.ids[0, :2]) == [0, 2]
    assert result.scores[0, 0] == 1.0  # normalised by the best
    assert np.all(np.diff(result.scores[0, :2]) <= 0)


def test_unreached_entries_keep_their_order_and_entries_past_m_are_untouched():
    queries, shortlist, database = chain_collection()
    result = rerank.create("diffusion", m=4, k=1, seeds=1, device="cpu").rerank(
        queries, shortlist, database
    )
    head = list(result.ids[0, :4])
    reached = [0, 2]
    assert head[:2] == reached
    incoming = [i for i in shortlist.ids[0, :4] if i not in reached]
    assert head[2:] == incoming and np.all(result.scores[0, 2:4] == 0)
    np.testing.assert_array_equal(result.ids[0, 4:], shortlist.ids[0, 4:])
    np.testing.assert_array_equal(result.scores[0, 4:], shortlist.sims[0, 4:])


def test_junk_never_enters_the_graph_and_stays_at_the_end():
    queries, shortlist, database = chain_collection()
    stage = rerank.create("diffusion", k=1, seeds=1, device="cpu")
    plain = stage.rerank(queries, shortlist, database)
    # Image 2 as junk, moved to the end as the chain does: it must not be pulled up, and the
    # others must rank as if it were not there (it was the only bridge, so nothing else moves).
    ids = np.array([[i for i in shortlist.ids[0] if i != 2] + [2]])
    sims = (database.global_desc[ids[0]] @ queries.global_desc[0])[None]
    junk_queries = Queries(global_desc=queries.global_desc, junk=[{2}])
    result = stage.rerank(junk_queries, Shortlist(ids=ids, sims=sims), database)
    assert result.ids[0, -1] == 2 and plain.ids[0, 1] == 2
    np.testing.assert_array_equal(result.ids[0, :2], [0, 1])


def test_a_query_without_positive_seed_scores_is_left_as_it_came():
    queries, shortlist, database = chain_collection()
    negative = Shortlist(ids=shortlist.ids, sims=-np.abs(shortlist.sims))
    result = rerank.create("diffusion", device="cpu").rerank(queries, negative, database)
    np.testing.assert_array_equal(result.ids, shortlist.ids)
    np.testing.assert_array_equal(result.scores, negative.sims)


def test_batches_do_not_change_the_result():
    rng = np.random.default_rng(3)
    db = clustered(60, 12, 4).astype(np.float32)
    query = unit(db[rng.choice(60, 7)] + 0.3 * rng.normal(size=(7, 12))).astype(np.float32)
    sims = query @ db.T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :50]
    shortlist = Shortlist(ids=ids, sims=np.take_along_axis(sims, ids, 1))
    runs = [
        rerank.create("diffusion", m=30, batch_size=b, device="cpu").rerank(
            Queries(global_desc=query), shortlist, Database(db)
        )
        for b in (1, 3, 64)
    ]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.ids, runs[0].ids)
        np.testing.assert_array_equal(other.scores, runs[0].scores)
    assert (runs[0].ids != shortlist.ids).any()  # the collection is one where diffusion acts


@pytest.mark.parametrize(
    "options", [{"k": 0}, {"m": 0}, {"seeds": 0}, {"alpha": 1.0}, {"alpha": -0.1}, {"gamma": 0}]
)
def test_bad_options_are_one_line_errors(options):
    with pytest.raises(UserError, match="diffusion needs"):
        rerank.create("diffusion", **options)


def test_descriptor_widths_must_agree():
    queries, shortlist, database = chain_collection()
    wide = Queries(global_desc=np.zeros((1, 7), dtype=np.float32))
    with pytest.raises(UserError, match="extract both with one model"):
        rerank.create("diffusion", device="cpu").rerank(wide, shortlist, database)
