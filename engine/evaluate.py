"""Evaluate an index (and its re-ranking chain) on a Revisited-format ground truth.

The ground truth names database images by ``imlist`` (file stems) and queries by ``qimlist``;
index ids are mapped to ``imlist`` ids by name, so the index may hold images in any order.
Rankings cover the whole database: ids the first stage did not return (and database images
that could not be indexed) are appended after the shortlist in index order, so mAP is the
full-database number, not a shortlist-truncated one.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np

from locore.core.errors import UserError
from locore.engine.metrics import evaluate_revisited
from locore.engine.pipeline import (
    IndexHandle,
    build_extractor,
    extract_queries,
    first_stage,
    rerank_chain,
)
from locore.rerank.base import RerankResult

PROTOCOLS = ("easy", "medium", "hard")


@dataclasses.dataclass
class EvalReport:
    """Metrics before and after re-ranking (``after`` is None without a chain)."""

    before: dict
    after: dict | None
    num_queries: int
    num_db: int
    shortlist: int
    rerank: list[str]
    per_query: list[dict]


def load_gnd(path: Path) -> dict:
    """Read a ``gnd_*.pkl`` (official format) and check its keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ground truth {path} does not exist; pass the gnd_<dataset>.pkl file")
    with open(path, "rb") as f:
        gnd = pickle.load(f)
    for key in ("imlist", "qimlist", "gnd"):
        if key not in gnd:
            raise UserError(f"ground truth {path} has no {key!r}; it is not a Revisited gnd file")
    return gnd


def _query_paths(folder: Path, qimlist: list[str]) -> list[Path]:
    paths = []
    for name in qimlist:
        hits = sorted(Path(folder).glob(f"{name}.*"))
        if not hits:
            raise UserError(f"query image {name}.* not found in {folder}; pass the query folder")
        paths.append(hits[0])
    return paths


def to_imlist_ranks(ids: np.ndarray, index_to_imlist: np.ndarray, num_db: int) -> np.ndarray:
    """Index-id rankings ``[Q, M]`` -> full ``imlist`` rankings ``[num_db, Q]`` (official shape)."""
    ranks = np.empty((num_db, ids.shape[0]), dtype=np.int64)
    for q in range(ids.shape[0]):
        mapped = index_to_imlist[ids[q][ids[q] >= 0]]
        head = mapped[mapped >= 0]
        rest = np.setdiff1d(np.arange(num_db), head, assume_unique=False)
        ranks[:, q] = np.concatenate([head, rest])
    return ranks


def evaluate_index(
    handle: IndexHandle, gnd_path: Path, queries_dir: Path, out: Path | None = None
) -> EvalReport:
    """Search every ground-truth query (cropped to its box), re-rank, and compute E/M/H mAP."""
    gt = load_gnd(gnd_path)
    imlist = list(gt["imlist"])
    position = {name: i for i, name in enumerate(imlist)}
    index_to_imlist = np.array(
        [position.get(Path(n).with_suffix("").as_posix(), -1) for n in handle.names]
    )
    if (index_to_imlist < 0).all():
        raise UserError(f"no indexed image matches the imlist of {gnd_path}; wrong --index?")
    boxes = [tuple(g["bbx"]) if g.get("bbx") is not None else None for g in gt["gnd"]]
    paths = _query_paths(queries_dir, list(gt["qimlist"]))
    config = handle.config
    queries = extract_queries(build_extractor(config.extractor), paths, boxes)
    shortlist = first_stage(handle, queries, config.search.topk)
    before = evaluate_revisited(
        to_imlist_ranks(shortlist.ids, index_to_imlist, len(imlist)), gt["gnd"]
    )
    after = None
    result: RerankResult | None = None
    if config.search.rerank:
        result = rerank_chain(config.search.rerank, queries, shortlist, handle.database)
        after = evaluate_revisited(
            to_imlist_ranks(result.ids, index_to_imlist, len(imlist)), gt["gnd"]
        )
    per_query = []
    for q, name in enumerate(gt["qimlist"]):
        row = {"query": name}
        for proto in PROTOCOLS:
            row[f"ap_{proto}_before"] = _nan_to_none(before[proto]["aps"][q])
            if after is not None:
                row[f"ap_{proto}_after"] = _nan_to_none(after[proto]["aps"][q])
        row["top10_before"] = [handle.names[i] for i in shortlist.ids[q][:10]]
        if result is not None:
            row["top10_after"] = [handle.names[i] for i in result.ids[q][:10]]
        per_query.append(row)
    report = EvalReport(
        before=_summary(before),
        after=_summary(after) if after is not None else None,
        num_queries=len(paths),
        num_db=len(imlist),
        shortlist=int(shortlist.ids.shape[1]),
        rerank=[s.name for s in config.search.rerank],
        per_query=per_query,
    )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        summary = dataclasses.asdict(report)
        per = summary.pop("per_query")
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
        (out / "per_query.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per))
    return report


def _nan_to_none(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def _summary(metrics: dict) -> dict:
    return {
        proto: {
            "map": float(metrics[proto]["map"]),
            "mp@k": [float(v) for v in metrics[proto]["mpk"]],
        }
        for proto in PROTOCOLS
    }


def format_metrics(report: EvalReport) -> str:
    """The mAP table printed by ``locore eval`` and ``locore demo``."""
    lines = [
        f"{report.num_queries} queries, {report.num_db} database images, "
        f"shortlist {report.shortlist}; mAP (%)"
    ]
    lines.append(f"{'':<28}{'Easy':>8}{'Medium':>8}{'Hard':>8}")
    rows = [("global", report.before)]
    if report.after is not None:
        rows.append(("re-ranked: " + "+".join(report.rerank), report.after))
    for label, metrics in rows:
        values = "".join(f"{metrics[p]['map']:8.2f}" for p in PROTOCOLS)
        lines.append(f"{label:<28}{values}")
    return "\n".join(lines)
