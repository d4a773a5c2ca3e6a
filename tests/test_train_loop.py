"""The training loop: exact resume, learning, accumulation, checkpointing, bf16, logs, CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from float_bounds import assert_close, assert_close_to_scale, float32_bound, max_abs
from train_helpers import K, write_features

from locore import cli
from locore.core import config as cfg
from locore.core.errors import UserError
from locore.rerank.locore.model import LocoreModel, build_model
from locore.rerank.train.data import DataConfig, ListDataset
from locore.rerank.train.loop import (
    TrainConfig,
    enable_gradient_checkpointing,
    read_log,
    train,
    validate,
)

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
    """Two accumulated halves give the loss curve of one batch of 4 over two steps.

    The second loss is taken after one AdamW step, so it checks the update. Weights are not
    compared: AdamW's first step is lr g / (|g| + eps), so a weight whose gradient is within
    rounding of 0 may move anywhere in [-lr, lr], but such a weight does not move the loss.
    Bound: forward and backward, 2 x (8 per layer + 3) reductions of <= max(hidden, FFN, tokens)
    terms (float32_bound), of the loss's scale.
    """
    big = _config(features, tmp_path / "a", 2, batch_size=4, model_overrides=SMALL)
    small = dataclasses.replace(big, out=str(tmp_path / "b"), batch_size=2, grad_accum=2)
    a, b = read_log(train(big)), read_log(train(small))
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 2
    config = build_model("micro", **SMALL).config
    tokens = (1 + big.data.list_length) * (K + 2)
    terms = max(config.hidden_size, config.intermediate_size, tokens)
    rel = float32_bound(2 * (8 * config.num_layers + 3), terms)
    losses = [r["loss"] for r in a]
    assert_close_to_scale([r["loss"] for r in b], losses, rel, "loss curve")


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
    # The same kernels recomputed: float32-equal up to nondeterministic reduction order (1 step
    # of the chain), of the largest gradient (gradients that cancel carry its rounding).
    tol = float32_bound(1, 64) * max(map(max_abs, grads[0].values()))
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], tol, name)


def test_bf16_and_hf_backend_train(features, tmp_path):
    for name, kw in (("bf16", {"bf16": True}), ("hf", {"backend": "hf"})):
        out = train(_config(features, tmp_path / name, 2, model_overrides=SMALL, **kw))
        assert all(np.isfinite(r["loss"]) for r in read_log(out))


def test_presets_and_cli(tmp_path, capsys):
    for name in ("synthetic", "demo", "gldv2_base", "offline", "offline_pasted"):
        cfg.load(TrainConfig, name, kind="train")
    with pytest.raises(UserError, match="unknown config key data.lists"):
        cfg.load(TrainConfig, "demo", ["data.lists=3"], kind="train")
    with pytest.raises(UserError, match="unknown train schedule"):
        cfg.load(TrainConfig, "demo", ["schedule=cosine"], kind="train")
    args = ["train", "--config", "synthetic", "--out", str(tmp_path), "--set", "steps=2"]
    assert cli.main(args) == 0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "train_config.yaml").is_file()
    assert len(read_log(tmp_path)) == 1  # log_every 5 > 2 steps: only the final row


def test_validation_lists_are_scored_at_every_checkpoint(features, tmp_path):
    """The logged validation numbers are those of the checkpoint saved at that step, on the
    same lists every time (dropout off), and appear only at checkpoints."""
    held_out = DataConfig(
        features=str(features), labels=str(features / "labels.txt"), list_length=6, num_local=K
    )
    config = _config(features, tmp_path / "run", 4, validation=held_out, model_overrides=SMALL)
    log = read_log(train(config))
    assert ["val/loss" in r for r in log] == [False, True, False, True]
    lists = ListDataset(held_out, config.seed)
    for row in log[1::2]:
        model = LocoreModel.from_pretrained(tmp_path / "run" / f"checkpoint-{row['step']}")
        again = validate(model, lists, batch_size=5, device="cpu")  # other batches, same lists
        assert again.keys() == {k for k in row if k.startswith("val/")}
        for key, value in again.items():
            assert_close_to_scale(value, row[key], float32_bound(4, 1000), what=key)


def test_best_keeps_the_validated_checkpoint_with_the_best_metric(features, tmp_path):
    held_out = DataConfig(
        features=str(features), labels=str(features / "labels.txt"), list_length=6, num_local=K
    )
    config = _config(
        features, tmp_path / "run", 6, validation=held_out, model_overrides=SMALL, lr=3e-2
    )
    for key in ("val/loss", "val/max-end/recall@1"):
        out = train(dataclasses.replace(config, best=key, out=str(tmp_path / key[4:8])))
        rows = [r for r in read_log(out) if key in r]
        better = min if key == "val/loss" else max
        step = next(r["step"] for r in rows if r[key] == better(r[key] for r in rows))
        chosen = json.loads((out / "selected.json").read_text())
        assert chosen == {
            "checkpoint": f"checkpoint-{step}",
            "step": step,
            "metric": key,
            "value": next(r[key] for r in rows if r["step"] == step),
        }
        final = LocoreModel.from_pretrained(out).state_dict()
        kept = LocoreModel.from_pretrained(out / f"checkpoint-{step}").state_dict()
        assert all(torch.equal(final[k], kept[k]) for k in final)
    losses = [r["val/loss"] for r in read_log(tmp_path / "loss") if "val/loss" in r]
    assert len(set(losses)) == 3  # three different checkpoints to choose from


def test_best_needs_validation_and_a_known_metric(features, tmp_path):
    with pytest.raises(UserError, match="needs validation.features"):
        _config(features, tmp_path, 2, best="val/loss")
    held_out = DataConfig(features=str(features), labels=str(features / "labels.txt"))
    with pytest.raises(UserError, match="unknown train best 'val/recall'; choose one of"):
        _config(features, tmp_path, 2, best="val/recall", validation=held_out)
