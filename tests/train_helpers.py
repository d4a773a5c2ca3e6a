"""Shared fixtures data for the training tests: a tiny extraction folder with labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from locore.indexing.local_store import LocalStoreWriter

N, K, DL, DG = 12, 8, 112, 1280  # images, locals, micro preset widths (efficientnet_lite0)


def write_features(root: Path, seed: int = 0) -> Path:
    """12 images of 3 classes: same-class images share local prototypes and lean globally."""
    rng = np.random.default_rng(seed)
    classes = np.arange(N) % 3
    protos_l = rng.normal(size=(3, K, DL))
    protos_g = rng.normal(size=(3, DG))
    rows = np.zeros((N, K, 5 + DL), np.float32)
    local = protos_l[classes] + 0.3 * rng.normal(size=(N, K, DL))
    rows[:, :, 5:] = local / np.linalg.norm(local, axis=2, keepdims=True)
    rows[:, :, 2] = np.arange(K) % 3  # scale ids
    rows[:, :, 4] = np.linspace(1, 0.1, K)
    rows[:, -1, 3] = 1  # the last local of every image is padding
    glob = protos_g[classes] + 2.0 * rng.normal(size=(N, DG))
    glob /= np.linalg.norm(glob, axis=1, keepdims=True)
    with LocalStoreWriter(root / "local.h5", K, DL, "float32") as w:
        w.append([f"img{i}.jpg" for i in range(N)], rows)
    glob.astype("<f4").tofile(root / "global.f32")
    (root / "labels.txt").write_text("".join(f"img{i},{c}\n" for i, c in enumerate(classes)))
    return root
