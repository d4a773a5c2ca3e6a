"""The official resize and normalisation rules of the AMES/LOCORE extraction (reference-spec §2.2).

For one image and one scale of the extractor's scale list:

1. base factor ``s = imsize / max(H, W)`` from the FULL image (1 without ``imsize``), so a query
   crop is resized by the same factor as its whole image would be;
2. optional query crop to the box with ``int()`` truncation and exclusive ends;
3. per axis, the factor is ``scale`` or, with a patch size, the official quantisation
   ``scale / ((scale * side / patch) / max(round(scale * side / patch), 1))`` (Python rounding,
   half to even), which makes the side an exact multiple of ``patch``;
4. ``cv2.resize`` with those factors: INTER_AREA when either shrinks, INTER_LINEAR when either
   enlarges, no resize otherwise;
5. float32, divided by 255, normalised per channel with the ImageNet statistics.

Resizing is per channel, so the order of channels does not matter for steps 1-4: images stay RGB
(as decoded by :mod:`feature_extractors.io`) and models that want BGR flip them (:func:`bgr`).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from locore.core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB order
IMAGENET_STD = (0.229, 0.224, 0.225)


def base_scale(shape: tuple[int, ...], imsize: int | None) -> float:
    """``imsize / max(shape)`` of the full image, or 1 without a target size.

    Like the official code, the max runs over the whole shape, channels included (this only
    changes anything for images under 3 px).
    """
    return 1.0 if imsize is None else imsize / max(shape)


def crop_box(image: np.ndarray, box: tuple[float, ...] | None) -> np.ndarray:
    """Rows ``int(y1):int(y2)``, columns ``int(x1):int(x2)`` (the official truncation).

    Negative starts are clamped to 0 (the official slice would wrap around and select nothing).
    """
    if box is None:
        return image
    if len(box) != 4:
        raise UserError(f"query box {tuple(box)} must have 4 numbers x1, y1, x2, y2; fix the box")
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = image[max(y1, 0) : y2, max(x1, 0) : x2]
    if crop.size == 0:
        raise UserError(
            f"query box {tuple(box)} selects no pixel of a {image.shape[1]}x{image.shape[0]} "
            "image; fix the box"
        )
    return crop


def axis_factor(side: int, scale: float, patch: int | None = None) -> float:
    """Resize factor of one axis; with ``patch``, quantised so the side becomes ``patch * q``.

    The arithmetic is the official one, operation for operation, so cv2 receives bit-identical
    factors (cv2 interpolates with the factor, not with the output size).
    """
    if not patch:
        return scale
    units = scale * side / patch
    return scale / (units / max(round(units), 1.0))


def cv2_resize(image: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """``cv2.resize``: INTER_AREA when either factor shrinks, else INTER_LINEAR, else no copy."""
    if fx < 1.0 or fy < 1.0:
        interpolation = cv2.INTER_AREA
    elif fx > 1.0 or fy > 1.0:
        interpolation = cv2.INTER_LINEAR
    else:
        return image
    return cv2.resize(image, (0, 0), fx=fx, fy=fy, interpolation=interpolation)


def check_min_side(shape: tuple[int, ...], scale: float, min_side: float, model: str) -> None:
    """Raise :class:`UserError` when the short side of ``shape`` times ``scale`` is below
    ``min_side`` pixels (the model cannot see such an image, or the official code would crash)."""
    h, w = shape[:2]
    if min(h, w) * scale < min_side:
        raise UserError(
            f"image region of {w}x{h} px becomes {min(h, w) * scale:.1f} px on its short side "
            f"after resizing by {scale:.4g}, below the {min_side} px that {model} needs; "
            "use a larger image or query box"
        )


def official_resize(
    image: np.ndarray,
    imsize: int | None,
    patch: int | None,
    box: tuple[float, ...] | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Crop and resize ``image`` ``[H, W, C]`` as the official dataset does for one scale."""
    s = scale * base_scale(image.shape, imsize)
    crop = crop_box(image, box)
    h, w = crop.shape[:2]
    return cv2_resize(crop, axis_factor(w, s, patch), axis_factor(h, s, patch))


def bgr(image: np.ndarray) -> np.ndarray:
    """RGB <-> BGR channel flip of an ``[H, W, 3]`` array (the pycls/CVNet input order)."""
    return np.ascontiguousarray(image[..., ::-1])


def normalize_pixels(
    pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Pixel values 0..255 ``[..., 3, H, W]`` -> ``(x / 255 - mean) / std`` in float32.

    Same float32 operations as the official ``/ 255.0`` then per-channel subtract and divide.
    """
    x = pixels.float() / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x - mean_t) / std_t


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> float32 pixel values ``[3, H, W]`` (no scaling)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()


def to_tensor(
    image: np.ndarray,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> normalised float32 ``[3, H, W]`` (statistics in the image's order)."""
    return normalize_pixels(to_pixels(image), mean, std)
