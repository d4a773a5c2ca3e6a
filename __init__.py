"""locore: two-stage image retrieval with LOCORE list-wise re-ranking over local descriptors.

Subpackages, from the ground up (imports point down only; see docs/ARCHITECTURE.md):

* :mod:`locore.core`: errors, registries, config loader, devices, weights, atomic writes;
* :mod:`locore.feature_extractors` and :mod:`locore.indexing`: models and stores;
* :mod:`locore.rerank`: SuperGlobal, LoCoRe, fusion, sliding windows, training;
* :mod:`locore.engine`: the stages as functions (extract, index, search, chain, evaluate);
* :mod:`locore.benchmarks` and :mod:`locore.cli`: recipes, reports and the command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("locore")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
