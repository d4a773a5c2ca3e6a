"""Local store and global index: round trips, official layouts, gather, exact search, errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from locore.core.errors import UserError
from locore.indexing.global_index import GlobalIndex
from locore.indexing.local_store import LocalStore, LocalStoreWriter
from locore.indexing.shortlist import Shortlist, read_raw_globals

K, D = 6, 8


def _rows(rng, n):
    rows = rng.normal(size=(n, K, 5 + D)).astype(np.float32)
    rows[:, :, 3] = 0
    rows[:, -2:, 3] = 1  # two padding rows per image
    rows[:, -2:, 5:] = 0
    return rows


def test_store_round_trip_resume_and_prefix(tmp_path):
    rng = np.random.default_rng(0)
    rows = _rows(rng, 7)
    path = tmp_path / "s.h5"
    with LocalStoreWriter(path, K, D, "float32", attrs={"extractor": "x"}) as w:
        w.append(["a", "b", "c"], rows[:3])
    with LocalStoreWriter(path, K, D, "float32") as w:  # resume
        assert w.names == ["a", "b", "c"]
        w.append(["d", "e", "f", "g"], rows[3:])
    with LocalStore(path) as store:
        assert len(store) == 7 and store.names[-1] == "g" and store.attrs["extractor"] == "x"
        np.testing.assert_array_equal(store.rows(np.arange(7)), rows)
        np.testing.assert_array_equal(store.rows([2], L=3), rows[[2], :3])
    with pytest.raises(UserError, match="not float32"):
        LocalStoreWriter(path, K, D + 1, "float32")


def test_uncommitted_rows_are_invisible(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "s.h5"
    with LocalStoreWriter(path, K, D) as w:
        w.append(["a"], _rows(rng, 1))
    with h5py.File(path, "a") as f:  # a crashed writer left a row past the counter
        f["features"].resize(2, axis=0)
        f["features"][1] = 7
    with LocalStore(path) as store:
        assert len(store) == 1
        with pytest.raises(UserError, match="outside store"):
            store.rows([1])


def test_gather_equals_a_naive_loop(tmp_path):
    rng = np.random.default_rng(2)
    rows = _rows(rng, 20)
    with LocalStoreWriter(tmp_path / "s.h5", K, D) as w:
        w.append([str(i) for i in range(20)], rows)
    ids = rng.integers(0, 20, size=(3, 5))
    with LocalStore(tmp_path / "s.h5") as store:
        batch = store.gather(ids, L=4)
        for q in range(3):
            for m in range(5):
                expect = rows[ids[q, m], :4].astype(np.float16).astype(np.float32)
                np.testing.assert_array_equal(batch.descriptors[q, m], expect[:, 5:])
                np.testing.assert_array_equal(batch.mask[q, m], expect[:, 3] != 0)
                np.testing.assert_array_equal(batch.scales[q, m], expect[:, 2].astype(int))
    assert batch.descriptors.shape == (3, 5, 4, D)


def test_official_flat_and_compound_layouts(tmp_path):
    rng = np.random.default_rng(3)
    rows = _rows(rng, 4)
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["features"] = rows
    dtype = np.dtype([("metadata", np.float32, (K, 5)), ("descriptor", np.float16, (K, D))])
    compound = np.zeros(4, dtype)
    compound["metadata"], compound["descriptor"] = rows[:, :, :5], rows[:, :, 5:]
    with h5py.File(tmp_path / "compound.h5", "w") as f:
        f["features"] = compound
    with LocalStore(tmp_path / "flat.h5") as flat, LocalStore(tmp_path / "compound.h5") as comp:
        assert flat.names is None and (len(flat), flat.num_local, flat.dim) == (4, K, D)
        np.testing.assert_array_equal(flat.rows([3, 1]), rows[[3, 1]])
        expect = rows.copy()
        expect[:, :, 5:] = expect[:, :, 5:].astype(np.float16)
        np.testing.assert_array_equal(comp.rows([0, 2], L=K), expect[[0, 2]])
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["features"] = np.zeros((2, 3), np.float32)
    with pytest.raises(UserError, match="not \\[N, K, 5 \\+ D\\]"):
        LocalStore(tmp_path / "bad.h5")


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "torch", "hnsw"])
def test_exact_kinds_match_numpy(kind, tmp_path):
    rng = np.random.default_rng(4)
    db, q = _unit(rng, 500, 32), _unit(rng, 7, 32)
    index = (
        GlobalIndex.build(32, kind, chunk=128) if kind == "torch" else GlobalIndex.build(32, kind)
    )
    index.add(db)
    sims, ids = index.search(q, 10)
    brute = q @ db.T
    want = np.argsort(-brute, axis=1)[:, :10]
    if kind == "hnsw":  # approximate: nearly all of the true top-10
        assert np.mean([len(set(a) & set(b)) for a, b in zip(ids, want)]) >= 9
    else:
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_allclose(sims, np.take_along_axis(brute, want, 1), atol=1e-5)
    index.save(tmp_path / "ix")
    again = GlobalIndex.load(tmp_path / "ix")
    np.testing.assert_array_equal(again.search(q, 10)[1], ids)


def test_ivfpq_recall_at_100():
    rng = np.random.default_rng(5)
    centres = _unit(rng, 200, 64)
    db = centres[rng.integers(0, 200, 20000)] + 0.15 * rng.normal(size=(20000, 64))
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float32)
    q = db[:20] + 0.05 * rng.normal(size=(20, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = GlobalIndex.build(64, "ivfpq", m=16)  # default nlist, nprobe and refinement
    index.train(db)
    index.add(db)
    _, ids = index.search(q, 100)
    truth = np.argsort(-(q @ db.T), axis=1)[:, :100]
    recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(ids, truth)])
    assert recall >= 0.95, recall


def test_index_errors_and_junk_exclusion(tmp_path):
    rng = np.random.default_rng(6)
    index = GlobalIndex.build(8)
    with pytest.raises(UserError, match="index is empty"):
        index.search(_unit(rng, 1, 8), 3)
    bad = _unit(rng, 3, 8)
    bad[1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        index.add(bad)
    with pytest.raises(UserError, match="zero vector"):
        index.add(np.zeros((2, 8), np.float32))
    with pytest.raises(UserError, match="shape"):
        index.add(_unit(rng, 2, 9))
    db = _unit(rng, 10, 8)
    index.add(db)
    q = db[:1]
    _, ids = index.search(q, 3, exclude=[{0, 5}])
    assert 0 not in ids[0] and 5 not in ids[0] and len(ids[0]) == 3
    _, ids = index.search(q, 20)
    assert (ids[0, 10:] == -1).all()
    with pytest.raises(UserError, match="no saved index"):
        GlobalIndex.load(tmp_path)


def test_shortlist_formats(tmp_path):
    ids = np.array([[3, 1, 2], [0, 2, 1]])
    sims = np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.2]], np.float32)
    Shortlist(ids, sims).save(tmp_path / "sl")
    loaded = Shortlist.load(tmp_path / "sl_ids.npy")
    np.testing.assert_array_equal(loaded.ids, ids)
    import pickle

    import torch

    for container in (
        np.stack([sims, ids]).astype(np.float64),
        torch.tensor(np.stack([sims, ids])),
    ):
        with open(tmp_path / "nn.pkl", "wb") as f:
            pickle.dump(container, f)
        official = Shortlist.load(tmp_path / "nn.pkl")
        np.testing.assert_array_equal(official.ids, ids)
        np.testing.assert_allclose(official.sims, sims)
    raw = _unit(np.random.default_rng(0), 5, 4)
    raw.tofile(tmp_path / "g.pt")
    np.testing.assert_array_equal(read_raw_globals(tmp_path / "g.pt", 4), raw)
    with pytest.raises(UserError, match="multiple of 3"):
        read_raw_globals(tmp_path / "g.pt", 3)
