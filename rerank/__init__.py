"""Re-ranking stages (LoCoRe, SuperGlobal, ...) behind one registry, composable in a chain.

Example:
    >>> import rerank
    >>> stage = rerank.create("superglobal", k=9, beta=0.15)
"""

from typing import Any

from locore.core.registry import Registry
from locore.rerank.base import Database, Queries, Reranker, RerankResult

RERANKERS = Registry(
    "re-ranker",
    {
        "superglobal": "locore.rerank.superglobal:superglobal",
        "spatial": "locore.rerank.spatial:spatial",
        "diffusion": "locore.rerank.diffusion:diffusion",
        "locore": "locore.rerank.locore.reranker:locore",
        # the paper's checkpoint (vislang/locore_dinov2_base) is the factory's default
        "locore_base": "locore.rerank.locore.reranker:locore",
    },
)


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return RERANKERS.available()


def create(name: str, **overrides: Any) -> Reranker:
    """Build the re-ranking stage ``name`` with keyword options."""
    return RERANKERS.create(name, **overrides)


__all__ = ["Database", "Queries", "Reranker", "RerankResult", "available", "create"]
