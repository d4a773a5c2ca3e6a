"""Revisited Oxford / Paris (+ the revisitop1m distractors) in the official download layout.

Layout (revisitop ``python/download.py``; ``<root>`` may also be the dataset folder itself or
hold it under ``datasets/`` or ``data/datasets/``)::

    <root>/roxford5k/gnd_roxford5k.pkl      imlist, qimlist, gnd[q] = {bbx, easy, hard, junk}
    <root>/roxford5k/jpg/<name>.jpg         database images; queries are database images too
    <root>/revisitop1m/revisitop1m.txt      one relative path (with extension) per line
    <root>/revisitop1m/jpg/<path>

Database ids: the imlist order, then (``+1m``) the distractors in list order, as in the official
+1M feature files. Queries are cropped to ``bbx`` by the extractor (int truncation, P30).
"""

from __future__ import annotations

import logging
from pathlib import Path

from locore.benchmarks.datasets.base import (
    RetrievalDataset,
    check_exist,
    find_file,
    read_lines,
)
from locore.core.errors import UserError
from locore.engine.evaluate import load_gnd

logger = logging.getLogger(__name__)

DATASETS = ("roxford5k", "rparis6k")
PUBLISHED = "http://cmp.felk.cvut.cz/revisitop/"
GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"
IMAGES_URL = {
    "roxford5k": "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",
    "rparis6k": "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz and "
    "paris_2-v1.tgz",
}
DISTRACTORS_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/"
DISTRACTOR_LIST = "revisitop1m.txt"


def _folders(name: str) -> list[str]:
    return [name, f"datasets/{name}", f"data/datasets/{name}", "."]


def read_gnd(path: Path) -> dict:
    """Read and check a ``gnd_<dataset>.pkl`` with the one ground-truth reader
    (:func:`locore.engine.evaluate.load_gnd`), pointing at revisitop for a fresh copy."""
    return load_gnd(path, PUBLISHED)


def read_distractors(root: Path) -> tuple[list[str], list[Path]]:
    """The revisitop1m distractors: ``(names, paths)`` from ``revisitop1m.txt`` and ``jpg/``."""
    listing = find_file(root, DISTRACTOR_LIST, _folders("revisitop1m"), DISTRACTORS_URL)
    lines = read_lines(listing)
    images = listing.parent / "jpg"
    names = [f"revisitop1m/{Path(line).with_suffix('').as_posix()}" for line in lines]
    return names, [images / line for line in lines]


def load_revisitop(
    root: Path, name: str, with_1m: bool = False, verify: bool = True
) -> RetrievalDataset:
    """Load ``roxford5k`` / ``rparis6k`` (optionally ``+1m``) from the official layout.

    Args:
        root: folder holding ``<name>/gnd_<name>.pkl`` (or the dataset folder itself).
        name: ``roxford5k``, ``rparis6k``, or either with a ``+1m`` suffix.
        with_1m: append the revisitop1m distractors to the database.
        verify: check that every image file exists (a UserError names the first missing one).
    """
    if name.endswith("+1m"):
        name, with_1m = name[: -len("+1m")], True
    if name not in DATASETS:
        raise UserError(f"unknown Revisited dataset {name!r}; use one of {DATASETS}")
    gnd_path = find_file(root, f"gnd_{name}.pkl", _folders(name), GND_URL.format(name=name))
    gt = read_gnd(gnd_path)
    images = gnd_path.parent / "jpg"
    if not images.is_dir():
        raise UserError(
            f"image folder {images} not found; download and unpack {IMAGES_URL[name]} into it"
        )
    queries = [images / f"{n}.jpg" for n in gt["qimlist"]]
    database = [images / f"{n}.jpg" for n in gt["imlist"]]
    db_names = list(gt["imlist"])
    if verify:
        check_exist(queries + database, f"{name} images", IMAGES_URL[name])
    if with_1m:
        names, distractors = read_distractors(Path(root))
        if verify:
            check_exist(distractors, "revisitop1m images", DISTRACTORS_URL)
        database = [*database, *distractors]
        db_names = [*db_names, *names]
        logger.info(
            "%s+1m: %d database images (%d distractors)", name, len(database), len(distractors)
        )
    return RetrievalDataset(
        name=f"{name}+1m" if with_1m else name,
        root=gnd_path.parent,
        queries=queries,
        boxes=[g["bbx"] for g in gt["gnd"]],
        database=database,
        gnd=gt["gnd"],
        query_names=list(gt["qimlist"]),
        db_names=db_names,
    )
