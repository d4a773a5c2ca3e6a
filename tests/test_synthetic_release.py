"""The synthetic Revisited+1M release, read back by the project's own readers of the official
layouts, and the ``nn_*.pkl`` reader that cuts a whole-database file to ``depth`` while reading."""

import hashlib
import pickle

import numpy as np
import pytest
import torch

from locore.benchmarks.datasets.revisitop import read_gnd
from locore.benchmarks.datasets.synthetic_release import (
    NUM_DATABASE,
    NUM_QUERIES,
    PER_LANDMARK,
    ReleaseSpec,
    generate,
)
from locore.core.errors import UserError
from locore.indexing import shortlist as sl
from locore.indexing.local_store import LocalStore
from locore.indexing.shortlist import Shortlist, read_official, read_raw_globals

SPEC = ReleaseSpec(distractors=300, dim=16, num_local=6, nn_depth=50, seed=3)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic") / "release", SPEC)


def _digest(path):
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_the_release_reads_back_in_the_official_layouts(release):
    gnd = read_gnd(release / "roxford5k" / "gnd_roxford5k.pkl")
    assert len(gnd["imlist"]) == NUM_DATABASE and len(gnd["qimlist"]) == NUM_QUERIES
    first = gnd["gnd"][0]
    assert [len(first[k]) for k in PER_LANDMARK] == list(PER_LANDMARK.values())
    assert not set(first["easy"]) & set(first["hard"]) and first["bbx"] is not None

    full = release / "roxford5k+1m"
    n_db = NUM_DATABASE + SPEC.distractors
    with LocalStore(full / "dinov2_gallery_local.hdf5") as store:
        assert (len(store), store.num_local, store.dim) == (n_db, 6, 16)
        rows = store.rows(np.array([0, n_db - 1]))
    # Official columns: padding flag 0/1, padded rows all zero, unit descriptors, weights sorted.
    valid = rows[..., 3] == 0
    assert set(np.unique(rows[..., 3])) <= {0.0, 1.0} and valid[:, 0].all()
    np.testing.assert_allclose(np.linalg.norm(rows[valid][:, 5:], axis=1), 1, rtol=1e-5)
    assert not rows[~valid][:, 5:].any()
    assert (np.diff(rows[..., 4][valid.all(1)], axis=-1) <= 0).all()
    with LocalStore(release / "roxford5k" / "dinov2_query_local.hdf5") as queries:
        assert (len(queries), queries.dim) == (NUM_QUERIES, 16)

    q = np.asarray(read_raw_globals(release / "roxford5k" / "dinov2_query_global.pt", 16))
    db = np.asarray(read_raw_globals(full / "dinov2_gallery_global.pt", 16, n_db))
    # The shortlist is the exact top 50 of the globals, ids then sims as in nn[1], nn[0]
    # (float32 products: 1e-6 relative bound on values of magnitude <= 1).
    nn = read_official(full / "nn_superglobal.pkl")
    assert nn.ids.shape == (NUM_QUERIES, 50)
    sims = q @ db.T
    np.testing.assert_allclose(nn.sims, np.take_along_axis(sims, nn.ids, 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(nn.sims[:, -1], -np.sort(-sims, 1)[:, 49], rtol=1e-6, atol=1e-6)


def test_positives_share_structure_with_their_query(release):
    gnd = read_gnd(release / "roxford5k" / "gnd_roxford5k.pkl")["gnd"]
    full = release / "roxford5k+1m"
    q_glob = np.asarray(read_raw_globals(release / "roxford5k" / "dinov2_query_global.pt", 16))
    db_glob = np.asarray(read_raw_globals(full / "dinov2_gallery_global.pt", 16))
    distractors = np.arange(NUM_DATABASE, len(db_glob))
    with (
        LocalStore(release / "roxford5k" / "dinov2_query_local.hdf5") as qs,
        LocalStore(full / "dinov2_gallery_local.hdf5") as ds,
    ):

        def best_match(q, ids):  # mean over images of the best local-to-local cosine
            a, b = qs.rows(np.array([q]))[0, :, 5:], ds.rows(ids)[..., 5:]
            return float(np.einsum("kd,nld->nkl", a, b).max(axis=(1, 2)).mean())

        for q in (0, 37):
            g = gnd[q]
            glob = {k: (q_glob[q] @ db_glob[g[k]].T).mean() for k in ("easy", "hard", "junk")}
            glob["distractor"] = (q_glob[q] @ db_glob[distractors].T).mean()
            assert glob["easy"] > glob["hard"] > glob["junk"] > glob["distractor"]
            assert best_match(q, g["hard"]) > best_match(q, distractors[:50]) + 0.1


def test_generation_is_seeded_and_resumable(release, tmp_path):
    gallery = release / "roxford5k+1m" / "dinov2_gallery_local.hdf5"
    before = gallery.stat().st_mtime_ns
    assert generate(release, SPEC) == release and gallery.stat().st_mtime_ns == before
    again = generate(tmp_path / "again", SPEC)
    for name in ("dinov2_gallery_local.hdf5", "dinov2_gallery_global.pt"):
        assert _digest(again / "roxford5k+1m" / name) == _digest(release / "roxford5k+1m" / name)
    # The pickle holds a storage key torch makes from an address: compare what it holds.
    first, second = (
        read_official(r / "roxford5k+1m" / "nn_superglobal.pkl") for r in (release, again)
    )
    assert (first.ids == second.ids).all() and (first.sims == second.sims).all()
    other = generate(tmp_path / "again", ReleaseSpec(distractors=10, dim=8, num_local=4, seed=3))
    with LocalStore(other / "roxford5k+1m" / "dinov2_gallery_local.hdf5") as store:
        assert (len(store), store.dim) == (NUM_DATABASE + 10, 8)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="no release.json"):
        generate(tmp_path / "busy", SPEC)


def _containers(nn):
    """The containers official nn_*.pkl files come in: name -> writer."""

    def dump(obj, **kw):
        return lambda path: path.write_bytes(pickle.dumps(obj, **kw))

    return {
        "numpy_p3": dump(nn, protocol=3),
        "numpy_p5": dump(nn, protocol=5),
        "numpy_fortran": dump(np.asfortranarray(nn), protocol=4),
        "torch_pickle": dump(torch.from_numpy(nn)),
        "torch_pickle_strided": dump(torch.from_numpy(nn).transpose(1, 2).contiguous().mT),
        "torch_save": lambda path: torch.save(torch.from_numpy(nn), path),
    }


@pytest.mark.parametrize("container", list(_containers(np.zeros((2, 1, 1)))))
def test_a_whole_database_file_is_cut_to_depth_while_reading(tmp_path, container):
    # [2, 3, 60000] float64 = 2.9 MB: above LAZY_BYTES, so the values stay in the file.
    rng = np.random.default_rng(0)
    n = 60_000
    ids = np.stack([rng.permutation(n) for _ in range(3)]).astype(np.float64)
    nn = np.stack([rng.random((3, n)), ids])
    assert nn.nbytes > sl.LAZY_BYTES
    path = tmp_path / "nn_superglobal.pkl"
    _containers(nn)[container](path)
    cut = read_official(path, depth=40)
    assert cut.ids.tolist() == ids[:, :40].astype(np.int64).tolist()
    np.testing.assert_array_equal(cut.sims, nn[0, :, :40].astype(np.float32))
    whole = Shortlist.load(path)
    assert whole.ids.shape == (3, n) and (whole.ids == ids).all()
    assert Shortlist.load(path, depth=7).ids.shape == (3, 7)


def test_a_pickled_array_is_left_in_the_file_until_cut(tmp_path):
    # The unpickler skips the payload: it sees an array in the file, never its bytes.
    nn = np.zeros((2, 4, 100_000), np.float32)
    path = tmp_path / "nn.pkl"
    for obj in (nn, torch.from_numpy(nn)):
        path.write_bytes(pickle.dumps(obj))
        with open(path, "rb") as f:
            data = sl._ArrayUnpickler(f, path).load()
        data = getattr(data, "value", data)
        assert isinstance(data, sl._InFile) and data.shape == (2, 4, 100_000)
    # A file that ends inside the array is refused with its name, not read past its end.
    path.write_bytes(path.read_bytes()[:-200_000])
    with pytest.raises(UserError, match="nn.pkl"):
        read_official(path, depth=10)
