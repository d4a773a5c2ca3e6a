"""Plots: PNGs are written at the documented size, with label colours at known pixels."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from locore.benchmarks.plots import (
    BOX_COLOR,
    LABEL_COLORS,
    QUERY_COLOR,
    GridLayout,
    GridRow,
    ap_changes,
    ap_delta_bars,
    ap_scatter,
    chain_deltas,
    ranked_grid,
)
from locore.core.errors import UserError

RNG = np.random.default_rng(0)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _frame_pixel(
    image: np.ndarray, layout: GridLayout, row: int, col: int, titled: bool, named: bool = False
):
    """A pixel in the middle of a cell's left frame strip."""
    x0, y0, _, y1 = layout.cell_box(row, col, titled, named)
    return tuple(image[(y0 + y1) // 2, x0 + layout.border // 2])


def test_ranked_grid_frames_and_size(tmp_path: Path):
    backend = matplotlib.get_backend()
    layout = GridLayout()
    query = np.zeros((120, 200, 3), np.uint8)  # black, so the box outline is unambiguous
    results = [RNG.integers(0, 255, (80 + 10 * i, 60, 3), dtype=np.uint8) for i in range(4)]
    gray = RNG.random((50, 70))  # float grayscale input is accepted too
    after = GridRow([gray, results[0]], ["junk", "positive"], [2.0, 1.0], name="re-ranked")
    out = ranked_grid(
        query,
        (20, 10, 150, 100),
        results,
        ["positive", "negative", "junk", None],
        [0.9, 0.8, 0.7, 0.6],
        tmp_path / "sub" / "grid.png",
        title="all_souls_000013",
        name="global",
        rows=[after],
    )
    image = _pixels(out)
    width, height = layout.size(rows=2, cols=5, titled=True)
    assert image.shape == (height, width, 3)
    assert _frame_pixel(image, layout, 0, 0, True) == QUERY_COLOR
    expected = [(0, 1, "positive"), (0, 2, "negative"), (0, 3, "junk"), (0, 4, None)]
    expected += [(1, 1, "junk"), (1, 2, "positive")]
    for row, col, label in expected:
        assert _frame_pixel(image, layout, row, col, True) == LABEL_COLORS[label], (row, col)
    # second row has two results: its third result cell is blank background
    assert _frame_pixel(image, layout, 1, 3, True) == (255, 255, 255)
    # the query box: a 200x120 image scaled by 150/200 and centred vertically (offset 15 px);
    # its left edge x1 = 20 -> 15 px, rows 10..100 -> 7..75 inside the thumbnail
    x0, y0, _, _ = layout.cell_box(0, 0, True)
    inner_x, inner_y = x0 + layout.border, y0 + layout.border + 15
    assert tuple(image[inner_y + 40, inner_x + 15]) == BOX_COLOR
    assert tuple(image[inner_y + 40, inner_x + 40]) == (0, 0, 0)
    # no global matplotlib state was touched
    assert matplotlib.get_backend() == backend


def test_ranked_grid_without_title_is_shorter(tmp_path: Path):
    layout = GridLayout(thumb=60, border=4)
    out = ranked_grid(
        RNG.random((30, 30, 3)),
        None,
        [RNG.integers(0, 255, (40, 40, 3), dtype=np.uint8)],
        ["negative"],
        [0.5],
        tmp_path / "g.png",
        layout=layout,
    )
    image = _pixels(out)
    assert image.shape[:2] == layout.size(rows=1, cols=2, titled=False)[::-1]
    assert _frame_pixel(image, layout, 0, 1, False) == LABEL_COLORS["negative"]


def test_ranked_grid_rejects_bad_input(tmp_path: Path):
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(UserError, match="unknown grid label 'pos'"):
        ranked_grid(image, None, [image], ["pos"], [1.0], tmp_path / "x.png")
    with pytest.raises(UserError, match="1 images, 1 labels, 2 scores"):
        ranked_grid(image, None, [image], ["junk"], [1.0, 2.0], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_ap_scatter_panels_and_size(tmp_path: Path):
    before = {"Medium": RNG.random(70), "Hard": RNG.random(70), "Hard*": RNG.random(70)}
    after = {k: np.clip(v + 0.1, 0, 1) for k, v in before.items()}
    before["Hard"][0] = np.nan  # excluded query
    out = ap_scatter(before, after, tmp_path / "s.png", labels=("Medium", "Hard"))
    assert _pixels(out).shape == (370, 680, 3)
    colour = {k: RNG.integers(0, 30, 70) for k in before}
    out = ap_scatter(before, after, tmp_path / "all.png", color=colour, panel_inches=3.0)
    image = _pixels(out)
    assert image.shape == (330, 900, 3)
    # the red y = x line is drawn (anti-aliased: look for clearly red pixels)
    r, g, b = (image[..., i].astype(int) for i in range(3))
    assert ((r > 180) & (g < 120) & (b < 120)).sum() > 100
    with pytest.raises(UserError, match="no per-query AP for 'Easy'"):
        ap_scatter(before, after, tmp_path / "e.png", labels=("Easy",))


def test_ap_changes_counts():
    before = [0.1, 0.5, 0.5, np.nan, 0.9]
    after = [0.2, 0.5, 0.4, 0.3, 0.95]
    assert ap_changes(before, after) == {"up": 2, "down": 1, "same": 1, "n": 4}


def test_ap_delta_bars(tmp_path: Path):
    before, after = RNG.random(12), RNG.random(12)
    out = ap_delta_bars(before, after, tmp_path / "d.png", names=[f"q{i}" for i in range(12)])
    image = _pixels(out)
    assert image.shape == (300, 800, 3)
    # green (gain) and red (loss) bars are present
    for colour in ((44, 160, 44), (214, 39, 40)):
        assert (np.abs(image.astype(int) - colour).sum(axis=2) < 10).sum() > 20
    with pytest.raises(UserError, match="12 APs before but 3 after"):
        ap_delta_bars(before, after[:3], tmp_path / "x.png")


def test_chain_deltas_panel_per_collection_gains_green_losses_red(tmp_path: Path):
    results = {
        "demo": {"global": {"medium": 90.0}, "a": {"medium": 92.0}, "b": {"medium": 89.0}},
        "heldout": {"global": {"medium": 80.0}, "a": {"medium": 80.5}},
    }
    image = _pixels(chain_deltas(results, tmp_path / "c.png", panel_inches=3.0))
    assert image.shape == (300, 600, 3)
    for colour in ((44, 160, 44), (214, 39, 40)):
        assert (np.abs(image.astype(int) - colour).sum(axis=2) < 10).sum() > 20
    # no loss anywhere: no red bar
    gains = {"demo": {k: v for k, v in results["demo"].items() if k != "b"}}
    image = _pixels(chain_deltas(gains, tmp_path / "g.png"))
    assert (np.abs(image.astype(int) - (214, 39, 40)).sum(axis=2) < 10).sum() == 0
    with pytest.raises(UserError, match="'heldout' has no 'global' row"):
        chain_deltas({"heldout": {"a": {"medium": 1.0}}}, tmp_path / "x.png")
    with pytest.raises(UserError, match="lacks 'hard' mAP; choose one of \\['medium'\\]"):
        chain_deltas(results, tmp_path / "x.png", protocol="hard")
    assert not (tmp_path / "x.png").exists()


def test_ranked_grid_of_several_queries_with_file_names(tmp_path: Path):
    """A row per query (each with its own blue query frame), and a name strip under captions."""
    layout = GridLayout(thumb=40, border=4)
    image = RNG.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    second = GridRow(
        [image] * 3,
        ["negative", None, "junk"],
        [0.5, 0.4, 0.3],
        name="q2.jpg",
        names=["a.jpg", "b.jpg", "a_very_long_folder_name/with/a_long_file_name.jpg"],
        query=image,
        query_box=(0, 0, 10, 10),
        query_name="q2.jpg",
    )
    out = ranked_grid(
        image,
        None,
        [image] * 2,
        ["positive", "positive"],
        [0.9, 0.8],
        tmp_path / "g.png",
        names=["c.jpg", "d.jpg"],
        query_name="q1.jpg",
        rows=[second],
        layout=layout,
    )
    pixels = _pixels(out)
    width, height = layout.size(rows=2, cols=4, titled=False, named=True)
    assert pixels.shape == (height, width, 3)
    assert height - layout.size(rows=2, cols=4, titled=False)[1] == 2 * layout.name_text
    for row in (0, 1):
        assert _frame_pixel(pixels, layout, row, 0, False, named=True) == QUERY_COLOR
    assert _frame_pixel(pixels, layout, 1, 3, False, named=True) == LABEL_COLORS["junk"]
    with pytest.raises(UserError, match="3 images but 1 file names"):
        ranked_grid(
            image, None, [image] * 3, [None] * 3, [1.0] * 3, tmp_path / "x.png", names=["a"]
        )
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        ranked_grid(image, None, [image], [None], [1.0], tmp_path / "folder.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "g.png"]
