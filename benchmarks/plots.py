"""Pictures of results: ranked-result grids, per-query AP plots and per-chain mAP changes.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never
through ``pyplot``: no backend switch, no global figure registry, safe in threads and servers.

The grid is composed pixel-exactly (thumbnails and their label borders are pasted into one RGB
canvas that matplotlib writes 1:1), so a border's colour at a known pixel is testable; text is
drawn only in the caption strips. :class:`GridLayout` gives those pixel positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from locore.core.atomic import atomic_open
from locore.core.errors import UserError
from locore.engine.metrics import Comparison

DPI = 100
LABEL_COLORS: dict[str | None, tuple[int, int, int]] = {
    "positive": (44, 160, 44),  # green
    "negative": (214, 39, 40),  # red
    "junk": (127, 127, 127),  # grey
    None: (255, 255, 255),  # unknown: no visible frame
}
QUERY_COLOR = (31, 119, 180)  # blue frame around the query
BOX_COLOR = (255, 200, 0)  # the query box drawn on the query thumbnail
BACKGROUND = (255, 255, 255)


@dataclasses.dataclass(frozen=True)
class GridRow:
    """One ranked list of a grid: thumbnails, their labels and scores, and a row name.

    A row with its own ``query`` image draws it in column 0 (a grid of several queries, a row
    each); ``names`` (file names) are written under the thumbnails, ``query_name`` under the query.
    """

    images: Sequence[np.ndarray]
    labels: Sequence[str | None]
    scores: Sequence[float]
    name: str | None = None
    names: Sequence[str] = ()
    query: np.ndarray | None = None
    query_box: Sequence[float] | None = None
    query_name: str | None = None


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of :func:`ranked_grid` (origin top-left, ends exclusive).

    Each row is a header strip (row name), the cells, a caption strip (rank, score) and, when
    the grid shows file names (``named``), a name strip. Column 0 holds the query in the first
    row (and in every row that has its own query); result j of a row sits in column j + 1.
    """

    thumb: int = 150  # side of the square area an image is fitted into
    border: int = 8  # width of the label frame around it
    gap: int = 10
    text: int = 18  # height of a header / caption strip
    title: int = 26  # height of the title strip (when there is a title)
    name_text: int = 14  # height of the file-name strip under the captions (named grids only)

    @property
    def cell(self) -> int:
        return self.thumb + 2 * self.border

    def pitch(self, named: bool) -> int:
        """Height of one row: header, cells, caption (and file names)."""
        return 2 * self.text + self.cell + (self.name_text if named else 0)

    def size(self, rows: int, cols: int, titled: bool, named: bool = False) -> tuple[int, int]:
        """``(width, height)`` in pixels of a grid with that many rows and columns."""
        width = self.gap + cols * (self.cell + self.gap)
        height = (self.title if titled else 0) + rows * self.pitch(named) + self.gap
        return width, height

    def cell_box(
        self, row: int, col: int, titled: bool, named: bool = False
    ) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of a cell, frame included."""
        x0 = self.gap + col * (self.cell + self.gap)
        y0 = (self.title if titled else 0) + row * self.pitch(named) + self.text
        return x0, y0, x0 + self.cell, y0 + self.cell


def _rgb(image: np.ndarray) -> np.ndarray:
    """Any image array (gray, RGB, RGBA; uint8 or float in [0, 1]) -> RGB uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise UserError(f"image of shape {image.shape} is not a picture; pass [H, W(, C)]")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image[..., :3]


def _fit(image: np.ndarray, side: int) -> tuple[np.ndarray, float, int, int]:
    """Letterbox ``image`` into a ``side`` square: ``(square, scale, x offset, y offset)``."""
    from PIL import Image

    image = _rgb(image)
    h, w = image.shape[:2]
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    square = np.full((side, side, 3), BACKGROUND, dtype=np.uint8)
    ox, oy = (side - nw) // 2, (side - nh) // 2
    square[oy : oy + nh, ox : ox + nw] = resized
    return square, scale, ox, oy


def _draw_rect(canvas: np.ndarray, x0: int, y0: int, x1: int, y1: int, color, width: int) -> None:
    """Outline of the box ``[x0, x1) x [y0, y1)`` drawn inward, clipped to the canvas."""
    h, w = canvas.shape[:2]
    x0, x1 = max(0, min(x0, w)), max(0, min(x1, w))
    y0, y1 = max(0, min(y0, h)), max(0, min(y1, h))
    if x1 <= x0 or y1 <= y0:
        return
    canvas[y0 : min(y0 + width, y1), x0:x1] = color
    canvas[max(y1 - width, y0) : y1, x0:x1] = color
    canvas[y0:y1, x0 : min(x0 + width, x1)] = color
    canvas[y0:y1, max(x1 - width, x0) : x1] = color


def _paste(canvas, image, box, color, layout: GridLayout) -> tuple[float, int, int]:
    x0, y0, x1, y1 = box
    square, scale, ox, oy = _fit(image, layout.thumb)
    canvas[y0:y1, x0:x1] = color
    b = layout.border
    canvas[y0 + b : y1 - b, x0 + b : x1 - b] = square
    return scale, x0 + b + ox, y0 + b + oy


def _new_figure(width: int, height: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: Path) -> Path:
    """Write the PNG atomically: a failed or killed run leaves no half-written picture."""
    out_png = Path(out_png)
    if out_png.is_dir():
        raise UserError(f"picture path {out_png} is a folder; pass a .png file name")
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, dpi=DPI, format="png")
    return out_png


def ranked_grid(
    query_image: np.ndarray,
    query_box: Sequence[float] | None,
    result_images: Sequence[np.ndarray],
    labels: Sequence[str | None],
    scores: Sequence[float],
    out_png: Path,
    title: str | None = None,
    *,
    name: str | None = None,
    names: Sequence[str] = (),
    query_name: str | None = None,
    rows: Sequence[GridRow] = (),
    layout: GridLayout = GridLayout(),
) -> Path:
    """The query (blue frame, its box in yellow) then the top results, framed by label.

    Frames: green = positive, red = negative, grey = junk, none = unknown (label None). Each
    result is captioned ``#rank score`` (ranks from 1) and, given file names, its name below.
    Extra ``rows`` (e.g. the ranking after re-ranking, or further queries with their own
    ``query``) are drawn below the first one, which is named ``name``.

    Args:
        query_image: the full query image; query_box: its ``(x1, y1, x2, y2)`` or None.
        result_images, labels, scores: the first ranked list, best first.
        out_png: where the PNG goes (parents are created).
        title: text above the grid.
        name: name of the first row (e.g. ``"global"``).
        names, query_name: file names written under the first row's results and its query.
        rows: further :class:`GridRow` lists.
        layout: pixel geometry.

    Returns:
        ``out_png``; the image is exactly ``layout.size(...)`` pixels.
    """
    first = GridRow(result_images, labels, scores, name, names, query_image, query_box, query_name)
    all_rows = [first, *rows]
    for row in all_rows:
        if not len(row.images) == len(row.labels) == len(row.scores):
            raise UserError(
                f"grid row {row.name or ''!r}: {len(row.images)} images, {len(row.labels)} "
                f"labels, {len(row.scores)} scores; pass one of each per result"
            )
        if row.names and len(row.names) != len(row.images):
            raise UserError(
                f"grid row {row.name or ''!r}: {len(row.images)} images but {len(row.names)} "
                "file names; pass one name per result or none"
            )
        bad = [lab for lab in row.labels if lab not in LABEL_COLORS]
        if bad:
            raise UserError(f"unknown grid label {bad[0]!r}; use positive, negative, junk or None")
    cols = 1 + max(len(row.images) for row in all_rows)
    titled = bool(title)
    named = any(row.names or row.query_name for row in all_rows)
    width, height = layout.size(len(all_rows), cols, titled, named)
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)

    captions = []  # (cell box, caption, file name)
    for r, row in enumerate(all_rows):
        if row.query is not None:
            box = layout.cell_box(r, 0, titled, named)
            _paste_query(canvas, row.query, row.query_box, box, layout)
            captions.append((box, "query", row.query_name))
        for j, (image, label, score) in enumerate(zip(row.images, row.labels, row.scores)):
            box = layout.cell_box(r, j + 1, titled, named)
            _paste(canvas, image, box, LABEL_COLORS[label], layout)
            file_name = row.names[j] if row.names else None
            captions.append((box, f"#{j + 1}  {float(score):.3f}", file_name))

    fig = _new_figure(width, height)
    fig.figimage(canvas, xo=0, yo=0, origin="upper", resize=False)

    # Text positions in figure fractions, measured from the top-left like the canvas.
    def put(x: float, y: float, text: str, **kw) -> None:
        fig.text(x / width, 1 - y / height, text, va="center", **kw)

    if titled:
        put(layout.gap, layout.title / 2, title, fontsize=10, weight="bold")
    for r, row in enumerate(all_rows):
        if row.name:
            x0, y0, _, _ = layout.cell_box(r, 1, titled, named)
            put(x0, y0 - layout.text / 2, row.name, fontsize=8)
    for (x0, _, x1, y1), text, file_name in captions:
        put((x0 + x1) / 2, y1 + layout.text / 2, text, fontsize=7, ha="center")
        if file_name:
            y = y1 + layout.text + layout.name_text / 2
            put((x0 + x1) / 2, y, _shorten(file_name, layout.cell), fontsize=6, ha="center")
    return _save(fig, out_png)


def _paste_query(canvas, image, query_box, box, layout: GridLayout) -> None:
    """The query in a blue frame, its box (if any) outlined in yellow."""
    scale, qx, qy = _paste(canvas, image, box, QUERY_COLOR, layout)
    if query_box is not None:
        x1, y1, x2, y2 = (float(v) for v in query_box)
        _draw_rect(
            canvas,
            qx + int(x1 * scale),
            qy + int(y1 * scale),
            qx + int(np.ceil(x2 * scale)),
            qy + int(np.ceil(y2 * scale)),
            BOX_COLOR,
            width=2,
        )


def _shorten(file_name: str, pixels: int) -> str:
    """The end of a file name (its most telling part) that fits ``pixels`` at 6 pt."""
    fits = max(4, pixels // 4)  # about 4 px per character at fontsize 6 and 100 dpi
    return file_name if len(file_name) <= fits else "…" + file_name[-(fits - 1) :]


def ap_changes(ap_before: Sequence[float], ap_after: Sequence[float], tol: float = 1e-9) -> dict:
    """How many queries re-ranking improved / hurt / left unchanged (NaN queries skipped)."""
    x, y = np.asarray(ap_before, float), np.asarray(ap_after, float)
    keep = ~(np.isnan(x) | np.isnan(y))
    d = y[keep] - x[keep]
    return {
        "up": int((d > tol).sum()),
        "down": int((d < -tol).sum()),
        "same": int((np.abs(d) <= tol).sum()),
        "n": int(keep.sum()),
    }


def _panels(ap_before: Mapping, ap_after: Mapping, labels: Sequence[str] | None) -> list[str]:
    names = list(ap_before) if labels is None else list(labels)
    absent = [n for n in names if n not in ap_before or n not in ap_after]
    if absent:
        raise UserError(f"no per-query AP for {absent[0]!r}; have {sorted(ap_before)}")
    return names


def ap_scatter(
    ap_before: Mapping[str, Sequence[float]],
    ap_after: Mapping[str, Sequence[float]],
    out_png: Path,
    labels: Sequence[str] | None = None,
    title: str = "per-query AP",
    *,
    color: Mapping[str, Sequence[float]] | None = None,
    color_label: str = "positives in shortlist",
    axis_labels: tuple[str, str] = ("global AP", "re-ranked AP"),
    panel_inches: float = 3.4,
    comparisons: Mapping[str, Comparison] | None = None,
) -> Path:
    """One point per query, AP before (x) vs after (y), with the y = x line (the paper's
    supplementary Figure A): points above the line are queries the re-ranker improved.

    Args:
        ap_before, ap_after: protocol name -> per-query AP in [0, 1] (NaN = excluded), e.g.
            ``{"Medium": result["medium"]["aps"], "Hard": result["hard"]["aps"]}``.
        out_png: output file.
        labels: the panels to draw, in order (default: every key of ``ap_before``).
        title: figure title.
        color: optional per-panel values to colour the points by (Figure A uses the number of
            positives in the shortlist), shown with a colour bar.
        color_label: colour bar label; axis_labels: (x, y) axis labels.
        panel_inches: size of one panel; the PNG is ``n * panel_inches * 100`` by
            ``(panel_inches + 0.3) * 100`` pixels.
        comparisons: per panel, the paired bootstrap of these APs (``paired_bootstrap``): its
            queries better / same / worse and interval title the panel, so the plot shows the
            counts the report prints; without it the counts are :func:`ap_changes`.
    """
    names = _panels(ap_before, ap_after, labels)
    width, height = round(len(names) * panel_inches * DPI), round((panel_inches + 0.3) * DPI)
    fig = _new_figure(width, height)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        x, y = np.asarray(ap_before[name], float), np.asarray(ap_after[name], float)
        if x.shape != y.shape:
            raise UserError(f"{name}: {x.size} APs before but {y.size} after re-ranking")
        keep = ~(np.isnan(x) | np.isnan(y))
        ax.plot([0, 1], [0, 1], color="#d62728", lw=1.5, zorder=1)
        if color is None:
            ax.scatter(x[keep], y[keep], s=14, zorder=2)
        else:
            c = np.asarray(color[name], float)[keep]
            points = ax.scatter(x[keep], y[keep], s=14, c=c, cmap="viridis", zorder=2)
            fig.colorbar(points, ax=ax, label=color_label)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=axis_labels[0], ylabel=axis_labels[1])
        ax.set_aspect("equal")
        if comparisons is not None and name in comparisons:
            c = comparisons[name]
            head = f"{name}: {c.improved} better, {c.unchanged} same, {c.worsened} worse"
            ax.set_title(
                f"{head}\nΔ {c.delta:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}]", fontsize=8
            )
        else:
            n = ap_changes(x, y)
            ax.set_title(f"{name}: {n['up']} up, {n['down']} down, {n['same']} same", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def ap_delta_bars(
    ap_before: Sequence[float],
    ap_after: Sequence[float],
    out_png: Path,
    label: str = "Medium",
    names: Sequence[str] | None = None,
    title: str | None = None,
    size: tuple[float, float] = (8.0, 3.0),
) -> Path:
    """Per-query AP change (after - before, in points), sorted, green gains and red losses;
    with ``names`` (one per query) the bars are labelled. The PNG is ``size * 100`` pixels."""
    x, y = np.asarray(ap_before, float), np.asarray(ap_after, float)
    if x.shape != y.shape:
        raise UserError(f"{x.size} APs before but {y.size} after re-ranking")
    keep = np.flatnonzero(~(np.isnan(x) | np.isnan(y)))
    delta = 100 * (y[keep] - x[keep])
    order = np.argsort(-delta, kind="stable")
    fig = _new_figure(round(size[0] * DPI), round(size[1] * DPI))
    ax = fig.subplots()
    colors = ["#2ca02c" if d >= 0 else "#d62728" for d in delta[order]]
    ax.bar(np.arange(order.size), delta[order], color=colors, width=0.8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel=f"ΔAP {label} (points)", xlim=(-1, max(order.size, 1)))
    if names is not None:
        ax.set_xticks(
            np.arange(order.size), [names[keep[i]] for i in order], rotation=90, fontsize=5
        )
    else:
        ax.set_xticks([])
    n = ap_changes(x, y)
    ax.set_title(title or f"{label}: {n['up']} up, {n['down']} down, {n['same']} same", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def chain_deltas(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    out_png: Path,
    protocol: str = "medium",
    panel_inches: float = 3.2,
) -> Path:
    """One panel per collection: each re-ranking chain's mAP minus the global ranking's (points),
    green gains and red losses, the global mAP in the panel title; what a table of many
    collections and chains hides at a glance (``locore bench offline``'s ``offline.png``).

    Args:
        results: collection -> chain -> protocol -> mAP (%); every collection has a ``global``
            row (``offline.json``'s ``results``).
        out_png: output file; ``len(results) * panel_inches * 100`` by 300 pixels.
        protocol: which protocol's mAP to compare (``easy``, ``medium``, ``hard``).
    """
    for name, rows in results.items():
        if "global" not in rows:
            raise UserError(f"collection {name!r} has no 'global' row to compare the chains with")
        if any(protocol not in maps for maps in rows.values()):
            have = sorted(rows["global"])
            raise UserError(f"collection {name!r} lacks {protocol!r} mAP; choose one of {have}")
    fig = _new_figure(round(len(results) * panel_inches * DPI), 3 * DPI)
    axes = fig.subplots(1, max(len(results), 1), squeeze=False)[0]
    for ax, (name, rows) in zip(axes, results.items()):
        chains = [c for c in rows if c != "global"]
        delta = [rows[c][protocol] - rows["global"][protocol] for c in chains]
        colors = ["#2ca02c" if d >= 0 else "#d62728" for d in delta]
        bars = ax.barh(np.arange(len(chains)), delta, color=colors, height=0.7)
        ax.bar_label(bars, fmt="%+.2f", fontsize=7, padding=2)
        ax.axvline(0, color="black", lw=0.8)
        ax.margins(x=0.25)
        ax.set_yticks(np.arange(len(chains)), chains, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"{protocol.capitalize()} mAP - global (points)", fontsize=8)
        ax.set_title(f"{name}: global {rows['global'][protocol]:.2f}", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)
