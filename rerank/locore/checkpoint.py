"""Loading and saving LoCoRe weights: official safetensors (strict 1:1 keys) and our folders.

Sources accepted by :func:`load`, tried in this order:

1. a local ``.safetensors`` file (official layout; architecture from ``config`` or the base);
2. a local folder: ``model.safetensors`` (or its single ``*.safetensors``) plus, optionally, a
   ``config.json`` that is ours (``model_type: locore``) or an official Longformer one;
3. a Hugging Face id (``owner/name``), downloaded with ``huggingface_hub`` and read as a folder.

The state-dict names of :class:`~rerank.locore.model.LocoreModel` are the official ones
(reference-spec §4.13), so loading is a strict comparison of names and shapes followed by one
``load_state_dict``; any difference is a :class:`~engine.errors.UserError` that lists it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.errors import UserError
from rerank.locore.config import MODEL_TYPE, LocoreConfig, preset_path
from rerank.locore.model import LocoreModel

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SHOWN = 6  # names listed per kind of mismatch in one error line


def load(
    name_or_path: str | Path,
    backend: str = "fast",
    device: torch.device | str = "cpu",
    config: LocoreConfig | str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> LocoreModel:
    """Build a :class:`LocoreModel` from trained weights (see the module docstring)."""
    weights, found = resolve(name_or_path)
    if config is not None:
        found = config if isinstance(config, LocoreConfig) else read_config(Path(config))
    if found is None:
        logger.info("%s has no config.json: assuming the official base architecture", weights)
        found = LocoreConfig()
    found = found.replace(backend=backend)
    tensors = read_weights(weights)
    with torch.device("meta"):
        model = LocoreModel(found)
    check_keys(model.state_dict(), tensors, weights)
    model.load_state_dict(tensors, strict=True, assign=True)
    logger.info("loaded %d tensors from %s", len(tensors), weights)
    return model.to(device=device, dtype=dtype).eval()


def save(model: LocoreModel, directory: Path) -> None:
    """``directory/model.safetensors`` (official names) + ``directory/config.json`` (ours)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    model.config.to_json(directory / CONFIG_NAME)


def resolve(name_or_path: str | Path) -> tuple[Path, LocoreConfig | None]:
    """Weights file and (if the source has one) config for a path or Hugging Face id."""
    path = Path(name_or_path)
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
            f"rerank.locore.build_model({text!r}) for a random init or pass a checkpoint"
        )
    if HUB_ID.fullmatch(text) and not text.endswith(".safetensors"):
        return _folder(download(text))
    raise UserError(
        f"LoCoRe checkpoint {text!r} not found; pass a .safetensors file, a folder with "
        "model.safetensors, or a Hugging Face id like vislang/locore_dinov2_base"
    )


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


def init_from_longformer(model: LocoreModel, source: dict[str, torch.Tensor]) -> None:
    """Start training from a pretrained Longformer (``LongformerModel`` / ``...ForMaskedLM``
    state dict, e.g. ``allenai/longformer-base-4096``), in place.

    Copies the embeddings' LayerNorm, token-type rows and the first ``num_layers`` encoder
    layers (the official ``num_layers_kept``), and sets ``sep_embedding`` / ``pad_embedding``
    to word-embedding rows 2 (``</s>``) and 1 (``<pad>``). The official code meant to do this
    but copied them before the weights were loaded, so it trained from garbage (spec P10).
    A position table shorter than the model's is extended by tiling rows 2.. (the allenai
    "convert to long" recipe; the official extension procedure is not documented). The
    classifier, scale embedding and projections keep their random init.
    """
    src = {k.removeprefix("longformer."): v for k, v in source.items()}
    backbone = "language_model.longformer."
    target = model.state_dict()
    wanted = {
        k: k.removeprefix(backbone)
        for k in target
        if k.startswith(backbone + "encoder.") or k.startswith(backbone + "embeddings.LayerNorm")
    }
    required = {theirs: target[ours] for ours, theirs in wanted.items()}
    check_keys(
        required,
        {k: src[k] for k in required if k in src},
        "(pretrained Longformer)",
        "build the model with the pretrained model's width, heads and FFN size",
    )
    embeddings = ("word_embeddings", "position_embeddings", "token_type_embeddings")
    missing = [f"embeddings.{k}.weight" for k in embeddings if f"embeddings.{k}.weight" not in src]
    if missing:
        raise UserError(f"pretrained Longformer state dict lacks {missing}; pass a full one")
    words, positions, types = (src[f"embeddings.{k}.weight"] for k in embeddings)
    hidden, num_types = model.config.hidden_size, model.config.type_vocab_size
    if {words.shape[1], positions.shape[1], types.shape[1]} != {hidden} or len(types) < num_types:
        raise UserError(
            f"pretrained Longformer is {words.shape[1]}-D with {len(types)} token types; the "
            f"model needs {hidden}-D and {num_types}"
        )
    rows = model.config.max_positions
    reserved = positions[:2]
    tiled = positions[2:].repeat(-(-(rows - 2) // (positions.shape[0] - 2)), 1)[: rows - 2]
    new = {ours: src[theirs] for ours, theirs in wanted.items()}
    new[backbone + "embeddings.position_embeddings.weight"] = torch.cat([reserved, tiled])
    new[backbone + "embeddings.token_type_embeddings.weight"] = types[:num_types]
    new[backbone + "sep_embedding"] = words[2]
    new[backbone + "pad_embedding"] = words[1]
    with torch.no_grad():
        for name, value in new.items():
            target[name].copy_(value)


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
