"""Strict reading of files users write: every key must be one the model defines.

The models in :mod:`federation.models` are what etcd and the wire carry, and readers of
those stay lenient.  A file a user wrote is different: ``service:`` for ``services:`` must
be refused, naming the key and where it is, not read as "nothing".  :func:`unknown_keys`
walks the data alongside a pydantic model (nested models, lists and tuples of them,
optional fields) and reports every key the model does not define.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The model classes an annotation may hold (``X``, ``X | None``, ``tuple[X, ...]``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, tuple, list, set, frozenset):
        out: list[type[BaseModel]] = []
        for arg in typing.get_args(annotation):
            if arg is not Ellipsis:
                out.extend(_models_in(arg))
        return out
    return []


def field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return names


def unknown_keys(data: Any, model: type[BaseModel], path: str = "") -> list[str]:
    """``["services[0].colour: unknown key (expected one of: name, namespace, ...)", ...]``."""
    if not isinstance(data, dict):
        return []
    problems: list[str] = []
    known = field_names(model)
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(sorted(known))}"
            problems.append(f"{where}: unknown key ({hint})")
            continue
        info = model.model_fields.get(key) or next(
            (f for f in model.model_fields.values() if f.alias == key), None)
        nested = _models_in(info.annotation) if info is not None else []
        if len(nested) != 1:
            continue  # a plain value, or a union the model itself tells apart
        sub = nested[0]
        if isinstance(value, dict):
            problems.extend(unknown_keys(value, sub, where))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                problems.extend(unknown_keys(item, sub, f"{where}[{i}]"))
    return problems
