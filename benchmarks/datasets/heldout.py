"""A held-out collection: real photos the demo collection never uses, with hard queries.

Subjects come from images that ship with the package's own dependencies and appear nowhere in
``benchmarks/datasets/demo.py`` (so the demo re-ranker never trained on them and the demo's
settings were never chosen on them): matplotlib's sample photo, picture, logo, elevation map
and MRI slice, and scikit-image files without a demo scene. The two large photos give two
subjects each (their top and bottom halves, which share colours and texture: hard negatives for
each other). Distractors are procedural textures.

Database views per subject, in a folder per subject (``jpg/<subject>/<view>.jpg``):

    easy  full (the whole photo), half (the whole photo at half size), crop (a mild crop),
    hard  rotated (30-60 degrees), warped (a strong synthetic view: warp, zoom, occlusion),
    junk  close (a close crop showing a small part).

One query per subject, each hard in one way, cycling: ``blur`` (Gaussian sigma 3), ``rotate``
(20-35 degrees) and ``tight`` (a box around the central half of the pasted view only). Queries
sit on a texture with a box. The ground truth is the Revisited pickle the demo writes.
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
from locore.benchmarks.datasets.demo import (
    EASY,
    HARD,
    JUNK,
    LONG_SIDE,
    QUERY,
    _resize_long,
    _write,
    make_view,
)
from locore.core.errors import UserError

logger = logging.getLogger(__name__)

VERSION = 1  # bump when the generator changes, so cached collections are rebuilt
SUBJECTS = (
    "hopper_top",
    "hopper_bottom",
    "present",
    "mpl_logo",
    "cell_top",
    "cell_bottom",
    "horse",
    "phantom",
    "microaneurysms",
    "chessboard",
    "blobs",
    "dem",
    "mri",
)
QUERY_KINDS = ("blur", "rotate", "tight")


@dataclasses.dataclass(frozen=True)
class HeldoutSpec:
    """Sizes of the generated collection."""

    seed: int = 0
    subjects: int = len(SUBJECTS)  # the first this many of SUBJECTS (fewer: quick tests)
    distractors: int = 20  # procedural textures in the database


def _photos() -> dict[str, Callable[[], np.ndarray]]:
    """Loaders of the subjects' source images, RGB uint8."""
    from matplotlib import cbook, colormaps
    from skimage import data

    def file(path: str | Path) -> Callable[[], np.ndarray]:
        return lambda: cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    def half(load: Callable[[], np.ndarray], top: bool) -> Callable[[], np.ndarray]:
        def part() -> np.ndarray:
            img = load()
            mid = img.shape[0] // 2
            return np.ascontiguousarray(img[:mid] if top else img[mid:])

        return part

    def blobs() -> np.ndarray:
        mask = data.binary_blobs(length=384, blob_size_fraction=0.08, rng=7)
        return np.repeat(mask[..., None].astype(np.uint8) * 230 + 12, 3, axis=2)

    def scaled(values: np.ndarray, cmap: str) -> np.ndarray:
        values = values.astype(np.float64)
        values = (values - values.min()) / max(np.ptp(values), 1e-12)
        return (colormaps[cmap](values)[..., :3] * 255).astype(np.uint8)

    def dem() -> np.ndarray:  # a real elevation map, shaded as a terrain map
        with cbook.get_sample_data("jacksboro_fault_dem.npz") as z:
            return scaled(z["elevation"], "terrain")

    def mri() -> np.ndarray:  # a real 256 x 256 16-bit MRI slice
        with cbook.get_sample_data("s1045.ima.gz") as f:
            return scaled(np.frombuffer(f.read(), np.uint16).reshape(256, 256), "gray")

    hopper = file(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    cell = file(Path(data.data_dir) / "cell.png")
    return {
        "hopper_top": half(hopper, True),
        "hopper_bottom": half(hopper, False),
        "present": file(cbook.get_sample_data("Minduka_Present_Blue_Pack.png", asfileobj=False)),
        "mpl_logo": file(cbook.get_sample_data("logo2.png", asfileobj=False)),
        "cell_top": half(cell, True),
        "cell_bottom": half(cell, False),
        "horse": file(Path(data.data_dir) / "horse.png"),
        "phantom": file(Path(data.data_dir) / "phantom.png"),
        "microaneurysms": file(Path(data.data_dir) / "microaneurysms.png"),
        "chessboard": file(Path(data.data_dir) / "chessboard_RGB.png"),
        "blobs": blobs,
        "dem": dem,
        "mri": mri,
    }


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A procedural texture: smooth colour noise at a random scale plus fine grain."""
    cells = int(rng.integers(3, 24))
    coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, rng.uniform(5, 30), size=(height, width, 1)).astype(np.float32)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def rotate(image: np.ndarray, degrees: float, fill: tuple[int, int, int]) -> np.ndarray:
    """``image`` rotated by ``degrees`` on a canvas that holds all of it."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    out_w, out_h = int(h * sin + w * cos), int(h * cos + w * sin)
    matrix[:, 2] += (out_w / 2 - w / 2, out_h / 2 - h / 2)
    return cv2.warpAffine(image, matrix, (out_w, out_h), borderValue=fill)


def _crop(photo: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    h, w = photo.shape[:2]
    ch, cw = max(int(h * fraction), 8), max(int(w * fraction), 8)
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return _resize_long(photo[y0 : y0 + ch, x0 : x0 + cw], LONG_SIDE)


def database_views(photo: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The six database views of one subject, by view name (module doc)."""
    full = _resize_long(photo, LONG_SIDE)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    sign = 1 if rng.random() < 0.5 else -1
    return {
        "full": full,
        "half": _resize_long(photo, LONG_SIDE // 2),
        "crop": make_view(photo, EASY, rng),
        "rotated": _resize_long(rotate(full, sign * rng.uniform(30, 60), fill), LONG_SIDE),
        "warped": make_view(photo, HARD, rng),
        "close": make_view(photo, JUNK, rng),
    }


VIEW_KINDS = {"easy": ("full", "half", "crop"), "hard": ("rotated", "warped"), "junk": ("close",)}


def hard_query(
    photo: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, list[float]]:
    """A query of one ``kind`` (``QUERY_KINDS``) on a texture; returns the image and its
    ``x1, y1, x2, y2`` box."""
    view = _resize_long(make_view(photo, QUERY, rng), int(LONG_SIDE * 0.75))
    if kind == "blur":
        view = cv2.GaussianBlur(view, (0, 0), 3.0)
    elif kind == "rotate":
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        sign = 1 if rng.random() < 0.5 else -1
        view = _resize_long(rotate(view, sign * rng.uniform(20, 35), fill), int(LONG_SIDE * 0.75))
    vh, vw = view.shape[:2]
    canvas_h, canvas_w = int(vh * rng.uniform(1.2, 1.4)), int(vw * rng.uniform(1.2, 1.4))
    canvas = texture(rng, canvas_h, canvas_w)
    y0 = int(rng.integers(0, canvas_h - vh + 1))
    x0 = int(rng.integers(0, canvas_w - vw + 1))
    canvas[y0 : y0 + vh, x0 : x0 + vw] = view
    box = [float(x0), float(y0), float(x0 + vw), float(y0 + vh)]
    if kind == "tight":  # the central half of each side only
        box = [x0 + vw / 4, y0 + vh / 4, x0 + 3 * vw / 4, y0 + 3 * vh / 4]
    return canvas, box


def generate(root: Path, spec: HeldoutSpec = HeldoutSpec()) -> Path:
    """Build the collection under ``root`` (cached: reused when the manifest matches).

    Layout as the demo's: ``jpg/<subject>/<view>.jpg`` and ``jpg/distractors/*.jpg`` database
    images, ``queries/<name>.jpg``, ``gnd_heldout.pkl`` (Revisited format) and its JSON twin.
    """
    if not 1 <= spec.subjects <= len(SUBJECTS) or spec.distractors < 0:
        raise UserError(
            f"the held-out collection has 1 to {len(SUBJECTS)} subjects and >= 0 distractors; "
            f"got {spec.subjects} and {spec.distractors}"
        )
    root = Path(root)
    manifest = Manifest.of(root / "manifest.json", VERSION, spec)
    if manifest.current():
        logger.info("held-out collection at %s is up to date", root)
        return root
    rng = np.random.default_rng(spec.seed)
    loaders = _photos()
    photos = {name: loaders[name]() for name in SUBJECTS[: spec.subjects]}
    write_collection(root, photos, rng, spec.distractors, "heldout")
    manifest.write()
    return root


def write_collection(
    root: Path,
    photos: dict[str, np.ndarray],
    rng: np.random.Generator,
    distractors: int,
    name: str,
    queries: int = 1,
) -> None:
    """Write the views of ``photos`` (subject -> RGB uint8), ``distractors`` textures and
    ``queries`` hard queries per subject (at most one of each of ``QUERY_KINDS``, cycling)
    under ``root``, with ``gnd_<name>.pkl`` / ``.json``; all randomness comes from ``rng``."""
    imlist: list[str] = []
    ids: dict[str, dict[str, list[int]]] = {}
    for subject, photo in photos.items():
        views = database_views(photo, rng)
        ids[subject] = {kind: [] for kind in VIEW_KINDS}
        for kind, names in VIEW_KINDS.items():
            for view in names:
                image = f"{subject}/{view}"
                _write(root / "jpg" / f"{image}.jpg", views[view])
                ids[subject][kind].append(len(imlist))
                imlist.append(image)
    for i in range(distractors):
        image = f"distractors/texture{i:03d}"
        side = int(rng.integers(LONG_SIDE * 2 // 3, LONG_SIDE + 1))
        _write(root / "jpg" / f"{image}.jpg", texture(rng, side, LONG_SIDE))
        imlist.append(image)
    qimlist, gnd = [], []
    for i, (subject, photo) in enumerate(photos.items()):
        for j in range(queries):
            kind = QUERY_KINDS[(i * queries + j) % len(QUERY_KINDS)]
            image, box = hard_query(photo, kind, rng)
            query = f"query_{subject}_{kind}"
            _write(root / "queries" / f"{query}.jpg", image)
            qimlist.append(query)
            gnd.append({"bbx": box, **{k: list(v) for k, v in ids[subject].items()}})
    ground_truth = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with open(root / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(ground_truth, f)
    (root / f"gnd_{name}.json").write_text(json.dumps(ground_truth, indent=1))
    logger.info(
        "%s collection: %d database, %d queries at %s", name, len(imlist), len(qimlist), root
    )
