"""Scale-out on Ray: extraction with Ray Data and batch re-ranking on actors (``locore[ray]``).

Ray is an optional extra: nothing in a lower layer imports this package, and the command line
imports it only when ``--ray`` is given. Both jobs are callers of the same stage functions as one
process (:func:`locore.engine.extract.extract`, :meth:`locore.rerank.chain.Chain.run`), so
their outputs equal the single-process outputs bit for bit; Ray only decides where they run and
retries what a dead worker left unfinished.
"""

from locore.distributed.ray_jobs import (
    RayOptions,
    connect,
    extract_on_ray,
    index_database,
    rerank_on_ray,
)

__all__ = ["RayOptions", "connect", "extract_on_ray", "index_database", "rerank_on_ray"]
