"""Registries by name that import the implementing module only when it is asked for.

A registry maps a public name to ``"module:factory"``. Keeping the table explicit (rather than
collected by import-time decorators) makes every name discoverable with ``available()`` without
importing heavy model code, and keeps imports free of side effects.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from engine.errors import UserError


class Registry:
    """Name -> lazily imported factory, with option checking against the factory's signature."""

    def __init__(self, kind: str, table: Mapping[str, str]):
        self.kind = kind
        self._table = dict(table)

    def available(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._table)

    def factory(self, name: str) -> Callable[..., Any]:
        """The factory function for ``name``; unknown names list the valid ones."""
        if name not in self._table:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of {self.available()}")
        module_name, _, attr = self._table[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def create(self, name: str, **overrides: Any) -> Any:
        """Build ``name`` with keyword overrides; unknown options list the valid ones."""
        factory = self.factory(name)
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = sorted(set(overrides) - set(params))
        if unknown and not takes_any:
            valid = sorted(n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL)
            raise UserError(
                f"unknown option {unknown[0]!r} for {self.kind} {name!r}; valid options: {valid}"
            )
        return factory(**overrides)
