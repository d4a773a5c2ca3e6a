"""Golden check: our DINOv2 + detector extraction reproduces the official code's output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import feature_extractors
from feature_extractors.io import load_image


@pytest.fixture(scope="module")
def golden(data_dir):
    meta = json.loads((data_dir / "extract_small.json").read_text())
    arrays = dict(np.load(data_dir / "extract_small.npz"))
    vit = meta["vit"]
    extractor = feature_extractors.create(
        "dinov2_vitb14_reg",
        weights=str(data_dir / "extract_small_dinov2.pth"),
        detector=str(data_dir / "extract_small_detector.pt"),
        num_local=meta["topk"],
        imsize=meta["imsize"],
        embed_dim=vit["embed_dim"],
        depth=vit["depth"],
        num_heads=vit["num_heads"],
    )
    images = [load_image(data_dir / "extract_small_images" / n) for n in meta["images"]]
    return meta, arrays, extractor, images


@pytest.mark.parametrize("split", ["gallery", "query"])
def test_reproduces_official_rows_globals_and_sizes(golden, split):
    meta, arrays, extractor, images = golden
    box = tuple(meta["query_bbx"]) if split == "query" else None
    for i, image in enumerate(images):
        x = extractor.preprocess(image, box)
        assert list(x.shape[1:]) == meta["resized_sizes"][split][i]
        feats = extractor.extract_batch(x[None])[0]
        rows = feats.local.to_rows()
        want = arrays[f"{split}_local"][i]
        np.testing.assert_allclose(rows[:, 2:], want[:, 2:], atol=1e-5)
        np.testing.assert_allclose(rows[:, :2], want[:, :2], atol=1e-6)
        np.testing.assert_allclose(feats.global_desc, arrays[f"{split}_glob"][i], atol=1e-5)
        np.testing.assert_allclose(feats.extra["cls"], arrays[f"{split}_cls"][i], atol=1e-5)


def test_position_embedding_matches_the_hub_formula(golden):
    """Hub rule: bicubic + antialias straight to the target grid (offset 0); timm's differs."""
    _, _, extractor, _ = golden
    vit = extractor.vit
    pos = vit.pos_embed.detach()
    table = pos[0, 1:].reshape(37, 37, -1).permute(2, 0, 1)[None]
    expected = (
        torch.nn.functional.interpolate(table, size=(11, 16), mode="bicubic", antialias=True)[0]
        .permute(1, 2, 0)
        .reshape(176, -1)
    )
    got = vit.position_embedding(11, 16)[0].detach()
    torch.testing.assert_close(got[1:], expected)
    torch.testing.assert_close(got[0], pos[0, 0])
    no_aa = torch.nn.functional.interpolate(table, size=(11, 16), mode="bicubic")[0]
    assert not torch.allclose(no_aa.permute(1, 2, 0).reshape(176, -1), expected, atol=1e-4)
