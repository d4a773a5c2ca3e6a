"""Training-free scores of the training lists: the bar a trained re-ranker has to clear.

A list-wise re-ranker earns its place only where it ranks its lists better than the descriptors
do without training: the global similarity (the first stage's own order) and the chamfer
similarity of the locals (each query local's best cosine in the gallery image, averaged over
the query's locals). ``locore train`` writes both, for the training and the validation lists,
to ``baselines.json`` before its first step, as the recall@k its log reports for the model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from locore.rerank.locore.model import LocoreInputs, recalls
from locore.rerank.train.data import Lists

MAX_LISTS = 2000  # lists scored per dataset (evenly spaced queries): seconds, also for GLDv2


def score_lists(inputs: LocoreInputs) -> dict[str, Tensor]:
    """``[B, G]`` training-free scores of a batch: ``chamfer`` and, with globals, ``global``."""
    query = F.normalize(inputs.query_local.float(), dim=-1)  # [B, n, D]
    gallery = F.normalize(inputs.gallery_local.float(), dim=-1)  # [B, G, n, D]
    sims = torch.einsum("bnd,bgmd->bgnm", query, gallery)
    best = sims.masked_fill(inputs.gallery_mask[:, :, None, :], -torch.inf).amax(-1)  # [B,G,n]
    best = best.masked_fill(inputs.query_mask[:, None, :], 0)  # padded query rows count 0
    count = (~inputs.query_mask).sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
    scores = {"chamfer": best.sum(-1) / count}
    if inputs.query_global is not None and inputs.gallery_global is not None:
        q = inputs.query_global.float().reshape(len(query), -1)  # [B, Dg]
        g = inputs.gallery_global.float().reshape(*gallery.shape[:2], -1)  # [B, G, Dg]
        scores["global"] = torch.einsum("bd,bgd->bg", q, g)
    return scores


def list_recalls(data: Lists, batch_size: int = 64, max_lists: int = MAX_LISTS) -> dict:
    """``"<score>/recall@<k>"`` -> fraction of lists with a positive among the k best images,
    over the lists of up to ``max_lists`` evenly spaced queries (each at draw 0, the lists
    validation scores)."""
    count = min(len(data), max_lists)
    queries = np.unique(np.linspace(0, len(data) - 1, count).round().astype(np.int64))
    totals: dict[str, float] = {}
    for start in range(0, len(queries), batch_size):
        indices = queries[start : start + batch_size]
        inputs = data.batch(indices)
        with torch.no_grad():
            values = recalls(score_lists(inputs), inputs.positive_mask)
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value * len(indices)
    return {key: value / len(queries) for key, value in totals.items()}
