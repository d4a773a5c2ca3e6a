"""Fusion (alpha, temp) stored with a checkpoint (``fusion.json``) is the locore stage's default;
an explicit stage option wins, and a checkpoint without one keeps LocoreOptions' pair."""

from __future__ import annotations

import json

import pytest
from rerank_helpers import save_micro

from locore import rerank
from locore.core.errors import UserError
from locore.engine.config import StageConfig
from locore.rerank.chain import build_stage
from locore.rerank.locore.checkpoint import FUSION_NAME, WEIGHTS_NAME, read_fusion
from locore.rerank.locore.reranker import LocoreOptions


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    folder = save_micro(tmp_path_factory.mktemp("ckpt") / "model")
    (folder / FUSION_NAME).write_text(json.dumps({"alpha": 0.7, "temp": 0.3, "objective": "x"}))
    return folder


def _fusion(stage) -> tuple[float, float]:
    return stage.options.alpha, stage.options.temp


def test_stored_fusion_is_the_stage_default(calibrated):
    stage = build_stage(StageConfig("locore", {"checkpoint": str(calibrated), "device": "cpu"}))
    assert _fusion(stage) == (0.7, 0.3)


def test_explicit_options_override_the_stored_fusion(calibrated):
    both = rerank.create("locore", checkpoint=str(calibrated), alpha=0.2, temp=0.9, device="cpu")
    assert _fusion(both) == (0.2, 0.9)
    alpha_only = rerank.create("locore", checkpoint=str(calibrated), alpha=1.0, device="cpu")
    assert _fusion(alpha_only) == (1.0, 0.3)  # the other one still comes from the checkpoint


def test_without_a_fusion_file_the_defaults_stay(calibrated, tmp_path):
    bare = save_micro(tmp_path / "bare")
    defaults = (LocoreOptions.alpha, LocoreOptions.temp)
    assert _fusion(rerank.create("locore", checkpoint=str(bare), device="cpu")) == defaults
    # a bare weights file is read without its folder, so a fusion.json beside it does not apply
    assert read_fusion(calibrated / WEIGHTS_NAME) == {}
    assert read_fusion(calibrated) == {"alpha": 0.7, "temp": 0.3}


def test_a_damaged_fusion_file_is_a_user_error(tmp_path):
    folder = save_micro(tmp_path / "model")
    (folder / FUSION_NAME).write_text('{"alpha": "high"}')
    with pytest.raises(UserError, match="no numeric 'alpha' and 'temp'"):
        rerank.create("locore", checkpoint=str(folder), device="cpu")
