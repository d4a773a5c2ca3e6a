"""The training loop: exact resume, learning, accumulation, checkpointing, bf16, logs, CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from train_helpers import K, write_features

from locore import cli
from locore.core import config as cfg
from locore.core.errors import UserError
from locore.rerank.locore.model import LocoreModel, build_model
from locore.rerank.train.data import DataConfig, ListDataset
from locore.rerank.train.loop import TrainConfig, enable_gradient_checkpointing, read_log, train

SMALL = {"num_layers": 1, "dropout": 0.0}


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("feats"))


@pytest.fixture(autouse=True)
def one_thread():
    """Other test runs share the 2 cores; one thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(features, out, steps, **kw):
    data = DataConfig(
        features=str(features), labels=str(features / "labels.txt"), list_length=6, num_local=K
    )
    base = dict(
        data=data, out=str(out), steps=steps, batch_size=2, lr=1e-3, log_every=1, save_every=2
    )
    return TrainConfig(**{**base, "device": "cpu", **kw})


def test_resume_reproduces_the_loss_curve_exactly(features, tmp_path):
    full = train(_config(features, tmp_path / "full", 4))
    train(_config(features, tmp_path / "part", 2))
    assert not (tmp_path / "part" / "checkpoint-4").exists()
    resumed = train(_config(features, tmp_path / "part", 4))  # picks up checkpoint-2
    a, b = read_log(full), read_log(resumed)
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 4
    wa = LocoreModel.from_pretrained(full).state_dict()
    wb = LocoreModel.from_pretrained(resumed).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (full / "loss.png").stat().st_size > 0
    header = (full / "log.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "lr", "steps_per_s", "max-end/recall@10"} <= set(header)
    assert {p.name for p in (full / "checkpoint-4").iterdir()} == {
        "model.safetensors",
        "config.json",
        "trainer_state.pt",
        "rng_state_0.pt",
    }


def test_loss_decreases(features, tmp_path):
    out = train(_config(features, tmp_path / "run", 16, seed=3, log_every=2, save_every=16))
    losses = [r["loss"] for r in read_log(out)]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.02


def test_accumulation_equals_one_big_batch(features, tmp_path):
    big = _config(features, tmp_path / "a", 1, batch_size=4, model_overrides=SMALL)
    small = dataclasses.replace(big, out=str(tmp_path / "b"), batch_size=2, grad_accum=2)
    wa = LocoreModel.from_pretrained(train(big)).state_dict()
    wb = LocoreModel.from_pretrained(train(small)).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_gradient_checkpointing_keeps_the_gradients(features, backend):
    inputs = ListDataset(_config(features, "unused", 1).data).batch(np.array([0, 1]))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model("micro", backend=backend, **SMALL).train()
        if checkpointed:
            enable_gradient_checkpointing(model, backend)
        model(inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_bf16_and_hf_backend_train(features, tmp_path):
    for name, kw in (("bf16", {"bf16": True}), ("hf", {"backend": "hf"})):
        out = train(_config(features, tmp_path / name, 2, model_overrides=SMALL, **kw))
        assert all(np.isfinite(r["loss"]) for r in read_log(out))


def test_presets_and_cli(tmp_path, capsys):
    for name in ("synthetic", "demo", "gldv2_base"):
        cfg.load(TrainConfig, name, kind="train")
    with pytest.raises(UserError, match="unknown config key data.lists"):
        cfg.load(TrainConfig, "demo", ["data.lists=3"], kind="train")
    with pytest.raises(UserError, match="unknown train schedule"):
        cfg.load(TrainConfig, "demo", ["schedule=cosine"], kind="train")
    args = ["train", "--config", "synthetic", "--out", str(tmp_path), "--set", "steps=2"]
    assert cli.main(args) == 0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "train_config.yaml").is_file()
    assert len(read_log(tmp_path)) == 1  # log_every 5 > 2 steps: only the final row
