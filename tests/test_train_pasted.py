"""Pasted lists: positives hold noisy copies of the query's locals, every gallery image holds
pasted rows, the draws are reproducible, and `locore train` reads them from an extraction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from locore.indexing.local_store import LocalStoreWriter
from locore.rerank.train.data import DataConfig, make_dataset
from locore.rerank.train.loop import TrainConfig, read_log, train
from locore.rerank.train.pasted import PastedLists, PastedSpec

N, K, D, DG = 40, 40, 112, 16
MATCH = 0.8  # cosine of a pasted copy to its source at noise <= 0.2: ~0.98; random rows ~N(0, 0.1)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("pasted")
    rng = np.random.default_rng(0)
    rows = np.zeros((N, K, 5 + D), np.float32)
    local = rng.normal(size=(N, K, D))
    rows[:, :, 5:] = local / np.linalg.norm(local, axis=2, keepdims=True)
    rows[:, -2:, 3] = 1  # two padding rows per image
    rows[:, -2:, 5:] = 0
    with LocalStoreWriter(root / "local.h5", K, D, "float32") as w:
        w.append([f"img{i}.jpg" for i in range(N)], rows)
    glob = rng.normal(size=(N, DG))
    (glob / np.linalg.norm(glob, axis=1, keepdims=True)).astype("<f4").tofile(root / "global.f32")
    return root, rows


def test_positives_match_the_query_and_every_image_is_pasted(features):
    root, rows = features
    config = DataConfig(source="pasted", features=str(root), list_length=12, num_local=K)
    built = make_dataset(config, seed=3)
    assert isinstance(built, PastedLists) and len(built) == config.synthetic_lists
    spec = PastedSpec(noise=(0.1, 0.2))  # copies unmistakable, so the test can count them
    lists = PastedLists(built.store, built.globals, 50, 12, K, seed=3, spec=spec)
    for draw in range(20):
        item = lists.make(draw)
        q = item["query_local"]
        query = int(np.flatnonzero((rows[:, :, 5:] == q).all(axis=(1, 2)))[0])
        stored = {i: rows[i, :, 5:] for i in range(N) if i != query}
        matches = (item["gallery_local"] @ q.T).max(axis=2) > MATCH  # [G, K] row matches query
        labels = item["labels"]
        assert 1 <= labels.sum() <= spec.max_positives
        for j in range(len(labels)):
            # which stored image this gallery image was, and how many of its rows were replaced
            changed = min(
                int((~np.isclose(item["gallery_local"][j], s).all(axis=1)).sum())
                for s in stored.values()
            )
            assert spec.paste[0] <= changed <= spec.paste[1]
            if labels[j]:
                assert matches[j].sum() >= spec.paste[0]
            else:
                assert matches[j].sum() <= spec.hard_paste[1]
        assert not item["gallery_mask"][:, :-2].any() and item["gallery_mask"][:, -2:].all()


def test_draws_are_reproducible_and_batches_are_model_inputs(features):
    root, _ = features
    config = DataConfig(source="pasted", features=str(root), list_length=12, num_local=8)
    a, b = make_dataset(config, seed=1), make_dataset(config, seed=1)
    x, y = a.batch(np.array([0, 1]), np.array([5, 6])), b.batch(np.array([9, 9]), np.array([5, 6]))
    assert torch.equal(x.gallery_local, y.gallery_local) and torch.equal(
        x.positive_mask, y.positive_mask
    )
    z = a.batch(np.array([0, 1]), np.array([7, 8]))
    assert not torch.equal(x.gallery_local, z.gallery_local)
    assert tuple(x.gallery_local.shape) == (2, 12, 8, D) and tuple(x.query_global.shape) == (2, DG)
    assert x.positive_mask.dtype == torch.int64 and x.query_scales.dtype == torch.int64
    no_global = make_dataset(dataclasses.replace(config, use_global=False), seed=1)
    w = no_global.batch(np.array([0, 1]), np.array([5, 6]))
    assert w.query_global is None and w.gallery_global is None
    assert torch.equal(w.gallery_local, x.gallery_local)


def test_locore_train_runs_on_pasted_lists_with_an_identity_start(features, tmp_path):
    root, _ = features
    data = DataConfig(
        source="pasted", features=str(root), list_length=8, num_local=16, synthetic_lists=64
    )
    overrides = {"global_dim": DG, "num_local": 16, "attention_window": 128, "dropout": 0.0}
    config = TrainConfig(
        data=data,
        init="scratch-identity",
        model_overrides=overrides,
        out=str(tmp_path / "run"),
        steps=4,
        batch_size=2,
        lr=1e-3,
        log_every=2,
        save_every=2,
        device="cpu",
    )
    log = read_log(train(config))
    assert [r["step"] for r in log] == [2, 4] and all(np.isfinite(r["loss"]) for r in log)
