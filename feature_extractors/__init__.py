"""Feature extractors: one global + K local descriptors per image, behind one registry.

Example:
    >>> import feature_extractors
    >>> extractor = feature_extractors.create("efficientnet_lite0", num_local=49)
"""

from locore.feature_extractors.base import Extractor, ImageFeatures, LocalFeatures
from locore.feature_extractors.registry import available, create

__all__ = ["Extractor", "ImageFeatures", "LocalFeatures", "available", "create"]
