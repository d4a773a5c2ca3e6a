"""Every registered extractor and re-ranker keeps the stage contract (as timm tests its models).

Each name is built with random weights at a tiny size and run once: output types, shapes and
dtypes as ``feature_extractors/base.py`` and ``rerank/base.py`` document them, and a save/load
round trip of whatever weights the model has. A new registry entry is tested without a new test.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from extract_helpers import one_torch_thread
from float_bounds import assert_close, float32_bound
from rerank_helpers import collection

from locore import feature_extractors, rerank
from locore.core.layout import NUM_META
from locore.core.resources import CONFIG_ROOT
from locore.feature_extractors.base import ImageFeatures, LocalFeatures
from locore.rerank.base import RerankResult
from locore.rerank.locore.model import build_model
from locore.rerank.locore.reranker import LocoreOptions, LocoreReranker

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

K = 8  # local rows per image
# Tiny options per factory family (the name fixes depth and kind). Full widths are kept; the
# ResNets and DELG run one image scale at <= 96 px (SuperGlobal needs 65); DINOv2 is cut to 1
# block of 48-D (full ViT-B/14 random init alone takes seconds).
TINY = {
    "efficientnet": {"weights": None, "imsize": 64},  # None: timm's random init
    "dinov2": {"weights": "random", "detector": "random", "imsize": 56, "embed_dim": 48}
    | {"depth": 1, "num_heads": 3},
    "cvnet": {"weights": "random", "detector": "random", "scales": (1.0,), "max_size": 96},
    "superglobal": {"weights": "random", "detector": "random", "scales": (1.0,), "max_size": 96},
    "delg": {"weights": "random", "imsize": 96, "local_scales": (1.0,), "global_scales": (1.0,)},
}
LOCORE_PRESETS = sorted(
    p.stem.removeprefix("locore_") for p in (CONFIG_ROOT / "rerankers").glob("locore_*.yaml")
)


def tiny_extractor(name: str, seed: int):
    torch.manual_seed(seed)
    family = next(f for f in TINY if name.startswith(f))
    return feature_extractors.create(name, num_local=K, **TINY[family])


def extract(extractor, images: list[np.ndarray]) -> list[ImageFeatures]:
    with torch.no_grad():
        return extractor.extract_batch(torch.stack([extractor.preprocess(im) for im in images]))


@pytest.mark.parametrize("name", feature_extractors.available())
def test_extractor_contract(name):
    extractor = tiny_extractor(name, seed=0)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (72, 96, 3), dtype=np.uint8) for _ in range(2)]
    x = extractor.preprocess(images[0])
    assert x.dtype == torch.float32 and x.ndim == 3 and x.shape[0] == 3
    feats = extract(extractor, images)
    assert len(feats) == 2
    for f in feats:
        assert isinstance(f, ImageFeatures) and isinstance(f.local, LocalFeatures)
        assert f.size == tuple(x.shape[1:])
        assert f.global_desc.shape == (extractor.global_dim,)
        assert f.global_desc.dtype == np.float32
        unit = float32_bound(2, extractor.global_dim)  # the norm and the division, in float32
        assert_close(np.linalg.norm(f.global_desc), 1.0, unit, f"{name} global norm")
        loc = f.local
        assert loc.desc.shape == (K, extractor.local_dim) and loc.desc.dtype == np.float32
        assert loc.positions.shape == (K, 2) and loc.positions.dtype == np.float32
        assert loc.scale_ids.shape == (K,) and loc.scale_ids.dtype == np.int64
        assert loc.mask.shape == (K,) and loc.mask.dtype == np.bool_
        assert loc.weights.shape == (K,) and loc.weights.dtype == np.float32
        valid = ~loc.mask
        norms = np.linalg.norm(loc.desc[valid], axis=1)  # unit rows; padding is zero
        assert_close(norms, np.ones_like(norms), float32_bound(2, extractor.local_dim), "norms")
        assert not loc.desc[~valid].any() and not loc.weights[~valid].any()
        rows = loc.to_rows()
        assert rows.shape == (K, NUM_META + extractor.local_dim) and rows.dtype == np.float32
        again = LocalFeatures.from_rows(rows)
        assert all(np.array_equal(getattr(again, a), getattr(loc, a)) for a in vars(loc))
        for extra in f.extra.values():
            assert extra.dtype == np.float32 and extra.ndim == 1


@pytest.mark.parametrize("name", feature_extractors.available())
def test_extractor_state_round_trip(name):
    """Saved weights loaded into another random instance give the same features bit for bit:
    every tensor that shapes the output is in the state dict."""
    extractor, other = tiny_extractor(name, seed=0), tiny_extractor(name, seed=1)
    state = extractor.state_dict()
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    image = [np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)]
    a, b = extract(extractor, image)[0], extract(other, image)[0]
    assert np.array_equal(a.global_desc, b.global_desc)
    assert np.array_equal(a.local.to_rows(), b.local.to_rows())


def check_result(result: RerankResult, shortlist) -> None:
    q, m = shortlist.ids.shape
    assert isinstance(result, RerankResult)
    assert result.ids.shape == result.scores.shape == result.before.shape == (q, m)
    assert result.ids.dtype == result.before.dtype == np.int64
    assert result.scores.dtype == np.float32
    np.testing.assert_array_equal(result.before, shortlist.ids)
    np.testing.assert_array_equal(np.sort(result.ids, 1), np.sort(shortlist.ids, 1))


def reranker_cases() -> list[tuple[str, str | None]]:
    """(registered name, LoCoRe preset) pairs: every LoCoRe preset under each LoCoRe name."""
    return [
        (name, preset)
        for name in rerank.available()
        for preset in (LOCORE_PRESETS if name.startswith("locore") else [None])
    ]


@pytest.mark.parametrize("name, preset", reranker_cases())
def test_reranker_contract_and_checkpoint_round_trip(name, preset, tmp_path):
    """LoCoRe presets keep their widths but run 1 layer with a 16-token attention window (the
    presets' 512 pads every window to 512 tokens: 8 s a call on CPU); the checkpoint written by
    ``save_pretrained`` and read through the registry re-ranks exactly as the model in memory."""
    if preset is None:
        queries, shortlist, database = collection(num_db=30, num_q=3)
        check_result(rerank.create(name).rerank(queries, shortlist, database), shortlist)
        return
    torch.manual_seed(0)
    model = build_model(preset, num_layers=1, attention_window=16)
    model.save_pretrained(tmp_path)
    cfg = model.config
    queries, shortlist, database = collection(
        num_db=30, num_q=3, dim=cfg.local_dim, gdim=cfg.global_dim
    )
    options = {"topk": 12, "window": 6, "stride": 3, "num_local": 4, "batch_size": 2}
    stage = rerank.create(name, checkpoint=str(tmp_path), device="cpu", **options)
    assert stage.model.config == cfg
    loaded = stage.model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())
    result = stage.rerank(queries, shortlist, database)
    check_result(result, shortlist)
    in_memory = LocoreReranker(model, LocoreOptions(**options))
    expected = in_memory.rerank(queries, shortlist, database)
    np.testing.assert_array_equal(result.ids, expected.ids)
    np.testing.assert_array_equal(result.scores, expected.scores)
