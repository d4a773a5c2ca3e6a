"""LoCoRe: the list-wise Longformer re-ranker over local descriptors (reference-spec §4).

Example:
    >>> from locore.rerank.locore import LocoreModel, build_model
    >>> model = LocoreModel.from_pretrained("vislang/locore_dinov2_base")  # or a local folder
    >>> micro = build_model("micro")  # random weights, for tests and the demo
"""

from locore.rerank.locore.config import LocoreConfig
from locore.rerank.locore.model import LocoreInputs, LocoreModel, LocoreOutput, build_model

__all__ = ["LocoreConfig", "LocoreInputs", "LocoreModel", "LocoreOutput", "build_model"]
