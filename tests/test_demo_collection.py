"""The demo collection is deterministic, in the official gnd format, with a held-out eval split."""

from __future__ import annotations

import hashlib
import pickle

from locore.benchmarks.datasets.demo import EVAL_SCENES, TRAIN_SCENES, DemoSpec, generate

SMALL = DemoSpec(easy=1, hard=1, junk=1, queries=1, train_views=1, distractors=3)


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.jpg")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    h.update((root / "gnd_demo.pkl").read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _digest(generate(tmp_path / "a", SMALL))
    b = _digest(generate(tmp_path / "b", SMALL))
    c = _digest(generate(tmp_path / "c", DemoSpec(**{**SMALL.__dict__, "seed": 1})))
    assert a == b != c


def test_ground_truth_format_and_splits(tmp_path):
    root = generate(tmp_path / "demo", SMALL)
    with open(root / "gnd_demo.pkl", "rb") as f:
        gt = pickle.load(f)
    assert set(gt) == {"imlist", "qimlist", "gnd"}
    assert len(gt["qimlist"]) == len(gt["gnd"]) == len(EVAL_SCENES)
    for name, entry in zip(gt["qimlist"], gt["gnd"]):
        scene = name.removeprefix("query_")[:-1]
        assert set(entry) == {"bbx", "easy", "hard", "junk"}
        x1, y1, x2, y2 = entry["bbx"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2
        for key in ("easy", "hard", "junk"):
            assert all(gt["imlist"][i].startswith(scene + "_" + key) for i in entry[key])
        assert (root / "queries" / f"{name}.jpg").is_file()
    assert all((root / "jpg" / f"{n}.jpg").is_file() for n in gt["imlist"])
    # the training split never shows an evaluation photo
    train = (root / "train" / "labels.txt").read_text().split()
    assert len(train) == len(TRAIN_SCENES)
    assert not any(line.split(",")[0].startswith(EVAL_SCENES) for line in train)


def test_cached_collection_is_reused(tmp_path):
    root = generate(tmp_path / "demo", SMALL)
    marker = root / "jpg" / "astronaut_easy0.jpg"
    mtime = marker.stat().st_mtime_ns
    generate(tmp_path / "demo", SMALL)
    assert marker.stat().st_mtime_ns == mtime


def test_a_damaged_manifest_means_generate_again(tmp_path):
    root = generate(tmp_path / "demo", SMALL)
    digest = _digest(root)
    (root / "manifest.json").write_text('{"version": ')  # a writer killed mid-write
    marker = root / "jpg" / "astronaut_easy0.jpg"
    mtime = marker.stat().st_mtime_ns
    assert _digest(generate(tmp_path / "demo", SMALL)) == digest
    assert marker.stat().st_mtime_ns != mtime  # written again, not reused
