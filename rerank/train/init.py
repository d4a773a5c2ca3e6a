"""Where training starts: a random preset, pretrained Longformer/RoBERTa weights, or our checkpoint.

``init`` values (``TrainConfig.init``):

* ``scratch``: the preset's architecture with HF-style random weights;
* ``scratch-identity``: the same, with every attention layer's query and key maps (local and
  global) at the identity: attention weighs tokens by the similarity of their embeddings from the
  first step. At N(0, 0.02) those weights start attention nearly uniform and its gradient
  towards matching tiny; from the identity a micro model learnt lists whose positives are told
  apart only by shared locals in 1,000 steps, against 4,000 steps without getting far
  (rerank/checkpoints/locore_offline/MODEL_CARD.md, "Attention that starts by matching");
* a folder holding our ``config.json`` (``model_type: locore``): continue from that checkpoint;
* a Longformer or RoBERTa folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``) or a Hugging Face id such as ``allenai/longformer-base-4096``: the
  transformer's width, heads, FFN and layers come from its config (the official
  ``use_pretrained``), everything about descriptors from the preset. The position table is
  extended to the preset's ``max_positions`` (5,122) by copying the pretrained rows (the allenai
  "convert to long" recipe the README cites), and the SEP / pad vectors are word-embedding rows
  2 and 1 copied *after* the weights are loaded: the official code copied them before, so it
  started from uninitialised memory (reference-spec §9 P10). RoBERTa has no global-attention
  projections; they start as copies of the local ones, as in that recipe.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from locore.core.errors import UserError
from locore.rerank.locore.checkpoint import CONFIG_NAME, HUB_ID, check_keys
from locore.rerank.locore.config import MODEL_TYPE, LocoreConfig
from locore.rerank.locore.model import LocoreModel, build_model

logger = logging.getLogger(__name__)

LANGUAGE_MODELS = ("longformer", "roberta")
_GLOBAL_COPIES = ("query", "key", "value")
_MATCHING_MAPS = ("query", "key", "query_global", "key_global")  # the maps of q . k


def init_model(
    preset: str,
    init: str = "scratch",
    backend: str = "fast",
    layers: int = 0,
    overrides: dict | None = None,
) -> LocoreModel:
    """A model to train (in train mode); see the module docstring for ``init``.

    Args:
        preset: architecture preset name or YAML path (descriptor widths, window, positions).
        init: ``scratch``, ``scratch-identity``, our checkpoint folder, or a Longformer/RoBERTa
            folder or HF id.
        backend: attention backend, ``fast`` or ``hf``.
        layers: keep only the first ``layers`` pretrained layers (0 = all).
        overrides: preset keys to change (e.g. ``{"local_dim": 112}``).
    """
    architecture = LocoreConfig.from_yaml(preset).replace(
        **{**(overrides or {}), "backend": backend}
    )
    if init in ("scratch", "scratch-identity"):
        model = build_model(architecture)
        if init == "scratch-identity":
            identity_attention(model)
        return model.train()
    folder = Path(init)
    if not folder.is_dir():
        if not HUB_ID.fullmatch(init):
            raise UserError(
                f"train init {init!r} is neither 'scratch', 'scratch-identity', a folder nor a "
                "Hugging Face id"
            )
        folder = _download(init)
    meta = _read_config(folder)
    if meta.get("model_type") == MODEL_TYPE:
        return LocoreModel.from_pretrained(folder, backend=backend).train()
    if meta.get("model_type") not in LANGUAGE_MODELS:
        raise UserError(
            f"{folder / CONFIG_NAME} has model_type {meta.get('model_type')!r}; start from a "
            f"LoCoRe checkpoint or one of {LANGUAGE_MODELS}"
        )
    config = language_model_config(architecture, meta, layers)
    model = LocoreModel(config)
    init_from_longformer(model, language_model_weights(folder, meta["model_type"]))
    logger.info("initialised %d-layer LoCoRe from %s", config.num_layers, folder)
    return model.train()


def identity_attention(model: LocoreModel) -> None:
    """Every attention layer's query and key maps, local and global, become the identity (zero
    bias), so that ``q . k`` is the dot product of the two tokens' embeddings."""
    with torch.no_grad():
        for layer in model.language_model.longformer.encoder.layer:
            for name in _MATCHING_MAPS:
                linear = getattr(layer.attention.self, name)
                linear.weight.copy_(torch.eye(*linear.weight.shape))
                linear.bias.zero_()


def language_model_config(preset: LocoreConfig, meta: dict, layers: int = 0) -> LocoreConfig:
    """The preset with the pretrained transformer's shape (``meta``: its ``config.json``)."""
    available = meta.get("num_hidden_layers", 12)
    if layers > available:
        raise UserError(f"train init_layers={layers} but the pretrained model has {available}")
    window = meta.get("attention_window", preset.attention_window)
    if isinstance(window, list):
        window = window[0]
    return preset.replace(
        hidden_size=meta.get("hidden_size", 768),
        num_layers=layers or available,
        num_heads=meta.get("num_attention_heads", 12),
        intermediate_size=meta.get("intermediate_size", 3072),
        layer_norm_eps=meta.get("layer_norm_eps", 1e-12),
        type_vocab_size=meta.get("type_vocab_size", 2),
        dropout=meta.get("hidden_dropout_prob", 0.1),
        attention_window=window,
    )


def language_model_weights(folder: Path, model_type: str) -> dict[str, torch.Tensor]:
    """The encoder's state dict with bare names (``embeddings.*``, ``encoder.layer.*``)."""
    weights = folder / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        state = load_file(weights)
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")
    state = {k.removeprefix(f"{model_type}."): v for k, v in state.items()}
    if model_type == "roberta":
        for key in list(state):
            for name in _GLOBAL_COPIES:
                if f".attention.self.{name}." in key:
                    state[key.replace(f".{name}.", f".{name}_global.")] = state[key].clone()
    return state


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{path} does not exist; train init needs a folder with a config.json")
    return json.loads(path.read_text())


def _download(repo_id: str) -> Path:
    """Config and weights of a Hugging Face model (the only network access of training)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=[CONFIG_NAME, "model.safetensors", "pytorch_model.bin"]
            )
        )
    except Exception as err:  # hub errors are many types; all mean "cannot fetch"
        raise UserError(
            f"cannot download {repo_id} ({type(err).__name__}); pass a local folder"
        ) from None


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
