"""What every benchmark loader returns: query and database image paths plus ground truth.

Loaders only read the public layouts and check that files exist; they never decode images, so
the pipeline decides when (and on which device) pixels are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from locore.core.atomic import write_text
from locore.core.errors import UserError
from locore.feature_extractors.io import load_image
from locore.feature_extractors.preprocess import crop_box

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in 0-based pixels


@dataclasses.dataclass(frozen=True)
class RetrievalDataset:
    """A retrieval benchmark in the engine's terms.

    Attributes:
        name: e.g. ``roxford5k``, ``rparis6k+1m``, ``gldv2-test``, ``sop``.
        root: folder the layout was read from.
        queries: query image paths, in ground-truth order.
        boxes: per query its box ``(x1, y1, x2, y2)`` as published (floats), or None. The
            extractor crops with ``int()`` truncation and exclusive ends (P30); see
            :meth:`query_crop`.
        database: database image paths; position i is database id i of every ranking.
        gnd: per query ground truth with integer id lists: ``easy``/``hard``/``junk`` (Revisited),
            ``ok`` (GLDv2); empty for label-based benchmarks.
        query_labels: ``[n_query]`` class labels (SOP, In-Shop, CUB-200), else None.
        db_labels: ``[n_db]`` class labels, else None.
        self_retrieval: queries are the database (query q is database item q) and must be
            skipped in their own ranking.
        splits: named query ranges ``(start, stop)``, e.g. GLDv2 public / private.
        query_names, db_names: the names the ground truth uses (``qimlist``/``imlist`` stems,
            GLDv2 ids, list-file paths), parallel to ``queries``/``database``.
    """

    name: str
    root: Path
    queries: list[Path]
    boxes: list[Box | None]
    database: list[Path]
    gnd: list[dict] = dataclasses.field(default_factory=list)
    query_labels: np.ndarray | None = None
    db_labels: np.ndarray | None = None
    self_retrieval: bool = False
    splits: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    query_names: list[str] = dataclasses.field(default_factory=list)
    db_names: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.queries):
            raise ValueError(f"{len(self.boxes)} boxes for {len(self.queries)} queries")
        if self.gnd and len(self.gnd) != len(self.queries):
            raise ValueError(f"{len(self.gnd)} gnd entries for {len(self.queries)} queries")
        for names, paths in ((self.query_names, self.queries), (self.db_names, self.database)):
            if names and len(names) != len(paths):
                raise ValueError(f"{len(names)} names for {len(paths)} images")

    def __repr__(self) -> str:
        return (
            f"RetrievalDataset({self.name!r}, {len(self.queries)} queries, "
            f"{len(self.database)} database images, root={str(self.root)!r})"
        )

    def iter_queries(self) -> Iterator[tuple[Path, Box | None]]:
        """``(path, box)`` per query (``engine.pipeline.extract_queries`` takes the two lists)."""
        return zip(self.queries, self.boxes)

    def query_crop(self, q: int) -> tuple[int, int, int, int] | None:
        """Query q's box in integer pixels as the official extraction uses it: ``int()``
        truncation, rows ``y1:y2`` and columns ``x1:x2`` with exclusive ends (P30)."""
        box = self.boxes[q]
        return None if box is None else tuple(int(v) for v in box)

    def load_query(self, q: int, crop: bool = True) -> np.ndarray:
        """Decode query q (RGB uint8), cropped to its box unless ``crop=False``.

        Extractors that scale by the full image size (the official ones) need the full image
        plus the box instead: use :meth:`iter_queries`.
        """
        image = load_image(self.queries[q])
        return crop_box(image, self.boxes[q]) if crop else image


def find_file(root: Path, name: str, folders: Sequence[str], published: str) -> Path:
    """``root/<folder>/<name>`` for the first folder holding it, else a UserError naming the
    file, where it was looked for and where it is published."""
    root = Path(root)
    candidates = [root / folder / name for folder in folders]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p.parent) for p in candidates)
    raise UserError(f"{name} not found (looked in {looked}); download it from {published}")


def check_exist(paths: Sequence[Path], what: str, published: str) -> None:
    """Fail on the first missing image, with how many are missing and where to get them."""
    missing = [
        p for p in tqdm(paths, desc=f"checking {what}", leave=False) if not os.path.isfile(p)
    ]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(paths)} {what} are missing (first: {missing[0]}); "
            f"download them from {published}"
        )


def read_lines(path: Path) -> list[str]:
    """Non-empty lines without surrounding whitespace."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The record a generated collection writes last: its generator's version and spec. A
    folder whose manifest matches is complete and reused; a missing, damaged or other one means
    generate again (a generator killed mid-way never wrote it)."""

    path: Path
    content: dict

    @classmethod
    def of(cls, path: Path, version: int, spec: object) -> Manifest:
        return cls(Path(path), {"version": version, "spec": dataclasses.asdict(spec)})

    def current(self) -> bool:
        try:
            return json.loads(self.path.read_text()) == self.content
        except (OSError, ValueError):
            return False

    def write(self) -> None:
        write_text(self.path, json.dumps(self.content))
