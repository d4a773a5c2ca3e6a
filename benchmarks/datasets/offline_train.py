"""Training and validation data for the offline re-ranker, split by source photo.

Every real photo scikit-image ships in its wheel is used, except those the demo evaluates on
(``demo.EVAL_SCENES``) and those of the held-out collection (``heldout.SUBJECTS``): the
re-ranker is then judged on both collections with photos it never saw. Large photos are cut
into disjoint tiles (a grid per photo, ``PHOTOS``), each tile a *subject* (one class); tiles of
one photo share colours and texture, so they are hard negatives for each other. Training and
validation are split **by photo** (``VALIDATION_PHOTOS``): no pixel of a validation photo
appears in training, not even another tile of it.

Each view renders one subject with the transformations users' queries have (``augment``):
rotation by any angle (90 / 180 / 270 included), a crop of 10-100 % of the area, resolution
scale 0.25-1, Gaussian blur, colour and brightness, partial occlusion, a perspective warp, and
JPEG quality 30-95 when written. Written per split: ``<split>/jpg/<subject>_<view>.jpg`` and
``<split>/labels.txt`` (``name,subject``, the format ``locore train`` reads). The validation
photos also give a retrieval collection (``validation_collection``, the held-out collection's
views and hard queries, three per subject) on which the fusion weights are chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import cv2
import numpy as np

from locore.benchmarks.datasets import heldout
from locore.benchmarks.datasets.base import Manifest
from locore.benchmarks.datasets.demo import LONG_SIDE, _photos, _resize_long
from locore.core.errors import UserError

logger = logging.getLogger(__name__)

VERSION = 1  # bump when the generator changes, so cached folders are rebuilt
# Photo (a name of ``demo._photos``) -> tile grid (rows, columns): one subject per tile.
PHOTOS = {
    "retina": (3, 3),
    "hubble": (3, 3),
    "camera": (2, 2),
    "moon": (2, 2),
    "chelsea": (1, 2),
    "page": (1, 2),
    "text": (1, 2),
    "brick": (1, 1),
    "grass": (1, 1),
    "gravel": (1, 1),
    "logo": (1, 1),
    "colorwheel": (1, 1),
}
VALIDATION_PHOTOS = ("camera", "text", "gravel", "logo")
TRAINING_PHOTOS = tuple(p for p in PHOTOS if p not in VALIDATION_PHOTOS)
SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class OfflineTrainSpec:
    """Sizes of the generated data."""

    seed: int = 0
    train_views: int = 32  # views per training subject
    val_views: int = 16  # views per validation subject (the validation lists)
    queries: int = 3  # hard queries per subject in the validation collection (<= 3)
    distractors: int = 20  # texture distractors in the validation collection


def subjects(split: str) -> dict[str, np.ndarray]:
    """The subjects of ``split`` (``train`` or ``val``): name ``<photo>_r<row>c<col>`` (or the
    photo's name when it is not cut) -> RGB uint8 tile."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {SPLITS}")
    loaders = _photos()
    out = {}
    for photo in VALIDATION_PHOTOS if split == "val" else TRAINING_PHOTOS:
        image = loaders[photo]()
        rows, cols = PHOTOS[photo]
        h, w = image.shape[0] // rows, image.shape[1] // cols
        for r in range(rows):
            for c in range(cols):
                name = photo if rows * cols == 1 else f"{photo}_r{r}c{c}"
                out[name] = np.ascontiguousarray(image[r * h : (r + 1) * h, c * w : (c + 1) * w])
    return out


def augment(photo: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One view of ``photo`` (RGB uint8) and the JPEG quality to write it with (module doc)."""
    h, w = photo.shape[:2]
    area = rng.uniform(0.1, 1.0) * h * w  # crop of 10-100 % of the area, aspect 1/2 to 2
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    ch = int(np.clip(np.sqrt(area / aspect), 8, h))
    cw = int(np.clip(area / ch, 8, w))
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    view = _resize_long(photo[y0 : y0 + ch, x0 : x0 + cw], LONG_SIDE)
    vh, vw = view.shape[:2]
    src = np.float32([[0, 0], [vw, 0], [vw, vh], [0, vh]])  # perspective: corner jitter
    dst = src + rng.uniform(-0.12, 0.12, size=(4, 2)).astype(np.float32) * np.float32([vw, vh])
    dst -= dst.min(axis=0)
    size = tuple(int(v) + 1 for v in dst.max(axis=0))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    matrix = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    view = cv2.warpPerspective(view, matrix, size, flags=cv2.INTER_LINEAR, borderValue=fill)
    turn = rng.random()  # any angle, a right angle, or a small tilt
    angle = (
        rng.uniform(-180, 180)
        if turn < 0.4
        else 90.0 * rng.integers(0, 4) + rng.uniform(-5, 5)
        if turn < 0.8
        else rng.uniform(-15, 15)
    )
    view = heldout.rotate(view, angle, fill).astype(np.float32)
    contrast = rng.uniform(0.6, 1.4)
    brightness = rng.uniform(-50, 50)
    tint = rng.uniform(0.8, 1.2, size=3)
    view = np.clip(((view - 128) * contrast + 128 + brightness) * tint, 0, 255)
    if rng.random() < 0.15:  # grey
        view = np.repeat(view.mean(axis=2, keepdims=True), 3, axis=2)
    if rng.random() < 0.5:
        view = cv2.GaussianBlur(view, (0, 0), rng.uniform(0.5, 3.0))
    if rng.random() < 0.5:  # a rectangle of 5-25 % of the area hidden by a texture
        vh, vw = view.shape[:2]
        area = rng.uniform(0.05, 0.25) * vh * vw
        oh = int(min(np.sqrt(area * rng.uniform(0.5, 2)), vh - 1))
        ow = int(min(area / max(oh, 1), vw - 1))
        oy, ox = rng.integers(0, vh - oh), rng.integers(0, vw - ow)
        view[oy : oy + oh, ox : ox + ow] = heldout.texture(rng, oh, ow)
    scale = rng.uniform(0.25, 1.0)
    view = _resize_long(view.astype(np.uint8), max(int(LONG_SIDE * scale), 16))
    return view, int(rng.integers(30, 96))


def generate_lists(root: Path, spec: OfflineTrainSpec = OfflineTrainSpec()) -> Path:
    """Write ``train/`` and ``val/`` (``jpg/`` + ``labels.txt`` each) under ``root`` (cached).

    The two splits draw from independent generators (``[seed, split]``), so the training views
    do not change when the validation sizes do.
    """
    if min(spec.train_views, spec.val_views) < 2:
        raise UserError("train_views and val_views must be at least 2 (a view needs a positive)")
    root = Path(root)
    manifest = Manifest.of(root / "manifest_lists.json", VERSION, spec)
    if manifest.current():
        logger.info("offline training lists at %s are up to date", root)
        return root
    for index, split in enumerate(SPLITS):
        rng = np.random.default_rng([spec.seed, index])
        views = spec.train_views if split == "train" else spec.val_views
        labels = []
        for subject, photo in subjects(split).items():
            for i in range(views):
                image, quality = augment(photo, rng)
                name = f"{subject}_{i:02d}"
                target = root / split / "jpg" / f"{name}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
                cv2.imwrite(str(target), bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
                labels.append(f"{name},{subject}")
        (root / split / "labels.txt").write_text("\n".join(labels) + "\n")
        logger.info("%s: %d views of %d subjects", split, len(labels), len(labels) // views)
    manifest.write()
    return root


def validation_collection(root: Path, spec: OfflineTrainSpec = OfflineTrainSpec()) -> Path:
    """The validation subjects as a retrieval collection (cached), in the held-out collection's
    layout (``heldout.write_collection``): ``jpg/``, ``queries/`` and ``gnd_validation.pkl``."""
    if not 1 <= spec.queries <= len(heldout.QUERY_KINDS) or spec.distractors < 0:
        raise UserError(
            f"the validation collection has 1 to {len(heldout.QUERY_KINDS)} queries per subject "
            f"and >= 0 distractors; got {spec.queries} and {spec.distractors}"
        )
    root = Path(root)
    manifest = Manifest.of(root / "manifest_collection.json", VERSION, spec)
    if manifest.current():
        logger.info("validation collection at %s is up to date", root)
        return root
    rng = np.random.default_rng([spec.seed, len(SPLITS)])
    heldout.write_collection(
        root, subjects("val"), rng, spec.distractors, "validation", spec.queries
    )
    manifest.write()
    return root


def main(argv: list[str] | None = None) -> int:
    """``python -m locore.benchmarks.datasets.offline_train --out DIR``: write both splits and
    the validation collection (``DIR/collection``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("offline_data"), help="output folder")
    parser.add_argument("--seed", type=int, default=OfflineTrainSpec.seed, help="generator seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = OfflineTrainSpec(seed=args.seed)
    generate_lists(args.out, spec)
    validation_collection(args.out / "collection", spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
