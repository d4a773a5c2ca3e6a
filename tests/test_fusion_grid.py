"""``locore bench fusion-grid``: the (α, τ) grid over cached LoCoRe logits (reference-spec §6.5)."""

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from rerank_helpers import StandInModel, collection, save_micro
from test_bench_revisitop import _official_release

from locore import cli
from locore.benchmarks import fusion_grid
from locore.benchmarks.fusion_grid import FusionCache, grid_search
from locore.core.errors import UserError
from locore.engine.evaluate import shortlist_ranks
from locore.engine.metrics import Placements, evaluate_revisited, labelled
from locore.indexing.shortlist import Shortlist
from locore.rerank.chain import build_chain, stage_input
from locore.rerank.locore.reranker import LocoreOptions, LocoreReranker


def _wrong_global_right_logits() -> FusionCache:
    """GLDv2-style: each query's one positive has the lowest global similarity of its 5 but the
    highest logit."""
    ids = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]])
    sims = np.tile([0.9, 0.8, 0.7, 0.6, 0.5], (3, 1))
    logits = np.tile([-2.0, -1.0, 0.0, 1.0, 8.0], (3, 1))
    gnd = [{"ok": [14]}, {"ok": [24]}, {"ok": [34]}]
    return FusionCache(ids, sims, logits, [5, 5, 5], gnd, metric="gldv2", n_public=2)


def test_logits_right_global_wrong_alpha_zero_wins():
    result = grid_search(_wrong_global_right_logits())
    assert result.objective == "public"
    # The first maximum in grid order: α = 0 with the smallest τ > 0 ranks the positive first.
    assert result.best == (0.0, 0.1)
    assert result.at(0.0, 0.1) == {"public": 100.0, "private": 100.0, "combined": 100.0}
    # α = 1 and τ = 0 keep the global ranking: the positive stays 5th, AP = 1/5.
    np.testing.assert_allclose(result.values["public"][-1], 20.0)
    np.testing.assert_allclose(result.values["public"][:, 0], 20.0)


def test_global_right_logits_wrong_keeps_the_global_ranking_revisited():
    # Revisited: easy id 3 and hard id 4 lead the global ranking, LoCoRe puts them last; junk 5
    # has been moved to the end (outside the window) as the stage does.
    ids = np.array([[3, 4, 0, 1, 2, 5]])
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    logits = np.array([[-9.0, -8.0, 1.0, 2.0, 3.0]])
    gnd = [{"easy": [3], "hard": [4], "junk": [5]}]
    cache = FusionCache(ids, sims, logits, [5], gnd, metric="revisited", num_db=6)
    result = grid_search(cache)
    assert result.objective == "mean_mh"
    best = result.at(*result.best)
    assert best == {"medium": 100.0, "hard": 100.0, "mean_mh": 100.0}
    # Ties (every α = 1 or τ = 0 cell) go to the first cell in grid order.
    assert result.best == (0.0, 0.0)
    np.testing.assert_allclose(result.values["mean_mh"][-1], 100.0)
    assert result.values["mean_mh"][0, -1] < 50.0  # α = 0, τ = 1: LoCoRe's order alone
    with pytest.raises(UserError, match="GLDv2 only"):
        grid_search(cache, split="public")


@pytest.mark.parametrize("cell", [(0.3, 0.5), (0.0, 1.0), (0.7, 0.2), (1.0, 0.4)])
def test_a_grid_cell_is_the_single_window_pipeline(cell):
    alpha, temp = cell
    torch.manual_seed(0)
    queries, shortlist, database = collection(num_db=40, num_q=4, seed=3)
    ids = shortlist.ids.copy()
    ids[1, 8:] = -1  # a short shortlist: its window holds 8 images, not 10
    shortlist = Shortlist(ids, shortlist.sims)
    rng = np.random.default_rng(1)
    gnd = []
    for q in range(4):
        picked = rng.permutation(ids[q][:12][ids[q][:12] >= 0])
        gnd.append({"easy": picked[:2].tolist(), "hard": picked[2:4].tolist(), "junk": [0, 7]})
    queries.junk = [set(g["junk"]) for g in gnd]
    model = StandInModel(strength=2.0)
    common = {"topk": 15, "window": 10, "num_local": 4, "batch_size": 3}

    # The cache comes from a sliding-window stage, its input handed over as the chain hands it
    # (junk moved out): the grid must replay the single window.
    sliding = LocoreReranker(model, LocoreOptions(sliding="end-to-start", stride=5, **common))
    window = sliding.window_logits(*stage_input(sliding, queries, shortlist), database)
    cache = FusionCache(
        window.ids,
        window.sims,
        window.logits,
        window.lengths,
        gnd=gnd,
        metric="revisited",
        num_db=40,
    )
    assert cache.lengths.tolist() == [10, 8, 10, 10]

    single = LocoreReranker(model, LocoreOptions(sliding=None, alpha=alpha, temp=temp, **common))
    out, _ = build_chain([single]).run(queries, shortlist, database)
    np.testing.assert_array_equal(fusion_grid.fused_ids(cache, alpha, temp), out.ids)
    # every positive is in the shortlist: its full ranking scores as the shortlist alone
    direct = evaluate_revisited(shortlist_ranks(out.ids, np.arange(40)), gnd, shortlist_only=True)
    result = grid_search(cache, alphas=(0.0, alpha, 1.0), temps=(temp, 0.9))
    assert result.at(alpha, temp) == {
        "medium": direct["medium"]["map"],
        "hard": direct["hard"]["map"],
        "mean_mh": (direct["medium"]["map"] + direct["hard"]["map"]) / 2,
    }


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fusion_grid.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_writes_csv_json_and_heatmap(tmp_path, capsys):
    cache = _wrong_global_right_logits()
    cache.info = {"dataset": "gldv2-test", "setup": "hard"}
    run = tmp_path / "run"
    cache.save(run / "fusion_logits_hard.npz")
    argv = ("--cache", str(run), "--dataset", "gldv2", "--split", "public")
    assert fusion_grid.run(_parse(*argv)) == 0
    printed = capsys.readouterr().out
    assert "best: alpha=0 temp=0.1 (public 100.00" in printed
    assert printed.count("\n") > 12  # 11 α rows of the table
    out = run / "fusion_grid"
    rows = list(csv.DictReader((out / "grid.csv").read_text().splitlines()))
    assert len(rows) == 121
    assert list(rows[0]) == ["alpha", "temp", "public", "private", "combined"]
    best = json.loads((out / "best.json").read_text())
    assert (best["alpha"], best["temp"], best["objective"]) == (0.0, 0.1, "public")
    assert best["dataset"] == "gldv2-test"
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fusion_grid.read_best(out / "best.json") == (0.0, 0.1)
    # The best cell against the default (0.5, 0.1), query by query: mean APs are the two cells'.
    result = grid_search(cache)
    default = result.at(*fusion_grid.DEFAULT_FUSION)
    assert best["comparison"]["vs"] == {"alpha": 0.5, "temp": 0.1}
    compared = list(csv.DictReader((out / "comparison.csv").read_text().splitlines()))
    assert [r["metric"] for r in compared] == ["public", "private", "combined"]
    for row in compared:
        metric = row["metric"]
        assert float(row["default_map"]) == pytest.approx(default[metric], abs=1e-5)
        assert float(row["best_map"]) == pytest.approx(100.0, abs=1e-5)
        assert float(row["delta"]) == pytest.approx(100.0 - default[metric], abs=1e-5)
        assert best["comparison"][metric]["delta"] == pytest.approx(float(row["delta"]), abs=1e-5)
    # 2 public queries, 1 private: every one improved by the best cell
    assert [int(r["improved"]) for r in compared] == [2, 1, 3]
    assert "best - default (alpha=0.5 temp=0.1)" in printed
    # A custom grid, and a cache of another dataset.
    args = _parse("--cache", str(run), "--alphas", "0.5,1", "--temps", "0,1", "--out", str(out))
    fusion_grid.run(args)
    assert len((out / "grid.csv").read_text().splitlines()) == 5
    with pytest.raises(UserError, match="holds gldv2-test logits, not roxford5k"):
        fusion_grid.run(_parse("--cache", str(run), "--dataset", "roxford5k"))


def test_the_cache_keeps_the_labelled_images_past_the_list_where_the_full_ranking_puts_them(
    tmp_path,
):
    # Query 0's list holds easy 3 and a distractor; hard 4 and junk 5 are ranked 7th and 3rd
    # by the full ranking, distractors fill the rest.
    full = np.array([[3, 9, 5, 8, 7, 6, 4, 0, 1, 2]]).T
    gnd = [{"easy": [3], "hard": [4], "junk": [5]}]
    placed = Placements.of(full, labelled(gnd))
    rest_ids, rest_pos = fusion_grid.labelled_rest(placed, np.array([2]))
    assert (rest_ids.tolist(), rest_pos.tolist()) == ([[5, 4]], [[2, 6]])
    cache = FusionCache(
        full[:2].T, [[0.9, 0.8]], [[1.0, 2.0]], [2], gnd, num_db=10, rest_ids=rest_ids,
        rest_pos=rest_pos,
    )  # fmt: skip
    cache.save(tmp_path / "c.npz")
    again = FusionCache.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(again.rest_pos, rest_pos)
    # The grid scores the full ranking. Hard: hard 4 at position 6 with junk 3 and 5 (easy
    # counts as junk) above it -> position 4, AP = (0 / 4 + 1 / 5) / 2 = 10 %.
    result = grid_search(again, alphas=(1.0,), temps=(0.5,))
    assert result.at(1.0, 0.5)["hard"] == pytest.approx(10.0, rel=1e-12)
    direct = evaluate_revisited(full, gnd)
    assert result.at(1.0, 0.5)["hard"] == pytest.approx(direct["hard"]["map"], rel=1e-12)
    assert "full database (10 images)" in result.ranking


def test_a_cache_without_logits_is_a_one_line_user_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="no LoCoRe logits .*--save-logits") as err:
        fusion_grid.run(_parse("--cache", str(tmp_path / "run")))
    assert "\n" not in str(err.value)
    np.savez(tmp_path / "run" / "fusion_logits_hard.npz", ids=np.zeros((1, 3)))
    with pytest.raises(UserError, match="no 'sims' array .*--save-logits") as err:
        fusion_grid.run(_parse("--cache", str(tmp_path / "run")))
    assert "\n" not in str(err.value)
    (tmp_path / "bad.json").write_text('{"alpha": 0.5}')
    with pytest.raises(UserError, match="no numeric 'alpha' and 'temp'"):
        fusion_grid.read_best(tmp_path / "bad.json")


def test_revisitop_saves_logits_and_takes_the_best_pair_back(tmp_path, capsys):
    _official_release(tmp_path / "release", np.random.default_rng(1))
    ckpt = save_micro(tmp_path / "ckpt", local_dim=16, global_dim=12, num_local=6)
    out = tmp_path / "out"
    argv = [
        "bench", "revisitop", "--dataset", "roxford5k", "--from-official",
        str(tmp_path / "release"), "--out", str(out), "--checkpoint", str(ckpt),
        "--num-local", "6", "--device", "cpu", "--topk", "10", "--window", "6",
        "--sliding", "none",
    ]  # fmt: skip
    assert cli.main([*argv, "--alpha", "0", "--temp", "0.7", "--save-logits"]) == 0
    table = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert table[1]["medium_map"] != table[0]["medium_map"]  # LoCoRe changed the ranking
    capsys.readouterr()
    fusion_grid.run(_parse("--cache", str(out), "--alphas", "0,0.6", "--temps", "0.7,2"))
    result = list(csv.DictReader((out / "fusion_grid" / "grid.csv").read_text().splitlines()))
    # The grid cell of the run's own (α, τ) is the benchmark's single-window row.
    cell = next(r for r in result if (r["alpha"], r["temp"]) == ("0.0", "0.7"))
    assert float(cell["medium"]) == pytest.approx(float(table[1]["medium_map"]), abs=1e-3)
    assert float(cell["hard"]) == pytest.approx(float(table[1]["hard_map"]), abs=1e-3)

    best = json.loads((out / "fusion_grid" / "best.json").read_text())
    best_json = str(out / "fusion_grid" / "best.json")
    assert cli.main([*argv, "--alpha", "0.9", "--temp", "0.05", "--fusion-from", best_json]) == 0
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    assert (stages[0][1]["alpha"], stages[0][1]["temp"]) == (best["alpha"], best["temp"])


def test_save_logits_needs_a_stage_that_produces_window_logits(tmp_path, capsys):
    _official_release(tmp_path / "release", np.random.default_rng(1))
    argv = [
        "bench", "revisitop", "--dataset", "roxford5k", "--from-official",
        str(tmp_path / "release"), "--out", str(tmp_path / "out"), "--rerank", "superglobal",
        "--device", "cpu", "--topk", "10", "--save-logits",
    ]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "no re-ranking stage of --rerank (superglobal) produces window logits" in err
    assert "\n" not in err
    assert not (tmp_path / "out" / "fusion_logits_hard.npz").exists()
