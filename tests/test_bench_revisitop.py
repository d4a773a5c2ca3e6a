"""``locore bench revisitop`` end to end on tiny fake datasets in the public layouts (CPU)."""

import csv
import dataclasses
import json
import pickle
import shutil

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
from locore.engine.metrics import Comparison
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


def _official_release(
    root, rng, n_db=10, n_q=2, k=8, dim=16, gdim=12, ranked=None, depth=None, front=0
):
    """AMES-release files: flat float32 local HDF5, raw float32 .pt globals, nn pkl, gnd pkl.

    Images 7, 8, 9 are distractors (no label). The shortlist ranks ``ranked`` (default: every
    image, in reversed order, so positives start at the bottom), its first ``depth`` only.
    ``front`` moves the last ``front`` images (distractors) to the front of every file: the
    same collection with other ids, as a +1M release with the distractors first would be.
    """
    base = root / "roxford5k"
    base.mkdir(parents=True)
    order = np.r_[np.arange(n_db - front, n_db), np.arange(n_db - front)]  # file row -> image
    file_id = np.argsort(order)  # image -> file row
    for split, n in (("query", n_q), ("gallery", n_db)):
        rows = np.zeros((n, k, 5 + dim), np.float32)
        rows[..., 5:] = rng.standard_normal((n, k, dim))
        rows[..., 4] = 1.0
        rows[:, -2:, 3] = 1.0  # two padded rows per image
        rows[:, -2:, 5:] = 0.0
        g = rng.standard_normal((n, gdim)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        if split == "gallery":
            rows, g = rows[order], g[order]
        with h5py.File(base / f"dinov2_{split}_local.hdf5", "w") as f:
            f.create_dataset("features", data=rows)
        g.tofile(base / f"dinov2_{split}_global.pt")
    gnd = [
        {"bbx": [0, 0, 5, 5], "easy": [0, 1], "hard": [2], "junk": [3]},
        {"bbx": [0, 0, 5, 5], "easy": [4], "hard": [5, 6], "junk": []},
    ]
    gnd = [
        {"bbx": g["bbx"], **{f: file_id[g[f]].tolist() for f in ("easy", "hard", "junk")}}
        for g in gnd
    ]
    imlist = [f"im{i}" for i in order]
    with open(base / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": ["q0", "q1"], "gnd": gnd}, f)
    # Official shortlist: [2, Q, M] torch tensor, similarities then ids as floats.
    ranked = np.arange(n_db)[::-1] if ranked is None else np.asarray(ranked)
    ids = np.tile(file_id[ranked][:depth], (n_q, 1)).astype(np.float64)
    sims = np.tile(np.linspace(0.9, 0.1, n_db)[: ids.shape[1]], (n_q, 1))
    torch.save(torch.from_numpy(np.stack([sims, ids])), base / "nn_superglobal.pkl")
    return gnd


def _official_argv(release, out, checkpoint, *extra):
    return [
        "bench", "revisitop", "--dataset", "roxford5k", "--from-official", str(release),
        "--out", str(out), "--checkpoint", str(checkpoint), "--num-local", "6",
        "--device", "cpu", "--topk", "10", "--window", "4", "--stride", "2", *extra,
    ]  # fmt: skip


def _release_checkpoint(tmp_path):
    """A random micro LoCoRe for the fake release's 16-D locals and 12-D globals."""
    return save_micro(tmp_path / "ckpt", local_dim=16, global_dim=12, num_local=6)


def test_from_official_files_with_a_micro_reranker(tmp_path, capsys):
    rng = np.random.default_rng(1)
    gnd = _official_release(tmp_path / "release", rng)
    out = tmp_path / "out"
    argv = _official_argv(tmp_path / "release", out, _release_checkpoint(tmp_path))
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

    # The re-ranked row against the global one, query by query, in the CSV, JSON and table: the
    # mean difference is that of the per-query APs, the counts are theirs.
    assert rows[0]["medium_delta"] == ""  # the global row is what the others are compared with
    records = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    meta = json.loads((out / "metrics.json").read_text())
    (compared,) = meta["comparisons"]
    assert (compared["method"], compared["vs"]) == ("locore_base", "global")
    fields = {f.name for f in dataclasses.fields(Comparison)}
    for proto, before_key in (("medium", "medium"), ("hard", "hard"), ("hard*", "hard")):
        after = np.array([r[f"ap_{proto}_after"] for r in records])
        diff = 100 * (after - np.array([r[f"ap_{before_key}_before"] for r in records]))
        row = rows[1]
        # per-query APs are rounded to 1e-6 in per_query.jsonl, mAP points to 1e-4 in the CSV
        assert float(row[f"{proto}_delta"]) == pytest.approx(diff.mean(), abs=1e-3)
        counts = [int(row[f"{proto}_{k}"]) for k in ("improved", "unchanged", "worsened")]
        assert counts == [(diff > 1e-9).sum(), (np.abs(diff) <= 1e-9).sum(), (diff < -1e-9).sum()]
        low, high = float(row[f"{proto}_ci_low"]), float(row[f"{proto}_ci_high"])
        assert low <= float(row[f"{proto}_delta"]) <= high
        assert set(compared[proto]) == fields
        assert compared[proto]["delta"] == pytest.approx(float(row[f"{proto}_delta"]), abs=1e-4)
        summary = Comparison(**compared[proto]).summary()
        assert any(line.endswith(summary) for line in printed.splitlines()), summary
    assert "vs global, per-query AP: mean difference [95 % paired bootstrap CI" in printed
    assert meta["ranking"] in printed.splitlines()[0]
    assert "exact global similarity" in meta["ranking"]
    # The official, shortlist-only evaluation: labelled as such; equal here (full shortlist).
    assert cli.main([*argv, "--eval-shortlist-only"]) == 0
    assert "over the shortlist of 10 (the official rule" in capsys.readouterr().out
    again = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert again[0]["medium_map"] == rows[0]["medium_map"]


# The first stage of the releases below: 4 images (positives of both queries and distractor 7),
# so each query has positives the completed ranking must place.
RANKED = [2, 5, 0, 7, 1, 3, 4, 6, 8, 9]


def test_moving_the_distractors_to_the_front_of_the_files_changes_no_printed_number(
    tmp_path, capsys
):
    """Appending the images the shortlist missed in file order would put the distractors ahead
    of the missing positives once they lead the files; the full ranking ranks them by global
    similarity, so the table and the fusion grid are the same either way."""
    ckpt = _release_checkpoint(tmp_path)
    tables, grids = [], []
    for front in (0, 3):
        release, out = tmp_path / f"release{front}", tmp_path / f"out{front}"
        _official_release(release, np.random.default_rng(1), ranked=RANKED, depth=4, front=front)
        fusion = ("--sliding", "none", "--window", "6", "--alpha", "0", "--temp", "0.7")
        assert cli.main(_official_argv(release, out, ckpt, *fusion, "--save-logits")) == 0
        printed = capsys.readouterr().out
        tables.append(printed.split("\nartifacts in")[0])
        argv = ["bench", "fusion-grid", "--cache", str(out), "--alphas", "0,1", "--temps", "0.7"]
        assert cli.main(argv) == 0
        grids.append(capsys.readouterr().out.split("\nwritten:")[0])
        # The grid replays the benchmark's single-window row with its full-database ranking.
        row = list(csv.DictReader((out / "results.csv").read_text().splitlines()))[1]
        grid_csv = (out / "fusion_grid" / "grid.csv").read_text()
        cell = list(csv.DictReader(grid_csv.splitlines()))[0]
        assert (cell["alpha"], cell["temp"]) == ("0.0", "0.7")
        for proto in ("medium", "hard"):
            assert float(cell[proto]) == pytest.approx(float(row[f"{proto}_map"]), abs=1e-3)
    assert "full database (10 images), ranked past the shortlist by exact global" in tables[0]
    assert tables[0] == tables[1]
    assert grids[0] == grids[1]


def test_a_release_regenerated_in_the_same_folder_is_read_again(tmp_path, capsys):
    """Cache keys name the content of the release's files, not their folder: regenerating the
    release in place with other data reruns the first stage and the re-ranking."""
    ckpt = _release_checkpoint(tmp_path)
    release, out = tmp_path / "release", tmp_path / "out"
    _official_release(release, np.random.default_rng(1))
    assert cli.main(_official_argv(release, out, ckpt)) == 0
    first = (out / "table.txt").read_text()
    shutil.rmtree(release)
    _official_release(release, np.random.default_rng(2), ranked=RANKED)
    assert cli.main(_official_argv(release, out, ckpt)) == 0
    again = (out / "table.txt").read_text()
    assert np.load(out / "shortlist_ids.npy")[0].tolist() == RANKED
    assert len(list((out / "rerank").glob("*.npz"))) == 4  # the old runs and new ones
    fresh = tmp_path / "fresh"
    assert cli.main(_official_argv(release, fresh, ckpt)) == 0
    capsys.readouterr()
    assert again == (fresh / "table.txt").read_text()
    assert again != first


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
