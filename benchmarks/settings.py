"""What one ``locore bench revisitop`` run is asked to do, and how its stages are cached.

Shared by the benchmark's modules and by ``locore bench fusion-grid`` (which caches its logits
the same way), so neither imports the other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from locore.core.digest import remembered
from locore.core.errors import UserError

logger = logging.getLogger(__name__)

DATASETS = ("roxford5k", "rparis6k", "demo", "gldv2-test")
FULL_DEPTH_LIMIT = 200_000  # databases up to this size are ranked in full by the first stage
DEFAULT_DEPTH = 1600  # first-stage depth beyond that (the official shortlist length)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the benchmark needs besides the extractor config."""

    dataset: str  # one of DATASETS
    out: Path  # cache + report folder
    data_root: Path | None = None  # images + gnd (optional with from_official: grids only)
    with_1m: bool = False  # add the revisitop1m distractors
    shortlist: str = "auto"  # first stage: auto | dinov2 | superglobal
    shortlist_file: Path | None = None  # first stage in dataset ids (nn_*.pkl or our .npy)
    chain: tuple[str, ...] = ("locore_base",)  # re-ranking stages, in order
    locore: dict = dataclasses.field(default_factory=dict)  # options of every locore stage
    device: str = "auto"  # re-ranking device
    depth: int | None = None  # first-stage ranking length (None: see FULL_DEPTH_LIMIT)
    eval_shortlist_only: bool = False  # evaluate the shortlist only (the official number)
    from_official: Path | None = None  # AMES data-release root instead of images
    desc_name: str = "dinov2"  # prefix of the official feature files
    grids: int = 3  # queries drawn as ranked-result grids
    save_logits: bool = False  # cache one LoCoRe window's logits for the fusion grid
    ray: dict | None = None  # re-rank on Ray (RayOptions fields: address, workers); None: here

    def __post_init__(self) -> None:
        if self.with_1m and self.metric == "gldv2":
            raise UserError(f"{self.dataset} has no +1M distractors; drop --with-1m")

    @property
    def name(self) -> str:
        """``roxford5k`` or ``roxford5k+1m`` (the official folder names)."""
        return f"{self.dataset}+1m" if self.with_1m else self.dataset

    @property
    def metric(self) -> str:
        """``"gldv2"`` (mAP@100, public/private) or ``"revisited"`` (Easy/Medium/Hard mAP)."""
        return "gldv2" if self.dataset.startswith("gldv2") else "revisited"

    def stages(self) -> list[tuple[str, dict]]:
        """The chain as ``(registry name, options)`` pairs."""
        out = []
        for name in self.chain:
            if name.startswith("locore"):
                out.append((name, {**self.locore, "device": self.device}))
            elif name == "superglobal":
                out.append((name, {"m": self.locore.get("topk", 400), "device": self.device}))
            else:
                out.append((name, {}))
        return out


def digest(params: dict) -> str:
    """A short stable hash of JSON-able ``params`` (cache file names)."""
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]


def array_digest(array: np.ndarray) -> str:
    """A short hash of an array's dtype, shape and bytes (a 1M-column shortlist in seconds,
    without a Python list of its ids)."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha1(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.data)
    return h.hexdigest()[:10]


def content_key(paths: Sequence[Path]) -> str:
    """A short hash of the content of ``paths``: each file's size, mtime and SHA-256, never its
    name or folder, so a release regenerated in the same folder gets a new key. Hashes are
    remembered per machine (:func:`locore.core.digest.remembered`), so a 150 GB release is
    read once, not once per ``--out``."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"{missing[0]} not found; check the path (or download the files again)")
    return digest({"files": [f.to_list() for f in remembered(paths)]})


def cached_stage(out: Path, name: str, params: dict, work: Callable[[], None]) -> bool:
    """Run ``work`` unless ``<name>.done.json`` records the same ``params``; True if it ran.

    The marker is written only after ``work`` returns, so an interrupted stage runs again (and
    stages that resume internally, like extraction, continue where they stopped).
    """
    marker = out / f"{name}.done.json"
    record = json.loads(json.dumps(params, sort_keys=True, default=str))
    if marker.is_file() and json.loads(marker.read_text()) == record:
        logger.info("stage %s: reusing %s", name, marker.parent)
        return False
    logger.info("stage %s: running", name)
    work()
    marker.write_text(json.dumps(record, sort_keys=True, indent=1))
    return True
