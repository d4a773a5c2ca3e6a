"""Evaluate an index (and its re-ranking chain) on a Revisited-format ground truth.

The ground truth names database images by ``imlist`` (file stems) and queries by ``qimlist``;
index ids are mapped to ``imlist`` ids by name, so the index may hold images in any order, and
every ``imlist`` image must be in it. Rankings cover the whole database: the ids the first stage
did not return follow the shortlist ranked by their exact global similarity to the query (ties
by ``imlist`` id), so mAP is the full-database number and does not depend on where images sit in
the index (issue #16: appending them in file order put every ROxf image ahead of the +1M
distractors). Without global descriptors the evaluation is shortlist-only, as the official code.

This module also holds the one reader of ``gnd_*.pkl`` files (:func:`load_gnd`); the dataset
loaders call it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from locore.core.atomic import write_text
from locore.core.errors import UserError
from locore.engine.metrics import (
    PROTOCOLS,
    Placements,
    evaluate_revisited,
    labelled,
    paired_bootstrap,
)
from locore.engine.pipeline import (
    IndexHandle,
    build_extractor,
    extract_queries,
    first_stage,
    rerank_chain,
)
from locore.rerank.base import RerankResult

REVISITOP = "http://cmp.felk.cvut.cz/revisitop/"
GND_FIELDS = ("easy", "hard", "junk")
FULL_RANKING = (
    "full database: ids past the shortlist ranked by exact global similarity (ties by imlist id)"
)
# Comparison fields in the CSV, per protocol (all of them are in metrics.json).
CSV_COMPARISON = ("delta", "ci_low", "ci_high", "improved", "unchanged", "worsened")


@dataclasses.dataclass
class EvalReport:
    """Metrics before and after re-ranking (``after`` and ``comparison`` are None without a
    chain). ``comparison[protocol]`` is a :class:`locore.engine.metrics.Comparison` as a dict
    (re-ranked minus global, in mAP points); ``ranking`` says how the rankings were completed."""

    before: dict
    after: dict | None
    num_queries: int
    num_db: int
    shortlist: int
    rerank: list[str]
    per_query: list[dict]
    ranking: str = FULL_RANKING
    comparison: dict | None = None


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------
def read_pickle(path: Path, published: str) -> object:
    """Unpickle a ground-truth file; an unreadable one is a UserError saying where to get it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ground truth {path} does not exist; pass a gnd pickle ({published})")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    # A damaged pickle can raise nearly anything (UnpicklingError, EOFError, ValueError,
    # KeyError, ImportError, ...): all of them mean "not a readable gnd file".
    except Exception as err:  # noqa: BLE001
        raise UserError(
            f"{path} cannot be read as a gnd pickle ({type(err).__name__}); pass the pickled "
            f"ground truth, or download it again ({published})"
        ) from None


def _id_list(path: Path, q: int, field: str, values, num_db: int) -> list[int]:
    try:
        ids = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        ids = np.array([np.nan])
    if not np.isfinite(ids).all() or (ids != np.round(ids)).any():
        raise UserError(f"{path}: query {q}'s {field!r} is not a list of image ids; it is corrupt")
    if ids.size and (ids.min() < 0 or ids.max() >= num_db):
        raise UserError(
            f"{path}: query {q} lists {field} id {int(ids.max())} outside the {num_db}-image "
            "imlist; the file is corrupt"
        )
    return ids.astype(np.int64).tolist()


def _names(path: Path, raw: Mapping, key: str) -> list[str]:
    values = raw[key]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
        raise UserError(f"{path}: {key!r} is not a list of image names; it is corrupt")
    return [str(n) for n in values]


def load_gnd(path: Path, published: str = REVISITOP) -> dict:
    """Read and check a Revisited-format ``gnd_*.pkl`` (the official files and ours).

    Every defect is a one-line :class:`UserError` naming the file: not a pickle, truncated, not
    a dict, no ``imlist``/``qimlist``/``gnd``, fewer or more ``gnd`` entries than queries, an
    entry without ``easy``/``hard``/``junk``, ids outside ``imlist``.

    Returns:
        ``{"imlist": [str], "qimlist": [str], "gnd": [{"bbx": (x1, y1, x2, y2) | None,
        "easy": [int], "hard": [int], "junk": [int]}]}``; id fields become plain int lists
        whatever container the pickle used (P18).
    """
    path = Path(path)
    raw = read_pickle(path, published)
    if not isinstance(raw, Mapping):
        raise UserError(
            f"{path} holds a {type(raw).__name__}, not a Revisited gnd dict; download the "
            f"gnd file again from {published}"
        )
    for key in ("imlist", "qimlist", "gnd"):
        if key not in raw:
            raise UserError(f"{path} has no {key!r}: it is not a Revisited gnd pickle")
    imlist, qimlist = _names(path, raw, "imlist"), _names(path, raw, "qimlist")
    entries = raw["gnd"]
    is_list = isinstance(entries, Sequence | np.ndarray)
    if not is_list or len(entries) != len(qimlist):
        count = len(entries) if is_list else type(entries).__name__
        raise UserError(
            f"{path}: {count} gnd entries for {len(qimlist)} queries; the file is truncated or "
            "corrupt, download it again"
        )
    gnd = []
    for q, entry in enumerate(entries):
        absent = [k for k in GND_FIELDS if not isinstance(entry, Mapping) or k not in entry]
        if absent:
            raise UserError(
                f"{path}: query {q} ({qimlist[q]}) has no {absent[0]!r} list; every entry needs "
                f"{'/'.join(GND_FIELDS)} (README: ground-truth format)"
            )
        box = entry.get("bbx")
        item = {"bbx": None if box is None else _box(path, q, box)}
        for field in GND_FIELDS:
            item[field] = _id_list(path, q, field, entry[field], len(imlist))
        gnd.append(item)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _box(path: Path, q: int, box) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in np.asarray(box).reshape(-1))
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4:
        raise UserError(f"{path}: query {q}'s bbx is not four numbers x1, y1, x2, y2")
    return values


def _query_paths(folder: Path, qimlist: list[str]) -> list[Path]:
    paths = []
    for name in qimlist:
        hits = sorted(Path(folder).glob(f"{name}.*"))
        if not hits:
            raise UserError(f"query image {name}.* not found in {folder}; pass the query folder")
        paths.append(hits[0])
    return paths


def index_to_imlist(names: Sequence[str], imlist: Sequence[str], gnd_path: Path) -> np.ndarray:
    """``[N_index]`` imlist id of each index entry (-1: not in the ground truth).

    Every imlist image must be indexed, or the full-database mAP would silently count it as
    never retrieved; the error names the first missing one.
    """
    position = {name: i for i, name in enumerate(imlist)}
    mapping = np.array(
        [position.get(Path(n).with_suffix("").as_posix(), -1) for n in names], dtype=np.int64
    )
    indexed = np.zeros(len(imlist), dtype=bool)
    indexed[mapping[mapping >= 0]] = True
    if not indexed.all():
        missing = np.flatnonzero(~indexed)
        raise UserError(
            f"{missing.size} of {len(imlist)} imlist images of {gnd_path} are not in the index "
            f"(first: {imlist[missing[0]]}); index the database folder this gnd describes"
        )
    return mapping


# ----------------------------------------------------------------------------------------------
# Rankings in ground-truth ids
# ----------------------------------------------------------------------------------------------
def shortlist_heads(ids: np.ndarray, index_to_eval: np.ndarray) -> np.ndarray:
    """Index-id rankings ``[Q, M]`` (-1 = none) -> ground-truth ids ``[Q, M]``, each row's
    valid ids first in their order, -1 after (ids outside the ground truth are dropped)."""
    ids = np.asarray(ids)
    mapped = np.where(ids >= 0, np.asarray(index_to_eval)[np.maximum(ids, 0)], -1)
    order = np.argsort(mapped < 0, axis=1, kind="stable")
    heads = np.take_along_axis(mapped, order, axis=1)
    ordered = np.sort(heads, axis=1)
    if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
        raise UserError("a shortlist holds the same database image twice; rebuild the index")
    return heads


def _head_then(head: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``head`` followed by every other id of ``order`` in ``order``'s order (a boolean mask:
    linear in the database, no per-query set difference)."""
    in_head = np.zeros(order.size, dtype=bool)
    in_head[head] = True
    return np.concatenate([head, order[~in_head[order]]])


class GlobalOrder:
    """Every query's exact global ranking of the evaluated database, kept as positions.

    ``rank[q, e]`` is where ground-truth image ``e`` sits when all ``num_eval`` images are sorted
    by exact global similarity to query q (inner product; ties by ground-truth id; images
    without a descriptor last): int32 ``[Q, num_eval]``, 280 MB for 70 queries x 1M images.
    It is built once per query set (one blocked pass over the descriptors, one sort per query)
    and serves every chain and setup: a full-database ranking is the chain's shortlist followed
    by every other image in this order, so where an image lands in it follows from the
    shortlist alone (:meth:`place`, O(shortlist) per query). Nothing here depends on where an
    image sits in the index or the ground-truth list (issue #16: appending the rest in file
    order put every ROxf image ahead of the +1M distractors).

    Args:
        query_global: ``[Q, D]`` float32 query descriptors.
        db_global: ``[N, D]`` database descriptors in index order (a memmap is read in blocks
            of ``block`` rows: memory is ``[Q, num_eval]`` similarities while building).
        index_to_eval: ``[N]`` ground-truth id of each index id (-1 = not evaluated).
        num_eval: ground-truth database size (``len(imlist)``, + distractors).
    """

    def __init__(
        self,
        query_global: np.ndarray,
        db_global: np.ndarray,
        index_to_eval: np.ndarray,
        num_eval: int,
        block: int = 65_536,
    ) -> None:
        self.index_to_eval = np.asarray(index_to_eval)
        query_global = np.asarray(query_global, dtype=np.float32)
        sims = np.full((query_global.shape[0], num_eval), -np.inf, dtype=np.float32)
        for start in range(0, db_global.shape[0], block):
            part = np.asarray(db_global[start : start + block], dtype=np.float32)
            dest = self.index_to_eval[start : start + block]
            keep = dest >= 0
            sims[:, dest[keep]] = query_global @ part[keep].T
        self.rank = np.empty(sims.shape, dtype=np.int32 if num_eval < 2**31 else np.int64)
        steps = np.arange(num_eval, dtype=self.rank.dtype)
        for q in range(sims.shape[0]):
            self.rank[q, _descending(sims[q])] = steps

    @property
    def num_eval(self) -> int:
        return self.rank.shape[1]

    def place(self, ids: np.ndarray, wanted: Sequence[np.ndarray]) -> Placements:
        """Where ``wanted[q]`` (ground-truth ids) sit in query q's full-database ranking:
        the shortlist ``ids`` ``[Q, M]`` (index ids in their final order, -1 = none), then every
        other image in global order. An image past the shortlist is preceded by the whole
        shortlist and by the images ahead of it in global order that the shortlist does not
        hold: ``M_q + rank[q, e] - |{h in shortlist: rank[q, h] < rank[q, e]}|``."""
        heads = shortlist_heads(ids, self.index_to_eval)
        out_ids, out_pos = [], []
        for q, row in enumerate(heads):
            head = row[row >= 0]
            want = np.unique(np.asarray(wanted[q], dtype=np.int64))
            order = np.argsort(head, kind="stable")
            at = np.minimum(np.searchsorted(head[order], want), max(head.size - 1, 0))
            hit = head[order][at] == want if head.size else np.zeros(want.size, dtype=bool)
            glob = self.rank[q, want].astype(np.int64)
            ahead = np.searchsorted(np.sort(self.rank[q, head]), glob)
            pos = np.where(hit, order[at] if head.size else 0, head.size + glob - ahead)
            by_pos = np.argsort(pos, kind="stable")
            out_ids.append(want[by_pos])
            out_pos.append(pos[by_pos].astype(np.int64))
        return Placements(out_ids, out_pos, self.num_eval)

    def ranks(self, ids: np.ndarray) -> np.ndarray:
        """The dense full rankings ``[num_eval, Q]`` (ground-truth ids) :meth:`place` reads
        from: for callers that need the whole list (``num_eval`` x Q int64)."""
        heads = shortlist_heads(ids, self.index_to_eval)
        order = np.empty(self.num_eval, dtype=np.int64)
        ranks = np.empty((heads.shape[0], self.num_eval), dtype=np.int64)
        for q, row in enumerate(heads):
            order[self.rank[q]] = np.arange(self.num_eval)
            ranks[q] = _head_then(row[row >= 0], order)
        return ranks.T


def _descending(sims: np.ndarray) -> np.ndarray:
    """Ids by descending similarity, ties by id, NaN last: ``argsort(-sims, kind="stable")``
    4x faster, as one ``np.sort`` of 64-bit keys (order-preserving bits of ``-sim``, then id)."""
    neg = -sims.astype(np.float32) + np.float32(0)  # -0.0 -> +0.0: equal values, equal keys
    bits = neg.view(np.uint32)
    bits = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))
    bits[np.isnan(neg)] = np.uint32(0xFFFFFFFF)  # after +inf (= no similarity)
    keys = (bits.astype(np.uint64) << np.uint64(32)) | np.arange(sims.size, dtype=np.uint64)
    return (np.sort(keys) & np.uint64(0xFFFFFFFF)).astype(np.int64)


def shortlist_ranks(ids: np.ndarray, index_to_eval: np.ndarray) -> np.ndarray:
    """Shortlist-only rankings ``[M, Q]`` in ground-truth ids (-1 pads a shorter row); score
    with ``evaluate_revisited(..., shortlist_only=True)``."""
    return np.ascontiguousarray(shortlist_heads(ids, index_to_eval).T)


def evaluate_index(
    handle: IndexHandle, gnd_path: Path, queries_dir: Path, out: Path | None = None
) -> EvalReport:
    """Search every ground-truth query (cropped to its box), re-rank, and compute E/M/H mAP
    over full-database rankings (:class:`GlobalOrder`), with the paired bootstrap comparison
    of the re-ranked and global per-query APs."""
    gt = load_gnd(gnd_path)
    imlist = gt["imlist"]
    to_eval = index_to_imlist(handle.names, imlist, gnd_path)
    boxes = [g["bbx"] for g in gt["gnd"]]
    paths = _query_paths(queries_dir, gt["qimlist"])
    config = handle.config
    queries = extract_queries(build_extractor(config.extractor), paths, boxes)
    shortlist = first_stage(handle, queries, config.search.topk)

    order = GlobalOrder(queries.global_desc, handle.database.global_desc, to_eval, len(imlist))

    def evaluate(ids: np.ndarray) -> dict:
        return evaluate_revisited(order.place(ids, labelled(gt["gnd"])), gt["gnd"])

    before = evaluate(shortlist.ids)
    after = comparison = None
    result: RerankResult | None = None
    if config.search.rerank:
        result = rerank_chain(config.search.rerank, queries, shortlist, handle.database)
        after = evaluate(result.ids)
        comparison = {
            proto: dataclasses.asdict(
                paired_bootstrap(100 * before[proto]["aps"], 100 * after[proto]["aps"])
            )
            for proto in PROTOCOLS
        }
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
        ranking=FULL_RANKING,
        comparison=comparison,
    )
    if out is not None:
        write_report(report, out)
    return report


def write_report(report: EvalReport, out: Path) -> None:
    """``metrics.json`` (everything but the per-query rows), ``metrics.csv`` (one row per
    method: mAP, and on the re-ranked row its difference, interval and query counts) and
    ``per_query.jsonl`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = dataclasses.asdict(report)
    per = summary.pop("per_query")
    write_text(out / "metrics.json", json.dumps(summary, indent=2))
    rows = [{"method": "global", **{f"{p}_map": report.before[p]["map"] for p in PROTOCOLS}}]
    if report.after is not None:
        row = {"method": "+".join(report.rerank)}
        row.update({f"{p}_map": report.after[p]["map"] for p in PROTOCOLS})
        for proto in PROTOCOLS:
            c = report.comparison[proto]
            row.update({f"{proto}_{k}": c[k] for k in CSV_COMPARISON})
        rows.append(row)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[-1]), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "metrics.csv", table.getvalue())
    write_text(out / "per_query.jsonl", "".join(json.dumps(r) + "\n" for r in per))


def _nan_to_none(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def _summary(metrics: dict) -> dict:
    return {
        proto: {
            "map": float(metrics[proto]["map"]),
            "mp@k": [float(v) for v in metrics[proto]["mpk"]],
            "n_queries_without_positives": metrics[proto]["n_queries_without_positives"],
        }
        for proto in PROTOCOLS
    }


def format_metrics(report: EvalReport) -> str:
    """The mAP table printed by ``locore eval`` and ``locore demo``: mAP per protocol, then
    (with a chain) the re-ranked minus global difference with its paired bootstrap interval
    and the queries improved / unchanged / worsened."""
    lines = [
        f"{report.num_queries} queries, {report.num_db} database images, "
        f"shortlist {report.shortlist}; {report.ranking}; mAP (%)"
    ]
    rows = [("global", report.before)]
    if report.after is not None:
        rows.append(("re-ranked: " + "+".join(report.rerank), report.after))
    width = max(28, *(len(label) + 2 for label, _ in rows))
    lines.append(f"{'':<{width}}{'Easy':>8}{'Medium':>8}{'Hard':>8}")
    for label, metrics in rows:
        values = "".join(f"{metrics[p]['map']:8.2f}" for p in PROTOCOLS)
        lines.append(f"{label:<{width}}{values}")
    if report.comparison is not None:
        first = report.comparison[PROTOCOLS[0]]
        lines.append(
            f"re-ranked - global, per-query AP: mean difference [{100 * first['confidence']:g} % "
            f"paired bootstrap CI, {first['resamples']:,} resamples, seed {first['seed']}], "
            "queries better / same / worse"
        )
        for proto in PROTOCOLS:
            c = report.comparison[proto]
            lines.append(
                f"  {proto.capitalize():<8}{c['delta']:+7.2f} [{c['ci_low']:+.2f}, "
                f"{c['ci_high']:+.2f}]  {c['improved']} / {c['unchanged']} / {c['worsened']}"
            )
    excluded = {p: report.before[p]["n_queries_without_positives"] for p in PROTOCOLS}
    if any(excluded.values()):
        counts = ", ".join(f"{p} {n}" for p, n in excluded.items())
        lines.append(f"queries without positives, excluded from the means: {counts}")
    return "\n".join(lines)
