"""Landed pages of discovery, per-patient pulls and bulk export, turned into staged rows.

The pulls fetch on worker threads and land every response as received; what they hand to the
dlt resource is a list of ``PulledPage`` (where the page landed, how to read it). The resource
normalizes them on its own thread through the common normalizers into the staged tables
``raw.<surface>_<entity>`` (merge on the business keys, no dlt cursor: the panel is the state).
Client helpers here code to the shared budget contract (``client.budget``, ``priority=``) and
work before it exists.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dlt
import orjson
import pyarrow as pa

from pipelines.batches import EntityBatcher
from pipelines.datamodel.normalize import normalize_datamodel
from pipelines.fhir.normalize import NORMALIZERS
from pipelines.landing import RawLanding
from pipelines.normalize_common import NormalizationError, parse_ts
from pipelines.resource_hints import staged_resource_hints, staged_table_name


@dataclass(frozen=True)
class PulledPage:
    """One landed response and how to normalize it."""

    surface: str  # fhir | datamodel
    raw_ref: str
    body: dict[str, Any] | None = None  # parsed body when at hand (else read from the landing)
    event_type: str | None = None  # Data Model: the response type of the query sent
    only: frozenset[str] | None = None  # Data Model: the entities to take from it
    patient: dict[str, Any] | None = None  # Data Model: the queried Patient block (DocumentGet)


class ContentAwareBatcher(EntityBatcher):
    """An EntityBatcher that fetches a document's content only when the landing's content index
    does not already hold it: a refresh re-reads metadata, never bytes already stored."""

    def __init__(
        self, *args: Any, known_content: dict[tuple[str, str], str] | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.known_content = known_content or {}
        self.contents_fetched = 0

    def _attach_content(self, row: dict[str, Any], content: bytes | None, content_url: str | None) -> None:
        if content is None and content_url and self.landing is not None:
            digest = self.known_content.get((self.connection_id, content_url))
            if digest and self.landing.document_path(digest).exists():
                row["content_sha256"] = digest
                row["content_bytes"] = self.landing.document_path(digest).stat().st_size
                return
            self.contents_fetched += 1
        super()._attach_content(row, content, content_url)
        if content_url and row.get("content_sha256"):
            self.known_content[(self.connection_id, content_url)] = row["content_sha256"]


class StagedEmitter:
    """Per-entity batchers of one surface; pages in, Arrow tables for the staged tables out."""

    def __init__(
        self,
        surface: str,
        connection_id: str,
        entities: tuple[str, ...],
        *,
        client: Any,
        landing: RawLanding,
        known_content: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.surface = surface
        self.connection_id = connection_id
        self.landing = landing
        self.entities = set(entities)
        shared = known_content if known_content is not None else {}
        self.batchers = {
            e: ContentAwareBatcher(
                e, connection_id, surface, client=client, landing=landing, known_content=shared
            )
            for e in entities
        }

    @property
    def contents_fetched(self) -> int:
        return sum(b.contents_fetched for b in self.batchers.values())

    def take(self, page: PulledPage) -> None:
        body = page.body
        if body is None:
            body = orjson.loads(self.landing.read(page.raw_ref))
        if self.surface == "fhir":
            self._take_fhir(body, page.raw_ref)
        else:
            self._take_datamodel(body, page)

    def take_resource(self, resource: dict[str, Any], raw_ref: str) -> None:
        rtype = resource.get("resourceType")
        if rtype not in NORMALIZERS:
            return
        entity, normalize = NORMALIZERS[rtype]
        if entity in self.batchers:
            self.batchers[entity].add_resource(resource, normalize, raw_ref, resource_type=rtype)

    def _take_fhir(self, bundle: dict[str, Any], raw_ref: str) -> None:
        if bundle.get("resourceType") != "Bundle":
            self.take_resource(bundle, raw_ref)
            return
        if "documents" in self.batchers:
            urls = [
                url
                for entry in bundle.get("entry") or []
                for content in ((entry.get("resource") or {}).get("content") or [])
                if (url := (content.get("attachment") or {}).get("url"))
                and (self.connection_id, url) not in self.batchers["documents"].known_content
            ]
            self.batchers["documents"].prefetch_contents(urls)
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                self.take_resource(resource, raw_ref)

    def _take_datamodel(self, body: dict[str, Any], page: PulledPage) -> None:
        try:
            out = normalize_datamodel(
                body, self.connection_id, page.raw_ref, event_type=page.event_type, patient=page.patient
            )
        except NormalizationError as exc:
            first = next(iter(self.batchers.values()))
            first.quarantine(page.raw_ref, None, str(exc))
            return
        for entity, rows in out.rows.items():
            if entity in self.batchers and (page.only is None or entity in page.only):
                for row in rows:
                    self.batchers[entity].add_row(row)

    def drain(self, final: bool) -> Iterator[Any]:
        """Tables for ``raw.<surface>_<entity>``; every table names its staged table explicitly."""
        for entity, batcher in self.batchers.items():
            for item in batcher.drain(final=final):
                if isinstance(item, pa.Table):
                    yield dlt.mark.with_hints(
                        item, staged_hints(self.surface, entity), create_table_variant=True
                    )
                else:
                    yield item


def staged_hints(surface: str, entity: str) -> Any:
    hints = staged_resource_hints(surface, entity)
    return dlt.mark.make_hints(
        table_name=staged_table_name(surface, entity),
        write_disposition="merge",
        primary_key=hints["primary_key"],
        columns=hints["columns"],
    )


# ---- the shared budget (resources/client contract, guarded until it lands) ---------------------


def budget_remaining(client: Any) -> int | None:
    budget = getattr(client, "budget", None)
    remaining = getattr(budget, "remaining", None)
    if not callable(remaining):
        return None
    try:
        value = remaining()
    except TypeError:
        return None
    return int(value) if value is not None else None


def budget_stats(client: Any) -> dict[str, Any] | None:
    stats = getattr(getattr(client, "budget", None), "stats", None)
    if not callable(stats):
        return None
    try:
        out = stats()
    except TypeError:
        return None
    return dict(out) if isinstance(out, dict) else None


_ACCEPTS_PRIORITY: dict[tuple[type, str], bool] = {}


def with_priority(client: Any, method: str, priority: str) -> dict[str, Any]:
    """``{"priority": priority}`` when the client's method takes it, else ``{}``."""
    key = (type(client), method)
    if key not in _ACCEPTS_PRIORITY:
        fn = getattr(client, method, None)
        try:
            params = inspect.signature(fn).parameters if fn is not None else {}
        except (TypeError, ValueError):
            params = {}
        _ACCEPTS_PRIORITY[key] = "priority" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )
    return {"priority": priority} if _ACCEPTS_PRIORITY[key] else {}


@dataclass
class CallCounter:
    """Requests this module sent (pages and reads), by kind; PHI-free."""

    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, n: int = 1) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


def error_code(exc: BaseException) -> str:
    """A PHI-free label for a failed pull: the error class, HTTP status and vocabulary codes."""
    status = getattr(exc, "status_code", None)
    codes = getattr(exc, "codes", ()) or ()
    parts = [type(exc).__name__]
    if status is not None:
        parts.append(f"HTTP {status}")
    if codes:
        parts.append(",".join(str(c)[:40] for c in codes[:3]))
    return " ".join(parts)


class ServerClock:
    """The server's idea of "now": discovery windows, pull times and refresh schedules use it,
    so they compare with the records' own update times. Learned from the time every answer
    carries (FHIR ``Bundle.meta.lastUpdated``, Data Model ``Meta.EventDateTime``) as an offset
    from this machine's clock; against Redox the offset is about zero."""

    def __init__(self, offset_s: float = 0.0) -> None:
        self.offset_s = offset_s
        self.observed = False
        self._lock = threading.Lock()

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset_s)

    def observe(self, body: dict[str, Any] | None) -> None:
        if not isinstance(body, dict):
            return
        stamp = (body.get("meta") or {}).get("lastUpdated") if body.get("resourceType") == "Bundle" else None
        if stamp is None:
            stamp = (
                (body.get("Meta") or {}).get("EventDateTime") if isinstance(body.get("Meta"), dict) else None
            )
        when = parse_ts(stamp)
        if when is None:
            return
        with self._lock:
            self.offset_s = (when - datetime.now(UTC)).total_seconds()
            self.observed = True
