"""DELG local branch and global descriptor vs the spec formulas (superglobal-delg-spec §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from extract_helpers import (
    RESNET_REL,
    assert_rows_match,
    detector_state,
    expected_layout,
    normalize,
    one_torch_thread,
    random_state,
    reference_maps,
    spec_detector,
    spec_rows,
)
from float_bounds import assert_close
from safetensors.torch import save_file

from locore.core.errors import UserError
from locore.feature_extractors import create
from locore.feature_extractors.delg import Delg

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def delg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the layout documented in feature_extractors/cards/DELG.md."""
    g = torch.Generator().manual_seed(seed)
    state = {f"backbone.{k}": v for k, v in random_state().items()}
    state |= {
        "autoencoder.reduce.weight": torch.randn(128, 1024, 1, 1, generator=g) / 32,
        "autoencoder.reduce.bias": torch.randn(128, generator=g) * 0.1,
        "autoencoder.expand.weight": torch.randn(1024, 128, 1, 1, generator=g) / 128**0.5,
        "autoencoder.expand.bias": torch.randn(1024, generator=g) * 0.1,
    }
    state |= {f"attention.{k}": v for k, v in detector_state(1024, seed, hidden=512).items()}
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("delg") / "delg_r50.safetensors"
    save_file(delg_state(), path)
    return path


def test_state_dict_layout_is_the_documented_one():
    backbone = {f"backbone.{k}": s for k, s in expected_layout(50).items()}
    heads = {
        "autoencoder.reduce.weight": (128, 1024, 1, 1),
        "autoencoder.reduce.bias": (128,),
        "autoencoder.expand.weight": (1024, 128, 1, 1),
        "autoencoder.expand.bias": (1024,),
        "attention.conv1.weight": (512, 1024, 1, 1),
        "attention.conv1.bias": (512,),
        "attention.conv2.weight": (1, 512, 1, 1),
        "attention.conv2.bias": (1,),
    }
    for p in ("weight", "bias", "running_mean", "running_var"):
        heads[f"attention.bn.{p}"] = (512,)
    heads["attention.bn.num_batches_tracked"] = ()
    got = {k: tuple(v.shape) for k, v in Delg(50).state_dict().items()}
    assert got == backbone | heads


def test_missing_key_is_reported(tmp_path):
    state = delg_state()
    del state["autoencoder.expand.bias"]
    torch.save({"model_state": state}, tmp_path / "delg.pt")
    with pytest.raises(UserError, match=r"missing 1 keys \['autoencoder.expand.bias'\]"):
        create("delg_r50", weights=str(tmp_path / "delg.pt"))
    with pytest.raises(UserError, match="cards/DELG.md"):
        create("delg_r50")


@pytest.mark.parametrize("threshold", [None, "median"])
def test_extraction_matches_the_spec(weights, threshold):
    """Block3 output (ReLU, stride-2 subsampled) -> reduce 128 (descriptor, L2) -> expand + ReLU
    -> attention MLP; top-K by attention over scales (>= threshold); RF centres 32 (r, c) / scale;
    global = L2(sum over scales of L2(fc(GeM_p(s4))))."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    state = delg_state()
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    attention = {k[len("attention.") :]: v for k, v in state.items() if k.startswith("attention.")}
    x = torch.from_numpy((image.astype(np.float32) - 128) / 128).permute(2, 0, 1)[None]
    descs, weights_, positions, ids, globals_ = [], [], [], [], []
    for k, s in enumerate((0.5, 1.0)):
        xs = x if s == 1.0 else F.interpolate(x, (48, 64), mode="bilinear", align_corners=False)
        s3_pre, s4 = reference_maps(backbone, xs, block3_strides=True)
        feat = torch.relu(s3_pre)[0, :, ::2, ::2].double()
        rows, cols = feat.shape[1:]
        tokens = feat.flatten(1).T.numpy()
        reduced = tokens @ state["autoencoder.reduce.weight"][:, :, 0, 0].double().numpy().T
        reduced += state["autoencoder.reduce.bias"].double().numpy()
        expanded = reduced @ state["autoencoder.expand.weight"][:, :, 0, 0].double().numpy().T
        expanded = np.maximum(expanded + state["autoencoder.expand.bias"].double().numpy(), 0)
        _, weight = spec_detector(attention, expanded)
        r, c = np.divmod(np.arange(rows * cols), cols)
        descs.append(normalize(reduced))
        weights_.append(weight)
        positions.append(np.stack([32.0 * r / s, 32.0 * c / s], 1))
        ids.append(np.full(rows * cols, k))
        if s == 1.0:
            pooled = (s4[0].double().flatten(1).clamp(min=1e-6) ** 3.7).mean(1) ** (1 / 3.7)
            fc = backbone["head.fc.weight"].double() @ pooled + backbone["head.fc.bias"].double()
            globals_.append(normalize(fc.numpy()))
    desc, weight, pos, scale = (np.concatenate(v) for v in (descs, weights_, positions, ids))
    cut = None if threshold is None else float(np.median(weight))
    if cut is not None:
        keep = weight >= cut
        desc, weight, pos, scale = desc[keep], weight[keep], pos[keep], scale[keep]
    extractor = create(
        "delg_r50",
        weights=str(weights),
        num_local=12,
        score_threshold=cut,
        local_scales=(0.5, 1.0),
        global_scales=(1.0,),
    )
    feats = extractor.extract(image)
    got, want = feats.local.to_rows(), spec_rows(desc, weight, pos, scale, 12)
    assert_rows_match(got, want, RESNET_REL, "rows")  # float32 bound of the ResNet chain
    assert (got[:, 3] == 1).any() == (threshold is not None)  # 16 tokens, half kept: padding
    assert_close(feats.global_desc, normalize(np.sum(globals_, 0)), RESNET_REL, "global")
