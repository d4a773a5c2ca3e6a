"""Global index: exact kinds equal brute force, IVF-PQ recall, exclusion, atomic save, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import faiss
import numpy as np
import pytest

from locore.core.errors import UserError
from locore.indexing import global_index
from locore.indexing.global_index import GlobalIndex, default_m, default_nlist


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin against each other on a shared 2-core machine (k-means ~5x
    slower); one thread keeps these small tests fast."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, d: int, queries: int):
    """Descriptors around 200 centres (like real collections) and queries near database items."""
    centres = unit(rng.normal(size=(200, d)))
    db = unit(centres[rng.integers(0, 200, n)] + 0.15 * rng.normal(size=(n, d)))
    q = unit(db[:queries] + 0.05 * rng.normal(size=(queries, d)))
    return db, q


def brute_force(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = q.astype(np.float64) @ db.T.astype(np.float64)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


def assert_sims_close(got: np.ndarray, want: np.ndarray, eps: float) -> None:
    """Similarities agree within ``eps`` of the largest one compared (float32 sums round
    differently across CPUs, BLAS builds and thread counts, in proportion to the values)."""
    np.testing.assert_allclose(got, want, rtol=0, atol=eps * float(np.abs(want).max()))


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(ids, truth)]))


EXACT = [("flat", {}), ("torch", {"chunk": 64}), ("torch", {"chunk": 1000})]


@pytest.mark.parametrize(("kind", "options"), EXACT)
@pytest.mark.parametrize("k", [1, 10, 150, 300])
def test_exact_kinds_equal_brute_force(kind, options, k):
    rng = np.random.default_rng(0)
    db, q = unit(rng.normal(size=(300, 24))), unit(rng.normal(size=(5, 24)))
    index = GlobalIndex.build(24, kind, **options)
    index.add(db[:170])
    index.add(db[170:])  # several adds, one id space
    sims, ids = index.search(q, k)
    want_sims, want_ids = brute_force(q, db, k)
    assert sims.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (5, k)
    np.testing.assert_array_equal(ids, want_ids)
    assert_sims_close(sims, want_sims, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_exact_kinds_on_the_gpu(kind, device):
    rng = np.random.default_rng(1)
    db, q = unit(rng.normal(size=(5000, 64))), unit(rng.normal(size=(7, 64)))
    index = GlobalIndex.build(64, kind, device=device, chunk=1024)
    index.add(db)
    sims, ids = index.search(q, 100)
    want_sims, want_ids = brute_force(q, db, 100)
    assert recall(ids, want_ids) >= 0.99  # float16 scores may swap near-ties
    assert_sims_close(sims, want_sims, 2e-3)


def test_fewer_results_than_k_are_padded():
    rng = np.random.default_rng(2)
    db = unit(rng.normal(size=(4, 8)))
    for kind in ("flat", "torch", "hnsw"):
        index = GlobalIndex.build(8, kind)
        index.add(db)
        sims, ids = index.search(db[:2], 6)
        assert (ids[:, 4:] == -1).all() and np.isneginf(sims[:, 4:]).all()
        assert sorted(ids[0, :4]) == [0, 1, 2, 3] and ids[0, 0] == 0


def test_hnsw_finds_nearly_all_neighbours():
    rng = np.random.default_rng(3)
    db, q = clustered(rng, 3000, 32, 10)
    index = GlobalIndex.build(32, "hnsw")
    index.add(db)
    _, ids = index.search(q, 10)
    assert recall(ids, brute_force(q, db, 10)[1]) >= 0.95


def test_ivfpq_recall_at_100_with_default_settings():
    rng = np.random.default_rng(4)
    db, q = clustered(rng, 6000, 32, 20)
    index = GlobalIndex.build(32, "ivfpq")
    index.train(db)
    index.add(db)
    assert index.options["nlist"] == default_nlist(6000) == 309
    _, ids = index.search(q, 100)
    assert recall(ids, brute_force(q, db, 100)[1]) >= 0.95
    coarse = GlobalIndex.build(32, "ivfpq", refine="none", nlist=64)  # codes only: coarser
    coarse.train(db)
    coarse.add(db)
    assert recall(coarse.search(q, 100)[1], brute_force(q, db, 100)[1]) < 0.95


def test_defaults_by_hand():
    assert [default_m(d) for d in (768, 2048, 64, 32, 100, 8)] == [64, 64, 8, 4, 10, 1]
    assert [default_nlist(n) for n in (10, 10_000, 1_000_000)] == [16, 400, 4000]


@pytest.mark.parametrize("kind", ["flat", "torch", "ivfpq"])
def test_exclusion_matches_brute_force_without_those_ids(kind):
    rng = np.random.default_rng(5)
    db, q = clustered(rng, 2000, 16, 3)
    index = GlobalIndex.build(16, kind, **({"nlist": 16, "nprobe": 16} if kind == "ivfpq" else {}))
    index.train(db)
    index.add(db)
    _, top = brute_force(q, db, 30)
    junk = [set(top[0, :10].tolist()), set(), set(top[2, ::2].tolist())]
    sims, ids = index.search(q, 20, exclude=junk)
    for row, bad in zip(range(3), junk):
        keep = [i for i in top[row] if i not in bad][:20]
        assert not set(ids[row]) & bad
        assert recall(ids[row : row + 1], np.array([keep])) >= (1.0 if kind != "ivfpq" else 0.9)
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    with pytest.raises(UserError, match="2 sets for 3 queries"):
        index.search(q, 5, exclude=[set(), set()])


SAVED = [("flat", {}), ("torch", {"chunk": 50}), ("hnsw", {}), ("ivfpq", {"refine": "flat"})]


@pytest.mark.parametrize(("kind", "options"), SAVED)
def test_save_load_round_trip(tmp_path, kind, options):
    rng = np.random.default_rng(6)
    db, q = clustered(rng, 600, 16, 4)
    index = GlobalIndex.build(16, kind, **options)
    index.train(db)
    names = [f"dir/img {i}.jpg" for i in range(599)] + ["odd\nname ü"]
    index.add(db, names)
    index.save(tmp_path / "ix")
    loaded = GlobalIndex.load(tmp_path / "ix", dim=16)
    assert (loaded.kind, loaded.dim, len(loaded), loaded.names) == (kind, 16, 600, names)
    for a, b in zip(index.search(q, 25), loaded.search(q, 25)):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]


def test_save_is_atomic(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    first, second = GlobalIndex.build(8), GlobalIndex.build(8)
    first.add(unit(rng.normal(size=(5, 8))), list("abcde"))
    second.add(unit(rng.normal(size=(3, 8))), list("xyz"))
    first.save(tmp_path / "ix")
    second.save(tmp_path / "ix")  # replaces the whole folder
    assert GlobalIndex.load(tmp_path / "ix").names == list("xyz")

    real_open_memmap = np.lib.format.open_memmap

    def broken(path, mode="r+", **kwargs):  # a disk that fills up while a segment is written
        if mode != "w+":
            return real_open_memmap(path, mode=mode, **kwargs)
        with open(path, "wb") as f:
            f.write(b"half a segm")
        raise RuntimeError("disk full")

    monkeypatch.setattr(np.lib.format, "open_memmap", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        first.save(tmp_path / "ix")
    assert GlobalIndex.load(tmp_path / "ix").names == list("xyz")  # old index untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]  # no temporary left over
    # a save killed between its two renames leaves only the previous copy: it still loads
    os.replace(tmp_path / "ix", tmp_path / ".ix.old")
    assert GlobalIndex.load(tmp_path / "ix").names == list("xyz")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(UserError, match="not an index"):
        first.save(tmp_path / "other")


@pytest.mark.parametrize(("kind", "options"), SAVED)
def test_clear_and_refill_keeps_the_training(tmp_path, kind, options):
    """A loaded index emptied and refilled with other vectors searches like the original one
    emptied and refilled the same way (ivfpq codebooks are kept, not retrained)."""
    rng = np.random.default_rng(11)
    db, q = clustered(rng, 600, 16, 4)
    index = GlobalIndex.build(16, kind, **options)
    index.train(db)
    index.add(db)
    index.save(tmp_path / "ix")
    loaded = GlobalIndex.load(tmp_path / "ix")
    loaded.clear()
    assert len(loaded) == 0 and loaded.names == []
    index.clear()
    index.add(db[::-1][:500], [f"n{i}" for i in range(500)])
    loaded.add(db[::-1][:500], [f"n{i}" for i in range(500)])
    assert loaded.names == index.names and len(loaded) == 500
    (sims_a, ids_a), (sims_b, ids_b) = index.search(q, 25), loaded.search(q, 25)
    np.testing.assert_array_equal(ids_a, ids_b)
    # unit vectors in 16-d: float32 inner products agree within 16 x 2^-24 (summation order)
    assert_sims_close(sims_a, sims_b, 2e-6)


def test_recover_restores_or_drops_what_a_killed_save_left(tmp_path):
    rng = np.random.default_rng(12)
    index = GlobalIndex.build(8)
    index.add(unit(rng.normal(size=(3, 8))), list("abc"))
    index.save(tmp_path / "ix")
    os.replace(tmp_path / "ix", tmp_path / ".ix.old")  # killed between the two renames
    (tmp_path / ".ix.tmp1234").mkdir()  # killed while writing
    assert global_index.exists(tmp_path / "ix")
    global_index.recover(tmp_path / "ix")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]
    assert GlobalIndex.load(tmp_path / "ix").names == list("abc")
    shutil.copytree(tmp_path / "ix", tmp_path / ".ix.old")  # killed after both renames
    global_index.recover(tmp_path / "ix")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]
    assert not global_index.exists(tmp_path / "none")


def test_load_checks_the_saved_index(tmp_path):
    rng = np.random.default_rng(8)
    index = GlobalIndex.build(8)
    index.add(unit(rng.normal(size=(6, 8))))
    index.save(tmp_path / "ix")
    with pytest.raises(UserError, match="holds 8-d descriptors, not 16-d"):
        GlobalIndex.load(tmp_path / "ix", dim=16)
    meta_path = tmp_path / "ix" / "index.json"
    meta = json.loads(meta_path.read_text())
    for change, message in (
        ({"metric": "l2"}, "metric 'l2'"),
        ({"dim": 9}, r"\(6, 8\), not \[N, 9\]"),
    ):
        meta_path.write_text(json.dumps({**meta, **change}))
        with pytest.raises(UserError, match=message):
            GlobalIndex.load(tmp_path / "ix")
    meta_path.write_text("{broken")
    with pytest.raises(UserError, match="damaged"):
        GlobalIndex.load(tmp_path / "ix")
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "ix" / "names.json").write_text('["a"]')
    with pytest.raises(UserError, match="6 vectors but 1 names"):
        GlobalIndex.load(tmp_path / "ix")
    meta_path.write_text(json.dumps({**meta, "format": 3}))
    with pytest.raises(UserError, match="format 3, newer than this locore's 2; upgrade"):
        GlobalIndex.load(tmp_path / "ix")
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "ix" / "names.json").write_text(json.dumps(list("abcdef")))
    (tmp_path / "ix" / meta["segments"][0]["file"]).write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        GlobalIndex.load(tmp_path / "ix")
    (tmp_path / "ix" / meta["segments"][0]["file"]).unlink()
    with pytest.raises(UserError, match="missing or damaged"):
        GlobalIndex.load(tmp_path / "ix")
    with pytest.raises(UserError, match="no saved index"):
        GlobalIndex.load(tmp_path / "nothing")


def test_bad_vectors_and_options():
    rng = np.random.default_rng(9)
    index = GlobalIndex.build(8)
    with pytest.raises(UserError, match="index is empty"):
        index.search(unit(rng.normal(size=(1, 8))), 3)
    good = unit(rng.normal(size=(3, 8)))
    cases = {
        "NaN": good.copy(),
        "infinite": good.copy(),
        "zero vector": good.copy(),
        "not L2-normalised": good * 2,
        r"shape \(3, 9\)": unit(rng.normal(size=(3, 9))),
    }
    cases["NaN"][1, 2] = np.nan
    cases["infinite"][2, 0] = np.inf
    cases["zero vector"][0] = 0
    for message, x in cases.items():
        with pytest.raises(UserError, match=message):
            index.add(x)
    with pytest.raises(UserError, match="2 names for 3"):
        index.add(good, ["a", "b"])
    index.add(good)
    for message, x in cases.items():
        with pytest.raises(UserError, match=message):
            index.search(x, 2)
    with pytest.raises(UserError, match="k >= 1"):
        index.search(good, 0)
    with pytest.raises(UserError, match="unknown index kind"):
        GlobalIndex.build(8, "lsh")
    with pytest.raises(UserError, match="unknown option 'nlist' for index kind 'flat'"):
        GlobalIndex.build(8, "flat", nlist=4)
    with pytest.raises(UserError, match="m=3 must divide"):
        GlobalIndex.build(8, "ivfpq", m=3)
    with pytest.raises(UserError, match="refine"):
        GlobalIndex.build(8, "ivfpq", refine=True)
    with pytest.raises(UserError, match="is not a device name"):
        GlobalIndex.build(8, device="tpu")
    ivf = GlobalIndex.build(8, "ivfpq")
    with pytest.raises(UserError, match="not trained"):
        ivf.add(good)
    with pytest.raises(UserError, match="at least 256 training vectors"):
        ivf.train(unit(rng.normal(size=(100, 8))))


def test_cuda_request_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        GlobalIndex.build(8, device="cuda")
    assert GlobalIndex.build(8, device="auto").device == "cpu"


def test_torch_kind_needs_no_faiss_and_maps_its_vectors(tmp_path):
    """A GPU image may lack faiss: the torch kind builds, saves, loads (memory-mapped) and
    searches with faiss made unimportable, and equals brute force."""
    script = f"""
import sys
sys.modules["faiss"] = None  # any import of faiss now fails
import numpy as np
from locore.indexing.global_index import GlobalIndex
rng = np.random.default_rng(0)
x = rng.normal(size=(300, 16)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
index = GlobalIndex.build(16, "torch")
index.add(x[:200])
index.add(x[200:])
index.save(__import__("pathlib").Path({str(tmp_path / "idx")!r}))
loaded = GlobalIndex.load(__import__("pathlib").Path({str(tmp_path / "idx")!r}))
assert all(isinstance(s.rows, np.memmap) for s in loaded._backend.segments)
sims, ids = loaded.search(x[:5], 10)
want = np.argsort(-(x[:5] @ x.T), axis=1, kind="stable")[:, :10]
assert (ids == want).all(), (ids, want)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def segment_files(directory) -> list[str]:
    return [e["file"] for e in json.loads((directory / "index.json").read_text())["segments"]]


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_a_grown_exact_index_keeps_its_files_and_writes_only_new_rows(tmp_path, kind):
    """Growth (issue #16): the saved segments are hard-linked, never rewritten, the added rows
    are a new file, and segments merge like a binary counter; every state equals brute force."""
    rng = np.random.default_rng(13)
    db = unit(rng.normal(size=(180, 16)))
    q = unit(rng.normal(size=(4, 16)))
    index = GlobalIndex.build(16, kind)
    index.add(db[:100], [f"i{i}" for i in range(100)])
    index.save(tmp_path / "ix")
    (base,) = segment_files(tmp_path / "ix")
    base_inode = os.stat(tmp_path / "ix" / base).st_ino
    sizes, n = [], 100
    for _ in range(8):
        loaded = GlobalIndex.load(tmp_path / "ix")
        loaded.add(db[n : n + 10], [f"i{i}" for i in range(n, n + 10)])
        loaded.save(tmp_path / "ix")
        n += 10
        files = segment_files(tmp_path / "ix")
        assert files[0] == base and os.stat(tmp_path / "ix" / base).st_ino == base_inode
        reloaded = GlobalIndex.load(tmp_path / "ix")
        sizes.append([len(rows) for rows in reloaded._backend.rows()])
        assert reloaded.names == [f"i{i}" for i in range(n)]
        for got in (loaded.search(q, 30), reloaded.search(q, 30)):
            want_sims, want_ids = brute_force(q, db[:n], 30)
            np.testing.assert_array_equal(got[1], want_ids)
            assert_sims_close(got[0], want_sims, 2e-6)
    assert sizes == [
        [100, 10],
        [100, 20],
        [100, 20, 10],
        [100, 40],
        [100, 40, 10],
        [100, 40, 20],
        [100, 40, 20, 10],
        [100, 80],
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_a_segment_is_linked_only_from_its_own_file(tmp_path, monkeypatch, kind):
    """Another index saved over the folder has files of the same names: they are not taken
    for this index's; and where the file system cannot hard-link, the files are copied."""
    rng = np.random.default_rng(14)
    mine, other, more = (unit(rng.normal(size=(n, 8))) for n in (6, 6, 2))
    first, second = GlobalIndex.build(8, kind), GlobalIndex.build(8, kind)
    first.add(mine)
    second.add(other)
    first.save(tmp_path / "ix")
    second.save(tmp_path / "ix")  # same segment name, other vectors
    first.add(more)
    first.save(tmp_path / "ix")
    _, ids = GlobalIndex.load(tmp_path / "ix").search(np.concatenate([mine, more]), 1)
    assert ids[:, 0].tolist() == list(range(8))

    def no_links(src, dst):
        raise OSError("links are not supported here")

    monkeypatch.setattr(os, "link", no_links)
    grown = GlobalIndex.load(tmp_path / "ix")
    grown.add(unit(rng.normal(size=(1, 8))))
    grown.save(tmp_path / "copied")
    files = segment_files(tmp_path / "copied")
    assert files == [*segment_files(tmp_path / "ix"), f"segment-{8:012d}-{9:012d}.npy"]
    copied, linked_from = (os.stat(tmp_path / d / files[0]) for d in ("copied", "ix"))
    assert copied.st_ino != linked_from.st_ino and copied.st_size == linked_from.st_size
    a, b = GlobalIndex.load(tmp_path / "copied").search(mine, 3), grown.search(mine, 3)
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_a_format_1_index_still_loads_and_grows(tmp_path, kind):
    """Indexes saved before segments (one ``index.faiss`` or ``vectors.npy``) load, search and
    grow; the old file becomes the first segment, under a new name."""
    rng = np.random.default_rng(15)
    db, q = unit(rng.normal(size=(40, 8))), unit(rng.normal(size=(3, 8)))
    old = tmp_path / "ix"
    old.mkdir()
    if kind == "flat":
        flat = faiss.IndexFlatIP(8)
        flat.add(db[:30])
        faiss.write_index(flat, str(old / "index.faiss"))
    else:
        np.save(old / "vectors.npy", db[:30])
    meta = {"format": 1, "kind": kind, "dim": 8, "metric": "inner_product", "count": 30}
    (old / "index.json").write_text(json.dumps({**meta, "options": {}}))
    (old / "names.json").write_text(json.dumps([str(i) for i in range(30)]))
    index = GlobalIndex.load(old)
    np.testing.assert_array_equal(index.search(q, 5)[1], brute_force(q, db[:30], 5)[1])
    old_inode = os.stat(old / global_index.FORMAT_1_FILE[kind]).st_ino
    index.add(db[30:])
    index.save(old)
    assert os.stat(old / segment_files(old)[0]).st_ino == old_inode  # linked, not rewritten
    grown = GlobalIndex.load(old)
    assert json.loads((old / "index.json").read_text())["format"] == 2 and len(grown) == 40
    np.testing.assert_array_equal(grown.search(q, 40)[1], brute_force(q, db, 40)[1])


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_an_empty_exact_index_round_trips(tmp_path, kind):
    GlobalIndex.build(8, kind).save(tmp_path / "ix")
    loaded = GlobalIndex.load(tmp_path / "ix")
    assert len(loaded) == 0 and segment_files(tmp_path / "ix") == []
    loaded.add(unit(np.random.default_rng(16).normal(size=(2, 8))), ["a", "b"])
    loaded.save(tmp_path / "ix")
    assert GlobalIndex.load(tmp_path / "ix").names == ["a", "b"]


def test_mapped_segments_search_after_faiss_torch_utils_is_imported(tmp_path):
    """pytorch-metric-learning imports ``faiss.contrib.torch_utils``, which makes FAISS take a
    memmap for a torch tensor; a loaded (mapped) flat index must still search and grow."""
    script = f"""
import faiss.contrib.torch_utils
import numpy as np
from pathlib import Path
from locore.indexing.global_index import GlobalIndex
x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
index = GlobalIndex.build(8)
index.add(x[:40])
index.save(Path({str(tmp_path / "ix")!r}))
loaded = GlobalIndex.load(Path({str(tmp_path / "ix")!r}))
loaded.add(x[40:])
_, ids = loaded.search(x[:5], 10)
assert (ids == np.argsort(-(x[:5] @ x.T), axis=1, kind="stable")[:, :10]).all(), ids
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("raw_name", ["global.f32", "dinov2_gallery_global.pt"])
@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_rows_of_a_raw_file_are_shared_not_copied(tmp_path, kind, raw_name):
    """``add_file``: an exact index holds the extraction's ``global.f32`` by a hard link; rows
    appended to that file extend the same segment; a replaced file (what removing images does)
    leaves the saved rows as they were; rows past the file's end are a one-line error."""
    rng = np.random.default_rng(17)
    db, q = unit(rng.normal(size=(50, 8))), unit(rng.normal(size=(4, 8)))
    raw = tmp_path / raw_name  # ours or the official raw layout
    db[:30].tofile(raw)
    index = GlobalIndex.build(8, kind)
    index.add_file(raw, 0, [f"i{i}" for i in range(30)])
    index.save(tmp_path / "ix")
    with open(raw, "ab") as f:  # the extraction appends
        f.write(db[30:40].tobytes())
    grown = GlobalIndex.load(tmp_path / "ix")
    grown.add_file(raw, 30, [f"i{i}" for i in range(30, 40)])
    grown.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert [(e["start"], e["rows"]) for e in meta["segments"]] == [(0, 40)]
    linked = tmp_path / "ix" / meta["segments"][0]["file"]
    assert os.stat(linked).st_ino == os.stat(raw).st_ino
    np.testing.assert_array_equal(GlobalIndex.load(tmp_path / "ix").search(q, 40)[1],
                                  brute_force(q, db[:40], 40)[1])  # fmt: skip
    # removing images writes a new file under the same name: the index keeps the old rows
    replaced = tmp_path / "new.f32"
    np.concatenate([unit(rng.normal(size=(40, 8))), db[40:]]).tofile(replaced)
    os.replace(replaced, raw)
    again = GlobalIndex.load(tmp_path / "ix")
    again.add_file(raw, 40, [f"i{i}" for i in range(40, 50)])  # rows 40-49 of the new file
    again.save(tmp_path / "ix")
    np.testing.assert_array_equal(GlobalIndex.load(tmp_path / "ix").search(q, 50)[1],
                                  brute_force(q, db, 50)[1])  # fmt: skip
    assert len(segment_files(tmp_path / "ix")) == 2
    with pytest.raises(UserError, match="does not hold rows 45 to 55 of 8 float32"):
        again.add_file(raw, 45, [str(i) for i in range(10)])


def test_rows_of_a_raw_file_are_encoded_by_compressed_kinds(tmp_path):
    rng = np.random.default_rng(18)
    db, q = clustered(rng, 600, 16, 4)
    db.tofile(tmp_path / "global.f32")
    index = GlobalIndex.build(16, "hnsw")
    index.add_file(tmp_path / "global.f32", 100, [str(i) for i in range(500)])
    assert len(index) == 500 and index.names[0] == "0"
    assert recall(index.search(q, 20)[1], brute_force(q, db[100:], 20)[1]) >= 0.9
