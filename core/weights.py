"""One resolver for every model file: local path -> Hugging Face id -> URL, then strict loading.

``resolve`` never touches the network for a local path; it downloads only when the source is a
Hugging Face id (``org/name``, ``hf://org/name/file``) or an ``http(s)://`` URL. A missing local
file whose name ends in a weights suffix is reported as missing, never sent to the Hub.
``.safetensors`` files are read with safetensors; other files with
``torch.load(weights_only=True)``, which refuses pickled code.

The string :data:`RANDOM` (``"random"``) stands for random initialisation in every factory
(tests and speed benchmarks).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from locore.core.errors import UserError
from locore.core.resources import resolve_resource

logger = logging.getLogger(__name__)

RANDOM = "random"
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".pyth", ".bin", ".ckpt")
_HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def resolve(
    source: str | Path,
    filenames: Sequence[str] = HF_FILENAMES,
    cache_dir: str | Path | None = None,
) -> Path:
    """Local file of ``source``.

    Args:
        source: a file; a folder (the first of ``filenames`` in it); a Hugging Face id
            ``org/name`` (the first of ``filenames`` the repository has) or
            ``hf://org/name/path/in/repo``; or an ``http(s)://`` URL (cached by file name).
        filenames: candidate names inside a folder or repository, safetensors first.
        cache_dir: download cache (default: the Hugging Face / torch hub caches).
    """
    source = resolve_resource(source)
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in filenames:
            if (path / name).is_file():
                return path / name
        raise UserError(f"folder {path} holds none of {list(filenames)}; pass the weights file")
    if text.startswith(("http://", "https://")):
        return _download_url(text, cache_dir)
    if text.startswith("hf://"):
        repo, _, name = text[len("hf://") :].partition("/")
        repo_name, _, name = name.partition("/")
        return _download_hf(f"{repo}/{repo_name}", [name] if name else filenames, cache_dir)
    if _HF_REPO.fullmatch(text) and not text.endswith(WEIGHT_SUFFIXES):
        return _download_hf(text, filenames, cache_dir)
    raise UserError(
        f"weights {text} not found: not a file, folder, URL or Hugging Face id (org/name); "
        "check the path"
    )


def _download_hf(repo: str, filenames: Iterable[str], cache_dir: str | Path | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    tried = []
    for name in filenames:
        try:
            return Path(hf_hub_download(repo, name, cache_dir=cache_dir))
        except EntryNotFoundError:
            tried.append(name)
        except Exception as err:  # offline, unknown repo, auth: one line for the user
            raise UserError(
                f"could not fetch {name} from Hugging Face {repo} ({type(err).__name__}); "
                "check the id and the network, or pass a local file"
            ) from None
    raise UserError(f"Hugging Face {repo} has none of {tried}; pass hf://{repo}/<file>")


def _download_url(url: str, cache_dir: str | Path | None) -> Path:
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / Path(urlparse(url).path).name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, target)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as err:
        raise UserError(
            f"could not download {url} ({type(err).__name__}); check the URL and the network, "
            "or download it yourself and pass the file"
        ) from None
    return target


def read_state(path: str | Path) -> dict:
    """The object stored in a weights file (safetensors: a flat tensor dict)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"{path} cannot be read as tensors ({type(err).__name__}); if it holds pickled "
            "Python objects you trust, re-save its state dict with torch.save and pass that file"
        ) from None


def unwrap(blob: dict, keys: Sequence[str], what: str) -> dict:
    """``blob[k]`` for the first ``k`` of ``keys`` it holds (``model_state``, ``state``, ...);
    a bare state dict (tensor values) is returned as is."""
    if not isinstance(blob, dict):
        raise UserError(f"{what} holds a {type(blob).__name__}, not a state dict; pass weights")
    for key in keys:
        if isinstance(blob.get(key), dict):
            return blob[key]
    if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob
    raise UserError(f"{what} has none of the keys {list(keys)} (it has {sorted(blob)[:6]})")


def load_state(
    source: str | Path,
    what: str,
    keys: Sequence[str] = (),
    filenames: Sequence[str] = HF_FILENAMES,
    cache_dir: str | Path | None = None,
) -> dict:
    """:func:`resolve` + :func:`read_state` + :func:`unwrap`."""
    path = resolve(source, filenames, cache_dir)
    return unwrap(read_state(path), keys, f"{what} {path}")


def load_strict(
    module: nn.Module, state: dict, what: str, optional: Sequence[str] = ("num_batches_tracked",)
) -> None:
    """``load_state_dict(strict=True)`` with one error line listing every mismatch.

    Keys ending in one of ``optional`` may be absent (BatchNorm's step counter, unused in eval);
    they keep the module's value. Missing, unexpected and wrongly shaped keys are all reported.
    """
    own = module.state_dict()
    state = dict(state)
    for key in own:
        if key not in state and key.endswith(tuple(optional)):
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys {_head(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys {_head(unexpected)}")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatches, e.g. {k} {tuple(state[k].shape)} "
                f"!= {tuple(own[k].shape)}"
            )
        raise UserError(f"{what} does not fit the model: {'; '.join(parts)}; pass matching weights")
    module.load_state_dict(state, strict=True)


def _head(keys: list[str], n: int = 6) -> str:
    return str(keys[:n])[:-1] + (", ...]" if len(keys) > n else "]")
