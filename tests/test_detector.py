"""AMES detector: official key layout loaded strictly, per-token maths equal to the spec formula."""

from __future__ import annotations

import pytest
import torch
from extract_helpers import detector_state, spec_detector
from float_bounds import assert_close_to_scale, float32_bound
from safetensors.torch import save_file
from torch import nn

from locore.core.errors import UserError
from locore.feature_extractors.detector import Detector, NormDetector, build_detector

C = 24
# float32 bound of the detector: conv1, BN, L2 norm, conv2 (4 chained reductions of C terms).
DETECTOR_REL = float32_bound(4, C)


@pytest.fixture
def detector_file(tmp_path):
    path = tmp_path / "dinov2_detector.pt"
    torch.save({"state": detector_state(C)}, path)
    return path


def test_per_token_outputs_match_the_spec_formula(detector_file):
    """float32 against float64, within ``DETECTOR_REL`` of each output's scale."""
    detector = build_detector(detector_file, C)
    tokens = torch.randn(2, 37, C, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        desc, weight = detector(tokens)
    want_desc, want_weight = spec_detector(detector_state(C), tokens.double().numpy())
    assert_close_to_scale(desc, want_desc, DETECTOR_REL, "descriptors")
    assert_close_to_scale(weight, want_weight, DETECTOR_REL, "weights")
    assert desc.shape == (2, 37, C) and weight.shape == (2, 37)


def test_equals_the_official_pseudo_grid_with_torch_modules(detector_file):
    """Official: N tokens as a (d, N/d) grid, d the largest divisor of N not above sqrt(N).
    Both float32 in other kernels (conv vs matmul): within ``DETECTOR_REL``."""
    official = nn.ModuleDict(
        {"conv1": nn.Conv2d(C, C, 1), "bn": nn.BatchNorm2d(C), "conv2": nn.Conv2d(C, 1, 1)}
    ).eval()
    official.load_state_dict(detector_state(C))
    tokens = torch.randn(1, 36, C, generator=torch.Generator().manual_seed(2))
    grid = tokens.permute(0, 2, 1).reshape(1, C, 6, 6)
    with torch.no_grad():
        f = official["bn"](official["conv1"](grid))
        want_desc = nn.functional.normalize(f, p=2, dim=1, eps=1e-15).flatten(2).transpose(1, 2)
        want_w = nn.Softplus(1, 20)(official["conv2"](torch.relu(f))).flatten(1)
        desc, weight = build_detector(detector_file, C)(tokens)
    assert_close_to_scale(desc, want_desc, DETECTOR_REL, "descriptors")
    assert_close_to_scale(weight, want_w, DETECTOR_REL, "weights")


def test_softplus_is_linear_above_threshold(tmp_path):
    state = detector_state(C)
    state["conv2.bias"] = torch.tensor([40.0])
    state["conv2.weight"] = torch.zeros(1, C, 1, 1)
    torch.save({"state": state}, tmp_path / "d.pt")
    _, weight = build_detector(tmp_path / "d.pt", C)(torch.randn(1, 3, C))
    torch.testing.assert_close(weight, torch.full((1, 3), 40.0))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("conv2.bias"), "missing 1 keys .*conv2.bias"),
        (lambda s: s.update({"conv3.weight": torch.zeros(1)}), "unexpected 1 keys .*conv3.weight"),
        (lambda s: s.update({"conv1.bias": torch.zeros(C + 1)}), "shape mismatch.*conv1.bias"),
    ],
)
def test_strict_loading_names_the_problem(tmp_path, edit, message):
    state = detector_state(C)
    edit(state)
    torch.save({"state": state}, tmp_path / "d.pt")
    with pytest.raises(UserError, match=message):
        build_detector(tmp_path / "d.pt", C)


def test_wrapped_bare_and_safetensors_files_load_the_same(tmp_path, detector_file):
    torch.save(detector_state(C), tmp_path / "bare.pt")
    save_file(detector_state(C), tmp_path / "d.safetensors")
    tokens = torch.randn(1, 5, C)
    want = build_detector(detector_file, C)(tokens)[1]
    for name in ("bare.pt", "d.safetensors"):
        torch.testing.assert_close(build_detector(tmp_path / name, C)(tokens)[1], want)
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="none of the keys"):
        build_detector(tmp_path / "other.pt", C)
    with pytest.raises(UserError, match="not found"):
        build_detector(tmp_path / "absent.pt", C)


def test_random_and_no_detector_modes():
    assert isinstance(build_detector("random", C), Detector)
    fallback = build_detector(None, C)
    assert isinstance(fallback, NormDetector)
    tokens = torch.randn(2, 4, C)
    desc, weight = fallback(tokens)
    torch.testing.assert_close(desc, tokens)
    torch.testing.assert_close(weight, tokens.norm(dim=-1))
