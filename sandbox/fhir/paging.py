"""Search result pages and the opaque tokens behind ``next`` links.

Pages are keyset-based on the store's order ``(last_updated, id)``: a token remembers the
last record served, not an offset, so records updated while a client pages (they move to
the end) never shift unseen records onto pages already read. The token maps server-side to
the frozen search; no search value ever appears in a URL.

A Patient search with ``_revinclude`` pages differently: its matched patients are frozen at the
first page and each is expanded, when reached, into itself plus the records that reference it,
so matches and includes share one paged list.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from sandbox.fhir.render import MEDICATION_KINDS, RESOURCE_ENTITIES
from sandbox.fhir.search import SearchPlan, with_updated_floor
from sandbox.population.records import Record
from sandbox.population.store import Query, RecordStore


@dataclass(frozen=True)
class Cursor:
    """Where the previous page stopped: the last record served and where it sat.

    ``offset`` is the position after that record in ``query`` (the fast path, which keeps the
    store's cached selection warm); ``tie_position`` is its 1-based position among the search's
    records updated at exactly ``last_updated`` (the store orders ties by id), which locates it
    again in a query floored at ``last_updated`` if records before it changed meanwhile.
    """

    query: Query
    offset: int
    last_updated: datetime
    last_id: str
    tie_position: int

    @property
    def key(self) -> tuple[datetime, str]:
        return self.last_updated, self.last_id


@dataclass(frozen=True)
class PageRequest:
    plan: SearchPlan
    cursor: Cursor | None
    total: int | None  # frozen total of a filtered search (counting it means a full scan)


@dataclass
class Page:
    records: list[Record]
    total: int
    next: PageRequest | None


def _key(record: Record) -> tuple[datetime, str]:
    return record.last_updated, record.id


def _locate(store: RecordStore, query: Query, cursor: Cursor) -> int:
    """Offset of the first record after the cursor, found by scanning (the slow path taken
    only when records around the cursor changed since the previous page)."""
    offset = 0
    for record in store.iter(query):
        if _key(record) > cursor.key:
            return offset
        offset += 1
    return offset


def _resume(
    store: RecordStore, plan: SearchPlan, cursor: Cursor, batch: int
) -> tuple[Query, int, int, list[Record]]:
    """(query, offset, tie position, rows from offset) to continue after ``cursor``."""
    rows = store.page(cursor.query, cursor.offset - 1, batch + 1)
    if rows and _key(rows[0]) == cursor.key:
        return cursor.query, cursor.offset, cursor.tie_position, rows[1:]
    assert plan.query is not None
    floored = with_updated_floor(plan.query, cursor.last_updated)
    rows = store.page(floored, cursor.tie_position - 1, batch + 1)
    if rows and _key(rows[0]) == cursor.key:
        return floored, cursor.tie_position, cursor.tie_position, rows[1:]
    offset = _locate(store, floored, cursor)
    # Everything before ``offset`` in the floored query sits in the cursor's tie group.
    return floored, offset, offset, store.page(floored, offset, batch)


def _count(store: RecordStore, plan: SearchPlan) -> int:
    assert plan.query is not None
    if not plan.filters:
        return store.count(plan.query)
    return sum(1 for r in store.iter(plan.query) if all(f(r) for f in plan.filters))


def read_page(store: RecordStore, request: PageRequest) -> Page:
    """One page of a search, with the request for the page after it (None on the last page)."""
    plan = request.plan
    if plan.query is None:
        return Page([], 0, None)
    total = request.total if request.total is not None else _count(store, plan)
    limit = plan.count
    if limit == 0:
        return Page([], total, None)

    batch = limit + 1 if not plan.filters else max(2 * limit, 200)
    cursor = request.cursor
    tie_updated: datetime | None = None
    if cursor is None:
        query, offset, tie_position = plan.query, 0, 0
        rows = store.page(query, 0, batch)
    else:
        query, offset, tie_position, rows = _resume(store, plan, cursor, batch)
        tie_updated = cursor.last_updated

    matched: list[Record] = []
    last: Cursor | None = None
    more = False
    while True:
        exhausted = len(rows) < batch
        for record in rows:
            offset += 1
            accepted = all(f(record) for f in plan.filters)
            if len(matched) == limit:
                if accepted:
                    more = True
                    break
                continue
            if record.last_updated == tie_updated:
                tie_position += 1
            else:
                tie_updated, tie_position = record.last_updated, 1
            if accepted:
                matched.append(record)
                last = Cursor(query, offset, record.last_updated, record.id, tie_position)
        if more or exhausted:
            break
        rows = store.page(query, offset, batch)
    following = PageRequest(plan, last, total if plan.filters else None) if more and last else None
    return Page(matched, total, following)


class PageTokens:
    """Opaque page tokens -> PageRequest, bounded and expiring."""

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 3600.0) -> None:
        self._max = max_entries
        self._ttl = ttl_s
        self._entries: OrderedDict[str, tuple[float, PageRequest | RevincludeRequest]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, request: PageRequest | RevincludeRequest) -> str:
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._entries[token] = (now + self._ttl, request)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
            while self._entries:
                oldest_token, (expires, _) = next(iter(self._entries.items()))
                if expires > now:
                    break
                del self._entries[oldest_token]
        return token

    def resolve(self, token: str) -> PageRequest | RevincludeRequest | None:
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                return None
            expires, request = entry
            if expires <= time.monotonic():
                del self._entries[token]
                return None
            return request


# --- Patient search with `_revinclude` ---------------------------------------------------------


@dataclass(frozen=True)
class IncludeKey:
    """One entry of a `_revinclude` result: a record to read at page time (current version)."""

    entity: str
    record_id: str
    mode: str  # "match" | "include"


@dataclass(frozen=True)
class RevincludeRequest:
    """Where a `_revinclude` search stands: the matched patients (frozen at the first page, in
    the store's order), the next patient to expand, and the entries of the patient being
    expanded that were not served yet. Matches and includes page as one list; ``total`` counts
    matches only (FHIR)."""

    plan: SearchPlan
    patient_ids: tuple[str, ...]
    next_patient: int
    pending: tuple[IncludeKey, ...]

    @property
    def total(self) -> int:
        return len(self.patient_ids)


@dataclass
class RevincludePage:
    entries: list[tuple[Record, str]]  # (record, search mode)
    total: int
    next: RevincludeRequest | None


def start_revinclude(store: RecordStore, plan: SearchPlan) -> RevincludeRequest:
    """Freeze the matched patients of a Patient search that carries `_revinclude`."""
    ids: list[str] = []
    if plan.query is not None:
        ids = [r.id for r in store.iter(plan.query) if all(f(r) for f in plan.filters)]
    return RevincludeRequest(plan, tuple(ids), 0, ())


def _expand(store: RecordStore, plan: SearchPlan, patient_id: str) -> list[IncludeKey]:
    """One patient and every record of the requested types that references it: exactly what a
    ``{Type}/_search patient={id}`` per type returns, in the same order."""
    assert plan.query is not None
    out = [IncludeKey("patients", patient_id, "match")]
    for rtype in plan.revinclude:
        entity = RESOURCE_ENTITIES[rtype]
        query = Query(
            connection_id=plan.query.connection_id,
            entity=entity,
            patient_id=patient_id,
            category=MEDICATION_KINDS.get(rtype),
        )
        out.extend(IncludeKey(entity, r.id, "include") for r in store.iter(query))
    return out


def read_revinclude_page(store: RecordStore, request: RevincludeRequest) -> RevincludePage:
    """One page (``plan.count`` entries) of a `_revinclude` search. Records are read at page time,
    so each entry is the record's current version; one deleted meanwhile is skipped."""
    plan = request.plan
    limit = plan.count
    if limit == 0:
        return RevincludePage([], request.total, None)
    pending = list(request.pending)
    next_patient = request.next_patient
    entries: list[tuple[Record, str]] = []
    while len(entries) < limit:
        if not pending:
            if next_patient >= len(request.patient_ids):
                break
            pending = _expand(store, plan, request.patient_ids[next_patient])
            next_patient += 1
        key = pending.pop(0)
        record = store.get(plan.query.connection_id, key.entity, key.record_id)  # type: ignore[union-attr]
        if record is not None:
            entries.append((record, key.mode))
    more = bool(pending) or next_patient < len(request.patient_ids)
    following = RevincludeRequest(plan, request.patient_ids, next_patient, tuple(pending)) if more else None
    return RevincludePage(entries, request.total, following)
