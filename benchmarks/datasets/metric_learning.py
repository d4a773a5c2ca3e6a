"""Metric-learning benchmarks from their published split files: SOP, In-Shop, CUB-200-2011.

* SOP (Stanford Online Products): ``Ebay_train.txt`` / ``Ebay_test.txt`` with the header
  ``image_id class_id super_class_id path``; images at ``<folder>/<path>``. Test: 60,502
  images of 11,316 classes, every image a query against all others (self excluded).
* In-Shop (DeepFashion): ``Eval/list_eval_partition.txt`` (a count line, a header line, then
  ``image_name item_id evaluation_status``); images at ``Img/<image_name>``. Test: 14,218
  ``query`` images against 12,612 ``gallery`` images; labels are item ids.
* CUB-200-2011: ``images.txt`` (``<id> <path>``) and ``image_class_labels.txt`` (``<id> <class>``),
  images under ``images/``. Classes 1-100 train, 101-200 test (5,924 images, self excluded).

Recall@K ks per dataset: ``locore.engine.metrics.RECALL_KS`` (keyed by the dataset names here).
Queries without another image of their class (SOP/CUB singletons, In-Shop items absent from the
gallery) are left out of every metric and counted (``evaluate_metric_learning``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from locore.benchmarks.datasets.base import RetrievalDataset, check_exist, find_file, read_lines
from locore.core.errors import UserError

SOP_URL = "https://cvgl.stanford.edu/projects/lifted_struct/"
INSHOP_URL = "http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {SPLITS}")


def _self_retrieval(
    name, root, paths, labels, verify, published, names_base: Path | None = None
) -> RetrievalDataset:
    # names: paths relative to where the split file's paths start
    names = [p.relative_to(names_base or root).as_posix() for p in paths]
    if verify:
        check_exist(paths, f"{name} images", published)
    labels = np.asarray(labels, dtype=np.int64)
    return RetrievalDataset(
        name=name,
        root=Path(root),
        queries=paths,
        boxes=[None] * len(paths),
        database=paths,
        query_labels=labels,
        db_labels=labels,
        self_retrieval=True,
        query_names=names,
        db_names=names,
    )


def load_sop(root: Path, split: str = "test", verify: bool = True) -> RetrievalDataset:
    """SOP from ``Ebay_<split>.txt`` (in root or ``Stanford_Online_Products/``)."""
    _check_split(split)
    listing = find_file(root, f"Ebay_{split}.txt", (".", "Stanford_Online_Products"), SOP_URL)
    lines = read_lines(listing)
    if not lines or lines[0].split()[:2] != ["image_id", "class_id"]:
        raise UserError(f"{listing} does not start with 'image_id class_id ...'; download it again")
    rows = [line.split() for line in lines[1:]]
    if any(len(r) != 4 for r in rows):
        raise UserError(f"{listing}: every line must hold image_id class_id super_class_id path")
    paths = [listing.parent / r[3] for r in rows]
    return _self_retrieval("sop", listing.parent, paths, [int(r[1]) for r in rows], verify, SOP_URL)


def load_cub200(root: Path, split: str = "test", verify: bool = True) -> RetrievalDataset:
    """CUB-200-2011: classes 1-100 = train, 101-200 = test (root or ``CUB_200_2011/``)."""
    _check_split(split)
    folders = (".", "CUB_200_2011")
    images_txt = find_file(root, "images.txt", folders, CUB_URL)
    labels_txt = find_file(images_txt.parent, "image_class_labels.txt", (".",), CUB_URL)
    names = dict(line.split(maxsplit=1) for line in read_lines(images_txt))
    classes = dict(line.split() for line in read_lines(labels_txt))
    if names.keys() != classes.keys():
        raise UserError(f"{images_txt} and {labels_txt} list different image ids; download again")
    wanted = range(1, 101) if split == "train" else range(101, 201)
    ids = sorted((i for i in names if int(classes[i]) in wanted), key=int)
    paths = [images_txt.parent / "images" / names[i] for i in ids]
    labels = [int(classes[i]) for i in ids]
    return _self_retrieval(
        "cub200", images_txt.parent, paths, labels, verify, CUB_URL, images_txt.parent / "images"
    )


def load_inshop(root: Path, split: str = "test", verify: bool = True) -> RetrievalDataset:
    """In-Shop Clothes Retrieval: ``query`` vs ``gallery`` (test) or ``train`` self-retrieval."""
    _check_split(split)
    listing = find_file(root, "list_eval_partition.txt", ("Eval", "."), INSHOP_URL)
    lines = read_lines(listing)
    if len(lines) < 2 or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
        raise UserError(f"{listing} lacks the 'image_name item_id evaluation_status' header")
    rows = [line.split() for line in lines[2:]]
    base = next(
        (
            b
            for b in (listing.parent.parent / "Img", listing.parent / "Img", listing.parent)
            if (b / "img").is_dir()
        ),
        None,
    )
    if base is None:
        raise UserError(
            f"In-Shop images (Img/img/) not found next to {listing}; unzip Img/img.zip from "
            f"{INSHOP_URL}"
        )
    _, item_index = np.unique([r[1] for r in rows], return_inverse=True)

    def pick(status: str) -> tuple[list[Path], np.ndarray]:
        keep = [i for i, r in enumerate(rows) if r[2] == status]
        return [base / rows[i][0] for i in keep], item_index[keep].astype(np.int64)

    if split == "train":
        paths, labels = pick("train")
        return _self_retrieval("inshop", base.parent, paths, labels, verify, INSHOP_URL, base)
    queries, query_labels = pick("query")
    database, db_labels = pick("gallery")
    if verify:
        check_exist(queries + database, "In-Shop images", INSHOP_URL)
    return RetrievalDataset(
        name="inshop",
        root=base.parent,
        queries=queries,
        boxes=[None] * len(queries),
        database=database,
        query_labels=query_labels,
        db_labels=db_labels,
        query_names=[p.relative_to(base).as_posix() for p in queries],
        db_names=[p.relative_to(base).as_posix() for p in database],
    )
