"""Our metrics against implementations nobody here wrote (issue #20).

* MAP@R, R-Precision and P@1 (= Recall@1) against pytorch-metric-learning's
  ``AccuracyCalculator``; Recall@K and R-Precision against torchmetrics; same-set (SOP/CUB: the
  query is skipped) and query/gallery (In-Shop) splits, with singleton classes, classes absent
  from the gallery and tied similarities.
* GLDv2 mAP@100 against a reference written here from the published definition.

Both oracles see our ranking (ties broken by database id, ``ranks_from_scores``) so that the
metric is compared, not each library's tie-breaking; the query is removed from its ranking by
pytorch-metric-learning's own code. pytorch-metric-learning computes in float64: agreement to
1e-9. torchmetrics returns float32 per query (R-Precision ``relevant.float() / R``): agreement
to rtol 1e-6, the float32 bound (2**-23 ~ 1.2e-7 per value, means of a few hundred values).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import return_results
from torchmetrics.retrieval import RetrievalHitRate, RetrievalRPrecision

from locore.engine.metrics import evaluate_metric_learning, gldv2_map_at_100, ranks_from_scores

F64 = {"rel": 1e-9, "abs": 1e-9}
F32 = {"rel": 1e-6, "abs": 1e-7}


# ----------------------------------------------------------------------------------------------
# Seeded cases
# ----------------------------------------------------------------------------------------------
def _labels(rng: np.random.Generator, n: int, n_classes: int, singletons: int) -> np.ndarray:
    """``n`` labels over ``n_classes`` shared classes plus ``singletons`` one-image classes."""
    shared = rng.integers(0, n_classes, n - singletons)
    labels = np.concatenate([shared, n_classes + np.arange(singletons)])
    return rng.permutation(labels)


def _embed(rng: np.random.Generator, labels: np.ndarray, ties: bool) -> np.ndarray:
    """Class centre + noise; with ``ties`` small integer vectors, whose exact integer dot
    products tie often (with the query itself too: duplicates exist)."""
    if ties:
        return rng.integers(-1, 2, (labels.size, 3)).astype(np.float64)
    centres = rng.normal(size=(int(labels.max()) + 1, 8))
    return centres[labels] + 1.5 * rng.normal(size=(labels.size, 8))


def same_set(seed: int, ties: bool = False):
    """SOP/CUB style: 600 images are queries and database; 10 singleton classes."""
    rng = np.random.default_rng(seed)
    labels = _labels(rng, 600, 40, 10)
    x = _embed(rng, labels, ties)
    return x, labels, x, labels, True


def query_gallery(seed: int, ties: bool = False):
    """In-Shop style: 300 queries, 500 gallery images; 30 queries of classes the gallery lacks."""
    rng = np.random.default_rng(seed)
    gallery_labels = _labels(rng, 500, 50, 5)
    query_labels = np.concatenate([rng.choice(gallery_labels, 270), 1000 + np.arange(30)])
    x = _embed(rng, np.concatenate([query_labels, gallery_labels]), ties)
    return x[:300], query_labels, x[300:], gallery_labels, False


CASES = {
    "same-set": lambda: same_set(0),
    "same-set ties": lambda: same_set(1, ties=True),
    "query/gallery": lambda: query_gallery(2),
    "query/gallery ties": lambda: query_gallery(3, ties=True),
}


def _our_ranks(query, gallery) -> np.ndarray:
    """``[n_db, n_query]``: descending inner product, ties by database id."""
    return ranks_from_scores(query @ gallery.T)


# ----------------------------------------------------------------------------------------------
# pytorch-metric-learning
# ----------------------------------------------------------------------------------------------
class OurRanking:
    """A pytorch-metric-learning ``knn_func`` that returns our ranking; PML removes the query
    from it (``return_results``) with its own code."""

    def __init__(self, ranks: np.ndarray):
        self.ids = torch.from_numpy(np.ascontiguousarray(ranks.T))  # [n_query, n_db]

    def __call__(self, query, k, reference, ref_includes_query=False):
        k = k + int(ref_includes_query)
        ids = self.ids[:, :k]
        return return_results(torch.zeros(ids.shape, dtype=torch.float64), ids, ref_includes_query)


@pytest.mark.parametrize("case", CASES)
def test_against_pytorch_metric_learning(case):
    query, query_labels, gallery, gallery_labels, same = CASES[case]()
    ranks = _our_ranks(query, gallery)
    ours = evaluate_metric_learning(ranks, query_labels, gallery_labels, (1,), exclude_self=same)
    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=OurRanking(ranks),
    )
    if same:
        theirs = calculator.get_accuracy(query, query_labels)
    else:
        theirs = calculator.get_accuracy(query, query_labels, gallery, gallery_labels)
    assert ours["recall@1"] / 100 == pytest.approx(theirs["precision_at_1"], **F64)
    assert ours["r_precision"] / 100 == pytest.approx(theirs["r_precision"], **F64)
    assert ours["map@r"] / 100 == pytest.approx(theirs["mean_average_precision_at_r"], **F64)
    # the queries without positives are excluded by both, and we count them
    assert ours["n_queries_without_positives"] == (10 if same else 30)


# ----------------------------------------------------------------------------------------------
# torchmetrics
# ----------------------------------------------------------------------------------------------
def _pairs(ranks: np.ndarray, query_labels, gallery_labels, same: bool):
    """torchmetrics' flat inputs: one row per (query, database image), the query itself
    dropped; ``preds`` = minus the position in our ranking, so its order is ours."""
    n_db, n_query = ranks.shape
    position = np.empty_like(ranks)
    np.put_along_axis(position, ranks, np.arange(n_db)[:, None], axis=0)  # [n_db, n_query]
    q, d = np.meshgrid(np.arange(n_query), np.arange(n_db))
    keep = q != d if same else np.ones_like(q, dtype=bool)
    preds = -position[keep].astype(np.float64)
    target = gallery_labels[d[keep]] == query_labels[q[keep]]
    return torch.from_numpy(preds), torch.from_numpy(target), torch.from_numpy(q[keep])


@pytest.mark.parametrize("case", CASES)
def test_against_torchmetrics(case):
    query, query_labels, gallery, gallery_labels, same = CASES[case]()
    ranks = _our_ranks(query, gallery)
    ks = (1, 2, 4, 8, 30)
    ours = evaluate_metric_learning(ranks, query_labels, gallery_labels, ks, exclude_self=same)
    preds, target, indexes = _pairs(ranks, query_labels, gallery_labels, same)
    r_precision = RetrievalRPrecision(empty_target_action="skip")
    assert ours["r_precision"] / 100 == pytest.approx(
        float(r_precision(preds, target, indexes=indexes)), **F32
    )
    for k in ks:
        # hit rate per query is exactly 0 or 1; averaged in float64 the mean is exact too
        hit_rate = RetrievalHitRate(
            top_k=k, empty_target_action="skip", aggregation=lambda x, dim: x.double().mean(dim)
        )
        theirs = float(hit_rate(preds, target, indexes=indexes))
        assert ours[f"recall@{k}"] / 100 == pytest.approx(theirs, **F64)
    # torchmetrics' other convention counts the empty queries as misses: the two differ
    as_misses = RetrievalHitRate(top_k=1, empty_target_action="neg")
    assert float(as_misses(preds, target, indexes=indexes)) < ours["recall@1"] / 100


# ----------------------------------------------------------------------------------------------
# GLDv2 mAP@100
# ----------------------------------------------------------------------------------------------
def gldv2_reference(predictions: list[list[int]], solution: dict[int, set[int]]) -> float:
    """mAP@100 as published for the Google Landmarks 2019/2020 retrieval challenges (Weyand et
    al., CVPR 2020, Sec. 4):

        mAP@100 = 1/Q sum_q 1/min(m_q, 100) sum_{k <= min(n_q, 100)} P_q(k) rel_q(k)

    over the Q queries of the solution (a query without positives is not in it), m_q its
    positives, n_q its predictions. Written from the definition, not from our code."""
    total = 0.0
    for q, positives in solution.items():
        found, ap = 0, 0.0
        for k, image in enumerate(predictions[q][:100], start=1):
            if image in positives:
                found += 1
                ap += found / k
        total += ap / min(len(positives), 100)
    return total / len(solution)


@pytest.mark.parametrize("depth", [50, 100, 160])
def test_gldv2_against_the_published_definition(depth):
    rng = np.random.default_rng(depth)
    n_db, n_query, n_public = 3000, 400, 150
    gnd = []
    for q in range(n_query):
        m = (0, 1, 3, 20, 120, 250)[q % 6]  # empty, short and >100-positive cases
        gnd.append({"ok": rng.choice(n_db, m, replace=False).tolist()})
    # rankings that put some positives near the top, the rest at random
    ranks = np.empty((depth, n_query), dtype=np.int64)
    for q, g in enumerate(gnd):
        head = rng.permutation(g["ok"])[: rng.integers(0, 60)] if g["ok"] else []
        rest = rng.permutation(np.setdiff1d(np.arange(n_db), head))
        column = rng.permutation(np.concatenate([head, rest[: depth - len(head)]])[:depth])
        ranks[:, q] = column if q % 2 else np.concatenate([head, rest])[:depth]
    ours = gldv2_map_at_100(ranks, gnd, n_public=n_public, shallow_ok=depth < 100)
    assert ours["depth"] == min(depth, 100)
    assert ours["n_queries_without_positives"] == n_query // 6 + (n_query % 6 > 0)
    predictions = ranks.T.tolist()
    for split, queries in (
        ("public", range(n_public)),
        ("private", range(n_public, n_query)),
        ("combined", range(n_query)),
    ):
        solution = {q: set(gnd[q]["ok"]) for q in queries if gnd[q]["ok"]}
        assert ours[split] / 100 == pytest.approx(gldv2_reference(predictions, solution), **F64)
