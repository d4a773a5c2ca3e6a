"""Re-ranking stages composed in order, e.g. ``[superglobal, locore]`` (the paper's SG + LoCoRe).

Each stage reads the previous stage's ranking and takes its scores as similarities, so LoCoRe's
fusion uses the similarities of the ranking it receives (SuperGlobal's final scores after a
SuperGlobal stage, the first-stage cosine similarities otherwise).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from locore import rerank
from locore.core.errors import UserError
from locore.rerank.base import Database, Queries, Reranker, RerankResult

if TYPE_CHECKING:
    from locore.indexing.shortlist import Shortlist

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Chain:
    """Stages run one after the other on a shortlist."""

    stages: list[Reranker]

    def run(
        self, queries: Queries, shortlist: Shortlist, database: Database
    ) -> tuple[RerankResult, list[RerankResult]]:
        """Run every stage; returns the final result and each stage's own result, in order.

        The final result's ``before`` is the order the chain received. Without stages it is the
        incoming ranking itself.
        """
        results = []
        current = shortlist
        for stage in self.stages:
            logger.info("re-ranking %d queries with %s", len(queries), stage.name)
            result = stage.rerank(queries, current, database)
            results.append(result)
            current = dataclasses.replace(current, ids=result.ids, sims=result.scores)
        before = np.asarray(shortlist.ids)
        final = RerankResult(
            ids=np.asarray(current.ids), scores=np.asarray(current.sims), before=before
        )
        return final, results


def build_chain(stages: Sequence[Any]) -> Chain:
    """Build a chain from stage specs, in order.

    A spec is a config object with ``name`` and ``options`` (``engine.config.StageConfig``), a
    ``(name, options)`` pair, a bare name, or an already built :class:`Reranker`.

    Example:
        >>> chain = build_chain([("superglobal", {"k": 9}), ("locore", {"window": 100})])
    """
    return Chain([_build(spec) for spec in stages])


def _build(spec: Any) -> Reranker:
    if isinstance(spec, Reranker):
        return spec
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, tuple) and len(spec) == 2:
        name, options = spec
    elif hasattr(spec, "name") and hasattr(spec, "options"):
        name, options = spec.name, spec.options
    else:
        raise UserError(
            f"re-ranking stage {spec!r} must be a name, (name, options) or {{name, options}}"
        )
    if not isinstance(options, Mapping):
        raise UserError(f"options of re-ranking stage {name!r} must be a mapping of keywords")
    return rerank.create(name, **dict(options))
