"""Independent spec-formula references shared by the extractor tests (functional torch, numpy)."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from float_bounds import assert_close, float32_bound, max_abs

BGR_MEAN, BGR_STD = (0.406, 0.456, 0.485), (0.225, 0.224, 0.229)  # pycls statistics, BGR order


def detector_state(channels: int, seed: int = 0, hidden: int | None = None) -> dict:
    """Random AMES-detector weights under the released file's keys (reference-spec §2.4)."""
    hidden = hidden or channels
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(hidden, channels, 1, 1, generator=g) / channels**0.5,
        "conv1.bias": torch.randn(hidden, generator=g) * 0.1,
        "bn.weight": torch.rand(hidden, generator=g) + 0.5,
        "bn.bias": torch.randn(hidden, generator=g) * 0.1,
        "bn.running_mean": torch.randn(hidden, generator=g) * 0.1,
        "bn.running_var": torch.rand(hidden, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(1000),
        "conv2.weight": torch.randn(1, hidden, 1, 1, generator=g) / hidden**0.5,
        "conv2.bias": torch.randn(1, generator=g),
    }


def spec_detector(state: dict, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``f = BN(W1 x + b1)``; ``f / max(|f|, 1e-15)``; ``softplus(w2 . relu(f) + b2)`` per token."""
    s = {k: v.double().numpy() for k, v in state.items()}
    f = tokens @ s["conv1.weight"][:, :, 0, 0].T + s["conv1.bias"]
    f = (f - s["bn.running_mean"]) / np.sqrt(s["bn.running_var"] + 1e-5) * s["bn.weight"]
    f = f + s["bn.bias"]
    desc = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-15)
    logit = np.maximum(f, 0) @ s["conv2.weight"][0, :, 0, 0] + s["conv2.bias"][0]
    weight = np.where(logit > 20, logit, np.log1p(np.exp(np.minimum(logit, 20))))
    return desc, weight


def spec_rows(
    desc: np.ndarray, weight: np.ndarray, positions: np.ndarray, scale_ids: np.ndarray, k: int
) -> np.ndarray:
    """Official rows (spec §2.5): top-k by weight, ``[pos0, pos1, scale, 0, w, desc]``, padding
    rows all zero with column 3 = 1."""
    order = np.argsort(-weight, kind="stable")[:k]
    rows = np.zeros((k, 5 + desc.shape[1]))
    n = len(order)
    rows[:n, :2] = positions[order]
    rows[:n, 2] = scale_ids[order]
    rows[:n, 4] = weight[order]
    rows[:n, 5:] = desc[order]
    rows[n:, 3] = 1
    return rows


def assert_rows_match(got: np.ndarray, want: np.ndarray, rel: float, what: str) -> None:
    """Official ``[K, 5 + D]`` rows within ``rel``: weights to their scale, the rest to 1.

    Rows are sorted by weight, so tokens whose weights differ by less than the rounding may come
    in either order (or, at the K-th row, either may be kept). The sorted weight column does not
    care; the other columns are compared per group of such near-ties, order-free, and a group cut
    by the K-th row is left at its weights.
    """
    tol_w = rel * max_abs(want[:, 4])
    assert_close(got[:, 4], want[:, 4], tol_w, f"{what} weights")
    assert_close(got[:, 3], want[:, 3], 0, f"{what} padding flags")
    starts = [0] + [i for i in range(1, len(want)) if want[i - 1, 4] - want[i, 4] > 2 * tol_w]
    for a, b in zip(starts, [*starts[1:], len(want)]):
        if b == len(want) and a > 0 and want[b - 1, 3] == 0:
            continue  # a near-tie group cut by top-K: which tokens are kept is rounding
        key = [np.lexsort(np.round(r[a:b, 2::-1].T, 4)) for r in (got, want)]
        g, w = got[a:b][key[0]], want[a:b][key[1]]
        assert_close(g[:, :3], w[:, :3], rel, f"{what} positions and scales, rows {a}:{b}")
        assert_close(g[:, 5:], w[:, 5:], rel, f"{what} descriptors, rows {a}:{b}")


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def one_torch_thread():
    """Fixture body: run a module's CNN/ViT forwards on one thread, then restore.

    On a small shared machine two intra-op threads fighting other jobs are several times slower
    than one (measured 0.8 s vs 0.09 s for a ResNet-50 forward at 100 px). ``LOCORE_TEST_THREADS``
    overrides the count (tests/test_cpu_paths.py reruns the golden tests with 2 threads).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LOCORE_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# float32 bound of a ResNet-50 extraction against the float32 functional reference: 53 chained
# convolutions (+ detector or head), each over at most 3 x 3 x 512 = 4,608 terms: 2.1e-4 of each
# output's scale (float_bounds.float32_bound).
RESNET_REL = float32_bound(53 + 3, 3 * 3 * 512)
WIDTHS = ((64, 256), (128, 512), (256, 1024), (512, 2048))


def expected_layout(depth: int) -> dict[str, tuple[int, ...]]:
    """CVNet's ``encoder_q`` keys and shapes without the prefix (spec §2.1)."""
    keys: dict[str, tuple[int, ...]] = {"stem.conv.weight": (64, 3, 7, 7)}

    def bn(name: str, c: int) -> None:
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{p}"] = (c,)
        keys[f"{name}.num_batches_tracked"] = ()

    bn("stem.bn", 64)
    w_in = 64
    for k, (n, (w_b, w_out)) in enumerate(zip(DEPTHS[depth], WIDTHS), 1):
        for j in range(1, n + 1):
            b, win = f"s{k}.b{j}.", w_in if j == 1 else w_out
            keys[b + "f.a.weight"] = (w_b, win, 1, 1)
            bn(b + "f.a_bn", w_b)
            keys[b + "f.b.weight"] = (w_b, w_b, 3, 3)
            bn(b + "f.b_bn", w_b)
            keys[b + "f.c.weight"] = (w_out, w_b, 1, 1)
            bn(b + "f.c_bn", w_out)
            if j == 1:
                keys[b + "proj.weight"] = (w_out, win, 1, 1)
                bn(b + "bn", w_out)
        w_in = w_out
    keys |= {"head.pool.p": (1,), "head.fc.weight": (2048, 2048), "head.fc.bias": (2048,)}
    return keys


@functools.cache
def random_state(depth: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights that keep activations O(1) through the residual stack (shared: read only)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_layout(depth).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith(".weight") and len(shape) == 4:
            state[key] = torch.randn(*shape, generator=g) * (2.0 / np.prod(shape[1:])) ** 0.5
        elif key.endswith("running_var"):
            state[key] = torch.rand(*shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = torch.randn(*shape, generator=g) * 0.1
        elif key == "head.pool.p":
            state[key] = torch.tensor([3.7])
        elif key == "head.fc.weight":
            state[key] = torch.randn(*shape, generator=g) / 2048**0.5
        else:  # BN weights; residual branches damped
            scale = 0.2 if ".f.c_bn." in key else 1.0
            state[key] = (torch.rand(*shape, generator=g) * 0.5 + 0.5) * scale
    return state


def reference_maps(
    s: dict,
    x: torch.Tensor,
    block_out: float = 0.0,
    s1_inner: float = 0.0,
    block3_strides: bool = False,
):
    """pycls ResNet-50 forward with functional ops -> (last s3 residual sum before its
    activation, s4). float32 (float64 convolutions are too slow on CPU for a unit test).

    ``block_out`` / ``s1_inner``: SuperGlobal's clamps; ``block3_strides``: TF DELG's s3
    subsampling by 2 with s4 at stride 1."""

    def bn(v: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(
            v, s[name + ".running_mean"], s[name + ".running_var"], s[name + ".weight"],
            s[name + ".bias"], False, 0.0, 1e-5,
        )  # fmt: skip

    x = F.max_pool2d(
        torch.relu(bn(F.conv2d(x.float(), s["stem.conv.weight"], None, 2, 3), "stem.bn")), 3, 2, 1
    )
    for k, n in enumerate(DEPTHS[50], 1):
        inner = s1_inner if k == 1 else 0.0
        for j in range(1, n + 1):
            first_stride = 1 if k == 1 or (k == 4 and block3_strides) else 2
            b, stride = f"s{k}.b{j}.", first_stride if j == 1 else 1
            y = bn(F.conv2d(x, s[b + "f.a.weight"]), b + "f.a_bn").clamp(min=inner)
            y = bn(F.conv2d(y, s[b + "f.b.weight"], None, stride, 1), b + "f.b_bn").clamp(min=inner)
            y = bn(F.conv2d(y, s[b + "f.c.weight"]), b + "f.c_bn")
            short = bn(F.conv2d(x, s[b + "proj.weight"], None, stride), b + "bn") if j == 1 else x
            pre = short + y
            x = pre.clamp(min=block_out if k < 4 else 0.0)
        if k == 3:
            s3_pre = pre
            if block3_strides:
                x = x[:, :, ::2, ::2]
    return s3_pre, x
