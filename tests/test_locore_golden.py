"""LoCoRe against the official module's outputs (tests/data/locore_*.*, see golden README).

Every golden file ``locore_*.json`` (with its ``.npz`` and ``.safetensors``) is checked; shapes,
counts and the architecture all come from the file. The checkpoint is in the official key layout
and goes through the normal loading code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from extract_helpers import one_torch_thread
from float_bounds import U32, assert_close, float32_bound, locore_score_tolerances, max_abs

from locore.rerank.locore import LocoreConfig, LocoreInputs, LocoreModel
from locore.rerank.locore.model import MODES

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def golden(locore_golden_stem):
    stem = locore_golden_stem
    meta = json.loads(stem.with_suffix(".json").read_text())
    arrays = dict(np.load(stem.with_suffix(".npz")))
    config = LocoreConfig.from_longformer(meta["config"])
    model = LocoreModel.from_pretrained(stem.with_suffix(".safetensors"), config=config)
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


def rel_bound(meta: dict) -> float:
    """float32 bound on this forward's error, relative to the logits' scale.

    Per layer 8 chained reductions (QKV, scores, weights x values, output, LayerNorm, FFN in/out,
    LayerNorm) plus 3 outside (input projection, embedding LayerNorm, classifier), each over at
    most max(hidden, FFN, padded tokens) terms: :func:`float32_bound`. For locore_small (2 layers,
    128 terms) that is 1.3e-5 of max|logit| (13.3): 1.7e-4. Measured on an AMD EPYC over
    ATEN_CPU_CAPABILITY=default|avx2 x MKL_CBWR=COMPATIBLE|AVX: 0 to 1.8e-5 (hf), 1.4e-5 to
    1.7e-5 (fast).
    """
    c = meta["config"]
    terms = max(c["hidden_size"], c["intermediate_size"], meta["padded_tokens"])
    return float32_bound(8 * c["num_hidden_layers"] + 3, terms)


def class1_logits(meta: dict, logits):
    """``[B, G, T]`` class-1 logits of the gallery blocks (the query block dropped)."""
    return logits[..., 1].reshape(meta["B"], 1 + meta["G"], -1)[:, 1:]


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_reproduces_the_official_outputs(golden, backend):
    """hf runs transformers' code as the official module does; fast sums attention in another
    order. Both agree with the official outputs within the float32 bound of ``rel_bound`` on each
    logit, carried to the scores and the loss by ``locore_score_tolerances``.
    """
    meta, model, inputs, ref = golden
    with torch.no_grad():
        out = model(inputs, backend=backend)
    eps = rel_bound(meta) * max_abs(ref["token_logits"])
    tol = locore_score_tolerances(class1_logits(meta, ref["token_logits"]), eps)
    assert_close(out.token_logits, ref["token_logits"], tol["token_logits"], "token logits")
    for mode in MODES:
        assert_close(out.scores[mode], ref[score_key(mode)], tol[mode], mode)
    assert_close(out.loss.item(), ref["train_loss"].item(), tol["loss"], "loss")


def test_golden_config_and_layout(golden):
    """Shapes from the file: B lists of G images, (1 + G) blocks of GLOBAL + n locals + SEP."""
    meta, model, inputs, _ = golden
    assert model.config.layer_norm_eps == meta["config"]["layer_norm_eps"]
    n = inputs.query_local.shape[1]
    assert meta["tokens"] == (1 + meta["G"]) * (n + 2)
    with torch.no_grad():
        out = model(inputs)
    assert out.token_logits.shape == (meta["B"], meta["tokens"], 2)
    assert sorted(out.scores) == sorted(meta["score_modes"])
    assert all(s.shape == (meta["B"], meta["G"]) for s in out.scores.values())


def test_score_modes_read_the_right_tokens(golden):
    """max-end is the last local token (not SEP), max-start the GLOBAL token (spec §4.11)."""
    meta, model, inputs, ref = golden
    c = class1_logits(meta, ref["token_logits"])
    assert torch.equal(ref["score_max_end"], c[..., -2])
    assert torch.equal(ref["score_max_start"], c[..., 0])
    with torch.no_grad():
        out = model(inputs, backend="hf")
    ours = class1_logits(meta, out.token_logits)
    assert torch.equal(out.scores["max-end"], ours[..., -2])
    assert torch.equal(out.scores["max-start"], ours[..., 0])
    tol = (ours.shape[-1] - 1) * U32 * ours[..., :-1].prod(-1).abs()  # the product's roundings
    assert_close(out.scores["max-prod"], ours[..., :-1].prod(-1), tol.numpy(), "max-prod")


def score_key(mode: str) -> str:
    return "score_" + mode.replace("-", "_")
