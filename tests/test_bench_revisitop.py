"""``locore bench revisitop`` end to end on tiny fake datasets in the public layouts (CPU)."""

import csv
import json
import pickle

import cv2
import h5py
import numpy as np
import pytest
import torch
from rerank_helpers import save_micro

from locore import cli
from locore.benchmarks.collection import first_stage, invert, to_rows
from locore.benchmarks.revisitop import run_benchmark
from locore.benchmarks.settings import Settings, cached_stage
from locore.core.errors import UserError
from locore.engine.config import PipelineConfig
from locore.indexing.shortlist import Shortlist

SCENES = 3  # landmarks; each has 2 easy, 1 hard and 1 junk database view and one query
DISTRACTORS = 3
EXTRACTOR = [
    "--set",
    "extractor.options={weights: null, num_local: 8, imsize: 96}",
    "--set",
    "extractor.device=cpu",
]


def _scene(rng: np.random.Generator) -> np.ndarray:
    return cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (160, 120))


def _view(image: np.ndarray, rng: np.random.Generator, crop: float) -> np.ndarray:
    h, w = image.shape[:2]
    ch, cw = int(h * crop), int(w * crop)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    noise = rng.normal(0, 6, (ch, cw, 3))
    return np.clip(image[y : y + ch, x : x + cw] + noise, 0, 255).astype(np.uint8)


def fake_revisited(root, name="roxford5k"):
    """``root/<name>/gnd_<name>.pkl`` + ``jpg/*.jpg`` exactly as the revisitop download has them
    (queries are images of ``jpg/`` too, cropped to their ``bbx``)."""
    rng = np.random.default_rng(0)
    folder = root / name
    (folder / "jpg").mkdir(parents=True)
    imlist, qimlist, gnd = [], [], []
    for s in range(SCENES):
        scene = _scene(rng)
        ids = {"easy": [], "hard": [], "junk": []}
        for kind, crop, count in (("easy", 0.9, 2), ("hard", 0.6, 1), ("junk", 0.3, 1)):
            for i in range(count):
                ids[kind].append(len(imlist))
                imlist.append(f"scene{s}_{kind}{i}")
                cv2.imwrite(str(folder / "jpg" / f"{imlist[-1]}.jpg"), _view(scene, rng, crop))
        qimlist.append(f"scene{s}_query")
        cv2.imwrite(str(folder / "jpg" / f"{qimlist[-1]}.jpg"), scene)
        gnd.append({"bbx": [4.0, 3.0, 150.0, 110.0], **ids})
    for d in range(DISTRACTORS):
        imlist.append(f"other{d}")
        cv2.imwrite(str(folder / "jpg" / f"other{d}.jpg"), _scene(rng))
    with open(folder / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return folder


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    """A random micro LoCoRe saved like a real checkpoint (112-D locals, 1280-D globals)."""
    return save_micro(tmp_path_factory.mktemp("ckpt") / "micro", num_local=8)


def _args(data_root, out, checkpoint, *extra):
    return [
        "bench",
        "revisitop",
        "--dataset",
        "roxford5k",
        "--data-root",
        str(data_root),
        "--out",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--num-local",
        "8",
        "--device",
        "cpu",
        "--topk",
        "12",
        "--window",
        "6",
        "--stride",
        "3",
        "--grids",
        "1",
        *EXTRACTOR,
        *extra,
    ]


def _cache_stamps(out):
    """Modification times of every cached stage artifact and marker (reports excluded)."""
    cached = [
        *out.glob("*.done.json"),
        *(out / "db").iterdir(),
        *(out / "queries").iterdir(),
        *(out / "index").rglob("*"),
        *out.glob("shortlist_*.npy"),
        *(out / "rerank").glob("*"),
    ]
    return {p.relative_to(out): p.stat().st_mtime_ns for p in cached}


def test_end_to_end_from_images_prints_the_table_writes_everything_and_resumes(
    tmp_path, micro_checkpoint, capsys
):
    fake_revisited(tmp_path / "data")
    out = tmp_path / "out"
    args = _args(tmp_path / "data", out, micro_checkpoint, "--superglobal")
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "Medium" in printed and "Hard*" in printed
    for label in ("global", "superglobal", "superglobal + locore_base"):
        assert any(line.startswith(label) for line in printed.splitlines())
    for name in ("results.csv", "metrics.json", "per_query.jsonl", "table.txt", "ap_scatter.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "grids" / "scene0_query.png").is_file()
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == ["global", "superglobal", "superglobal + locore_base"]
    # Without re-ranking Hard* equals Hard (the Hard protocol ignores easy images anyway).
    assert rows[0]["hard_map"] == rows[0]["hard*_map"]
    records = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    assert [r["query"] for r in records] == [f"scene{s}_query" for s in range(SCENES)]
    for r in records:
        assert {"ap_medium_before", "ap_medium_after", "ap_hard*_after"} <= set(r)
        assert len(r["positive_ranks_before"]) == 3  # 2 easy + 1 hard, full-database ranking

    # The Hard* run re-ranked without the easy images: they sit after the re-ranked part.
    gnd = pickle.loads((tmp_path / "data" / "roxford5k" / "gnd_roxford5k.pkl").read_bytes())["gnd"]
    (star,) = [p for p in (out / "rerank").glob("*_hardstar.npz")]
    with np.load(star) as z:
        last = z["ids1"]
    for q, g in enumerate(gnd):
        moved = set(g["easy"]) | set(g["junk"])
        tail = last[q][-len(moved) :]
        assert set(tail.tolist()) == moved

    # Rerun: every stage is reused; no extraction, index, shortlist, re-rank run or marker is
    # written again, and the table is the same.
    stamps = _cache_stamps(out)
    markers = {"extract_db", "extract_queries", "index", "shortlist"}
    assert markers <= {p.name.removesuffix(".done.json") for p in stamps}
    assert sum(p.name.endswith(("_hard.done.json", "_hardstar.done.json")) for p in stamps) == 2
    assert cli.main(args) == 0
    assert _cache_stamps(out) == stamps
    assert capsys.readouterr().out.splitlines()[:5] == printed.splitlines()[:5]


def test_a_stage_runs_again_until_its_marker_is_written(tmp_path):
    calls = []

    def interrupted():
        calls.append("interrupted")
        (tmp_path / "partial").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_stage(tmp_path, "extract_db", {"n": 1}, interrupted)
    assert not (tmp_path / "extract_db.done.json").exists()
    assert cached_stage(tmp_path, "extract_db", {"n": 1}, lambda: calls.append("resumed"))
    assert json.loads((tmp_path / "extract_db.done.json").read_text()) == {"n": 1}
    assert not cached_stage(tmp_path, "extract_db", {"n": 1}, lambda: calls.append("again"))
    assert cached_stage(tmp_path, "extract_db", {"n": 2}, lambda: calls.append("new params"))
    assert calls == ["interrupted", "resumed", "new params"]


def test_a_stage_without_its_marker_runs_again_and_the_others_are_reused(
    tmp_path, micro_checkpoint
):
    fake_revisited(tmp_path / "data")
    out = tmp_path / "out"
    args = _args(tmp_path / "data", out, micro_checkpoint, "--rerank", "none")
    assert cli.main(args) == 0
    results = (out / "results.csv").read_text()
    db = {p: p.stat().st_mtime_ns for p in (out / "db").iterdir()}
    # The query extraction was interrupted: no marker, a store it had only begun.
    (out / "extract_queries.done.json").unlink()
    for path in (out / "queries").iterdir():
        path.unlink()
    assert cli.main(args) == 0
    assert (out / "extract_queries.done.json").is_file()
    assert (out / "queries" / "local.h5").stat().st_size > 0
    assert {p: p.stat().st_mtime_ns for p in (out / "db").iterdir()} == db
    assert (out / "results.csv").read_text() == results


def _official_release(root, rng, n_db=10, n_q=2, k=8, dim=16, gdim=12):
    """AMES-release files: flat float32 local HDF5, raw float32 .pt globals, nn pkl, gnd pkl."""
    base = root / "roxford5k"
    base.mkdir(parents=True)
    for split, n in (("query", n_q), ("gallery", n_db)):
        rows = np.zeros((n, k, 5 + dim), np.float32)
        rows[..., 5:] = rng.standard_normal((n, k, dim))
        rows[..., 4] = 1.0
        rows[:, -2:, 3] = 1.0  # two padded rows per image
        rows[:, -2:, 5:] = 0.0
        with h5py.File(base / f"dinov2_{split}_local.hdf5", "w") as f:
            f.create_dataset("features", data=rows)
        g = rng.standard_normal((n, gdim)).astype(np.float32)
        (g / np.linalg.norm(g, axis=1, keepdims=True)).tofile(base / f"dinov2_{split}_global.pt")
    gnd = [
        {"bbx": [0, 0, 5, 5], "easy": [0, 1], "hard": [2], "junk": [3]},
        {"bbx": [0, 0, 5, 5], "easy": [4], "hard": [5, 6], "junk": []},
    ]
    imlist = [f"im{i}" for i in range(n_db)]
    with open(base / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": ["q0", "q1"], "gnd": gnd}, f)
    # Official shortlist: [2, Q, M] torch tensor, similarities then ids as floats; reversed order
    # so positives start at the bottom.
    ids = np.tile(np.arange(n_db)[::-1], (n_q, 1)).astype(np.float64)
    sims = np.tile(np.linspace(0.9, 0.1, n_db), (n_q, 1))
    torch.save(torch.from_numpy(np.stack([sims, ids])), base / "nn_superglobal.pkl")
    return gnd


def test_from_official_files_with_a_micro_reranker(tmp_path, capsys):
    rng = np.random.default_rng(1)
    gnd = _official_release(tmp_path / "release", rng)
    ckpt = save_micro(tmp_path / "ckpt", local_dim=16, global_dim=12, num_local=6)
    out = tmp_path / "out"
    argv = [
        "bench", "revisitop", "--dataset", "roxford5k", "--from-official",
        str(tmp_path / "release"), "--out", str(out), "--checkpoint", str(ckpt),
        "--num-local", "6", "--device", "cpu", "--topk", "10", "--window", "4", "--stride", "2",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "locore_base" in printed
    # The shortlist is the official file (reversed database order), read as is.
    assert np.load(out / "shortlist_ids.npy")[0].tolist() == list(range(10))[::-1]
    # Global mAP of that ranking, computed by hand for query 1 (Medium: ok 4, 5, 6 at positions
    # 3, 4, 5 of 9..0) and query 0 (ok 0, 1, 2 at 7, 8, 9; junk 3 before them: 6, 7, 8).
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))

    def ap(positions, n):
        return (
            sum(((j / r if r else 1.0) + (j + 1) / (r + 1)) / 2 for j, r in enumerate(positions))
            / n
        )

    expected = 100 * (ap([6, 7, 8], 3) + ap([3, 4, 5], 3)) / 2
    assert float(rows[0]["medium_map"]) == pytest.approx(expected, abs=1e-3)
    # Junk (id 3) is moved out of query 0's shortlist before re-ranking: last after re-ranking.
    (normal,) = list((out / "rerank").glob("*_hard.npz"))
    with np.load(normal) as z:
        assert z["ids0"][0][-1] == 3
        assert sorted(z["ids0"][0].tolist()) == list(range(10))
    assert gnd[0]["junk"] == [3]
    assert not (out / "grids").exists()  # no images given: no grids, no failure
    # The official, shortlist-only evaluation: labelled as such; equal here (full shortlist).
    assert cli.main([*argv, "--eval-shortlist-only"]) == 0
    assert "over the shortlist of 10" in capsys.readouterr().out
    again = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert again[0]["medium_map"] == rows[0]["medium_map"]


def test_missing_files_are_named(tmp_path):
    settings = Settings(dataset="rparis6k", out=tmp_path / "o", data_root=tmp_path)
    with pytest.raises(UserError, match="gnd_rparis6k.pkl"):
        run_benchmark(settings, PipelineConfig())
    official = Settings(dataset="roxford5k", out=tmp_path / "o", from_official=tmp_path)
    with pytest.raises(UserError, match="gnd_roxford5k.pkl"):
        run_benchmark(official, PipelineConfig())
    raw = Settings(
        dataset="roxford5k", out=tmp_path / "o", data_root=tmp_path, shortlist="superglobal"
    )
    with pytest.raises(UserError, match="nn_superglobal.pkl"):
        first_stage(raw, lambda d: None, 10, {})


def test_the_same_command_runs_on_the_demo_collection(tmp_path, micro_checkpoint, capsys):
    from locore.benchmarks.datasets.demo import DemoSpec, generate

    spec = DemoSpec(easy=1, hard=1, junk=1, queries=1, train_views=1, distractors=2)
    root = generate(tmp_path / "demo", spec)
    argv = _args(root, tmp_path / "out", micro_checkpoint)
    argv[argv.index("roxford5k")] = "demo"
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("demo: 7 queries")  # one query per evaluation scene
    assert (tmp_path / "out" / "grids" / "query_astronaut0.png").is_file()
    # The first stage in dataset ids feeds another run as --shortlist-file: same global row.
    argv[argv.index(str(tmp_path / "out"))] = str(tmp_path / "again")
    nn = tmp_path / "out" / "nn_first_stage_ids.npy"
    assert cli.main([*argv, "--rerank", "none", "--shortlist-file", str(nn)]) == 0
    again = capsys.readouterr().out
    (first,) = [line for line in printed.splitlines() if line.startswith("global")]
    assert first in again.splitlines()


def test_official_ids_become_database_rows_when_extraction_reordered_them():
    # Database rows hold official ids 2, 0, 3 (id 1 could not be read).
    row_to_eval = np.array([2, 0, 3])
    table = invert(row_to_eval, 4)
    assert table.tolist() == [1, -1, 0, 2]
    official = Shortlist(
        ids=np.array([[3, 1, 0, 2]]), sims=np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    )
    rows = to_rows(official, table)
    assert rows.ids.tolist() == [[2, 1, 0, -1]]  # missing image last, order otherwise kept
    np.testing.assert_allclose(rows.sims, [[0.9, 0.7, 0.6, 0.8]])
