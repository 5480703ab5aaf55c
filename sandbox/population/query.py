"""Query evaluation shared by every population backend.

A backend keeps, per (connection, entity), an :class:`EntityIndex`: a few numpy columns (last
updated, clinical date, status, category, patient) and the row order by ``(last_updated, id)``.
:func:`select` turns a :class:`~sandbox.population.store.Query` into the ordered rows that
match, touching only columns, so counting and paging never build a record. Backends turn the
selected row numbers into records their own way.

The module also holds the record-level accessors (status, category, clinical date, business id)
that define what each ``Query`` field means for a record, so brute-force checks and backends
agree by construction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from threading import Lock

import numpy as np

from sandbox.population.records import (
    DEAD_STATUSES,
    AllergyRecord,
    AppointmentRecord,
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
)
from sandbox.population.store import Query

STATUS_VALUES: dict[str, tuple[str, ...]] = {
    "patients": ("active", "inactive"),
    "encounters": ("planned", "arrived", "in-progress", "finished", "cancelled", "entered-in-error"),
    "results": ("final", "preliminary", "corrected", "cancelled", "entered-in-error"),
    "medications": ("active", "completed", "stopped", "on-hold", "cancelled", "entered-in-error"),
    "appointments": (
        "proposed",
        "pending",
        "booked",
        "arrived",
        "fulfilled",
        "cancelled",
        "noshow",
        "entered-in-error",
    ),
    "documents": ("current", "superseded", "entered-in-error"),
    "problems": ("active", "inactive", "resolved", "entered-in-error", "recurrence", "relapse", "remission"),
    "allergies": ("active", "inactive", "resolved", "entered-in-error"),
    "immunizations": ("completed", "not-done", "entered-in-error"),
    # Generated records use the first statuses; outside data (--seed-from) may carry the rest.
    "procedures": (
        "in-progress",
        "completed",
        "not-done",
        "entered-in-error",
        "preparation",
        "on-hold",
        "stopped",
        "unknown",
    ),
    "diagnostic_reports": (
        "registered",
        "preliminary",
        "final",
        "corrected",
        "cancelled",
        "entered-in-error",
        "partial",
        "amended",
        "appended",
        "unknown",
    ),
    "orders": ("active", "completed", "revoked", "entered-in-error", "draft", "on-hold", "unknown"),
}
# What ``Query.category`` selects per entity; entities without one match no category.
CATEGORY_VALUES: dict[str, tuple[str, ...]] = {
    "results": (
        "laboratory",
        "vital-signs",
        "social-history",
        "survey",
        "exam",
        "imaging",
        "procedure",
        "therapy",
        "activity",
    ),
    "medications": ("request", "statement"),
    "encounters": ("AMB", "IMP", "EMER", "OBSENC", "VR", "HH"),
    "documents": ("note", "cda"),
    "patients": (),
    "appointments": (),
    "problems": (),
    "allergies": ("medication", "food", "environment", "biologic"),
    "immunizations": (),
    "procedures": (),
    "diagnostic_reports": (),
    "orders": (),
}
NO_CATEGORY = -1


def status_code(entity: str, status: str) -> int:
    return STATUS_VALUES[entity].index(status)


def dead_codes(entity: str) -> tuple[int, ...]:
    if entity == "patients":
        return (STATUS_VALUES["patients"].index("inactive"),)
    return tuple(i for i, s in enumerate(STATUS_VALUES[entity]) if s in DEAD_STATUSES)


def category_code(entity: str, category: str | None) -> int:
    values = CATEGORY_VALUES[entity]
    return values.index(category) if category in values else NO_CATEGORY


# ---------------------------------------------------------------- record accessors


def record_status(record: Record) -> str:
    if isinstance(record, PatientRecord):
        return "active" if record.active else "inactive"
    return record.status


def record_category(record: Record) -> str | None:
    if isinstance(record, ResultRecord):
        return record.category
    if isinstance(record, MedicationRecord):
        return record.kind
    if isinstance(record, EncounterRecord):
        return record.class_code
    if isinstance(record, DocumentRecord):
        return record.kind
    if isinstance(record, AllergyRecord):
        return record.category
    return None


def record_clinical_date(record: Record) -> datetime | None:
    if isinstance(record, EncounterRecord | AppointmentRecord | MedicationRecord):
        return record.start_at
    if isinstance(record, ResultRecord):
        return record.effective_at
    if isinstance(record, DocumentRecord):
        return record.authored_at
    if isinstance(record, ProblemRecord):
        return record.onset_at
    if isinstance(record, AllergyRecord):
        return record.recorded_at
    if isinstance(record, ImmunizationRecord):
        return record.occurred_at
    if isinstance(record, ProcedureRecord):
        return record.performed_start
    if isinstance(record, DiagnosticReportRecord):
        return record.effective_at
    if isinstance(record, OrderRecord):
        return record.authored_at
    return None


def record_patient_id(record: Record) -> str:
    return record.id if isinstance(record, PatientRecord) else record.patient.patient_id


def record_business_id(record: Record) -> str | None:
    """The business id ``find_by_business_id`` looks up for this record's entity."""
    if isinstance(record, EncounterRecord | AppointmentRecord):
        return record.visit_number
    if isinstance(record, ResultRecord):
        return record.result_id
    if isinstance(record, MedicationRecord):
        return record.order_id
    if isinstance(record, DocumentRecord):
        return record.document_id
    if isinstance(record, ProblemRecord):
        return record.problem_id
    if isinstance(record, AllergyRecord):
        return record.allergy_id
    if isinstance(record, ImmunizationRecord):
        return record.immunization_id
    if isinstance(record, ProcedureRecord):
        return record.procedure_id
    if isinstance(record, DiagnosticReportRecord | OrderRecord):
        return record.order_id
    return None


def matches(record: Record, query: Query) -> bool:
    """Whether one record satisfies ``query`` (the brute-force definition :func:`select` follows)."""
    if query.ids is not None and record.id not in set(query.ids):
        return False
    if query.patient_id is not None and record_patient_id(record) != query.patient_id:
        return False
    lu = record.last_updated
    if query.updated_ge and not lu >= query.updated_ge:
        return False
    if query.updated_gt and not lu > query.updated_gt:
        return False
    if query.updated_le and not lu <= query.updated_le:
        return False
    if query.updated_lt and not lu < query.updated_lt:
        return False
    if any(b is not None for b in (query.date_ge, query.date_gt, query.date_le, query.date_lt)):
        d = record_clinical_date(record)
        if d is None:
            return False
        if query.date_ge and not d >= query.date_ge:
            return False
        if query.date_gt and not d > query.date_gt:
            return False
        if query.date_le and not d <= query.date_le:
            return False
        if query.date_lt and not d < query.date_lt:
            return False
    if query.statuses is not None and record_status(record) not in set(query.statuses):
        return False
    return not (query.category is not None and record_category(record) != query.category)


# ---------------------------------------------------------------- identifier types


def normalize_id_type(id_type: str | None) -> str | None:
    """``MR``/``MRN``, ``EHRID``, ``NIST``, ``EPI``, ``SSN`` or ``ID`` (FHIR logical id); a FHIR system
    URI such as ``urn:redox:slug:MR`` maps by its last segment. None means any type."""
    if id_type is None or id_type == "":
        return None
    t = id_type.strip()
    if t == "http://hl7.org/fhir/sid/us-ssn":
        return "SSN"
    if ":" in t or "/" in t:
        t = t.replace("/", ":").rsplit(":", 1)[-1]
    t = t.upper()
    return {"MRN": "MR", "EHR": "EHRID", "ENTERPRISE": "EPI", "EID": "EPI", "_ID": "ID"}.get(t, t)


def patient_identifiers(record: PatientRecord) -> dict[str, str]:
    """A patient record's identifiers by normalised type (only the ones it carries)."""
    ids = {"MR": record.mrn, "EPI": record.enterprise_id, "ID": record.id}
    if record.ehr_id:
        ids["EHRID"] = record.ehr_id
    if record.nist_id:
        ids["NIST"] = record.nist_id
    if record.ssn:
        ids["SSN"] = record.ssn
    return ids


def patient_matches(
    record: PatientRecord,
    *,
    identifier: str | None,
    id_type: str | None,
    family: str | None,
    given: str | None,
    birth_date: str | None,
) -> bool:
    """Exact match, as Redox's sandbox does (names compare case-insensitively)."""
    if identifier is None and family is None and given is None and birth_date is None:
        return False
    if identifier is not None:
        ids = patient_identifiers(record)
        t = normalize_id_type(id_type)
        if t is None:
            if identifier not in ids.values():
                return False
        elif ids.get(t) != identifier:
            return False
    if family is not None and record.family_name.lower() != family.strip().lower():
        return False
    if given is not None and given.strip().lower() not in {g.lower() for g in record.given_names}:
        return False
    return not (birth_date is not None and record.birth_date.isoformat() != birth_date.strip())


# ---------------------------------------------------------------- the column index


def search_sorted(sorted_values: np.ndarray, value: int, side: str) -> int:
    """``searchsorted`` for one integer; the value is cast to the array's dtype first, because
    numpy would otherwise cast the whole (possibly huge) array to the value's dtype."""
    info = np.iinfo(sorted_values.dtype)
    if value < info.min:
        return 0
    if value > info.max:
        return len(sorted_values)
    return int(np.searchsorted(sorted_values, sorted_values.dtype.type(value), side))  # type: ignore[call-overload]


def sort_order(lu: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row numbers ordered by ``(lu, keys)``; ``keys`` must sort like the record ids."""
    order = np.lexsort((keys, lu))
    return order.astype(np.int32 if len(order) < 2**31 else np.int64)


@dataclass(eq=False)
class EntityIndex:
    """The queryable columns of one (connection, entity) table.

    ``lu`` and ``clin`` are integer ticks after ``epoch`` (``ticks_per_second`` of them per
    second); ``clin`` holds ``clin_missing`` where a record has no clinical date. ``order`` lists
    row numbers by ``(last_updated, id)``. Instances are never mutated once published.
    """

    entity: str
    epoch: datetime
    ticks_per_second: int
    lu: np.ndarray
    clin: np.ndarray
    status: np.ndarray  # int8 codes into STATUS_VALUES[entity]
    category: np.ndarray  # int8 codes into CATEGORY_VALUES[entity], NO_CATEGORY when none
    patient: np.ndarray  # patient row of each record (for "patients", the row itself)
    order: np.ndarray
    clin_missing: int = field(default=np.iinfo(np.int64).min)
    lu_sorted: np.ndarray = field(init=False, repr=False)
    pos: np.ndarray = field(init=False, repr=False)
    _by_patient: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)
    _lock: Lock = field(default_factory=Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.lu_sorted = self.lu[self.order]
        self.pos = np.empty(len(self.order), dtype=self.order.dtype)
        self.pos[self.order] = np.arange(len(self.order), dtype=self.order.dtype)

    def __len__(self) -> int:
        return len(self.order)

    # -- conversions

    def ticks(self, dt: datetime, *, ceil: bool) -> int:
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        us = (dt - self.epoch) // timedelta(microseconds=1)
        scaled = us * self.ticks_per_second
        return -((-scaled) // 1_000_000) if ceil else scaled // 1_000_000

    def to_datetime(self, ticks: int) -> datetime:
        return self.epoch + timedelta(microseconds=int(ticks) * 1_000_000 // self.ticks_per_second)

    def _fit(self, value: int, dtype: np.dtype) -> int:
        info = np.iinfo(dtype)
        return min(max(value, info.min), info.max)

    # -- per-patient rows

    def patient_rows(self, patient: int) -> np.ndarray:
        """Row numbers of one patient's records (any order)."""
        if self.entity == "patients":
            return np.array([patient], dtype=np.int64) if 0 <= patient < len(self) else np.empty(0, np.int64)
        with self._lock:
            if self._by_patient is None:
                by = np.argsort(self.patient, kind="stable")
                self._by_patient = (by, self.patient[by])
        by, sorted_patients = self._by_patient
        a = search_sorted(sorted_patients, patient, "left")
        b = search_sorted(sorted_patients, patient, "right")
        return by[a:b].astype(np.int64)

    def live_count(self) -> int:
        return int(len(self) - np.isin(self.status, dead_codes(self.entity)).sum())


@dataclass(frozen=True)
class Selection:
    """The rows a query selects, in ``(last_updated, id)`` order."""

    index: EntityIndex
    start: int = 0  # a contiguous range of index.order ...
    stop: int = 0
    rows: np.ndarray | None = None  # ... or explicit rows

    @property
    def count(self) -> int:
        return len(self.rows) if self.rows is not None else self.stop - self.start

    def take(self, offset: int, limit: int) -> np.ndarray:
        offset = max(0, offset)
        limit = max(0, limit)
        if self.rows is not None:
            return self.rows[offset : offset + limit]
        a = min(self.start + offset, self.stop)
        return self.index.order[a : min(a + limit, self.stop)]


def select(
    index: EntityIndex,
    query: Query,
    *,
    patient_row: int | None = None,
    id_rows: np.ndarray | None = None,
) -> Selection:
    """Evaluate ``query`` over ``index``. The backend resolves ``query.patient_id`` to
    ``patient_row`` (-1 when it names no patient of the connection) and ``query.ids`` to
    ``id_rows`` (unknown ids dropped)."""
    n = len(index)
    if query.patient_id is not None and (patient_row is None or patient_row < 0):
        return Selection(index, rows=np.empty(0, np.int64))
    if query.category is not None and category_code(index.entity, query.category) == NO_CATEGORY:
        return Selection(index, rows=np.empty(0, np.int64))
    lu_dtype = index.lu_sorted.dtype
    start, stop = 0, n
    if query.updated_ge is not None:
        t = index._fit(index.ticks(query.updated_ge, ceil=True), lu_dtype)
        start = max(start, search_sorted(index.lu_sorted, t, "left"))
    if query.updated_gt is not None:
        t = index._fit(index.ticks(query.updated_gt, ceil=False), lu_dtype)
        start = max(start, search_sorted(index.lu_sorted, t, "right"))
    if query.updated_le is not None:
        t = index._fit(index.ticks(query.updated_le, ceil=False), lu_dtype)
        stop = min(stop, search_sorted(index.lu_sorted, t, "right"))
    if query.updated_lt is not None:
        t = index._fit(index.ticks(query.updated_lt, ceil=True), lu_dtype)
        stop = min(stop, search_sorted(index.lu_sorted, t, "left"))
    stop = max(start, stop)

    candidates: np.ndarray | None = None
    if query.ids is not None:
        candidates = np.unique(np.asarray(id_rows if id_rows is not None else [], dtype=np.int64))
    if query.patient_id is not None:
        prow = index.patient_rows(int(patient_row))  # type: ignore[arg-type]
        candidates = prow if candidates is None else np.intersect1d(candidates, prow)

    has_date = any(b is not None for b in (query.date_ge, query.date_gt, query.date_le, query.date_lt))
    filtered = has_date or query.statuses is not None or query.category is not None
    if candidates is None and not filtered:
        return Selection(index, start=start, stop=stop)

    if candidates is not None:
        p = index.pos[candidates]
        candidates = candidates[(p >= start) & (p < stop)]
        rows = candidates[np.argsort(index.pos[candidates], kind="stable")]
    else:
        rows = index.order[start:stop]
    if not filtered or len(rows) == 0:
        return Selection(index, rows=rows)

    keep = np.ones(len(rows), dtype=bool)
    if has_date:
        clin = index.clin[rows]
        cd = clin.dtype
        keep &= clin != index.clin_missing
        if query.date_ge is not None:
            keep &= clin >= index._fit(index.ticks(query.date_ge, ceil=True), cd)
        if query.date_gt is not None:
            keep &= clin > index._fit(index.ticks(query.date_gt, ceil=False), cd)
        if query.date_le is not None:
            keep &= clin <= index._fit(index.ticks(query.date_le, ceil=False), cd)
        if query.date_lt is not None:
            keep &= clin < index._fit(index.ticks(query.date_lt, ceil=True), cd)
    if query.statuses is not None:
        values = STATUS_VALUES[index.entity]
        codes = [values.index(s) for s in query.statuses if s in values]
        keep &= np.isin(index.status[rows], codes)
    if query.category is not None:
        keep &= index.category[rows] == category_code(index.entity, query.category)
    return Selection(index, rows=rows[keep])


def patients_starting_since(indexes: Sequence[EntityIndex], since: datetime) -> int:
    """How many distinct patients have a record in any of ``indexes`` whose clinical date (an
    encounter's or appointment's start) is at or after ``since`` — on columns only."""
    parts = []
    for index in indexes:
        threshold = index._fit(index.ticks(since, ceil=True), index.clin.dtype)
        keep = (index.clin != index.clin_missing) & (index.clin >= threshold) & (index.patient >= 0)
        parts.append(index.patient[keep].astype(np.int64))
    return int(len(np.unique(np.concatenate(parts)))) if parts else 0


def query_key(query: Query) -> tuple:
    """A hashable form of a query, for caching selections while pages are read."""
    return (
        query.connection_id,
        query.entity,
        tuple(query.ids) if query.ids is not None else None,
        query.patient_id,
        query.updated_ge,
        query.updated_gt,
        query.updated_le,
        query.updated_lt,
        query.date_ge,
        query.date_gt,
        query.date_le,
        query.date_lt,
        tuple(query.statuses) if query.statuses is not None else None,
        query.category,
    )


class SelectionCache:
    """A small LRU of selections, so reading page after page of a filtered query stays O(page).
    Keys include the index identity, so a new snapshot never serves a stale selection."""

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._items: OrderedDict[tuple, Selection] = OrderedDict()
        self._lock = Lock()

    def get(self, key: tuple) -> Selection | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: tuple, selection: Selection) -> None:
        if selection.rows is None:
            return  # ranges are already O(1) to compute
        with self._lock:
            self._items[key] = selection
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def rows_for_ids(ids: Sequence[str], lookup) -> np.ndarray:
    """Row numbers for the ids ``lookup`` resolves (``lookup(id) -> row | None``)."""
    rows = [r for r in (lookup(i) for i in ids) if r is not None]
    return np.asarray(rows, dtype=np.int64)
