"""DELG (Cao et al., ECCV 2020) on the pycls ResNet: global GeM+FC and the local branch.

Architecture (superglobal-delg-spec §3; state-dict layout in ``cards/DELG.md``):

* backbone: :class:`locore.feature_extractors.resnet.ResNet` under ``backbone.*``; with
  ``block3_strides`` (TF DELG's export default) the s3 output is subsampled by 2 and s4 runs at
  stride 1, so local features have stride 32;
* autoencoder: ``reduce`` 1x1 conv 1024 -> 128 (linear; the local descriptors), ``expand`` 1x1
  conv 128 -> 1024 followed by ReLU;
* attention: 1x1 conv 1024 -> 512, BN, ReLU, 1x1 conv 512 -> 1, softplus, on the expanded
  features (the AMES detector module with a 512-wide hidden layer, ``attention.*``).

Extraction (spec §3.1-3.2): the image (long side at most ``imsize``, never enlarged) is rescaled
in the model (bilinear, no antialias, sizes rounded) to 7 scales 0.25 ... 2; local features of
every scale with ``attention >= score_threshold`` compete for the top ``num_local`` (1000) by
attention; positions are receptive-field centres (RF 291, padding 145) divided by the scale,
i.e. pixels of the network input; scale id = index in ``local_scales``. The global descriptor
sums the L2-normalised ``fc(GeM(s4))`` of scales 0.7071 / 1 / 1.4142 and L2-normalises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from locore.core.device import autocast
from locore.core.errors import UserError
from locore.core.weights import RANDOM, load_state, load_strict
from locore.feature_extractors.base import Extractor, ImageFeatures, LocalFeatures
from locore.feature_extractors.detector import Detector
from locore.feature_extractors.dinov2 import AUTOCAST
from locore.feature_extractors.preprocess import (
    bgr,
    check_min_side,
    crop_box,
    cv2_resize,
    normalize_pixels,
    to_pixels,
)
from locore.feature_extractors.resnet import (
    BGR_MEAN,
    BGR_STD,
    ResNet,
    bilinear_resize,
    receptive_centres,
)

logger = logging.getLogger(__name__)

LOCAL_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
GLOBAL_SCALES = (0.7071, 1.0, 1.4142)
PIXEL_NORMS = ("tf", "imagenet_bgr")  # TF DELG: RGB (x - 128) / 128; pycls: BGR ImageNet


class Delg(nn.Module):
    """ResNet backbone + DELG autoencoder and attention (layout in ``cards/DELG.md``)."""

    def __init__(
        self,
        depth: int = 50,
        reduction_dim: int = 2048,
        local_dim: int = 128,
        block3_strides: bool = True,
    ):
        super().__init__()
        self.backbone = ResNet(depth, reduction_dim, block3_strides)
        self.autoencoder = nn.Module()
        self.autoencoder.reduce = nn.Conv2d(1024, local_dim, 1)
        self.autoencoder.expand = nn.Conv2d(local_dim, 1024, 1)
        self.attention = Detector(1024, hidden=512)

    @property
    def local_stride(self) -> float:
        """Pixel stride of the local feature map."""
        return 32.0 if self.backbone.block3_strides else 16.0

    def local_features(
        self, s3_pre: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Last s3 residual sum ``[B, 1024, h, w]`` -> (unit descriptors ``[B, N, 128]``,
        attention ``[B, N]``, grid ``(rows, cols)``), row-major over the (subsampled) map."""
        x = F.relu(s3_pre)
        if self.backbone.block3_strides:
            x = x[:, :, ::2, ::2]
        reduced = self.autoencoder.reduce(x)
        expanded = F.relu(self.autoencoder.expand(reduced))
        _, attention = self.attention(expanded.flatten(2).transpose(1, 2))
        desc = F.normalize(reduced.flatten(2).transpose(1, 2), p=2, dim=-1)
        return desc, attention, (x.shape[2], x.shape[3])


def load_delg(
    source: str | Path, depth: int, block3_strides: bool, cache_dir: str | Path | None = None
) -> Delg:
    """A :class:`Delg` sized from the file (FC and descriptor widths), loaded strictly."""
    state = load_state(source, "DELG weights", ("model_state", "state_dict"), cache_dir=cache_dir)
    fc = state.get("backbone.head.fc.weight")
    reduce = state.get("autoencoder.reduce.weight")
    model = Delg(
        depth,
        fc.shape[0] if fc is not None else 2048,
        reduce.shape[0] if reduce is not None else 128,
        block3_strides,
    )
    load_strict(model, state, f"DELG-R{depth} weights {source}")
    return model


class DelgExtractor(Extractor):
    """DELG global + top-K attention-selected local descriptors over an image pyramid."""

    def __init__(
        self,
        model: Delg,
        num_local: int = 1000,
        local_scales: Sequence[float] = LOCAL_SCALES,
        global_scales: Sequence[float] = GLOBAL_SCALES,
        score_threshold: float | None = None,
        imsize: int | None = 1024,
        pixel_norm: str = "tf",
        dtype: str = "fp32",
    ):
        super().__init__()
        if pixel_norm not in PIXEL_NORMS:
            raise UserError(f"pixel_norm {pixel_norm!r} is not one of {list(PIXEL_NORMS)}")
        if dtype not in AUTOCAST:
            raise UserError(f"dtype {dtype!r} is not one of {sorted(AUTOCAST)}; pick one")
        self.model, self.num_local = model, num_local
        self.local_scales = tuple(float(s) for s in local_scales)
        self.global_scales = tuple(float(s) for s in global_scales)
        self.score_threshold, self.imsize = score_threshold, imsize
        self.pixel_norm, self.dtype = pixel_norm, dtype
        self.global_dim = model.backbone.head.fc.out_features
        self.local_dim = model.autoencoder.reduce.out_channels
        self.eval()

    def preprocess(self, image: np.ndarray, box: tuple[float, ...] | None = None) -> torch.Tensor:
        """RGB image (and query box) -> pixel values ``[3, H, W]`` (BGR for ``imagenet_bgr``),
        shrunk by ``imsize / long side`` of the full image when that is below 1."""
        s = 1.0 if self.imsize is None else min(1.0, self.imsize / max(image.shape[:2]))
        crop = crop_box(image, box)
        check_min_side(crop.shape, s, 32, "DELG")
        crop = cv2_resize(crop, s, s)
        return to_pixels(bgr(crop) if self.pixel_norm == "imagenet_bgr" else crop)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel values -> network input under ``pixel_norm``."""
        if self.pixel_norm == "tf":
            return (pixels.float() - 128.0) / 128.0
        return normalize_pixels(pixels, BGR_MEAN, BGR_STD)

    @torch.inference_mode()
    def extract_batch(self, images: torch.Tensor) -> list[ImageFeatures]:
        """``[B, 3, H, W]`` pixels (one size) -> features."""
        device, dtype = images.device, AUTOCAST[self.dtype]
        x = self.normalize(images)
        h, w = x.shape[-2:]
        extra = tuple(s for s in self.global_scales if s not in self.local_scales)
        descs, weights, positions, scale_ids, globals_ = [], [], [], [], []
        for scale in self.local_scales + extra:
            size = (round(h * scale), round(w * scale))
            xs = x if size == (h, w) else bilinear_resize(x, size, antialias=False)
            with autocast(device, dtype):
                s3_pre, s4 = self.model.backbone.forward_maps(xs, full=scale in self.global_scales)
            if s4 is not None:
                g = self.model.backbone.global_head(s4.float())
                globals_.append(F.normalize(g, p=2, dim=-1))
            if scale not in self.local_scales:
                continue
            desc, attention, (rows, cols) = self.model.local_features(s3_pre.float())
            centres = receptive_centres(rows, cols, scale, self.model.local_stride)
            descs.append(desc)
            weights.append(attention)
            positions.append(centres.to(device))
            k = self.local_scales.index(scale)
            scale_ids.append(torch.full((len(centres),), k, dtype=torch.int64, device=device))
        global_desc = F.normalize(torch.stack(globals_).sum(0), p=2, dim=-1).cpu().numpy()
        desc, weight = torch.cat(descs, 1), torch.cat(weights, 1)
        pos, ids = torch.cat(positions), torch.cat(scale_ids)
        out = []
        for i in range(images.shape[0]):
            keep = slice(None)
            if self.score_threshold is not None:
                keep = weight[i] >= self.score_threshold
            local = LocalFeatures.from_topk(
                desc[i][keep], weight[i][keep], pos[keep], ids[keep], self.num_local
            )
            out.append(ImageFeatures(global_desc[i], local, (int(h), int(w))))
        return out


def delg(
    depth: int = 50,
    weights: str | None = None,
    num_local: int = 1000,
    score_threshold: float | None = None,
    imsize: int | None = 1024,
    pixel_norm: str = "tf",
    block3_strides: bool = True,
    local_scales: Sequence[float] = LOCAL_SCALES,
    global_scales: Sequence[float] = GLOBAL_SCALES,
    dtype: str = "fp32",
    device: str = "cpu",
    cache_dir: str | None = None,
) -> DelgExtractor:
    """DELG ResNet-50/101: 2048-D global + top-1000 128-D local descriptors.

    Registered as ``delg_r50`` and ``delg_r101`` (the name fixes ``depth``).

    Args:
        depth: 50 or 101.
        weights: a state dict in the layout of ``cards/DELG.md`` (path / URL / HF id; optionally
            under ``model_state``) or "random". No public PyTorch DELG weights exist.
        num_local: rows K per image (1000 in TF DELG).
        score_threshold: keep only locals with attention >= this before the top-K (TF DELG
            configs: 175.0 R50-GLD, 166.1 R101-GLD, 454.6 R50-GLDv2-clean, 357.48
            R101-GLDv2-clean); None keeps all.
        imsize: largest long side; bigger images are shrunk (1024 in TF DELG).
        pixel_norm: "tf" (RGB, (x - 128) / 128) or "imagenet_bgr" (pycls-trained weights).
        block3_strides: local features at stride 32 (TF DELG) instead of 16.
        local_scales, global_scales: image pyramid for locals (scale id = index) and globals.
        dtype: "fp32" (exact) or "bf16" / "fp16" autocast.
        device: torch device.
        cache_dir: download cache.
    """
    if weights is None:
        raise UserError(
            f"delg_r{depth} needs weights in the layout of feature_extractors/cards/DELG.md "
            "(path, URL or HF id), or 'random'"
        )
    if weights == RANDOM:
        model = Delg(depth, block3_strides=block3_strides)
    else:
        model = load_delg(weights, depth, block3_strides, cache_dir)
    extractor = DelgExtractor(
        model, num_local, local_scales, global_scales, score_threshold, imsize, pixel_norm, dtype
    )
    return extractor.to(device)
