"""``locore bench offline`` (benchmarks/offline.py) and its held-out collection (heldout.py)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json

import cv2
import numpy as np
import pytest

from locore.benchmarks import fusion_grid, offline
from locore.benchmarks.datasets import demo, heldout
from locore.core import config as cfg
from locore.core.errors import UserError
from locore.engine.config import PipelineConfig, StageConfig
from locore.engine.evaluate import load_gnd


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    spec = heldout.HeldoutSpec(distractors=2)
    return heldout.generate(tmp_path_factory.mktemp("heldout") / "collection", spec)


def thumbnail(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(
        cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY
    )
    gray = gray.astype(np.float64) - gray.mean()
    return gray / max(np.linalg.norm(gray), 1e-9)


def test_no_subject_is_a_demo_photo():
    """Held-out means unseen: no subject correlates with any photo the demo loads (a renamed
    copy, e.g. scikit-image's color.png, which the demo loads as ``colorwheel``, would give ~1;
    unrelated photos stay below 0.8 at 32 x 32)."""
    ours = {name: thumbnail(load()) for name, load in heldout._photos().items()}
    assert set(ours) == set(heldout.SUBJECTS)
    theirs = {name: thumbnail(load()) for name, load in demo._photos().items()}
    for name, a in ours.items():
        for other, b in theirs.items():
            assert abs(float((a * b).sum())) < 0.8, (name, other)


def test_ground_truth_is_revisited_and_points_at_the_subject(collection):
    gt = load_gnd(collection / "gnd_heldout.pkl")
    assert len(gt["qimlist"]) == len(heldout.SUBJECTS)
    kinds = [q.rsplit("_", 1)[1] for q in gt["qimlist"]]
    assert set(kinds) == set(heldout.QUERY_KINDS)
    for query, kind, entry in zip(gt["qimlist"], kinds, gt["gnd"]):
        subject = query.removeprefix("query_").removesuffix(f"_{kind}")
        for field, views in heldout.VIEW_KINDS.items():
            assert [gt["imlist"][i] for i in entry[field]] == [f"{subject}/{v}" for v in views]
        image = cv2.imread(str(collection / "queries" / f"{query}.jpg"))
        x1, y1, x2, y2 = entry["bbx"]
        assert 0 <= x1 < x2 <= image.shape[1] and 0 <= y1 < y2 <= image.shape[0]
    for name in gt["imlist"]:
        assert (collection / "jpg" / f"{name}.jpg").is_file()


def test_same_seed_same_bytes_other_seed_differs(collection, tmp_path):
    again = heldout.generate(tmp_path / "again", heldout.HeldoutSpec(distractors=2))
    other = heldout.generate(tmp_path / "other", heldout.HeldoutSpec(seed=1, distractors=2))
    files = sorted(p.relative_to(collection) for p in collection.rglob("*.jpg"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.jpg"))
    assert all((again / f).read_bytes() == (collection / f).read_bytes() for f in files)
    assert any((other / f).read_bytes() != (collection / f).read_bytes() for f in files)


def test_bad_sizes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="1 to 13 subjects"):
        heldout.generate(tmp_path, heldout.HeldoutSpec(subjects=0))
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_chains_take_the_configs_stages_and_defaults_for_the_others():
    overrides = ["search.rerank.0.options.k=3", "search.rerank.2.options.seeds=4"]
    config = cfg.load(PipelineConfig, "demo", overrides)
    stages = offline.chain_stages("spatial+locore", config)
    assert stages[0] == StageConfig("spatial")
    assert stages[1] == next(s for s in config.search.rerank if s.name == "locore")
    stages = offline.chain_stages("superglobal+diffusion", config)
    assert stages == (StageConfig("superglobal", {"k": 3}), StageConfig("diffusion", {"seeds": 4}))
    with pytest.raises(UserError, match="locore stage"):
        offline.chain_stages("locore", PipelineConfig())


def test_run_writes_one_consistent_table(tmp_path, capsys):
    """Three held-out subjects at 192 px: the printed, JSON and CSV tables agree with each
    chain's own ``locore eval`` report, whose global row is the same for every chain."""
    args = argparse.Namespace(
        config="demo",
        overrides=["extractor.options.imsize=192"],
        out=tmp_path,
        seed=0,
        collections=["heldout"],
        chains=["spatial", "superglobal"],
        subjects=3,
        distractors=2,
        save_logits=False,
    )
    assert offline.run(args) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "offline.json").read_text())["results"]["heldout"]
    assert list(results) == ["global", "spatial", "superglobal"]
    for chain in ("spatial", "superglobal"):
        report = json.loads((tmp_path / "heldout" / chain / "metrics.json").read_text())
        assert results[chain]["medium"] == report["after"]["medium"]["map"]
        assert results["global"]["medium"] == report["before"]["medium"]["map"]
    with open(tmp_path / "offline.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["chain"] for r in rows] == ["global", "spatial", "superglobal"]
    for row in rows:
        assert float(row["medium"]) == pytest.approx(results[row["chain"]]["medium"], abs=0.005)
        assert f"{results[row['chain']]['medium']:8.2f}" in printed
    # one panel: the one collection
    assert cv2.imread(str(tmp_path / "offline.png")).shape == (300, 320, 3)


def test_saved_logits_replay_the_single_window_locore_chain(tmp_path):
    """``--save-logits`` caches what ``bench fusion-grid`` replays: per chain ending with LoCoRe,
    its cell at the stage's (alpha, temp) is that chain's mAP with one LoCoRe window, alpha = 1
    the mAP of the ranking LoCoRe received (global, or SuperGlobal's)."""
    config = cfg.load(PipelineConfig, "demo", ["extractor.options.imsize=192"])
    (stage,) = offline.chain_stages("locore", config)
    options = {**stage.options, "sliding": None, "alpha": 0.3, "temp": 0.7}
    search = dataclasses.replace(config.search, rerank=(StageConfig("locore", options),))
    config = dataclasses.replace(config, search=search)
    spec = heldout.HeldoutSpec(subjects=3, distractors=2)
    chains = ["superglobal", "locore", "superglobal+locore"]
    rows = offline.evaluate_chains("heldout", tmp_path, 0, config, chains, spec, True)
    assert not (tmp_path / "heldout" / "superglobal" / "fusion_logits_hard.npz").exists()
    for chain, incoming in (("locore", "global"), ("superglobal+locore", "superglobal")):
        path = tmp_path / "heldout" / chain / "fusion_logits_hard.npz"
        cache = fusion_grid.FusionCache.load(path)
        assert cache.info["options"] == options and cache.info["chain"] == chain.split("+")
        grid = fusion_grid.grid_search(cache, (0.3, 1.0), (0.7,))
        assert rows[chain] != rows[incoming]  # the model moved something
        for protocol in ("medium", "hard"):
            assert grid.at(0.3, 0.7)[protocol] == pytest.approx(rows[chain][protocol], abs=1e-9)
            assert grid.at(1.0, 0.7)[protocol] == pytest.approx(rows[incoming][protocol], abs=1e-9)
