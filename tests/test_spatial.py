"""Spatial verification (rerank/spatial.py): mutual matches, OpenCV fits, fusion rule, contract.

The verified image's positions are an exact affine image of the query's, so every match is an
inlier; float32 positions reprojected by a float64 fit err by < 1e-6 of the unit square, far
below the 0.01 threshold used here.
"""

import numpy as np
import pytest
from rerank_helpers import collection

from locore import rerank
from locore.core.errors import UserError
from locore.core.layout import NUM_META
from locore.indexing.local_store import LocalStore, LocalStoreWriter
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Database, Queries
from locore.rerank.chain import build_chain
from locore.rerank.spatial import mutual_matches

K, D = 24, 16
AFFINE = np.array([[0.7, -0.2, 0.1], [0.15, 0.8, 0.05]])  # maps the unit square into itself


def rows_of(desc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    meta = np.zeros((len(desc), NUM_META), np.float32)
    meta[:, :2] = pos
    meta[:, 4] = 1.0
    return np.concatenate([meta, desc], 1).astype(np.float32)


@pytest.fixture
def scene(tmp_path):
    """A query and a real store of 5 images: 0 = the query's descriptors (rows shuffled) at
    affinely moved positions, 1 = the same descriptors at scrambled positions, 2-4 = unrelated.
    The global ranking puts the scrambled image first and the true one third."""
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(K, D))
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    pos = rng.uniform(0.05, 0.95, size=(K, 2))
    moved = pos @ AFFINE[:, :2].T + AFFINE[:, 2]
    perm = rng.permutation(K)
    images = [rows_of(desc[perm], moved[perm]), rows_of(desc, rng.permutation(pos))]
    for _ in range(3):
        other = rng.normal(size=(K, D))
        images.append(rows_of(other / np.linalg.norm(other, axis=1, keepdims=True), pos))
    with LocalStoreWriter(tmp_path / "local.h5", K, D, dtype="float32", durable=False) as w:
        w.append([f"im{i}" for i in range(5)], np.stack(images))
    store = LocalStore(tmp_path / "local.h5")
    queries = Queries(global_desc=np.zeros((1, 4), np.float32), local_rows=rows_of(desc, pos)[None])
    shortlist = Shortlist(
        ids=np.array([[1, 2, 0, 3, 4]]), sims=np.array([[0.9, 0.85, 0.8, 0.7, 0.6]], np.float32)
    )
    yield queries, shortlist, Database(np.zeros((5, 4), np.float32), store)
    store.close()


def test_mutual_matches_by_hand():
    """Query rows e0, e1; image rows e1, e0, (e0+e1)/sqrt2: e0<->row 1 and e1<->row 0 are
    mutual; row 2 is nobody's best. With min_sim 0.99 both survive, with 1.0 none does."""
    query = np.eye(2)
    image = np.array([[[0, 1], [1, 0], [0.7071, 0.7071]]])
    nn, mutual = mutual_matches(query, np.ones(2, bool), image, np.ones((1, 3), bool), 0.99)
    np.testing.assert_array_equal(nn, [[1, 0]])
    np.testing.assert_array_equal(mutual, [[True, True]])
    assert not mutual_matches(query, np.ones(2, bool), image, np.ones((1, 3), bool), 1.0)[1].any()
    # e0's partner is padding: e0 now matches row 2, whose best query row is e0 (a tie with
    # e1, broken by the first row), so the match is mutual.
    valid = np.array([[True, False, True]])
    nn, mutual = mutual_matches(query, np.ones(2, bool), image, valid, 0.0)
    np.testing.assert_array_equal(nn, [[2, 0]])
    np.testing.assert_array_equal(mutual, [[True, True]])


@pytest.mark.parametrize("model", ["affine", "homography"])
@pytest.mark.parametrize("method", ["magsac", "ransac"])
def test_verified_image_moves_to_the_top_with_the_documented_score(scene, model, method):
    queries, shortlist, database = scene
    stage = rerank.create(
        "spatial", model=model, method=method, threshold=0.01, weight=0.15, cap=20, min_inliers=6
    )
    counts = stage.inliers(queries, shortlist.ids, database, np.array([5]))
    assert counts[0, 2] == K  # every match of the true image agrees with one geometry
    assert counts[0, 0] < stage.min_inliers  # scrambled positions: no consistent geometry
    result = stage.rerank(queries, shortlist, database)
    assert result.ids[0, 0] == 0
    # score = sim + weight * min(inliers, cap) / cap; float32 bound: rtol 1e-6
    np.testing.assert_allclose(result.scores[0, 0], 0.8 + 0.15, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(result.ids[0, 1:], [1, 2, 3, 4])  # the rest keep their order
    np.testing.assert_array_equal(result.before, shortlist.ids)


def test_topk_and_junk_limit_what_is_verified(scene):
    queries, shortlist, database = scene
    # The true image (rank 3) is outside the top 2: nothing moves.
    out = rerank.create("spatial", topk=2, threshold=0.01).rerank(queries, shortlist, database)
    np.testing.assert_array_equal(out.ids, shortlist.ids)
    # As junk, the chain moves it to the end and the stage never lifts it back.
    junk = Queries(queries.global_desc, queries.local_rows, junk=[{0}])
    final, _ = build_chain([("spatial", {"threshold": 0.01})]).run(junk, shortlist, database)
    np.testing.assert_array_equal(final.ids, [[1, 2, 3, 4, 0]])


def test_degenerate_positions_keep_the_incoming_ranking():
    """The shared random collection stores every position at 0: no fit exists, so the stage
    is the identity, whatever the descriptors match."""
    queries, shortlist, database = collection(num_db=30, num_q=3)
    result = rerank.create("spatial", min_inliers=0).rerank(queries, shortlist, database)
    np.testing.assert_array_equal(result.ids, shortlist.ids)
    np.testing.assert_array_equal(result.scores, shortlist.sims)


def test_bad_options_and_inputs_are_user_errors(scene):
    queries, shortlist, database = scene
    with pytest.raises(UserError, match="model"):
        rerank.create("spatial", model="similarity")
    with pytest.raises(UserError, match="method"):
        rerank.create("spatial", method="lmeds")
    with pytest.raises(UserError, match="threshold"):
        rerank.create("spatial", threshold=0)
    with pytest.raises(UserError, match="local descriptors"):
        rerank.create("spatial").rerank(Queries(queries.global_desc), shortlist, database)
    with pytest.raises(UserError, match="num_local"):
        rerank.create("spatial", num_local=K + 1).rerank(queries, shortlist, database)
