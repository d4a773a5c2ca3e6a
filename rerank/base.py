"""What every re-ranking stage takes and returns.

A stage reads the previous ranking (a :class:`~locore.indexing.shortlist.Shortlist`: ids and the
similarities that produced them) plus the descriptors it needs, and returns a new ranking of the
same ids. Stages compose in a chain (``rerank.chain``): each stage's ``scores`` become the next
stage's ``sims``, so LoCoRe's fusion uses the similarities of the ranking it receives.
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


class Reranker(abc.ABC):
    """A re-ranking stage; ``name`` is its registry name."""

    name: str = ""

    @abc.abstractmethod
    def rerank(self, queries: Queries, shortlist: Shortlist, database: Database) -> RerankResult:
        """Re-order ``shortlist`` (``[Q, M]``) for ``queries``."""
