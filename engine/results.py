"""Writing search results: JSON Lines per query and ranked-result grids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from locore.engine.pipeline import QueryResult


def result_records(
    results: Sequence[QueryResult], names: Sequence[str], limit: int | None = None
) -> list[dict]:
    """One JSON-able record per query: the ranked (name, score, global score, rank before)."""
    records = []
    for r in results:
        n = len(r.ids) if limit is None else min(limit, len(r.ids))
        records.append(
            {
                "query": r.query,
                "box": list(r.box) if r.box is not None else None,
                "results": [
                    {
                        "rank": i,
                        "id": int(r.ids[i]),
                        "name": names[int(r.ids[i])],
                        "score": float(r.scores[i]),
                        "global_score": float(r.global_sims[i]),
                        "rank_before": int(r.rank_before[i]),
                    }
                    for i in range(n)
                ],
            }
        )
    return records


def write_jsonl(records: Sequence[dict], path: Path) -> Path:
    """Write records as JSON Lines (one query per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def format_table(record: dict, limit: int = 10) -> str:
    """Human-readable top-``limit`` list of one query."""
    lines = [f"query: {record['query']}"]
    lines.append(f"{'rank':>4}  {'score':>8}  {'global':>8}  {'before':>6}  name")
    for r in record["results"][:limit]:
        lines.append(
            f"{r['rank'] + 1:>4}  {r['score']:8.4f}  {r['global_score']:8.4f}  "
            f"{r['rank_before'] + 1:>6}  {r['name']}"
        )
    return "\n".join(lines)
