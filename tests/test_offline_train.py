"""The offline re-ranker's data (benchmarks/datasets/offline_train.py): split by photo, unseen by
both evaluation collections, deterministic for a seed."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from locore.benchmarks.datasets import demo, heldout, offline_train
from locore.core.errors import UserError
from locore.engine.evaluate import load_gnd

SMALL = offline_train.OfflineTrainSpec(train_views=2, val_views=2, distractors=2)


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    return offline_train.generate_lists(tmp_path_factory.mktemp("offline") / "data", SMALL)


def _labels(root, split) -> dict[str, str]:
    lines = (root / split / "labels.txt").read_text().splitlines()
    return dict(line.rsplit(",", 1) for line in lines)


def _found_in(tile: np.ndarray, photo: np.ndarray) -> float:
    """Best normalised correlation of ``tile`` placed anywhere in ``photo`` (both at 1/4 size):
    ~1 when the tile was cut from the photo."""
    small = [
        cv2.cvtColor(
            cv2.resize(x, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY
        )
        for x in (tile, photo)
    ]
    if any(a > b for a, b in zip(small[0].shape, small[1].shape)):
        return 0.0  # larger than the photo: cannot come from it
    return float(cv2.matchTemplate(small[1], small[0], cv2.TM_CCOEFF_NORMED).max())


def test_splits_share_no_photo_and_no_subject(lists):
    train, val = _labels(lists, "train"), _labels(lists, "val")
    assert set(train.values()) == set(offline_train.subjects("train"))
    assert set(val.values()) == set(offline_train.subjects("val"))
    assert not set(train.values()) & set(val.values())
    photo = {name: name.split("_r")[0] for name in [*train.values(), *val.values()]}
    assert {photo[s] for s in train.values()} == set(offline_train.TRAINING_PHOTOS)
    assert {photo[s] for s in val.values()} == set(offline_train.VALIDATION_PHOTOS)
    for split, labels in (("train", train), ("val", val)):
        assert len(labels) == len(set(labels.values())) * 2  # 2 views per subject (SMALL)
        assert all((lists / split / "jpg" / f"{name}.jpg").is_file() for name in labels)


def test_no_tile_comes_from_an_evaluated_photo():
    """Neither the demo's evaluation scenes nor the held-out subjects are used: checked on the
    pixels, since a renamed copy (scikit-image's color.png is the demo's ``colorwheel``) would
    pass a check of names."""
    loaders = demo._photos()
    evaluated = {name: loaders[name]() for name in (*demo.EVAL_SCENES, "motorcycle_right")}
    evaluated |= {name: load() for name, load in heldout._photos().items()}
    assert not set(offline_train.PHOTOS) & set(evaluated)
    camera = offline_train.subjects("val")["camera_r1c0"]
    assert _found_in(camera, loaders["camera"]()) > 0.95  # the check finds a tile's source
    for split in offline_train.SPLITS:
        for name, tile in offline_train.subjects(split).items():
            for photo, image in evaluated.items():
                assert _found_in(tile, image) < 0.8, (name, photo)


def test_same_seed_same_bytes_other_seed_differs(lists, tmp_path):
    again = offline_train.generate_lists(tmp_path / "again", SMALL)
    other = offline_train.generate_lists(
        tmp_path / "other",
        offline_train.OfflineTrainSpec(seed=1, train_views=2, val_views=2, distractors=2),
    )
    files = sorted(p.relative_to(lists) for p in lists.rglob("*.jpg"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.jpg"))
    assert all((again / f).read_bytes() == (lists / f).read_bytes() for f in files)
    assert (
        sum((other / f).read_bytes() != (lists / f).read_bytes() for f in files) > len(files) // 2
    )


def test_validation_collection_holds_only_validation_subjects(tmp_path):
    root = offline_train.validation_collection(tmp_path / "collection", SMALL)
    gt = load_gnd(root / "gnd_validation.pkl")
    subjects = offline_train.subjects("val")
    assert len(gt["qimlist"]) == len(subjects) * SMALL.queries
    for query, entry in zip(gt["qimlist"], gt["gnd"]):
        subject = query.removeprefix("query_").rsplit("_", 1)[0]
        assert subject in subjects
        for field, views in heldout.VIEW_KINDS.items():
            assert [gt["imlist"][i] for i in entry[field]] == [f"{subject}/{v}" for v in views]


def test_bad_sizes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="at least 2"):
        offline_train.generate_lists(tmp_path, offline_train.OfflineTrainSpec(val_views=1))
    with pytest.raises(UserError, match="1 to 3 queries"):
        offline_train.validation_collection(tmp_path, offline_train.OfflineTrainSpec(queries=4))
    assert not any(tmp_path.iterdir())
