"""The official resize/quantise/normalise rules against hand-computed sizes and direct cv2 calls."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from float_bounds import U32, assert_close_to_scale

from locore.core.errors import UserError
from locore.feature_extractors.detector import NormDetector
from locore.feature_extractors.dinov2 import DinoV2Extractor, build_vit
from locore.feature_extractors.preprocess import (
    axis_factor,
    base_scale,
    crop_box,
    official_resize,
    to_tensor,
)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (so interpolation differences are visible but small)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def dinov2() -> DinoV2Extractor:
    """A tiny DINOv2 extractor: only its preprocessing is used here."""
    return DinoV2Extractor(build_vit(24, 1, 2), NormDetector(), num_local=48, imsize=770)


def test_1023x767_long_side_770_and_multiples_of_14():
    # s = 770/1023; width 1023 s / 14 = 55 -> 770; height 767 s / 14 = 41.24 -> 41 -> 574.
    img = image(767, 1023)
    out = official_resize(img, 770, 14)
    assert out.shape == (574, 770, 3)
    expected = cv2.resize(img, (770, 574), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_query_crop_uses_the_full_image_scale_and_truncates_the_box(dinov2):
    img = image(768, 1024)
    # 90x90 crop: 90 * 770/1024 / 14 = 4.83 -> 5 patches a side -> 70 x 70 (25 tokens < 48).
    x = dinov2.preprocess(img, (100.9, 200.7, 190.2, 290.99))
    assert tuple(x.shape) == (3, 70, 70)
    expected = cv2.resize(img[200:290, 100:190], (70, 70), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(x.numpy(), to_tensor(expected).numpy(), atol=1 / 255 / 0.224)
    # 120x120 crop -> 90.2 px after scaling -> 6 patches (the spec's 6 x 6 = 36 tokens).
    assert tuple(dinov2.preprocess(img, (0, 0, 120, 120)).shape) == (3, 84, 84)
    # Scaled by its own size instead, the crop would have become 770 x 770.
    assert base_scale(img.shape, 770) == 770 / 1024


def test_rounding_is_half_to_even():
    # 35 px at scale 1: 2.5 patches -> round() gives 2 (28 px), not 3; 49 px: 3.5 -> 4 (56 px).
    assert official_resize(image(35, 770), 770, 14).shape[:2] == (28, 770)
    assert official_resize(image(49, 770), 770, 14).shape[:2] == (56, 770)


def test_enlarging_uses_inter_linear_and_equal_size_is_untouched():
    img = image(50, 100)
    out = official_resize(img, 224, 14)  # s = 2.24 -> 224 x 112, both enlarge
    np.testing.assert_array_equal(out, cv2.resize(img, (224, 112), interpolation=cv2.INTER_LINEAR))
    same = image(28, 42)
    assert official_resize(same, 42, 14) is same


def test_one_axis_shrinking_selects_inter_area():
    # 1000 x 10 at 770: width 0.77 (shrinks), height 7.7 px -> 1 patch (enlarges) -> INTER_AREA.
    img = image(10, 1000)
    out = official_resize(img, 770, 14)
    np.testing.assert_array_equal(out, cv2.resize(img, (770, 14), interpolation=cv2.INTER_AREA))


def test_quantised_factor_gives_exact_multiples_of_the_patch():
    for side in (15, 97, 513, 767, 1023, 2049):
        for scale in (0.3, 0.752, 1.0, 2.24):
            q = max(round(scale * side / 14), 1)
            assert round(side * axis_factor(side, scale, 14)) == 14 * q
            assert axis_factor(side, scale, 14) == pytest.approx(q * 14 / side, rel=1e-12)
    assert axis_factor(640, 0.7071) == 0.7071  # no patch: the scale itself


def test_box_truncation_and_empty_box():
    img = image(100, 120)
    assert crop_box(img, (10.9, 20.7, 100.2, 90.99)).shape[:2] == (70, 90)
    with pytest.raises(UserError, match="selects no pixel"):
        crop_box(img, (50, 50, 50.5, 80))


def test_tiny_region_is_a_user_error(dinov2):
    # A 1000 x 15 strip scales to 11.5 px: under one 14 px patch.
    with pytest.raises(UserError, match=r"1000x15 px .* below the 14 px"):
        dinov2.preprocess(image(15, 1000))


def test_imagenet_normalisation_by_hand():
    """float32 against float64: five roundings (x / 255, mean, std, subtract, divide), the
    subtraction's operands up to 1 divided by a std >= 0.224: within 8 u of the largest value."""
    px = np.array([[[255, 0, 128]]], dtype=np.uint8)  # one RGB pixel
    got = to_tensor(px)[:, 0, 0].double()
    want = torch.tensor(
        [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225],
        dtype=torch.float64,
    )
    assert_close_to_scale(got, want, 8 * U32, "normalised pixel")
