"""Registries by name that import the implementing module only when it is asked for.

A registry maps a public name to ``"module:factory"``, or to ``("module:factory", {option:
value})`` when one factory serves several names (ResNet-50 and -101 of one family). Keeping the
table explicit (rather than collected by import-time decorators) makes every name discoverable
with ``available()`` without importing heavy model code, and keeps imports free of side effects.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from locore.core.errors import UserError


class Registry:
    """Name -> lazily imported factory, with option checking against the factory's signature."""

    def __init__(self, kind: str, table: Mapping[str, str | tuple[str, Mapping[str, Any]]]):
        self.kind = kind
        self._table = {
            name: (entry, {}) if isinstance(entry, str) else (entry[0], dict(entry[1]))
            for name, entry in table.items()
        }

    def available(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._table)

    def factory(self, name: str) -> Callable[..., Any]:
        """The factory function for ``name``; unknown names list the valid ones."""
        if name not in self._table:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of {self.available()}")
        module_name, _, attr = self._table[name][0].partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def create(self, name: str, **overrides: Any) -> Any:
        """Build ``name`` with keyword overrides; unknown or name-fixed options are errors."""
        factory = self.factory(name)
        fixed = self._table[name][1]
        clash = sorted(set(overrides) & set(fixed))
        if clash:
            raise UserError(
                f"option {clash[0]!r} is fixed by the {self.kind} name {name!r}; "
                f"drop it or pick another name from {self.available()}"
            )
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = sorted(set(overrides) - set(params))
        if unknown and not takes_any:
            valid = sorted(
                n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL and n not in fixed
            )
            raise UserError(
                f"unknown option {unknown[0]!r} for {self.kind} {name!r}; valid options: {valid}"
            )
        return factory(**fixed, **overrides)
