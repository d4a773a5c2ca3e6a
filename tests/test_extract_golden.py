"""Golden check: our DINOv2 + detector extraction reproduces the official code's output.

``extract_small.*`` (see tests/data and the golden README) holds the official AMES/LOCORE
extraction of three real photos with a tiny random DINOv2 (hub key layout) and an AMES-format
detector: gallery rows, query rows (each image cropped to the box before resizing; positions
not post-fixed), detector-weighted global and CLS descriptors, and the resized sizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from extract_helpers import one_torch_thread
from safetensors.torch import save_file

from locore import feature_extractors
from locore.feature_extractors.io import load_image

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def build(data_dir, meta, weights):
    vit = meta["vit"]
    return feature_extractors.create(
        "dinov2_vitb14_reg",
        weights=str(weights),
        detector=str(data_dir / "extract_small_detector.pt"),
        num_local=meta["topk"],
        imsize=meta["imsize"],
        embed_dim=vit["embed_dim"],
        depth=vit["depth"],
        num_heads=vit["num_heads"],
        num_registers=vit["num_register_tokens"],
    )


@pytest.fixture(scope="module")
def golden(data_dir):
    meta = json.loads((data_dir / "extract_small.json").read_text())
    arrays = dict(np.load(data_dir / "extract_small.npz"))
    extractor = build(data_dir, meta, data_dir / "extract_small_dinov2.pth")
    images = [load_image(data_dir / "extract_small_images" / n) for n in meta["images"]]
    return meta, arrays, extractor, images


def check(extractor, meta, arrays, images, split):
    box = tuple(meta["query_bbx"]) if split == "query" else None
    for i, image in enumerate(images):
        x = extractor.preprocess(image, box)
        assert list(x.shape[1:]) == meta["resized_sizes"][split][i]
        feats = extractor.extract_batch(x[None])[0]
        np.testing.assert_allclose(feats.local.to_rows(), arrays[f"{split}_local"][i], atol=1e-5)
        np.testing.assert_allclose(feats.global_desc, arrays[f"{split}_glob"][i], atol=1e-5)
        np.testing.assert_allclose(feats.extra["cls"], arrays[f"{split}_cls"][i], atol=1e-5)


@pytest.mark.parametrize("split", ["gallery", "query"])
def test_reproduces_official_rows_globals_and_sizes(golden, split):
    meta, arrays, extractor, images = golden
    check(extractor, meta, arrays, images, split)


def test_timm_layout_of_the_same_weights_reproduces_it_too(golden, data_dir, tmp_path):
    """The golden hub file rewritten by hand in timm's layout (as timm's HF files store it)."""
    meta, arrays, _, images = golden
    hub = torch.load(data_dir / "extract_small_dinov2.pth", weights_only=True)
    timm = {k: v for k, v in hub.items() if k not in ("mask_token", "register_tokens")}
    timm["cls_token"] = hub["cls_token"] + hub["pos_embed"][:, :1]
    timm["pos_embed"] = hub["pos_embed"][:, 1:].contiguous()
    timm["reg_token"] = hub["register_tokens"]
    save_file(timm, tmp_path / "model.safetensors")
    check(build(data_dir, meta, tmp_path), meta, arrays, images, "query")


def test_a_batch_gives_the_rows_of_single_images(golden):
    """Batched matmuls round differently: detector weights (~100) agree to float32 precision."""
    meta, arrays, extractor, images = golden
    same_size = [i for i, s in enumerate(meta["resized_sizes"]["gallery"]) if s == [224, 224]]
    batch = torch.stack([extractor.preprocess(images[i]) for i in same_size])
    for i, feats in zip(same_size, extractor.extract_batch(batch)):
        want = arrays["gallery_local"][i]
        np.testing.assert_allclose(feats.local.to_rows(), want, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(feats.global_desc, arrays["gallery_glob"][i], atol=1e-5)
