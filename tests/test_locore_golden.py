"""LoCoRe against the official module's outputs (tests/data/locore_small.*, see golden README).

The checkpoint is in the official key layout and goes through the normal loading code; the
architecture comes from the official config dict stored beside it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from locore.rerank.locore import LocoreConfig, LocoreInputs, LocoreModel
from locore.rerank.locore.model import MODES

TOL = 1e-5


@pytest.fixture(scope="module")
def golden(data_dir):
    meta = json.loads((data_dir / "locore_small.json").read_text())
    arrays = dict(np.load(data_dir / "locore_small.npz"))
    config = LocoreConfig.from_longformer(meta["config"])
    model = LocoreModel.from_pretrained(data_dir / "locore_small.safetensors", config=config)
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    inputs = LocoreInputs(
        query_local=t["query_local_features"],
        query_scales=t["query_local_scales"],
        query_mask=t["query_local_mask"].bool(),
        gallery_local=t["gallery_local_features"],
        gallery_scales=t["gallery_local_scales"],
        gallery_mask=t["gallery_local_mask"].bool(),
        query_global=t["query_global_features"],  # official [B, 1, D] shape
        gallery_global=t["gallery_global_features"],
        positive_mask=t["positive_mask"],
    )
    return meta, model, inputs, t


def test_golden_config_and_layout(golden):
    meta, model, inputs, _ = golden
    assert model.config.type_vocab_size == 2 and model.config.layer_norm_eps == 1e-12
    with torch.no_grad():
        out = model(inputs)
    assert out.token_logits.shape == (meta["B"], meta["tokens"], 2)
    assert all(s.shape == (meta["B"], meta["G"]) for s in out.scores.values())


def test_hf_backend_reproduces_the_official_outputs(golden):
    """The reference path runs the same transformers code: agreement to 1e-5 absolute."""
    _, model, inputs, ref = golden
    with torch.no_grad():
        out = model(inputs, backend="hf")
    assert (out.token_logits - ref["token_logits"]).abs().max() <= TOL
    for mode in MODES:
        assert (out.scores[mode] - ref[score_key(mode)]).abs().max() <= TOL, mode
    assert abs(out.loss.item() - ref["train_loss"].item()) <= TOL


def test_fast_backend_reproduces_the_official_outputs(golden):
    """Our attention sums in another order: 1e-5 of each output's scale (float32 rounding).

    Token logits reach |13| here, so 1e-5 relative is ~1e-4 absolute; max-prod multiplies the
    T-1 = 7 logits of an image, which multiplies their relative rounding by up to 7.
    """
    _, model, inputs, ref = golden
    with torch.no_grad():
        out = model(inputs, backend="fast")
    assert_close_scaled(out.token_logits, ref["token_logits"], TOL)
    for mode in ("max-sum", "max-start", "max-end"):
        assert_close_scaled(out.scores[mode], ref[score_key(mode)], TOL)
    assert_close_scaled(out.scores["max-prod"], ref["score_max_prod"], 7 * TOL)
    assert abs(out.loss.item() - ref["train_loss"].item()) <= TOL


def test_score_modes_read_the_right_tokens(golden):
    """max-end is the last local token (not SEP), max-start the GLOBAL token (spec §4.11)."""
    meta, model, inputs, ref = golden
    c = ref["token_logits"][..., 1].view(meta["B"], 1 + meta["G"], -1)[:, 1:]
    assert torch.equal(ref["score_max_end"], c[..., -2])
    assert torch.equal(ref["score_max_start"], c[..., 0])
    with torch.no_grad():
        out = model(inputs, backend="hf")
    ours = out.token_logits[..., 1].view(meta["B"], 1 + meta["G"], -1)[:, 1:]
    assert torch.equal(out.scores["max-end"], ours[..., -2])
    assert torch.allclose(out.scores["max-prod"], ours[..., :-1].prod(-1))


def score_key(mode: str) -> str:
    return "score_" + mode.replace("-", "_")


def assert_close_scaled(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    scale = max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x scale {scale:.3g}"
