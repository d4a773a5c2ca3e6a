"""Search results as people and programs read them: a printed table and JSON Lines.

One JSON object per query (``locore search/rerank --out FILE``)::

    {"query": "q.jpg",            # the query file as given
     "box": [x1, y1, x2, y2],     # the query region in pixels, or null
     "results": [                 # best first
        {"rank": 1,               # final rank, from 1
         "id": 17,                # row of the image in the index (from 0)
         "name": "a/b.jpg",       # its path relative to the indexed folder
         "score": 0.93,           # final score (after the re-ranking chain, if any)
         "global_score": 0.71,    # first-stage (global descriptor) similarity
         "rank_before": 4},       # its first-stage rank, from 1
        ...]}

Ranks count from 1 everywhere a person reads them (table and JSON alike); only ``id`` is an
array index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from locore.core.atomic import write_text
from locore.engine.pipeline import QueryResult


def result_records(
    results: Sequence[QueryResult], names: Sequence[str], limit: int | None = None
) -> list[dict]:
    """One JSON-able record per query (fields in the module docstring)."""
    records = []
    for r in results:
        n = len(r.ids) if limit is None else min(limit, len(r.ids))
        records.append(
            {
                "query": r.query,
                "box": list(r.box) if r.box is not None else None,
                "results": [
                    {
                        "rank": i + 1,
                        "id": int(r.ids[i]),
                        "name": names[int(r.ids[i])],
                        "score": float(r.scores[i]),
                        "global_score": float(r.global_sims[i]),
                        "rank_before": int(r.rank_before[i]) + 1,
                    }
                    for i in range(n)
                ],
            }
        )
    return records


def write_jsonl(records: Sequence[dict], path: Path) -> Path:
    """Write records as JSON Lines (one query per line), atomically."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def format_table(record: dict, limit: int = 10) -> str:
    """Human-readable top-``limit`` list of one query."""
    lines = [f"query: {record['query']}"]
    lines.append(f"{'rank':>4}  {'score':>8}  {'global':>8}  {'before':>6}  name")
    for r in record["results"][:limit]:
        lines.append(
            f"{r['rank']:>4}  {r['score']:8.4f}  {r['global_score']:8.4f}  "
            f"{r['rank_before']:>6}  {r['name']}"
        )
    return "\n".join(lines)
