"""pycls ResNet-50/101 with CVNet weights: CVNet and SuperGlobal global descriptors, AMES locals.

Backbone (superglobal-delg-spec §2.1): stem 7x7/2 + BN + ReLU + max-pool 3x3/2, stages ``s1..s4``
of 3/4/6|23/3 bottlenecks (widths 256/512/1024/2048, stride on the 3x3, projection shortcut on
each stage's first block, BN eps 1e-5), head ``head.pool.p`` (GeM power) + ``head.fc``. Parameter
names are CVNet's without the ``encoder_q.`` prefix; :func:`backbone_state` takes a CVNet
checkpoint (``{"model_state": ...}``, re-ranker keys ``conv2ds.*`` / ``cv_learner.*`` skipped) or a
bare state dict and the load is strict.

Input contract (spec §1.2): BGR pixels, ``/ 255``, ImageNet mean/std in BGR order, native
resolution, query crop with ``int()`` truncation.

Descriptors:

* **CVNet global** (reference-spec §2.6): per scale 0.7071 / 1 / 1.4142 (each resized from the
  uint8 image with cv2, INTER_AREA below 1, INTER_LINEAR above), ``fc(GeM_p(s4))`` L2-normalised;
  mean over scales; L2-normalised.
* **SuperGlobal global** (spec §1.3-1.4): the same weights with "relup" clamps (0.014 on s1-s3
  block outputs, and always inside s1); per scale (bilinear resize of the normalised tensor to
  ``int(side * s)``), ``F' = 0.5 rGeM(F) + 0.5 F`` (power mean p = 2.5 over 5x5 windows, reflection
  padding), GeM+ (p = 4.6, eps 1e-8), L2, ``fc``; Scale-GeM = element-wise max of the L2-normalised
  per-scale outputs; L2. 2048-D.
* **Local** (reference-spec §2.8, AMES ``extract_cvnet``): the last s3 block's residual sum
  BEFORE its ReLU (1024-D, stride 16) at the three cv2 scales, through the AMES CVNet detector;
  the top-K tokens over all scales (scale ids 0/1/2) with positions = receptive-field centres
  ``16 (r, c) / scale`` in pixels of the (cropped) input image.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from locore.core.errors import UserError
from locore.core.weights import RANDOM, load_state, load_strict
from locore.feature_extractors.base import Extractor, ImageFeatures, LocalFeatures
from locore.feature_extractors.detector import build_detector
from locore.feature_extractors.dinov2 import AUTOCAST
from locore.feature_extractors.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    bgr,
    check_min_side,
    crop_box,
    cv2_resize,
    normalize_pixels,
    to_pixels,
)

logger = logging.getLogger(__name__)

STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_WIDTHS = ((64, 256), (128, 512), (256, 1024), (512, 2048))  # (bottleneck, output)
CVNET_SCALES = (0.7071, 1.0, 1.4142)
BGR_MEAN, BGR_STD = IMAGENET_MEAN[::-1], IMAGENET_STD[::-1]
RELUP = 0.014  # SuperGlobal's activation floor
# Receptive field of the stride-16 s3 features, as in AMES extract_cvnet / DELG.
RF, PADDING = 291.0, 145.0
# Keys of a CVNet checkpoint outside the backbone: its re-ranker, SuperGlobal's unused layers,
# DELG-pytorch's heads.
FOREIGN = ("conv2ds.", "cv_learner.", "desc_cls.", "localmodel.", "att_cls.")
UNUSED_BACKBONE = ("seb1.", "seb2.", "sefc.")
PREFIXES = ("encoder_q.", "globalmodel.")  # CVNet / SuperGlobal, DELG-pytorch


@dataclasses.dataclass(frozen=True)
class Activations:
    """Lower clamps of the activations, 0 = ReLU (SuperGlobal's "relup", spec §1.3)."""

    block_out: float = 0.0  # s1-s3 block outputs, after the residual sum
    s1_inner: float = 0.0  # inside s1's bottlenecks, after a_bn and b_bn


CVNET_ACTS = Activations()


def superglobal_acts(relup: bool = True) -> Activations:
    """SuperGlobal's clamps; s1's inner clamp is on whatever ``relup`` says (a code quirk)."""
    return Activations(block_out=RELUP if relup else 0.0, s1_inner=RELUP)


def activation(x: torch.Tensor, floor: float) -> torch.Tensor:
    """``max(x, floor)``; ReLU for 0."""
    return F.relu(x) if floor == 0.0 else x.clamp(min=floor)


def _conv(w_in: int, w_out: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(w_in, w_out, k, stride=stride, padding=k // 2, bias=False)


def _bn(width: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)


class Bottleneck(nn.Module):
    """pycls ``ResBlock``: ``f`` = 1x1, 3x3 (stride), 1x1 with BNs; projection on shape change."""

    def __init__(self, w_in: int, w_b: int, w_out: int, stride: int):
        super().__init__()
        self.f = nn.Module()
        self.f.a, self.f.a_bn = _conv(w_in, w_b, 1), _bn(w_b)
        self.f.b, self.f.b_bn = _conv(w_b, w_b, 3, stride), _bn(w_b)
        self.f.c, self.f.c_bn = _conv(w_b, w_out, 1), _bn(w_out)
        has_proj = w_in != w_out or stride != 1
        self.proj = _conv(w_in, w_out, 1, stride) if has_proj else None
        self.bn = _bn(w_out) if has_proj else None

    def forward(self, x: torch.Tensor, inner: float = 0.0) -> torch.Tensor:
        """The residual sum, BEFORE the block's output activation."""
        f = self.f
        y = activation(f.a_bn(f.a(x)), inner)
        y = activation(f.b_bn(f.b(y)), inner)
        y = f.c_bn(f.c(y))
        return (x if self.proj is None else self.bn(self.proj(x))) + y


class ResNet(nn.Module):
    """pycls ResNet-50/101 with the GeM + FC head, in CVNet's parameter layout."""

    def __init__(self, depth: int = 50, reduction_dim: int = 2048, block3_strides: bool = False):
        """``block3_strides``: DELG's layout, s3's output subsampled by 2 and s4 at stride 1."""
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise UserError(f"ResNet depth {depth} is not one of {sorted(STAGE_DEPTHS)}")
        self.block3_strides = block3_strides
        self.stem = nn.Module()
        self.stem.conv, self.stem.bn = _conv(3, 64, 7, 2), _bn(64)
        w_in = 64
        for k, (blocks, (w_b, w_out)) in enumerate(zip(STAGE_DEPTHS[depth], STAGE_WIDTHS), 1):
            stride = 1 if k == 1 or (k == 4 and block3_strides) else 2
            stage = nn.Module()
            for j in range(blocks):
                block = Bottleneck(w_in if j == 0 else w_out, w_b, w_out, stride if j == 0 else 1)
                stage.add_module(f"b{j + 1}", block)
            self.add_module(f"s{k}", stage)
            w_in = w_out
        self.head = nn.Module()
        self.head.pool = nn.Module()
        self.head.pool.p = nn.Parameter(torch.full((1,), 3.0))
        self.head.fc = nn.Linear(2048, reduction_dim)

    def forward_maps(
        self, x: torch.Tensor, acts: Activations = CVNET_ACTS, full: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, 3, H, W]`` -> (last s3 block's residual sum before its activation
        ``[B, 1024, H/16, W/16]``, s4 output ``[B, 2048, H/32, W/32]`` or None if not ``full``)."""
        x = F.max_pool2d(F.relu(self.stem.bn(self.stem.conv(x))), 3, 2, 1)
        s3_pre = None
        for k in range(1, 5):
            inner = acts.s1_inner if k == 1 else 0.0
            floor = acts.block_out if k < 4 else 0.0
            for block in getattr(self, f"s{k}").children():
                pre = block(x, inner)
                x = activation(pre, floor)
            if k == 3:
                s3_pre = pre
                if not full:
                    return s3_pre, None
                if self.block3_strides:
                    x = x[:, :, ::2, ::2]  # TF DELG's 1x1 max-pool with stride 2
        return s3_pre, x

    def global_head(self, s4: torch.Tensor) -> torch.Tensor:
        """CVNet head: ``fc(GeM_p(s4))`` with the learned power, ``[B, reduction_dim]``."""
        return self.head.fc(gem(s4, self.head.pool.p, 1e-6))


def gem(x: torch.Tensor, p: torch.Tensor | float, eps: float) -> torch.Tensor:
    """Generalised mean over the spatial positions: ``[B, C, ...]`` -> ``[B, C]``."""
    return x.flatten(2).clamp(min=eps).pow(p).mean(-1).pow(1.0 / p)


def regional_gem(x: torch.Tensor, p: float = 2.5, size: int = 5) -> torch.Tensor:
    """SuperGlobal's Regional-GeM: ``0.5 * power-mean_p over size x size windows + 0.5 * x``.

    The official ``LPPool2d`` on ``x / (size^2)^(1/p)`` with reflection padding ``size // 2``.
    """
    pad = size // 2
    padded = F.pad(x / (size**2) ** (1.0 / p), (pad, pad, pad, pad), mode="reflect")
    return 0.5 * F.lp_pool2d(padded, p, size, stride=1) + 0.5 * x


def gem_plus(x: torch.Tensor, p: float = 4.6, eps: float = 1e-8) -> torch.Tensor:
    """SuperGlobal's GeM+: fixed-power GeM, ``[B, C, H, W]`` -> ``[B, C]``."""
    return gem(x, p, eps)


def scale_gem(per_scale: Sequence[torch.Tensor]) -> torch.Tensor:
    """SuperGlobal's Scale-GeM (p -> infinity): max over scales of the L2-normalised outputs."""
    return F.normalize(torch.stack(list(per_scale)), p=2, dim=-1).max(dim=0).values


def superglobal_descriptor(
    backbone: ResNet,
    x: torch.Tensor,
    scales: Sequence[float] = CVNET_SCALES,
    relup: bool = True,
    antialias: bool = False,
) -> torch.Tensor:
    """SuperGlobal global descriptor of normalised BGR inputs ``[B, 3, H, W]`` -> ``[B, D]``."""
    acts = superglobal_acts(relup)
    h, w = x.shape[-2:]
    outputs = []
    for s in scales:
        size = (int(h * s), int(w * s))
        xs = x if size == (h, w) else bilinear_resize(x, size, antialias)
        _, f4 = backbone.forward_maps(xs, acts)
        g = F.normalize(gem_plus(regional_gem(f4.float())), p=2, dim=-1)
        outputs.append(backbone.head.fc(g))
    return F.normalize(scale_gem(outputs), p=2, dim=-1)


def bilinear_resize(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """torchvision's tensor ``resize`` (bilinear, half-pixel centres) to ``size``."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def receptive_centres(rows: int, cols: int, scale: float, stride: float = 16.0) -> torch.Tensor:
    """Row-major centres ``[N, 2]`` (float64, input pixels) of the receptive-field boxes
    ``stride (r, c) + (-145, 145 + ...)`` divided by ``scale`` (AMES / DELG arithmetic)."""
    idx = torch.arange(rows * cols)
    coords = torch.stack([idx // cols, idx % cols], dim=1).double()
    low = (stride * coords - PADDING) / scale
    high = (stride * coords - PADDING + RF - 1) / scale
    return (low + high) / 2


def backbone_state(state: dict) -> dict:
    """Backbone keys of a CVNet / SuperGlobal / DELG-pytorch checkpoint without their prefix.

    Known foreign heads (CVNet re-ranker, DELG-pytorch heads) and SuperGlobal's unused layers
    are dropped; any other key outside the prefix is kept so that strict loading reports it.
    """
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in state)), "")
    out = {}
    for key, value in state.items():
        if key.startswith(FOREIGN):
            continue
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if not name.startswith(UNUSED_BACKBONE):
            out[name] = value
    return out


def load_backbone(
    source: str | Path, depth: int, cache_dir: str | Path | None = None, **kwargs
) -> ResNet:
    """A :class:`ResNet` built to the checkpoint's FC width and loaded strictly."""
    state = backbone_state(
        load_state(source, "ResNet weights", ("model_state",), cache_dir=cache_dir)
    )
    fc = state.get("head.fc.weight")
    backbone = ResNet(depth, fc.shape[0] if fc is not None else 2048, **kwargs)
    load_strict(backbone, state, f"ResNet-{depth} weights {source}")
    return backbone


class ResNetExtractor(Extractor):
    """CVNet or SuperGlobal global descriptor + AMES CVNet-detector local descriptors.

    ``preprocess`` returns BGR pixel values ``[3, H, W]`` (0..255, float32), not a normalised
    tensor: the official pipeline resizes every scale from the uint8 image with cv2, which
    :meth:`extract_batch` does per scale before normalising.
    """

    def __init__(
        self,
        backbone: ResNet,
        detector: nn.Module,
        global_kind: str = "cvnet",
        num_local: int = 700,
        scales: Sequence[float] = CVNET_SCALES,
        max_size: int | None = None,
        relup: bool = True,
        antialias: bool = False,
        dtype: str = "fp32",
    ):
        super().__init__()
        if global_kind not in ("cvnet", "superglobal"):
            raise UserError(f"global_kind {global_kind!r} must be 'cvnet' or 'superglobal'")
        if dtype not in AUTOCAST:
            raise UserError(f"dtype {dtype!r} is not one of {sorted(AUTOCAST)}; pick one")
        self.backbone, self.detector = backbone, detector
        self.global_kind, self.num_local = global_kind, num_local
        self.scales = tuple(float(s) for s in scales)
        self.max_size, self.relup, self.antialias, self.dtype = max_size, relup, antialias, dtype
        self.global_dim = backbone.head.fc.out_features
        self.local_dim = 1024
        # SuperGlobal's 5x5 reflection padding needs an s4 map of >= 3 cells (65 px input).
        self.min_side = 65 if global_kind == "superglobal" else 32
        self.eval()

    def preprocess(self, image: np.ndarray, box: tuple[float, ...] | None = None) -> torch.Tensor:
        """RGB image (and query box) -> BGR pixel values of the crop ``[3, H, W]``.

        With ``max_size``, images whose long side exceeds it are first shrunk (cv2 INTER_AREA,
        factor from the full image); smaller images, e.g. all of ROxf/RPar at 1024 px, are
        untouched, as in the official pipeline.
        """
        s = 1.0 if self.max_size is None else min(1.0, self.max_size / max(image.shape[:2]))
        crop = crop_box(image, box)
        check_min_side(crop.shape, s * min(self.scales), self.min_side, self.global_kind)
        return to_pixels(bgr(cv2_resize(crop, s, s)))

    @torch.inference_mode()
    def extract_batch(self, images: torch.Tensor) -> list[ImageFeatures]:
        """``[B, 3, H, W]`` BGR pixels (one size) -> features."""
        device = images.device
        dtype = AUTOCAST[self.dtype]
        uint8 = images.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        descs, weights, positions, scale_ids, globals_ = [], [], [], [], []
        for k, scale in enumerate(self.scales):
            pixels = torch.stack([to_pixels(cv2_resize(im, scale, scale)) for im in uint8])
            x = normalize_pixels(pixels.to(device), BGR_MEAN, BGR_STD)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                s3_pre, s4 = self.backbone.forward_maps(x, full=self.global_kind == "cvnet")
            if s4 is not None:
                globals_.append(F.normalize(self.backbone.global_head(s4.float()), p=2, dim=-1))
            desc, weight = self.detector(s3_pre.float().flatten(2).transpose(1, 2))
            descs.append(desc)
            weights.append(weight)
            centres = receptive_centres(s3_pre.shape[2], s3_pre.shape[3], scale)
            positions.append(centres.to(device))
            scale_ids.append(torch.full((len(centres),), k, dtype=torch.int64, device=device))
        if self.global_kind == "cvnet":
            global_desc = F.normalize(torch.stack(globals_).mean(0), p=2, dim=-1)
        else:
            x = normalize_pixels(images, BGR_MEAN, BGR_STD)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                global_desc = superglobal_descriptor(
                    self.backbone, x, self.scales, self.relup, self.antialias
                ).float()
        desc, weight = torch.cat(descs, 1), torch.cat(weights, 1)
        pos, ids = torch.cat(positions), torch.cat(scale_ids)
        global_desc = global_desc.cpu().numpy()
        size = (int(images.shape[2]), int(images.shape[3]))
        return [
            ImageFeatures(
                global_desc=global_desc[i],
                local=LocalFeatures.from_topk(desc[i], weight[i], pos, ids, self.num_local),
                size=size,
            )
            for i in range(images.shape[0])
        ]


def resnet_extractor(
    depth: int = 50,
    global_kind: str = "cvnet",
    weights: str | None = None,
    detector: str | None = None,
    num_local: int = 700,
    scales: Sequence[float] = CVNET_SCALES,
    max_size: int | None = None,
    relup: bool = True,
    antialias: bool = False,
    dtype: str = "fp32",
    device: str = "cpu",
    cache_dir: str | None = None,
) -> ResNetExtractor:
    """CVNet ResNet-50/101 + AMES CVNet-detector locals (1024-D); CVNet or SuperGlobal global.

    Registered as ``cvnet_r50``, ``cvnet_r101``, ``superglobal_r50``, ``superglobal_r101`` (the
    name fixes ``depth`` and ``global_kind``).

    Args:
        depth: 50 or 101.
        global_kind: "cvnet" (GeM+FC, 2048-D) or "superglobal" (SuperGlobal descriptor, 2048-D).
        weights: ``CVPR2022_CVNet_R{depth}.pyth`` (path / URL / HF id) or "random".
        detector: the AMES CVNet detector file, "random", or None (official fallback: raw s3
            features weighted by their norm).
        num_local: rows K per image (700 official).
        scales: image scales (0.7071, 1, 1.4142 official); scale id = index.
        max_size: shrink images whose long side exceeds it first (None = native, official).
        relup: SuperGlobal's ``SupG.relup`` flag (0.014 floor on s1-s3 block outputs).
        antialias: antialiased bilinear for SuperGlobal's in-model rescaling (the torchvision
            version of the official run decides; False = torchvision < 0.17 on tensors).
        dtype: "fp32" (exact) or "bf16" / "fp16" autocast.
        device: torch device.
        cache_dir: download cache.
    """
    if weights is None:
        raise UserError(
            f"{global_kind}_r{depth} needs weights: the CVNet checkpoint "
            f"CVPR2022_CVNet_R{depth}.pyth (CVNet release) as a path or URL, or 'random'"
        )
    backbone = ResNet(depth) if weights == RANDOM else load_backbone(weights, depth, cache_dir)
    det = build_detector(detector, 1024, cache_dir)
    extractor = ResNetExtractor(
        backbone, det, global_kind, num_local, scales, max_size, relup, antialias, dtype
    )
    return extractor.to(device)
