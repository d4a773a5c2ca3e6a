"""The pipeline configuration: what ``locore index`` / ``search`` / ``eval`` / ``demo`` read.

Each field is commented; presets live in ``configs/pipelines/`` and are read with
:func:`locore.core.config.load`, which checks every key against these dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from locore.core import config as config_io


# ----------------------------------------------------------------------------------------------
# The pipeline configuration
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExtractorConfig:
    """Which extractor to build and how to run it."""

    name: str = "efficientnet_lite0"  # a name from feature_extractors.available()
    options: dict = dataclasses.field(default_factory=dict)  # keyword overrides for the factory
    batch_size: int = 8  # images per forward pass (same-size buckets)
    num_workers: int = 0  # DataLoader workers that decode and resize
    device: str = "auto"  # "auto" = cuda when available, else cpu
    store_dtype: str = "float16"  # local store precision: float16 | float32


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """The global index over the gallery's global descriptors."""

    kind: str = "flat"  # flat (exact) | ivfpq | hnsw | torch (exact GPU matmul)
    options: dict = dataclasses.field(default_factory=dict)  # backend parameters (nlist, m, ...)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One re-ranking stage of the chain."""

    name: str  # a name from rerank.available()
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """First stage and the re-ranking chain."""

    topk: int = 400  # shortlist length returned by the global index
    show: int = 10  # results printed and drawn per query
    rerank: tuple[StageConfig, ...] = ()  # applied in order, each on the previous ranking


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything ``locore index`` / ``search`` / ``eval`` / ``demo`` need."""

    extractor: ExtractorConfig = dataclasses.field(default_factory=ExtractorConfig)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)


def load_pipeline(
    name_or_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> PipelineConfig:
    """Defaults <- preset (``configs/pipelines/<name>.yaml`` or a path) <- ``--set`` overrides."""
    return config_io.load(PipelineConfig, name_or_path, overrides)
