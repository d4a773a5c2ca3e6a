"""Decoding image files into RGB ``uint8`` arrays, robust to what real collections contain.

Orientation policy: EXIF rotation is applied, matching OpenCV's ``imread`` that the official
extraction uses (reference-spec §2.2). Grayscale, palette, CMYK, alpha and 16-bit images are
converted to 8-bit RGB. Anything that cannot be decoded raises :class:`ImageError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from locore.core.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class ImageError(UserError):
    """An image file that cannot be used (missing, unreadable, corrupt, too small)."""


def list_images(folder: Path) -> list[Path]:
    """All files below ``folder`` in sorted order, hidden files excluded.

    Every file is listed (not only known suffixes, broken links included) so that a file that is
    not a usable image is reported as skipped instead of silently ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; pass an existing directory")
    files = [
        p
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink())
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files)


def load_image(path: Path, min_side: int = 2) -> np.ndarray:
    """Decode ``path`` to an RGB ``uint8 [H, W, 3]`` array.

    Raises:
        ImageError: the file is missing, unreadable, not an image, truncated, or smaller than
            ``min_side`` pixels on a side.
    """
    path = Path(path)
    if not os.access(path, os.R_OK):
        raise ImageError(f"image {path} is missing or unreadable; check the path and permissions")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            array = _to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(
            f"image {path} cannot be decoded ({type(err).__name__}); re-encode or remove it"
        ) from None
    h, w = array.shape[:2]
    if min(h, w) < min_side:
        raise ImageError(f"image {path} is {w}x{h} px, below {min_side} px; remove it")
    return array


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grayscale: scale the full range to 8 bits instead of clipping.
        data = np.asarray(img, dtype=np.float64)
        # PIL opens 16-bit PNGs as "I;16" or "I": treat any value above 8 bits as 16-bit range.
        top = 65535.0 if img.mode.startswith("I;16") or data.max() > 255 else 255.0
        gray = np.clip(data / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGB", img.size, (255, 255, 255))
        rgba = img.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return np.asarray(background)
    return np.asarray(img.convert("RGB"))
