"""Re-ranking stages composed in order, e.g. ``[superglobal, locore]`` (the paper's SG + LoCoRe).

Each stage reads the previous stage's ranking and takes its scores as similarities, so LoCoRe's
fusion uses the similarities of the ranking it receives (SuperGlobal's final scores after a
SuperGlobal stage, the first-stage cosine similarities otherwise).

The chain is the one place that applies the junk partition (reference-spec §6.4,
:func:`stage_input`): before every stage that asks for it, junk ids move to the end of each row;
a stage that keeps junk gets the ranking untouched and no junk sets.
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
from locore.rerank.junk import partition_junk

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
            result = stage.rerank(*stage_input(stage, queries, current), database)
            results.append(result)
            current = dataclasses.replace(current, ids=result.ids, sims=result.scores)
        before = np.asarray(shortlist.ids)
        final = RerankResult(
            ids=np.asarray(current.ids), scores=np.asarray(current.sims), before=before
        )
        return final, results


def stage_input(
    stage: Reranker, queries: Queries, shortlist: Shortlist
) -> tuple[Queries, Shortlist]:
    """What the chain hands ``stage``: the junk partition applied when the stage asks for it.

    ``partitions_junk``: each row's junk ids (``queries.junk[q]``) move to its end, stably, their
    similarities with them (:func:`locore.rerank.junk.partition_junk`). Otherwise the ranking is
    passed as it is and ``queries.junk`` is dropped, so the stage cannot treat junk specially.
    """
    if queries.junk is None:
        return queries, shortlist
    if not stage.partitions_junk:
        return dataclasses.replace(queries, junk=None), shortlist
    ids, sims = partition_junk(
        np.asarray(shortlist.ids, dtype=np.int64), np.asarray(shortlist.sims), queries.junk
    )
    return queries, dataclasses.replace(shortlist, ids=ids, sims=sims)


def build_chain(stages: Sequence[Any]) -> Chain:
    """Build a chain from stage specs, in order.

    A spec is a config object with ``name`` and ``options`` (``engine.config.StageConfig``), a
    ``(name, options)`` pair, a bare name, or an already built :class:`Reranker`.

    Example:
        >>> chain = build_chain([("superglobal", {"k": 9}), ("locore", {"window": 100})])
    """
    return Chain([build_stage(spec) for spec in stages])


def build_stage(spec: Any) -> Reranker:
    """One stage from a spec of :func:`build_chain`."""
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
