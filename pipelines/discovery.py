"""Discovery: who is active at a connection, through the few queries Redox allows without a
patient (REDOX-REFERENCE "Decisions", §3.3, §12.5).

- FHIR: ``Encounter/_search`` with ``date=ge<start>`` (encounters in the window), ``Encounter``
  with ``status=in-progress,arrived`` (the in-house census, whenever they were admitted) and
  ``Appointment/_search`` with a ``date`` window from ``start`` to ``now + horizon``.
- Data Model: ``Scheduling.Booked`` over ``[start, now + horizon]`` and
  ``PatientAdmin.CensusQuery``.

The pages are landed like any page and later normalized into the staged encounter and
appointment tables; the patients they name become panel sightings with their activity times.
Next links are followed when present and never relied on: a FHIR page as full as asked with no
next link has its date window split in two and asked again; a Data Model answer that may be
capped moves its window start to the last item's time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from pipelines.fhir.patient_pull import PartialFailure, bundle_errors
from pipelines.fhir.settings import fhir_instant
from pipelines.landing import RawLanding
from pipelines.normalize_common import parse_ts
from pipelines.panel import FHIR_ID_SYSTEM, Sighting
from pipelines.pull_pages import (
    CallCounter,
    PulledPage,
    ServerClock,
    error_code,
    land_page,
    page_context,
    with_priority,
)
from pipelines.sync_context import DEFAULT_DISCOVER_DAYS as DEFAULT_DISCOVER_DAYS  # re-exported

# Booked appointments this far ahead make a patient active. Clinics book a quarter or so ahead
# and reschedules push bookings further, so the horizon is twice that: a patient booked five
# months out is still someone the organization sees.
DEFAULT_HORIZON_DAYS = 180
MIN_SPLIT = timedelta(minutes=1)
MAX_WALK = 500
# server now -> [start, end) of the discovery window (end None: open, up to now / the horizon)
WindowFn = Callable[[datetime], tuple[datetime, datetime | None]]


@dataclass
class Discovery:
    """What discovery found: the landed pages (to stage) and the patients seen."""

    entities: tuple[str, ...] = ()  # the entities the sync takes from the pages (this surface's)
    pages: list[PulledPage] = field(default_factory=list)
    sightings: list[Sighting] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # PHI-free error label -> count

    def failed(self, exc: BaseException) -> None:
        label = error_code(exc)
        self.errors[label] = self.errors.get(label, 0) + 1


# ---- FHIR --------------------------------------------------------------------------------------


def _fhir_patient(ref: dict[str, Any] | None) -> tuple[str, str, str | None] | None:
    """(id_system, id_value, fhir_id) of a Reference to a Patient."""
    if not isinstance(ref, dict):
        return None
    reference = str(ref.get("reference") or "")
    if reference.startswith("Patient/"):
        pid = reference.split("/", 1)[1]
        return FHIR_ID_SYSTEM, pid, pid
    ident = ref.get("identifier") or {}
    system, value = ident.get("system"), ident.get("value")
    if system and value and str(system).startswith("urn:redox:") and str(system).endswith(":MR"):
        return "MR", str(value), None
    return None


def _fhir_sighting(resource: dict[str, Any], found_by: str, now: datetime) -> Sighting | None:
    rtype = resource.get("resourceType")
    if rtype == "Encounter":
        who = _fhir_patient(resource.get("subject"))
        activity = parse_ts((resource.get("period") or {}).get("start"))
    elif rtype == "Appointment":
        who = next(
            (
                w
                for p in resource.get("participant") or []
                if (w := _fhir_patient((p or {}).get("actor"))) is not None
            ),
            None,
        )
        activity = parse_ts(resource.get("start"))
    else:
        return None
    if who is None:
        return None
    changed = parse_ts((resource.get("meta") or {}).get("lastUpdated")) or min(activity or now, now)
    system, value, fhir_id = who
    return Sighting(system, value, found_by, activity_at=activity, changed_at=changed, fhir_id=fhir_id)


def _fhir_window(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    resource_type: str,
    entity: str,
    params: list[tuple[str, str]],
    start: datetime | None,
    end: datetime | None,
    page_size: int,
    counter: CallCounter,
    out: Discovery,
    found_by: str,
    now: datetime,
    depth: int = 0,
    *,
    clock: ServerClock,
) -> None:
    dated = list(params)
    if start is not None:
        dated.append(("date", f"ge{fhir_instant(start)}"))
    if end is not None:
        dated.append(("date", f"lt{fhir_instant(end)}"))
    dated.append(("_count", str(page_size)))
    kw = with_priority(client, "fhir_search_pages", "discovery")
    pages: list[PulledPage] = []
    context = page_context(out.entities)
    for raw in client.fhir_search_pages(resource_type, dated, entity=entity, **kw):
        counter.add(f"discover {resource_type}")
        bundle = orjson.loads(raw)
        clock.observe(bundle)
        codes = bundle_errors(bundle)
        if codes:
            raise PartialFailure(f"search {resource_type}", codes)
        pages.append(land_page(landing, connection_id, "fhir", entity, raw, context, bundle))
    # Every landed page is staged, a full one that is split below included (a replay reads it too).
    out.pages.extend(pages)
    last_bundle = pages[-1].body if pages else {}
    capped_without_next = (
        len(pages) == 1
        and len(last_bundle.get("entry") or []) >= page_size
        and not any((link or {}).get("relation") == "next" for link in last_bundle.get("link") or [])
    )
    if (
        capped_without_next
        and start is not None
        and end is not None
        and end - start > MIN_SPLIT
        and depth < 24
    ):
        # No next link on a full page: the server may have cut it. Split the window; never guess.
        mid = start + (end - start) / 2
        for lo, hi in ((start, mid), (mid, end)):
            _fhir_window(
                client, landing, connection_id, resource_type, entity, params, lo, hi,
                page_size, counter, out, found_by, now, depth + 1, clock=clock,
            )  # fmt: skip
        return
    for page in pages:
        for entry in page.body.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                s = _fhir_sighting(resource, found_by, now)
                if s is not None:
                    out.sightings.append(s)


def discover_fhir(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    entities: tuple[str, ...],
    clock: ServerClock,
    window_of: WindowFn,
    *,
    page_size: int = 500,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
    counter: CallCounter | None = None,
) -> Discovery:
    """The in-house census first (its answer tells the server's time), then encounters and
    appointments in the window ``window_of(server now)``."""
    counter = counter or CallCounter()
    out = Discovery(entities=entities)
    start, end = window_of(clock.now())
    plans = []
    if "encounters" in entities and end is None:  # the census is "now"; a backfill window has none
        plans.append(("Encounter", "encounters", [("status", "in-progress,arrived")], "census"))
    if "encounters" in entities:
        plans.append(("Encounter", "encounters", [], "encounter_window"))
    if "appointments" in entities:
        plans.append(("Appointment", "appointments", [], "booked_window"))
    for rtype, entity, params, found_by in plans:
        now = clock.now()
        start, end = window_of(now)
        if found_by == "census":
            lo = hi = None
        elif found_by == "booked_window":
            lo, hi = start, end or now + timedelta(days=horizon_days)
        else:
            # Split bounds need an end: an open window ends a little after the server's now.
            lo, hi = start, end or now + timedelta(minutes=5)
        try:
            _fhir_window(
                client, landing, connection_id, rtype, entity, params, lo, hi,
                page_size, counter, out, found_by, now, clock=clock,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one failed discovery query must not stop the sync
            out.failed(exc)
    return out


# ---- Data Model --------------------------------------------------------------------------------


def _dm_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _dm_patient(block: dict[str, Any] | None) -> tuple[str, str] | None:
    idents = (block or {}).get("Identifiers") or []
    for ident in idents:
        if str(ident.get("IDType", "")).upper() in ("MR", "MRN") and ident.get("ID"):
            return "MR", str(ident["ID"])
    first = next((i for i in idents if i.get("ID") and i.get("IDType")), None)
    return (str(first["IDType"]).upper(), str(first["ID"])) if first else None


def discover_datamodel(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    entities: tuple[str, ...],
    clock: ServerClock,
    window_of: WindowFn,
    *,
    page_size: int = 100,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
    counter: CallCounter | None = None,
) -> Discovery:
    """The census first (its answer tells the server's time), then booked appointments over
    ``[start, now + horizon]``."""
    counter = counter or CallCounter()
    out = Discovery(entities=entities)
    _, end = window_of(clock.now())
    if "encounters" in entities and end is None:
        try:
            _census(client, landing, connection_id, counter, out, clock)
        except Exception as exc:  # noqa: BLE001 - one failed discovery query must not stop the sync
            out.failed(exc)
    if "appointments" in entities:
        now = clock.now()
        start, end = window_of(now)
        try:
            _booked(
                client, landing, connection_id, start, end or now + timedelta(days=horizon_days),
                page_size, counter, out, clock,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            out.failed(exc)
    return out


def _ask(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    payload: dict[str, Any],
    entity: str,
    counter: CallCounter,
    out: Discovery,
    event_type: str,
    only: frozenset[str],
) -> PulledPage:
    """Send a discovery query, land the answer with its context and keep the page."""
    raw, body = client.datamodel_raw(
        payload, entity=entity, **with_priority(client, "datamodel_raw", "discovery")
    )
    counter.add(f"discover {payload['Meta']['DataModel']}.{payload['Meta']['EventType']}")
    context = page_context(out.entities, only=only, event_type=event_type)
    page = land_page(landing, connection_id, "datamodel", entity, raw, context, body)
    out.pages.append(page)
    return page


def _booked(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    start: datetime,
    end: datetime,
    page_size: int,
    counter: CallCounter,
    out: Discovery,
    clock: ServerClock,
) -> None:
    seen: set[str] = set()
    cursor = start
    for _ in range(MAX_WALK):
        payload = {
            "Meta": {"DataModel": "Scheduling", "EventType": "Booked"},
            "StartDateTime": _dm_time(cursor),
            "EndDateTime": _dm_time(end),
        }
        body = _ask(
            client, landing, connection_id, payload, "appointments", counter, out,
            "BookedResponse", frozenset({"appointments", "patients"}),
        ).body  # fmt: skip
        clock.observe(body)
        now = clock.now()
        visits = body.get("Visits") or []
        for v in visits:
            who = _dm_patient(v.get("Patient"))
            if who:
                activity = parse_ts(v.get("VisitDateTime"))
                changed = parse_ts(v.get("LastUpdated")) or min(activity or now, now)
                out.sightings.append(
                    Sighting(
                        who[0],
                        who[1],
                        "booked_window",
                        activity,
                        changed,
                        mrn=who[1] if who[0] == "MR" else None,
                    )
                )
        fresh = [v for v in visits if str(v.get("VisitNumber")) not in seen]
        seen.update(str(v.get("VisitNumber")) for v in visits)
        times = [t for t in (parse_ts(v.get("VisitDateTime")) for v in visits) if t is not None]
        full = len(visits) >= page_size or bool((body.get("Meta") or {}).get("IsIncomplete"))
        if not full or not fresh or not times or max(times) <= cursor:
            return
        cursor = max(times)


def _census(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    counter: CallCounter,
    out: Discovery,
    clock: ServerClock,
) -> None:
    payload = {"Meta": {"DataModel": "PatientAdmin", "EventType": "CensusQuery"}}
    body = _ask(
        client, landing, connection_id, payload, "encounters", counter, out,
        "CensusQueryResponse", frozenset({"encounters", "patients"}),
    ).body  # fmt: skip
    clock.observe(body)
    now = clock.now()
    for p in body.get("Patients") or []:
        who = _dm_patient(p)
        if not who:
            continue
        times = [t for t in (parse_ts(v.get("VisitDateTime")) for v in p.get("Visits") or []) if t]
        activity = max(times) if times else None
        out.sightings.append(
            Sighting(
                who[0],
                who[1],
                "census",
                activity,
                min(activity or now, now),
                mrn=who[1] if who[0] == "MR" else None,
            )
        )
