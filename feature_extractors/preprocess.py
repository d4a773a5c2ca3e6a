"""The official resize rules of the AMES/LOCORE extraction (reference-spec §2.2), in one place.

1. scale ``s = imsize / max(H, W)`` from the FULL image (so a query crop is resized by the same
   factor as its image);
2. optional query crop to the box with ``int()`` truncation and exclusive ends (P30);
3. per axis, ``q = max(round(s * side / patch), 1)`` (Python rounding, half to even) and the
   axis factor ``q * patch / side``, so each side becomes an exact multiple of ``patch``;
4. ``cv2.resize`` with those factors: INTER_AREA when shrinking, INTER_LINEAR when enlarging;
5. float32 in [0, 1], normalised per channel.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from engine.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_box(image: np.ndarray, box: tuple[float, ...] | None) -> np.ndarray:
    """Rows ``int(y1):int(y2)``, columns ``int(x1):int(x2)`` (the official truncation)."""
    if box is None:
        return image
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = image[max(y1, 0) : y2, max(x1, 0) : x2]
    if crop.size == 0:
        raise UserError(
            f"query box {tuple(box)} selects no pixel of a {image.shape[1]}x"
            f"{image.shape[0]} image; fix the box"
        )
    return crop


def official_resize(
    image: np.ndarray, imsize: int | None, patch: int | None, box: tuple[float, ...] | None = None
) -> np.ndarray:
    """Crop and resize ``image`` ``[H, W, C]`` exactly as the official extraction does."""
    h, w = image.shape[:2]
    scale = 1.0 if imsize is None else imsize / max(h, w)
    image = crop_box(image, box)
    h, w = image.shape[:2]
    if patch:
        fy = max(round(scale * h / patch), 1) * patch / h
        fx = max(round(scale * w / patch), 1) * patch / w
    else:
        fx = fy = scale
    if fx < 1 or fy < 1:
        interpolation = cv2.INTER_AREA
    elif fx > 1 or fy > 1:
        interpolation = cv2.INTER_LINEAR
    else:
        return image
    return cv2.resize(image, (0, 0), fx=fx, fy=fy, interpolation=interpolation)


def to_tensor(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> normalised float32 ``[3, H, W]``."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
