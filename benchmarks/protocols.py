"""Evaluation protocols of ``locore bench revisitop``: how each benchmark family is scored and
reported, so the recipe itself never branches on the dataset.

Revisited (ROxf/RPar, reference-spec §6.4, supplementary Table B): every chain runs twice. With
the ``hard`` setup, junk images move out of each shortlist before re-ranking; Medium and Hard are
read from that run, so easy images take part in re-ranking and are only ignored by the metric
(Hard). With the ``hard*`` setup, easy images are removed from the shortlist before re-ranking
as well (Hard*, the easy images removed from the database; ``locore.engine.metrics.rerank_junk``).
Without re-ranking the two are equal by construction (the Hard protocol ignores easy images).

GLDv2 (reference-spec §7.3): mAP@100 of the public (first 379), private (last 750) and combined
queries. The ground truth has only ``ok`` (no junk, no Easy/Hard), so the two setups would
re-rank the same shortlists: one run (the ``hard`` key, which moves nothing here) serves all
three numbers.

Rankings (docs/REPRODUCE.md, "The +1M ranking rule"): the shortlist, then every other image by
its exact global similarity (``GlobalOrder``), so no number depends on where an image sits
in a file; or, with ``--eval-shortlist-only``, the shortlist alone as the official code does.
Every re-ranked row is compared with the global one query by query (paired bootstrap).
"""

from __future__ import annotations

import abc

import numpy as np

from locore.benchmarks.collection import Collection
from locore.benchmarks.settings import DEFAULT_DEPTH, Settings
from locore.engine.evaluate import CSV_COMPARISON, shortlist_ranks
from locore.engine.metrics import (
    GLDV2_DEPTH,
    RERANK_SETUPS,
    Comparison,
    Placements,
    evaluate_revisited,
    gldv2_map_at_100,
    labelled,
    paired_bootstrap,
)

# How the evaluated rankings are built, named in every report.
FULL_RULE = "ranked past the shortlist by exact global similarity"
SHORTLIST_RULE = "the official rule: positives past it count as missed"


def full_ranks(settings: Settings, data: Collection, ids: np.ndarray) -> np.ndarray:
    """``[n_ranked, Q]`` ground-truth-id ranking (official shape) of database rows ``[Q, M]``:
    the whole database, every image past the shortlist by its exact global similarity to the
    query; with ``eval_shortlist_only`` the shortlist alone (-1 pads a shorter row)."""
    if settings.eval_shortlist_only:
        return shortlist_ranks(ids, data.row_to_eval)
    return data.global_order.ranks(ids)


def ranking_rule(settings: Settings, data: Collection) -> str:
    """What the mAP is computed over, for the table header and metrics.json."""
    if settings.eval_shortlist_only:
        return f"shortlist of {data.shortlist.ids.shape[1]} ({SHORTLIST_RULE})"
    return f"full database ({data.num_official:,} images), {FULL_RULE}"


def compare(before: np.ndarray, after: np.ndarray) -> Comparison:
    """Per-query APs (fractions, NaN = excluded) of a re-ranked row against the global row, in
    mAP points."""
    return paired_bootstrap(100 * np.asarray(before), 100 * np.asarray(after))


def comparison_columns(compared: dict[str, Comparison]) -> dict:
    """results.csv columns ``<protocol>_<field>`` of a row's comparisons with the global row."""
    return {
        f"{proto}_{field}": round(v, 4) if isinstance(v := getattr(c, field), float) else v
        for proto, c in compared.items()
        for field in CSV_COMPARISON
    }


def nan_none(v: float) -> float | None:
    """A metric for JSON: NaN (no positives) as null, else rounded to 6 decimals."""
    return None if np.isnan(v) else round(float(v), 6)


class Evaluation(abc.ABC):
    """How one benchmark family is scored and reported; the pipeline only calls these.

    ``setups`` are the re-rank runs of every chain (keys of ``benchmarks.revisitop.rerank_runs``);
    the first is the one whose ranking the per-query report, scatter plot and grids show.
    ``by_setup`` / ``final`` map each setup to what :meth:`evaluate` returned for it.
    """

    setups: tuple[str, ...]

    def file_depth(self, settings: Settings) -> int | None:
        """Columns kept of a shortlist file (``--shortlist-file``, ``nn_*.pkl``): ``--depth``
        (default 1,600). An official file may rank the whole database (~1M columns at +1M); the
        reader stops at this depth, and images past it are ranked by exact global similarity
        (:class:`~locore.engine.evaluate.GlobalOrder`), so keeping more changes nothing."""
        return settings.depth or DEFAULT_DEPTH

    def ranks(self, settings: Settings, data: Collection, ids: np.ndarray) -> np.ndarray:
        """``[n_ranked, Q]`` ground-truth-id ranking of database-row ids ``[Q, M]``."""
        return full_ranks(settings, data, ids)

    @abc.abstractmethod
    def wanted(self, data: Collection) -> list[np.ndarray]:
        """Per query, the ground-truth ids the metric looks at."""

    def placed(self, settings: Settings, data: Collection, ids: np.ndarray) -> Placements:
        """Where :meth:`wanted` sit in the ranking of database-row ids ``[Q, M]``."""
        return Placements.of(self.ranks(settings, data, ids), self.wanted(data))

    @abc.abstractmethod
    def evaluate(self, settings: Settings, data: Collection, ids: np.ndarray) -> dict:
        """Metrics of one ranking (database rows ``[Q, M]``)."""

    @abc.abstractmethod
    def row(self, label: str, by_setup: dict[str, dict]) -> dict:
        """One row of results.csv / metrics.json."""

    @abc.abstractmethod
    def compare(
        self, data: Collection, before: dict, by_setup: dict[str, dict]
    ) -> dict[str, Comparison]:
        """Per table column (``medium``, ``hard``, ...), the paired bootstrap of a re-ranked
        row's per-query APs against the global row's."""

    @abc.abstractmethod
    def table(self, settings: Settings, data: Collection, rows: list[dict], ranking: str) -> str:
        """The printed table; ``ranking`` says what was ranked (full database or shortlist)."""

    @abc.abstractmethod
    def query_aps(self, data: Collection, q: int, before: dict, final: dict[str, dict]) -> dict:
        """Query q's AP fields of per_query.jsonl."""

    @abc.abstractmethod
    def scatter(self, before: dict, final: dict[str, dict]) -> tuple[dict, dict]:
        """Per-query APs by scatter panel, before and after re-ranking."""

    # scatter panel -> the key of :meth:`compare` whose APs it plots
    panel_columns: dict[str, str]

    @abc.abstractmethod
    def panel_positives(self, g: dict) -> dict[str, list[int]]:
        """Per scatter panel, the ids whose count in the re-ranked part colours a query."""

    @abc.abstractmethod
    def caption(self, metrics: dict, q: int) -> str:
        """Query q's AP on a grid row, e.g. ``AP(M) 50.0``."""


class RevisitedEvaluation(Evaluation):
    """Easy/Medium/Hard mAP (%), Medium and Hard from the ``hard`` run, Hard* from ``hard*``."""

    setups = RERANK_SETUPS
    panel_columns = {"Medium": "medium", "Hard": "hard", "Hard*": "hard*"}

    def wanted(self, data: Collection) -> list[np.ndarray]:
        return labelled(data.gnd["gnd"])

    def placed(self, settings: Settings, data: Collection, ids: np.ndarray) -> Placements:
        """A full-database ranking is never built: positions come from the shortlist and the
        collection's :class:`~locore.engine.evaluate.GlobalOrder` (issue #16: 1M images)."""
        if settings.eval_shortlist_only:
            return super().placed(settings, data, ids)
        return data.global_order.place(ids, self.wanted(data))

    def evaluate(self, settings: Settings, data: Collection, ids: np.ndarray) -> dict:
        return evaluate_revisited(
            self.placed(settings, data, ids),
            data.gnd["gnd"],
            shortlist_only=settings.eval_shortlist_only,
        )

    def row(self, label: str, by_setup: dict[str, dict]) -> dict:
        row = {"method": label}
        normal, star = by_setup["hard"], by_setup["hard*"]
        for proto, metrics in (("medium", normal), ("hard", normal), ("hard*", star)):
            key = "hard" if proto == "hard*" else proto
            row[f"{proto}_map"] = round(float(metrics[key]["map"]), 3)
            for k, v in zip(metrics[key]["kappas"], metrics[key]["mpk"]):
                row[f"{proto}_mp@{k}"] = round(float(v), 3)
        return row

    def compare(
        self, data: Collection, before: dict, by_setup: dict[str, dict]
    ) -> dict[str, Comparison]:
        normal, star = by_setup["hard"], by_setup["hard*"]
        return {
            "medium": compare(before["medium"]["aps"], normal["medium"]["aps"]),
            "hard": compare(before["hard"]["aps"], normal["hard"]["aps"]),
            "hard*": compare(before["hard"]["aps"], star["hard"]["aps"]),
        }

    def table(self, settings: Settings, data: Collection, rows: list[dict], ranking: str) -> str:
        lines = [
            f"{settings.name}: {len(data.gnd['qimlist'])} queries, mAP (%) over the {ranking}",
            f"{'method':<36}{'Medium':>9}{'Hard':>9}{'Hard*':>9}",
        ]
        for row in rows:
            lines.append(
                f"{row['method']:<36}{row['medium_map']:9.2f}{row['hard_map']:9.2f}"
                f"{row['hard*_map']:9.2f}"
            )
        lines.append(
            "Hard: easy images re-ranked, ignored by the metric; Hard*: easy images removed from "
            "the shortlist before re-ranking (equal without re-ranking)."
        )
        return "\n".join(lines)

    def query_aps(self, data: Collection, q: int, before: dict, final: dict[str, dict]) -> dict:
        normal, star = final["hard"], final["hard*"]
        return {
            "ap_medium_before": nan_none(before["medium"]["aps"][q]),
            "ap_medium_after": nan_none(normal["medium"]["aps"][q]),
            "ap_hard_before": nan_none(before["hard"]["aps"][q]),
            "ap_hard_after": nan_none(normal["hard"]["aps"][q]),
            "ap_hard*_after": nan_none(star["hard"]["aps"][q]),
        }

    def scatter(self, before: dict, final: dict[str, dict]) -> tuple[dict, dict]:
        normal, star = final["hard"], final["hard*"]
        return (
            {
                "Medium": before["medium"]["aps"],
                "Hard": before["hard"]["aps"],
                "Hard*": before["hard"]["aps"],
            },
            {
                "Medium": normal["medium"]["aps"],
                "Hard": normal["hard"]["aps"],
                "Hard*": star["hard"]["aps"],
            },
        )

    def panel_positives(self, g: dict) -> dict[str, list[int]]:
        hard = list(g.get("hard", []))
        return {"Medium": [*g.get("easy", []), *hard], "Hard": hard, "Hard*": hard}

    def caption(self, metrics: dict, q: int) -> str:
        return f"AP(M) {100 * metrics['medium']['aps'][q]:.1f}"


class Gldv2Evaluation(Evaluation):
    """GLDv2 mAP@100 (%) of the public, private and combined queries, from one re-rank run."""

    setups = RERANK_SETUPS[:1]  # no junk and no easy images: "hard" moves nothing out
    splits = ("public", "private", "combined")
    panel_columns = {"AP@100": "combined"}

    def ranks(self, settings: Settings, data: Collection, ids: np.ndarray) -> np.ndarray:
        """Only the first 100 ranks count: a ranking that fills them is used as it is (ranking
        the rest of the 762k-image index for 1,129 queries would take ~7 GB); deeper rows
        only locate positives for the per-query report."""
        depth = min(GLDV2_DEPTH, data.num_official)
        if ids.shape[1] >= depth and (ids[:, :depth] >= 0).all():
            return shortlist_ranks(ids, data.row_to_eval)
        return full_ranks(settings, data, ids)

    def wanted(self, data: Collection) -> list[np.ndarray]:
        return [np.asarray(g["ok"], dtype=np.int64) for g in data.gnd["gnd"]]

    def evaluate(self, settings: Settings, data: Collection, ids: np.ndarray) -> dict:
        """mAP@100; a shortlist-only ranking shorter than 100 is scored as it is (its depth is
        in the row and the table)."""
        ranks = self.ranks(settings, data, ids)
        return gldv2_map_at_100(
            ranks,
            data.gnd["gnd"],
            n_public=data.gnd["n_public"],
            shallow_ok=settings.eval_shortlist_only,
        )

    def row(self, label: str, by_setup: dict[str, dict]) -> dict:
        (metrics,) = by_setup.values()
        return {
            "method": label,
            **{f"{k}_map@100": round(metrics[k], 3) for k in self.splits},
            "depth": metrics["depth"],
        }

    def compare(
        self, data: Collection, before: dict, by_setup: dict[str, dict]
    ) -> dict[str, Comparison]:
        (after,) = by_setup.values()
        n_public = data.gnd["n_public"]
        parts = {
            "public": slice(0, n_public),
            "private": slice(n_public, None),
            "combined": slice(None),
        }
        return {k: compare(before["aps"][part], after["aps"][part]) for k, part in parts.items()}

    def table(self, settings: Settings, data: Collection, rows: list[dict], ranking: str) -> str:
        n, n_public = len(data.gnd["qimlist"]), data.gnd["n_public"]
        depth = rows[0]["depth"]
        shallow = depth < min(GLDV2_DEPTH, data.num_official)
        cut = f"; ranks 1-{depth} only, positives past them missed" if shallow else ""
        lines = [
            f"{settings.name}: {n} queries ({n_public} public, {n - n_public} private), "
            f"mAP@100 (%) over the {ranking}{cut}",
            f"{'method':<36}{'Public':>9}{'Private':>9}{'Combined':>10}",
        ]
        for row in rows:
            lines.append(
                f"{row['method']:<36}{row['public_map@100']:9.2f}{row['private_map@100']:9.2f}"
                f"{row['combined_map@100']:10.2f}"
            )
        lines.append(
            "Public: the first queries (selects alpha, tau); nan: a split without queries."
        )
        return "\n".join(lines)

    def query_aps(self, data: Collection, q: int, before: dict, final: dict[str, dict]) -> dict:
        (after,) = final.values()
        return {
            "split": "public" if q < data.gnd["n_public"] else "private",
            "ap@100_before": nan_none(before["aps"][q]),
            "ap@100_after": nan_none(after["aps"][q]),
        }

    def scatter(self, before: dict, final: dict[str, dict]) -> tuple[dict, dict]:
        (after,) = final.values()
        return {"AP@100": before["aps"]}, {"AP@100": after["aps"]}

    def panel_positives(self, g: dict) -> dict[str, list[int]]:
        return {"AP@100": list(g["ok"])}

    def caption(self, metrics: dict, q: int) -> str:
        return f"AP@100 {100 * metrics['aps'][q]:.1f}"


EVALUATIONS: dict[str, Evaluation] = {
    "revisited": RevisitedEvaluation(),
    "gldv2": Gldv2Evaluation(),
}


def evaluation_of(settings: Settings) -> Evaluation:
    """The protocol that evaluates and reports this benchmark."""
    return EVALUATIONS[settings.metric]
