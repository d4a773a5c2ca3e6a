"""The report of ``locore bench revisitop``: the printed table, ``results.csv``,
``metrics.json``, ``per_query.jsonl``, ``table.txt``, ``ap_scatter.png`` and ``grids/``.

What each protocol puts in them comes from its :class:`~locore.benchmarks.protocols.Evaluation`.
Every re-ranked row carries its comparison with the global row (mean per-query AP difference,
paired bootstrap interval, queries better / same / worse) in the table, the CSV and the JSON.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np

from locore.benchmarks import plots
from locore.benchmarks.collection import Collection, positives
from locore.benchmarks.protocols import evaluation_of, ranking_rule
from locore.benchmarks.settings import Settings
from locore.engine.metrics import Comparison
from locore.feature_extractors.io import load_image

MISSING_IMAGE = np.full((64, 64, 3), 200, np.uint8)  # grid cell of an image we have no file for


@dataclasses.dataclass
class Report:
    """What the benchmark printed and wrote."""

    rows: list[dict]  # one per chain prefix, "global" first (results.csv)
    comparisons: list[dict[str, Comparison]]  # per re-ranked row (rows[1:]), vs the global row
    table: str  # the printed table
    files: list[str]  # written files, relative to --out


def format_table(
    settings: Settings,
    data: Collection,
    rows: list[dict],
    comparisons: list[dict[str, Comparison]],
) -> str:
    """The paper's layout: one row per chain prefix (Revisited: Medium / Hard / Hard* mAP;
    GLDv2: public / private / combined mAP@100), then each re-ranked row against the global
    one, per column."""
    table = evaluation_of(settings).table(settings, data, rows, ranking_rule(settings, data))
    if not comparisons:
        return table
    first = next(iter(comparisons[0].values()))
    lines = [
        table,
        f"vs global, per-query AP: mean difference [{100 * first.confidence:g} % paired "
        f"bootstrap CI, {first.resamples:,} resamples, seed {first.seed}], queries "
        "better / same / worse",
    ]
    for row, compared in zip(rows[1:], comparisons):
        for i, (column, c) in enumerate(compared.items()):
            label = row["method"] if i == 0 else ""
            lines.append(f"{label:<36}{column.capitalize():<10}{c.summary()}")
    return "\n".join(lines)


def write_reports(
    settings: Settings,
    data: Collection,
    rows: list[dict],
    before: dict,
    stage_metrics: list[dict[str, dict]],
    runs: dict,
    comparisons: list[dict[str, Comparison]],
) -> list[str]:
    """Write every report file but ``table.txt``; returns their names.

    ``stage_metrics[i]`` maps each setup to the metrics after chain stage i, ``comparisons[i]``
    each column to that row's comparison with the global row, ``runs`` each setup to the
    stages' ``(ids, scores)`` (``benchmarks.revisitop.rerank_runs``); the first setup's final
    ranking is the one shown per query and in the grids.
    """
    out = settings.out
    evaluation = evaluation_of(settings)
    with open(out / "results.csv", "w", newline="") as f:
        # the global row has no comparison columns: blank there
        writer = csv.DictWriter(f, fieldnames=list(rows[-1]), restval="")
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "dataset": settings.name,
        "chain": list(settings.chain),
        "stages": settings.stages(),
        "shortlist_depth": int(data.shortlist.ids.shape[1]),
        "eval_shortlist_only": settings.eval_shortlist_only,
        "ranking": ranking_rule(settings, data),
        "rows": rows,
        "comparisons": [
            {
                "method": row["method"],
                "vs": rows[0]["method"],
                **{column: dataclasses.asdict(c) for column, c in compared.items()},
            }
            for row, compared in zip(rows[1:], comparisons)
        ],
    }
    (out / "metrics.json").write_text(json.dumps(meta, indent=1, default=str))
    files = ["results.csv", "metrics.json"]

    shown = evaluation.setups[0]  # the run whose ranking the reports show
    final = stage_metrics[-1] if stage_metrics else dict.fromkeys(evaluation.setups, before)
    final_ids = runs[shown][-1][0] if runs else data.shortlist.ids
    placed_before = evaluation.placed(settings, data, data.shortlist.ids)
    placed_after = evaluation.placed(settings, data, final_ids)
    with open(out / "per_query.jsonl", "w") as f:
        for q, name in enumerate(data.gnd["qimlist"]):
            answers = positives(data.gnd["gnd"][q])
            record = {
                "query": name,
                **evaluation.query_aps(data, q, before, final),
                "positive_ranks_before": placed_before.of_query(q, answers).tolist(),
                "positive_ranks_after": placed_after.of_query(q, answers).tolist(),
                "top10_before": [data.db_names[i] for i in data.shortlist.ids[q][:10] if i >= 0],
                "top10_after": [data.db_names[i] for i in final_ids[q][:10] if i >= 0],
            }
            f.write(json.dumps(record) + "\n")
    files.append("per_query.jsonl")
    if runs:
        ap_before, ap_after = evaluation.scatter(before, final)
        plots.ap_scatter(
            ap_before,
            ap_after,
            out / "ap_scatter.png",
            title=f"{settings.name}: global vs {' + '.join(settings.chain)}",
            color=_positives_in_shortlist(settings, data),
            color_label=f"positives in the top {settings.locore.get('topk', 400)}",
            comparisons={
                panel: comparisons[-1][column] for panel, column in evaluation.panel_columns.items()
            },
        )
        files.append("ap_scatter.png")
    final_scores = runs[shown][-1][1] if runs else data.shortlist.sims
    files += _grids(settings, data, before, final[shown], final_ids, final_scores)
    return files


def _positives_in_shortlist(settings: Settings, data: Collection) -> dict[str, np.ndarray]:
    """Per scatter panel, each query's positives among the re-ranked shortlist entries (the
    colour of the paper's supplementary Figure A)."""
    top = data.shortlist.ids[:, : settings.locore.get("topk", 400)]
    counts: dict[str, list] = {}
    for q, g in enumerate(data.gnd["gnd"]):
        ids = data.row_to_eval[top[q][top[q] >= 0]]
        for panel, answers in evaluation_of(settings).panel_positives(g).items():
            counts.setdefault(panel, []).append(np.isin(ids, answers).sum())
    return {k: np.asarray(v, dtype=float) for k, v in counts.items()}


def _grids(
    settings: Settings,
    data: Collection,
    before: dict,
    after: dict,
    final_ids: np.ndarray,
    final_scores: np.ndarray,
) -> list[str]:
    """One grid per query for the first ``grids`` queries: global top 10 above the re-ranked
    top 10, framed green/red/grey by ground-truth label."""
    if settings.grids <= 0 or data.query_images is None or data.image_of is None:
        return []
    evaluation = evaluation_of(settings)
    files = []
    for q in range(min(settings.grids, len(data.query_images))):
        g = data.gnd["gnd"][q]
        rows = []
        for title, ids, scores, metrics in (
            ("global", data.shortlist.ids, data.shortlist.sims, before),
            (" + ".join(settings.chain) or "global", final_ids, final_scores, after),
        ):
            top = [int(i) for i in ids[q][:10] if i >= 0]
            paths = [data.image_of(data.db_names[i]) for i in top]
            rows.append(
                plots.GridRow(
                    [load_image(p) if p is not None else MISSING_IMAGE for p in paths],
                    [grid_label(int(data.row_to_eval[i]), g) for i in top],
                    [float(s) for s in scores[q][: len(top)]],
                    f"{title}: {evaluation.caption(metrics, q)}",
                )
            )
        name = data.gnd["qimlist"][q]
        png = plots.ranked_grid(
            load_image(data.query_images[q]),
            tuple(g["bbx"]) if g.get("bbx") is not None else None,
            rows[0].images,
            rows[0].labels,
            rows[0].scores,
            settings.out / "grids" / f"{name.replace('/', '_')}.png",  # GLDv2 names are paths
            title=name,
            name=rows[0].name,
            rows=rows[1:],
        )
        files.append(str(png.relative_to(settings.out)))
    return files


def grid_label(eval_id: int, g: dict) -> str:
    """Frame of a result in the grids. From ground-truth ids rather than names
    (``locore.benchmarks.visualize.label_of`` knows only easy/hard/junk and ``imlist`` names)."""
    if eval_id in positives(g):
        return "positive"
    if eval_id in set(g.get("junk", [])):
        return "junk"
    return "negative"
