"""A synthetic Revisited(+1M) AMES data release at any size, written in streaming chunks.

The layout is the one ``locore bench revisitop --from-official DIR`` reads (reference-spec §1.1,
§1.3-§1.6), so the real command can be measured at 10k, 100k and 1M distractors where no real
release fits or can be downloaded::

    DIR/roxford5k/gnd_roxford5k.pkl              imlist (4,993), qimlist (70), gnd[q]
    DIR/roxford5k/<desc>_query_local.hdf5        flat float32 ``features`` [70, K, 5 + D]
    DIR/roxford5k/<desc>_query_global.pt         raw float32 [70, D]
    DIR/roxford5k+1m/<desc>_gallery_local.hdf5   flat float32 [4,993 + N, K, 5 + D], contiguous
    DIR/roxford5k+1m/<desc>_gallery_global.pt    raw float32 [4,993 + N, D]
    DIR/roxford5k+1m/nn_superglobal.pkl          pickle.dump of a float32 tensor [2, 70, M]
    DIR/release.json                             the spec, written last: the release is complete

Content: each query belongs to one of ``landmarks`` landmarks (70 / 14 = 5 queries each, as the
Oxford queries come in fives) and shares that landmark's ground truth. A landmark is a template of
K local descriptors and a global direction. An image of it copies a share of the template's rows
(``VISIBILITY``: easy images most, junk least), with noise, into its leading (highest-weight)
rows, and its global descriptor leans towards the landmark's direction by the same share.
Everything else (other Oxford images, the distractors) is random. So positives share structure
with their query that a re-ranker can find, and hard positives sink among a million random
globals as on the real +1M.

Memory: images are generated and written ``CHUNK`` at a time from a generator seeded by
``(seed, part, chunk index)``; the same spec gives the same bytes (the ``nn_*.pkl`` pickle
aside: torch names its storage by an address; its values are the same). The shortlist keeps a
running top-M; ``nn_depth=None`` (M = every image, the stress case of issue #16) holds ``[Q, N]``
similarities instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from locore.core.errors import UserError
from locore.core.layout import NUM_META

CHUNK = 2048  # images generated and written per step
DATASET = "roxford5k"  # its sizes: 4,993 database images, 70 queries
NUM_DATABASE = 4993  # the Oxford 5k database (roxford5k imlist)
NUM_QUERIES = 70
VISIBILITY = {"query": 0.9, "easy": 0.7, "hard": 0.4, "junk": 0.15}  # share of template rows
PER_LANDMARK = {"easy": 25, "hard": 35, "junk": 15}  # database images of each landmark
NOISE = 0.35  # descriptor noise added to a copied template row (before normalisation)
SPEC_FILE = "release.json"
PARTS = {"query": 1, "gallery": 2}  # seeds the generator of each file


@dataclasses.dataclass(frozen=True)
class ReleaseSpec:
    """What to generate; the folder is reused when ``release.json`` holds the same spec."""

    distractors: int = 10_000  # N revisitop1m-style images after the 4,993 database images
    dim: int = 64  # D, local and global descriptor size (768 in the real release)
    num_local: int = 48  # K, local descriptors per image (700 in the real release)
    nn_depth: int | None = 1600  # M, columns of nn_superglobal.pkl; None = every image
    landmarks: int = 14  # queries are split evenly among them
    seed: int = 0
    desc_name: str = "dinov2"

    def __post_init__(self) -> None:
        if self.distractors < 0 or self.dim < 2 or self.num_local < 1:
            raise UserError(f"synthetic release: bad sizes in {self}")
        if NUM_QUERIES % self.landmarks:
            raise UserError(f"{NUM_QUERIES} queries do not split into {self.landmarks} landmarks")
        if self.landmarks * sum(PER_LANDMARK.values()) > NUM_DATABASE:
            raise UserError(f"{self.landmarks} landmarks do not fit {NUM_DATABASE} images")
        if self.nn_depth is not None and self.nn_depth < 1:
            raise UserError("nn_depth must be >= 1 (or None for every image)")

    @property
    def num_gallery(self) -> int:
        return NUM_DATABASE + self.distractors

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Who is what: ``landmark``/``visibility`` per query and per database image (-1 / 0 for
    images of no landmark), and each landmark's ground truth."""

    query_landmark: np.ndarray  # [70] int64
    db_landmark: np.ndarray  # [4993] int64
    db_visibility: np.ndarray  # [4993] float32
    gnd: list[dict]
    templates: np.ndarray  # [landmarks, K, D] float32 unit rows
    directions: np.ndarray  # [landmarks, D] float32 unit global directions


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _plan(spec: ReleaseSpec) -> _Plan:
    rng = np.random.default_rng([spec.seed, 0])
    templates = _unit(rng.standard_normal((spec.landmarks, spec.num_local, spec.dim), np.float32))
    directions = _unit(rng.standard_normal((spec.landmarks, spec.dim), np.float32))
    slots = rng.permutation(NUM_DATABASE)
    db_landmark = np.full(NUM_DATABASE, -1, np.int64)
    db_visibility = np.zeros(NUM_DATABASE, np.float32)
    ground: list[dict] = []
    taken = 0
    for lm in range(spec.landmarks):
        entry = {}
        for kind, count in PER_LANDMARK.items():
            ids = np.sort(slots[taken : taken + count])
            taken += count
            db_landmark[ids], db_visibility[ids] = lm, VISIBILITY[kind]
            entry[kind] = ids
        ground.append(entry)
    per = NUM_QUERIES // spec.landmarks
    query_landmark = np.repeat(np.arange(spec.landmarks), per)
    gnd = [{"bbx": np.array([10.0, 20.0, 310.0, 420.0]), **ground[lm]} for lm in query_landmark]
    return _Plan(query_landmark, db_landmark, db_visibility, gnd, templates, directions)


def _images(
    spec: ReleaseSpec, plan: _Plan, landmark: np.ndarray, visibility: np.ndarray, seed: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Flat rows ``[n, K, 5 + D]`` and globals ``[n, D]`` (float32) of ``n`` images."""
    rng = np.random.default_rng(seed)
    n, K, D = len(landmark), spec.num_local, spec.dim
    desc = rng.standard_normal((n, K, D), np.float32)
    glob = _unit(rng.standard_normal((n, D), np.float32))
    for i in np.flatnonzero(landmark >= 0):
        lm, v = landmark[i], float(visibility[i])
        shared = max(1, round(v * K))
        pick = np.sort(rng.choice(K, shared, replace=False))
        desc[i, :shared] = plan.templates[lm, pick] + NOISE * desc[i, :shared] / np.sqrt(D)
        glob[i] = v * plan.directions[lm] + np.sqrt(1 - v * v) * glob[i]
    desc = _unit(desc)
    rows = np.zeros((n, K, NUM_META + D), np.float32)
    rows[..., 0:2] = rng.random((n, K, 2), np.float32)  # patch centres (unused by the models)
    rows[..., 4] = np.linspace(1.0, 0.1, K, dtype=np.float32)  # detector weight, non-increasing
    rows[..., NUM_META:] = desc
    valid = rng.integers(K // 2 + 1, K + 1, n)  # some images have fewer patches than K
    valid[landmark >= 0] = K
    pad = np.arange(K)[None, :] >= valid[:, None]
    rows[pad] = 0.0
    rows[pad, 3] = 1.0
    return rows, _unit(glob).astype(np.float32)


def _chunks(
    spec: ReleaseSpec, plan: _Plan, part: str
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(start, rows, globals)`` of the query or gallery file, CHUNK images at a time."""
    if part == "query":
        landmark = plan.query_landmark
        visibility = np.full(NUM_QUERIES, VISIBILITY["query"], np.float32)
        total = NUM_QUERIES
    else:
        landmark, visibility, total = plan.db_landmark, plan.db_visibility, spec.num_gallery
    for c, start in enumerate(range(0, total, CHUNK)):
        stop = min(start + CHUNK, total)
        lm = np.full(stop - start, -1, np.int64)
        vis = np.zeros(stop - start, np.float32)
        known = max(0, min(stop, len(landmark)) - start)
        lm[:known], vis[:known] = landmark[start : start + known], visibility[start : start + known]
        rows, glob = _images(spec, plan, lm, vis, [spec.seed, PARTS[part], c])
        yield start, rows, glob


class _TopM:
    """Running top-M (or, with ``m=None``, every) similarity per query over gallery chunks."""

    def __init__(self, queries: np.ndarray, m: int | None):
        self.q, self.m = queries, m
        self.sims = np.zeros((len(queries), 0), np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)

    def add(self, start: int, glob: np.ndarray) -> None:
        sims = np.concatenate([self.sims, self.q @ glob.T], axis=1)
        new = np.broadcast_to(start + np.arange(len(glob)), (len(self.q), len(glob)))
        ids = np.concatenate([self.ids, new], axis=1)
        if self.m is not None and sims.shape[1] > self.m:
            keep = np.argpartition(-sims, self.m - 1, axis=1)[:, : self.m]
            sims, ids = np.take_along_axis(sims, keep, 1), np.take_along_axis(ids, keep, 1)
        self.sims, self.ids = sims, ids

    def result(self) -> np.ndarray:
        """``[2, Q, M]`` float32: similarities, then ids, best first (ties by id)."""
        order = np.lexsort((self.ids, -self.sims), axis=1)
        return np.stack(
            [np.take_along_axis(self.sims, order, 1), np.take_along_axis(self.ids, order, 1)]
        ).astype(np.float32)


def _write_part(
    spec: ReleaseSpec, plan: _Plan, part: str, folder: Path, top: _TopM | None
) -> np.ndarray:
    """Write one local HDF5 + global .pt pair; returns the globals of the query part."""
    total = NUM_QUERIES if part == "query" else spec.num_gallery
    shape = (total, spec.num_local, NUM_META + spec.dim)
    queries = []
    with (
        h5py.File(folder / f"{spec.desc_name}_{part}_local.hdf5", "w") as h5,
        open(folder / f"{spec.desc_name}_{part}_global.pt", "wb") as pt,
    ):
        features = h5.create_dataset(
            "features", shape=shape, dtype="<f4", track_times=False
        )  # contiguous, no timestamp: the same spec gives the same bytes
        for start, rows, glob in _chunks(spec, plan, part):
            features[start : start + len(rows)] = rows
            pt.write(glob.astype("<f4").tobytes())
            if top is not None:
                top.add(start, glob)
            if part == "query":
                queries.append(glob)
    return np.concatenate(queries) if queries else np.zeros((0, spec.dim), np.float32)


def is_complete(root: Path, spec: ReleaseSpec) -> bool:
    """True when ``root`` holds the whole release of ``spec``."""
    marker = Path(root) / SPEC_FILE
    return marker.is_file() and json.loads(marker.read_text()) == spec.as_dict()


def generate(root: Path, spec: ReleaseSpec) -> Path:
    """Write the release for ``spec`` into ``root`` (reused when ``root/release.json`` holds the
    same spec; a release of another spec is replaced). Returns ``root``."""
    import torch

    root = Path(root)
    if is_complete(root, spec):
        return root
    if root.exists() and not (root / SPEC_FILE).is_file() and any(root.iterdir()):
        raise UserError(f"{root} holds files but no {SPEC_FILE}; give an empty or new folder")
    partial = root.with_name(f"{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    base, full = partial / DATASET, partial / f"{DATASET}+1m"
    base.mkdir(parents=True)
    full.mkdir()
    plan = _plan(spec)
    with open(base / f"gnd_{DATASET}.pkl", "wb") as f:
        pickle.dump(
            {
                "imlist": [f"synth_{i:04d}" for i in range(NUM_DATABASE)],
                "qimlist": [f"synth_query_{q:02d}" for q in range(NUM_QUERIES)],
                "gnd": plan.gnd,
            },
            f,
        )
    q_glob = _write_part(spec, plan, "query", base, None)
    top = _TopM(q_glob, spec.nn_depth)
    _write_part(spec, plan, "gallery", full, top)
    with open(full / "nn_superglobal.pkl", "wb") as f:  # as LOCORE's prepare_topk_global.py
        pickle.dump(torch.from_numpy(top.result()), f)
    (partial / SPEC_FILE).write_text(json.dumps(spec.as_dict(), indent=1))
    if root.exists():
        shutil.rmtree(root)
    os.replace(partial, root)
    return root


def release_bytes(root: Path) -> int:
    """Bytes on disk of every file of a release."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
