"""Extraction runtime: size buckets, resume, shards and the official-layout export."""

from __future__ import annotations

import os

import h5py
import numpy as np
from skimage import data

from locore.cli import main
from locore.core.layout import GLOBAL_FILE
from locore.engine import extract as extract_module
from locore.engine.extract import (
    Item,
    export_official,
    extract,
    parse_shard,
    shard_items,
)
from locore.feature_extractors import create
from locore.indexing.local_store import LocalStore
from locore.indexing.shortlist import read_raw_globals


def _images(folder):
    import cv2

    folder.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "camera"]):
        image = getattr(data, name)()
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, 2)
        cv2.imwrite(str(folder / f"{i}_{name}.png"), image[..., ::-1])
    return sorted(folder.iterdir())


def test_resume_gives_the_same_store_and_globals(tmp_path):
    paths = _images(tmp_path / "img")
    items = [Item(p.name, p) for p in paths]
    extractor = create("efficientnet_lite0", imsize=128)
    extract(extractor, items, tmp_path / "full", batch_size=2)
    extract(extractor, items[:2], tmp_path / "part", batch_size=2)
    report = extract(extractor, items, tmp_path / "part", batch_size=2)
    assert report.resumed == 2 and report.done == 3
    with (
        LocalStore(tmp_path / "full" / "local.h5") as a,
        LocalStore(tmp_path / "part" / "local.h5") as b,
    ):
        order_a = {n: i for i, n in enumerate(a.names)}
        order_b = {n: i for i, n in enumerate(b.names)}
        names = sorted(order_a)
        ga = read_raw_globals(tmp_path / "full" / GLOBAL_FILE, 1280, 5, prefix=True)
        gb = read_raw_globals(tmp_path / "part" / GLOBAL_FILE, 1280, 5, prefix=True)
        for n in names:
            # batches differ between the runs (2 + 3 vs 2 + 2 + 1): equal up to float32 rounding
            # of the forward pass, then one fp16 rounding of the stored rows (2^-11 relative),
            # each bound scaled to the largest value compared
            ra, rb = a.rows([order_a[n]]), b.rows([order_b[n]])
            np.testing.assert_allclose(ra, rb, rtol=0, atol=2**-9 * np.abs(rb).max())
            g = gb[order_b[n]]
            np.testing.assert_allclose(ga[order_a[n]], g, rtol=0, atol=1e-5 * np.abs(g).max())


def test_store_is_allocated_for_the_job_and_skipped_files_are_kept_current(tmp_path):
    paths = _images(tmp_path / "img")
    broken = tmp_path / "img" / "9_broken.png"
    broken.write_bytes(b"not a png")
    items = [Item(p.name, p) for p in [*paths, broken]]
    extractor = create("efficientnet_lite0", imsize=128)
    report = extract(extractor, items, tmp_path / "out", batch_size=4)
    assert [name for name, _ in report.skipped] == ["9_broken.png"]
    skipped = tmp_path / "out" / "skipped.tsv"
    assert skipped.read_text().startswith("9_broken.png\t")
    # the job's allocation (6 images of 49 x 117 float16 values + a 4-byte checksum, 6 names of
    # 256 bytes; HDF5 keeps the broken image's trimmed chunk) + under 16 KiB of HDF5 metadata,
    # where a 64-image growth step would take 0.7 MiB
    job = 6 * (49 * 117 * 2 + 4) + 6 * 256
    assert os.path.getsize(tmp_path / "out" / "local.h5") < job + 16 * 2**10
    broken.unlink()  # no longer listed: its line goes
    extract(extractor, items[:-1], tmp_path / "out", batch_size=4)
    assert skipped.read_text() == ""


def test_shards_cover_the_list_in_order():
    items = list(range(10))
    parts = [shard_items(items, parse_shard(f"{i}/3")) for i in range(3)]
    assert sum(parts, []) == items and all(parts)


def test_official_export_and_cli(tmp_path, capsys, monkeypatch):
    paths = _images(tmp_path / "img")
    assert (
        main(
            [
                "extract",
                "--images",
                str(tmp_path / "img"),
                "--out",
                str(tmp_path / "o"),
                "--official",
                "demo",
                "--set",
                "extractor.options.imsize=128",
            ]
        )
        == 0
    )
    with h5py.File(tmp_path / "o" / "demo_local.hdf5") as f:
        flat = f["features"][:]
    assert flat.shape == (5, 49, 5 + 112) and flat.dtype == np.float32
    globals_ = np.fromfile(tmp_path / "o" / "demo_global.pt", dtype="<f4").reshape(5, 1280)
    np.testing.assert_allclose(np.linalg.norm(globals_, axis=1), 1, rtol=1e-5)  # unit norm
    with LocalStore(tmp_path / "o" / "local.h5") as store:
        i = store.names.index(paths[3].name)
        np.testing.assert_array_equal(store.rows([i])[0], flat[3])
    paths2 = export_official(tmp_path / "o", [paths[1].name], tmp_path / "x", "one")
    assert all(p.is_file() for p in paths2)
    # written in blocks: every row of every block lands where the list puts it
    monkeypatch.setattr(extract_module, "EXPORT_IMAGES", 2)
    order = [p.name for p in reversed(paths)]
    local, _ = export_official(tmp_path / "o", order, tmp_path / "blocks", "rev")
    with h5py.File(local) as f, LocalStore(tmp_path / "o" / "local.h5") as store:
        ids = [store.names.index(n) for n in order]
        np.testing.assert_array_equal(f["features"][:], store.rows(ids))
