"""The sandbox population: canonical records, the store interface and its two backends.

``sandbox.config`` imports ``sandbox.population.records``, so this package must not import the
backends (which import ``sandbox.config``) eagerly; they load on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.population.static import StaticPopulation
    from sandbox.population.store import Query, RecordStore
    from sandbox.population.synthetic import SyntheticPopulation

__all__ = ["Query", "RecordStore", "StaticPopulation", "SyntheticPopulation"]

_LAZY = {
    "Query": "sandbox.population.store",
    "RecordStore": "sandbox.population.store",
    "StaticPopulation": "sandbox.population.static",
    "SyntheticPopulation": "sandbox.population.synthetic",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox.population' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
