"""The sandbox's synthetic population: deterministic from a seed, lazy, and able to evolve.

At start it builds only compact numpy columns per (connection, entity) — who, when, which
status, in which order — vectorised from the seed (see ``generate``). Full records are built on
demand, one row at a time (see ``build``). ``advance`` moves the simulated clock, appends rows
and records field overrides; it prepares a complete new snapshot and publishes it with a
single assignment, so a reader always sees one whole state, never half an advance.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta

import numpy as np

from sandbox.config import ConnectionSpec, SandboxConfig
from sandbox.population import evolve, generate, vocab
from sandbox.population.build import N_CANONICAL, RecordBuilder, record_diff
from sandbox.population.generate import DAY, Anchors, Rows
from sandbox.population.ids import decode_uuid_index, mix64, salt
from sandbox.population.query import (
    STATUS_VALUES,
    SelectionCache,
    dead_codes,
    normalize_id_type,
    patient_matches,
    patients_starting_since,
    query_key,
    record_business_id,
    record_clinical_date,
    record_status,
    rows_for_ids,
    search_sorted,
    select,
)
from sandbox.population.records import ENTITIES, Change, PatientRecord, Record
from sandbox.population.store import Query, RecordStore
from sandbox.population.tables import (
    ConnState,
    Persons,
    Snapshot,
    Table,
    compact,
    concat,
    make_index,
    new_table,
    sort_keys,
)

# Mean records per patient (REDOX-ELT sizing): 1 + Poisson(3) encounters; lab orders and vital
# sets that explode to ~15 observations; ~3 medications; ~2 appointments; ~2 documents.
_LAB_ORDERS, _VITAL_SETS = 1.5, 0.9
_MED_REQUESTS, _MED_STATEMENTS = 2.25, 0.75
_APPOINTMENTS = 2.0
_NOTE_PER_ENCOUNTER, _CDA_PER_PATIENT = 0.4, 0.4
_OTHER_OBSERVATIONS = 1.0  # social history, survey and exam observations per patient
_PROBLEMS, _ALLERGIES, _IMMUNIZATIONS, _PROCEDURES = 1.5, 0.7, 2.0, 0.6
_TWIN_FRACTION = 0.03
# Business-id codes (ConnCodes attributes) of the entities whose ids encode their row.
_ID_CODES = {
    "problems": "problem",
    "allergies": "allergy",
    "immunizations": "immunization",
    "procedures": "procedure",
}
_CHANGE_SPLIT = (0.45, 0.45, 0.10)  # new, updated, cancelled
_BECAME_VISITS = [STATUS_VALUES["appointments"].index(s) for s in ("arrived", "fulfilled")]


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & ((1 << 64) - 1) for p in parts])


@dataclass
class _Pending:
    """A change waiting for the new snapshot so its record can be built."""

    at: int
    connection: str
    entity: str
    row: int
    kind: str
    previous_status: str | None
    record: Record | None = None  # already built (updates and cancels); new rows build later


class SyntheticPopulation(RecordStore):
    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        self._builder = RecordBuilder(config)
        self._seed = self._builder.seed
        self._epoch = self._builder.epoch
        self._history = int(config.history_days) * DAY
        self._write_lock = threading.Lock()
        self._cache = SelectionCache()
        self._conn_order = {c.id: i for i, c in enumerate(config.connections)}
        persons = self._gen_persons(_rng(self._seed, salt("persons")), config.patients, twins=True)
        self._builder.use_persons(persons)
        conns = {spec.id: self._gen_connection(spec, persons) for spec in config.connections}
        self._snap = Snapshot(now=0, persons=persons, conns=conns, overrides={}, advances=0)

    # ================================================================ generation

    def _gen_persons(self, rng: np.random.Generator, n: int, *, twins: bool, first: int = 0) -> Persons:
        """Person columns for persons ``first .. first+n``; the first persons of the population are
        Redox's canonical test patients."""
        sex = rng.choice(4, size=n, p=[0.49, 0.495, 0.01, 0.005])
        band = rng.random(n)
        age_years = np.where(
            band < 0.2,
            rng.uniform(0, 18, n),
            np.where(band < 0.8, rng.uniform(18, 65, n), rng.uniform(65, 97, n)),
        )
        today = (self._epoch.date() - date(1970, 1, 1)).days
        dob = (today - age_years * 365.25).astype(np.int64)
        family = rng.integers(2, len(vocab.FAMILY_NAMES), size=n)  # canonical families stay rare
        n_male, n_all = vocab.N_MALE_GIVEN, len(vocab.GIVEN_NAMES)
        female = sex == 1
        either = sex >= 2
        given = np.where(female, rng.integers(n_male, n_all, size=n), rng.integers(0, n_male, size=n))
        given = np.where(either, rng.integers(0, n_all, size=n), given)
        middle = np.where(female, rng.integers(n_male, n_all, size=n), rng.integers(0, n_male, size=n))
        middle = np.where(rng.random(n) < 0.55, middle, -1)
        if first == 0:
            for p, c in enumerate(vocab.CANONICAL_PATIENTS[:n]):
                family[p] = vocab.FAMILY_NAMES.index(c.family)
                given[p] = vocab.GIVEN_NAMES.index(c.given[0])
                middle[p] = vocab.GIVEN_NAMES.index(c.given[1]) if len(c.given) > 1 else -1
                sex[p] = ("male", "female", "other", "unknown").index(c.sex)
                dob[p] = (c.birth_date - date(1970, 1, 1)).days
        if twins:
            # Near-duplicates: different people who share name, sex and birth date (and nothing
            # else), the classic trap for demographic patient matching.
            candidates = np.arange(N_CANONICAL, n)
            k = int(round(_TWIN_FRACTION * n))
            k = min(k, len(candidates) // 2)
            if k > 0:
                chosen = rng.choice(candidates, size=2 * k, replace=False)
                copies, originals = chosen[:k], chosen[k:]
                for col in (family, given, middle, sex, dob):
                    col[copies] = col[originals]
        return Persons(
            family.astype(np.int16),
            given.astype(np.int16),
            middle.astype(np.int16),
            sex.astype(np.int8),
            dob.astype(np.int32),
        )

    def _gen_connection(self, spec: ConnectionSpec, persons: Persons) -> ConnState:
        rng = _rng(self._seed, salt(spec.id, "base"))
        n_persons = len(persons)
        member = rng.random(n_persons) < spec.membership
        if spec.kind == "ehr":
            member[:N_CANONICAL] = True
            _keep_near_duplicates_together(member, persons)
        members = np.flatnonzero(member).astype(np.int32)
        m = len(members)
        patient_of = np.full(n_persons, -1, dtype=np.int32)
        patient_of[members] = np.arange(m, dtype=np.int32)
        hist, now = -self._history, 0
        codes = self._builder.codes[spec.id]
        rows: dict[str, Rows] = {}
        rows["patients"] = generate.gen_patients(rng, m, hist, now, members < N_CANONICAL, True)
        patients = np.arange(m)
        has_enc = "encounters" in spec.entities
        enc = None
        if has_enc:
            cnt = 1 + rng.poisson(3.0, m)
            enc = generate.gen_encounters(rng, np.repeat(patients, cnt), hist, now, now, True)
            rows["encounters"] = enc
            enc_first, enc_count = np.cumsum(cnt) - cnt, cnt

        def anchors(per_patient: float, *, use_encounters: bool = True) -> Anchors:
            who = np.repeat(patients, rng.poisson(per_patient, m))
            if has_enc and use_encounters:
                assert enc is not None
                return generate.anchors_from_encounters(
                    generate.pick_patient_encounters(rng, who, enc_first, enc_count), enc
                )
            return generate.anchors_without_encounters(rng, who, hist, now)

        if "results" in spec.entities:
            rows["results"] = generate.gen_results(
                rng, anchors(_LAB_ORDERS), anchors(_VITAL_SETS), now, 0, True, anchors(_OTHER_OBSERVATIONS)
            )
            first, count = generate.lab_order_groups(rows["results"])
            if "diagnostic_reports" in spec.entities:
                rows["diagnostic_reports"] = generate.gen_reports(rng, rows["results"], first, count, 0, True)
            if "orders" in spec.entities:
                rows["orders"] = generate.gen_orders(rng, rows["results"], first, 0, now, True)
        if "medications" in spec.entities:
            requests = anchors(_MED_REQUESTS)
            statements = anchors(_MED_STATEMENTS, use_encounters=False)
            rows["medications"] = generate.gen_medications(rng, requests, statements, now, True)
        if "appointments" in spec.entities:
            who = np.repeat(patients, rng.poisson(_APPOINTMENTS, m))
            rows["appointments"] = generate.gen_appointments(rng, who, hist, now + 90 * DAY, now, hist, True)
            if enc is not None:
                # A kept booking is a visit, and visits bring their own bookings below: what stands
                # alone is what never became a visit (ahead, missed, cancelled).
                rows["appointments"] = rows["appointments"].take(
                    np.flatnonzero(~np.isin(rows["appointments"].status, _BECAME_VISITS))
                )
                # Its own stream, so the rest of the population does not move with it.
                stream = _rng(self._seed, salt(spec.id, "booked-visits"))
                booked = _book_visits(stream, enc, 0, now, hist, True)
                rows["appointments"] = _link_visits(rows["appointments"], booked, enc, 0, 0)
        if "documents" in spec.entities:
            if has_enc:
                assert enc is not None
                live = ~np.isin(enc.status, dead_codes("encounters"))
                note_rows = np.flatnonzero(live & (rng.random(len(enc)) < _NOTE_PER_ENCOUNTER))
                notes = generate.anchors_from_encounters(note_rows, enc)
                cdas = anchors(_CDA_PER_PATIENT)
            else:
                # A network (record-locator) connection has no visits: exchanged summaries only.
                notes = generate.anchors_without_encounters(rng, np.empty(0, np.int64), hist, now)
                who = np.repeat(patients, 1 + rng.poisson(1.0, m))
                cdas = generate.anchors_without_encounters(rng, who, hist, now)
            rows["documents"] = generate.gen_documents(rng, notes, cdas, now, True)
        if "problems" in spec.entities:
            cnt = np.minimum(rng.poisson(_PROBLEMS, m), len(vocab.PROBLEMS))
            who = np.repeat(patients, cnt)
            items = generate._distinct_items(rng, cnt, len(vocab.PROBLEMS))
            if has_enc:
                assert enc is not None
                at = generate.anchors_from_encounters(
                    generate.pick_patient_encounters(rng, who, enc_first, enc_count), enc
                )
            else:
                at = generate.anchors_without_encounters(rng, who, hist, now)
            rows["problems"] = generate.gen_problems(rng, at, items, now, True)
        if "allergies" in spec.entities:
            cnt = np.minimum(rng.poisson(_ALLERGIES, m), len(vocab.ALLERGENS))
            items = generate._distinct_items(rng, cnt, len(vocab.ALLERGENS))
            rows["allergies"] = generate.gen_allergies(
                rng, np.repeat(patients, cnt), items, hist, now, now, True
            )
        if "immunizations" in spec.entities:
            rows["immunizations"] = generate.gen_immunizations(rng, anchors(_IMMUNIZATIONS), now, True)
        if "procedures" in spec.entities:
            rows["procedures"] = generate.gen_procedures(rng, anchors(_PROCEDURES), now, True)
        tables = {
            e: new_table(e, self._epoch, rows[e], codes.table_salt[e], members)
            for e in ENTITIES
            if e in spec.entities
        }
        next_order = (
            int(rows["results"].order_no.max()) + 1 if "results" in rows and len(rows["results"]) else 0
        )
        return ConnState(spec, members, patient_of, tables, next_order)

    # ================================================================ reading

    @property
    def now(self) -> datetime:
        return self._builder.at(self._snap.now)

    def _conn(self, snap: Snapshot, connection_id: str) -> ConnState:
        try:
            return snap.conns[connection_id]
        except KeyError:
            raise KeyError(f"unknown connection {connection_id!r}") from None

    def _row_for_id(self, cs: ConnState, entity: str, record_id: str) -> int | None:
        table = cs.tables.get(entity)
        if table is None or not isinstance(record_id, str):
            return None
        row = decode_uuid_index(record_id, self._builder.codes[cs.spec.id].mask[entity])
        if row is None or row >= len(table):
            return None
        return row if self._builder.record_id(cs, entity, row) == record_id else None

    def _selection(self, snap: Snapshot, query: Query):
        cs = self._conn(snap, query.connection_id)
        table = cs.tables.get(query.entity)
        if table is None:
            return None
        key = (table.index, query_key(query))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        patient_row = None
        if query.patient_id is not None:
            patient_row = self._row_for_id(cs, "patients", query.patient_id)
            patient_row = -1 if patient_row is None else patient_row
        id_rows = None
        if query.ids is not None:
            id_rows = rows_for_ids(query.ids, lambda i: self._row_for_id(cs, query.entity, i))
        sel = select(table.index, query, patient_row=patient_row, id_rows=id_rows)
        self._cache.put(key, sel)
        return sel

    def count(self, query: Query) -> int:
        sel = self._selection(self._snap, query)
        return 0 if sel is None else sel.count

    def page(self, query: Query, offset: int, limit: int) -> list[Record]:
        snap = self._snap
        sel = self._selection(snap, query)
        if sel is None:
            return []
        cs = snap.conns[query.connection_id]
        return [self._builder.build(snap, cs, query.entity, int(r)) for r in sel.take(offset, limit)]

    def get(self, connection_id: str, entity: str, record_id: str) -> Record | None:
        snap = self._snap
        cs = self._conn(snap, connection_id)
        row = self._row_for_id(cs, entity, record_id)
        return None if row is None else self._builder.build(snap, cs, entity, row)

    # ---------------------------------------------------------------- patients

    def _identifier_rows(self, cs: ConnState, id_type: str, value: str) -> list[int]:
        b = self._builder
        codes = b.codes[cs.spec.id]
        n = len(cs.tables["patients"])
        rows: list[int] = []

        def add(row: int | None, make) -> None:
            if row is not None and 0 <= row < n and make(row) == value:
                rows.append(row)

        def canonical(field: str) -> None:
            for p, c in enumerate(vocab.CANONICAL_PATIENTS):
                if getattr(c, field) == value and p < len(cs.patient_of) and cs.patient_of[p] >= 0:
                    rows.append(int(cs.patient_of[p]))

        if id_type == "ID":
            add(decode_uuid_index(value, codes.mask["patients"]), lambda r: b.record_id(cs, "patients", r))
        elif id_type == "MR":
            canonical("mrn")
            add(codes.mrn.decode(value), lambda r: b.mrn(cs, r))
        elif id_type == "EHRID" and "EHRID" in cs.spec.id_types:
            canonical("ehr_id")
            add(decode_uuid_index(value, codes.ehr_mask), lambda r: b.ehr_id(cs, r))
        elif id_type == "NIST" and "NIST" in cs.spec.id_types:
            canonical("nist_id")
            add(codes.nist.decode(value), lambda r: b.nist_id(cs, r))
        elif id_type == "SSN":
            person = b.ssn_person(value)
            if person is not None and person < len(cs.patient_of) and cs.patient_of[person] >= 0:
                add(int(cs.patient_of[person]), lambda r: b.person(int(cs.members[r])).ssn)
        elif id_type == "EPI":
            person = decode_uuid_index(value, b.epi_mask)
            if person is not None and person < len(cs.patient_of) and cs.patient_of[person] >= 0:
                add(int(cs.patient_of[person]), lambda r: b.enterprise_id(int(cs.members[r])))
        return rows

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
        snap = self._snap
        cs = self._conn(snap, connection_id)
        if identifier is None and family is None and given is None and birth_date is None:
            return []
        if identifier is not None:
            t = normalize_id_type(id_type)
            types = [t] if t is not None else ["MR", "EHRID", "NIST", "EPI", "SSN", "ID"]
            rows = sorted({r for ty in types for r in self._identifier_rows(cs, ty, identifier)})
        else:
            rows = self._demographic_rows(snap, cs, family, given, birth_date)
        out = []
        for r in rows:
            rec = self._builder.build(snap, cs, "patients", r)
            if patient_matches(
                rec, identifier=identifier, id_type=id_type, family=family, given=given, birth_date=birth_date
            ):
                out.append(rec)  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    def _demographic_rows(
        self, snap: Snapshot, cs: ConnState, family: str | None, given: str | None, birth_date: str | None
    ) -> list[int]:
        persons = snap.persons
        members = cs.members
        keep = np.ones(len(members), dtype=bool)
        if family is not None:
            names = [i for i, f in enumerate(vocab.FAMILY_NAMES) if f.lower() == family.strip().lower()]
            keep &= np.isin(persons.family[members], names)
        if given is not None:
            names = [i for i, g in enumerate(vocab.GIVEN_NAMES) if g.lower() == given.strip().lower()]
            keep &= np.isin(persons.given[members], names) | np.isin(persons.middle[members], names)
        if birth_date is not None:
            try:
                days = (date.fromisoformat(birth_date.strip()) - date(1970, 1, 1)).days
            except ValueError:
                return []
            keep &= persons.dob[members] == days
        return [int(r) for r in np.flatnonzero(keep)]

    def find_by_business_id(self, connection_id: str, entity: str, business_id: str) -> Record | None:
        snap = self._snap
        cs = self._conn(snap, connection_id)
        table = cs.tables.get(entity)
        if table is None or not isinstance(business_id, str):
            return None
        codes = self._builder.codes[connection_id]
        row: int | None = None
        if entity == "encounters":
            row = codes.visit.decode(business_id)
        elif entity == "appointments":
            row = codes.appointment.decode(business_id)
            if row is None:  # the booking a visit fulfils carries the visit's number
                visit = codes.visit.decode(business_id)
                if visit is not None:
                    row = self._builder.appointment_row_of_visit(cs, visit)
        elif entity == "medications":
            row = codes.med_order.decode(business_id)
        elif entity == "documents":
            row = codes.document.decode(business_id)
        elif entity in ("problems", "allergies", "immunizations", "procedures"):
            row = getattr(codes, _ID_CODES[entity]).decode(business_id)
        elif entity in ("diagnostic_reports", "orders"):
            # One row per lab order, in order-number order (rows are derived in that order).
            order_no = codes.lab_order.decode(business_id)
            if order_no is not None:
                orders = table.base.order_no
                a = int(search_sorted(orders, order_no, "left"))
                if a < len(table) and int(orders[a]) == order_no:
                    row = a
        elif entity == "results":
            order_id, _, code = business_id.partition("-")
            order_no = codes.lab_order.decode(order_id)
            if order_no is not None and code:
                orders = table.base.order_no
                a, b = search_sorted(orders, order_no, "left"), search_sorted(orders, order_no, "right")
                for r in range(int(a), int(b)):
                    if self._builder.result_id(cs, r) == business_id:
                        row = r
        if row is None or row >= len(table):
            return None
        record = self._builder.build(snap, cs, entity, row)
        return record if record_business_id(record) == business_id else None

    # ---------------------------------------------------------------- totals

    def counts(self, live_only: bool = False) -> dict[str, dict[str, int]]:
        snap = self._snap
        cached = snap.counts.get(live_only)
        if cached is None:
            cached = {
                cid: {e: (t.index.live_count() if live_only else len(t)) for e, t in cs.tables.items()}
                for cid, cs in snap.conns.items()
            }
            snap.counts[live_only] = cached
        return {cid: dict(v) for cid, v in cached.items()}

    def component_counts(self, live_only: bool = False) -> dict[str, int]:
        # Components come from the analyte alone (panel * 16 + analyte): count them per column.
        per_item = np.zeros(16 * len(vocab.PANELS), dtype=np.int64)
        for p, panel in enumerate(vocab.PANELS):
            for a, analyte in enumerate(panel.analytes):
                per_item[p * 16 + a] = len(analyte.components)
        out: dict[str, int] = {}
        for cid, cs in self._snap.conns.items():
            table = cs.tables.get("results")
            if table is None:
                continue
            counts = per_item[table.base.item.astype(np.int64)]
            if live_only:
                counts = counts[~np.isin(table.index.status, dead_codes("results"))]
            out[cid] = int(counts.sum())
        return out

    def roster(self, connection_id: str) -> list[str]:
        snap = self._snap
        cs = self._conn(snap, connection_id)
        return [self._builder.mrn(cs, row) for row in range(len(cs.tables["patients"]))]

    def active_patients(self, connection_id: str, since: datetime) -> int:
        cs = self._conn(self._snap, connection_id)
        indexes = [cs.tables[e].index for e in ("encounters", "appointments") if e in cs.tables]
        return patients_starting_since(indexes, since)

    def persons(self) -> list[dict]:
        snap = self._snap
        by_person: dict[int, list[dict]] = {}
        for spec in self._config.connections:
            cs = snap.conns[spec.id]
            for row, person in enumerate(cs.members.tolist()):
                by_person.setdefault(person, []).append(
                    {
                        "connection_id": spec.id,
                        "patient_id": self._builder.record_id(cs, "patients", row),
                        "mrn": self._builder.mrn(cs, row),
                    }
                )
        out = [
            {"enterprise_id": self._builder.enterprise_id(p), "records": recs}
            for p, recs in by_person.items()
        ]
        out.sort(key=lambda d: d["enterprise_id"])
        return out

    # ================================================================ advancing

    def advance(self, days: float, change_fraction: float) -> list[Change]:
        if days < 0:
            raise ValueError("advance: days must not be negative")
        if not 0 <= change_fraction <= 1:
            raise ValueError("advance: change_fraction must be between 0 and 1")
        with self._write_lock:
            snap = self._snap
            span = int(round(days * DAY))
            if span <= 0:
                return []
            t0, t1 = snap.now, snap.now + span
            step = snap.advances + 1
            overrides = dict(snap.overrides)
            pending: list[_Pending] = []
            persons = snap.persons
            conns: dict[str, ConnState] = {}
            for spec in self._config.connections:
                rng = _rng(self._seed, step, salt(spec.id, "advance"))
                cs, persons = self._advance_connection(
                    snap, snap.conns[spec.id], persons, rng, step, t0, t1, change_fraction, overrides, pending
                )
                conns[spec.id] = cs
            # Connections processed before new persons appeared need their person map widened.
            for cid, cs in conns.items():
                if len(cs.patient_of) < len(persons):
                    grown = np.full(len(persons), -1, dtype=np.int32)
                    grown[: len(cs.patient_of)] = cs.patient_of
                    conns[cid] = ConnState(cs.spec, cs.members, grown, cs.tables, cs.next_order_no)
            new = Snapshot(now=t1, persons=persons, conns=conns, overrides=overrides, advances=step)
            self._builder.use_persons(persons)
            entity_order = {e: i for i, e in enumerate(ENTITIES)}
            pending.sort(key=lambda p: (p.at, entity_order[p.entity], self._conn_order[p.connection], p.row))
            changes = [
                Change(
                    entity=p.entity,
                    kind=p.kind,  # type: ignore[arg-type]
                    record=p.record or self._builder.build(new, new.conns[p.connection], p.entity, p.row),
                    previous_status=p.previous_status,
                )
                for p in pending
            ]
            self._snap = new  # the single publication point
            self._cache.clear()
            return changes

    def _advance_connection(
        self,
        snap: Snapshot,
        cs: ConnState,
        persons: Persons,
        rng: np.random.Generator,
        step: int,
        t0: int,
        t1: int,
        fraction: float,
        overrides: dict,
        pending: list[_Pending],
    ) -> tuple[ConnState, Persons]:
        spec = cs.spec
        codes = self._builder.codes[spec.id]
        budget: dict[str, tuple[int, int, int]] = {}
        for e, table in cs.tables.items():
            k = int(rng.binomial(len(table), fraction)) if len(table) else 0
            n_new, n_upd, n_cancel = (int(x) for x in rng.multinomial(k, _CHANGE_SPLIT))
            budget[e] = (n_new, n_upd, n_cancel)

        # --- who is new here: some people already known elsewhere, the rest brand new.
        n_new_patients = budget["patients"][0]
        unknown_here = np.flatnonzero(cs.patient_of[: len(persons)] < 0)
        n_known = min(len(unknown_here), int(rng.binomial(n_new_patients, 0.4)))
        joining = rng.choice(unknown_here, size=n_known, replace=False) if n_known else np.empty(0, np.int64)
        n_fresh = n_new_patients - n_known
        if n_fresh:
            fresh = self._gen_persons(
                _rng(self._seed, step, salt(spec.id, "persons")), n_fresh, twins=False, first=len(persons)
            )
            fresh_ids = np.arange(len(persons), len(persons) + n_fresh)
            persons = persons.extend(fresh)
            self._builder.use_persons(persons)
        else:
            fresh_ids = np.empty(0, np.int64)
        new_members = np.concatenate([joining, fresh_ids]).astype(np.int32)
        m_old = len(cs.members)
        members = np.concatenate([cs.members, new_members])
        patient_of = np.full(len(persons), -1, dtype=np.int32)
        patient_of[: len(cs.patient_of)] = cs.patient_of[: len(persons)]
        patient_of[new_members] = np.arange(m_old, m_old + len(new_members), dtype=np.int32)
        cs_new = ConnState(spec, members, patient_of, dict(cs.tables), cs.next_order_no)

        new_rows: dict[str, Rows] = {}
        new_rows["patients"] = generate.gen_patients(
            rng, len(new_members), t0 + 1, t1, np.zeros(len(new_members), bool), False
        )
        new_rows["patients"].patient[:] = np.arange(m_old, m_old + len(new_members))
        live_patients = np.flatnonzero(cs.tables["patients"].index.status == 0)

        def some_patients(n: int) -> np.ndarray:
            pool = live_patients if len(live_patients) else np.arange(m_old)
            return rng.choice(pool, size=n) if n and len(pool) else np.empty(0, np.int64)

        enc_offset = len(cs.tables["encounters"]) if "encounters" in cs.tables else 0
        enc_new: Rows | None = None
        if "encounters" in cs.tables:
            first_visits = 1 + rng.poisson(0.3, len(new_members))
            who_new = np.repeat(new_rows["patients"].patient, first_visits)
            lo_new = np.repeat(new_rows["patients"].lu, first_visits)
            n_more = max(0, budget["encounters"][0] - len(who_new))
            who = np.concatenate([who_new, some_patients(n_more)])
            lo = np.concatenate([lo_new, np.full(n_more, t0 + 1)])
            enc_new = generate.gen_encounters(rng, who, lo, t1, t1, False)
            new_rows["encounters"] = enc_new

        def anchors(n: int, *, use_encounters: bool = True) -> Anchors:
            if enc_new is not None and len(enc_new) and use_encounters:
                local = rng.integers(0, len(enc_new), size=n)
                return generate.anchors_from_encounters(local + enc_offset, enc_new, offset=enc_offset)
            return generate.anchors_without_encounters(rng, some_patients(n), t0 + 1, t1)

        if "results" in cs.tables:
            n_orders = int(round(budget["results"][0] / 6.5))
            n_vitals = int(rng.binomial(n_orders, 0.4))
            n_other = int(rng.binomial(n_orders, 0.25))
            res = generate.gen_results(
                rng,
                anchors(n_orders - n_vitals),
                anchors(n_vitals),
                t1,
                cs.next_order_no,
                False,
                anchors(n_other),
            )
            new_rows["results"] = res
            if len(res):
                cs_new.next_order_no = int(res.order_no.max()) + 1
            res_offset = len(cs.tables["results"])
            first, count = generate.lab_order_groups(res, res_offset)
            if "diagnostic_reports" in cs.tables:
                new_rows["diagnostic_reports"] = generate.gen_reports(
                    rng, res, first, count, res_offset, False
                )
            if "orders" in cs.tables:
                new_rows["orders"] = generate.gen_orders(rng, res, first, res_offset, t1, False)
        if "problems" in cs.tables:
            # New diagnoses for people seen this period, codes the patient does not have yet.
            at = anchors(budget["problems"][0])
            taken = cs.tables["problems"].base
            items = _new_items(rng, at.patient, taken.patient, taken.item, len(vocab.PROBLEMS))
            keep = items >= 0
            at = Anchors(*(getattr(at, f)[keep] for f in ("patient", "enc_row", "start", "dur", "enc_class")))
            new_rows["problems"] = generate.gen_problems(rng, at, items[keep], t1, False)
        if "allergies" in cs.tables:
            who = some_patients(budget["allergies"][0])
            taken = cs.tables["allergies"].base
            items = _new_items(rng, who, taken.patient, taken.item, len(vocab.ALLERGENS))
            keep = items >= 0
            new_rows["allergies"] = generate.gen_allergies(rng, who[keep], items[keep], t0 + 1, t1, t1, False)
        if "immunizations" in cs.tables:
            new_rows["immunizations"] = generate.gen_immunizations(
                rng, anchors(budget["immunizations"][0]), t1, False
            )
        if "procedures" in cs.tables:
            new_rows["procedures"] = generate.gen_procedures(rng, anchors(budget["procedures"][0]), t1, False)
        if "medications" in cs.tables:
            n = budget["medications"][0]
            n_stmt = int(rng.binomial(n, 0.25))
            new_rows["medications"] = generate.gen_medications(
                rng, anchors(n - n_stmt), anchors(n_stmt, use_encounters=False), t1, False
            )
        if "appointments" in cs.tables:
            who = some_patients(budget["appointments"][0])
            appts = generate.gen_appointments(rng, who, t1 + 3600, t1 + 60 * DAY, t1, t0 + 1, False)
            # Booked at some moment of this period (not piled up at its start).
            appts.lu = t0 + 1 + np.floor(rng.random(len(appts)) * (t1 - t0)).astype(np.int64)
            if enc_new is not None:
                stream = _rng(self._seed, step, salt(spec.id, "booked-visits"))
                booked = _book_visits(stream, enc_new, enc_offset, t1, t0 + 1, False)
                appts = _link_visits(appts, booked, enc_new, enc_offset, len(cs.tables["appointments"]))
            new_rows["appointments"] = appts
        if "documents" in cs.tables:
            n = budget["documents"][0]
            n_cda = int(rng.binomial(n, 0.2))
            new_rows["documents"] = generate.gen_documents(
                rng, anchors(n - n_cda), anchors(n_cda, use_encounters="encounters" in cs.tables), t1, False
            )

        # Appending needs the new members first (sort keys read the person of each row).
        visits_moved: tuple[np.ndarray, dict[str, np.ndarray]] | None = None
        for entity in ENTITIES:
            if entity not in cs.tables:
                continue
            table = cs.tables[entity]
            n_old = len(table)
            add = new_rows.get(entity, Rows.empty())
            # The booking a visit fulfils changes with its visit, never on its own.
            keep_still = (
                np.flatnonzero(table.base.item == generate.APPT_VISIT) if entity == "appointments" else None
            )
            moved, cur = self._evolve_table(
                snap, cs, cs_new, entity, table, rng, step, t0, t1, budget[entity], overrides, pending,
                exclude=keep_still,
            )  # fmt: skip
            if entity == "encounters":
                visits_moved = (moved, cur)
            elif entity == "appointments" and visits_moved is not None and len(visits_moved[0]):
                followed, cur, follow_ups = self._follow_visits(
                    snap, cs, visits_moved, cur, step, t1, t0 + 1, overrides, pending
                )
                moved = np.concatenate([moved, followed]).astype(np.int64)
                add = generate.concat_rows(add, follow_ups)
            add.lu = np.clip(add.lu, t0 + 1, t1)
            base = concat(table.base, compact(add)) if len(add) else table.base
            appended = np.arange(n_old, n_old + len(add))
            lu = np.concatenate([cur["lu"], add.lu.astype(np.int32)])
            clin = np.concatenate([cur["clin"], add.clin.astype(np.int32)])
            status = np.concatenate([cur["status"], add.status.astype(np.int8)])
            moved_all = np.concatenate([moved, appended]).astype(np.int64)
            keys = sort_keys(codes.table_salt[entity], members, entity, base.patient, moved_all)
            tail = moved_all[np.lexsort((keys, lu[moved_all]))]
            head = table.index.order[~np.isin(table.index.order, moved)] if len(moved) else table.index.order
            order = np.concatenate([head, tail]).astype(table.index.order.dtype)
            index = make_index(entity, self._epoch, base, order, lu=lu, clin=clin, status=status)
            cs_new.tables[entity] = Table(entity, base, index)
            for r in appended:
                pending.append(_Pending(int(lu[r]), spec.id, entity, int(r), "new", None))
        return cs_new, persons

    def _evolve_table(
        self,
        snap: Snapshot,
        cs: ConnState,
        cs_new: ConnState,
        entity: str,
        table: Table,
        rng: np.random.Generator,
        step: int,
        t0: int,
        t1: int,
        budget: tuple[int, int, int],
        overrides: dict,
        pending: list[_Pending],
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Update and cancel existing rows (never those in ``exclude``); returns the changed rows
        and the current columns."""
        _, n_upd, n_cancel = budget
        index = table.index
        cur = {"lu": index.lu, "clin": index.clin, "status": index.status}
        live = np.flatnonzero(~np.isin(index.status, dead_codes(entity)))
        if exclude is not None and len(exclude):
            live = np.setdiff1d(live, exclude, assume_unique=True)
        if not len(live) or not (n_upd or n_cancel):
            return np.empty(0, np.int64), cur
        values = STATUS_VALUES[entity]
        transitional = [values.index(s) for s in evolve.TRANSITIONAL[entity]]
        trans_rows = live[np.isin(index.status[live], transitional)]
        n_upd = min(n_upd, len(live))
        n_first = min(len(trans_rows), int(np.ceil(n_upd * 0.6)))
        first = rng.choice(trans_rows, size=n_first, replace=False) if n_first else np.empty(0, np.int64)
        rest_pool = np.setdiff1d(live, first, assume_unique=True)
        n_rest = min(n_upd - n_first, len(rest_pool))
        rest = rng.choice(rest_pool, size=n_rest, replace=False) if n_rest else np.empty(0, np.int64)
        updated = np.concatenate([first, rest]).astype(np.int64)
        cancel_pool = np.setdiff1d(live, updated, assume_unique=True)
        n_cancel = min(n_cancel, len(cancel_pool))
        cancelled = (
            rng.choice(cancel_pool, size=n_cancel, replace=False) if n_cancel else np.empty(0, np.int64)
        )
        moved = np.concatenate([updated, cancelled]).astype(np.int64)
        if not len(moved):
            return moved, cur
        times = t0 + 1 + np.floor(rng.random(len(moved)) * (t1 - t0)).astype(np.int64)
        cur = {k: v.copy() for k, v in cur.items()}
        conn_salt = salt(cs.spec.id, entity, "evolve")
        for i, row in enumerate(moved.tolist()):
            at = int(times[i])
            # One build per change: the row as created, then its earlier overrides, then the change.
            base = self._builder.build(snap, cs, entity, row, current=False)
            earlier = snap.overrides.get((cs.spec.id, entity, row))
            before = replace(base, **earlier) if earlier else base
            r = random.Random(mix64(self._seed ^ mix64(conn_salt + step)) ^ row)
            when = self._builder.at(at)
            after = (
                evolve.update_record(before, r, when)
                if i < len(updated)
                else evolve.cancel_record(before, r, when)
            )
            overrides[(cs.spec.id, entity, row)] = record_diff(base, after)
            cur["lu"][row] = at
            cur["status"][row] = values.index(record_status(after))
            clin = record_clinical_date(after)
            if clin is not None:
                cur["clin"][row] = int((clin - self._epoch) // timedelta(seconds=1))
            kind = "update" if i < len(updated) else "cancel"
            pending.append(_Pending(at, cs.spec.id, entity, row, kind, record_status(before), after))
        return moved, cur

    def _follow_visits(
        self,
        snap: Snapshot,
        cs: ConnState,
        visits_moved: tuple[np.ndarray, dict[str, np.ndarray]],
        cur: dict[str, np.ndarray],
        step: int,
        t1: int,
        lu_lo: int,
        overrides: dict,
        pending: list[_Pending],
    ) -> tuple[np.ndarray, dict[str, np.ndarray], Rows]:
        """Appointments follow the encounters this advance changed: the booking a visit fulfils
        takes the visit's new status (arrived, fulfilled, cancelled), and a stay that ended books
        its clinic follow-up. Returns the appointment rows changed, the current appointment
        columns and the follow-up rows to append."""
        enc_rows, enc_cur = visits_moved
        enc_table = cs.tables["encounters"]
        values = STATUS_VALUES["appointments"]
        cur = {k: v.copy() for k, v in cur.items()}
        was = enc_table.index.status[enc_rows].astype(np.int64)
        now_status = enc_cur["status"][enc_rows].astype(np.int64)
        at = enc_cur["lu"][enc_rows].astype(np.int64)

        appt_rows = enc_table.base.link[enc_rows].astype(np.int64)
        backed = appt_rows >= 0
        want = generate.appointment_status_for_visit(now_status)
        change = backed & (want != cur["status"][np.maximum(appt_rows, 0)])
        followed = []
        for row, status, when in zip(
            appt_rows[change].tolist(), want[change].tolist(), at[change].tolist(), strict=True
        ):
            base = self._builder.build(snap, cs, "appointments", row, current=False)
            earlier = snap.overrides.get((cs.spec.id, "appointments", row))
            before = replace(base, **earlier) if earlier else base
            new_status = values[status]
            fields = {
                "status": new_status,
                "version": before.version + 1,
                "last_updated": self._builder.at(when),
            }
            if new_status == "cancelled":
                r = random.Random(mix64(self._seed ^ mix64(salt(cs.spec.id, "visit-cancel") + step)) ^ row)
                fields["cancel_reason"] = r.choice(vocab.CANCEL_REASONS)
            after = replace(before, **fields)
            overrides[(cs.spec.id, "appointments", row)] = record_diff(base, after)
            cur["lu"][row] = when
            cur["status"][row] = status
            kind = "cancel" if new_status in ("cancelled", "entered-in-error") else "update"
            pending.append(_Pending(when, cs.spec.id, "appointments", row, kind, before.status, after))
            followed.append(row)

        finished = generate.S["encounters"]["finished"]
        stay_codes = [generate.ENC_CLASS_CODE[c] for c in generate.DISCHARGE_CLASSES]
        discharged = (
            (now_status == finished)
            & (was != finished)
            & np.isin(enc_table.base.category[enc_rows], stay_codes)
        )
        stays = enc_rows[discharged]
        follow_ups = generate.gen_follow_ups(
            _rng(self._seed, step, salt(cs.spec.id, "follow-ups")),
            enc_table.base.patient[stays].astype(np.int64),
            at[discharged],
            stays,
            t1,
            lu_lo,
            False,
        )
        return np.asarray(followed, dtype=np.int64), cur, follow_ups


def _book_visits(
    rng: np.random.Generator, enc: Rows, enc_offset: int, now: int, lu_lo, allow_dead: bool
) -> Rows:
    """The appointments that encounters imply: the booking each outpatient or virtual visit
    fulfils and the follow-up each finished stay books (``enc`` starts at table row
    ``enc_offset``)."""
    visits = generate.gen_visit_appointments(rng, enc, enc_offset, now, lu_lo)
    stays = generate.finished_stays(enc)
    follow_ups = generate.gen_follow_ups(
        rng, enc.patient[stays], enc.clin[stays] + enc.aux[stays], stays + enc_offset, now, lu_lo, allow_dead
    )
    return generate.concat_rows(visits, follow_ups)


def _link_visits(independent: Rows, booked: Rows, enc: Rows, enc_offset: int, appt_offset: int) -> Rows:
    """``independent`` then ``booked`` as one batch of appointment rows (the first is table row
    ``appt_offset``); each fulfilled-by encounter of ``enc`` gets its appointment row as ``link``."""
    out = generate.concat_rows(independent, booked)
    is_visit = booked.item == generate.APPT_VISIT
    enc.link = np.asarray(enc.link, dtype=np.int64).copy()
    enc.link[booked.link[is_visit] - enc_offset] = appt_offset + len(independent) + np.flatnonzero(is_visit)
    return out


def _new_items(
    rng: np.random.Generator, who: np.ndarray, have_patient: np.ndarray, have_item: np.ndarray, n_items: int
) -> np.ndarray:
    """An item (problem, allergen) per entry of ``who`` that the patient does not have yet and
    that no earlier entry of ``who`` took; -1 when the patient already has every item."""
    taken = set(zip(have_patient.tolist(), have_item.tolist(), strict=True))
    out = np.full(len(who), -1, dtype=np.int64)
    starts = rng.integers(0, n_items, size=len(who))
    for i, (p, start) in enumerate(zip(who.tolist(), starts.tolist(), strict=True)):
        for k in range(n_items):
            item = (start + k) % n_items
            if (p, item) not in taken:
                taken.add((p, item))
                out[i] = item
                break
    return out


def _keep_near_duplicates_together(member: np.ndarray, persons: Persons) -> None:
    """Different people with the same name, sex and birth date are most dangerous inside
    one EHR, so when one of them is in the connection, so is the other (in place)."""
    key = (persons.family.astype(np.int64) * 4096 + persons.given) * 4096 + (
        persons.middle.astype(np.int64) + 1
    )
    key = (key * 8 + persons.sex) * 100_000 + persons.dob
    order = np.argsort(key, kind="stable")
    same = key[order][1:] == key[order][:-1]
    a, b = order[1:][same], order[:-1][same]
    either = member[a] | member[b]
    member[a] |= either
    member[b] |= either
