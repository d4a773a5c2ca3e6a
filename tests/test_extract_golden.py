"""Golden check: our DINOv2 + detector extraction reproduces the official code's output.

Every ``extract_*.json`` golden file (see tests/data and the golden README) is checked with the
files named after it: ``<stem>.npz`` (the official rows, globals and CLS), ``<stem>_dinov2.pth`` (a
ViT in the hub key layout), ``<stem>_detector.pt`` (AMES format) and ``<stem>_images/``. Image
names, sizes, the query box, top-K and the ViT shape are all read from the file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from extract_helpers import assert_rows_match, one_torch_thread
from float_bounds import assert_close, float32_bound
from safetensors.torch import save_file

from locore import feature_extractors
from locore.feature_extractors.io import load_image

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def build(stem: Path, meta: dict, weights: Path):
    vit = meta["vit"]
    return feature_extractors.create(
        "dinov2_vitb14_reg",
        weights=str(weights),
        detector=str(sibling(stem, "_detector.pt")),
        num_local=meta["topk"],
        imsize=meta["imsize"],
        embed_dim=vit["embed_dim"],
        depth=vit["depth"],
        num_heads=vit["num_heads"],
        num_registers=vit["num_register_tokens"],
    )


def sibling(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


@pytest.fixture(scope="module")
def golden(extract_golden_stem):
    stem = extract_golden_stem
    meta = json.loads(stem.with_suffix(".json").read_text())
    arrays = dict(np.load(stem.with_suffix(".npz")))
    extractor = build(stem, meta, sibling(stem, "_dinov2.pth"))
    images = [load_image(sibling(stem, "_images") / n) for n in meta["images"]]
    return stem, meta, arrays, extractor, images


def rel_bound(meta: dict) -> float:
    """float32 bound on the extraction's error, relative to each output's scale.

    8 chained reductions per ViT block plus 5 outside (patch embedding, position resize, final
    LayerNorm, detector conv1 + BN, conv2), each over at most max(3 p^2 patch pixels, MLP width,
    tokens) terms: :func:`float32_bound`. For extract_small (depth 2, 588 terms) that is 3.0e-5;
    measured on an AMD EPYC over ATEN_CPU_CAPABILITY=default|avx2 x MKL_CBWR=COMPATIBLE|AVX and 1
    or 2 threads: at most 4.8e-7 of the detector weights' scale (~130), 1.5e-7 on unit vectors.
    """
    vit, p = meta["vit"], meta["patch_size"]
    tokens = 1 + vit["num_register_tokens"] + (meta["imsize"] // p) ** 2
    terms = max(3 * p * p, vit["embed_dim"] * vit["mlp_ratio"], tokens)
    return float32_bound(8 * vit["depth"] + 5, terms)


def check(extractor, meta, arrays, images, split, indices=None, batch_of=None):
    """Extract ``split`` (every image, or ``indices`` in one batch) and compare with the file."""
    box = tuple(meta["query_bbx"]) if split == "query" else None
    rel = rel_bound(meta)
    indices = range(len(images)) if indices is None else indices
    xs = {i: extractor.preprocess(images[i], box) for i in indices}
    for i, x in xs.items():
        assert list(x.shape[1:]) == meta["resized_sizes"][split][i]
    if batch_of is None:
        found = [(i, extractor.extract_batch(x[None])[0]) for i, x in xs.items()]
    else:
        found = zip(batch_of, extractor.extract_batch(torch.stack([xs[i] for i in batch_of])))
    for i, feats in found:
        what = f"{split} image {i}"
        assert_rows_match(feats.local.to_rows(), arrays[f"{split}_local"][i], rel, what)
        assert_close(feats.global_desc, arrays[f"{split}_glob"][i], rel, f"{what} global")
        assert_close(feats.extra["cls"], arrays[f"{split}_cls"][i], rel, f"{what} CLS")


@pytest.mark.parametrize("split", ["gallery", "query"])
def test_reproduces_official_rows_globals_and_sizes(golden, split):
    _, meta, arrays, extractor, images = golden
    check(extractor, meta, arrays, images, split)


def test_timm_layout_of_the_same_weights_reproduces_it_too(golden, tmp_path):
    """The golden hub file rewritten by hand in timm's layout (as timm's HF files store it)."""
    stem, meta, arrays, _, images = golden
    hub = torch.load(sibling(stem, "_dinov2.pth"), weights_only=True)
    timm = {k: v for k, v in hub.items() if k not in ("mask_token", "register_tokens")}
    timm["cls_token"] = hub["cls_token"] + hub["pos_embed"][:, :1]
    timm["pos_embed"] = hub["pos_embed"][:, 1:].contiguous()
    timm["reg_token"] = hub["register_tokens"]
    save_file(timm, tmp_path / "model.safetensors")
    check(build(stem, meta, tmp_path), meta, arrays, images, "query")


def test_a_batch_gives_the_rows_of_single_images(golden):
    """Batched matmuls round differently but stay within the same float32 bound.

    Gallery images of one resized size go in one batch, with the first of them again at the end
    so that every batch has two images whatever the file's sizes.
    """
    _, meta, arrays, extractor, images = golden
    by_size = defaultdict(list)
    for i, size in enumerate(meta["resized_sizes"]["gallery"]):
        by_size[tuple(size)].append(i)
    for same_size in by_size.values():
        batch = [*same_size, same_size[0]]
        check(extractor, meta, arrays, images, "gallery", same_size, batch_of=batch)
