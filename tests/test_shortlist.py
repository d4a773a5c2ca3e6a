"""Shortlists (.npy pairs, official nn_*.pkl) and raw global descriptor files."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from locore.core.errors import UserError
from locore.indexing.shortlist import Shortlist, read_raw_globals, write_raw_globals

IDS = np.array([[3, 1, 2, 0], [0, 2, 1, -1]])
SIMS = np.array([[0.9, 0.5, 0.1, 0.0], [0.8, 0.7, 0.2, -np.inf]], np.float32)


def test_npy_round_trip_without_pickles(tmp_path):
    Shortlist(IDS.astype(np.int32), SIMS.astype(np.float64)).save(tmp_path / "out" / "shortlist")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["shortlist_ids.npy", "shortlist_sims.npy"]
    ids = np.load(tmp_path / "out" / "shortlist_ids.npy", allow_pickle=False)
    assert ids.dtype == np.int64
    for given in ("shortlist", "shortlist_ids.npy", "shortlist_sims.npy"):
        loaded = Shortlist.load(tmp_path / "out" / given)
        np.testing.assert_array_equal(loaded.ids, IDS)
        np.testing.assert_array_equal(loaded.sims, SIMS)
        assert loaded.ids.dtype == np.int64 and loaded.sims.dtype == np.float32
    short = loaded.truncate(2)
    np.testing.assert_array_equal(short.ids, IDS[:, :2])
    assert loaded.truncate(10).ids.shape == (2, 4)


def test_npy_errors(tmp_path):
    with pytest.raises(UserError, match="need both"):
        Shortlist.load(tmp_path / "none")
    with pytest.raises(UserError, match="differ"):
        Shortlist(IDS, SIMS[:, :3]).save(tmp_path / "bad")
    np.save(tmp_path / "x_ids.npy", IDS.astype(np.float32))
    np.save(tmp_path / "x_sims.npy", SIMS)
    with pytest.raises(UserError, match="not integer ids"):
        Shortlist.load(tmp_path / "x")
    np.save(tmp_path / "y_ids.npy", IDS)
    np.save(tmp_path / "y_sims.npy", SIMS[:1])
    with pytest.raises(UserError, match="differ"):
        Shortlist.load(tmp_path / "y")


@pytest.mark.parametrize("container", ["numpy_f64", "numpy_f32", "torch_pickle", "torch_save"])
def test_official_pickles(tmp_path, container):
    nn = np.stack([SIMS, IDS]).astype(np.float64)  # ids stored as floats (reference-spec §1.5)
    nn[0, 1, 3] = 0.0
    path = tmp_path / "nn_superglobal.pkl"
    if container == "torch_save":
        torch.save(torch.from_numpy(nn), path)
    else:
        data = {"numpy_f64": nn, "numpy_f32": nn.astype(np.float32)}.get(container)
        with open(path, "wb") as f:
            pickle.dump(torch.from_numpy(nn) if data is None else data, f)
    official = Shortlist.load(path)
    np.testing.assert_array_equal(official.ids, IDS)
    np.testing.assert_array_equal(official.sims, nn[0].astype(np.float32))
    assert official.ids.dtype == np.int64


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_official_reader_refuses_code_and_bad_arrays(tmp_path):
    target = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(Exploit(str(target)), f)
    with pytest.raises(UserError, match="refusing to load .*mkdir"):
        Shortlist.load(tmp_path / "evil.pkl")
    assert not target.exists()
    bad = {
        "shape": np.zeros((3, 2, 4)),
        "fraction": np.stack([SIMS, IDS + 0.5]),
        "nan": np.stack([SIMS, np.full(IDS.shape, np.nan)]),
    }
    for name, array in bad.items():
        with open(tmp_path / f"{name}.pkl", "wb") as f:
            pickle.dump(array, f)
        with pytest.raises(UserError, match=r"\[2, Q, M\]|whole-number"):
            Shortlist.load(tmp_path / f"{name}.pkl")
    (tmp_path / "text.pkl").write_text("hello")
    with pytest.raises(UserError, match="not an official"):
        Shortlist.load(tmp_path / "text.pkl")
    with pytest.raises(UserError, match="does not exist"):
        Shortlist.load(tmp_path / "missing.pkl")


def test_raw_global_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    path = write_raw_globals(tmp_path / "dinov2_gallery_global.pt", x)
    assert path.stat().st_size == 5 * 4 * 4  # headerless
    np.testing.assert_array_equal(np.fromfile(path, "<f4").reshape(5, 4), x)
    mapped = read_raw_globals(path, 4, count=5)
    np.testing.assert_array_equal(mapped, x)
    assert read_raw_globals(path, 2).shape == (10, 2)
    with pytest.raises(UserError, match="multiple of 3"):
        read_raw_globals(path, 3)
    with pytest.raises(UserError, match="holds 5 descriptors of dim 4, not 6"):
        read_raw_globals(path, 4, count=6)
    with pytest.raises(UserError, match="missing"):
        read_raw_globals(tmp_path / "none.pt", 4)
    with pytest.raises(UserError, match=r"\[N, D\]"):
        write_raw_globals(tmp_path / "bad.pt", x[0])
