"""Retrieval metrics, our own implementation of the published protocols (reference-spec §7).

No PyPI package implements these protocols (junk removal, the revisitop P@k rule, the GLDv2
split), so none is used.

* Revisited Oxford/Paris (Radenović et al., CVPR 2018): trapezoidal AP with junk images deleted
  from the ranking, mP@k with the revisitop denominator rule, Easy/Medium/Hard built from
  easy/hard/junk. ``compute_map`` matches the official ``revisitop/python/evaluate.py`` number
  for number (golden test, 1e-9).
* GLDv2 retrieval (Weyand et al., CVPR 2020): mAP@100 with rectangular AP divided by
  ``min(m_q, 100)``, public / private / combined.
* Metric learning (SOP, In-Shop, CUB-200): Recall@K (= P@1 at K = 1), R-Precision and MAP@R as
  defined by Musgrave et al. ("A Metric Learning Reality Check", ECCV 2020).

One rule for queries without positives, in every metric: they are excluded from the mean, and
their number is returned (``n_queries_without_positives``) so nothing disappears silently.
Oracle tests: ``tests/test_metric_oracles.py`` (pytorch-metric-learning, torchmetrics, the
published GLDv2 definition).

Every ranking here uses the official layout ``ranks [n_ranked, n_query]``: column q holds the
database ids ranked for query q, best first (the transpose of the engine's ``[Q, M]`` ids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from locore.core.errors import UserError

KAPPAS = (1, 5, 10)
PROTOCOLS = ("easy", "medium", "hard")
# Which ids leave the shortlist before re-ranking, per setup (reference-spec §6.4).
RERANK_SETUPS = ("hard", "hard*")
GLDV2_PUBLIC = 379  # the first 379 of the 1,129 gldv2-test queries; the last 750 are private
GLDV2_DEPTH = 100
# The Recall@K ks every paper on these benchmarks reports.
RECALL_KS = {
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
    "cub200": (1, 2, 4, 8),
}


def _ids(values) -> np.ndarray:
    # gnd fields may be lists, tuples or numpy arrays: convert explicitly, never ``+`` them (P18).
    if values is None:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _union(*fields) -> np.ndarray:
    """Explicit concatenation of gnd id fields (``list + ndarray`` would add element-wise, P18)."""
    return np.concatenate([_ids(f) for f in fields])


# ----------------------------------------------------------------------------------------------
# Average precision from positions
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Placements:
    """Where a few database images sit in each query's ranking, without the ranking.

    An AP reads only the positions of its query's labelled images, so a 1M-long ranking never
    has to exist: :func:`locore.engine.evaluate.GlobalOrder.place` computes these positions
    from the shortlist alone, and :meth:`of` reads them off a dense ranking.

    Attributes:
        ids: per query, ground-truth ids ``[T_q]`` (int64), in ranking order.
        pos: per query, their 0-based positions ``[T_q]`` (int64, ascending).
        length: the ranking's length (``n_ranked``), for reports and the missing-positive check.
    """

    ids: list[np.ndarray]
    pos: list[np.ndarray]
    length: int

    @classmethod
    def of(cls, ranks: np.ndarray, wanted: Sequence[np.ndarray]) -> Placements:
        """Positions of ``wanted[q]`` in column q of a dense ranking ``[n_ranked, n_query]``
        (ids it does not hold are left out; -1 padding is never wanted)."""
        ranks = np.asarray(ranks)
        if ranks.ndim != 2 or ranks.shape[1] != len(wanted):
            raise UserError(
                f"ranks has shape {ranks.shape} for {len(wanted)} queries; pass [n_ranked, n_query]"
            )
        ids, pos = [], []
        for q, w in enumerate(wanted):
            column = np.ascontiguousarray(ranks[:, q])
            where = np.flatnonzero(np.isin(column, _ids(w)))
            ids.append(column[where].astype(np.int64))
            pos.append(where.astype(np.int64))
        return cls(ids, pos, int(ranks.shape[0]))

    def __len__(self) -> int:
        return len(self.ids)

    def of_query(self, q: int, wanted) -> np.ndarray:
        """Sorted positions of the ids ``wanted`` (a subset of those placed) for query q."""
        return self.pos[q][np.isin(self.ids[q], _ids(wanted))]


def labelled(gnd: Sequence[Mapping]) -> list[np.ndarray]:
    """Per query, every id a Revisited protocol looks at (easy, hard and junk)."""
    return [_union(g.get("easy"), g.get("hard"), g.get("junk")) for g in gnd]


def compute_ap(positions: np.ndarray, num_positives: int) -> float:
    """Trapezoidal AP (the revisitop rule) from sorted 0-based, junk-adjusted positions.

    ``AP = sum_j (P0_j + P1_j) / 2 / n`` with ``P0_j = j / r_j`` (1 at ``r_j = 0``) and
    ``P1_j = (j + 1) / (r_j + 1)``. Positives missing from a truncated ranking contribute
    nothing, so recall never reaches 1 for them.
    """
    r = np.asarray(positions, dtype=np.float64)
    j = np.arange(r.size, dtype=np.float64)
    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    p1 = (j + 1) / (r + 1)
    return float(((p0 + p1) / 2).sum() / num_positives)


def compute_rectangular_ap(positions: np.ndarray, num_positives: int) -> float:
    """Rectangular AP (GLDv2 / Kaggle): ``sum over positives of precision at its rank / n``."""
    r = np.asarray(positions, dtype=np.float64)
    hits = np.arange(1, r.size + 1, dtype=np.float64)
    return float((hits / (r + 1)).sum() / num_positives)


AP_RULES = {"trapezoidal": compute_ap, "rectangular": compute_rectangular_ap}


def _adjusted_positions(pos: np.ndarray, junk_pos: np.ndarray) -> np.ndarray:
    """Delete junk from the ranking: each positive moves up by the junk ranked strictly above."""
    return pos - np.searchsorted(np.sort(junk_pos), pos, side="left")


def _precision_at(pos: np.ndarray, kappas: Sequence[int]) -> np.ndarray:
    """Revisitop mP@k: ``kq = min(max 1-based position, k)``, ``P@k = |{pos <= kq}| / kq``.

    When the last retrieved positive is ranked above k the denominator shrinks to its position.
    With no retrieved positive (truncated ranking) P@k is 0, as in the AMES/LOCORE copies (the
    official code fails there).
    """
    out = np.zeros(len(kappas))
    if pos.size == 0:
        return out
    pos1 = pos + 1
    last = int(pos1.max())
    for i, k in enumerate(kappas):
        kq = min(last, int(k))
        out[i] = np.count_nonzero(pos1 <= kq) / kq
    return out


def _summarise(aps: np.ndarray, prs: np.ndarray) -> tuple[float, np.ndarray]:
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), np.full(prs.shape[1], np.nan)
    return float(aps[valid].mean()), prs[valid].mean(axis=0)


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping],
    kappas: Sequence[int] = KAPPAS,
    *,
    ap: str = "trapezoidal",
    max_positives: int | None = None,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean AP and mP@k over queries, exactly as the official revisitop ``compute_map``.

    Args:
        ranks: ``[n_ranked, n_query]``; column q = database ids ranked for query q.
        gnd: per query ``{"ok": ids, "junk": ids (optional)}``; lists or arrays.
        kappas: the k of mP@k.
        ap: ``"trapezoidal"`` (Revisited) or ``"rectangular"`` (GLDv2).
        max_positives: AP divides by ``n_res = min(len(ok), max_positives)`` (GLDv2: 100)
            instead of the official ``n_res = len(ok)``. It never depends on the ranking length:
            the AMES/LOCORE copies' ``min(len(ok), n_ranked)`` doubles the AP of a query with
            120 positives on a 50-deep ranking.

    Returns:
        ``(mAP, aps [n_query], mpr [len(kappas)], prs [n_query, len(kappas)])`` as fractions;
        queries whose ``ok`` is empty have NaN AP and P@k and are excluded from the means
        (``np.isnan(aps).sum()`` of them).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise UserError(
            f"ranks has shape {ranks.shape} for {len(gnd)} queries; pass [n_ranked, n_query]"
        )
    if ap not in AP_RULES:
        raise UserError(f"unknown AP rule {ap!r}; use one of {sorted(AP_RULES)}")
    ap_fn = AP_RULES[ap]
    n_query = ranks.shape[1]
    aps = np.full(n_query, np.nan)
    prs = np.full((n_query, len(kappas)), np.nan)
    for q in range(n_query):
        ok = _ids(gnd[q]["ok"])
        if ok.size == 0:
            continue
        column = np.ascontiguousarray(ranks[:, q])
        pos = np.flatnonzero(np.isin(column, ok))
        junk = np.flatnonzero(np.isin(column, _ids(gnd[q].get("junk"))))
        pos = _adjusted_positions(pos, junk)
        n_res = ok.size if max_positives is None else min(ok.size, max_positives)
        aps[q] = ap_fn(pos, n_res)
        prs[q] = _precision_at(pos, kappas)
    mean_ap, mpr = _summarise(aps, prs)
    return mean_ap, aps, mpr, prs


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """Scores ``[n_query, n_db]`` (higher = better) -> ranks ``[n_db, n_query]``.

    The sort is stable, so tied images keep database-id order on every machine (the official
    ``torch.sort`` is not stable, P20); NaN scores rank last.
    """
    scores = np.asarray(scores, dtype=np.float64)
    return np.argsort(-scores, axis=1, kind="stable").T


# ----------------------------------------------------------------------------------------------
# Revisited Oxford / Paris
# ----------------------------------------------------------------------------------------------
def revisited_protocols(gnd: Sequence[Mapping]) -> dict[str, list[dict]]:
    """Easy / Medium / Hard ground truth (``ok``/``junk`` arrays) from easy/hard/junk (§7.2).

    easy: ok = easy, junk = junk ∪ hard; medium: ok = easy ∪ hard, junk = junk;
    hard: ok = hard, junk = junk ∪ easy.
    """
    out: dict[str, list[dict]] = {name: [] for name in PROTOCOLS}
    for g in gnd:
        easy, hard, junk = g.get("easy"), g.get("hard"), g.get("junk")
        out["easy"].append({"ok": _ids(easy), "junk": _union(junk, hard)})
        out["medium"].append({"ok": _union(easy, hard), "junk": _ids(junk)})
        out["hard"].append({"ok": _ids(hard), "junk": _union(junk, easy)})
    return out


def rerank_junk(gnd: Sequence[Mapping], setup: str = "hard") -> list[set[int]]:
    """Per query, the database ids to move out of the shortlist before re-ranking (§6.4).

    The two Hard setups of the paper (supplementary, Table B) differ only here; both are then
    scored with the Hard protocol (ok = hard, junk = junk ∪ easy):

    * ``"hard"``: only ``junk`` leaves the shortlist; easy images take part in re-ranking and
      are ignored by the metric. This is the official normal run (``hard_split=False``), whose
      Medium and Hard numbers are the paper's main table (ROxf+1M SG + LOCORE: 86.5 / 76.3,
      supplementary Table B "Hard").
    * ``"hard*"``: ``junk ∪ easy`` leave the shortlist, i.e. the easy images are removed from
      the database before re-ranking. This is the official ``--with_hard`` run
      (``hard_split=True``), reported as "Hard*" in supplementary Tables B and C (73.7).

    Medium (and Easy) are always read from the ``"hard"`` setup. The result feeds
    ``locore.rerank.junk.partition_junk`` / ``Queries.junk``.
    """
    if setup not in RERANK_SETUPS:
        raise UserError(f"unknown Hard setup {setup!r}; use one of {RERANK_SETUPS}")
    out = []
    for g in gnd:
        ids = _union(g.get("junk"), g.get("easy")) if setup == "hard*" else _ids(g.get("junk"))
        out.append({int(i) for i in ids})
    return out


def evaluate_revisited(
    ranks: np.ndarray | Placements,
    gnd: Sequence[Mapping],
    kappas: Sequence[int] = KAPPAS,
    *,
    shortlist_only: bool = False,
) -> dict:
    """Easy / Medium / Hard results of one ranking.

    By default the ranking must reach every positive (a full-database ranking, the benchmark's
    definition) and a shorter one raises :class:`UserError`. ``shortlist_only=True`` evaluates
    a shortlist-length ranking as it is, which is what the official LOCORE/AMES evaluation
    silently does (P19): positives beyond the shortlist then count as never retrieved. The
    ranking length used is returned under ``"ranking"``.

    Args:
        ranks: ``[n_ranked, n_query]`` database ids, column q for query q; or the
            :class:`Placements` of each query's :func:`labelled` ids in such a ranking (what a
            1M-image evaluation passes, :meth:`locore.engine.evaluate.GlobalOrder.place`).
        gnd: per query ``{"easy", "hard", "junk"}`` id lists (the ``gnd`` of a gnd pickle).
        kappas: the k of mP@k.
        shortlist_only: accept a truncated ranking (see above).

    Returns:
        ``{"easy" | "medium" | "hard": {"map": %, "mpk": % [len(kappas)], "aps": [n_query]
        fractions (NaN = no positive under this protocol: excluded from the means),
        "prs": [n_query, len(kappas)] fractions, "kappas": list,
        "n_queries_without_positives": int}, "ranking": {"length": n_ranked,
        "shortlist_only": bool}}``.
    """
    # One pass over each (possibly 1M-long) column finds every id any protocol cares about;
    # the three protocols then work on those few positions only.
    placed = ranks if isinstance(ranks, Placements) else Placements.of(ranks, labelled(gnd))
    if len(placed) != len(gnd):
        raise UserError(f"rankings of {len(placed)} queries for {len(gnd)} gnd entries")
    protocols = revisited_protocols(gnd)
    n_query = len(gnd)
    aps = {name: np.full(n_query, np.nan) for name in PROTOCOLS}
    prs = {name: np.full((n_query, len(kappas)), np.nan) for name in PROTOCOLS}
    for q in range(n_query):
        where, found = placed.pos[q], placed.ids[q]
        missing = np.setdiff1d(protocols["medium"][q]["ok"], found)
        if missing.size and not shortlist_only:
            # a full-database evaluation needs every positive ranked (P19)
            raise UserError(
                f"query {q}: {missing.size} positive(s) (e.g. id {missing[0]}) are not in its "
                f"{placed.length}-long ranking; append the rest of the global ranking, or pass "
                "shortlist_only=True for the official shortlist-only number"
            )
        for name in PROTOCOLS:
            ok = protocols[name][q]["ok"]
            if ok.size == 0:
                continue
            pos = where[np.isin(found, ok)]
            junk = where[np.isin(found, protocols[name][q]["junk"])]
            pos = _adjusted_positions(pos, junk)
            aps[name][q] = compute_ap(pos, ok.size)
            prs[name][q] = _precision_at(pos, kappas)
    out: dict = {}
    for name in PROTOCOLS:
        mean_ap, mpr = _summarise(aps[name], prs[name])
        out[name] = {
            "map": 100 * mean_ap,
            "mpk": 100 * mpr,
            "aps": aps[name],
            "prs": prs[name],
            "kappas": [int(k) for k in kappas],
            "n_queries_without_positives": int(np.isnan(aps[name]).sum()),
        }
    out["ranking"] = {"length": placed.length, "shortlist_only": bool(shortlist_only)}
    return out


# ----------------------------------------------------------------------------------------------
# GLDv2 retrieval
# ----------------------------------------------------------------------------------------------
def gldv2_map_at_100(
    ranks: np.ndarray,
    gnd: Sequence[Mapping],
    n_public: int = GLDV2_PUBLIC,
    depth: int = GLDV2_DEPTH,
    *,
    shallow_ok: bool = False,
) -> dict:
    """GLDv2 retrieval mAP@100 (Weyand et al., CVPR 2020; the Google Landmarks 2019/2020 metric).

    ``AP@100 = sum_{k <= 100} P(k) rel(k) / min(m_q, 100)`` with ``m_q`` the query's positives,
    whatever the ranking depth; no junk. Queries without positives (the official "Ignored" ones)
    are excluded and counted. Public = the first ``n_public`` queries (379 of gldv2-test's
    1,129), private = the rest (the official last 750), combined = all. The public number
    selects (alpha, tau) in the official procedure.

    A ranking shorter than ``depth`` is a different benchmark: positives it cannot hold count as
    missed. It is accepted when it already holds every positive of every query (a deeper one
    cannot score differently, e.g. a full ranking of a small database) or with ``shallow_ok``;
    the depth used is returned so reports can state it.

    Returns:
        ``{"public": %, "private": %, "combined": %, "aps": [n_query] fractions (NaN =
        excluded), "depth": ranks scored, "n_queries_without_positives": int}`` (a split
        without queries is NaN).
    """
    ranks = np.asarray(ranks)[:depth]
    if not 0 <= n_public <= len(gnd):
        raise UserError(f"n_public={n_public} but only {len(gnd)} GLDv2 queries were given")
    ok_only = [{"ok": g["ok"]} for g in gnd]
    _, aps, _, _ = compute_map(ranks, ok_only, ap="rectangular", max_positives=depth)
    if ranks.shape[0] < depth and not shallow_ok:
        for q, g in enumerate(ok_only):
            if not np.isin(_ids(g["ok"]), ranks[:, q]).all():
                raise UserError(
                    f"GLDv2 mAP@{depth} needs {depth}-deep rankings; query {q}'s is "
                    f"{ranks.shape[0]} deep and misses some positives: rank deeper, or pass "
                    "shallow_ok=True and report the depth"
                )

    def mean(values: np.ndarray) -> float:
        values = values[~np.isnan(values)]
        return 100 * float(values.mean()) if values.size else float("nan")

    return {
        "public": mean(aps[:n_public]),
        "private": mean(aps[n_public:]),
        "combined": mean(aps),
        "aps": aps,
        "depth": int(ranks.shape[0]),
        "n_queries_without_positives": int(np.isnan(aps).sum()),
    }


# ----------------------------------------------------------------------------------------------
# Metric learning: Recall@K, R-Precision and MAP@R (Musgrave et al., ECCV 2020)
# ----------------------------------------------------------------------------------------------
def _relevance(
    ranks: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    exclude_self: bool,
    chunk: int = 2048,
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Yield ``(query slice, relevant [n_ranked, chunk], kept [n_ranked, chunk])`` blocks.

    With ``exclude_self`` query q is database item q: that entry is moved to the end of its
    column and marked not kept, so every other image moves up one place. Blocks bound memory
    (SOP: 60k queries).
    """
    n_ranked, n_query = ranks.shape
    for start in range(0, n_query, chunk):
        cols = slice(start, min(start + chunk, n_query))
        block = ranks[:, cols]
        relevant = db_labels[block] == query_labels[cols][None, :]
        kept = np.ones_like(relevant)
        if exclude_self:
            is_self = block == np.arange(cols.start, cols.stop)[None, :]
            order = np.argsort(is_self, axis=0, kind="stable")
            relevant = np.take_along_axis(relevant & ~is_self, order, 0)
            kept = np.take_along_axis(~is_self, order, 0)
        yield cols, relevant, kept


def _check_labels(ranks, query_labels, db_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ranks = np.asarray(ranks)
    query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
    if ranks.ndim != 2 or ranks.shape[1] != query_labels.size:
        raise UserError(
            f"ranks has shape {ranks.shape} for {query_labels.size} queries; "
            "pass [n_ranked, n_query]"
        )
    if ranks.size and (ranks.min() < 0 or ranks.max() >= db_labels.size):
        raise UserError(f"ranks hold ids outside the {db_labels.size}-image database")
    return ranks, query_labels, db_labels


def num_relevant(
    query_labels: np.ndarray, db_labels: np.ndarray, exclude_self: bool = False
) -> np.ndarray:
    """``R [n_query]``: database images sharing the query's label, the query itself not counted.

    ``R = 0`` marks a query without positives (a singleton class in SOP/CUB, a class absent from
    the In-Shop gallery): every metric below excludes it from its mean.
    """
    classes, counts = np.unique(np.asarray(db_labels), return_counts=True)
    lookup = dict(zip(classes.tolist(), counts.tolist()))
    r = np.array([lookup.get(label, 0) for label in np.asarray(query_labels).tolist()])
    return r.astype(np.int64) - int(exclude_self)


def recall_at_k(
    ranks: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    ks: Sequence[int],
    exclude_self: bool = False,
) -> np.ndarray:
    """Recall@K: the fraction of queries with a same-label image among their first K.

    Recall@1 is Musgrave et al.'s P@1. Queries without positives (``num_relevant == 0``) are
    excluded, as pytorch-metric-learning and torchmetrics (``empty_target_action="skip"``) do.

    Args:
        ranks: ``[n_ranked, n_query]`` database ids.
        query_labels: ``[n_query]`` class labels; db_labels: ``[n_db]``.
        ks: the K values; every ranking must hold at least ``max(ks)`` images besides the
            query itself.
        exclude_self: query q is database item q (SOP, CUB-200): it is skipped in its ranking.

    Returns:
        ``[len(ks)]`` fractions over the queries with positives (NaN if there is none).
    """
    ranks, query_labels, db_labels = _check_labels(ranks, query_labels, db_labels)
    has_positive = num_relevant(query_labels, db_labels, exclude_self) > 0
    hits = np.zeros(len(ks))
    for cols, relevant, kept in _relevance(ranks, query_labels, db_labels, exclude_self):
        shortest = int(kept.sum(axis=0).min()) if kept.size else 0
        if shortest < max(ks):
            raise UserError(
                f"Recall@{max(ks)} needs {max(ks)} ranked images per query besides the query; "
                f"some rankings hold {shortest}: rank deeper"
            )
        first_hit = np.where(relevant.any(axis=0), relevant.argmax(axis=0), np.iinfo(np.int64).max)
        first_hit = first_hit[has_positive[cols]]
        for i, k in enumerate(ks):
            hits[i] += np.count_nonzero(first_hit < k)
    n_valid = int(has_positive.sum())
    return hits / n_valid if n_valid else np.full(len(ks), np.nan)


def at_r(
    ranks: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query AP@R and R-Precision of Musgrave et al. ("A Metric Learning Reality Check").

    For a query with R relevant database images (the query itself not counted), over its first
    R results: ``AP@R = (1/R) * sum_{i<=R} P(i) * rel(i)`` and ``R-Precision = (1/R) *
    sum_{i<=R} rel(i)``. The official LOCORE helper differs (P25): it counts the query in R
    during self-retrieval and averages precision over all first R positions.

    Returns:
        ``(ap [n_query], r_precision [n_query])`` fractions; NaN where R = 0 (excluded).

    Raises:
        UserError: a ranking holds fewer than R images besides the query.
    """
    ranks, query_labels, db_labels = _check_labels(ranks, query_labels, db_labels)
    r = num_relevant(query_labels, db_labels, exclude_self)
    aps = np.full(query_labels.size, np.nan)
    rps = np.full(query_labels.size, np.nan)
    for cols, relevant, kept in _relevance(ranks, query_labels, db_labels, exclude_self):
        r_block = r[cols]
        short = kept.sum(axis=0) < r_block
        if short.any():
            q = cols.start + int(np.flatnonzero(short)[0])
            raise UserError(
                f"MAP@R: query {q} has R={r[q]} relevant images but its ranking holds fewer; "
                "rank at least max R images per query"
            )
        depth = int(r_block.max()) if r_block.size else 0
        within = np.arange(depth)[:, None] < r_block[None, :]
        rel = relevant[:depth] & within
        found = np.cumsum(rel, axis=0)
        precision = found / np.arange(1, depth + 1)[:, None]
        valid = r_block > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            aps[cols] = np.where(valid, (precision * rel).sum(axis=0) / r_block, np.nan)
            rps[cols] = np.where(valid, rel.sum(axis=0) / r_block, np.nan)
    return aps, rps


def _nanmean(values: np.ndarray) -> float:
    valid = ~np.isnan(values)
    return float(values[valid].mean()) if valid.any() else float("nan")


def map_at_r(
    ranks: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    exclude_self: bool = False,
) -> tuple[float, np.ndarray]:
    """The standard MAP@R (see :func:`at_r`): ``(MAP@R, ap [n_query])`` fractions, R = 0
    queries NaN and excluded."""
    aps, _ = at_r(ranks, query_labels, db_labels, exclude_self)
    return _nanmean(aps), aps


def evaluate_metric_learning(
    ranks: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    ks: Sequence[int],
    exclude_self: bool = False,
) -> dict[str, float]:
    """``{"recall@k": %, ..., "r_precision": %, "map@r": %, "n_queries_without_positives":
    count}`` for SOP / In-Shop / CUB-200 (ks: ``RECALL_KS``); the percentages are over the
    queries with positives."""
    recalls = recall_at_k(ranks, query_labels, db_labels, ks, exclude_self)
    out = {f"recall@{k}": 100 * float(v) for k, v in zip(ks, recalls)}
    aps, rps = at_r(ranks, query_labels, db_labels, exclude_self)
    out["r_precision"] = 100 * _nanmean(rps)
    out["map@r"] = 100 * _nanmean(aps)
    out["n_queries_without_positives"] = int(np.isnan(aps).sum())
    return out


# ----------------------------------------------------------------------------------------------
# Is a difference real? Paired bootstrap over queries
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Comparison:
    """Method B against method A on the same queries, from their per-query APs.

    Attributes:
        mean_a, mean_b: mean AP of each over the paired queries (the units given, e.g. %).
        delta: ``mean_b - mean_a``.
        ci_low, ci_high: paired bootstrap confidence interval of ``delta``.
        confidence: e.g. 0.95.
        improved, unchanged, worsened: queries whose AP rose, stayed within ``tol``, fell.
        n_queries: queries paired (both APs defined); excluded: the others (no positive).
        resamples, seed: the bootstrap settings, so the interval can be reproduced.
    """

    mean_a: float
    mean_b: float
    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    improved: int
    unchanged: int
    worsened: int
    n_queries: int
    excluded: int
    resamples: int
    seed: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0

    def summary(self) -> str:
        """e.g. ``+1.23 [+0.40, +2.10] 30 better 35 same 5 worse``."""
        return (
            f"{self.delta:+.2f} [{self.ci_low:+.2f}, {self.ci_high:+.2f}] "
            f"{self.improved} better {self.unchanged} same {self.worsened} worse"
        )


def paired_bootstrap(
    ap_a: np.ndarray,
    ap_b: np.ndarray,
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    tol: float = 1e-9,
    block: int = 1_000,
) -> Comparison:
    """Paired bootstrap of the mean per-query AP difference ``b - a`` (see docs/REPRODUCE.md).

    Queries are resampled with replacement ``resamples`` times (the same draw for both methods,
    so what varies is which queries are asked, not their pairing); the interval is the
    percentile interval of the resampled mean differences. Seeded: the same APs always give the
    same interval. Vectorised in blocks of ``block`` resamples ([block, n_query] counts).

    Args:
        ap_a, ap_b: ``[n_query]`` per-query APs of the two methods, any one unit (fractions or
            %); NaN (no positive) must coincide and is excluded.
        tol: ``|b - a| <= tol`` counts as unchanged (APs of identical positive positions are
            bit-identical; the default suits fractions and %).
    """
    a, b = np.asarray(ap_a, dtype=np.float64), np.asarray(ap_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise UserError(f"per-query APs of shapes {a.shape} and {b.shape} cannot be paired")
    valid = ~(np.isnan(a) | np.isnan(b))
    if (np.isnan(a) != np.isnan(b)).any():
        raise UserError("the two methods exclude different queries; compare on the same gnd")
    diff = b[valid] - a[valid]
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        counts = rng.multinomial(n, np.full(n, 1 / n), size=size) if n else np.zeros((size, 0))
        means[start : start + size] = counts @ diff / max(n, 1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha]) if n else (np.nan, np.nan)
    return Comparison(
        mean_a=float(a[valid].mean()) if n else float("nan"),
        mean_b=float(b[valid].mean()) if n else float("nan"),
        delta=float(diff.mean()) if n else float("nan"),
        ci_low=float(low),
        ci_high=float(high),
        confidence=confidence,
        improved=int((diff > tol).sum()),
        unchanged=int((np.abs(diff) <= tol).sum()),
        worsened=int((diff < -tol).sum()),
        n_queries=n,
        excluded=int((~valid).sum()),
        resamples=resamples,
        seed=seed,
    )
