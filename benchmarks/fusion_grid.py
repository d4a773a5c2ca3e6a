"""``locore bench fusion-grid``: pick LoCoRe's fusion weight α and temperature τ on cached logits.

The official procedure (reference-spec §6.5, P21): LoCoRe scores the first window (100 images) of
every query's incoming ranking once and keeps the raw class-1 logits ``l``; then, for each (α, τ)
of a grid, ``s = α·g + (1 − α)·sigmoid(τ·l)`` re-sorts the window and the ranking is evaluated.
The best pair maximises the public-split mAP@100 of gldv2-test ((mAP_M + mAP_H)/2 on a Revisited
dataset) and is then used on ROxf/RPar: ``locore bench revisitop ... --fusion-from best.json``.

Why one window: with sliding windows (§6.6) each window after the first scores the ranking that
the previous windows' fusion produced, so its logits depend on (α, τ) and no cache can replay
them; the official code accordingly takes α, τ from the command line in sliding mode. A grid cell
is therefore exactly what the LoCoRe stage returns with ``sliding=None`` (one window at the top):
the same junk partition (the chain's), the same scorer calls, :func:`locore.rerank.fusion.fuse`
and the stable :func:`locore.rerank.fusion.rank_desc` (ties keep the incoming order).

Any stage that fuses window logits (a :class:`locore.rerank.base.LogitReranker`, such as LoCoRe)
can be grid-searched: its public ``window_logits`` hook fills the cache,
``<run>/fusion_logits_<setup>.npz``, written by ``locore bench revisitop --save-logits``
(:func:`cache_logits`); any other benchmark can write one with :meth:`FusionCache.save`.

Rankings follow the benchmark's rule (docs/REPRODUCE.md): past the cached list, every labelled
image sits where the exact global similarity puts it in the full database ranking (cached as
``rest_ids``/``rest_pos``), or the evaluation is shortlist-only. The best cell is compared with
the default (α, τ) query by query (paired bootstrap), printed and written to ``best.json`` and
``comparison.csv``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from locore.benchmarks.collection import Collection
from locore.benchmarks.protocols import FULL_RULE, SHORTLIST_RULE, compare
from locore.benchmarks.settings import Settings, array_digest, cached_stage
from locore.core.errors import UserError
from locore.engine.evaluate import CSV_COMPARISON
from locore.engine.metrics import (
    GLDV2_DEPTH,
    GLDV2_PUBLIC,
    Comparison,
    Placements,
    evaluate_revisited,
    gldv2_map_at_100,
    labelled,
)
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import LogitReranker
from locore.rerank.chain import build_stage, stage_input
from locore.rerank.fusion import fuse, rank_desc
from locore.rerank.locore.reranker import LocoreOptions

logger = logging.getLogger(__name__)

# The official grid, α and τ both ``np.linspace(0, 1, 11)`` (reference-spec §6.5 step 3). τ = 0
# and α = 1 reproduce the incoming ranking, so the grid holds its own baseline.
OFFICIAL_GRID = tuple(round(0.1 * i, 1) for i in range(11))
METRICS = {"revisited": ("medium", "hard", "mean_mh"), "gldv2": ("public", "private", "combined")}
LABELS = {  # how each maximised metric is named on the printout and the heatmap
    "mean_mh": "(mAP_M + mAP_H)/2",
    "public": "public mAP@100",
    "private": "private mAP@100",
    "combined": "combined mAP@100",
}
METRICS_GND = {"revisited": ("easy", "hard", "junk"), "gldv2": ("ok",)}  # gnd fields each reads
SPLITS = METRICS["gldv2"]
CACHE_FILE = "fusion_logits_{setup}.npz"
SETUP_FILES = {"hard": "hard", "hard*": "hardstar"}
CORNER = "α \\ τ"  # top-left cell of the printed grid
SAVE_HINT = "run `locore bench revisitop ... --save-logits` with a locore stage to write it"
# The cell the best one is compared with: LoCoRe's (and `bench revisitop`'s) default fusion.
DEFAULT_FUSION = (LocoreOptions.alpha, LocoreOptions.temp)
ARRAYS = ("ids", "sims", "logits", "lengths", "gnd", "meta", "rest_ids", "rest_pos")


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FusionCache:
    """Everything a grid cell needs: the incoming ranking, its window's logits, the ground truth.

    Attributes:
        ids: ``[Q, M]`` int64 ground-truth ids in the order the LoCoRe stage receives them, junk
            already moved to the end (reference-spec §6.4); -1 = none.
        sims: ``[Q, M]`` float64 similarities of that order (the fusion's global term ``g``).
        logits: ``[Q, W]`` float64 raw logits of the leading window; NaN past ``lengths[q]``.
        lengths: ``[Q]`` int64, entries of each query's window (junk and padding never enter).
        gnd: per query ``{"easy", "hard", "junk"}`` (Revisited) or ``{"ok"}`` (GLDv2) id lists.
        metric: ``"revisited"`` or ``"gldv2"``.
        num_db: size of the ground-truth id space (Revisited rankings cover the whole database).
        shortlist_only: evaluate the ``M``-long ranking only (the official truncated number).
        n_public: GLDv2 queries of the public split (the first ones).
        info: provenance (dataset, chain, stage options, Hard setup), copied into ``best.json``.
        rest_ids, rest_pos: ``[Q, T]`` int64, the labelled ids (easy, hard, junk) past ``ids``
            in the full-database ranking and their 0-based positions in it (-1 pads); empty
            when the evaluation is shortlist-only or ``ids`` already holds every labelled id.
    """

    ids: np.ndarray
    sims: np.ndarray
    logits: np.ndarray
    lengths: np.ndarray
    gnd: list[dict]
    metric: str = "revisited"
    num_db: int = 0
    shortlist_only: bool = False
    n_public: int = GLDV2_PUBLIC
    info: dict = dataclasses.field(default_factory=dict)
    rest_ids: np.ndarray | None = None
    rest_pos: np.ndarray | None = None

    def __post_init__(self) -> None:
        empty = np.zeros((len(self.ids), 0), dtype=np.int64)
        self.rest_ids = np.asarray(empty if self.rest_ids is None else self.rest_ids, np.int64)
        self.rest_pos = np.asarray(empty if self.rest_pos is None else self.rest_pos, np.int64)
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.sims = np.asarray(self.sims, dtype=np.float64)
        self.logits = np.asarray(self.logits, dtype=np.float64)
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        num_q, width = self.logits.shape if self.logits.ndim == 2 else (-1, -1)
        if self.metric not in METRICS:
            raise UserError(f"unknown fusion metric {self.metric!r}; use one of {list(METRICS)}")
        if (
            self.ids.ndim != 2
            or self.ids.shape != self.sims.shape
            or num_q != len(self.ids)
            or width > self.ids.shape[1]
            or self.lengths.shape != (num_q,)
            or len(self.gnd) != num_q
        ):
            raise UserError(
                f"fusion cache arrays disagree: ids {self.ids.shape}, sims {self.sims.shape}, "
                f"logits {self.logits.shape}, lengths {self.lengths.shape}, {len(self.gnd)} gnd "
                "entries; write it again"
            )
        if (self.lengths > width).any() or (self.lengths < 0).any():
            raise UserError(f"fusion cache window lengths must lie in [0, {width}]; write it again")
        if self.metric == "revisited" and self.ids.size and self.ids.max() >= self.num_db:
            raise UserError(
                f"fusion cache id {int(self.ids.max())} is outside its {self.num_db}-image "
                "database (num_db); write it again"
            )
        placed = self.rest_ids >= 0
        if (
            self.rest_ids.shape != self.rest_pos.shape
            or len(self.rest_ids) != len(self.ids)
            or (self.rest_ids[placed] >= self.num_db).any()
            or (self.rest_pos[placed] >= self.num_db).any()
            or (self.rest_pos[placed] < 0).any()
        ):
            raise UserError(
                f"fusion cache rest_ids {self.rest_ids.shape} / rest_pos {self.rest_pos.shape} "
                f"do not fit its {len(self.ids)} queries and {self.num_db} images; write it again"
            )

    def save(self, path: Path) -> Path:
        """Write one ``.npz`` (arrays plus JSON for the rest), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "metric": self.metric,
            "num_db": int(self.num_db),
            "shortlist_only": bool(self.shortlist_only),
            "n_public": int(self.n_public),
            "info": self.info,
        }
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(
            tmp,
            ids=self.ids,
            sims=self.sims,
            logits=self.logits,
            lengths=self.lengths,
            gnd=np.array(json.dumps(self.gnd)),
            meta=np.array(json.dumps(meta, default=str)),
            rest_ids=self.rest_ids,
            rest_pos=self.rest_pos,
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> FusionCache:
        """Read a cache written by :meth:`save`; a file without logits is a one-line UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} not found; {SAVE_HINT}")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable .npz ({err}); {SAVE_HINT}") from None
        missing = [k for k in ARRAYS if k not in arrays]
        if missing:
            raise UserError(f"{path} has no {missing[0]!r} array (no LoCoRe logits); {SAVE_HINT}")
        meta = json.loads(str(arrays["meta"]))
        return cls(
            ids=arrays["ids"],
            sims=arrays["sims"],
            logits=arrays["logits"],
            lengths=arrays["lengths"],
            gnd=json.loads(str(arrays["gnd"])),
            rest_ids=arrays["rest_ids"],
            rest_pos=arrays["rest_pos"],
            **meta,
        )


def find_cache(cache: Path, setup: str = "hard") -> Path:
    """The cache file of a run folder (or ``cache`` itself when it is a file)."""
    cache = Path(cache)
    if cache.is_file():
        return cache
    if not cache.is_dir():
        raise UserError(f"--cache {cache} does not exist; pass a bench run folder or its .npz")
    path = cache / CACHE_FILE.format(setup=SETUP_FILES[setup])
    if not path.is_file():
        raise UserError(f"{cache} holds no LoCoRe logits ({path.name} missing); {SAVE_HINT}")
    return path


# ----------------------------------------------------------------------------------------------
# Writing the cache from a logit-producing stage
# ----------------------------------------------------------------------------------------------
def cache_logits(settings: Settings, data: Collection, runs: dict, setup: str = "hard") -> Path:
    """``locore bench revisitop --save-logits``: cache the window logits of the chain's last stage
    that produces them (a :class:`~locore.rerank.base.LogitReranker`).

    Only the ``hard`` setup is written by default: it is the official normal run, whose Medium
    and Hard the grid maximises (§6.5). The stage's input is the previous stage's cached output
    (or the shortlist), handed over as the chain hands it (``rerank.chain.stage_input``).
    """
    stages = settings.stages()
    path = settings.out / CACHE_FILE.format(setup=SETUP_FILES[setup])
    params = {
        "stages": stages,
        "setup": setup,
        "inputs": data.inputs,
        "shortlist": array_digest(data.shortlist.ids),
        "eval_shortlist_only": settings.eval_shortlist_only,
    }

    def work() -> None:
        last, stage = _last_logit_stage(stages)
        name, options = stages[last]
        incoming = data.shortlist if last == 0 else Shortlist(*runs[setup][last - 1])
        queries = dataclasses.replace(data.queries, junk=data.junk_sets(setup))
        window = stage.window_logits(*stage_input(stage, queries, incoming), data.database)
        eval_ids = np.where(window.ids >= 0, data.row_to_eval[np.maximum(window.ids, 0)], -1)
        fields = METRICS_GND[settings.metric]
        rest_ids = rest_pos = None
        if settings.metric == "revisited" and not settings.eval_shortlist_only:
            placed = data.global_order.place(window.ids, labelled(data.gnd["gnd"]))
            rest_ids, rest_pos = labelled_rest(placed, (eval_ids >= 0).sum(axis=1))
        FusionCache(
            ids=eval_ids,
            sims=window.sims,
            logits=window.logits,
            lengths=window.lengths,
            gnd=[{k: list(g.get(k, [])) for k in fields} for g in data.gnd["gnd"]],
            metric=settings.metric,
            num_db=data.num_official,
            shortlist_only=settings.eval_shortlist_only,
            n_public=data.gnd.get("n_public", GLDV2_PUBLIC),
            info={
                "dataset": settings.name,
                "setup": setup,
                "chain": list(settings.chain),
                "stage": name,
                "options": options,
            },
            rest_ids=rest_ids,
            rest_pos=rest_pos,
        ).save(path)

    cached_stage(settings.out, path.stem, params, work)
    return path


def labelled_rest(placed: Placements, heads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rest_ids, rest_pos)`` ``[Q, T]`` (-1 pads): per query, the placed (easy / hard / junk)
    ids of a full ranking past its first ``heads[q]`` entries, and their positions (only these
    move an AP; the grid does not keep the 1M-long rankings)."""
    found = [(ids[pos >= h], pos[pos >= h]) for ids, pos, h in zip(placed.ids, placed.pos, heads)]
    width = max((ids.size for ids, _ in found), default=0)
    rest_ids = np.full((len(found), width), -1, dtype=np.int64)
    rest_pos = np.full((len(found), width), -1, dtype=np.int64)
    for q, (ids, pos) in enumerate(found):
        rest_ids[q, : ids.size], rest_pos[q, : pos.size] = ids, pos
    return rest_ids, rest_pos


def _last_logit_stage(stages: list[tuple[str, dict]]) -> tuple[int, LogitReranker]:
    """The last stage of the chain that produces window logits, built (later stages first, so
    the stages before it are never loaded)."""
    for i in range(len(stages) - 1, -1, -1):
        stage = build_stage(stages[i])
        if isinstance(stage, LogitReranker):
            return i, stage
    names = ", ".join(name for name, _ in stages) or "none"
    raise UserError(
        f"--save-logits: no re-ranking stage of --rerank ({names}) produces window logits; "
        "add one that does (e.g. --rerank locore_base)"
    )


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GridResult:
    """Metrics (%) of every grid cell, ``values[name][i, j]`` for ``alphas[i]``, ``temps[j]``."""

    alphas: tuple[float, ...]
    temps: tuple[float, ...]
    values: dict[str, np.ndarray]
    objective: str
    ranking: str  # what was ranked (full database or shortlist), for the printout and best.json

    @property
    def best(self) -> tuple[float, float]:
        """The arg-max of the objective; ties go to the first cell in grid order (α, then τ,
        ascending), as the official loop's ``max`` keeps the first maximum."""
        grid = self.values[self.objective]
        if np.isnan(grid).all():
            raise UserError("every grid cell is NaN: the ground truth has no positives")
        i, j = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
        return self.alphas[i], self.temps[j]

    def at(self, alpha: float, temp: float) -> dict[str, float]:
        """All metrics of one cell."""
        i, j = self.alphas.index(alpha), self.temps.index(temp)
        return {name: float(v[i, j]) for name, v in self.values.items()}

    def rows(self) -> list[dict]:
        """One dict per cell (the CSV rows), α-major."""
        return [{"alpha": a, "temp": t, **self.at(a, t)} for a in self.alphas for t in self.temps]

    def table(self) -> str:
        """The objective as text: α down, τ across, the best cell starred."""
        grid, best = self.values[self.objective], self.best
        head = f"{CORNER:>7}" + "".join(f"{t:>8g}" for t in self.temps)
        lines = [f"{LABELS[self.objective]} (%), best starred", head]
        for i, a in enumerate(self.alphas):
            cells = "".join(
                f"{grid[i, j]:7.2f}{'*' if (a, t) == best else ' '}"
                for j, t in enumerate(self.temps)
            )
            lines.append(f"{a:>7g}{cells}")
        return "\n".join(lines)


def objective_of(metric: str, split: str | None = None) -> str:
    """The maximised metric: (mAP_M + mAP_H)/2 on Revisited, the chosen GLDv2 split's mAP@100."""
    if metric == "gldv2":
        split = split or "public"
        if split not in SPLITS:
            raise UserError(f"unknown GLDv2 split {split!r}; use one of {list(SPLITS)}")
        return split
    if split is not None:
        raise UserError("--split is for GLDv2 only; Revisited grids maximise (mAP_M + mAP_H)/2")
    return "mean_mh"


def _placements(cache: FusionCache, ids: np.ndarray) -> Placements:
    """Where each query's labelled images sit in the evaluation ranking of the cached list
    ``ids`` ``[Q, M]`` (ground-truth ids in a cell's order, -1 = none): inside the list at their
    position among its valid ids; past it (full-database rankings) where the cache recorded them
    (``rest_ids``/``rest_pos``), so a cell never builds a 1M-long ranking."""
    wanted = labelled(cache.gnd)
    out_ids, out_pos = [], []
    for q, row in enumerate(ids):
        head = row[row >= 0]
        where = np.flatnonzero(np.isin(head, wanted[q]))
        rest = cache.rest_ids[q] >= 0 if cache.rest_ids.size else np.zeros(0, dtype=bool)
        out_ids.append(np.concatenate([head[where], cache.rest_ids[q][rest]]))
        out_pos.append(np.concatenate([where, cache.rest_pos[q][rest]]))
    length = ids.shape[1] if cache.shortlist_only else max(cache.num_db, ids.shape[1])
    return Placements(out_ids, out_pos, length)


def _ranking(cache: FusionCache) -> str:
    """The ranking rule of the cache, as the benchmark's table names it."""
    length = cache.ids.shape[1]
    if cache.metric == "gldv2":
        depth = min(length, GLDV2_DEPTH)
        return f"first {depth} ranks of the cached list" + (
            " (positives past them missed)" if depth < GLDV2_DEPTH else ""
        )
    if cache.shortlist_only:
        return f"shortlist of {length} ({SHORTLIST_RULE})"
    return f"full database ({cache.num_db:,} images), {FULL_RULE}"


def _evaluate(cache: FusionCache, ids: np.ndarray) -> tuple[dict[str, float], dict]:
    """``(metrics %, per-query APs)`` of the cached list in the order ``ids`` ``[Q, M]``: the
    APs (fractions) per comparable metric (Revisited: medium, hard; GLDv2: each split's
    queries). GLDv2 windows shorter than 100 are scored as they are (the depth is in
    :func:`_ranking`)."""
    if cache.metric == "gldv2":
        n_public = min(cache.n_public, len(cache.gnd))
        ranks = np.ascontiguousarray(ids.T)
        out = gldv2_map_at_100(ranks, cache.gnd, n_public=n_public, shallow_ok=True)
        aps = out["aps"]
        parts = {"public": aps[:n_public], "private": aps[n_public:], "combined": aps}
        return {k: out[k] for k in SPLITS}, parts
    placed = _placements(cache, ids)
    out = evaluate_revisited(placed, cache.gnd, shortlist_only=cache.shortlist_only)
    medium, hard = out["medium"]["map"], out["hard"]["map"]
    aps = {"medium": out["medium"]["aps"], "hard": out["hard"]["aps"]}
    return {"medium": medium, "hard": hard, "mean_mh": (medium + hard) / 2}, aps


def _cell(cache: FusionCache, alpha: float, temp: float) -> tuple[dict[str, float], dict]:
    """:func:`_evaluate` of one cell: the cached list in its fused order."""
    return _evaluate(cache, fused_ids(cache, alpha, temp))


def window_order(cache: FusionCache, alpha: float, temp: float) -> np.ndarray:
    """``[Q, W]`` positions of the window in fused order; entries past ``lengths[q]`` stay put."""
    width = cache.logits.shape[1]
    valid = np.arange(width)[None, :] < cache.lengths[:, None]
    fused = fuse(cache.sims[:, :width], np.where(valid, cache.logits, 0.0), alpha, temp)
    # -inf past the window keeps those columns last and, the sort being stable, in their order.
    return rank_desc(np.where(valid, fused, -np.inf))


def fused_ids(cache: FusionCache, alpha: float, temp: float) -> np.ndarray:
    """``[Q, M]`` ids after single-window fusion with (α, τ) (what the pipeline returns)."""
    width = cache.logits.shape[1]
    out = cache.ids.copy()
    out[:, :width] = np.take_along_axis(cache.ids[:, :width], window_order(cache, alpha, temp), 1)
    return out


def grid_search(
    cache: FusionCache,
    alphas: Sequence[float] = OFFICIAL_GRID,
    temps: Sequence[float] = OFFICIAL_GRID,
    split: str | None = None,
) -> GridResult:
    """Evaluate single-window fusion for every (α, τ); pure apart from a progress bar.

    Only the window's order changes between cells (its id set is fixed); labelled images past
    it keep the positions the cache recorded, so a cell costs O(window) per query at any
    database size.

    Args:
        cache: incoming ranking, logits and ground truth (:class:`FusionCache`).
        alphas, temps: the grid (default: the official ``linspace(0, 1, 11)`` for both).
        split: GLDv2 split to maximise (default public); must be None for Revisited.
    """
    alphas, temps = tuple(float(a) for a in alphas), tuple(float(t) for t in temps)
    if not alphas or not temps:
        raise UserError("the fusion grid needs at least one alpha and one temperature")
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise UserError(f"fusion alpha {bad[0]} must lie in [0, 1]")
    objective = objective_of(cache.metric, split)
    values = {k: np.full((len(alphas), len(temps)), np.nan) for k in METRICS[cache.metric]}
    cells = [(i, j) for i in range(len(alphas)) for j in range(len(temps))]
    for i, j in tqdm(cells, desc="fusion grid", unit="cell", leave=False, disable=None):
        for name, value in _cell(cache, alphas[i], temps[j])[0].items():
            values[name][i, j] = value
    return GridResult(alphas, temps, values, objective, _ranking(cache))


def compare_with_default(
    cache: FusionCache, result: GridResult, default: tuple[float, float] = DEFAULT_FUSION
) -> dict[str, Comparison]:
    """The best cell against ``default`` (α, τ), per metric (Revisited: medium, hard; GLDv2:
    each split), from the per-query APs of both in mAP points (best minus default)."""
    _, before = _cell(cache, *default)
    _, after = _cell(cache, *result.best)
    return {k: compare(before[k], after[k]) for k in before}


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def heatmap(result: GridResult, out_png: Path, title: str) -> Path:
    """The objective over the grid (α down, τ across), values written in the cells, best boxed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    grid = result.values[result.objective]
    fig = Figure(figsize=(1.2 + 0.62 * len(result.temps), 1.0 + 0.42 * len(result.alphas)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=f"{LABELS[result.objective]} (%)")
    ax.set_xticks(range(len(result.temps)), [f"{t:g}" for t in result.temps])
    ax.set_yticks(range(len(result.alphas)), [f"{a:g}" for a in result.alphas])
    ax.set(xlabel="τ (temperature)", ylabel="α (global weight)", title=title)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), v in np.ndenumerate(grid):
        color = "black" if v > middle else "white"
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color=color)
    a, t = result.best
    i, j = result.alphas.index(a), result.temps.index(t)
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def read_best(path: Path) -> tuple[float, float]:
    """``(alpha, temp)`` from a ``best.json`` of this command (``--fusion-from``)."""
    path = Path(path)
    try:
        best = json.loads(path.read_text())
        return float(best["alpha"]), float(best["temp"])
    except FileNotFoundError:
        raise UserError(f"--fusion-from {path} not found; run `locore bench fusion-grid`") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"--fusion-from {path} has no numeric 'alpha' and 'temp'; pass the best.json written "
            "by `locore bench fusion-grid`"
        ) from None


def write_outputs(
    result: GridResult,
    cache: FusionCache,
    source: Path,
    out: Path,
    comparisons: dict[str, Comparison],
    default: tuple[float, float] = DEFAULT_FUSION,
) -> list[Path]:
    """``grid.csv`` (every cell, every metric), ``best.json``, ``comparison.csv`` (best against
    ``default``, per metric) and ``heatmap.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    with open(out / "grid.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 6) for k, v in row.items()} for row in rows)
    alpha, temp = result.best
    fields = ("metric", "default_map", "best_map", *CSV_COMPARISON)
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for metric, c in comparisons.items():
            values = {"default_map": c.mean_a, "best_map": c.mean_b}
            values.update({k: getattr(c, k) for k in CSV_COMPARISON})
            writer.writerow(
                {
                    "metric": metric,
                    **{k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()},
                }
            )
    best = {
        "alpha": alpha,
        "temp": temp,
        "objective": result.objective,
        "value": result.at(alpha, temp)[result.objective],
        "metrics": result.at(alpha, temp),
        "grid": {"alphas": list(result.alphas), "temps": list(result.temps)},
        "mode": "single window (reference-spec §6.5)",
        "ranking": result.ranking,
        "comparison": {
            "vs": {"alpha": default[0], "temp": default[1]},
            **{metric: dataclasses.asdict(c) for metric, c in comparisons.items()},
        },
        "cache": str(source),
        **cache.info,
    }
    (out / "best.json").write_text(json.dumps(best, indent=1, default=str) + "\n")
    title = f"{cache.info.get('dataset', cache.metric)}: single-window fusion"
    png = heatmap(result, out / "heatmap.png", title)
    return [out / "grid.csv", out / "best.json", out / "comparison.csv", png]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench fusion-grid``."""
    p = parser
    p.add_argument(
        "--cache",
        type=Path,
        required=True,
        help="bench run folder holding fusion_logits_<setup>.npz (written with --save-logits), "
        "or that file",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="expected dataset of the cache (e.g. gldv2, roxford5k); a mismatch is an error",
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        default=None,
        help="GLDv2 split to maximise (default public, the official selection)",
    )
    p.add_argument("--setup", choices=tuple(SETUP_FILES), default="hard", help="Hard setup run")
    grid = ",".join(f"{v:g}" for v in OFFICIAL_GRID)
    p.add_argument("--alphas", type=_floats, default=OFFICIAL_GRID, help=f"default {grid}")
    p.add_argument("--temps", type=_floats, default=OFFICIAL_GRID, help=f"default {grid}")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default <cache>/fusion_grid)"
    )


def run(args: argparse.Namespace) -> int:
    """Load the cache, evaluate the grid, print it and write CSV, JSON and heatmap."""
    source = find_cache(args.cache, args.setup)
    cache = FusionCache.load(source)
    name = str(cache.info.get("dataset", cache.metric))
    if args.dataset is not None and not name.startswith(args.dataset):
        raise UserError(f"{source} holds {name} logits, not {args.dataset}; check --cache")
    result = grid_search(cache, args.alphas, args.temps, args.split)
    comparisons = compare_with_default(cache, result)
    out = args.out or (source.parent / "fusion_grid")
    files = write_outputs(result, cache, source, out, comparisons)
    alpha, temp = result.best
    print(f"{name}: single-window fusion grid over {len(cache.ids)} queries, {result.ranking}")
    print(result.table())
    best = ", ".join(f"{k} {v:.2f}" for k, v in result.at(alpha, temp).items())
    print(f"\nbest: alpha={alpha:g} temp={temp:g} ({best})")
    first = next(iter(comparisons.values()))
    print(
        f"best - default (alpha={DEFAULT_FUSION[0]:g} temp={DEFAULT_FUSION[1]:g}), per-query AP: "
        f"mean difference [{100 * first.confidence:g} % paired bootstrap CI, "
        f"{first.resamples:,} resamples, seed {first.seed}], queries better / same / worse"
    )
    for metric, c in comparisons.items():
        print(f"  {metric:<10}{c.summary()}")
    print(f"written: {', '.join(str(f) for f in files)}")
    return 0
