"""DINOv2 extractor vs an independent float64 ViT and the spec formulas (tiny random weights).

Checkpoints are written by the test in the torch-hub key layout (and converted by the test to the
timm layout); the reference forward, the antialiased bicubic position resize (PIL's algorithm),
the per-token detector and the top-K rows are all re-implemented here from their definitions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from extract_helpers import (
    assert_rows_match,
    detector_state,
    normalize,
    one_torch_thread,
    spec_detector,
    spec_rows,
)
from float_bounds import U32, assert_close, assert_close_to_scale, float32_bound
from safetensors.torch import save_file

from locore import feature_extractors
from locore.core.errors import UserError
from locore.feature_extractors.dinov2 import hub_position_embedding, vit_tokens

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

D, DEPTH, HEADS, REG, PATCH, GRID = 48, 2, 3, 4, 14, 37  # GRID: 518 px / 14


def hub_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ViT weights under the torch-hub ``dinov2_vitb14_reg4_pretrain.pth`` keys."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {
        "cls_token": rnd(1, 1, D, scale=1.0),
        "pos_embed": rnd(1, 1 + GRID * GRID, D, scale=1.0),
        "register_tokens": rnd(1, REG, D, scale=1.0),
        "mask_token": rnd(1, D),
        "patch_embed.proj.weight": rnd(D, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": rnd(D),
        "norm.weight": 1 + rnd(D),
        "norm.bias": rnd(D),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        state |= {
            b + "norm1.weight": 1 + rnd(D),
            b + "norm1.bias": rnd(D),
            b + "attn.qkv.weight": rnd(3 * D, D, scale=D**-0.5),
            b + "attn.qkv.bias": rnd(3 * D),
            b + "attn.proj.weight": rnd(D, D, scale=D**-0.5),
            b + "attn.proj.bias": rnd(D),
            b + "ls1.gamma": rnd(D, scale=0.5),
            b + "norm2.weight": 1 + rnd(D),
            b + "norm2.bias": rnd(D),
            b + "mlp.fc1.weight": rnd(4 * D, D, scale=D**-0.5),
            b + "mlp.fc1.bias": rnd(4 * D),
            b + "mlp.fc2.weight": rnd(D, 4 * D, scale=(4 * D) ** -0.5),
            b + "mlp.fc2.bias": rnd(D),
            b + "ls2.gamma": rnd(D, scale=0.5),
        }
    return state


def aa_bicubic(n_in: int, n_out: int, a: float = -0.5) -> np.ndarray:
    """PIL's antialiased bicubic resampling matrix ``[n_out, n_in]`` (half-pixel centres; the
    kernel is widened by the scale when shrinking)."""
    scale = n_in / n_out
    support, inv = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        for j in range(max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)):
            x = abs((j - centre + 0.5) * inv)
            if x < 1:
                m[i, j] = ((a + 2) * x - (a + 3)) * x * x + 1
            elif x < 2:
                m[i, j] = (((x - 5) * x + 8) * x - 4) * a
        m[i] /= m[i].sum()
    return m


def official_pos(pos_patch: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Hub rule (reference-spec §2.3): the 37x37 table resized to (rows, cols), no offset."""
    grid = pos_patch.reshape(GRID, GRID, -1)
    out = np.einsum("ri,ijd,cj->rcd", aa_bicubic(GRID, rows), grid, aa_bicubic(GRID, cols))
    return out.reshape(rows * cols, -1)


def reference_tokens(state: dict, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The hub DINOv2 forward in float64 from first principles -> (CLS, patch tokens)."""
    s = {k: v.double() for k, v in state.items()}
    x = x.double()
    b, _, h, w = x.shape
    rows, cols = h // PATCH, w // PATCH
    patches = F.unfold(x, PATCH, stride=PATCH).transpose(1, 2)  # [B, N, 3*14*14], row-major
    t = patches @ s["patch_embed.proj.weight"].reshape(D, -1).T + s["patch_embed.proj.bias"]
    pos = torch.from_numpy(official_pos(s["pos_embed"][0, 1:].numpy(), rows, cols))
    t = torch.cat([s["cls_token"].expand(b, -1, -1) + s["pos_embed"][:, :1], t + pos], 1)
    t = torch.cat([t[:, :1], s["register_tokens"].expand(b, -1, -1), t[:, 1:]], 1)

    def ln(v: torch.Tensor, name: str) -> torch.Tensor:
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6) * s[name + ".weight"] + s[name + ".bias"]

    hd = D // HEADS
    for i in range(DEPTH):
        p = f"blocks.{i}."
        qkv = ln(t, p + "norm1") @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(b, -1, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(b, -1, D)
        t = t + s[p + "ls1.gamma"] * (attn @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"])
        hid = ln(t, p + "norm2") @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"]
        hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))
        t = t + s[p + "ls2.gamma"] * (hid @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"])
    t = ln(t, "norm")
    return t[:, 0].numpy(), t[:, 1 + REG :].numpy()


def timm_layout_by_hand(state: dict) -> dict:
    """What timm's HF files hold: CLS position folded into cls_token, registers as reg_token."""
    out = {k: v for k, v in state.items() if k not in ("mask_token", "register_tokens")}
    out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    out["pos_embed"] = state["pos_embed"][:, 1:].contiguous()
    out["reg_token"] = state["register_tokens"]
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    torch.save(hub_state(), folder / "hub.pth")
    save_file(timm_layout_by_hand(hub_state()), folder / "timm.safetensors")
    torch.save({"state": detector_state(D, seed=3)}, folder / "detector.pt")
    return folder


def make(files, weights: str = "hub.pth", **options):
    options = {"num_local": 20, "imsize": 224, "detector": str(files / "detector.pt"), **options}
    return feature_extractors.create(
        "dinov2_vitb14_reg",
        weights=str(files / weights),
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        **options,
    )


def test_position_table_resize_equals_the_hub_formula():
    """Bicubic + antialias, size given directly (offset 0): the arithmetic equals PIL's algorithm
    written above. float64: 1e-12 of the table's scale (~1e4 u64). float32: the taps are cubic
    weights (slope <= 1.5) at float32 coordinates up to 37 (error 37 u), and each output of the
    two separable passes sums 4 kernel-widths of them: 2 x 4 x 1.5 x 37 u = 2.6e-5 of the scale
    (measured 4e-6)."""
    pos = torch.randn(1, GRID * GRID, 8, dtype=torch.float64)
    for rows, cols in [(7, 9), (16, 11), (55, 41), (37, 40)]:
        want = official_pos(pos[0].numpy(), rows, cols)
        assert_close_to_scale(hub_position_embedding(pos, rows, cols)[0], want, 1e-12, "f64")
        got32 = hub_position_embedding(pos.float(), rows, cols)[0]
        assert got32.dtype == torch.float32
        assert_close_to_scale(got32, want, 2 * 4 * 1.5 * GRID * U32, "float32")
    assert hub_position_embedding(pos, GRID, GRID) is pos
    # The pre-register DINOv2 rule (scale factor with +0.1 offset, no antialias) is different.
    table = pos[0].reshape(1, GRID, GRID, 8).permute(0, 3, 1, 2)
    legacy = F.interpolate(table, scale_factor=(7.1 / GRID, 9.1 / GRID), mode="bicubic")
    legacy = legacy.permute(0, 2, 3, 1).reshape(63, 8).numpy()
    assert np.abs(legacy - official_pos(pos[0].numpy(), 7, 9)).max() > 1e-2


# float32 bound of the ViT (8 reductions per block, patch embedding, position resize, final LN;
# <= 3 x 14 x 14 = 588 terms each): 2.7e-5 of the outputs' scale.
VIT_REL = float32_bound(8 * DEPTH + 3, 3 * PATCH * PATCH)
# ... and of the extraction (+ detector conv1 + BN, conv2): 3.0e-5.
EXTRACT_REL = float32_bound(8 * DEPTH + 5, 3 * PATCH * PATCH)


@pytest.mark.parametrize("hw", [(98, 126), (532, 546)])  # shrink / enlarge the 37x37 table
def test_vit_tokens_match_an_independent_forward(files, hw):
    """float32 against float64: within ``VIT_REL`` of the tokens' scale."""
    extractor = make(files)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
    with torch.no_grad():
        cls, patches = vit_tokens(extractor.vit, x)
    want_cls, want_patches = reference_tokens(hub_state(), x)
    assert_close_to_scale(cls, want_cls, VIT_REL, "CLS")
    assert_close_to_scale(patches, want_patches, VIT_REL, "patch tokens")


def test_timm_layout_file_loads_to_the_same_model(files):
    """Only the CLS position is added before the forward instead of in it: one rounding, carried
    through the ViT (``VIT_REL``)."""
    x = torch.randn(1, 3, 70, 84)
    with torch.no_grad():
        hub = vit_tokens(make(files).vit, x)
        timm = vit_tokens(make(files, "timm.safetensors").vit, x)
    for ours, ref, what in zip(timm, hub, ("CLS", "patch tokens")):
        assert_close_to_scale(ours, ref, VIT_REL, what)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("blocks.1.ls2.gamma"), "missing 1 keys .*blocks.1.ls2.gamma"),
        (lambda s: s.update({"blocks.2.norm1.weight": torch.ones(D)}), "unexpected.*blocks.2"),
        (lambda s: s.update({"norm.bias": torch.zeros(D + 1)}), "shape mismatch.*norm.bias"),
    ],
)
def test_strict_loading_lists_the_bad_keys(tmp_path, edit, message):
    state = hub_state()
    edit(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=message):
        feature_extractors.create(
            "dinov2_vitb14_reg",
            weights=str(tmp_path / "bad.pth"),
            detector="random",
            embed_dim=D,
            depth=DEPTH,
            num_heads=HEADS,
        )


def test_extraction_matches_the_spec_formulas(files):
    """Rows, global and CLS vs: reference ViT -> per-token detector -> manual top-K (§2.3-2.6),
    within ``EXTRACT_REL`` of each output's scale (float32 against float64)."""
    extractor = make(files, num_local=20)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    x = extractor.preprocess(image)
    feats = extractor.extract_batch(x[None])[0]
    h, w = x.shape[1:]
    assert (h, w) == feats.size == (168, 224)
    cls, patches = reference_tokens(hub_state(), x[None])
    desc, weight = spec_detector(detector_state(D, seed=3), patches[0])
    rows, cols = h // PATCH, w // PATCH
    r, c = np.divmod(np.arange(rows * cols), cols)
    positions = np.stack([(14 * r + 7) / h, (14 * c + 7) / w], 1)
    want = spec_rows(desc, weight, positions, np.zeros(rows * cols), 20)
    assert_rows_match(feats.local.to_rows(), want, EXTRACT_REL, "rows")
    want_global = normalize((weight[:, None] * desc).mean(0))
    assert_close(feats.global_desc, want_global, EXTRACT_REL, "global")
    assert_close(feats.extra["cls"], normalize(cls[0]), EXTRACT_REL, "CLS")


def test_small_query_crop_gives_padded_rows(files):
    extractor = make(files, num_local=48, imsize=770)
    image = np.full((768, 1024, 3), 128, np.uint8)
    feats = extractor.extract(image, (100, 200, 190, 290))  # 90 px crop -> 5 x 5 = 25 tokens
    assert feats.size == (70, 70)
    assert not feats.local.mask[:25].any() and feats.local.mask[25:].all()
    rows = feats.local.to_rows()
    assert (rows[25:, 3] == 1).all() and not rows[25:, [0, 1, 2, 4]].any()
    assert not rows[25:, 5:].any()


def test_bf16_autocast_stays_close_and_bad_dtype_is_rejected(files):
    x = make(files).preprocess(np.random.default_rng(1).integers(0, 256, (100, 140, 3), np.uint8))
    fp32 = make(files).extract_batch(x[None])[0]
    bf16 = make(files, dtype="bf16").extract_batch(x[None])[0]
    assert float(fp32.global_desc @ bf16.global_desc) > 0.99
    assert not np.array_equal(fp32.global_desc, bf16.global_desc)
    with pytest.raises(UserError, match="dtype"):
        make(files, dtype="int8")


def test_without_detector_the_official_fallback_is_used(files):
    """Weights are the token norms, within ``VIT_REL`` of the largest."""
    extractor = make(files, detector=None, num_local=5, imsize=112)
    x = extractor.preprocess(np.full((100, 100, 3), 60, np.uint8))
    feats = extractor.extract_batch(x[None])[0]
    _, patches = reference_tokens(hub_state(), x[None])
    norms = np.linalg.norm(patches[0], axis=1)
    assert_close_to_scale(feats.local.weights, np.sort(norms)[::-1][:5], VIT_REL, "weights")
