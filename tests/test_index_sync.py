"""An index mirrors its folder; the config is validated before anything is written; damage and
interrupted runs are found and repaired.

Collections are ten small photos (128 px) indexed with the offline extractor at 128 px. Descriptors
of one image may differ between two builds only by how images were batched: globals within
float32 rounding (atol 1e-6), float16 local rows within one float16 step at 1 (atol 2e-3), the
bounds used by tests/test_extract_runtime.py; scores computed from them within rtol 1e-4 +
atol 1e-5 (cosines and the re-ranker's sigmoid-fused scores lie in [0, 1]).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil

import cv2
import numpy as np
import pytest
from skimage import data

from locore.cli import main
from locore.core import config as cfg
from locore.core.errors import UserError
from locore.core.layout import GLOBAL_FILE, LOCAL_FILE
from locore.engine.config import PipelineConfig
from locore.engine.pipeline import (
    SyncReport,
    _fingerprints,
    build_extractor,
    build_index,
    open_index,
    search,
)
from locore.indexing.global_index import GlobalIndex
from locore.indexing.local_store import LocalStore
from locore.indexing.shortlist import read_raw_globals

SETTINGS = ["extractor.options.imsize=128", "extractor.device=cpu", "search.topk=20"]
CONFIG = cfg.load(PipelineConfig, None, SETTINGS)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
# LoCoRe re-ranking with the committed demo checkpoint: reads the stored local descriptors
RERANK = json.dumps(
    [
        {
            "name": "locore",
            "options": {
                "checkpoint": "locore://rerank/checkpoints/locore_demo",
                "topk": 8,
                "window": 8,
                "stride": 4,
                "device": "cpu",
            },
        }
    ]
)


def photo(name: str, flip: bool = False) -> np.ndarray:
    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, 2)
    scale = 128 / max(image.shape[:2])
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return image[:, ::-1] if flip else image


def write(path, image: np.ndarray) -> None:
    cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]))


def collection(folder):
    """Ten images: each photo and its mirror image."""
    folder.mkdir(parents=True)
    for name in PHOTOS:
        write(folder / f"{name}_0.png", photo(name))
        write(folder / f"{name}_1.png", photo(name, flip=True))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The ten images and their index, built once; tests work on copies."""
    root = tmp_path_factory.mktemp("built")
    images = collection(root / "img")
    summary = build_index(images, root / "index", CONFIG)
    assert summary.sync == SyncReport(added=10, changed=0, removed=0, unchanged=0)
    return images, summary.directory


def copy(built, tmp_path):
    images, index = built
    return shutil.copytree(images, tmp_path / "img"), shutil.copytree(index, tmp_path / "index")


def contents(directory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (global descriptor, local rows) of an index folder."""
    with LocalStore(directory / LOCAL_FILE) as store:
        globals_ = read_raw_globals(directory / GLOBAL_FILE, 1280, len(store), prefix=True)
        rows = store.rows(np.arange(len(store)))
        return {n: (np.array(globals_[i]), rows[i]) for i, n in enumerate(store.names)}


@functools.cache
def query_extractor():
    """The extractor of CONFIG, built once for every search of this module."""
    return build_extractor(CONFIG.extractor)


def ranking(directory, query, overrides=()) -> list[tuple[str, float]]:
    handle = open_index(directory, overrides)
    try:
        (result,) = search(handle, [query], extractor=query_extractor())
        return [(handle.names[int(i)], float(s)) for i, s in zip(result.ids, result.scores)]
    finally:
        handle.close()


def assert_same_index(a, b, query) -> list[tuple[str, float]]:
    """Same names and descriptors, and the same results for a query, re-ranked or not; returns
    the ranking of ``a`` without re-ranking."""
    ca, cb = contents(a), contents(b)
    assert sorted(ca) == sorted(cb)
    for name in ca:
        np.testing.assert_allclose(ca[name][0], cb[name][0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(ca[name][1], cb[name][1], rtol=0, atol=2e-3)
    for overrides in ([], [f"search.rerank={RERANK}"]):
        ra, rb = ranking(a, query, overrides), ranking(b, query, overrides)
        assert [n for n, _ in ra] == [n for n, _ in rb]
        np.testing.assert_allclose([s for _, s in ra], [s for _, s in rb], rtol=1e-4, atol=1e-5)
        if not overrides:
            plain = ra
    return plain


def test_reindex_equals_a_fresh_build_of_the_final_folder(built, tmp_path, capsys):
    images, _ = copy(built, tmp_path)
    # delete three images, replace one file's content with another photo, add one
    for name in ("astronaut_1.png", "rocket_0.png", "camera_1.png"):
        (images / name).unlink()
    write(images / "coffee_0.png", photo("chelsea")[16:, 8:])
    write(images / "new.png", photo("astronaut")[:96])
    query = tmp_path / "query.png"
    write(query, photo("coffee")[:, :100])
    assert (
        main(
            [
                "index",
                "--images",
                str(images),
                "--out",
                str(tmp_path / "index"),
                *sum((["--set", s] for s in SETTINGS), []),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "indexed 8 images: 1 added, 1 changed, 3 removed, 6 unchanged (0 skipped)" in printed
    fresh = build_index(images, tmp_path / "fresh", CONFIG)
    assert fresh.size == 8
    plain = assert_same_index(tmp_path / "index", fresh.directory, query)
    # the replaced file lost its old descriptors: coffee_0 no longer looks like coffee
    names = [n for n, _ in plain]
    assert "astronaut_1.png" not in names and names[0] == "coffee_1.png"
    assert names.index("coffee_0.png") > 1

    # nothing changed: nothing extracted, the global index is left as it is
    again = build_index(images, tmp_path / "index", CONFIG)
    assert again.sync == SyncReport(added=0, changed=0, removed=0, unchanged=8)
    assert again.extract.done == 0 and not again.trained

    # the same collection at a new path: nothing changes but the recorded image folder
    moved = shutil.move(images, tmp_path / "moved")
    after_move = build_index(moved, tmp_path / "index", CONFIG)
    assert after_move.sync.unchanged == 8 and after_move.extract.done == 0
    grid = tmp_path / "grid.png"
    assert (
        main(["search", str(query), "--index", str(tmp_path / "index"), "--grid", str(grid)]) == 0
    )
    assert grid.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_added_images_are_appended_to_the_saved_global_index(built, tmp_path, monkeypatch, kind):
    """Images only added: the saved global index keeps its vectors and gets just the new ones
    (work in proportion to what was added, issue #16), and equals a fresh build."""
    images, _ = copy(built, tmp_path)
    settings = [*SETTINGS, f"index.kind={kind}"]
    config = cfg.load(PipelineConfig, None, settings)
    build_index(images, tmp_path / "grown", config)
    write(images / "new_a.png", photo("astronaut")[:96])
    write(images / "new_b.png", photo("coffee")[20:, 10:])
    added = []
    original = GlobalIndex.add_file
    monkeypatch.setattr(
        GlobalIndex,
        "add_file",
        lambda self, path, start, names: (
            added.append(len(names)),
            original(self, path, start, names),
        ),
    )
    grown = build_index(images, tmp_path / "grown", config)
    assert grown.sync == SyncReport(added=2, changed=0, removed=0, unchanged=10)
    assert added == [2] and not grown.trained
    monkeypatch.undo()
    # the index holds no copy of the globals: its one segment is global.f32, hard-linked
    meta = json.loads((tmp_path / "grown" / "faiss" / "index.json").read_text())
    assert [(e["start"], e["rows"]) for e in meta["segments"]] == [(0, 12)]
    segment = tmp_path / "grown" / "faiss" / meta["segments"][0]["file"]
    assert os.stat(segment).st_ino == os.stat(tmp_path / "grown" / GLOBAL_FILE).st_ino
    fresh = build_index(images, tmp_path / "fresh", config)
    a = GlobalIndex.load(tmp_path / "grown" / "faiss")
    b = GlobalIndex.load(tmp_path / "fresh" / "faiss")
    assert sorted(a.names) == sorted(b.names) and len(a) == 12
    query = tmp_path / "query.png"
    write(query, photo("coffee")[:, :100])
    assert_same_index(tmp_path / "grown", fresh.directory, query)
    # and a removal afterwards refills it (ids shift down over the removed image)
    (images / "new_a.png").unlink()
    assert build_index(images, tmp_path / "grown", config).sync.removed == 1
    assert "new_a.png" not in GlobalIndex.load(tmp_path / "grown" / "faiss").names


def test_config_is_validated_before_anything_is_written(built, tmp_path, capsys):
    images, _ = built
    out = tmp_path / "index"
    for mistake in (
        "extractor.options.num_locl=20",
        "extractor.name=efficientnet_lite1",
        "extractor.store_dtype=int8",
        "extractor.batch_size=0",
        "index.kind=foo",
        "index.options.nlistt=4",
        "search.rerank=[{name: locorre}]",
    ):
        with pytest.raises(UserError):
            build_index(images, out, cfg.load(PipelineConfig, None, [*SETTINGS, mistake]))
        assert not out.exists(), mistake
    args = ["index", "--images", str(images), "--out", str(out)]
    sets = sum((["--set", s] for s in SETTINGS), [])
    assert main([*args, *sets, "--set", "extractor.options.num_locl=20"]) == 2
    assert "num_locl" in capsys.readouterr().err and not out.exists()
    shutil.copytree(built[1], out)  # the corrected command (here: already run) resumes
    assert main([*args, *sets]) == 0
    assert "0 added, 0 changed, 0 removed, 10 unchanged" in capsys.readouterr().out
    # settings that do not change descriptors may differ on a resume
    for same in (
        cfg.load(PipelineConfig, "default", [*SETTINGS, "extractor.batch_size=3"]),
        cfg.load(PipelineConfig, None, [*SETTINGS[:1], "extractor.device=auto"]),
        cfg.load(PipelineConfig, None, [*SETTINGS, "index.kind=hnsw"]),
    ):
        summary = build_index(images, out, same)
        assert summary.extract.done == 0 and summary.sync.unchanged == 10
    assert summary.trained  # another index kind is built anew
    other = cfg.load(PipelineConfig, None, ["extractor.options.imsize=160"])
    with pytest.raises(UserError, match="another extractor config.*imsize=128.*imsize=160"):
        build_index(images, out, other)


def test_one_writer_at_a_time(built, tmp_path):
    images, out = copy(built, tmp_path)
    with open(out / ".lock", "a") as lock:  # as held by a running `locore index`
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another `locore index` is writing"):
            build_index(images, out, CONFIG)


def test_query_settings_that_change_descriptors_are_refused(built):
    _, index = built
    with pytest.raises(UserError, match="imsize=128.*imsize=224"):
        open_index(index, ["extractor.options.imsize=224"])
    with pytest.raises(UserError, match="search.topk"):
        open_index(index, ["search.topk=0"])
    handle = open_index(index, ["search.topk=5", "extractor.batch_size=1"])
    handle.close()


def _chunk_address(path, image: int) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return f["features"].id.get_chunk_info_by_coord((image, 0, 0)).byte_offset


def test_damaged_descriptors_are_reported_not_used(built, tmp_path):
    images, out = copy(built, tmp_path)
    with LocalStore(out / LOCAL_FILE) as store:
        victim = store.names.index("chelsea_0.png")
    # finite garbage over one image's descriptors (a float16 0.5 every other byte pair)
    with open(out / LOCAL_FILE, "r+b") as f:
        f.seek(_chunk_address(out / LOCAL_FILE, victim) + 1000)
        f.write(np.full(64, 0.5, "<f2").tobytes())
    handle = open_index(out)
    try:
        with pytest.raises(UserError, match=r"local.h5 is damaged: image 'chelsea_0.png'"):
            handle.database.store.rows(np.arange(len(handle.names)))
        handle.database.store.rows([(victim + 1) % 10])  # the others are still served
    finally:
        handle.close()
    (images / "camera_0.png").unlink()  # re-indexing copies the store: the damage stops it
    with pytest.raises(UserError, match="chelsea_0.png"):
        build_index(images, out, CONFIG)


def test_interrupted_runs_are_finished_and_their_leftovers_removed(built, tmp_path, monkeypatch):
    images, out = copy(built, tmp_path)
    # a kill between the two renames of a global-index save: the previous copy is used
    os.replace(out / "faiss", out / ".faiss.old")
    handle = open_index(out)
    assert len(handle.names) == 10
    handle.close()
    (out / ".faiss.tmp0abc").mkdir()
    (out / ".locore-tmp-config.yaml.x").write_text("half")
    # a kill during a prune, after the first of its two renames
    (images / "rocket_1.png").unlink()
    calls = []
    replace = os.replace

    def dying_replace(src, dst):
        calls.append(dst)
        if str(dst).endswith(GLOBAL_FILE):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        build_index(images, out, CONFIG)
    monkeypatch.setattr(os, "replace", replace)
    assert str(calls[-2]).endswith(LOCAL_FILE)  # the store was swapped, the globals were not
    with pytest.raises(UserError, match="half-updated"):
        open_index(out)
    summary = build_index(images, out, CONFIG)  # the prune was finished before this run
    assert summary.size == 9 and summary.sync.unchanged == 9 and summary.extract.done == 0
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert leftovers == [".lock"]
    # the kept images are the built ones, bit for bit
    kept, original = contents(out), contents(built[1])
    assert sorted(kept) == sorted(set(original) - {"rocket_1.png"})
    for name, (global_desc, rows) in kept.items():
        np.testing.assert_array_equal(global_desc, original[name][0])
        np.testing.assert_array_equal(rows, original[name][1])
    names = [n for n, _ in ranking(out, images / "rocket_0.png")]
    assert names[0] == "rocket_0.png" and "rocket_1.png" not in names


def test_unchanged_size_and_mtime_are_trusted_others_are_hashed(tmp_path):
    """Re-indexing reads only touched files: same size and mtime reuse the recorded
    fingerprint (as make/rsync do); a new mtime makes the file be hashed again, so a copied
    folder is still recognised by content and an edited file by its new hash."""
    path = tmp_path / "a.jpg"
    path.write_bytes(b"first")
    known = _fingerprints({"a.jpg": path}, {})
    stat = path.stat()
    path.write_bytes(b"other")  # same size; restore the mtime: trusted, not read
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _fingerprints({"a.jpg": path}, known)["a.jpg"] == known["a.jpg"]
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again
    again = _fingerprints({"a.jpg": path}, known)["a.jpg"]
    assert not again.same_content(known["a.jpg"])
    path.write_bytes(b"first")  # content back, mtime new: same content by hash
    assert _fingerprints({"a.jpg": path}, known)["a.jpg"].same_content(known["a.jpg"])
