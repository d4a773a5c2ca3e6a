"""YAML presets mapped onto frozen dataclasses, with ``--set a.b=c`` overrides.

A preset is found by name in the package's ``configs/<kind>/`` (``--config demo`` ->
``configs/pipelines/demo.yaml``) or given as a path. Unknown or mistyped keys fail with the
list of valid keys, so a typo never silently falls back to a default. The dataclasses themselves
live with the stage they configure; this module only reads, checks, merges and writes them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from locore.core.atomic import write_text
from locore.core.errors import UserError
from locore.core.resources import CONFIG_ROOT

T = TypeVar("T")


def resolve_path(name_or_path: str | Path, kind: str = "pipelines") -> Path:
    """Return the YAML file for a preset name (``configs/<kind>/<name>.yaml``) or a path.

    Only a *file* (or a name ending in ``.yaml``) is taken as a path: a folder that happens to
    share a preset's name (``locore demo --out demo`` leaves one) must not hide the preset.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass a preset name or a YAML path")
        return path
    preset = CONFIG_ROOT / kind / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))
    raise UserError(
        f"unknown {kind} config {str(name_or_path)!r}; choose one of {names} or give a YAML path"
    )


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping; an empty file is an empty mapping."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UserError(f"config {path}{where} is not valid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def parse_overrides(pairs: Sequence[str]) -> dict:
    """Turn ``["a.b=1", "c=[x, y]"]`` into a nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r} must look like key.sub=value")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {pair!r} conflicts with another override of {part!r}")
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return tree


def merge(base: Mapping, override: Mapping, where: str = "") -> dict:
    """Recursive dict merge; values of ``override`` win, nested mappings are merged.

    A mapping with integer keys merges into a list element by element, so that
    ``--set search.rerank.0.options.checkpoint=x`` changes one stage of a list of stages.
    """
    out = dict(base)
    for key, value in override.items():
        here = f"{where}{key}"
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value, f"{here}.")
        elif isinstance(value, Mapping) and isinstance(out.get(key), list):
            items = list(out[key])
            for index, item in value.items():
                if not str(index).isdigit() or int(index) >= len(items):
                    valid = f"an index from 0 to {len(items) - 1}" if items else "none"
                    raise UserError(
                        f"config key {here}.{index}: {here} holds {len(items)} items ({valid} "
                        f"to change); set the whole list instead, e.g. {here}=[...]"
                    )
                i = int(index)
                both = isinstance(item, Mapping) and isinstance(items[i], Mapping)
                items[i] = merge(items[i], item, f"{here}.{i}.") if both else item
            out[key] = items
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], data: Mapping, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types recursively."""
    if not isinstance(data, Mapping):
        raise UserError(f"config section {where or 'root'!r} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(f"config section {where or 'root'!r} needs key {missing[0]!r}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise UserError(f"config key {where} must be a list")
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"config key {where} must be a mapping")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise UserError(
            f"config key {where} must be {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def load(
    cls: type[T],
    name_or_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    kind: str = "pipelines",
) -> T:
    """Defaults <- preset file <- ``--set`` overrides, validated into ``cls``."""
    data: dict = {}
    if name_or_path is not None:
        data = read_yaml(resolve_path(name_or_path, kind))
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def to_dict(config: Any) -> dict:
    """Plain-dict view of a config dataclass (tuples become lists) for YAML/JSON output."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save(config: Any, path: Path) -> Path:
    """Write the merged config beside an output, so every result says how it was made."""
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
