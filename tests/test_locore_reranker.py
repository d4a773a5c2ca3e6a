"""The LoCoRe re-ranking stage: junk, feature gathering, batching, windows, fusion, errors."""

import numpy as np
import pytest
import torch
from rerank_helpers import (
    DIM,
    GLOBAL_DIM,
    STORED,
    StandInModel,
    collection,
    official_rows,
)

from locore.core.errors import UserError
from locore.core.layout import NUM_META
from locore.indexing.local_store import LocalStore, LocalStoreWriter
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Database, Queries
from locore.rerank.chain import build_chain
from locore.rerank.fusion import fuse
from locore.rerank.locore.model import build_model
from locore.rerank.locore.reranker import LocoreOptions, LocoreReranker, query_locals
from locore.rerank.sliding import STRATEGIES


def reranker(model=None, **options):
    return LocoreReranker(model or StandInModel(), LocoreOptions(num_local=4, **options))


@pytest.mark.parametrize("strategy", [*STRATEGIES, None])
@pytest.mark.parametrize("k,w,s", [(37, 10, 4), (5, 10, 4)])
def test_batched_equals_per_query_for_every_strategy_and_odd_sizes(strategy, k, w, s):
    queries, shortlist, database = collection()
    common = dict(sliding=strategy, topk=k, window=w, stride=s, alpha=0.2, temp=0.5)
    single = reranker(batch_size=1, **common).rerank(queries, shortlist, database)
    batched = reranker(batch_size=4, **common).rerank(queries, shortlist, database)
    np.testing.assert_array_equal(batched.ids, single.ids)
    np.testing.assert_allclose(batched.scores, single.scores, rtol=0, atol=1e-6)
    for q in range(len(queries)):
        one = reranker(batch_size=1, **common).rerank(
            Queries(queries.global_desc[q : q + 1], queries.local_rows[q : q + 1]),
            Shortlist(shortlist.ids[q : q + 1], shortlist.sims[q : q + 1]),
            database,
        )
        np.testing.assert_array_equal(one.ids[0], batched.ids[q])
    np.testing.assert_array_equal(batched.before, shortlist.ids)
    np.testing.assert_array_equal(batched.ids[:, k:], shortlist.ids[:, k:])  # past topk: as given
    assert (np.sort(batched.ids[:, :k], 1) == np.sort(shortlist.ids[:, :k], 1)).all()
    # The stand-in model's context dependence shows: the stage did re-order the lists.
    assert k < 10 or not np.array_equal(batched.ids, shortlist.ids)


def test_ranks_change_when_the_scorer_says_so():
    queries, shortlist, database = collection(num_q=2)
    # Make the last shortlisted image of query 0 a scaled copy of the query: its relevance
    # dominates every window it enters, so end-to-start carries it from rank 40 to rank 1.
    target = shortlist.ids[0, 39]
    database.store.table[target] = 0
    database.store.table[target, : STORED - 1] = queries.local_rows[0]
    database.store.table[target, : STORED - 1, NUM_META:] *= 3
    database.global_desc[target] = 3 * queries.global_desc[0]
    stage = reranker(sliding="end-to-start", topk=40, window=10, stride=5, alpha=0.0, temp=1.0)
    out = stage.rerank(queries, shortlist, database)
    assert out.ids[0, 0] == target
    # alpha = 1 ignores the model: the incoming order is kept exactly (stable sort).
    keep = reranker(StandInModel(10.0), alpha=1.0, topk=40, window=10, stride=5)
    np.testing.assert_array_equal(keep.rerank(queries, shortlist, database).ids, shortlist.ids)


def test_scores_are_the_fusion_with_the_incoming_similarities():
    queries, shortlist, database = collection(num_q=2)
    model = StandInModel()
    out = reranker(model, sliding=None, topk=30, window=12, alpha=0.3, temp=0.4).rerank(
        queries, shortlist, database
    )
    (inputs,) = model.seen  # one window, both queries in one call
    logits = model(inputs).scores["max-end"].detach().numpy()
    expected = fuse(shortlist.sims[:, :12], logits, 0.3, 0.4)
    for q in range(2):
        by_id = dict(zip(shortlist.ids[q, :12], expected[q]))
        np.testing.assert_allclose(out.scores[q, :12], [by_id[i] for i in out.ids[q, :12]], 1e-6)
        np.testing.assert_array_equal(out.scores[q, 12:], shortlist.sims[q, 12:])
        assert np.all(np.diff(out.scores[q, :12]) <= 0)


def test_sliding_max_sum_is_divided_by_the_block_length():
    queries, shortlist, database = collection(num_q=1)
    model = StandInModel()
    out = reranker(model, sliding="end-to-start", mode="max-sum", topk=8, window=8, stride=4)
    result = out.rerank(queries, shortlist, database)
    logits = model(model.seen[0]).scores["max-sum"].detach().numpy()
    # Official sliding convention: / (num_local + global + SEP) = / 6 here (/ 50 for 48 locals).
    expected = fuse(shortlist.sims[:, :8], logits / 6, 0.5, 0.1)
    np.testing.assert_allclose(np.sort(result.scores[0, :8]), np.sort(expected[0]), rtol=1e-6)


def test_junk_is_moved_after_the_reranked_part_and_never_scored():
    queries, shortlist, database = collection(num_q=3)
    junk = [set(shortlist.ids[0, [0, 2, 7]].tolist()), set(), set(shortlist.ids[2, 5:60].tolist())]
    queries.junk = junk
    stage = reranker(StandInModel(strength=10.0), topk=30, window=10, stride=5)
    out, _ = build_chain([stage]).run(queries, shortlist, database)  # the chain moves junk
    # Queries 0 and 1 re-rank 30 entries (batched together); query 2 keeps only 25 of its 80
    # and re-ranks those 25 in windows of its own.
    for request in database.store.requests:
        rows = [0, 1] if request.shape == (2, 10) else [2]
        assert request.shape in ((2, 10), (1, 10))
        for q, row in zip(rows, request):
            assert not set(row.tolist()) & junk[q]
    for q in range(3):
        kept = [i for i in shortlist.ids[q] if i not in junk[q]]
        moved = [i for i in shortlist.ids[q] if i in junk[q]]
        n = min(30, len(kept))
        assert sorted(out.ids[q, :n]) == sorted(kept[:n])
        np.testing.assert_array_equal(out.ids[q, n : len(kept)], kept[n:])
        np.testing.assert_array_equal(out.ids[q, len(kept) :], moved)
    assert set(out.ids[2, :25]) == set(shortlist.ids[2, :5]) | set(shortlist.ids[2, 60:])


def test_model_receives_locals_masks_scales_and_globals():
    queries, shortlist, database = collection(num_q=2)
    model = StandInModel()
    reranker(model, sliding=None, topk=10, window=10).rerank(queries, shortlist, database)
    (x,) = model.seen
    # Query rows hold 5 locals; num_local = 4 keeps the first (highest-weight) 4.
    np.testing.assert_array_equal(x.query_local.numpy(), queries.local_rows[:, :4, NUM_META:])
    np.testing.assert_array_equal(x.query_scales.numpy(), [[0, 1, 2, 0]] * 2)
    rows = database.store.table[shortlist.ids[:, :10]][:, :, :4]
    np.testing.assert_array_equal(x.gallery_mask.numpy(), rows[..., 3] != 0)
    np.testing.assert_array_equal(x.gallery_local.numpy(), rows[..., NUM_META:])
    np.testing.assert_array_equal(
        x.gallery_global.numpy(), database.global_desc[shortlist.ids[:, :10]]
    )
    np.testing.assert_array_equal(x.query_global.numpy(), queries.global_desc)
    assert x.query_scales.dtype == torch.int64 and x.gallery_mask.dtype == torch.bool

    no_global = StandInModel(use_global=False)
    reranker(no_global, sliding=None, topk=10, window=10).rerank(queries, shortlist, database)
    assert no_global.seen[0].query_global is None and no_global.seen[0].gallery_global is None


def test_query_locals_pad_short_rows():
    rows = official_rows(np.ones((1, 2, DIM)), np.ones((1, 2), bool))
    desc, scales, mask = query_locals(rows, 4)
    assert desc.shape == (1, 4, DIM)
    np.testing.assert_array_equal(mask, [[False, False, True, True]])
    np.testing.assert_array_equal(desc[0, 2:], 0)


def test_user_errors():
    queries, shortlist, database = collection(num_q=1)
    with pytest.raises(UserError, match="mode"):
        LocoreOptions(mode="max-mean")
    with pytest.raises(UserError, match="sliding strategy"):
        LocoreOptions(sliding="middle-out")
    with pytest.raises(UserError, match="stride"):
        LocoreOptions(stride=0)
    with pytest.raises(UserError, match="alpha"):
        LocoreOptions(alpha=1.5)
    with pytest.raises(UserError, match="query local descriptors"):
        reranker().rerank(Queries(queries.global_desc), shortlist, database)
    with pytest.raises(UserError, match="local store"):
        reranker().rerank(queries, shortlist, Database(database.global_desc))
    bad = Queries(queries.global_desc, queries.local_rows[..., :-1])
    with pytest.raises(UserError, match="store's are"):
        reranker().rerank(bad, shortlist, database)
    with pytest.raises(UserError, match="num_local 7 exceeds the 6"):
        LocoreReranker(StandInModel(), LocoreOptions(num_local=7)).rerank(
            queries, shortlist, database
        )


@pytest.mark.parametrize("column, value", [(2, 7.0), (2, -1.0), (NUM_META + 1, np.nan)])
def test_damaged_rows_are_refused_with_the_image_named(column, value):
    """A store overwritten in place (no checksums) must not reach the model: a scale id outside
    the model's table or a non-finite descriptor names the image instead of failing inside."""
    queries, shortlist, database = collection(num_q=1)
    victim = int(shortlist.ids[0, 0])
    database.store.table[victim, 0, column] = value
    with pytest.raises(UserError, match=f"image id {victim} holds scale ids outside 0..2"):
        reranker().rerank(queries, shortlist, database)


def test_reads_the_real_local_store(tmp_path):
    queries, shortlist, database = collection(num_q=3)
    rows = database.store.table
    with LocalStoreWriter(tmp_path / "local.h5", rows.shape[1], DIM, dtype="float32") as writer:
        writer.append([f"img{i}" for i in range(len(rows))], rows)
    options = dict(sliding="start-to-end-to-start", topk=21, window=6, stride=4, batch_size=2)
    expected = reranker(**options).rerank(queries, shortlist, database)
    with LocalStore(tmp_path / "local.h5") as store:
        got = reranker(**options).rerank(queries, shortlist, Database(database.global_desc, store))
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=1e-6)


def test_end_to_end_with_a_random_micro_model():
    torch.manual_seed(0)
    model = build_model("micro", local_dim=DIM, global_dim=GLOBAL_DIM, num_layers=1)
    queries, shortlist, database = collection(num_q=3)
    common = dict(sliding="end-to-start", topk=23, window=9, stride=4, alpha=0.0, temp=1.0)
    single = reranker(model, batch_size=1, **common).rerank(queries, shortlist, database)
    batched = reranker(model, batch_size=3, **common).rerank(queries, shortlist, database)
    np.testing.assert_array_equal(batched.ids, single.ids)
    np.testing.assert_allclose(batched.scores, single.scores, rtol=0, atol=1e-5)
    assert not np.array_equal(batched.ids[:, :23], shortlist.ids[:, :23])
    np.testing.assert_array_equal(batched.ids[:, 23:], shortlist.ids[:, 23:])
