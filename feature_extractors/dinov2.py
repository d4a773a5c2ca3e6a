"""DINOv2 ViT-B/14 with 4 registers + the AMES detector: the paper's default extractor.

Architecture: timm's ``vit_base_patch14_reg4_dinov2`` (LayerScale, 4 register tokens, position
table on the 37x37 grid of 518 px inputs). Weights load strictly from either layout:

* torch-hub (``dinov2_vitb14_reg4_pretrain.pth``): ``cls_token``, ``pos_embed [1, 1 + 37*37, D]``,
  ``register_tokens``, ``mask_token`` (training only, dropped), ``blocks.*``; remapped to timm
  names by folding the CLS position into ``cls_token`` (the hub adds it in every forward, the
  same float32 sum);
* timm / Hugging Face (``timm/vit_base_patch14_reg4_dinov2.lvd142m``): loaded as is.

The forward is our own so that the position table is resized exactly as the hub model does for
non-518 inputs (bicubic, antialiased, straight to the target grid, i.e. offset 0), whatever
timm's resampling default is. Patch tokens and CLS come after the final LayerNorm; registers
are dropped.

Outputs follow the official extraction (reference-spec §2.3-2.6): the detector turns every patch
token into a unit descriptor and a weight; the top-K tokens by weight become local rows
``[(14r+7)/H', (14c+7)/W', 0, 0, weight, descriptor]`` (padded rows when fewer than K tokens);
the global descriptor is the normalised detector-weighted mean of ALL patch descriptors;
``extra["cls"]`` is the normalised CLS token.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from locore.core.device import autocast
from locore.core.errors import UserError
from locore.core.weights import RANDOM, load_state, load_strict
from locore.feature_extractors.base import Extractor, ImageFeatures, LocalFeatures
from locore.feature_extractors.detector import build_detector
from locore.feature_extractors.preprocess import (
    axis_factor,
    base_scale,
    check_min_side,
    crop_box,
    cv2_resize,
    to_tensor,
)

logger = logging.getLogger(__name__)

HF_ID = "timm/vit_base_patch14_reg4_dinov2.lvd142m"
HUB_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
TIMM_ARCH = "vit_base_patch14_reg4_dinov2"
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_vit(
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    num_registers: int = 4,
    patch_size: int = 14,
    img_size: int = 518,
) -> nn.Module:
    """timm ViT with the DINOv2-reg architecture (defaults = ViT-B/14, 4 registers), no head."""
    import timm

    return timm.create_model(
        TIMM_ARCH,
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,  # any multiple of the patch size; the table is resized below
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        reg_tokens=num_registers,
    )


def hub_position_embedding(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Patch position table ``[1, S*S, D]`` resized to ``[1, rows*cols, D]`` like the hub model.

    Bicubic with antialiasing, output size given directly (interpolate_offset 0), computed in
    float32 (float64 tables stay float64); returned unchanged for the native square grid.
    """
    side = math.isqrt(pos_embed.shape[1])
    if rows == cols == side:
        return pos_embed
    grid = pos_embed.to(torch.promote_types(pos_embed.dtype, torch.float32))
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(pos_embed.dtype)


def vit_tokens(vit: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 3, H, W]`` (sides multiples of the patch) -> (CLS ``[B, D]``, patch tokens
    ``[B, H/p * W/p, D]`` in row-major grid order), both after the final LayerNorm."""
    x = vit.patch_embed(images)  # [B, H/p, W/p, D]
    b, rows, cols, dim = x.shape
    x = x.reshape(b, rows * cols, dim) + hub_position_embedding(vit.pos_embed, rows, cols).to(
        x.dtype
    )
    prefix = [vit.cls_token.expand(b, -1, -1)]
    if vit.reg_token is not None:
        prefix.append(vit.reg_token.expand(b, -1, -1))
    x = vit.norm(vit.blocks(vit.norm_pre(torch.cat(prefix + [x], dim=1))))
    return x[:, 0], x[:, vit.num_prefix_tokens :]


def timm_layout(state: dict) -> dict:
    """Torch-hub key layout -> timm names; a timm-layout dict is returned unchanged."""
    if "register_tokens" not in state and "mask_token" not in state:
        return dict(state)
    out = {k: v for k, v in state.items() if k not in ("register_tokens", "mask_token")}
    if "register_tokens" in state:
        out["reg_token"] = state["register_tokens"]
    if "cls_token" in state and "pos_embed" in state:
        out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        out["pos_embed"] = state["pos_embed"][:, 1:]
    return out


def load_vit(vit: nn.Module, source: str | Path, cache_dir: str | Path | None = None) -> None:
    """Load hub- or timm-layout weights (file, folder, HF id or URL) strictly into ``vit``."""
    state = load_state(source, "DINOv2 weights", ("model", "state_dict"), cache_dir=cache_dir)
    load_strict(vit, timm_layout(state), f"DINOv2 weights {source}", optional=())


class DinoV2Extractor(Extractor):
    """DINOv2 + AMES detector: detector-weighted global, CLS and top-K local descriptors."""

    def __init__(
        self,
        vit: nn.Module,
        detector: nn.Module,
        num_local: int = 700,
        imsize: int | None = 770,
        dtype: str = "fp32",
        min_side: int = 14,
    ):
        super().__init__()
        if dtype not in AUTOCAST:
            raise UserError(f"dtype {dtype!r} is not one of {sorted(AUTOCAST)}; pick one")
        self.vit, self.detector = vit, detector
        self.patch = vit.patch_embed.patch_size[0]
        self.num_local, self.imsize, self.dtype, self.min_side = num_local, imsize, dtype, min_side
        self.global_dim = self.local_dim = vit.embed_dim
        self.eval()

    def preprocess(self, image: np.ndarray, box: tuple[float, ...] | None = None) -> torch.Tensor:
        """RGB image (and query box) -> ImageNet-normalised RGB ``[3, 14a, 14b]`` (spec §2.2)."""
        s = base_scale(image.shape, self.imsize)
        crop = crop_box(image, box)
        check_min_side(crop.shape, s, self.min_side, "DINOv2 (one 14 px patch)")
        h, w = crop.shape[:2]
        resized = cv2_resize(crop, axis_factor(w, s, self.patch), axis_factor(h, s, self.patch))
        return to_tensor(resized)

    @torch.inference_mode()
    def extract_batch(self, images: torch.Tensor) -> list[ImageFeatures]:
        """``[B, 3, H', W']`` -> features; ViT under the chosen autocast, detector in float32."""
        dtype = AUTOCAST[self.dtype]
        with autocast(images.device, dtype):
            cls, patches = vit_tokens(self.vit, images)
        desc, weight = self.detector(patches.float())
        # Official: normalise per scale, then the mean over the (single) scale again.
        pooled = F.normalize(F.normalize((weight.unsqueeze(-1) * desc).mean(1), dim=-1), dim=-1)
        cls = F.normalize(F.normalize(cls.float(), dim=-1), dim=-1)
        _, _, h, w = images.shape
        positions, scale_ids = patch_positions(h, w, self.patch, desc.device)
        pooled, cls = pooled.cpu().numpy(), cls.cpu().numpy()
        return [
            ImageFeatures(
                global_desc=pooled[i],
                local=LocalFeatures.from_topk(
                    desc[i], weight[i], positions, scale_ids, self.num_local
                ),
                size=(int(h), int(w)),
                extra={"cls": cls[i]},
            )
            for i in range(images.shape[0])
        ]


def patch_positions(
    h: int, w: int, patch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major ``((p r + p/2) / H, (p c + p/2) / W)`` float32 ``[N, 2]`` and scale ids 0."""
    rows, cols = h // patch, w // patch
    r = (torch.arange(rows, device=device) * patch + patch / 2).repeat_interleave(cols)
    c = (torch.arange(cols, device=device) * patch + patch / 2).repeat(rows)
    positions = torch.stack([r / h, c / w], dim=1)
    return positions, torch.zeros(rows * cols, dtype=torch.int64, device=device)


def dinov2_vitb14_reg(
    weights: str | None = HF_ID,
    detector: str | None = None,
    num_local: int = 700,
    imsize: int | None = 770,
    dtype: str = "fp32",
    device: str = "cpu",
    cache_dir: str | None = None,
    min_side: int = 14,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    num_registers: int = 4,
) -> DinoV2Extractor:
    """DINOv2 ViT-B/14 (4 registers) + AMES detector, preprocessing as the official extraction.

    Args:
        weights: torch-hub ``.pth`` (e.g. :data:`HUB_URL`), timm-layout file or folder, HF id
            (default, downloaded once), or "random" (tests, speed benchmarks).
        detector: AMES ``dinov2_detector.pt`` (path / URL / HF id), "random", or None for the
            official no-detector fallback (raw tokens weighted by their norm; not LoCoRe's).
        num_local: rows K stored per image (700 official; LoCoRe reads the first 48).
        imsize: long side of the full image after resizing (770 official; None = native).
        dtype: "fp32" (exact, default), or "bf16" / "fp16" autocast for the ViT (GPU).
        device: torch device.
        cache_dir: download cache for hub ids and URLs.
        min_side: images whose scaled short side is below this many pixels are rejected
            (the official code would stretch them to one 14 px patch).
        embed_dim, depth, num_heads, num_registers: architecture (defaults = ViT-B/14-reg4).

    Example:
        >>> import feature_extractors
        >>> ex = feature_extractors.create(
        ...     "dinov2_vitb14_reg", weights="dinov2_vitb14_reg4_pretrain.pth",
        ...     detector="dinov2_detector.pt")  # doctest: +SKIP
    """
    vit = build_vit(embed_dim, depth, num_heads, num_registers)
    if weights is None:
        raise UserError("dinov2_vitb14_reg needs weights: a file, HF id, URL or 'random'")
    if weights != RANDOM:
        load_vit(vit, weights, cache_dir)
    det = build_detector(detector, embed_dim, cache_dir)
    return DinoV2Extractor(vit, det, num_local, imsize, dtype, min_side).to(device)
