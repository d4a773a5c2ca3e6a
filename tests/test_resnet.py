"""pycls ResNet / CVNet / SuperGlobal vs the spec: key layout, strict loading, formulas.

The reference network below is written with functional primitives straight from the spec's
layer list (superglobal-delg-spec §1.3, §2.1) in float64; pooling references use explicit loops.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from extract_helpers import (
    BGR_MEAN,
    BGR_STD,
    RESNET_REL,
    assert_rows_match,
    detector_state,
    expected_layout,
    normalize,
    one_torch_thread,
    random_state,
    reference_maps,
    spec_detector,
    spec_rows,
)
from float_bounds import assert_close, float32_bound

from locore.core.errors import UserError
from locore.core.layout import GLOBAL_FILE
from locore.core.weights import load_strict
from locore.feature_extractors import create
from locore.feature_extractors.resnet import (
    CVNET_SCALES,
    ResNet,
    backbone_state,
    gem,
    gem_plus,
    regional_gem,
    scale_gem,
)
from locore.indexing.shortlist import read_raw_globals

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A CVNet-style ``.pyth``: ``model_state`` with ``encoder_q.`` keys plus re-ranker keys."""
    state = {f"encoder_q.{k}": v for k, v in random_state().items()}
    state |= {"conv2ds.0.weight": torch.zeros(2, 2), "cv_learner.mlp.0.weight": torch.zeros(2)}
    path = tmp_path_factory.mktemp("cvnet") / "CVPR2022_CVNet_R50.pyth"
    torch.save({"epoch": 3, "model_state": state, "cfg": "MODEL: {}"}, path)
    detector = path.parent / "cvnet_detector.pt"
    torch.save({"state": detector_state(1024, seed=5)}, detector)
    return path, detector


def test_parameter_layout_is_cvnets():
    for depth in (50, 101):
        got = {k: tuple(v.shape) for k, v in ResNet(depth).state_dict().items()}
        assert got == expected_layout(depth)


def test_cvnet_checkpoint_loads_strictly(checkpoint):
    path, _ = checkpoint
    extractor = create("cvnet_r50", weights=str(path), detector="random")
    own = extractor.backbone.state_dict()
    for key, value in random_state().items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)


def test_missing_unexpected_and_wrong_depth_keys_are_reported():
    state = {f"encoder_q.{k}": v for k, v in random_state().items()}
    del state["encoder_q.s3.b2.f.b_bn.running_mean"]
    with pytest.raises(UserError, match=r"missing 1 keys \['s3.b2.f.b_bn.running_mean'\]"):
        load_strict(ResNet(50), backbone_state(state), "CVNet")
    r101 = {f"encoder_q.{k}": torch.zeros(()).expand(s) for k, s in expected_layout(101).items()}
    with pytest.raises(UserError, match=r"unexpected 306 keys \['s3.b10"):
        load_strict(ResNet(50), backbone_state(r101), "CVNet")
    # num_batches_tracked may be absent (unused in eval); nothing else may.
    no_counter = {k: v for k, v in random_state().items() if "num_batches" not in k}
    load_strict(ResNet(50), backbone_state(no_counter), "CVNet")


def test_factories_need_weights():
    with pytest.raises(UserError, match="CVPR2022_CVNet_R101.pyth"):
        create("superglobal_r101")
    with pytest.raises(
        UserError, match="option 'depth' is fixed by the extractor name 'cvnet_r50'"
    ):
        create("cvnet_r50", depth=101, weights="random")
    with pytest.raises(UserError, match=r"unknown option 'topk'.*'relup'") as err:
        create("cvnet_r50", topk=5)
    assert "'depth'" not in str(err.value)  # fixed options are not offered


def test_pooling_functions_match_direct_formulas():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 4, 5)) + 0.01
    t = torch.from_numpy(x)
    want = np.array([[np.mean(x[b, c] ** 3.7) ** (1 / 3.7) for c in range(3)] for b in range(2)])
    np.testing.assert_allclose(gem(t, torch.tensor([3.7]).double(), 1e-6).numpy(), want)
    want = np.array([[np.mean(x[b, c] ** 4.6) ** (1 / 4.6) for c in range(3)] for b in range(2)])
    np.testing.assert_allclose(gem_plus(t).numpy(), want)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    region = np.zeros_like(x)
    for i in range(4):
        for j in range(5):
            window = padded[:, :, i : i + 5, j : j + 5]
            region[:, :, i, j] = np.mean(window**2.5, axis=(2, 3)) ** (1 / 2.5)
    np.testing.assert_allclose(regional_gem(t).numpy(), 0.5 * region + 0.5 * x, rtol=1e-10)
    e = [torch.from_numpy(rng.normal(size=(2, 6))) for _ in range(3)]
    want = np.max([normalize(v.numpy()) for v in e], axis=0)
    np.testing.assert_allclose(scale_gem(e).numpy(), want)


def cv2_scale(image: np.ndarray, s: float) -> np.ndarray:
    """The official dataset's per-scale resize (reference-spec §2.2 step 5)."""
    if s == 1.0:
        return image
    interpolation = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (0, 0), fx=s, fy=s, interpolation=interpolation)


def normalized_bgr(image_bgr: np.ndarray) -> torch.Tensor:
    x = image_bgr.astype(np.float64).transpose(2, 0, 1)[None] / 255.0
    return torch.from_numpy(
        (x - np.array(BGR_MEAN)[:, None, None]) / np.array(BGR_STD)[:, None, None]
    )


def test_cvnet_extraction_matches_the_spec(checkpoint):
    """Locals: s3 before ReLU at 3 cv2 scales -> detector -> top-K over scales, positions
    16 (r, c) / scale, scale ids 0/1/2. Global: mean of L2(fc(GeM_p(s4))) over scales, L2.
    Within ``RESNET_REL`` of each output's scale."""
    path, detector = checkpoint
    extractor = create("cvnet_r50", weights=str(path), detector=str(detector), num_local=30)
    image = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    feats = extractor.extract(image)
    state, det = random_state(), detector_state(1024, seed=5)
    descs, weights, positions, ids, globals_ = [], [], [], [], []
    for k, s in enumerate(CVNET_SCALES):
        s3_pre, s4 = reference_maps(state, normalized_bgr(cv2_scale(image[..., ::-1], s)))
        rows, cols = s3_pre.shape[2:]
        desc, weight = spec_detector(det, s3_pre[0].flatten(1).T.double().numpy())
        r, c = np.divmod(np.arange(rows * cols), cols)
        descs.append(desc)
        weights.append(weight)
        positions.append(np.stack([16.0 * r / s, 16.0 * c / s], 1))
        ids.append(np.full(rows * cols, k))
        pooled = (s4[0].double().flatten(1).clamp(min=1e-6) ** 3.7).mean(1) ** (1 / 3.7)
        fc = state["head.fc.weight"].double() @ pooled + state["head.fc.bias"].double()
        globals_.append(normalize(fc.numpy()))
    want = spec_rows(*(np.concatenate(v) for v in (descs, weights, positions, ids)), 30)
    got = feats.local.to_rows()
    assert_rows_match(got, want, RESNET_REL, "rows")
    assert set(got[:, 2]) <= {0, 1, 2} and len(set(got[:, 2])) > 1
    assert_close(feats.global_desc, normalize(np.mean(globals_, 0)), RESNET_REL, "global")


def test_superglobal_descriptor_matches_the_spec(checkpoint):
    """relup clamps, rGeM mix, GeM+ p 4.6, L2 before fc, max over L2 scales, L2 (spec §1.3-1.4).
    Within ``RESNET_REL`` of the unit descriptor."""
    path, _ = checkpoint
    extractor = create("superglobal_r50", weights=str(path), detector="random")
    image = np.random.default_rng(2).integers(0, 256, (96, 120, 3), dtype=np.uint8)
    feats = extractor.extract(image)
    state = random_state()
    x = normalized_bgr(image[..., ::-1])
    outputs = []
    for s in CVNET_SCALES:
        size = (int(96 * s), int(120 * s))
        xs = x if s == 1.0 else F.interpolate(x, size, mode="bilinear", align_corners=False)
        f4 = reference_maps(state, xs, block_out=0.014, s1_inner=0.014)[1][0].double().numpy()
        padded = np.pad(f4, ((0, 0), (2, 2), (2, 2)), mode="reflect")
        region = np.zeros_like(f4)
        for i in range(f4.shape[1]):
            for j in range(f4.shape[2]):
                region[:, i, j] = np.mean(padded[:, i : i + 5, j : j + 5] ** 2.5, (1, 2)) ** 0.4
        mixed = 0.5 * region + 0.5 * f4
        g = normalize(np.mean(np.maximum(mixed, 1e-8) ** 4.6, axis=(1, 2)) ** (1 / 4.6))
        fc = state["head.fc.weight"].double().numpy() @ g + state["head.fc.bias"].double().numpy()
        outputs.append(fc)
    want = normalize(np.max([normalize(o) for o in outputs], axis=0))
    assert_close(feats.global_desc, want, RESNET_REL, "global")


def test_superglobal_rejects_images_too_small_for_its_padding(checkpoint):
    path, _ = checkpoint
    extractor = create("superglobal_r50", weights="random", detector="random")
    with pytest.raises(UserError, match="below the 65 px"):
        extractor.preprocess(np.zeros((80, 200, 3), np.uint8))  # 80 * 0.7071 = 56.6 px


def test_registered_names_extract_through_the_cli(checkpoint, tmp_path):
    """``locore extract`` reaches the ResNet family by name: 1024-D rows, 2048-D globals."""
    from locore import feature_extractors
    from locore.cli import main
    from locore.indexing.local_store import LocalStore

    names = {"cvnet_r50", "cvnet_r101", "superglobal_r50", "superglobal_r101", "delg_r50"}
    assert names <= set(feature_extractors.available())
    path, detector = checkpoint
    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, (96, 128, 3), np.uint8))
    args = ["extract", "--images", str(folder), "--out", str(tmp_path / "o")]
    for setting in (
        "extractor.name=superglobal_r50",
        f"extractor.options.weights={path}",
        f"extractor.options.detector={detector}",
        "extractor.options.num_local=20",
    ):
        args += ["--set", setting]
    assert main(args) == 0
    with LocalStore(tmp_path / "o" / "local.h5") as store:
        assert store.rows([0]).shape == (1, 20, 5 + 1024)
    globals_ = read_raw_globals(tmp_path / "o" / GLOBAL_FILE, 2048, 2, prefix=True)
    assert_close(np.linalg.norm(globals_, axis=1), np.ones(2), float32_bound(1, 2048), "norms")
