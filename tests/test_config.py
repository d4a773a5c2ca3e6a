"""Config loading: presets, overrides, unknown keys and wrong types fail with the valid keys."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from locore.core import config as cfg
from locore.core.errors import UserError
from locore.engine.config import PipelineConfig, StageConfig


def test_defaults_and_preset():
    default = cfg.load(PipelineConfig)
    assert default.search.topk == 400 and default.extractor.name == "efficientnet_lite0"
    demo = cfg.load(PipelineConfig, "demo")
    assert demo.search.topk == 100 and demo.extractor.options["num_local"] == 49
    with pytest.raises(dataclasses.FrozenInstanceError):
        demo.search.topk = 5  # type: ignore[misc]


def test_overrides_nested_lists_and_types():
    config = cfg.load(
        PipelineConfig,
        "default",
        ["search.topk=50", "extractor.options.imsize=512", "search.rerank=[{name: superglobal}]"],
    )
    assert config.search.topk == 50
    assert config.extractor.options == {"num_local": 49, "imsize": 512}
    assert config.search.rerank == (StageConfig("superglobal", {}),)
    demo = cfg.load(PipelineConfig, "demo", ["search.rerank.1.options.checkpoint=runs/mine"])
    first, stage, last = demo.search.rerank
    assert first == StageConfig("superglobal", {}) and last == StageConfig("diffusion", {})
    assert stage.options["checkpoint"] == "runs/mine" and stage.options["window"] == 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["search.topkk=5"],
            "unknown config key search.topkk; valid keys here: ['rerank', 'show', 'topk']",
        ),
        (["serch.topk=5"], "unknown config key serch"),
        (["search.topk=many"], "config key search.topk must be int"),
        (["search.topk=true"], "config key search.topk must be int"),
        (["search.rerank=[{options: {}}]"], "needs key 'name'"),
        (["novalue"], "must look like key.sub=value"),
        (["search.rerank.0.name=x"], "search.rerank holds 0 items (none to change); set the whole"),
    ],
)
def test_bad_keys_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(UserError, match=None) as err:
        cfg.load(PipelineConfig, "default", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_lists_choices(tmp_path):
    with pytest.raises(UserError, match="choose one of .*'default'.*'demo'"):
        cfg.load(PipelineConfig, "nosuchpreset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        cfg.load(PipelineConfig, bad)
    with pytest.raises(UserError, match="does not exist"):
        cfg.load(PipelineConfig, tmp_path / "missing.yaml")


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    # `locore demo --out demo` leaves a folder "demo"; `--config demo` must still be the preset.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert cfg.load(PipelineConfig, "demo").search.topk == 100
    (tmp_path / "mine").write_text("search: {topk: 7}")
    assert cfg.load(PipelineConfig, "mine").search.topk == 7  # an existing file is a path


def test_saved_config_round_trips(tmp_path):
    config = cfg.load(
        PipelineConfig, "demo", ["search.rerank=[{name: locore, options: {alpha: 0.3}}]"]
    )
    path = cfg.save(config, tmp_path / "config.yaml")
    assert yaml.safe_load(path.read_text())["search"]["rerank"][0]["options"]["alpha"] == 0.3
    assert cfg.load(PipelineConfig, path) == config
