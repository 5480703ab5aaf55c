"""Fit a rendered payload to the exact field set of one Redox event schema.

The renderer builds each payload from shared building blocks (patient, provider, visit,
location) that carry the union of the fields Redox uses across data models; each event's
schema keeps only some of them (a ``Results.New`` patient has no ``PCP``, a
``Media.Delete`` has no ``FileContents``). Redox itself emits only what the destination's
schema defines, so the renderer projects every payload onto the event's schema from the
``redox`` package (generated from Redox's JSON schemas) before it leaves the sandbox.

Projection only removes: keys the schema does not define, and ``null`` where the schema
does not allow one (an empty list replaces a ``null`` list, a ``null`` object is left out).
It never invents values, so a missing required field still fails the strict check.
"""

from __future__ import annotations

import types
import typing
from copy import deepcopy
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel
from redox.factory import get_class_type, redox_object_factory

# Meta keys real Redox traffic carries that the schemas do not model (REDOX-REFERENCE §2.2).
LEGACY_META_KEYS = ("Message", "Transmission", "Errors")


@dataclass(frozen=True, slots=True)
class _Field:
    model: type[BaseModel] | None  # nested model (object or list of objects), else None
    is_list: bool
    nullable: bool


def _unwrap(annotation: Any) -> tuple[Any, bool, bool]:
    """(innermost type, is_list, nullable) of a field annotation."""
    nullable = False
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(annotation))
            annotation = args[0]
        elif origin is list:
            is_list = True
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation, is_list, nullable


@cache
def _fields(model: type[BaseModel]) -> dict[str, _Field]:
    out: dict[str, _Field] = {}
    for name, info in model.model_fields.items():
        inner, is_list, nullable = _unwrap(info.annotation)
        nested = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
        out[info.alias or name] = _Field(nested, is_list, nullable)
    return out


def project(data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """``data`` reduced to what ``model`` defines (see the module docstring)."""
    spec = _fields(model)
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = spec.get(key)
        if field is None:
            continue
        if value is None:
            if field.nullable:
                out[key] = None
            elif field.is_list:
                out[key] = []
            continue
        if field.model is not None:
            if field.is_list and isinstance(value, list):
                value = [project(v, field.model) if isinstance(v, dict) else v for v in value]
            elif isinstance(value, dict):
                value = project(value, field.model)
        out[key] = value
    return out


def event_model(data_model: str, event_type: str) -> type[BaseModel]:
    """The ``redox`` class for one data model / event type (raises AttributeError if none)."""
    return get_class_type({"Meta": {"DataModel": data_model, "EventType": event_type}})


def conform(payload: dict[str, Any]) -> dict[str, Any]:
    """Project ``payload`` onto the schema named by its own ``Meta``, keeping the legacy
    ``Meta.Message`` / ``Meta.Transmission`` / ``Meta.Errors`` that real traffic carries."""
    meta = payload["Meta"]
    out = project(payload, event_model(meta["DataModel"], meta["EventType"]))
    for key in LEGACY_META_KEYS:
        if key in meta:
            out["Meta"][key] = meta[key]
    return out


def strict_check(payload: dict[str, Any]) -> None:
    """The project's conformance oracle (shared/STACK.md): drop the deprecated numeric ids,
    then validate strictly with ``redox``. Raises ``pydantic.ValidationError`` on failure."""
    candidate = deepcopy(payload)
    for key in ("Message", "Transmission"):
        candidate.get("Meta", {}).pop(key, None)
    redox_object_factory(candidate)
