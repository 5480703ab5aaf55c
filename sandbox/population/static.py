"""A population over records given up front (``--seed-from`` feeds it parsed FHIR files).

It answers queries with the same column index and selection logic as the synthetic
population (``sandbox.population.query``) and evolves with the same rules
(``sandbox.population.evolve``); new records in ``advance`` are clones of existing ones with
fresh ids. Like the synthetic population it publishes each advance as one new state.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import numpy as np

from sandbox.config import ConnectionSpec
from sandbox.population import evolve
from sandbox.population.ids import salt
from sandbox.population.query import (
    CATEGORY_VALUES,
    NO_CATEGORY,
    STATUS_VALUES,
    EntityIndex,
    SelectionCache,
    dead_codes,
    patient_matches,
    patients_starting_since,
    query_key,
    record_business_id,
    record_category,
    record_clinical_date,
    record_patient_id,
    record_status,
    rows_for_ids,
    select,
    sort_order,
)
from sandbox.population.records import (
    ENTITIES,
    ENTITY_RECORD_TYPES,
    AllergyRecord,
    AppointmentRecord,
    Change,
    DiagnosticReportRecord,
    DocumentRecord,
    EncounterRecord,
    ImmunizationRecord,
    MedicationRecord,
    OrderRecord,
    PatientRecord,
    ProblemRecord,
    ProcedureRecord,
    Record,
    ResultRecord,
    is_live,
)
from sandbox.population.store import Query, RecordStore

_TICKS = 1_000_000  # microseconds: FHIR lastUpdated may carry fractions of a second
_MISSING = int(np.iinfo(np.int64).min)
_CHANGE_SPLIT = (0.45, 0.45, 0.10)


class StaticPopulationError(ValueError):
    """The records handed to StaticPopulation are inconsistent (the message names the field)."""


@dataclass(eq=False)
class _Table:
    entity: str
    records: list[Record]
    index: EntityIndex
    by_id: dict[str, int]
    by_business_id: dict[str, int]


@dataclass(eq=False)
class _State:
    now: datetime
    tables: dict[str, dict[str, _Table]]  # connection -> entity -> table
    patient_codes: dict[str, dict[str, int]]  # connection -> patient id -> patient code
    advances: int


def _used_numbers(records: Sequence[Record]) -> set[str]:
    """Business numbers already taken in a table (MRNs, visit numbers, order ids, document ids)."""
    used: set[str] = set()
    for r in records:
        if isinstance(r, PatientRecord):
            used.add(r.mrn)
        elif isinstance(r, EncounterRecord):
            used.update(x for x in (r.visit_number, r.account_number) if x)
        elif isinstance(r, ResultRecord | MedicationRecord):
            used.add(r.order_id)
        elif isinstance(r, AppointmentRecord):
            used.add(r.visit_number)
        elif isinstance(r, DocumentRecord):
            used.add(r.document_id)
        elif (b := record_business_id(r)) is not None:
            used.add(b)
    return used


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class StaticPopulation(RecordStore):
    def __init__(
        self,
        connections: list[ConnectionSpec],
        records: Mapping[str, Mapping[str, Sequence[Record]]],
        clock_start: datetime,
    ) -> None:
        self._specs = {c.id: c for c in connections}
        self._conn_order = {c.id: i for i, c in enumerate(connections)}
        self._epoch = _aware(clock_start)
        self._write_lock = threading.Lock()
        self._cache = SelectionCache()
        unknown = set(records) - set(self._specs)
        if unknown:
            raise StaticPopulationError(f"records given for unknown connection '{sorted(unknown)[0]}'")
        tables: dict[str, dict[str, _Table]] = {}
        codes: dict[str, dict[str, int]] = {}
        for spec in connections:
            given = records.get(spec.id, {})
            extra = set(given) - set(spec.entities)
            if extra:
                raise StaticPopulationError(
                    f"connection '{spec.id}': records given for entity '{sorted(extra)[0]}' not in its entities"
                )
            lists = {e: [self._own(spec.id, e, r) for r in given.get(e, ())] for e in spec.entities}
            codes[spec.id] = self._patient_codes(lists)
            tables[spec.id] = {e: self._table(e, lists[e], codes[spec.id]) for e in spec.entities}
        self._state = _State(self._epoch, tables, codes, 0)
        self._next_number = 900_000_000

    # ---------------------------------------------------------------- building

    def _own(self, connection_id: str, entity: str, record: Record) -> Record:
        expected = ENTITY_RECORD_TYPES[entity]
        if not isinstance(record, expected):
            raise StaticPopulationError(
                f"connection '{connection_id}': {entity} expects {expected.__name__}, got {type(record).__name__}"
            )
        if record.connection_id != connection_id:
            raise StaticPopulationError(
                f"connection '{connection_id}': a {entity} record names another connection"
            )
        status = record_status(record)
        if status not in STATUS_VALUES[entity]:
            raise StaticPopulationError(
                f"connection '{connection_id}': {entity} status '{status}' is not supported"
            )
        return replace(record, last_updated=_aware(record.last_updated))

    @staticmethod
    def _patient_codes(lists: dict[str, list[Record]]) -> dict[str, int]:
        codes = {r.id: i for i, r in enumerate(lists.get("patients", []))}
        for entity, recs in lists.items():
            if entity == "patients":
                continue
            for r in recs:
                codes.setdefault(record_patient_id(r), len(codes))
        return codes

    def _ticks(self, dt: datetime) -> int:
        return (_aware(dt) - self._epoch) // timedelta(microseconds=1)

    def _table(self, entity: str, records: list[Record], patient_codes: dict[str, int]) -> _Table:
        n = len(records)
        by_id: dict[str, int] = {}
        by_business: dict[str, int] = {}
        for i, r in enumerate(records):
            if r.id in by_id:
                raise StaticPopulationError(f"{entity}: duplicate record id in one connection")
            by_id[r.id] = i
            b = record_business_id(r)
            if b is not None:
                by_business.setdefault(b, i)
        lu = np.fromiter((self._ticks(r.last_updated) for r in records), dtype=np.int64, count=n)
        clin = np.fromiter(
            (_MISSING if (d := record_clinical_date(r)) is None else self._ticks(d) for r in records),
            dtype=np.int64,
            count=n,
        )
        values = STATUS_VALUES[entity]
        status = np.fromiter((values.index(record_status(r)) for r in records), dtype=np.int8, count=n)
        cats = CATEGORY_VALUES[entity]
        category = np.fromiter(
            (cats.index(c) if (c := record_category(r)) in cats else NO_CATEGORY for r in records),
            dtype=np.int8,
            count=n,
        )
        patient = np.fromiter(
            (patient_codes.get(record_patient_id(r), -1) for r in records), dtype=np.int64, count=n
        )
        ranks = {rid: k for k, rid in enumerate(sorted(by_id))}
        keys = np.fromiter((ranks[r.id] for r in records), dtype=np.int64, count=n)
        index = EntityIndex(
            entity=entity,
            epoch=self._epoch,
            ticks_per_second=_TICKS,
            lu=lu,
            clin=clin,
            status=status,
            category=category,
            patient=patient,
            order=sort_order(lu, keys),
            clin_missing=_MISSING,
        )
        return _Table(entity, records, index, by_id, by_business)

    # ---------------------------------------------------------------- reading

    @property
    def now(self) -> datetime:
        return self._state.now

    def _tables(self, state: _State, connection_id: str) -> dict[str, _Table]:
        try:
            return state.tables[connection_id]
        except KeyError:
            raise KeyError(f"unknown connection {connection_id!r}") from None

    def _selection(self, state: _State, query: Query):
        table = self._tables(state, query.connection_id).get(query.entity)
        if table is None:
            return None, None
        key = (table.index, query_key(query))
        sel = self._cache.get(key)
        if sel is None:
            patient_row = None
            if query.patient_id is not None:
                patient_row = state.patient_codes[query.connection_id].get(query.patient_id, -1)
            id_rows = rows_for_ids(query.ids, table.by_id.get) if query.ids is not None else None
            sel = select(table.index, query, patient_row=patient_row, id_rows=id_rows)
            self._cache.put(key, sel)
        return table, sel

    def count(self, query: Query) -> int:
        _, sel = self._selection(self._state, query)
        return 0 if sel is None else sel.count

    def page(self, query: Query, offset: int, limit: int) -> list[Record]:
        table, sel = self._selection(self._state, query)
        if sel is None:
            return []
        return [replace(table.records[int(r)]) for r in sel.take(offset, limit)]

    def get(self, connection_id: str, entity: str, record_id: str) -> Record | None:
        table = self._tables(self._state, connection_id).get(entity)
        row = None if table is None else table.by_id.get(record_id)
        return None if row is None else replace(table.records[row])  # type: ignore[union-attr]

    def find_patients(
        self,
        connection_id: str,
        *,
        identifier: str | None = None,
        id_type: str | None = None,
        family: str | None = None,
        given: str | None = None,
        birth_date: str | None = None,
    ) -> list[PatientRecord]:
        table = self._tables(self._state, connection_id).get("patients")
        if table is None:
            return []
        return [
            replace(r)  # type: ignore[misc]
            for r in table.records
            if patient_matches(
                r, identifier=identifier, id_type=id_type, family=family, given=given, birth_date=birth_date
            )  # type: ignore[arg-type]
        ]

    def find_by_business_id(self, connection_id: str, entity: str, business_id: str) -> Record | None:
        table = self._tables(self._state, connection_id).get(entity)
        row = None if table is None else table.by_business_id.get(business_id)
        return None if row is None else replace(table.records[row])  # type: ignore[union-attr]

    def counts(self, live_only: bool = False) -> dict[str, dict[str, int]]:
        state = self._state
        return {
            cid: {e: (t.index.live_count() if live_only else len(t.records)) for e, t in tables.items()}
            for cid, tables in state.tables.items()
        }

    def roster(self, connection_id: str) -> list[str]:
        table = self._tables(self._state, connection_id).get("patients")
        return [r.mrn for r in table.records] if table else []  # type: ignore[union-attr]

    def active_patients(self, connection_id: str, since: datetime) -> int:
        tables = self._tables(self._state, connection_id)
        indexes = [tables[e].index for e in ("encounters", "appointments") if e in tables]
        return patients_starting_since(indexes, since)

    def persons(self) -> list[dict]:
        state = self._state
        groups: dict[str, list[dict]] = {}
        for cid in self._specs:
            table = state.tables[cid].get("patients")
            for r in table.records if table else ():
                key = r.enterprise_id or r.id  # type: ignore[union-attr]
                groups.setdefault(key, []).append({"connection_id": cid, "patient_id": r.id, "mrn": r.mrn})  # type: ignore[union-attr]
        return [{"enterprise_id": k, "records": v} for k, v in sorted(groups.items())]

    # ---------------------------------------------------------------- advancing

    def advance(self, days: float, change_fraction: float) -> list[Change]:
        if days < 0:
            raise ValueError("advance: days must not be negative")
        if not 0 <= change_fraction <= 1:
            raise ValueError("advance: change_fraction must be between 0 and 1")
        with self._write_lock:
            state = self._state
            span_s = int(round(days * 86400))
            if span_s <= 0:
                return []
            t0 = state.now
            t1 = t0 + timedelta(seconds=span_s)
            step = state.advances + 1
            pending: list[tuple[datetime, int, int, str, Change]] = []
            new_tables: dict[str, dict[str, _Table]] = {}
            new_codes: dict[str, dict[str, int]] = {}
            entity_order = {e: i for i, e in enumerate(ENTITIES)}
            for cid, tables in state.tables.items():
                lists: dict[str, list[Record]] = {}
                for entity, table in tables.items():
                    rng = np.random.default_rng([step, salt(cid, entity, "static-advance")])
                    prng = random.Random(salt(cid, entity, "static-advance", step))
                    lists[entity], changes = self._evolve(table, rng, prng, t0, span_s, change_fraction)
                    for c in changes:
                        pending.append(
                            (
                                c.record.last_updated,
                                entity_order[entity],
                                self._conn_order[cid],
                                c.record.id,
                                c,
                            )
                        )
                new_codes[cid] = self._patient_codes(lists)
                new_tables[cid] = {e: self._table(e, lists[e], new_codes[cid]) for e in tables}
            pending.sort(key=lambda p: p[:4])
            self._state = _State(t1, new_tables, new_codes, step)
            self._cache.clear()
            return [replace(p[4], record=replace(p[4].record)) for p in pending]

    def _evolve(
        self,
        table: _Table,
        rng: np.random.Generator,
        prng: random.Random,
        t0: datetime,
        span_s: int,
        fraction: float,
    ) -> tuple[list[Record], list[Change]]:
        records = list(table.records)
        n = len(records)
        if not n:
            return records, []
        k = int(rng.binomial(n, fraction))
        n_new, n_upd, n_cancel = (int(x) for x in rng.multinomial(k, _CHANGE_SPLIT))
        live = np.flatnonzero(~np.isin(table.index.status, dead_codes(table.entity)))
        transitional = [STATUS_VALUES[table.entity].index(s) for s in evolve.TRANSITIONAL[table.entity]]
        trans = live[np.isin(table.index.status[live], transitional)]
        n_upd = min(n_upd, len(live))
        n_first = min(len(trans), int(np.ceil(n_upd * 0.6)))
        first = rng.choice(trans, size=n_first, replace=False) if n_first else np.empty(0, np.int64)
        pool = np.setdiff1d(live, first)
        rest = (
            rng.choice(pool, size=min(n_upd - n_first, len(pool)), replace=False)
            if len(pool)
            else np.empty(0, np.int64)
        )
        updated = np.concatenate([first, rest]).astype(np.int64)
        pool = np.setdiff1d(live, updated)
        cancelled = (
            rng.choice(pool, size=min(n_cancel, len(pool)), replace=False)
            if len(pool)
            else np.empty(0, np.int64)
        )

        def when() -> datetime:
            return t0 + timedelta(seconds=1 + prng.randrange(span_s))

        changes: list[Change] = []
        for row in updated.tolist():
            before = records[row]
            records[row] = evolve.update_record(
                before, prng, max(when(), before.last_updated + timedelta(seconds=1))
            )
            changes.append(Change(table.entity, "update", records[row], record_status(before)))
        for row in cancelled.tolist():
            before = records[row]
            records[row] = evolve.cancel_record(
                before, prng, max(when(), before.last_updated + timedelta(seconds=1))
            )
            changes.append(Change(table.entity, "cancel", records[row], record_status(before)))
        sources = [r for r in table.records if is_live(r)] or list(table.records)
        taken = set(table.by_id)
        used = _used_numbers(table.records)
        for _ in range(n_new):
            clone = self._clone(prng.choice(sources), prng, when(), taken, used)
            taken.add(clone.id)
            records.append(clone)
            changes.append(Change(table.entity, "new", clone, None))
        return records, changes

    def _fresh_number(self, used: set[str]) -> str:
        self._next_number += 1
        while str(self._next_number) in used:
            self._next_number += 1
        used.add(str(self._next_number))
        return str(self._next_number)

    def _clone(
        self, source: Record, rng: random.Random, at: datetime, taken: set[str], used: set[str]
    ) -> Record:
        """A new record shaped like ``source``: fresh ids, version 1, at the start of its life."""
        new_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        while new_id in taken:
            new_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        common = {"id": new_id, "version": 1, "last_updated": at}
        if isinstance(source, PatientRecord):
            return replace(
                source,
                **common,
                mrn=self._fresh_number(used),
                ehr_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)) if source.ehr_id else "",
                enterprise_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                nist_id=f"{rng.getrandbits(60):015x}" if source.nist_id else None,
                person_index=-1,
                is_test=False,
                active=True,
            )
        if isinstance(source, EncounterRecord):
            return replace(
                source, **common, visit_number=self._fresh_number(used), status="in-progress", start_at=at, end_at=None,
                discharge_disposition=None,
                account_number=self._fresh_number(used) if source.account_number else None,
            )  # fmt: skip
        if isinstance(source, ResultRecord):
            order_id = self._fresh_number(used)
            return replace(
                source, **common, order_id=order_id, result_id=f"{order_id}-{source.code.code}", status="preliminary",
                effective_at=at, issued_at=None,
            )  # fmt: skip
        if isinstance(source, MedicationRecord):
            return replace(
                source, **common, order_id=self._fresh_number(used), status="active", start_at=at, end_at=None
            )
        if isinstance(source, AppointmentRecord):
            start = (at + timedelta(days=rng.randint(1, 30))).replace(minute=0, second=0, microsecond=0)
            return replace(
                source, **common, visit_number=self._fresh_number(used), status="booked", start_at=start,
                cancel_reason=None, rescheduled_from=None,
            )  # fmt: skip
        if isinstance(source, DocumentRecord):
            return replace(
                source, **common, document_id=self._fresh_number(used), status="current", authored_at=at
            )
        if isinstance(source, ProblemRecord):
            return replace(
                source, **common, problem_id=self._fresh_number(used), status="active", onset_at=at,
                abated_at=None, recorded_at=at,
            )  # fmt: skip
        if isinstance(source, AllergyRecord):
            return replace(
                source, **common, allergy_id=self._fresh_number(used), status="active", recorded_at=at
            )
        if isinstance(source, ImmunizationRecord):
            return replace(
                source, **common, immunization_id=self._fresh_number(used), status="completed", occurred_at=at,
                recorded_at=at, status_reason=None,
            )  # fmt: skip
        if isinstance(source, ProcedureRecord):
            return replace(
                source, **common, procedure_id=self._fresh_number(used), status="in-progress",
                performed_start=at, performed_end=None,
            )  # fmt: skip
        if isinstance(source, DiagnosticReportRecord):
            # A new report ordered but not yet resulted: it groups no Observation yet.
            return replace(
                source, **common, order_id=self._fresh_number(used), status="registered", effective_at=at,
                issued_at=None, result_ids=(), result_business_ids=(),
            )  # fmt: skip
        if isinstance(source, OrderRecord):
            return replace(
                source, **common, order_id=self._fresh_number(used), status="active", authored_at=at,
                occurrence_at=at + timedelta(hours=rng.randint(1, 48)),
            )  # fmt: skip
        raise TypeError(f"unknown record type {type(source).__name__}")
