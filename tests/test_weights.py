"""The weights resolver: local first, safetensors first, network only for Hub ids and URLs."""

from __future__ import annotations

import argparse

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import save_file

from locore.core import weights
from locore.core.errors import UserError


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network used: {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_folder_prefers_safetensors(tmp_path, no_network):
    save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    torch.save({"a": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert weights.resolve(tmp_path) == tmp_path / "model.safetensors"
    assert weights.load_state(tmp_path, "test")["a"].item() == 1.0


def test_missing_local_files_never_reach_the_hub(tmp_path, no_network):
    for source in ("checkpoints/model.pth", str(tmp_path / "x.safetensors"), "a/b/c"):
        with pytest.raises(UserError, match="not found"):
            weights.resolve(source)


def test_hub_ids_try_the_candidate_files_in_order(tmp_path, monkeypatch):
    calls = []
    target = tmp_path / "pytorch_model.bin"

    def fake(repo, name, cache_dir=None):
        calls.append((repo, name))
        if name == "model.safetensors":
            raise EntryNotFoundError("no such file")
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    assert weights.resolve("org/model") == target
    assert calls == [("org/model", "model.safetensors"), ("org/model", "pytorch_model.bin")]
    calls.clear()
    weights.resolve("hf://org/model/sub/file.pt")
    assert calls == [("org/model", "sub/file.pt")]


def test_urls_are_cached_by_file_name(tmp_path, no_network):
    cached = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
    torch.save({"a": torch.ones(1)}, cached)
    url = "https://example.org/dinov2/dinov2_vitb14_reg4_pretrain.pth"
    assert weights.resolve(url, cache_dir=tmp_path) == cached


def test_pickled_objects_are_refused_and_wrappers_unwrapped(tmp_path):
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="cannot be read as tensors"):
        weights.read_state(tmp_path / "pickled.pt")
    torch.save({"model_state": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "ckpt.pyth")
    state = weights.load_state(tmp_path / "ckpt.pyth", "ckpt", keys=("model_state",))
    assert list(state) == ["w"]
