"""The LoCoRe architecture as one frozen record, read from presets and checkpoint JSON.

Everything that shapes the network lives here (and in a checkpoint's ``config.json``), never in
folder names: the official evaluation script derives feature dimensions and the layer count from
the checkpoint directory's name (reference-spec §6.2), which breaks as soon as a folder is renamed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from locore.core import config as config_io
from locore.core.errors import UserError
from locore.core.resources import CONFIG_ROOT

BACKENDS = ("fast", "hf")
ACTIVATIONS = ("relu", "gelu", "tanh")
MODEL_TYPE = "locore"  # marks our own config.json (an official folder holds a Longformer one)

# transformers.LongformerConfig defaults for the keys we read. An official config dict is a set of
# keyword overrides of those defaults, so missing keys must take *these* values (the golden
# reference was built with type_vocab_size 2 and eps 1e-12 that way), not our base defaults.
_LONGFORMER_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "attention_window": 512,
    "max_position_embeddings": 512,
    "layer_norm_eps": 1e-12,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1,
}
# Longformer config key -> LocoreConfig field.
_LONGFORMER_KEYS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "attention_window": "attention_window",
    "max_position_embeddings": "max_positions",
    "layer_norm_eps": "layer_norm_eps",
    "type_vocab_size": "type_vocab_size",
    "hidden_dropout_prob": "dropout",
}
# Constructor arguments of the official ExtractiveLongformerForCache that we keep, by their name.
_OFFICIAL_ARGS = (
    "local_dim",
    "global_dim",
    "num_scales",
    "query_global_attention",
    "bottleneck_dim",
    "force_linear",
    "linear_activation",
    "dropout",
    "num_local",
)


@dataclasses.dataclass(frozen=True)
class LocoreConfig:
    """LoCoRe hyper-parameters (defaults: the released base model, reference-spec §4.2/§4.13)."""

    hidden_size: int = 768  # token width H
    num_layers: int = 12  # Longformer layers
    num_heads: int = 12  # attention heads; H must divide by it
    intermediate_size: int = 3072  # FFN width
    attention_window: int = 512  # full window (even); each token sees +-window/2 neighbours
    max_positions: int = 5122  # rows of the position table; ids start at 2 (spec §4.7)
    local_dim: int = 768  # local descriptor width (projected to H when different)
    global_dim: int = 768  # global descriptor width (projected to H when different)
    num_scales: int = 3  # rows of the scale embedding
    num_local: int = 48  # local descriptors per image the model was trained with
    use_global: bool = True  # one GLOBAL token in front of each image's locals
    query_global_attention: bool = True  # the whole query block attends globally (not just SEPs)
    layer_norm_eps: float = 1e-5  # every LayerNorm
    dropout: float = 0.1  # hidden, attention-probability and classifier dropout (training only)
    bottleneck_dim: int | None = None  # Linear(D, b) -> [activation] -> Linear(b, H) projections
    force_linear: bool = False  # a Linear projection even when D == H
    linear_activation: str | None = None  # relu | gelu | tanh inside the bottleneck
    type_vocab_size: int = 1  # token-type rows (only row 0 is used; HF configs hold 1 or 2)
    backend: str = "fast"  # attention backend: "fast" (ours) or "hf" (transformers' Longformer)

    def __post_init__(self) -> None:
        positive = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "num_scales")
        for name in (*positive, "attention_window", "max_positions", "local_dim", "global_dim"):
            if getattr(self, name) < 1:
                raise UserError(f"locore config {name}={getattr(self, name)} must be positive")
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"locore hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}; change one of them"
            )
        if self.attention_window % 2:
            raise UserError(
                f"locore attention_window {self.attention_window} must be even (it is split "
                "into two halves around each token)"
            )
        if self.backend not in BACKENDS:
            raise UserError(f"unknown locore backend {self.backend!r}; choose one of {BACKENDS}")
        if self.linear_activation is not None and self.linear_activation not in ACTIVATIONS:
            raise UserError(
                f"unknown locore linear_activation {self.linear_activation!r}; choose one of "
                f"{ACTIVATIONS} or null"
            )
        if self.linear_activation is not None and self.bottleneck_dim is None:
            raise UserError("locore linear_activation needs bottleneck_dim; set both or neither")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"locore dropout {self.dropout} must lie in [0, 1)")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> LocoreConfig:
        """A copy with ``changes``; unknown names fail like a YAML key would."""
        return from_mapping({**dataclasses.asdict(self), **changes}, "overrides")

    # -- presets and our JSON ------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> LocoreConfig:
        """A preset name (``micro`` = ``locore_micro`` in ``configs/rerankers/``) or YAML path."""
        path = preset_path(name_or_path)
        return from_mapping(config_io.read_yaml(path), str(path))

    @classmethod
    def from_json(cls, source: str | Path | Mapping) -> LocoreConfig:
        """Our ``config.json`` (a path, JSON text or a parsed mapping)."""
        data = _read_json(source)
        data.pop("model_type", None)
        return from_mapping(data, "config.json")

    def to_json(self, path: Path | None = None) -> str:
        """JSON text of every field (tagged ``model_type: locore``); also written to ``path``."""
        text = json.dumps({"model_type": MODEL_TYPE, **dataclasses.asdict(self)}, indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    # -- the official layout -------------------------------------------------------------------
    @classmethod
    def from_longformer(cls, data: Mapping[str, Any], **overrides: Any) -> LocoreConfig:
        """Map an official config (a transformers Longformer ``config.json``, optionally mixed
        with ``ExtractiveLongformerForCache`` arguments) onto ours.

        Missing Longformer keys take transformers' defaults, exactly as the official code builds
        ``LongformerConfig(**data)``; missing LOCORE arguments take ours. Keys of the Longformer
        format that do not shape the re-ranker (vocab size, token ids, ...) are ignored.
        """
        pos_type = data.get("pos_type", "absolute")
        if pos_type != "absolute":
            raise UserError(
                f"official config has pos_type {pos_type!r}; only 'absolute' positions (the "
                "released models') are supported"
            )
        merged = {**_LONGFORMER_DEFAULTS, **data}
        window = merged["attention_window"]
        if isinstance(window, list | tuple):
            if len(set(window)) != 1:
                raise UserError(
                    f"official config has per-layer attention windows {sorted(set(window))}; "
                    "only one window for all layers is supported"
                )
            window = window[0]
        fields = {ours: merged[theirs] for theirs, ours in _LONGFORMER_KEYS.items()}
        fields["attention_window"] = window
        fields.update({k: data[k] for k in _OFFICIAL_ARGS if k in data})
        fields.update(overrides)
        return from_mapping({**dataclasses.asdict(cls()), **fields}, "official config")


def from_mapping(data: Mapping[str, Any], where: str) -> LocoreConfig:
    """Validated :class:`LocoreConfig` from a mapping; unknown keys name the valid ones."""
    try:
        return config_io.from_dict(LocoreConfig, data)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def preset_path(name_or_path: str | Path) -> Path:
    """YAML file of a preset name (``tiny`` and ``locore_tiny`` both work) or a path."""
    text = str(name_or_path)
    root = CONFIG_ROOT / "rerankers"
    if not text.endswith((".yaml", ".yml")) and not Path(text).exists():
        for candidate in (f"locore_{text}", text):
            if (root / f"{candidate}.yaml").is_file():
                return root / f"{candidate}.yaml"
        names = sorted(p.stem.removeprefix("locore_") for p in root.glob("locore_*.yaml"))
        raise UserError(f"unknown locore preset {text!r}; choose one of {names} or a YAML path")
    return config_io.resolve_path(name_or_path, "rerankers")


def _read_json(source: str | Path | Mapping) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    text = str(source)
    if not text.lstrip().startswith("{"):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass our config.json")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"config JSON is not valid ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise UserError("config JSON must hold an object of keys")
    return data
