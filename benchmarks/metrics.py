"""Retrieval metrics, our own implementation of the published protocols.

Revisited Oxford/Paris (Radenović et al., CVPR 2018; reference-spec §7): trapezoidal AP with junk
images deleted from the ranking, queries without positives excluded from the means, mP@k with
the revisitop denominator rule, and the Easy/Medium/Hard protocols built from easy/hard/junk.
No PyPI package removes junk, so none is used. Results match the official ``compute_map``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KAPPAS = (1, 5, 10)


def _ids(values) -> np.ndarray:
    # Explicit array conversion: gnd fields may be lists or numpy arrays (reference-spec P18).
    return np.asarray(list(values) if values is not None else [], dtype=np.int64)


def compute_ap(positions: np.ndarray, num_positives: int) -> float:
    """Trapezoidal AP from the sorted 0-based (junk-adjusted) positions of retrieved positives.

    Positives missing from a truncated ranking contribute nothing (recall never reaches 1).
    """
    ap = 0.0
    for j, rank in enumerate(positions):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / 2 / num_positives
    return ap


def compute_map(
    ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = KAPPAS
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean AP and mP@k over queries.

    Args:
        ranks: ``[n_ranked, n_query]``; column q = database ids ranked for query q.
        gnd: per query ``{"ok": ids, "junk": ids (optional)}``.
        kappas: the k of mP@k.

    Returns:
        ``(map, aps [n_query] (NaN = excluded), mpr [len(kappas)], prs [n_query, len(kappas)])``;
        fractions, not percent.
    """
    n_query = ranks.shape[1]
    aps = np.full(n_query, np.nan)
    prs = np.full((n_query, len(kappas)), np.nan)
    for q in range(n_query):
        ok = _ids(gnd[q]["ok"])
        if ok.size == 0:
            continue
        column = ranks[:, q]
        pos = np.flatnonzero(np.isin(column, ok))
        junk = np.flatnonzero(np.isin(column, _ids(gnd[q].get("junk"))))
        # each positive moves up by the number of junk images ranked before it
        pos = pos - np.searchsorted(junk, pos)
        aps[q] = compute_ap(pos, ok.size)
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            if pos1.size == 0:
                prs[q, j] = 0.0
                continue
            kq = min(int(pos1.max()), k)
            prs[q, j] = (pos1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def revisited_protocols(gnd: Sequence[dict]) -> dict[str, list[dict]]:
    """Easy / Medium / Hard ground truth (``ok``/``junk``) from easy/hard/junk (spec §7.2).

    easy: ok = easy, junk = junk ∪ hard; medium: ok = easy ∪ hard, junk = junk;
    hard: ok = hard, junk = junk ∪ easy.
    """
    out: dict[str, list[dict]] = {"easy": [], "medium": [], "hard": []}
    for g in gnd:
        easy, hard, junk = _ids(g.get("easy")), _ids(g.get("hard")), _ids(g.get("junk"))
        out["easy"].append({"ok": easy, "junk": np.concatenate([junk, hard])})
        out["medium"].append({"ok": np.concatenate([easy, hard]), "junk": junk})
        out["hard"].append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def evaluate_revisited(
    ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = KAPPAS
) -> dict[str, dict]:
    """E/M/H results: per protocol ``{"map": %, "aps": [n_query] (fractions, NaN excluded),
    "mpk": [len(kappas)] %, "kappas": kappas}``.

    ``ranks`` should cover the whole database (the engine appends the rest of the global ranking
    after a shortlist); a shortlist-only ranking gives the official code's truncated number.
    """
    out = {}
    for name, proto in revisited_protocols(gnd).items():
        mean_ap, aps, mpr, _ = compute_map(ranks, proto, kappas)
        out[name] = {"map": 100 * mean_ap, "aps": aps, "mpk": 100 * mpr, "kappas": list(kappas)}
    return out
