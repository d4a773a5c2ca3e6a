"""DINOv2 ViT-B/14 with 4 registers + the AMES detector: the paper's default extractor.

The ViT's parameter names are those of the torch-hub checkpoint
(``dinov2_vitb14_reg4_pretrain.pth``), so hub files load strictly with no renaming; timm /
Hugging Face weights (``timm/vit_base_patch14_reg4_dinov2.lvd142m``) are remapped on load.
Position embeddings are resized for non-518 inputs exactly like the hub model (bicubic with
antialiasing, target size given directly, i.e. interpolation offset 0), not like timm's default.

Outputs follow the official extraction (reference-spec §2.3-2.6): patch tokens after the final
LayerNorm go through the detector; the top-K tokens by detector weight become local rows
``[(14r+7)/H', (14c+7)/W', 0, padding flag, weight, descriptor]``; the global descriptor is the
normalised detector-weighted mean of ALL patch descriptors; ``extra["cls"]`` is the normalised CLS.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from feature_extractors.base import Extractor, ImageFeatures, LocalFeatures
from feature_extractors.detector import Detector, load_detector, strict_load
from feature_extractors.preprocess import official_resize, to_tensor

logger = logging.getLogger(__name__)

HF_ID = "timm/vit_base_patch14_reg4_dinov2.lvd142m"


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale (hub names: norm1, attn.qkv, ls1.gamma, ...)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.ls1.gamma * self.attn.proj(a)
        h = self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))
        return x + self.ls2.gamma * h


class DinoViT(nn.Module):
    """DINOv2 ViT with register tokens, torch-hub parameter layout."""

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 14,
        img_size: int = 518,
        num_registers: int = 4,
    ):
        super().__init__()
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.num_registers = num_registers

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """``[1, 1 + rows*cols, D]``: the hub's bicubic + antialias resize of the patch table."""
        pos = self.pos_embed.float()
        n = pos.shape[1] - 1
        side = int(round(n**0.5))
        if rows == cols == side:
            return pos
        table = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(rows, cols), mode="bicubic", antialias=True)
        return torch.cat([pos[:, :1], table.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` -> (CLS ``[B, D]``, patch tokens ``[B, H/14 * W/14, D]``), both after
        the final LayerNorm; register tokens are dropped."""
        b, _, h, w = x.shape
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1)
        tokens = tokens + self.position_embedding(h // self.patch_size, w // self.patch_size)
        registers = self.register_tokens.expand(b, -1, -1)
        tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], 1)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens[:, 0], tokens[:, 1 + self.num_registers :]


def from_timm_layout(state: dict) -> dict:
    """timm/HF names -> hub names (timm folds the CLS position into ``cls_token``)."""
    if "reg_token" not in state:
        return state
    state = dict(state)
    state["register_tokens"] = state.pop("reg_token")
    patch_pos = state.pop("pos_embed")
    state["pos_embed"] = torch.cat([torch.zeros_like(patch_pos[:, :1]), patch_pos], 1)
    state.setdefault("mask_token", torch.zeros(1, patch_pos.shape[-1]))
    return state


def load_vit_weights(vit: DinoViT, weights: str | Path) -> None:
    """Load a hub ``.pth``, a safetensors/``.pth`` in timm layout, or a Hugging Face id."""
    path = Path(weights)
    if not path.exists():
        if "/" not in str(weights):
            raise UserError(f"DINOv2 weights {weights} not found; pass a file or a HF id")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(weights), "model.safetensors"))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in from_timm_layout(state).items() if not k.startswith("head.")}
    strict_load(vit, state, f"DINOv2 weights {path}")


class DinoV2Extractor(Extractor):
    """DINOv2 + AMES detector: global, CLS and top-K local descriptors."""

    def __init__(
        self,
        vit: DinoViT,
        detector: Detector,
        num_local: int = 700,
        imsize: int = 770,
        autocast: str | None = None,
    ):
        super().__init__()
        self.vit, self.detector = vit, detector
        self.num_local, self.imsize = num_local, imsize
        self.autocast = autocast
        self.global_dim = self.local_dim = vit.norm.normalized_shape[0]
        self.eval()

    def preprocess(self, image: np.ndarray, box: tuple[float, ...] | None = None) -> torch.Tensor:
        resized = official_resize(image, self.imsize, self.vit.patch_size, box)
        if min(resized.shape[:2]) < self.vit.patch_size:
            raise UserError(
                f"image region resizes to {resized.shape[1]}x{resized.shape[0]} px, "
                "smaller than one 14 px patch; use a larger image or box"
            )
        return to_tensor(resized)

    @torch.inference_mode()
    def extract_batch(self, images: torch.Tensor) -> list[ImageFeatures]:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.autocast or "")
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            cls, patches = self.vit(images)
            desc, weight = self.detector(patches)
        cls, desc, weight = cls.float(), desc.float(), weight.float()
        _, _, h, w = images.shape
        p = self.vit.patch_size
        rows_n, cols_n = h // p, w // p
        r = torch.arange(rows_n, device=desc.device).repeat_interleave(cols_n)
        c = torch.arange(cols_n, device=desc.device).repeat(rows_n)
        positions = torch.stack([(p * r + p / 2) / h, (p * c + p / 2) / w], 1)
        scale_ids = torch.zeros(rows_n * cols_n, dtype=torch.int64)
        pooled = F.normalize((desc * weight.unsqueeze(-1)).mean(1), dim=-1)
        cls = F.normalize(cls, dim=-1)
        return [
            ImageFeatures(
                global_desc=pooled[i].cpu().numpy(),
                local=LocalFeatures.from_topk(
                    desc[i], weight[i], positions, scale_ids, self.num_local
                ),
                size=(int(h), int(w)),
                extra={"cls": cls[i].cpu().numpy()},
            )
            for i in range(images.shape[0])
        ]


def dinov2_vitb14_reg(
    weights: str | None = HF_ID,
    detector: str | None = None,
    num_local: int = 700,
    imsize: int = 770,
    autocast: str | None = None,
    device: str = "cpu",
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
) -> DinoV2Extractor:
    """DINOv2 ViT-B/14 (4 registers) + AMES detector.

    Args:
        weights: hub ``.pth`` / timm-layout file / HF id; None = random (tests, benchmarks).
        detector: ``dinov2_detector.pt`` (AMES release); None = random detector, for tests only.
        num_local: K rows stored per image (700 official; LoCoRe reads 48).
        imsize: long side of the full image after resizing (770 official).
        autocast: None (fp32, exact), "bf16" or "fp16" on GPU.
        embed_dim, depth, num_heads: architecture (defaults = ViT-B).
    """
    vit = DinoViT(embed_dim, depth, num_heads)
    if weights is not None:
        load_vit_weights(vit, weights)
    det = load_detector(detector, embed_dim) if detector is not None else Detector(embed_dim)
    if detector is None:
        logger.warning("no detector file given: the AMES detector has random weights")
    return DinoV2Extractor(vit, det, num_local, imsize, autocast).to(device)
