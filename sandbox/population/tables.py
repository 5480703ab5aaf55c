"""The synthetic population's compact state: column tables per (connection, entity) and the
immutable snapshot that readers hold while ``advance`` prepares the next one."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from sandbox.config import ConnectionSpec
from sandbox.population.generate import CLIN_NONE, Rows
from sandbox.population.ids import id_high_np, record_key_np
from sandbox.population.query import EntityIndex, sort_order

# Column dtypes as stored: times are int32 seconds from the clock start (±68 years).
COMPACT = {
    "patient": np.int32,
    "clin": np.int32,
    "lu": np.int32,
    "status": np.int8,
    "category": np.int8,
    "version": np.int16,
    "link": np.int32,
    "aux": np.int32,
    "item": np.int16,
    "order_no": np.int32,
}


@dataclass(frozen=True)
class Persons:
    """Per-person columns that searches need; everything else derives from the person's hash."""

    family: np.ndarray  # int16 index into vocab.FAMILY_NAMES
    given: np.ndarray  # int16 index into vocab.GIVEN_NAMES
    middle: np.ndarray  # int16, -1 for none
    sex: np.ndarray  # int8 index into SEXES
    dob: np.ndarray  # int32 days since 1970-01-01

    def __len__(self) -> int:
        return len(self.family)

    def extend(self, other: Persons) -> Persons:
        return Persons(
            *(
                np.concatenate([getattr(self, k), getattr(other, k)])
                for k in ("family", "given", "middle", "sex", "dob")
            )
        )


@dataclass(eq=False)
class Table:
    """One (connection, entity) table. ``base`` holds each row's columns as created (what the
    record builder reads); ``index`` holds the current queryable columns (which ``advance``
    replaces copy-on-write)."""

    entity: str
    base: Rows
    index: EntityIndex

    def __len__(self) -> int:
        return len(self.base.patient)


@dataclass(eq=False)
class ConnState:
    spec: ConnectionSpec
    members: np.ndarray  # int32: patient row -> person
    patient_of: np.ndarray  # int32: person -> patient row, -1 when unknown here
    tables: dict[str, Table]
    next_order_no: int


@dataclass(eq=False)
class Snapshot:
    now: int  # seconds after the clock start
    persons: Persons
    conns: dict[str, ConnState]
    overrides: dict[tuple[str, str, int], dict]  # (connection, entity, row) -> changed fields
    advances: int
    counts: dict[bool, dict[str, dict[str, int]]] = field(default_factory=dict)


def compact(rows: Rows) -> Rows:
    return Rows(**{k: np.asarray(getattr(rows, k)).astype(dt, copy=False) for k, dt in COMPACT.items()})


def concat(a: Rows, b: Rows) -> Rows:
    return Rows(**{k: np.concatenate([getattr(a, k), getattr(b, k).astype(dt)]) for k, dt in COMPACT.items()})


def sort_keys(
    table_salt: int, members: np.ndarray, entity: str, patient: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Per-row keys that order exactly like the rows' FHIR ids."""
    person = members[rows] if entity == "patients" else members[patient[rows]]
    return id_high_np(record_key_np(table_salt, person, rows))


def make_index(entity: str, epoch: datetime, base: Rows, order: np.ndarray, **current) -> EntityIndex:
    return EntityIndex(
        entity=entity,
        epoch=epoch,
        ticks_per_second=1,
        lu=current.get("lu", base.lu),
        clin=current.get("clin", base.clin),
        status=current.get("status", base.status),
        category=base.category,
        patient=base.patient,
        order=order,
        clin_missing=int(CLIN_NONE),
    )


def new_table(entity: str, epoch: datetime, rows: Rows, table_salt: int, members: np.ndarray) -> Table:
    base = compact(rows)
    keys = sort_keys(table_salt, members, entity, base.patient, np.arange(len(base.patient)))
    return Table(entity, base, make_index(entity, epoch, base, sort_order(base.lu, keys)))
