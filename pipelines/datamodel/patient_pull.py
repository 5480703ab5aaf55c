"""One patient's records through Redox's Data Model API, every query naming the patient.

The queries (REDOX-REFERENCE §2.11-2.13, §12.5): ``PatientSearch.Query`` by identifier (the
patient), ``Clinical Summary.PatientQuery`` (medications, problems, allergies, immunizations,
procedures), ``Order.Query`` with ``Patients`` (orders), ``Results.Query`` with ``Patients``
(results, and the lab orders' reports),
``Notes.Query`` / ``Media.Query`` with ``Patients`` (documents), ``PatientAdmin.VisitQuery``
with ``Patients`` (encounters) and ``Scheduling.Booked`` with the patient filter
(appointments). A response that may be capped (``page_size`` items, or ``Meta.IsIncomplete``)
is continued the way each query allows: the window start moved to the last item's time
(VisitQuery, Results, Booked), or split by the patient's visit numbers (Notes, Media).

``Meta.Errors`` in any answer (even HTTP 200) raises in the client and fails the patient's
pull: it stays due, nothing of it is staged. Every response is landed as received.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.landing import RawLanding
from pipelines.panel import DuePatient, datamodel_id_type
from pipelines.pull_pages import (
    CallCounter,
    PulledPage,
    datamodel_query_patient,
    land_page,
    page_context,
    with_priority,
)

EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
# Entities taken from the patient's Clinical Summary. Its results and panels are left to
# Results.Query (it carries the order ids both surfaces share), and its plan-of-care orders
# (active ones only, no ids) to Order.Query. Its encounters are taken beside VisitQuery's: they
# carry the visit number, and the end time, coded reason, type, attending and disposition that
# Redox's VisitQueryResponse does not define (the two rows of a visit are merged before
# staging: ``pipelines.batches.SAME_VERSION_MERGED``).
SUMMARY_ENTITIES = frozenset(
    {"encounters", "medications", "problems", "allergies", "immunizations", "procedures"}
)
FUTURE = timedelta(days=3650)
MAX_WALK = 200  # continuation queries per patient and query: a guard against a stuck cursor


@dataclass
class DataModelPullContext:
    client: Any
    landing: RawLanding
    connection_id: str
    entities: tuple[str, ...]  # the entities pulled through this surface
    page_size: int
    counter: CallCounter


@dataclass
class DataModelPatientResult:
    pages: list[PulledPage] = field(default_factory=list)
    mrn: str | None = None
    not_found: bool = False
    visit_numbers: list[str] = field(default_factory=list)


def _meta(model: str, event: str) -> dict[str, Any]:
    return {"Meta": {"DataModel": model, "EventType": event}}


def _dm_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _ask(
    ctx: DataModelPullContext,
    payload: dict[str, Any],
    entity: str,
    priority: str,
    event_type: str,
    only: frozenset[str],
) -> PulledPage:
    """Send one query (labelled with the entity it fetches) and land the answer with the
    context a replay needs: its event type and the entities this sync takes from it."""
    kw = with_priority(ctx.client, "datamodel_raw", priority)
    raw, body = ctx.client.datamodel_raw(payload, entity=entity, **kw)
    meta = payload["Meta"]
    ctx.counter.add(f"{meta['DataModel']}.{meta['EventType']}")
    context = page_context(
        ctx.entities, only=only, event_type=event_type, pulled_for=datamodel_query_patient(payload)
    )
    return land_page(ctx.landing, ctx.connection_id, "datamodel", entity, raw, context, body)


def _full(body: dict[str, Any], items: list[Any], page_size: int) -> bool:
    return len(items) >= page_size or bool((body.get("Meta") or {}).get("IsIncomplete"))


def _walk(
    ctx: DataModelPullContext,
    build: Callable[[datetime], dict[str, Any]],
    items_of: Callable[[dict[str, Any]], list[dict[str, Any]]],
    key_of: Callable[[dict[str, Any]], str],
    time_of: Callable[[dict[str, Any]], datetime | None],
    entity: str,
    priority: str,
    event_type: str,
    only: frozenset[str],
) -> list[PulledPage]:
    """A capped query continued by moving its window start to the last item's time."""
    out = []
    seen: set[str] = set()
    cursor = EARLIEST
    for _ in range(MAX_WALK):
        page = _ask(ctx, build(cursor), entity, priority, event_type, only)
        out.append(page)
        items = items_of(page.body)
        fresh = [i for i in items if key_of(i) not in seen]
        seen.update(key_of(i) for i in items)
        times = [t for t in (time_of(i) for i in items) if t is not None]
        if not _full(page.body, items, ctx.page_size) or not fresh or not times or max(times) <= cursor:
            break
        cursor = max(times)
    return out


def pull_patient(patient: DuePatient, ctx: DataModelPullContext) -> DataModelPatientResult:
    """Fetch and land one patient's Data Model records; raises on any failure. Every landed
    answer is in the result: its context says which rows the sync takes from it."""
    result = DataModelPatientResult()
    priority = patient.priority
    ident = {
        "ID": patient.mrn or patient.id_value,
        "IDType": "MR" if patient.mrn else datamodel_id_type(patient.id_system),
    }
    who = {"Identifiers": [ident]}
    found = _ask(
        ctx,
        {**_meta("PatientSearch", "Query"), "Patient": who},
        "patients",
        priority,
        "Response",
        frozenset({"patients"}),
    )
    result.pages.append(found)
    block = found.body.get("Patient") or {}
    if not block.get("Identifiers"):
        result.not_found = True
        return result
    for i in block.get("Identifiers") or []:
        if str(i.get("IDType", "")).upper() in ("MR", "MRN") and i.get("ID"):
            result.mrn = str(i["ID"])
            ident = {"ID": result.mrn, "IDType": "MR"}
            who = {"Identifiers": [ident]}
            break
    if "encounters" in ctx.entities or "documents" in ctx.entities:
        visits = _walk(
            ctx,
            lambda s: {
                **_meta("PatientAdmin", "VisitQuery"),
                "Patients": [who],
                "VisitStartDateTime": _dm_time(s),
            },
            lambda b: [v for p in b.get("Patients") or [] for v in p.get("Visits") or []],
            lambda v: str(v.get("VisitNumber")),
            lambda v: _parse(v.get("VisitDateTime")),
            "encounters",
            priority,
            "VisitQueryResponse",
            frozenset({"patients", "encounters"}),
        )
        for page in visits:
            result.visit_numbers.extend(
                str(v["VisitNumber"])
                for p in page.body.get("Patients") or []
                for v in p.get("Visits") or []
                if v.get("VisitNumber")
            )
        result.pages.extend(visits)
    if "results" in ctx.entities:
        result.pages.extend(
            _walk(
                ctx,
                lambda s: {
                    **_meta("Results", "Query"),
                    "Patients": [who],
                    "LastUpdated": {"StartDateTime": _dm_time(s)},
                },
                lambda b: b.get("Orders") or [],
                lambda o: f"{o.get('ID')}|{o.get('LastUpdated')}",
                lambda o: _parse(o.get("LastUpdated")),
                "results",
                priority,
                "QueryResponse",
                frozenset({"patients", "results", "diagnostic_reports"}),
            )
        )
    if "appointments" in ctx.entities:
        far = datetime.now(UTC) + FUTURE
        result.pages.extend(
            _walk(
                ctx,
                lambda s: {
                    **_meta("Scheduling", "Booked"),
                    "StartDateTime": _dm_time(s),
                    "EndDateTime": _dm_time(far),
                    "Visit": {"Patients": [who]},
                },
                lambda b: b.get("Visits") or [],
                lambda v: str(v.get("VisitNumber")),
                lambda v: _parse(v.get("VisitDateTime")),
                "appointments",
                priority,
                "BookedResponse",
                frozenset({"patients", "appointments"}),
            )
        )
    from_summary = SUMMARY_ENTITIES.intersection(ctx.entities)
    if from_summary:
        result.pages.append(
            _ask(
                ctx,
                {**_meta("Clinical Summary", "PatientQuery"), "Patient": who},
                # Labelled (and landed) under its first clinical-record entity, as before
                # encounters were also taken from it.
                min(from_summary - {"encounters"} or from_summary, key=ctx.entities.index),
                priority,
                "PatientQueryResponse",
                frozenset(from_summary),
            )
        )
    if "orders" in ctx.entities:
        result.pages.append(
            _ask(
                ctx,
                {**_meta("Order", "Query"), "Patients": [who]},
                "orders",
                priority,
                "QueryResponse",
                frozenset({"patients", "orders"}),
            )
        )
    if "documents" in ctx.entities:
        for model, key in (("Notes", "Notes"), ("Media", "Media")):
            result.pages.extend(_documents(ctx, model, key, who, result.visit_numbers, priority))
    return result


def _documents(
    ctx: DataModelPullContext,
    model: str,
    key: str,
    who: dict[str, Any],
    visit_numbers: list[str],
    priority: str,
) -> list[PulledPage]:
    """Notes or Media for the patient; a full answer is re-asked per visit number (the only
    narrowing these queries offer), in halves until each answer is under the cap."""
    base = {**_meta(model, "Query"), "Patients": [who]}
    only = frozenset({"documents"})
    first = _ask(ctx, base, "documents", priority, "QueryResponse", only)
    pages = [first]
    if len(first.body.get(key) or []) < ctx.page_size or not visit_numbers:
        return pages
    pending = [sorted(set(visit_numbers))]
    while pending:
        numbers = pending.pop()
        page = _ask(ctx, {**base, "VisitNumbers": numbers}, "documents", priority, "QueryResponse", only)
        pages.append(page)
        if len(page.body.get(key) or []) >= ctx.page_size and len(numbers) > 1:
            half = len(numbers) // 2
            pending.extend([numbers[:half], numbers[half:]])
    return pages
