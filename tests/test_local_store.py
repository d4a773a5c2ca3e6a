"""Local store: our layout, official layouts, gather, crash/resume, shard joins, conversion."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from locore.core.errors import UserError
from locore.indexing import convert as convert_module
from locore.indexing import local_store as local_store_module
from locore.indexing.convert import convert, read_image_list, sort_rows
from locore.indexing.local_store import LocalStore, LocalStoreWriter, copy_rows, join_shards

K, D = 6, 8
W = 5 + D
ROOT = Path(__file__).resolve().parent.parent


def make_rows(rng: np.random.Generator, n: int, k: int = K, sort: bool = True) -> np.ndarray:
    """Rows in the official layout: unit descriptors, 1-3 padded rows per image at the end."""
    rows = np.zeros((n, k, W), np.float32)
    for i in range(n):
        valid = k - int(rng.integers(1, 4))
        desc = rng.normal(size=(valid, D))
        rows[i, :valid, 5:] = desc / np.linalg.norm(desc, axis=1, keepdims=True)
        rows[i, :valid, :2] = rng.random((valid, 2))
        rows[i, :valid, 2] = rng.integers(0, 3, valid)
        rows[i, :valid, 4] = np.sort(rng.random(valid))[::-1] if sort else rng.random(valid)
        rows[i, valid:, 3] = 1
    return rows


def write_store(path: Path, rows: np.ndarray, dtype: str = "float16", names=None, **kw) -> Path:
    names = names or [f"img{i:03d}.jpg" for i in range(len(rows))]
    with LocalStoreWriter(path, rows.shape[1], D, dtype, **kw) as writer:
        for start in range(0, len(rows), 4):
            writer.append(names[start : start + 4], rows[start : start + 4])
    return path


def naive_gather(path: Path, ids: np.ndarray, L: int) -> np.ndarray:
    """One h5py read per image: the reference for the vectorised reads (opened as the store's
    readers are, without HDF5's file lock: HDF5 reopens an open file only with the same flag)."""
    with h5py.File(path, "r", locking=False) as f:
        ds = f["features"]
        out = np.zeros((*ids.shape, L, W), np.float32)
        for index in np.ndindex(ids.shape):
            if ds.dtype.names:
                record = ds[int(ids[index])]
                out[index][:, :5] = record["metadata"][:L]
                out[index][:, 5:] = record["descriptor"][:L]
            else:
                out[index] = ds[int(ids[index]), :L]
    return out


def assert_batch_equals(batch, rows: np.ndarray) -> None:
    np.testing.assert_array_equal(batch.descriptors, rows[..., 5:])
    np.testing.assert_array_equal(batch.scales, rows[..., 2].astype(np.int64))
    np.testing.assert_array_equal(batch.mask, rows[..., 3] != 0)
    np.testing.assert_array_equal(batch.weights, rows[..., 4])
    assert batch.descriptors.dtype == np.float32 and batch.scales.dtype == np.int64


# ----------------------------------------------------------------------------------------------
# Our layout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_prefix_names_and_attrs(tmp_path, dtype):
    rng = np.random.default_rng(0)
    rows = make_rows(rng, 10)
    config = {"extractor": "dinov2", "options": {"k": 100}}
    path = write_store(tmp_path / "s.h5", rows, dtype, attrs={"config": config, "name": "x"})
    stored = rows.astype(dtype).astype(np.float32)
    with LocalStore(path) as store:
        assert (len(store), store.num_local, store.dim) == (10, K, D)
        assert store.names == [f"img{i:03d}.jpg" for i in range(10)]
        assert store.attrs["name"] == "x" and store.attrs["dtype"] == dtype
        assert store.attrs["config"] == '{"extractor": "dinov2", "options": {"k": 100}}'
        np.testing.assert_array_equal(store.rows(np.arange(10)), stored)
        np.testing.assert_array_equal(store.rows([7, 2, 7], L=3), stored[[7, 2, 7], :3])
    with h5py.File(path, "r") as f:  # chunked by image, in the requested precision
        assert f["features"].chunks == (1, K, W) and f["features"].dtype == np.dtype(dtype)
        assert f["features"].shape == (10, K, W)  # allocation trimmed at close


def test_resume_appends_and_checks_the_layout(tmp_path):
    rng = np.random.default_rng(1)
    rows = make_rows(rng, 7)
    path = tmp_path / "s.h5"
    with LocalStoreWriter(path, K, D) as writer:
        writer.append(["a", "b", "c"], rows[:3])
    with LocalStoreWriter(path, K, D) as writer:
        assert writer.names == ["a", "b", "c"] and writer.committed == 3
        writer.append(["d", "e", "f", "g"], rows[3:])
    with LocalStore(path) as store:
        assert store.names == list("abcdefg")
        np.testing.assert_array_equal(store.rows(np.arange(7)), rows.astype(np.float16))
    for k, d, dtype in ((K + 1, D, "float16"), (K, D + 1, "float16"), (K, D, "float32")):
        with pytest.raises(UserError, match="write to a new file"):
            LocalStoreWriter(path, k, d, dtype)


def test_writer_rejects_bad_input(tmp_path):
    rng = np.random.default_rng(2)
    rows = make_rows(rng, 2)
    with pytest.raises(UserError, match="float16 or float32"):
        LocalStoreWriter(tmp_path / "x.h5", K, D, "int8")
    with LocalStoreWriter(tmp_path / "s.h5", K, D, name_bytes=8) as writer:
        with pytest.raises(UserError, match="do not fit"):
            writer.append(["a", "b"], rows[:, :3])
        with pytest.raises(UserError, match="do not fit"):
            writer.append(["a"], rows)
        with pytest.raises(UserError, match="longer than 8 bytes"):
            writer.append(["a" * 9, "b"], rows)
        with pytest.raises(UserError, match="twice"):
            writer.append(["a", "a"], rows)
        bad = rows.copy()
        bad[1, 0, 7] = np.nan
        with pytest.raises(UserError, match="'b'.*NaN"):
            writer.append(["a", "b"], bad)
        writer.append(["a", "b"], rows)
        with pytest.raises(UserError, match="already in store"):
            writer.append(["b"], rows[:1])
    with h5py.File(tmp_path / "official.h5", "w") as f:
        f["features"] = rows
    with pytest.raises(UserError, match="not a store written by locore"):
        LocalStoreWriter(tmp_path / "official.h5", K, D)


def test_allocation_grows_ahead_and_uncommitted_rows_stay_invisible(tmp_path):
    rng = np.random.default_rng(3)
    rows = make_rows(rng, 5)
    path = tmp_path / "s.h5"
    writer = LocalStoreWriter(path, K, D, capacity=50)
    writer.append([str(i) for i in range(5)], rows)
    with h5py.File(path, "r") as f:
        assert f["features"].shape[0] == 50  # chunks exist before the rows arrive
    # a crashed writer: rows of a sixth image reached the file, the counter was never updated
    writer._features[5] = rows[0].astype(np.float16)
    writer.file.flush()
    with LocalStore(path) as store:
        assert len(store) == 5 and len(store.names) == 5
        with pytest.raises(UserError, match="outside store"):
            store.rows([5])
        with pytest.raises(UserError, match="outside store"):
            store.gather(np.array([[0, 5]]), 2)
    writer.close()
    writer.close()  # idempotent


LAYOUTS = ["ours16", "ours32", "flat", "flat_gzip", "compound", "compound_chunked", "joined"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_equals_a_naive_loop(tmp_path, layout):
    rng = np.random.default_rng(4)
    rows = make_rows(rng, 23)
    path = tmp_path / "s.h5"
    compound = np.zeros(23, [("metadata", "<f4", (K, 5)), ("descriptor", "<f2", (K, D))])
    compound["metadata"], compound["descriptor"] = rows[..., :5], rows[..., 5:]
    if layout.startswith("ours"):
        write_store(path, rows, "float16" if layout == "ours16" else "float32")
    elif layout == "joined":  # three shards, one of them empty
        bounds = [(0, 9), (9, 9), (9, 23)]
        names = [str(j) for j in range(23)]
        shards = [
            write_store(tmp_path / f"shard{i}.h5", rows[a:b], names=names[a:b])
            for i, (a, b) in enumerate(bounds)
        ]
        join_shards(shards, path)
    else:
        with h5py.File(path, "w") as f:
            if layout == "flat":
                f["features"] = rows
            elif layout == "flat_gzip":
                f.create_dataset("features", data=rows, chunks=(2, K, W), compression="gzip")
            elif layout == "compound":
                f["features"] = compound
            else:
                f.create_dataset("features", data=compound, chunks=(3,))
    ids = rng.integers(0, 23, size=(3, 9))
    ids[0, :4] = ids[1, 0]  # duplicates are read once and repeated
    with LocalStore(path) as store:
        batch = store.gather(ids, L=4)
        assert batch.descriptors.shape == (3, 9, 4, D)
        assert_batch_equals(batch, naive_gather(path, ids, 4))
        np.testing.assert_array_equal(store.rows(ids[0], L=K), naive_gather(path, ids[0], K))
        # uncompressed little-endian files are read directly from their byte addresses
        direct = [s.direct for s in store._segments if s.direct is not None]
        assert direct and all(direct) == (layout != "flat_gzip")


def test_gather_pads_missing_ids(tmp_path):
    rng = np.random.default_rng(5)
    rows = make_rows(rng, 4)
    with LocalStore(write_store(tmp_path / "s.h5", rows, "float32")) as store:
        batch = store.gather(np.array([[2, -1, 0]]), L=3)
        assert batch.mask[0, 1].all() and not batch.descriptors[0, 1].any()
        np.testing.assert_array_equal(batch.descriptors[0, 0], rows[2, :3, 5:])
        empty = store.gather(np.full((2, 3), -1), L=2)
        assert empty.mask.all() and empty.descriptors.shape == (2, 3, 2, D)


def test_reader_errors(tmp_path):
    rng = np.random.default_rng(6)
    with pytest.raises(UserError, match="does not exist"):
        LocalStore(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="not an HDF5 file"):
        LocalStore(tmp_path / "text.h5")
    cases = {
        "nofeatures": ("other", np.zeros((2, K, W), np.float32), "no 'features'"),
        "flat2d": ("features", np.zeros((2, 3), np.float32), r"not \[N, K, 5 \+ D\]"),
        "nodesc": ("features", np.zeros((2, K, 5), np.float32), r"not \[N, K, 5 \+ D\]"),
        "fields": ("features", np.zeros(2, [("a", "<f4", (K, 5)), ("b", "<f2", (K, D))]), "AMES"),
        "shapes": (
            "features",
            np.zeros(2, [("metadata", "<f4", (K, 4)), ("descriptor", "<f2", (K, D))]),
            r"metadata \[K, 5\]",
        ),
    }
    for name, (key, data, message) in cases.items():
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f[key] = data
        with pytest.raises(UserError, match=message):
            LocalStore(tmp_path / f"{name}.h5")
    path = write_store(tmp_path / "s.h5", make_rows(rng, 3))
    with h5py.File(path, "a") as f:
        f["committed"][0] = 99
    with pytest.raises(UserError, match="damaged"):
        LocalStore(path)
    with h5py.File(path, "a") as f:
        f["committed"][0] = 3
    with LocalStore(path) as store:
        with pytest.raises(UserError, match="stores 6"):
            store.rows([0], L=7)
        with pytest.raises(UserError, match="outside store"):
            store.rows([-2])


# ----------------------------------------------------------------------------------------------
# Crash safety: a real writer process killed with SIGKILL, then resumed
# ----------------------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from locore.indexing.local_store import LocalStoreWriter

    path, batches, kill_at, capacity = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    K, D, B = 6, 8, 4

    def batch(b):
        rng = np.random.default_rng(b)
        return [f"img{b}_{i}" for i in range(B)], rng.normal(size=(B, K, 5 + D)).astype("f4")

    if kill_at == "growth":  # SIGKILL in the middle of growing the allocation from 64 images
        import h5py
        resize = h5py.Dataset.resize

        def dying_resize(self, size, axis=None):
            if self.name == "/names" and size > 64:  # the features are already resized
                os.kill(os.getpid(), signal.SIGKILL)
            return resize(self, size, axis)

        h5py.Dataset.resize = dying_resize
    elif kill_at != "none":  # SIGKILL ourselves at an exact point of batch 3
        import h5py
        write = h5py.Dataset.__setitem__
        target = {"before_counter": "/committed", "before_names": "/names"}[kill_at]

        def dying_write(self, key, value):
            if self.name == target and writer.committed == 3 * B:
                os.kill(os.getpid(), signal.SIGKILL)
            return write(self, key, value)

        h5py.Dataset.__setitem__ = dying_write
    with LocalStoreWriter(path, K, D, capacity=int(capacity) or None) as writer:
        for b in range(writer.committed // B, batches):
            writer.append(*batch(b))
            print(writer.committed, flush=True)
    """
)


def run_child(script: Path, path: Path, batches: int, kill_at: str = "none", capacity: int = 0):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(script), str(path), str(batches), kill_at, str(capacity)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def store_content(path: Path) -> tuple:
    with h5py.File(path, "r") as f:
        n = int(f["committed"][0])
        features = f["features"][:n]
        return (
            features.view(np.uint16).tobytes(),  # bitwise, not numerically, equal
            f["names"][:n].tolist(),
            n,
            f["features"].shape,
            dict(f.attrs),
        )


@pytest.fixture(scope="module")
def child_script(tmp_path_factory) -> tuple[Path, Path]:
    """The writer script and the store it writes when nobody kills it."""
    folder = tmp_path_factory.mktemp("crash")
    script = folder / "child.py"
    script.write_text(CHILD)
    assert run_child(script, folder / "reference.h5", 10).wait() == 0
    return script, folder / "reference.h5"


@pytest.mark.parametrize("kill_at", ["before_counter", "before_names", "external"])
def test_kill_dash_9_then_resume_is_bitwise_equal(tmp_path, kill_at, child_script):
    script, reference = child_script
    path = tmp_path / "store.h5"
    if kill_at == "external":
        # capacity given: the run makes no metadata change, so a reader may watch it live
        child = run_child(script, path, 10_000, capacity=10_000)
        seen = 0
        while seen < 3 * 4:
            seen = int(child.stdout.readline())
            with LocalStore(path) as live:  # a reader never sees a partial batch
                assert len(live) % 4 == 0 and len(live) >= seen
        time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    else:
        child = run_child(script, path, 10, kill_at)
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    with LocalStore(path) as store, LocalStore(reference) as ref:
        n = len(store)
        assert n % 4 == 0 and n >= 12
        if kill_at != "external":
            assert n == 12
        n_ref = min(n, len(ref))
        np.testing.assert_array_equal(store.rows(np.arange(n_ref)), ref.rows(np.arange(n_ref)))
        assert store.names[:n_ref] == ref.names[:n_ref]
    if kill_at == "external":  # the killed run went past the reference: compare what it wrote
        return
    assert run_child(script, path, 10).wait() == 0  # resume
    assert store_content(path) == store_content(reference)


def test_kill_dash_9_while_the_allocation_grows_then_resume(tmp_path, child_script):
    """No capacity given: the allocation grows 64 -> 96 images at batch 17; a kill between
    resizing the features and the names loses nothing committed, and a resume is bitwise equal
    to an uninterrupted run."""
    script, _ = child_script
    reference, path = tmp_path / "reference.h5", tmp_path / "store.h5"
    assert run_child(script, reference, 20).wait() == 0
    child = run_child(script, path, 20, "growth")
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    with LocalStore(path) as store, LocalStore(reference) as ref:
        assert len(store) == 64
        np.testing.assert_array_equal(store.rows(np.arange(64)), ref.rows(np.arange(64)))
    assert run_child(script, path, 20).wait() == 0
    assert store_content(path) == store_content(reference)


# ----------------------------------------------------------------------------------------------
# Integrity and disk use
# ----------------------------------------------------------------------------------------------
def _flip(path: Path, image: int, offset: int) -> None:
    """Overwrite two bytes of one image's chunk with a finite float16 (0.5)."""
    with h5py.File(path, "r") as f:
        address = f["features"].id.get_chunk_info_by_coord((image, 0, 0)).byte_offset
    with open(path, "r+b") as f:
        f.seek(address + offset)
        f.write(np.float16(0.5).tobytes())


@pytest.mark.parametrize("direct", [True, False])
def test_a_damaged_image_is_named_never_used(tmp_path, monkeypatch, direct):
    rng = np.random.default_rng(12)
    rows = make_rows(rng, 9)
    path = write_store(tmp_path / "s.h5", rows)
    _flip(path, 5, 2 * (3 * W + 7))  # a descriptor value of row 3
    if not direct:  # HDF5's own reads verify the checksum too
        monkeypatch.setattr(local_store_module, "_map_segment", lambda segment: False)
    with LocalStore(path) as store:
        with pytest.raises(UserError, match=r"s.h5 is damaged: image 'img005.jpg' \(id 5\)"):
            store.rows([1, 5])
        with pytest.raises(UserError, match="img005.jpg"):
            store.gather(np.array([[0, 5, 7]]), L=2)  # a prefix: the whole image is verified
        good = [0, 1, 2, 3, 4, 6, 7, 8]
        np.testing.assert_array_equal(store.rows(good), rows[good].astype(np.float16))
        assert store._segments[0].direct == direct


def test_copy_rows_keeps_the_bits_and_the_attributes(tmp_path):
    rng = np.random.default_rng(13)
    rows = make_rows(rng, 7)
    path = write_store(tmp_path / "s.h5", rows, attrs={"images_root": "/a", "x": 1})
    copy_rows(path, tmp_path / "c.h5", [6, 0, 3], attrs={"images_root": "/b"})
    with LocalStore(path) as src, LocalStore(tmp_path / "c.h5") as dst:
        assert dst.names == ["img006.jpg", "img000.jpg", "img003.jpg"]
        assert (dst.attrs["images_root"], dst.attrs["x"], dst.attrs["dtype"]) == (
            "/b",
            1,
            "float16",
        )
        np.testing.assert_array_equal(dst.rows(np.arange(3)), src.rows([6, 0, 3]))
    with pytest.raises(UserError, match="exists"):
        copy_rows(path, tmp_path / "c.h5", [0])


def test_resume_replaces_the_attributes(tmp_path):
    rng = np.random.default_rng(14)
    path = write_store(tmp_path / "s.h5", make_rows(rng, 2), attrs={"images_root": "/old"})
    with LocalStoreWriter(path, K, D, attrs={"images_root": "/new"}):
        pass
    with LocalStore(path) as store:
        assert store.attrs["images_root"] == "/new" and len(store) == 2


def test_a_store_allocated_for_its_job_stays_within_a_few_percent_of_its_data(tmp_path):
    """HDF5 never gives back space once allocated: a store written with its capacity holds its
    rows, 4 checksum bytes per image, the names and a few KiB of HDF5 metadata."""
    k, d, n = 49, 112, 100  # the offline extractor's store: 11.5 KiB per image in float16
    rng = np.random.default_rng(15)
    rows = rng.normal(size=(n, k, 5 + d)).astype(np.float32)
    path = tmp_path / "s.h5"
    with LocalStoreWriter(path, k, d, capacity=n) as writer:
        for start in range(0, n, 8):
            writer.append(
                [f"img{i:05d}.jpg" for i in range(start, min(n, start + 8))],
                rows[start : start + 8],
            )
    data = n * k * (5 + d) * 2
    assert data < os.path.getsize(path) < 1.05 * data


# ----------------------------------------------------------------------------------------------
# Shards joined through a virtual dataset
# ----------------------------------------------------------------------------------------------
def test_join_shards(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    rows = make_rows(rng, 12)
    folder = tmp_path / "run"
    shards = [
        write_store(folder / "a.h5", rows[:5], names=[f"a{i}" for i in range(5)]),
        write_store(folder / "b.h5", rows[5:12], names=[f"b{i}" for i in range(7)]),
    ]
    # a shard whose writer died: allocation beyond the counter must not be joined
    crashed = LocalStoreWriter(folder / "c.h5", K, D, capacity=40)
    crashed.append(["c0"], rows[:1])
    crashed.file.close()
    shards.append(folder / "c.h5")
    joined = join_shards(shards, folder / "all.h5")
    expect = np.concatenate([rows, rows[:1]]).astype(np.float16).astype(np.float32)
    with LocalStore(joined) as store:
        assert len(store) == 13 and store.names[4:6] == ["a4", "b0"] and store.names[-1] == "c0"
        np.testing.assert_array_equal(store.rows(np.arange(13)), expect)
        assert store.attrs["shards"] == '["a.h5", "b.h5", "c.h5"]'
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)  # shard paths are relative to the joined file, not the cwd
    with LocalStore(moved / "all.h5") as store:
        ids = np.array([[12, 0, 7], [3, 3, 11]])
        assert_batch_equals(store.gather(ids, 5), expect[ids][..., :5, :])
    (moved / "b.h5").unlink()
    with pytest.raises(UserError, match="b.h5, which is missing"):
        LocalStore(moved / "all.h5")


def test_join_shards_errors(tmp_path):
    rng = np.random.default_rng(8)
    a = write_store(tmp_path / "a.h5", make_rows(rng, 3), names=["x", "y", "z"])
    b = write_store(tmp_path / "b.h5", make_rows(rng, 2), names=["z", "w"])
    with pytest.raises(UserError, match="'z' is in shards"):
        join_shards([a, b], tmp_path / "j.h5")
    c = write_store(tmp_path / "c.h5", make_rows(rng, 2), "float32", names=["u", "v"])
    with pytest.raises(UserError, match="one extraction"):
        join_shards([a, c], tmp_path / "j.h5")
    with h5py.File(tmp_path / "official.h5", "w") as f:
        f["features"] = make_rows(rng, 2).astype(np.float16)
    with pytest.raises(UserError, match="image names"):
        join_shards([a, tmp_path / "official.h5"], tmp_path / "j.h5")
    with pytest.raises(UserError, match="cannot also be one of its shards"):
        join_shards([a], a)
    assert not (tmp_path / "j.h5").exists()


# ----------------------------------------------------------------------------------------------
# Conversion from the official layouts
# ----------------------------------------------------------------------------------------------
def official_files(tmp_path: Path, rows: np.ndarray) -> dict[str, Path]:
    """The flat float32 and the compound AMES layouts of ``rows`` (reference-spec §1.3)."""
    flat, compound = tmp_path / "flat.hdf5", tmp_path / "compound.hdf5"
    with h5py.File(flat, "w") as f:
        f["features"] = rows
    records = np.zeros(len(rows), [("metadata", "<f4", (K, 5)), ("descriptor", "<f2", (K, D))])
    records["metadata"], records["descriptor"] = rows[..., :5], rows[..., 5:]
    with h5py.File(compound, "w") as f:
        f["features"] = records
    return {"flat": flat, "compound": compound}


@pytest.mark.parametrize("layout", ["flat", "compound"])
def test_convert_official_layouts(tmp_path, layout):
    rng = np.random.default_rng(9)
    rows = make_rows(rng, 9, sort=False)  # weights out of order: the converter sorts
    src = official_files(tmp_path, rows)[layout]
    listing = tmp_path / "test_gallery.txt"
    listing.write_text("".join(f"jpg/im{i}.jpg,0,768,1024\n" for i in range(9)) + "\n")
    names = read_image_list(listing)
    dst = convert(src, tmp_path / "ours.h5", names=names, num_local=4)
    expect = sort_rows(rows)
    assert (np.diff(np.where(expect[..., 3] == 0, expect[..., 4], -1), axis=1) <= 0).all()
    expect = expect[:, :4].astype(np.float16).astype(np.float32)
    with LocalStore(dst) as store:
        assert store.names == [f"jpg/im{i}.jpg" for i in range(9)] and store.num_local == 4
        assert store.attrs["source_layout"] == layout and store.attrs["source_num_local"] == K
        np.testing.assert_array_equal(store.rows(np.arange(9)), expect)


def test_convert_resumes_and_checks_padding(tmp_path, monkeypatch):
    rng = np.random.default_rng(10)
    rows = make_rows(rng, 10)
    files = official_files(tmp_path, rows)
    full = convert(files["flat"], tmp_path / "full.h5")
    monkeypatch.setattr(convert_module, "BATCH_BYTES", 3 * K * W * 4)  # 3 images per batch
    calls = []
    append = LocalStoreWriter.append

    def failing_append(self, names, batch):
        calls.append(len(names))
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted during the second batch
        append(self, names, batch)

    monkeypatch.setattr(LocalStoreWriter, "append", failing_append)
    with pytest.raises(KeyboardInterrupt):
        convert(files["flat"], tmp_path / "part.h5")
    monkeypatch.setattr(LocalStoreWriter, "append", append)
    with LocalStore(tmp_path / "part.h5") as store:
        assert len(store) == 3
    convert(files["flat"], tmp_path / "part.h5")
    assert store_content(tmp_path / "part.h5")[:3] == store_content(full)[:3]
    with pytest.raises(UserError, match="other images"):
        convert(files["flat"], tmp_path / "part.h5", names=[f"n{i}" for i in range(10)])
    # a file that marks valid rows with 1 is caught, and read correctly when told
    inverted = rows.copy()
    inverted[..., 3] = 1 - inverted[..., 3]
    (tmp_path / "inv").mkdir()
    src = official_files(tmp_path / "inv", inverted)
    with pytest.raises(UserError, match="pass --invert-padding"):
        convert(src["compound"], tmp_path / "inv.h5")
    convert(src["compound"], tmp_path / "inv_ok.h5", invert_padding=True)
    with LocalStore(tmp_path / "inv_ok.h5") as a, LocalStore(full) as b:
        np.testing.assert_array_equal(a.rows(np.arange(10)), b.rows(np.arange(10)))


def test_convert_errors_and_cli(tmp_path):
    rng = np.random.default_rng(11)
    src = official_files(tmp_path, make_rows(rng, 3))["flat"]
    with pytest.raises(UserError, match="3 images"):
        convert(src, tmp_path / "o.h5", names=["a"])
    with pytest.raises(UserError, match="stores 6 rows"):
        convert(src, tmp_path / "o.h5", num_local=7)
    with pytest.raises(UserError, match="onto itself"):
        convert(src, src)
    with pytest.raises(UserError, match="does not exist"):
        read_image_list(tmp_path / "nope.txt")
    import argparse

    parser = argparse.ArgumentParser()
    convert_module.add_arguments(parser)
    args = parser.parse_args([str(src), str(tmp_path / "cli.h5"), "--dtype", "float32"])
    assert convert_module.run(args) == 0
    with LocalStore(tmp_path / "cli.h5") as store, LocalStore(src) as official:
        assert store.names == ["0", "1", "2"]
        np.testing.assert_array_equal(store.rows(np.arange(3)), official.rows(np.arange(3)))


def test_an_open_reader_does_not_block_a_writer_in_another_process(tmp_path):
    """A server keeps the store open for reading; `locore index` in another process must still
    append to it, and the reader then sees the new committed rows."""
    path = tmp_path / "s.h5"
    with LocalStoreWriter(path, 4, D, "float32", capacity=8) as writer:
        writer.append(["a"], np.zeros((1, 4, W), np.float32))
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from locore.indexing.local_store import LocalStoreWriter\n"
        f"with LocalStoreWriter(Path({str(path)!r}), 4, {D}, 'float32') as w:\n"
        f"    w.append(['b'], np.ones((1, 4, {W}), np.float32))\n"
    )
    with LocalStore(path) as reader:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-500:]
    with LocalStore(path) as reader:
        assert reader.names == ["a", "b"]


def test_a_store_is_created_whole_and_a_cut_creation_leaves_nothing_at_its_path(tmp_path):
    """A new store is built in a temporary sibling and renamed: what a writer killed mid-creation
    leaves (here, a truncated HDF5 header at the temporary name) never blocks the next writer."""
    path = tmp_path / "s.h5"
    (tmp_path / f".locore-tmp-{path.name}").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 8)
    with LocalStoreWriter(path, 4, D, "float32", capacity=2) as writer:
        writer.append(["a"], np.zeros((1, 4, W), np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]
    with LocalStore(path) as reader:
        assert reader.names == ["a"]
