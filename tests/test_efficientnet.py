"""The offline default extractor uses the real ImageNet weights and the documented descriptors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from float_bounds import assert_close, assert_close_to_scale, float32_bound
from skimage import data

from locore import feature_extractors
from locore.core.errors import UserError


@pytest.fixture(scope="module")
def extractor():
    return feature_extractors.create("efficientnet_lite0")


@pytest.mark.parametrize(("photo", "label"), [("chelsea", 285), ("coffee", 967)])
def test_real_weights_classify_real_photos(extractor, photo, label):
    # offline-default.md: a wrong mapping or preprocessing gives unrelated predictions.
    image = cv2.resize(getattr(data, photo)(), (224, 224), interpolation=cv2.INTER_CUBIC)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    probs = extractor.classify(((x - extractor.mean) / extractor.std)[None])
    assert probs.argmax().item() == label
    assert probs.max().item() > 0.5


@pytest.mark.parametrize(("stage", "dim", "stride"), [(4, 112, 16), (6, 320, 32)])
def test_descriptors_follow_the_documented_definition(extractor, stage, dim, stride):
    if stage != extractor.local_stage:
        extractor = feature_extractors.create("efficientnet_lite0", local_stage=stage)
    image = data.astronaut()  # 512 x 512 -> 384 x 384
    feats = extractor.extract(image)
    x = extractor.preprocess(image)[None]
    local_map, last = extractor.feature_maps(x)
    assert local_map.shape[1:] == (dim, 384 // stride, 384 // stride)
    # global: GeM p=3 of the last map, L2-normalised
    gem = last.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)[0]
    rel = float32_bound(2, 1280)  # a spatial mean and a 1280-term norm, on the same maps
    assert_close(feats.global_desc, gem / gem.norm(), rel, "global")
    assert_close(np.linalg.norm(feats.global_desc), 1.0, rel, "global norm")
    # local: top-49 locations of the stage's map by activation norm, normalised
    tokens = local_map[0].flatten(1).T
    norms = tokens.norm(dim=1)
    top = torch.topk(norms, 49).indices
    assert_close_to_scale(feats.local.weights, norms[top], rel, "weights")
    assert_close(feats.local.desc, tokens[top] / norms[top, None], rel, "descriptors")
    gw = local_map.shape[3]
    r, c = top[0].item() // gw, top[0].item() % gw
    h, w = x.shape[2:]
    assert feats.local.positions[0].tolist() == pytest.approx(
        [(r * stride + stride / 2) / h, (c * stride + stride / 2) / w]
    )
    assert not feats.local.mask.any() and (np.diff(feats.local.weights) <= 0).all()
    rows = feats.local.to_rows()
    assert rows.shape == (49, 5 + dim) and (rows[:, 3] == 0).all()


def test_box_crop_and_padding_rows(extractor):
    image = data.coffee()  # 400 x 600
    crop = extractor.preprocess(image, (100, 50, 292, 242))
    # scale from the full image: 384 / 600; crop 192 px -> 122.9 -> 128 (multiple of 32)
    assert tuple(crop.shape) == (3, 128, 128)
    feats = feature_extractors.create("efficientnet_lite0", num_local=100).extract(
        image, (100, 50, 292, 242)
    )
    # 128 / 16 = 8 x 8 = 64 locations < 100 rows: the rest is padding
    assert feats.local.mask.sum() == 36 and (feats.local.desc[feats.local.mask] == 0).all()


def test_too_small_region_is_a_user_error(extractor):
    with pytest.raises(UserError, match="too small"):
        extractor.preprocess(np.zeros((10, 10, 3), np.uint8))


def test_wrong_weights_file_is_reported(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="hold 1 tensors"):
        feature_extractors.create("efficientnet_lite0", weights=str(path))


def test_unknown_option_and_name():
    with pytest.raises(UserError, match="unknown option 'topk'.*valid options"):
        feature_extractors.create("efficientnet_lite0", topk=3)
    with pytest.raises(UserError, match=r"local_stage 2 .*choose one of \[3, 4, 5, 6\]"):
        feature_extractors.create("efficientnet_lite0", local_stage=2)
    with pytest.raises(UserError, match="unknown extractor 'nope'"):
        feature_extractors.create("nope")
