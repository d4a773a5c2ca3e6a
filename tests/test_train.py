"""Training: list construction, gallery shuffling, loss decreases, exact resume, CLI config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine import config as cfg
from engine.errors import UserError
from indexing.local_store import LocalStoreWriter
from rerank.train.data import DataConfig, ListDataset
from rerank.train.loop import TrainConfig, train

N, K, DL, DG = 12, 8, 112, 1280


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """12 images of 3 classes; same-class images share local descriptors and globals."""
    root = tmp_path_factory.mktemp("feats")
    rng = np.random.default_rng(0)
    classes = np.arange(N) % 3
    protos_l = rng.normal(size=(3, K, DL))
    protos_g = rng.normal(size=(3, DG))
    rows = np.zeros((N, K, 5 + DL), np.float32)
    local = protos_l[classes] + 0.3 * rng.normal(size=(N, K, DL))
    rows[:, :, 5:] = local / np.linalg.norm(local, axis=2, keepdims=True)
    rows[:, :, 4] = np.linspace(1, 0.1, K)
    glob = protos_g[classes] + 2.0 * rng.normal(size=(N, DG))
    glob /= np.linalg.norm(glob, axis=1, keepdims=True)
    names = [f"img{i}.jpg" for i in range(N)]
    with LocalStoreWriter(root / "local.h5", K, DL, "float32") as w:
        w.append(names, rows)
    glob.astype("<f4").tofile(root / "global.f32")
    (root / "labels.txt").write_text("".join(f"img{i},{c}\n" for i, c in enumerate(classes)))
    return root


def _data(features, **kw):
    return DataConfig(str(features), str(features / "labels.txt"), list_length=6, num_local=K, **kw)


def test_lists_exclude_the_query_and_shuffle(features):
    plain = ListDataset(_data(features, shuffle_gallery=False), seed=1)
    shuffled = ListDataset(_data(features), seed=1)
    for i in range(N):
        ids, labels = plain.list_ids(i)
        assert i not in ids and len(set(ids)) == 6
        sims = plain.globals[ids] @ plain.globals[i]
        assert (np.diff(sims) <= 1e-6).all()  # nearest neighbours in order
        np.testing.assert_array_equal(labels, plain.labels[ids] == plain.labels[i])
        ids2, _ = shuffled.list_ids(i)
        assert sorted(ids2) == sorted(ids)
    assert any((shuffled.list_ids(i)[0] != plain.list_ids(i)[0]).any() for i in range(N))
    capped = ListDataset(_data(features, shuffle_gallery=False, max_positives=1), seed=1)
    assert all(capped.list_ids(i)[1].sum() <= 1 for i in range(N))
    injected = ListDataset(_data(features, min_positives=3), seed=1)
    assert all(injected.list_ids(i)[1].sum() >= 3 for i in range(N))
    with pytest.raises(UserError, match="lower data.list_length"):
        ListDataset(DataConfig(str(features), str(features / "labels.txt"), list_length=20))


def _config(features, out, steps, **kw):
    return TrainConfig(
        data=_data(features),
        out=str(out),
        steps=steps,
        batch_size=2,
        lr=1e-3,
        log_every=1,
        save_every=2,
        device="cpu",
        **kw,
    )


def test_resume_reproduces_the_loss_curve_exactly(features, tmp_path):
    full = train(_config(features, tmp_path / "full", 4))
    train(_config(features, tmp_path / "part", 2))
    resumed = train(_config(features, tmp_path / "part", 4))
    a = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert (full / "model.safetensors").is_file() and (full / "loss.png").is_file()
    assert (full / "checkpoint-4" / "trainer_state.pt").is_file()


def test_loss_decreases(features, tmp_path):
    out = train(_config(features, tmp_path / "run", 12, seed=3))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in log[-3:]]) < np.mean([r["loss"] for r in log[:3]])


def test_train_config_rejects_unknown_keys():
    with pytest.raises(UserError, match="unknown config key data.lists"):
        cfg.load(TrainConfig, "demo", ["data.lists=3"], kind="train")
