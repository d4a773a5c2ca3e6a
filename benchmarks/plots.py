"""Pictures people would rather look at: ranked-result grids and per-query AP scatter plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

BORDER = {"positive": "#2ca02c", "negative": "#d62728", "junk": "#7f7f7f", None: "#ffffff"}


def _figure(rows: int, cols: int, size: float = 2.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size + 0.4), squeeze=False)
    return plt, fig, axes


def ranked_grid(
    query_image: np.ndarray,
    query_box: Sequence[float] | None,
    result_images: Sequence[np.ndarray],
    labels: Sequence[str | None],
    scores: Sequence[float],
    out_png: Path,
    title: str | None = None,
) -> Path:
    """Query (with its box in yellow) then the ranked results, each framed by its label colour
    (green positive, red negative, grey junk, white unknown) and captioned with rank and score."""
    import matplotlib.patches as patches

    plt, fig, axes = _figure(1, len(result_images) + 1)
    ax = axes[0, 0]
    ax.imshow(query_image)
    if query_box is not None:
        x1, y1, x2, y2 = query_box
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="yellow", lw=2))
    ax.set_title("query", fontsize=8)
    for i, (image, label, score) in enumerate(zip(result_images, labels, scores), start=1):
        ax = axes[0, i]
        ax.imshow(image)
        h, w = image.shape[:2]
        ax.add_patch(patches.Rectangle((0, 0), w - 1, h - 1, fill=False, ec=BORDER[label], lw=5))
        ax.set_title(f"#{i}  {score:.3f}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def ap_scatter(
    ap_before: dict[str, Sequence[float]],
    ap_after: dict[str, Sequence[float]],
    out_png: Path,
    title: str = "per-query AP",
) -> Path:
    """One point per query, first-stage AP (x) vs re-ranked AP (y), one panel per protocol,
    with the y = x line: points above it are queries the re-ranker improved."""
    names = list(ap_before)
    plt, fig, axes = _figure(1, len(names), size=3.2)
    for ax, name in zip(axes[0], names):
        x, y = np.asarray(ap_before[name], float), np.asarray(ap_after[name], float)
        keep = ~(np.isnan(x) | np.isnan(y))
        ax.plot([0, 1], [0, 1], color="#999999", lw=1)
        ax.scatter(x[keep], y[keep], s=12)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="global AP", ylabel="re-ranked AP", title=name)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
