"""Isthmus federation: the registry service on etcd, its API client, shared models and the CLI.

Public names are loaded lazily (``federation.FederationClient`` imports grpc only when
first used), because every ``isthmus`` command imports this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FederationClient": "federation.client",
    "SnapshotTracker": "federation.client",
    "WatchMessage": "federation.client",
    "Change": "federation.client",
    "Status": "federation.client",
    "GatewayStatus": "federation.client",
    "FederationError": "federation._errors",
    "RemoteError": "federation._errors",
    "StoreUnavailable": "federation._errors",
    "InvalidInput": "federation._errors",
    "InvalidRecord": "federation._errors",
    "PinMismatch": "federation._errors",
    "join": "federation._join",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'federation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
