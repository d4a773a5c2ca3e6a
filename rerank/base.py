"""What every re-ranking stage takes and returns.

A stage reads the previous ranking (a :class:`~locore.indexing.shortlist.Shortlist`: ids and the
similarities that produced them) plus the descriptors it needs, and returns a new ranking of the
same ids. Stages compose in a chain (``rerank.chain``): each stage's ``scores`` become the next
stage's ``sims``, so LoCoRe's fusion uses the similarities of the ranking it receives.

The protocol's junk (``Queries.junk``, reference-spec §6.4) is moved out of the shortlist by the
chain, once, in one place, before every stage that asks for it (``Reranker.partitions_junk``): a
stage only reads ``Queries.junk`` to know where its re-rankable part ends.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from locore.indexing.local_store import LocalStore
    from locore.indexing.shortlist import Shortlist


@dataclasses.dataclass
class Queries:
    """The query side of a re-ranking call.

    Attributes:
        global_desc: ``[Q, D_g]`` float32, L2-normalised.
        local_rows: ``[Q, K, 5 + D]`` float32 rows in the official layout, or None when no stage
            of the chain needs local descriptors.
        junk: per query, database ids the protocol ignores (moved out of the shortlist before
            re-ranking, reference-spec §6.4), or None.
    """

    global_desc: np.ndarray
    local_rows: np.ndarray | None = None
    junk: list[set[int]] | None = None

    def __len__(self) -> int:
        return int(self.global_desc.shape[0])


@dataclasses.dataclass
class Database:
    """The gallery side: global descriptors ``[N, D_g]`` (may be a memmap) and the local store."""

    global_desc: np.ndarray
    store: LocalStore | None = None

    def __len__(self) -> int:
        return int(self.global_desc.shape[0])


@dataclasses.dataclass
class RerankResult:
    """A new ranking of the shortlist.

    Attributes:
        ids: ``[Q, M]`` int64 database ids, best first.
        scores: ``[Q, M]`` float32 scores behind that order (fused scores for LoCoRe).
        before: ``[Q, M]`` int64 ids in the order the stage received them.
    """

    ids: np.ndarray
    scores: np.ndarray
    before: np.ndarray

    @classmethod
    def head_reordered(cls, ids: np.ndarray, scores: np.ndarray, order: np.ndarray) -> RerankResult:
        """The ranking ``ids`` ``[Q, M]`` with its leading ``H`` entries permuted by ``order``
        ``[Q, H]`` (positions within the head); ``scores`` ``[Q, M]`` are aligned with ``ids``
        and move with them; entries past ``H`` keep their place."""
        head = order.shape[1]
        new_ids, new_scores = ids.copy(), scores.copy()
        new_ids[:, :head] = np.take_along_axis(ids[:, :head], order, 1)
        new_scores[:, :head] = np.take_along_axis(scores[:, :head], order, 1)
        return cls(ids=new_ids, scores=new_scores, before=ids)


class Reranker(abc.ABC):
    """A re-ranking stage; ``name`` is its registry name.

    ``partitions_junk``: True (LoCoRe, CVNet, RRT, DELG) = the chain moves each query's junk ids
    to the end of its shortlist before this stage and passes the junk sets on; False (SuperGlobal's
    own evaluation) = the stage sees the ranking as it is and no junk sets.
    """

    name: str = ""
    partitions_junk: bool = True

    @abc.abstractmethod
    def rerank(self, queries: Queries, shortlist: Shortlist, database: Database) -> RerankResult:
        """Re-order ``shortlist`` (``[Q, M]``) for ``queries``.

        When ``queries.junk`` is set, its ids already sit at the end of each row, in their
        incoming order (``rerank.chain.stage_input``); a stage never moves them back up.
        """


@dataclasses.dataclass
class WindowLogits:
    """Raw logits of the leading window of every query's ranking, before any fusion.

    Attributes:
        ids: ``[Q, M]`` int64 database ids in the order the stage received them; -1 = none.
        sims: ``[Q, M]`` float64 similarities of that order (the fusion's global term).
        logits: ``[Q, W]`` float64 raw logits of the window; NaN past ``lengths[q]``.
        lengths: ``[Q]`` int64 entries of each query's window (junk and padding never enter).
    """

    ids: np.ndarray
    sims: np.ndarray
    logits: np.ndarray
    lengths: np.ndarray


class LogitReranker(Reranker):
    """A stage that fuses raw per-window logits with the incoming similarities
    (``rerank.fusion.fuse`` with its fusion weight and temperature).

    Its single-window output is a function of cached logits, so the fusion parameters can be
    grid-searched without running the model again (``locore bench fusion-grid``).
    """

    @abc.abstractmethod
    def window_logits(
        self, queries: Queries, shortlist: Shortlist, database: Database
    ) -> WindowLogits:
        """Logits of the one window this stage re-ranks with a single window at the top.

        Same input contract as :meth:`rerank`; fusing them with the stage's (alpha, temp) and
        sorting stably (``rerank.fusion``) gives exactly its single-window ranking.
        """
