"""Training-free list scores (global, chamfer) and their recalls in ``baselines.json``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from float_bounds import assert_close_to_scale, float32_bound
from train_helpers import K, write_features

from locore.rerank.locore.model import LocoreInputs
from locore.rerank.train.baselines import list_recalls, score_lists
from locore.rerank.train.data import DataConfig, ListDataset
from locore.rerank.train.loop import TrainConfig, train


def _inputs(query, gallery, query_mask, gallery_mask, qg=None, gg=None):
    def t(a):
        return None if a is None else torch.tensor(np.asarray(a, np.float32))

    q, g = t(query)[None], t(gallery)[None]
    return LocoreInputs(
        query_local=q,
        query_scales=torch.zeros(q.shape[:2], dtype=torch.long),
        query_mask=torch.tensor(query_mask)[None],
        gallery_local=g,
        gallery_scales=torch.zeros(g.shape[:3], dtype=torch.long),
        gallery_mask=torch.tensor(gallery_mask)[None],
        query_global=None if qg is None else t(qg)[None],
        gallery_global=None if gg is None else t(gg)[None],
    )


def test_chamfer_and_global_by_hand():
    # Query: locals e0, e1 and a padded row that must not count; descriptors are normalised.
    query = [[2, 0, 0], [0, 1, 0], [0, 0, 5]]
    gallery = [
        [[1, 0, 0], [0, 0, 1], [0, 1, 0]],  # e0, e2, e1 (padded: would have matched e1)
        [[0, 3, 0], [1, 1, 0], [0, 0, 1]],  # e1, (e0+e1)/sqrt2, e2
    ]
    gallery_mask = [[False, False, True], [False, False, False]]
    inputs = _inputs(
        query, gallery, [False, False, True], gallery_mask, [1, 2, 0], [[1, 0, 0], [0.5, 1, 2]]
    )
    scores = score_lists(inputs)
    expect_chamfer = [(1 + 0) / 2, (2**-0.5 + 1) / 2]  # image 0: e1 has no unpadded match
    expect_global = [1, 2.5]
    for name, expect in (("chamfer", expect_chamfer), ("global", expect_global)):
        got = scores[name][0].tolist()
        for a, b in zip(got, expect):
            assert_close_to_scale(a, b, float32_bound(3, 1), what=name)
    no_globals = _inputs(query, gallery, [False, False, True], gallery_mask)
    assert set(score_lists(no_globals)) == {"chamfer"}


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("feats"))


def test_recalls_over_the_lists(features):
    data = ListDataset(
        DataConfig(
            features=str(features),
            labels=str(features / "labels.txt"),
            list_length=6,
            num_local=K,
            max_positives=2,
        )
    )
    found = list_recalls(data, batch_size=5)
    assert set(found) == {f"{s}/recall@{k}" for s in ("global", "chamfer") for k in (1, 5, 10)}
    # Same-class locals share prototypes (noise 0.3): chamfer puts a positive first in every list.
    assert found["chamfer/recall@1"] == 1.0
    # Recall@1 by hand from the stored globals, list by list.
    hits = []
    for i in range(len(data)):
        ids, labels = data.list_ids(i)
        hits.append(labels[np.argmax(data.globals[ids] @ data.globals[i])])
    assert found["global/recall@1"] == pytest.approx(np.mean(hits), abs=1e-6)
    assert list_recalls(data, max_lists=4)["global/recall@10"] == 1.0  # lists of 6 hold one


def test_train_writes_the_baselines_of_both_splits(features, tmp_path):
    data = DataConfig(
        features=str(features), labels=str(features / "labels.txt"), list_length=6, num_local=K
    )
    config = TrainConfig(
        data=data,
        validation=data,
        out=str(tmp_path),
        steps=1,
        batch_size=2,
        log_every=1,
        save_every=1,
        model_overrides={"num_layers": 1},
        device="cpu",
    )
    train(config)
    found = json.loads((tmp_path / "baselines.json").read_text())
    train_part = {k: v for k, v in found.items() if not k.startswith("val/")}
    assert train_part == list_recalls(ListDataset(data, config.seed))
    assert {k[4:] for k in found if k.startswith("val/")} == set(train_part)
