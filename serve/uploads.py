"""Checking what a client sends before any model sees it: the photo and its box.

Every problem becomes a :class:`RequestError` carrying the HTTP status and a one-line message that
names the problem, so a bad upload costs the server a 4xx and nothing else. The decoded pixels
go through :func:`locore.feature_extractors.io.load_image` (the project's one decoding policy:
EXIF rotation, 16-bit, alpha, palette), after the header has been checked against the pixel
limit (``max_pixels``, below PIL's own bomb threshold) so that a decompression bomb is
refused before it is decompressed.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from locore.core.errors import UserError
from locore.feature_extractors.io import load_image

MIN_SIDE = 8  # pixels; smaller images carry no retrievable content


class RequestError(UserError):
    """A request the server refuses; ``status`` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> RGB ``uint8 [H, W, 3]``.

    Raises:
        RequestError: 400 empty, 413 over ``max_bytes`` or ``max_pixels`` (decompression bombs
            included), 415 not an image, 422 truncated or otherwise undecodable.
    """
    if not data:
        raise RequestError(400, "the uploaded file is empty; send a JPEG, PNG or WebP photo")
    if len(data) > max_bytes:
        raise RequestError(
            413, f"the upload is {len(data)} bytes, over the limit of {max_bytes} bytes"
        )
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
    except UnidentifiedImageError:
        raise RequestError(415, "the upload is not an image PIL can read; send a photo") from None
    except Image.DecompressionBombError:
        raise RequestError(413, "the upload declares far more pixels than allowed") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(422, f"the image header is damaged ({type(err).__name__})") from None
    if min(width, height) < MIN_SIDE:
        raise RequestError(422, f"the image is {width}x{height} px; send a larger photo")
    if width * height > max_pixels:
        raise RequestError(
            413,
            f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
            f"limit of {max_pixels / 1e6:.1f}; send a smaller photo",
        )
    # load_image decodes files: hand it the checked bytes through an anonymous temporary file.
    with tempfile.NamedTemporaryFile(suffix=".upload") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return load_image(Path(tmp.name))
        except UserError:
            raise RequestError(
                422, "the upload is truncated or corrupt and cannot be decoded; re-encode it"
            ) from None


def parse_box(
    text: str | None, width: int, height: int
) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` in image pixels -> a box inside the image, or None for no box.

    Raises:
        RequestError: 422 when the box is not four finite numbers, is empty, or lies outside the
            ``width`` x ``height`` image.
    """
    if text is None or not text.strip():
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise RequestError(422, f"box {text!r} is not four numbers x1,y1,x2,y2") from None
    if len(values) != 4 or not all(np.isfinite(values)):
        raise RequestError(422, f"box {text!r} is not four finite numbers x1,y1,x2,y2")
    x1, y1, x2, y2 = values
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise RequestError(
            422,
            f"box {text!r} must satisfy 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height} "
            "(the image's size in pixels)",
        )
    return x1, y1, x2, y2
