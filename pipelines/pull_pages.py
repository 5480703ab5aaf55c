"""Landed pages of discovery, per-patient pulls and bulk export, turned into staged rows.

The pulls fetch on worker threads and land every response as received, each with the
``PageContext`` a replay needs (the event type of the query, the entities this sync takes
from the page); what they hand to the dlt resource is a list of ``PulledPage``. The resource
routes them on its own thread through ``PageRouter.take_page`` — the one page-to-rows path
the live sources and ``redox-elt renormalize`` share — into the staged tables
``raw.<surface>_<entity>`` (merge on the business keys, no dlt cursor: the panel is the
state). Client helpers here code to the shared budget contract (``client.budget``,
``priority=``).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from pipelines.batches import PageRouter
from pipelines.fhir.pages import attachment_urls
from pipelines.landing import PageContext, RawLanding
from pipelines.normalize_common import parse_ts
from pipelines.vocabulary import ENTITIES, staged_table_name

# The table a pull resource is named after; every other staged table leaves as a variant.
PULL_MAIN_ENTITY = "patients"


@dataclass(frozen=True)
class PulledPage:
    """One landed response: where it landed, its parsed body and its context."""

    surface: str  # fhir | datamodel
    entity: str  # the entity the call fetched (its landing folder)
    raw_ref: str
    body: Any
    context: PageContext


def page_context(
    entities: Iterable[str], *, only: Iterable[str] | None = None, event_type: str | None = None
) -> PageContext:
    """The context a page is landed with: the entities this sync takes from it (the connection's
    ``entities`` on this surface, narrowed to ``only``) in vocabulary order."""
    keep = set(entities) if only is None else set(entities) & set(only)
    return PageContext(event_type=event_type, entities=tuple(e for e in ENTITIES if e in keep))


def land_page(
    landing: RawLanding,
    connection_id: str,
    surface: str,
    entity: str,
    raw: bytes,
    context: PageContext,
    body: Any = None,
) -> PulledPage:
    """Land a response as received, with its context; -> the page (body parsed when not given)."""
    ref = landing.land(connection_id, surface, entity, raw, context).raw_ref
    if body is None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw  # take_page quarantines the page as unreadable
    return PulledPage(surface, entity, ref, body, context)


class StagedEmitter:
    """One surface's page router for a pull resource: pages in, tables for dlt out."""

    def __init__(
        self,
        surface: str,
        connection_id: str,
        *,
        client: Any,
        landing: RawLanding,
        known_content: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.surface = surface
        self.router = PageRouter(
            connection_id,
            surface,
            client=client,
            landing=landing,
            content_index=known_content if known_content is not None else {},
            main=staged_table_name(surface, PULL_MAIN_ENTITY),
        )

    @property
    def contents_fetched(self) -> int:
        return self.router.contents_fetched

    def take(self, page: PulledPage) -> None:
        wants_documents = page.context.entities is None or "documents" in page.context.entities
        if self.surface == "fhir" and wants_documents:
            self.router.prefetch_contents(attachment_urls(page.body))
        self.router.take_page(page.body, page.raw_ref, page.entity, page.context)

    def drain(self, final: bool) -> Iterator[Any]:
        yield from self.router.drain(final=final)


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
