"""The command line honours every flag it accepts, says how long its stages took, ranks from 1,
draws every query, and ends every ``--help`` with examples (bad input: test_bad_inputs.py)."""

from __future__ import annotations

import contextlib
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from skimage import data

from locore.benchmarks.plots import QUERY_COLOR, GridLayout
from locore.cli import BENCH_TARGETS, COMMANDS, build_parser, main
from locore.cli.commands import checkpoint_local_dim, query_overrides

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
BUNDLED = "locore://rerank/checkpoints/locore_offline"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``locore index`` of four photos with the default (offline, no re-ranking) preset, and
    what the command printed."""
    root = tmp_path_factory.mktemp("cli")
    (root / "images").mkdir()
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()[::2, ::2]).save(root / "images" / f"{name}.jpg")
    argv = ["index", "--images", str(root / "images"), "--out", str(root / "ix")]
    argv += ["--set", "extractor.options.imsize=128", "--set", "extractor.device=cpu"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(argv) == 0
    return root, printed.getvalue().splitlines()


def _search(root, *extra, capsys) -> tuple[list[str], list[dict]]:
    """Run ``locore search coffee.jpg`` with ``extra`` flags: printed lines, JSONL records."""
    out = root / "r.jsonl"
    argv = ["search", str(root / "images" / "coffee.jpg"), "--index", str(root / "ix")]
    assert main([*argv, "--out", str(out), *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    return lines, [json.loads(line) for line in out.read_text().splitlines()]


def _table_rows(lines: list[str]) -> list[str]:
    return [line for line in lines if line.split() and line.split()[0].isdigit()]


def _args(root, *extra):
    query = str(root / "images" / "coffee.jpg")
    return build_parser().parse_args(["search", query, "--index", str(root / "ix"), *extra])


def test_index_prints_its_stage_times(built):
    _, printed = built
    assert printed[-2].startswith("indexed 4 images")
    assert printed[-1].startswith("times: load extractor ")
    assert "extract " in printed[-1] and "global index " in printed[-1]


def test_search_ranks_from_one_and_prints_its_stage_times(built, capsys):
    root, _ = built
    lines, (record,) = _search(root, capsys=capsys)
    ranks = [r["rank"] for r in record["results"]]
    assert ranks == [1, 2, 3, 4]
    assert sorted(r["rank_before"] for r in record["results"]) == [1, 2, 3, 4]
    assert record["results"][0]["name"] == "coffee.jpg"  # the query itself is in the index
    table = lines[lines.index(f"query: {root / 'images' / 'coffee.jpg'}") + 2]
    assert table.split() == ["1", "1.0000", "1.0000", "1", "coffee.jpg"]
    assert lines[-1].startswith("times: open index ")
    for stage in ("extract queries", "global search", "re-rank"):
        assert stage in lines[-1]


def test_bare_rerank_takes_the_bundled_offline_model_for_the_offline_extractor(built):
    root, _ = built
    overrides = query_overrides(_args(root, "--rerank", "superglobal,locore"))
    search = json.loads(next(o for o in overrides if o.startswith("search="))[len("search=") :])
    assert [s["name"] for s in search["rerank"]] == ["superglobal", "locore"]
    assert search["rerank"][1]["options"]["checkpoint"] == BUNDLED
    assert checkpoint_local_dim(BUNDLED) == 112  # EfficientNet-Lite0's local descriptors
    assert checkpoint_local_dim("vislang/locore_dinov2_base") == 768  # the paper's DINOv2 model


def test_set_refines_the_chain_that_rerank_chose(built, capsys):
    """alpha=1 fuses nothing but the global similarity: the --set must reach the stage."""
    root, _ = built
    _, (fused,) = _search(root, "--rerank", "locore", capsys=capsys)
    scores = np.array([(r["score"], r["global_score"]) for r in fused["results"]])
    assert np.abs(scores[:, 0] - scores[:, 1]).max() > 1e-3  # LoCoRe changed the scores
    _, (kept,) = _search(
        root, "--rerank", "locore", "--set", "search.rerank.0.options.alpha=1.0", capsys=capsys
    )
    scores = np.array([(r["score"], r["global_score"]) for r in kept["results"]])
    # float32 scores of values <= 1: equal to a few float32 ulps
    np.testing.assert_allclose(scores[:, 0], scores[:, 1], rtol=1e-6, atol=1e-6)


def test_config_then_set_then_topk_are_honoured(built, capsys):
    root, _ = built
    preset = root / "two.yaml"
    preset.write_text("search:\n  show: 2\n  topk: 3\n")
    lines, (record,) = _search(root, "--config", str(preset), capsys=capsys)
    assert len(record["results"]) == 3  # topk from --config
    assert len(_table_rows(lines)) == 2  # show from --config
    lines, (record,) = _search(
        root, "--config", str(preset), "--set", "search.show=1", "--topk", "2", capsys=capsys
    )
    assert len(record["results"]) == 2
    assert len(_table_rows(lines)) == 1


def test_grid_draws_every_query_in_its_own_row(built, capsys):
    root, _ = built
    queries = [str(root / "images" / f"{name}.jpg") for name in PHOTOS[:3]]
    grid = root / "grid.png"
    assert main(["search", *queries, "--index", str(root / "ix"), "--grid", str(grid)]) == 0
    capsys.readouterr()
    with Image.open(grid) as im:
        pixels = np.asarray(im.convert("RGB"))
    layout = GridLayout()
    width, height = layout.size(rows=3, cols=1 + 4, titled=False, named=True)
    assert pixels.shape == (height, width, 3)
    for row in range(3):  # a blue query frame at the start of every row
        x0, y0, _, y1 = layout.cell_box(row, 0, False, named=True)
        assert tuple(pixels[(y0 + y1) // 2, x0 + layout.border // 2]) == QUERY_COLOR


def test_eval_on_a_handmade_ground_truth(built, capsys, tmp_path):
    """The README's ground-truth recipe: names relative to the index folder, no extension."""
    root, _ = built
    (tmp_path / "queries").mkdir()
    Image.fromarray(data.coffee()[::2, ::2]).save(tmp_path / "queries" / "my_cup.jpg")
    imlist = sorted(PHOTOS)
    gnd = {
        "imlist": imlist,
        "qimlist": ["my_cup"],
        "gnd": [{"bbx": None, "easy": [imlist.index("coffee")], "hard": [], "junk": []}],
    }
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    argv = ["eval", "--index", str(root / "ix"), "--gnd", str(tmp_path / "gnd.pkl")]
    assert main([*argv, "--queries", str(tmp_path / "queries")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("global")).split()[1] == "100.00"
    assert lines[-1].startswith("times: open index ")


@pytest.mark.parametrize(
    "argv",
    [[name] for name in COMMANDS] + [["bench"]] + [["bench", name] for name in BENCH_TARGETS],
    ids=lambda argv: "-".join(argv),
)
def test_every_help_ends_with_examples(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out.rstrip().splitlines()
    start = text.index("examples:")
    examples = text[start + 1 :]
    assert 1 <= len(examples) <= 3
    assert all(line.startswith("  ") and "locore " in line for line in examples), examples
