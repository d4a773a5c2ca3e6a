"""GLDv2 retrieval test set (``gldv2-test``: 1,129 queries, 379 public then 750 private).

Two layouts are read:

* the CVDF release (https://github.com/cvdfoundation/google-landmark)::

      <root>/retrieval_solution_v2.1.csv   id,images,Usage (Public / Private / Ignored)
      <root>/index.csv                     id (database order)
      <root>/index/a/b/c/<id>.jpg, <root>/test/a/b/c/<id>.jpg   (a, b, c = first id characters)

  Queries are the Public rows in file order, then the Private rows; Ignored rows are dropped.
  That the AMES/LOCORE gnd uses this same order is inferred from its public-first split.
* the AMES/LOCORE files: ``<root>/gldv2-test/gnd_gldv2-test.pkl`` (``gnd[q] = {"ok": ids}``)
  with the image lists ``test_query.txt`` / ``test_gallery.txt`` beside it (field 0 of each
  line = path relative to ``images_root``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from locore.benchmarks.datasets.base import (
    RetrievalDataset,
    check_exist,
    find_file,
    read_lines,
)
from locore.core.errors import UserError
from locore.engine.evaluate import read_pickle
from locore.engine.metrics import GLDV2_PUBLIC

CVDF = "https://github.com/cvdfoundation/google-landmark"
SOLUTION_URL = "https://s3.amazonaws.com/google-landmark/ground_truth/retrieval_solution_v2.1.csv"
INDEX_URL = "https://s3.amazonaws.com/google-landmark/metadata/index.csv"
AMES_RELEASE = "the AMES data release (https://github.com/pavelsuma/ames)"
SOLUTION = "retrieval_solution_v2.1.csv"
GND = "gnd_gldv2-test.pkl"
CSV_FOLDERS = (".", "metadata", "ground_truth", "gldv2")


def image_path(images: Path, image_id: str) -> Path:
    """CVDF sharding: ``0123456789abcdef`` -> ``images/0/1/2/0123456789abcdef.jpg``."""
    return Path(images) / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def _csv_rows(path: Path, columns: tuple[str, ...]) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        absent = [c for c in columns if c not in (reader.fieldnames or [])]
        if absent:
            raise UserError(f"{path} has no {absent[0]!r} column; is it the GLDv2 file?")
        return list(reader)


def read_solution(path: Path, index_ids: list[str]) -> tuple[list[str], list[dict], int]:
    """``(query ids, gnd [{"ok": [index positions]}], n_public)`` from the solution CSV."""
    position = {image_id: i for i, image_id in enumerate(index_ids)}
    split = {"Public": [], "Private": []}
    for row in _csv_rows(path, ("id", "images", "Usage")):
        if row["Usage"] in split:
            split[row["Usage"]].append(row)
    queries, gnd = [], []
    for row in split["Public"] + split["Private"]:
        ok = []
        for image_id in row["images"].split():
            if image_id not in position:
                raise UserError(
                    f"{path}: query {row['id']} lists index image {image_id} missing from "
                    f"index.csv; download index.csv again from {INDEX_URL}"
                )
            ok.append(position[image_id])
        queries.append(row["id"])
        gnd.append({"ok": ok})
    return queries, gnd, len(split["Public"])


def _load_cvdf(root: Path, solution: Path, verify: bool) -> RetrievalDataset:
    index_csv = find_file(root, "index.csv", CSV_FOLDERS, INDEX_URL)
    index_ids = [row["id"] for row in _csv_rows(index_csv, ("id",))]
    query_ids, gnd, n_public = read_solution(solution, index_ids)
    queries = [image_path(root / "test", i) for i in query_ids]
    database = [image_path(root / "index", i) for i in index_ids]
    if verify:
        check_exist(queries, "GLDv2 test images", CVDF)
        check_exist(database, "GLDv2 index images", CVDF)
    return _dataset(root, queries, database, gnd, n_public, (query_ids, index_ids))


def public_count(num_queries: int) -> int:
    """Queries of the public split: the first 379 (all of a smaller set, e.g. a test subset)."""
    return min(GLDV2_PUBLIC, num_queries)


def read_ok_gnd(path: Path) -> list[dict]:
    """``gnd`` of an AMES ``gnd_gldv2-test.pkl`` as ``[{"ok": [int]}]``.

    Id fields become plain int lists whatever container the pickle used (P18), so the result
    survives JSON (per-query reports, the fusion-grid cache).
    """
    path = Path(path)
    raw = read_pickle(path, AMES_RELEASE)
    if not isinstance(raw, dict) or "gnd" not in raw:
        raise UserError(f"{path} has no 'gnd': it is not the gldv2-test ground truth")
    gnd = [{"ok": np.asarray(g["ok"], dtype=np.int64).reshape(-1).tolist()} for g in raw["gnd"]]
    if any(min(g["ok"], default=0) < 0 for g in gnd):
        raise UserError(f"{path} holds negative index ids; the file is corrupt")
    return gnd


def read_list_names(folder: Path) -> tuple[list[str], list[str]]:
    """Field 0 (the image path) of every line of ``test_query.txt`` and ``test_gallery.txt``."""
    lists = [
        find_file(folder, n, (".",), AMES_RELEASE) for n in ("test_query.txt", "test_gallery.txt")
    ]
    queries, gallery = ([line.split(",")[0] for line in read_lines(p)] for p in lists)
    return queries, gallery


def _load_ames(root: Path, gnd_path: Path, images_root: Path, verify: bool) -> RetrievalDataset:
    gnd = read_ok_gnd(gnd_path)
    rel_queries, rel_database = read_list_names(gnd_path.parent)
    queries = [images_root / n for n in rel_queries]
    database = [images_root / n for n in rel_database]
    if len(gnd) != len(queries):
        raise UserError(f"{gnd_path}: {len(gnd)} gnd entries for {len(queries)} queries")
    top = max((max(g["ok"]) for g in gnd if g["ok"]), default=-1)
    if top >= len(database):
        raise UserError(f"{gnd_path} references index id {top} beyond test_gallery.txt")
    if verify:
        check_exist(queries + database, "GLDv2 images", CVDF)
    return _dataset(
        root, queries, database, gnd, public_count(len(gnd)), (rel_queries, rel_database)
    )


def _dataset(root, queries, database, gnd, n_public: int, names) -> RetrievalDataset:
    return RetrievalDataset(
        name="gldv2-test",
        root=Path(root),
        queries=queries,
        boxes=[None] * len(queries),
        database=database,
        gnd=gnd,
        splits={"public": (0, n_public), "private": (n_public, len(gnd))},
        query_names=list(names[0]),
        db_names=list(names[1]),
    )


def load_gldv2(
    root: Path, images_root: Path | None = None, verify: bool = True
) -> RetrievalDataset:
    """Load gldv2-test from the AMES/LOCORE files if present, else from the CVDF CSVs.

    Args:
        root: folder holding ``gldv2-test/gnd_gldv2-test.pkl`` or ``retrieval_solution_v2.1.csv``.
        images_root: base of the paths in ``test_query.txt``/``test_gallery.txt`` (AMES layout;
            default ``root``).
        verify: check that every image file exists.
    """
    root = Path(root)
    for folder in ("gldv2-test", "."):
        if (root / folder / GND).is_file():
            return _load_ames(root, root / folder / GND, Path(images_root or root), verify)
    for folder in CSV_FOLDERS:
        if (root / folder / SOLUTION).is_file():
            return _load_cvdf(root, root / folder / SOLUTION, verify)
    raise UserError(
        f"neither {GND} nor {SOLUTION} found under {root}; download {SOLUTION_URL} and "
        f"{INDEX_URL} (images: {CVDF}), or the gldv2-test files of {AMES_RELEASE}"
    )
