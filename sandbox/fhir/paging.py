"""Search result pages and the opaque tokens behind ``next`` links.

Pages are keyset-based on the store's order ``(last_updated, id)``: a token remembers the
last record served, not an offset, so records updated while a client pages (they move to
the end) never shift unseen records onto pages already read. The token maps server-side to
the frozen search; no search value ever appears in a URL.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from sandbox.fhir.search import SearchPlan, with_updated_floor
from sandbox.population.records import Record
from sandbox.population.store import Query, RecordStore


@dataclass(frozen=True)
class Cursor:
    """The last record served. ``tie_position`` is its 1-based position among the records
    of the search updated at exactly ``last_updated`` (the store orders ties by id)."""

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

    cursor = request.cursor
    query, offset = plan.query, 0
    tie_updated: datetime | None = None
    tie_position = 0
    probe = False
    if cursor is not None:
        query = with_updated_floor(plan.query, cursor.last_updated)
        offset = cursor.tie_position - 1
        tie_updated, tie_position = cursor.last_updated, cursor.tie_position
        probe = True

    batch = limit + 2 if not plan.filters else max(2 * limit, 200)
    matched: list[Record] = []
    last: Cursor | None = None
    more = False
    while True:
        rows = store.page(query, offset, batch)
        exhausted = len(rows) < batch
        if probe:
            probe = False
            assert cursor is not None
            if not rows or _key(rows[0]) != cursor.key:
                offset = _locate(store, query, cursor)
                tie_position = offset  # everything before it sits in the cursor's tie group
                continue
            rows = rows[1:]
            offset += 1
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
                last = Cursor(record.last_updated, record.id, tie_position)
        if more or exhausted:
            break
    following = PageRequest(plan, last, total if plan.filters else None) if more and last else None
    return Page(matched, total, following)


class PageTokens:
    """Opaque page tokens -> PageRequest, bounded and expiring."""

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 3600.0) -> None:
        self._max = max_entries
        self._ttl = ttl_s
        self._entries: OrderedDict[str, tuple[float, PageRequest]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, request: PageRequest) -> str:
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

    def resolve(self, token: str) -> PageRequest | None:
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                return None
            expires, request = entry
            if expires <= time.monotonic():
                del self._entries[token]
                return None
            return request
