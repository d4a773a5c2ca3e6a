"""Types every extractor produces and the interface every extractor implements.

The five metadata columns follow the official AMES/LOCORE HDF5 rows (reference-spec §1.3):
``[pos_0, pos_1, scale_id, padding_flag, weight, descriptor...]`` with padding flag 0 = valid,
1 = padding, rows sorted by weight (descending) so that a prefix ``[:L]`` holds the top L.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np
import torch

from locore.core.layout import NUM_META


@dataclasses.dataclass
class LocalFeatures:
    """Local descriptors of one image, sorted by ``weights`` (descending), padded to K rows.

    Attributes:
        desc: ``[K, D]`` float32, L2-normalised; zeros on padded rows.
        positions: ``[K, 2]`` float32, (vertical, horizontal) patch centre; the unit is the
            extractor's (normalised by the resized size for DINOv2, pixels for CVNet).
        scale_ids: ``[K]`` int64, index into the extractor's scale list.
        mask: ``[K]`` bool, True = padding.
        weights: ``[K]`` float32 detector or saliency weight, 0 on padded rows.
    """

    desc: np.ndarray
    positions: np.ndarray
    scale_ids: np.ndarray
    mask: np.ndarray
    weights: np.ndarray

    def to_rows(self) -> np.ndarray:
        """``[K, 5 + D]`` float32 rows in the official column order."""
        meta = np.stack(
            [
                self.positions[:, 0],
                self.positions[:, 1],
                self.scale_ids.astype(np.float32),
                self.mask.astype(np.float32),
                self.weights,
            ],
            axis=1,
        )
        return np.concatenate([meta, self.desc], axis=1).astype(np.float32)

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> LocalFeatures:
        """Inverse of :meth:`to_rows` for one image's ``[K, 5 + D]`` rows."""
        rows = np.asarray(rows, dtype=np.float32)
        return cls(
            desc=rows[:, NUM_META:],
            positions=rows[:, :2],
            scale_ids=rows[:, 2].astype(np.int64),
            mask=rows[:, 3] != 0,
            weights=rows[:, 4],
        )

    @classmethod
    def from_topk(
        cls,
        desc: torch.Tensor,
        weights: torch.Tensor,
        positions: torch.Tensor,
        scale_ids: torch.Tensor,
        k: int,
    ) -> LocalFeatures:
        """Keep the ``k`` highest-weight of ``N`` candidates and pad to ``k`` rows.

        Args:
            desc: ``[N, D]`` candidate descriptors (already normalised).
            weights: ``[N]`` selection weights.
            positions: ``[N, 2]``; scale_ids: ``[N]``.
            k: rows to keep; when ``N < k`` the remaining rows are zero padding (mask True).
        """
        n_valid = min(int(weights.shape[0]), k)
        top = torch.topk(weights, n_valid, sorted=True).indices
        dim = desc.shape[1]
        out_desc = np.zeros((k, dim), np.float32)
        out_pos = np.zeros((k, 2), np.float32)
        out_scale = np.zeros(k, np.int64)
        out_w = np.zeros(k, np.float32)
        mask = np.ones(k, bool)
        out_desc[:n_valid] = desc[top].float().cpu().numpy()
        out_pos[:n_valid] = positions[top].float().cpu().numpy()
        out_scale[:n_valid] = scale_ids[top].cpu().numpy()
        out_w[:n_valid] = weights[top].float().cpu().numpy()
        mask[:n_valid] = False
        return cls(out_desc, out_pos, out_scale, mask, out_w)


@dataclasses.dataclass
class ImageFeatures:
    """Everything extracted from one image.

    Attributes:
        global_desc: ``[D_g]`` float32, L2-normalised.
        local: the image's local descriptors.
        size: ``(H, W)`` of the network input after resizing.
        extra: other global variants by name (e.g. ``"cls"`` for DINOv2), each ``[D]``.
    """

    global_desc: np.ndarray
    local: LocalFeatures
    size: tuple[int, int]
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Extractor(torch.nn.Module, abc.ABC):
    """One global and ``num_local`` local descriptors per image.

    Subclasses set ``global_dim``, ``local_dim`` and ``num_local`` and implement
    :meth:`preprocess` (decoded image -> network input, the official resize rules) and
    :meth:`extract_batch` (same-size inputs -> features). The extraction runtime only uses these
    two, so any registered extractor plugs into ``locore extract`` / ``locore index``.
    """

    global_dim: int
    local_dim: int
    num_local: int

    @abc.abstractmethod
    def preprocess(self, image: np.ndarray, box: tuple[float, ...] | None = None) -> torch.Tensor:
        """Decoded RGB ``uint8 [H, W, 3]`` image (and optional query box ``x1, y1, x2, y2``) ->
        float32 network input ``[3, H', W']``."""

    @abc.abstractmethod
    def extract_batch(self, images: torch.Tensor) -> list[ImageFeatures]:
        """``[B, 3, H', W']`` inputs of one size (on the model's device) -> B features."""

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters (cpu for parameter-free extractors)."""
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.inference_mode()
    def extract(self, image: np.ndarray, box: tuple[float, ...] | None = None) -> ImageFeatures:
        """Convenience path for one decoded image."""
        x = self.preprocess(image, box).unsqueeze(0).to(self.device)
        return self.extract_batch(x)[0]
