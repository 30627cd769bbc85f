"""Lazy public names for a package: its ``__init__`` lists where each name lives and the
module is imported on first use (so ``import federation.server`` loads no etcd client)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``; ``names`` maps a public name to its module,
    given either in full (``federation.client``) or relative to the package (``_hub``)."""
    module = sys.modules[package]

    def __getattr__(name: str) -> Any:
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        full = where if where.startswith(f"{package}.") else f"{package}.{where}"
        value = getattr(importlib.import_module(full), name)
        setattr(module, name, value)  # resolved once
        return value

    return __getattr__
