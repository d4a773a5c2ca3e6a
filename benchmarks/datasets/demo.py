"""The demo collection: a small instance-retrieval set built from scikit-image's real photos.

Deterministic for a given seed. Each *scene* is one real photo; database views of it are made
with perspective warps, zoom/crops, rotation, photometric changes, blur and occlusion; held-out
query views sit on a textured background with a bounding box around the scene. Ground truth is
written in the official Revisited format (``imlist``, ``qimlist``, ``gnd`` with
``easy``/``hard``/``junk``/``bbx``, reference-spec §1.6) so the real evaluation code runs on it:

    easy  mild views (small warp, most of the photo visible),
    hard  strong views (large warp, zoom-out, occlusion, blur),
    junk  extreme close crops showing a small part of the scene.

Scenes are split: ``EVAL_SCENES`` are reserved for evaluation and never used for training;
``TRAIN_SCENES`` form the training split (``train/``, with one class per scene). Distractors
(textures and training photos) fill the evaluation database.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from locore.benchmarks.datasets.base import Manifest

logger = logging.getLogger(__name__)

VERSION = 2  # bump when the generator changes, so cached collections are rebuilt
EVAL_SCENES = ("astronaut", "coffee", "rocket", "motorcycle", "clock", "coins", "ihc")
TRAIN_SCENES = ("chelsea", "camera", "hubble", "page", "colorwheel", "retina", "logo", "text")
TEXTURES = ("brick", "grass", "gravel", "moon")
LONG_SIDE = 384


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """Sizes of the generated collection."""

    seed: int = 0
    easy: int = 3  # easy database views per evaluation scene
    hard: int = 2  # hard database views per evaluation scene
    junk: int = 1  # junk (close crop) views per evaluation scene
    queries: int = 2  # query views per evaluation scene
    train_views: int = 8  # views per training scene
    distractors: int = 24  # extra database images from textures and training photos


def _photos() -> dict[str, Callable[[], np.ndarray]]:
    from skimage import data

    def rgb(fn: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            img = np.asarray(fn())
            if img.dtype == bool:
                img = img.astype(np.uint8) * 255
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            return np.ascontiguousarray(img[..., :3]).astype(np.uint8)

        return load

    return {
        "astronaut": rgb(data.astronaut),
        "coffee": rgb(data.coffee),
        "rocket": rgb(data.rocket),
        "motorcycle": rgb(lambda: data.stereo_motorcycle()[0]),
        "motorcycle_right": rgb(lambda: data.stereo_motorcycle()[1]),
        "clock": rgb(data.clock),
        "coins": rgb(data.coins),
        "ihc": rgb(data.immunohistochemistry),
        "chelsea": rgb(data.chelsea),
        "camera": rgb(data.camera),
        "hubble": rgb(data.hubble_deep_field),
        "page": rgb(data.page),
        "colorwheel": rgb(data.colorwheel),
        "retina": rgb(data.retina),
        "logo": rgb(data.logo),
        "text": rgb(data.text),
        "brick": rgb(data.brick),
        "grass": rgb(data.grass),
        "gravel": rgb(data.gravel),
        "moon": rgb(data.moon),
    }


# ----------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ViewParams:
    """Strength of a synthetic view."""

    warp: float  # corner jitter, fraction of the side
    rotate: float  # max rotation, degrees
    zoom: tuple[float, float]  # visible fraction of each side
    blur: float  # max Gaussian sigma
    occlude: float  # max occluded fraction of the area
    photometric: float  # brightness/contrast jitter


EASY = ViewParams(0.05, 8, (0.8, 1.0), 0.6, 0.0, 0.15)
HARD = ViewParams(0.16, 25, (0.55, 0.75), 1.6, 0.22, 0.35)
JUNK = ViewParams(0.05, 10, (0.22, 0.32), 0.5, 0.0, 0.15)
QUERY = ViewParams(0.08, 12, (0.75, 0.95), 0.8, 0.0, 0.2)


def _resize_long(img: np.ndarray, long_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    size = (max(round(w * s), 1), max(round(h * s), 1))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def make_view(photo: np.ndarray, p: ViewParams, rng: np.random.Generator) -> np.ndarray:
    """One synthetic view of ``photo``: crop/zoom, perspective + rotation, photometric, blur,
    occlusion; output long side ``LONG_SIDE``."""
    h, w = photo.shape[:2]
    fy, fx = rng.uniform(*p.zoom), rng.uniform(*p.zoom)
    ch, cw = max(int(h * fy), 8), max(int(w * fx), 8)
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[y0 : y0 + ch, x0 : x0 + cw]
    crop = _resize_long(crop, LONG_SIDE)
    h, w = crop.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    jitter = rng.uniform(-p.warp, p.warp, size=(4, 2)) * np.float32([w, h])
    dst = (src + jitter).astype(np.float32)
    angle = np.deg2rad(rng.uniform(-p.rotate, p.rotate))
    centre = np.float32([w / 2, h / 2])
    rot = np.float32([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = (dst - centre) @ rot.T + centre
    dst -= dst.min(axis=0)
    out_w, out_h = (int(v) + 1 for v in dst.max(axis=0))
    matrix = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    view = cv2.warpPerspective(
        crop, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderValue=fill
    )
    view = view.astype(np.float32)
    contrast = 1 + rng.uniform(-p.photometric, p.photometric)
    brightness = 255 * rng.uniform(-p.photometric, p.photometric) / 2
    tint = 1 + rng.uniform(-p.photometric / 3, p.photometric / 3, size=3)
    view = np.clip((view - 128) * contrast + 128 + brightness, 0, 255) * tint
    sigma = rng.uniform(0, p.blur)
    if sigma > 0.3:
        view = cv2.GaussianBlur(view, (0, 0), sigma)
    if p.occlude > 0:
        area = rng.uniform(p.occlude / 2, p.occlude) * view.shape[0] * view.shape[1]
        oh = int(np.sqrt(area * rng.uniform(0.5, 2)))
        ow = int(area / max(oh, 1))
        oh, ow = min(oh, view.shape[0] - 1), min(ow, view.shape[1] - 1)
        oy = rng.integers(0, view.shape[0] - oh)
        ox = rng.integers(0, view.shape[1] - ow)
        view[oy : oy + oh, ox : ox + ow] = rng.uniform(0, 255, size=3)
    return _resize_long(np.clip(view, 0, 255).astype(np.uint8), LONG_SIDE)


def make_query(
    photo: np.ndarray, texture: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, list[float]]:
    """A query view on a texture background; returns the image and its ``x1,y1,x2,y2`` box."""
    view = _resize_long(make_view(photo, QUERY, rng), int(LONG_SIDE * 0.75))
    vh, vw = view.shape[:2]
    canvas_h, canvas_w = int(vh * rng.uniform(1.2, 1.4)), int(vw * rng.uniform(1.2, 1.4))
    canvas = cv2.resize(texture, (canvas_w, canvas_h), interpolation=cv2.INTER_LINEAR)
    y0 = int(rng.integers(0, canvas_h - vh + 1))
    x0 = int(rng.integers(0, canvas_w - vw + 1))
    canvas[y0 : y0 + vh, x0 : x0 + vw] = view
    return canvas, [float(x0), float(y0), float(x0 + vw), float(y0 + vh)]


# ----------------------------------------------------------------------------------------------
# The collection
# ----------------------------------------------------------------------------------------------
def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])


def generate(root: Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Build the collection under ``root`` (cached: reused when the manifest matches).

    Layout (Revisited style): ``jpg/<name>.jpg`` database images, ``queries/<name>.jpg`` query
    images (kept apart so ``locore index --images jpg`` indexes the database only),
    ``gnd_demo.pkl`` (the official ground-truth format), ``gnd_demo.json`` (the same, readable),
    ``train/jpg/*.jpg`` + ``train/labels.txt`` (``name,class``) for training, ``manifest.json``.
    """
    root = Path(root)
    manifest = Manifest.of(root / "manifest.json", VERSION, spec)
    if manifest.current():
        logger.info("demo collection at %s is up to date", root)
        return root
    rng = np.random.default_rng(spec.seed)
    photos = {name: load() for name, load in _photos().items()}
    imlist: list[str] = []
    gnd: list[dict] = []
    qimlist: list[str] = []
    scene_views: dict[str, dict[str, list[int]]] = {}

    for scene in EVAL_SCENES:
        ids: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        for kind, params, count in (
            ("easy", EASY, spec.easy),
            ("hard", HARD, spec.hard),
            ("junk", JUNK, spec.junk),
        ):
            for i in range(count):
                name = f"{scene}_{kind}{i}"
                _write(root / "jpg" / f"{name}.jpg", make_view(photos[scene], params, rng))
                ids[kind].append(len(imlist))
                imlist.append(name)
        scene_views[scene] = ids

    sources = [*TEXTURES, *TRAIN_SCENES]
    for i in range(spec.distractors):
        source = sources[i % len(sources)]
        name = f"distractor{i:03d}_{source}"
        _write(root / "jpg" / f"{name}.jpg", make_view(photos[source], EASY, rng))
        imlist.append(name)

    for scene in EVAL_SCENES:
        for i in range(spec.queries):
            # The stereo pair gives one real second viewpoint: the right image feeds the queries.
            source = photos["motorcycle_right" if scene == "motorcycle" else scene]
            texture = photos[TEXTURES[int(rng.integers(len(TEXTURES)))]]
            image, box = make_query(source, texture, rng)
            name = f"query_{scene}{i}"
            _write(root / "queries" / f"{name}.jpg", image)
            qimlist.append(name)
            gnd.append({"bbx": box, **{k: list(v) for k, v in scene_views[scene].items()}})

    labels = []
    for cls, scene in enumerate(TRAIN_SCENES):
        for i in range(spec.train_views):
            params = (EASY, HARD, JUNK)[i % 3]
            name = f"{scene}_{i:02d}"
            _write(root / "train" / "jpg" / f"{name}.jpg", make_view(photos[scene], params, rng))
            labels.append(f"{name},{cls}")
    (root / "train" / "labels.txt").write_text("\n".join(labels) + "\n")

    ground_truth = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with open(root / "gnd_demo.pkl", "wb") as f:
        pickle.dump(ground_truth, f)
    (root / "gnd_demo.json").write_text(json.dumps(ground_truth, indent=1))
    manifest.write()
    logger.info("demo collection: %d database, %d queries at %s", len(imlist), len(qimlist), root)
    return root
