"""Loading and saving LoCoRe weights: official safetensors (strict 1:1 keys) and our folders.

Sources accepted by :func:`load`, tried in this order:

1. a local ``.safetensors`` file (official layout; architecture from ``config`` or the base);
2. a local folder: ``model.safetensors`` (or its single ``*.safetensors``) plus, optionally, a
   ``config.json`` that is ours (``model_type: locore``) or an official Longformer one;
3. a Hugging Face id (``owner/name``), downloaded with ``huggingface_hub`` and read as a folder.

A folder may also hold ``fusion.json``: the fusion weight and temperature chosen for these
weights on held-out data (``locore bench fusion-grid``), read by :func:`read_fusion`.

The state-dict names of :class:`~locore.rerank.locore.model.LocoreModel` are the official ones
(reference-spec §4.13), so loading is a strict comparison of names and shapes followed by one
``load_state_dict``; any difference is a :class:`~locore.core.errors.UserError` that lists it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from locore.core.errors import UserError
from locore.core.resources import resolve_resource
from locore.rerank.locore.config import MODEL_TYPE, LocoreConfig, preset_path

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FUSION_NAME = "fusion.json"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SHOWN = 6  # names listed per kind of mismatch in one error line


def load(
    name_or_path: str | Path, config: LocoreConfig | str | Path | None = None
) -> tuple[LocoreConfig, dict[str, torch.Tensor]]:
    """Architecture and tensors of trained weights (see the module docstring).

    Args:
        name_or_path: a source of the module docstring; ``locore://`` names a packaged file.
        config: architecture of an official checkpoint without our ``config.json`` (a
            :class:`LocoreConfig` or a JSON/YAML path; default: the official base model).

    Returns:
        ``(config, state_dict)``; the caller builds the model and checks the keys with
        :func:`check_keys`, so this module never needs the model class.
    """
    weights, found = resolve(name_or_path)
    if config is not None:
        found = config if isinstance(config, LocoreConfig) else read_config(Path(config))
    if found is None:
        logger.info("%s has no config.json: assuming the official base architecture", weights)
        found = LocoreConfig()
    tensors = read_weights(weights)
    logger.info("read %d tensors from %s", len(tensors), weights)
    return found, tensors


def save(state: dict[str, torch.Tensor], config: LocoreConfig, directory: Path) -> None:
    """``directory/model.safetensors`` (official names) + ``directory/config.json`` (ours)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    config.to_json(directory / CONFIG_NAME)


def resolve(name_or_path: str | Path) -> tuple[Path, LocoreConfig | None]:
    """Weights file and (if the source has one) config for a path or Hugging Face id."""
    path = Path(resolve_resource(name_or_path))
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{path} is not a .safetensors file; pass a LoCoRe checkpoint")
        return path, None
    if path.is_dir():
        return _folder(path)
    text = str(name_or_path)
    if _is_preset(text):
        raise UserError(
            f"{text!r} is an architecture preset without weights; use "
            f"locore.rerank.locore.build_model({text!r}) for a random init or pass a checkpoint"
        )
    if HUB_ID.fullmatch(text) and not text.endswith(".safetensors"):
        return _folder(download(text))
    raise UserError(
        f"LoCoRe checkpoint {text!r} not found; pass a .safetensors file, a folder with "
        "model.safetensors, or a Hugging Face id like vislang/locore_dinov2_base"
    )


def read_fusion(name_or_path: str | Path) -> dict[str, float]:
    """``{"alpha", "temp"}`` stored with a checkpoint folder (its ``fusion.json``), or ``{}``
    when it has none (a bare ``.safetensors`` file never has one)."""
    if Path(resolve_resource(name_or_path)).is_file():
        return {}
    path = resolve(name_or_path)[0].parent / FUSION_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {"alpha": float(data["alpha"]), "temp": float(data["temp"])}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{path} holds no numeric 'alpha' and 'temp'; write it from the best.json of "
            "`locore bench fusion-grid`, or delete it"
        ) from None


def download(repo_id: str) -> Path:
    """Local snapshot of a Hub repository (weights and JSON only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise UserError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(err).__name__}); "
            "check the id and network, or pass a local folder"
        ) from None


def read_config(path: Path) -> LocoreConfig:
    """Our ``config.json``, an official Longformer ``config.json``, or a YAML preset."""
    if path.suffix in (".yaml", ".yml"):
        return LocoreConfig.from_yaml(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read config {path} ({err}); pass a JSON config") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must hold a JSON object")
    if data.get("model_type") == MODEL_TYPE:
        return LocoreConfig.from_json(data)
    return LocoreConfig.from_longformer(data)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on CPU)."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None


def check_keys(
    expected: dict[str, torch.Tensor],
    got: dict[str, torch.Tensor],
    source: object,
    fix: str = "pass the config it was trained with (config=...)",
) -> None:
    """Strict 1:1 names and shapes; one error line lists missing, unexpected and mismatched."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(
        f"{k} {list(got[k].shape)} vs {list(expected[k].shape)}"
        for k in set(expected) & set(got)
        if tuple(got[k].shape) != tuple(expected[k].shape)
    )
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:SHOWN])}{' ...' if len(items) > SHOWN else ''}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape checkpoint vs model", mismatched),
        )
        if items
    ]
    if problems:
        raise UserError(
            f"checkpoint {source} does not match the model architecture: {'; '.join(problems)}; "
            f"{fix}"
        )


def _folder(directory: Path) -> tuple[Path, LocoreConfig | None]:
    config_file = directory / CONFIG_NAME
    config = read_config(config_file) if config_file.is_file() else None
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        return weights, config
    candidates = sorted(directory.glob("*.safetensors"))
    if len(candidates) != 1:
        raise UserError(
            f"{directory} holds {len(candidates)} .safetensors files and no {WEIGHTS_NAME}; "
            "pass the weights file itself"
        )
    return candidates[0], config


def _is_preset(text: str) -> bool:
    try:
        preset_path(text)
    except UserError:
        return False
    return not Path(text).exists()
