"""``locore bench revisitop --dataset gldv2-test`` end to end on tiny fake GLDv2 releases (CPU):
the AMES files (gallery in ``split`` chunks) and raw images in the CVDF layout."""

import csv
import dataclasses
import json
import pickle

import cv2
import h5py
import numpy as np
import pytest
from rerank_helpers import save_micro
from test_bench_revisitop import EXTRACTOR, _scene, _view

from locore import cli
from locore.benchmarks.collection import first_stage
from locore.benchmarks.datasets.gldv2 import image_path
from locore.benchmarks.official_release import from_official
from locore.benchmarks.protocols import evaluation_of
from locore.benchmarks.revisitop import run_benchmark
from locore.benchmarks.settings import Settings
from locore.core.errors import UserError
from locore.engine.config import PipelineConfig
from locore.engine.metrics import gldv2_map_at_100
from locore.indexing.local_store import LocalStore

N_DB, CHUNKS, K, DIM, GDIM = 120, (70, 50), 8, 16, 12
NN = "gldv2-test/nn_dinov2.pkl"  # the official shortlist, relative to the release root
# Hand-made official shortlist: query -> {database id: its position}; every other id fills the
# remaining positions in increasing order.
PLACED = [{5: 0, 17: 3}, {40: 104}, {100: 1, 101: 2, 102: 99}]
OK = [np.array([5, 17]), [40], (100, 101, 102)]  # the containers a pickle may hold (P18)
# Rectangular AP@100 by hand: q0 hits at ranks 1 and 4; q1's only positive is ranked 105th,
# past the cut-off; q2 hits at ranks 2, 3 and 100.
HAND_AP = [(1 / 1 + 2 / 4) / 2, 0.0, (1 / 2 + 2 / 3 + 3 / 100) / 3]


def _order(placed: dict[int, int]) -> list[int]:
    rest = iter(i for i in range(N_DB) if i not in placed)
    at = {pos: i for i, pos in placed.items()}
    return [at[p] if p in at else next(rest) for p in range(N_DB)]


def _local_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = np.zeros((n, K, 5 + DIM), np.float32)
    rows[..., 5:] = rng.standard_normal((n, K, DIM))
    rows[..., 4] = np.linspace(1.0, 0.5, K)
    rows[:, -2:, 3], rows[:, -2:, 5:] = 1.0, 0.0  # two padded rows per image
    return rows


def _globals(rng: np.random.Generator, n: int) -> np.ndarray:
    g = rng.standard_normal((n, GDIM)).astype(np.float32)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def fake_release(root):
    """``gldv2-test/`` (queries, gnd, nn_dinov2.pkl) and ``gldv2-index/`` split into two chunks
    (``dinov2_xaa_*``, ``dinov2_xab_*``), as the AMES data release ships them."""
    rng = np.random.default_rng(0)
    test, index = root / "gldv2-test", root / "gldv2-index"
    test.mkdir(parents=True)
    index.mkdir()
    with h5py.File(test / "dinov2_local.hdf5", "w") as f:
        f.create_dataset("features", data=_local_rows(rng, len(PLACED)))
    _globals(rng, len(PLACED)).tofile(test / "dinov2_global.pt")
    chunks = {"local": [], "global": []}
    for name, n in zip(("xaa", "xab"), CHUNKS):
        chunks["local"].append(_local_rows(rng, n))
        chunks["global"].append(_globals(rng, n))
        with h5py.File(index / f"dinov2_{name}_local.hdf5", "w") as f:
            f.create_dataset("features", data=chunks["local"][-1])
        chunks["global"][-1].tofile(index / f"dinov2_{name}_global.pt")
    with open(test / "gnd_gldv2-test.pkl", "wb") as f:
        pickle.dump({"gnd": [{"ok": ok} for ok in OK]}, f)
    # nn_<name>.pkl of a gldv2 dataset: numpy float64 [2, Q, M], similarities then ids.
    ids = np.array([_order(p) for p in PLACED], np.float64)
    sims = np.tile(np.linspace(0.9, 0.1, N_DB), (len(PLACED), 1))
    with open(root / NN, "wb") as f:
        pickle.dump(np.stack([sims, ids]), f)
    return {k: np.concatenate(v) for k, v in chunks.items()}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A random micro LoCoRe for the fake release's 16-D locals and 12-D globals."""
    return save_micro(
        tmp_path_factory.mktemp("ckpt") / "micro16", local_dim=DIM, global_dim=GDIM, num_local=6
    )


def _csv(path):
    return list(csv.DictReader(path.read_text().splitlines()))


def test_official_release_chunks_hand_computed_map_reranking_and_fusion_grid(
    tmp_path, small_checkpoint, capsys
):
    chunks = fake_release(tmp_path / "release")
    out = tmp_path / "out"
    argv = [
        "bench", "revisitop", "--dataset", "gldv2-test", "--from-official",
        str(tmp_path / "release"), "--out", str(out), "--checkpoint", str(small_checkpoint),
        "--num-local", "6", "--device", "cpu", "--topk", "10", "--window", "6",
        "--sliding", "none", "--save-logits",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("gldv2-test: 3 queries (3 public, 0 private), mAP@100 (%)")
    assert printed[1].split() == ["method", "Public", "Private", "Combined"]
    assert [line.split()[0] for line in printed[2:4]] == ["global", "locore_base"]
    for name in ("results.csv", "metrics.json", "per_query.jsonl", "table.txt", "ap_scatter.png"):
        assert (out / name).stat().st_size > 0, name

    # The global row is the official shortlist's mAP@100, computed by hand (1,129 > 3 queries:
    # every one is public, the private split is empty).
    rows = _csv(out / "results.csv")
    maps = ["public_map@100", "private_map@100", "combined_map@100"]
    assert list(rows[0])[:5] == ["method", *maps, "depth"]
    assert rows[0]["depth"] == "100"  # the official shortlist fills the 100 scored ranks
    expected = 100 * np.mean(HAND_AP)
    assert float(rows[0]["public_map@100"]) == pytest.approx(expected, abs=1e-3)
    assert float(rows[0]["combined_map@100"]) == pytest.approx(expected, abs=1e-3)
    assert rows[0]["private_map@100"] == "nan"
    assert json.loads((out / "metrics.json").read_text())["rows"][0]["method"] == "global"
    records = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    assert [r["query"] for r in records] == ["query0", "query1", "query2"]
    assert [r["split"] for r in records] == ["public"] * 3
    np.testing.assert_allclose(
        [r["ap@100_before"] for r in records], HAND_AP, rtol=0, atol=5e-7
    )  # the JSONL writes APs (in [0, 1]) rounded to 6 decimals: half a unit of the last one
    assert [r["positive_ranks_before"] for r in records] == [[0, 3], [104], [1, 2, 99]]

    # One re-rank run (no junk, no easy images): the re-ranked row is that run's mAP@100.
    (run,) = (out / "rerank").glob("*.npz")
    assert run.stem.endswith("_hard")
    with np.load(run) as z:
        reranked = z["ids0"]
    assert sorted(reranked[0, :10].tolist()) == sorted(_order(PLACED[0])[:10])
    gnd = [{"ok": list(np.asarray(ok).tolist())} for ok in OK]
    by_hand = gldv2_map_at_100(reranked.T, gnd, n_public=3)
    assert float(rows[1]["public_map@100"]) == pytest.approx(by_hand["public"], abs=1e-3)
    assert rows[1]["public_map@100"] != rows[0]["public_map@100"]  # LoCoRe moved positives
    # ... and the comparison with the global row is that of the per-query APs@100 (every
    # query public here: the private split has none to compare).
    after = [r["ap@100_after"] for r in records]
    diff = 100 * (np.array(after) - np.array(HAND_AP))
    for split in ("public", "combined"):
        assert float(rows[1][f"{split}_delta"]) == pytest.approx(diff.mean(), abs=1e-3)
        assert int(rows[1][f"{split}_improved"]) == (diff > 1e-9).sum()
    assert rows[1]["private_delta"] == "nan"
    (compared,) = json.loads((out / "metrics.json").read_text())["comparisons"]
    assert compared["combined"]["n_queries"] == 3
    assert "vs global, per-query AP" in "\n".join(printed)

    # The fusion grid on the saved logits: α = 1 keeps the shortlist, the run's own (α, τ) cell
    # is the benchmark's single-window re-ranked row.
    assert cli.main(["bench", "fusion-grid", "--cache", str(out), "--dataset", "gldv2"]) == 0
    grid = {(r["alpha"], r["temp"]): r for r in _csv(out / "fusion_grid" / "grid.csv")}
    assert len(grid) == 121
    assert float(grid["1.0", "0.3"]["public"]) == pytest.approx(expected, abs=1e-3)
    assert float(grid["0.5", "0.1"]["public"]) == pytest.approx(
        float(rows[1]["public_map@100"]), abs=1e-3
    )
    best = json.loads((out / "fusion_grid" / "best.json").read_text())
    assert (best["objective"], best["dataset"]) == ("public", "gldv2-test")

    # The chunks are one logical gallery in sorted order: rows and globals are the chunks'.
    settings = Settings(
        dataset="gldv2-test",
        out=out,
        from_official=tmp_path / "release",
        locore={"num_local": 6},
    )
    data = from_official(settings)
    data.database.store.close()
    np.testing.assert_array_equal(data.database.global_desc, chunks["global"])
    with LocalStore(out / "dinov2_gallery_local_joined.h5") as store:
        assert len(store) == N_DB
        np.testing.assert_array_equal(store.rows(np.arange(N_DB)), chunks["local"])
        np.testing.assert_array_equal(store.rows(np.array([69, 70])), chunks["local"][69:71])

    # An official shortlist deeper than --depth is cut (the release's nn_superglobal.pkl ranks
    # the whole index); the kept columns are the file's.
    cut = dataclasses.replace(
        settings, out=tmp_path / "cut", depth=101, shortlist_file=settings.from_official / NN
    )
    (tmp_path / "cut").mkdir()
    shortlist = first_stage(cut, None, N_DB, {}, cut=evaluation_of(cut).file_depth(cut))
    assert shortlist.ids.tolist() == [_order(p)[:101] for p in PLACED]


def test_missing_files_and_wrong_options_are_named(tmp_path):
    config = PipelineConfig()
    official = Settings(dataset="gldv2-test", out=tmp_path / "o", from_official=tmp_path)
    with pytest.raises(UserError, match=r"gldv2-test/gnd_gldv2-test\.pkl not found.*AMES"):
        run_benchmark(official, config)
    fake_release(tmp_path)
    for path in (tmp_path / "gldv2-index").glob("dinov2_x*_local.hdf5"):
        path.unlink()
    with pytest.raises(UserError, match=r"gldv2-index/dinov2_local\.hdf5 \(or chunks"):
        run_benchmark(official, config)
    raw = Settings(dataset="gldv2-test", out=tmp_path / "o", data_root=tmp_path / "x")
    with pytest.raises(UserError, match="gnd_gldv2-test.pkl nor retrieval_solution_v2.1.csv"):
        run_benchmark(raw, config)
    with pytest.raises(UserError, match="no \\+1M distractors"):
        Settings(dataset="gldv2-test", out=tmp_path, data_root=tmp_path, with_1m=True)


def fake_cvdf(root):
    """The CVDF layout: solution CSV (Private row first, one Ignored row), index.csv, and
    sharded JPEGs under index/ and test/. Two public queries, one private."""
    rng = np.random.default_rng(3)
    index_ids, solution = [], ["id,images,Usage"]
    queries = {"Private": [], "Public": []}
    for s, usage in enumerate(("Private", "Public", "Public")):
        scene = _scene(rng)
        views = []
        for v in range(2):
            views.append(f"{s}{v}a{'0' * 13}")
            _write(image_path(root / "index", views[-1]), _view(scene, rng, 0.8))
        index_ids += views
        query = f"{s}f{'0' * 14}"
        _write(image_path(root / "test", query), scene)
        solution.append(f"{query},{' '.join(views)},{usage}")
        queries[usage].append(query)
    solution.append(f"ff{'0' * 14},,Ignored")
    for d in range(2):
        index_ids.append(f"d{d}{'0' * 14}")
        _write(image_path(root / "index", index_ids[-1]), _scene(rng))
    (root / "retrieval_solution_v2.1.csv").write_text("\n".join(solution) + "\n")
    (root / "index.csv").write_text("id\n" + "\n".join(index_ids) + "\n")
    return queries["Public"] + queries["Private"]


def _write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)


def test_raw_images_in_the_cvdf_layout(tmp_path, capsys, monkeypatch):
    from locore.benchmarks import plots

    frames = []

    def recording_grid(*args, **kwargs):
        frames.append([args[3], *(row.labels for row in kwargs["rows"])])
        return original(*args, **kwargs)

    original = plots.ranked_grid
    monkeypatch.setattr(plots, "ranked_grid", recording_grid)
    query_order = fake_cvdf(tmp_path / "data")
    # a micro LoCoRe for the default extractor's 112-D/1280-D output
    ckpt = save_micro(tmp_path / "ckpt", num_local=8)
    out = tmp_path / "out"
    argv = [
        "bench", "revisitop", "--dataset", "gldv2-test", "--data-root", str(tmp_path / "data"),
        "--out", str(out), "--checkpoint", str(ckpt), "--num-local", "8", "--device", "cpu",
        "--topk", "8", "--window", "4", "--stride", "2", "--grids", "1", "--save-logits",
        *EXTRACTOR,
    ]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("gldv2-test: 3 queries (2 public, 1 private)")
    assert "full database (8 images)" in printed[0]
    assert [line.split()[0] for line in printed[2:4]] == ["global", "locore_base"]
    records = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    assert [r["query"] for r in records] == query_order  # public first, Ignored dropped
    assert [r["split"] for r in records] == ["public", "public", "private"]
    # The global row is mAP@100 of the first stage in dataset ids (index.csv order).
    first = np.load(out / "nn_first_stage_ids.npy")
    gnd = [{"ok": [2 * s, 2 * s + 1]} for s in (1, 2, 0)]  # scene s holds index ids 2s, 2s+1
    want = gldv2_map_at_100(first.T, gnd, n_public=2)
    row = _csv(out / "results.csv")[0]
    for split in ("public", "private", "combined"):
        assert float(row[f"{split}_map@100"]) == pytest.approx(want[split], abs=1e-3)
    assert [r["positive_ranks_before"] for r in records] == [
        np.flatnonzero(np.isin(first[q], g["ok"])).tolist() for q, g in enumerate(gnd)
    ]
    # The grid frames the 'ok' images as positives, before and after re-ranking.
    assert (out / "grids" / f"{query_order[0]}.png").is_file()
    with np.load(next((out / "rerank").glob("*_hard.npz"))) as z:
        final = z["ids0"]
    with LocalStore(out / "db" / "local.h5") as store:
        db_names = store.names
    index_ids = (tmp_path / "data" / "index.csv").read_text().split()[1:]
    after = [index_ids.index(db_names[i]) for i in final[0]]
    assert frames == [
        [
            ["positive" if i in gnd[0]["ok"] else "negative" for i in ranking]
            for ranking in (first[0], after)
        ]
    ]
    assert (out / "ap_scatter.png").stat().st_size > 0
    # The fusion-grid cache keeps the split (2 public queries), so its α = 1 cells are the
    # benchmark's global row on every split.
    assert cli.main(["bench", "fusion-grid", "--cache", str(out), "--alphas", "1"]) == 0
    cell = _csv(out / "fusion_grid" / "grid.csv")[0]
    for split in ("public", "private", "combined"):
        assert float(cell[split]) == pytest.approx(float(row[f"{split}_map@100"]), abs=1e-3)
