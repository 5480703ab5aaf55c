"""The Data Model queries the sandbox answers, and how a client enumerates through them.

Supported (request -> response ``Meta.EventType``):

| DataModel / EventType           | entity       | response EventType     | window / order key          |
|---------------------------------|--------------|------------------------|-----------------------------|
| PatientSearch.Query             | patients     | Response               | (last_updated, id)          |
| PatientAdmin.VisitQuery         | encounters   | VisitQueryResponse     | VisitStartDateTime; start   |
| PatientAdmin.CensusQuery        | encounters   | CensusQueryResponse    | start                       |
| Results.Query                   | results      | QueryResponse          | LastUpdated; per order      |
| Order.Query (Beta)              | orders [1]   | QueryResponse          | Start/EndDateTime; order    |
| Scheduling.Booked               | appointments | BookedResponse         | Start/EndDateTime; start    |
| Scheduling.AvailableSlots (Beta)| appointments | AvailableSlotsResponse | Start/EndDateTime; slot     |
| Clinical Summary.PatientQuery   | documents    | PatientQueryResponse   | (per patient)               |
| Clinical Summary.DocumentQuery  | documents    | DocumentQueryResponse  | Document.Start/EndDate      |
| Clinical Summary.DocumentGet    | documents    | DocumentGetResponse    | (one document)              |
| Notes.Query / Media.Query       | documents    | QueryResponse          | (last_updated, id)          |

[1] the connection's inbound lab orders in every status (the records FHIR serves as
ServiceRequest; a connection without the ``orders`` entity lists the orders behind its results),
or the connection takes ``orders`` write-back: Order.Query also lists the orders written back to
the connection (latest state), so a client can check before re-sending one.

What a query must carry (``search_policy: "redox"``, the default; REDOX-REFERENCE §12.5): only
``Scheduling.Booked``, ``Scheduling.AvailableSlots`` (``StartDateTime``) and
``PatientAdmin.CensusQuery`` (nothing) answer without a patient. ``Results``, ``Order``,
``Notes`` and ``Media`` queries need ``Patients[].Identifiers``; ``PatientAdmin.VisitQuery``
needs ``VisitNumbers`` or ``Patients``; the Clinical Summary queries need
``Patient.Identifiers``; ``PatientSearch.Query`` identifiers or FirstName + LastName + DOB.
Otherwise: HTTP 400 with ``Meta.Errors`` naming the missing fields (never echoing values).
``search_policy: "open"`` lifts the patient requirement (benchmarks; not Redox).

Response event types: recorded Redox responses echo the request's EventType (``Query``,
``Booked``; REDOX-REFERENCE §2.3), but the schemas name them ``Response`` /
``BookedResponse`` / ``…QueryResponse``. The sandbox answers with the schema names so every
response validates strictly as its ``*Response`` model; clients must key on the request they
sent, not on ``Meta.EventType`` (which is what they must do against Redox anyway).

Capping and windows (the sandbox's own rules where Redox documents none; under the Redox
policy they apply within one patient's or one time range's answer):

- A response holds at most ``conn.page_size`` items (patients, visits, orders,
  appointments, documents, notes). Results.Query groups the matching results by order
  (``Orders[].Results[]``); an order's ``LastUpdated`` is the latest of its returned results
  and the cap counts orders. An order whose results changed at different times can show up
  in two windows with different results: merge by order id + result code. Items are taken in a deterministic order: by the query's
  window field, then the record id (visits and appointments by start time, documents by
  authored time, results / patients / notes by ``last_updated``).
- When more items matched than were returned, ``Meta.IsIncomplete`` is ``true`` in the
  models that have it (PatientSearch ``Response``, Scheduling ``BookedResponse``). The other
  response models have no such flag: there a response holding exactly ``page_size`` items
  means "maybe more".
- Window starts are inclusive and window ends exclusive (``start <= t < end``), so adjacent
  windows tile without overlap. A date-only end (``"2026-01-31"``) includes that whole day.
- To enumerate a window completely: repeat the query with the window start moved to the last
  returned item's order value (``VisitDateTime``, ``LastUpdated``, ``DateTime``…) and drop the
  items already seen by id; or split the window in two. Either terminates as long as fewer
  than ``page_size`` items share one timestamp.
- Record-level timestamps a client can checkpoint on: ``Orders[].LastUpdated`` (results) and
  ``Visits[].LastUpdated`` (appointments); visits and documents by their clinical time.
- The Data Model has no "list all patients" query: patients are discovered from the
  ``Patients[]`` of VisitQuery / Results / Booked responses and from PatientAdmin webhooks,
  and network connections are queried per patient by identifier (enterprise id ``EPI``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sandbox.config import ConnectionSpec
from sandbox.datamodel.blocks import (
    DOCUMENT_FILE_TYPES,
    PATIENT_CLASSES,
    RESULT_STATUSES,
    VISIT_STATUSES,
    base64_content,
    dm_datetime,
    identifiers,
    patient_block,
    provider_block,
    text_content,
)
from sandbox.datamodel.render import (
    appointment_info,
    appointment_visit,
    clinical_summary,
    document_summary,
    encounter_visit,
    file_name,
    lab_order,
    result_order,
)
from sandbox.population.records import (
    AppointmentRecord,
    DocumentRecord,
    EncounterRecord,
    MedicationRecord,
    PatientRecord,
    PatientRef,
    Record,
    ResultRecord,
)
from sandbox.population.store import Query, RecordStore

if TYPE_CHECKING:
    from sandbox.state import WriteLog

# Identifier types a client may send, mapped to the store's names; others match any type.
ID_TYPES = {"MR": "MR", "MRN": "MR", "EHRID": "EHRID", "NIST": "NIST", "EPI": "EPI"}
IN_HOUSE_STATUSES = ("arrived", "in-progress")


class QueryError(Exception):
    """A query the sandbox refuses; ``status`` is the HTTP status, the message is ``Errors[].Text``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass
class QueryContext:
    store: RecordStore
    conn: ConnectionSpec
    body: dict[str, Any]
    policy: str = "redox"  # SandboxConfig.search_policy: "redox" refuses what Redox refuses
    writes: WriteLog | None = None  # write-backs received, for Order.Query

    @property
    def limit(self) -> int:
        return max(1, int(self.conn.page_size))


@dataclass
class QueryAnswer:
    body: dict[str, Any]  # top-level keys of the response besides Meta
    incomplete: bool = False


# ---- request parsing ---------------------------------------------------------------------


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [
        str(v) for v in value if isinstance(v, str | int | float) and not isinstance(v, bool) and str(v) != ""
    ]


def parse_time(value: Any, field: str, *, end: bool = False) -> datetime | None:
    """An ISO-8601 datetime or date (UTC when no offset); a date-only ``end`` covers its day."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise QueryError(400, f"{field} must be an ISO-8601 date or datetime string")
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return midnight + timedelta(days=1) if end else midnight
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(400, f"{field} is not an ISO-8601 date or datetime") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _window(
    obj: dict[str, Any], start_key: str, end_key: str, where: str
) -> tuple[datetime | None, datetime | None]:
    start = parse_time(obj.get(start_key), f"{where}.{start_key}")
    stop = parse_time(obj.get(end_key), f"{where}.{end_key}", end=True)
    if start and stop and stop <= start:
        raise QueryError(400, f"{where}.{end_key} must be after {where}.{start_key}")
    return start, stop


def _identifier_list(value: Any) -> list[tuple[str, str | None]]:
    out = []
    for ident in value if isinstance(value, list) else []:
        if isinstance(ident, dict) and ident.get("ID") not in (None, ""):
            id_type = ident.get("IDType")
            out.append((str(ident["ID"]), ID_TYPES.get(str(id_type).upper()) if id_type else None))
    return out


def resolve_patients(ctx: QueryContext, idents: list[tuple[str, str | None]]) -> list[PatientRecord]:
    found: dict[str, PatientRecord] = {}
    for value, id_type in idents:
        for p in ctx.store.find_patients(ctx.conn.id, identifier=value, id_type=id_type):
            found.setdefault(p.id, p)
    return sorted(found.values(), key=lambda p: (p.last_updated, p.id))


def _patients_filter(ctx: QueryContext, patients: Any) -> list[str] | None:
    """Patient ids named by ``Patients[].Identifiers`` (None = no patient filter)."""
    if not isinstance(patients, list) or not patients:
        return None
    idents = [i for p in patients if isinstance(p, dict) for i in _identifier_list(p.get("Identifiers"))]
    if not idents:
        return None
    return [p.id for p in resolve_patients(ctx, idents)]


# Queries Redox answers from a time range alone (REDOX-REFERENCE §12.5); every other query
# needs a patient (or, for VisitQuery, visit) identifier under search_policy "redox".
UNSCOPED_QUERIES = "Scheduling.Booked, Scheduling.AvailableSlots and PatientAdmin.CensusQuery"


def _has_patient_identifier(patients: Any) -> bool:
    return isinstance(patients, list) and any(
        isinstance(p, dict) and _identifier_list(p.get("Identifiers")) for p in patients
    )


def require_scope(ctx: QueryContext, query: str, *alternatives: tuple[str, bool]) -> None:
    """Under the Redox policy, refuse a query that carries none of ``alternatives``
    (``(field name, present)``) with Redox's 400, naming the fields, never their values."""
    if ctx.policy != "redox" or any(present for _, present in alternatives):
        return
    needed = " or ".join(name for name, _ in alternatives)
    raise QueryError(
        400,
        f"Incomplete query criteria: {query} needs {needed}; only {UNSCOPED_QUERIES} "
        "accept a time range without a patient",
    )


def require_patients(ctx: QueryContext, query: str) -> None:
    present = _has_patient_identifier(ctx.body.get("Patients"))
    require_scope(ctx, query, ("Patients[].Identifiers[] (ID and IDType)", present))


def _label_filter(values: Any, labels: dict[str, str]) -> set[str] | None:
    """Canonical values matching client labels (either the Redox label or the canonical word)."""
    wanted = {v.lower() for v in _strings(values)}
    if not wanted:
        return None
    return {k for k, label in labels.items() if k.lower() in wanted or label.lower() in wanted}


# ---- selection ---------------------------------------------------------------------------


def matches(
    ctx: QueryContext,
    entity: str,
    patient_ids: list[str] | None,
    *,
    order: str = "last_updated",
    predicate: Callable[[Any], bool] = lambda r: True,
    **window: Any,
) -> Iterator[Any]:
    """Matching records in ``(order, id)`` order; streamed when the store's own order serves."""
    if patient_ids is not None and not patient_ids:
        return
    queries = [Query(ctx.conn.id, entity, patient_id=pid, **window) for pid in patient_ids or [None]]
    if order == "last_updated" and len(queries) == 1:
        # The store already orders by (last_updated, id).
        yield from (r for r in ctx.store.iter(queries[0], batch=max(ctx.limit + 1, 100)) if predicate(r))
        return
    if (
        len(queries) == 1
        and order == _CLINICAL_ORDER.get(entity)
        and not (window.get("date_gt") or window.get("date_le"))
    ):
        yield from _by_date_slices(ctx, queries[0], order, predicate)
        return
    seen: dict[str, Record] = {}
    for q in queries:
        for record in ctx.store.iter(q):
            if record.id not in seen and predicate(record):
                seen[record.id] = record
    yield from sorted(seen.values(), key=lambda r: (getattr(r, order), r.id))


# Orders that equal the store's clinical date, so date-window slices come out in order.
_CLINICAL_ORDER = {"encounters": "start_at", "appointments": "start_at", "documents": "authored_at"}
_EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)


def _by_date_slices(
    ctx: QueryContext, query: Query, order: str, predicate: Callable[[Any], bool]
) -> Iterator[Any]:
    """Records in ``(order, id)`` order without reading the whole window: walk it in
    disjoint date slices that double in width, sorting one slice at a time, so a capped
    page reads little more than it returns."""
    lo = query.date_ge or _EARLIEST
    hi = query.date_lt
    width = timedelta(days=1)
    while hi is None or lo < hi:
        remaining = dataclasses.replace(query, date_ge=lo)
        if ctx.store.count(remaining) == 0:
            return
        b = lo + width if hi is None else min(lo + width, hi)
        part = dataclasses.replace(query, date_ge=lo, date_lt=b)
        if ctx.store.count(part):
            chunk = [r for r in ctx.store.iter(part) if predicate(r)]
            yield from sorted(chunk, key=lambda r: (getattr(r, order), r.id))
        lo, width = b, width * 2


def collect(
    ctx: QueryContext,
    entity: str,
    patient_ids: list[str] | None,
    *,
    limit: int | None = None,
    **options: Any,
) -> tuple[list[Any], bool]:
    """Up to ``limit`` (default ``page_size``) matches, and whether more matched."""
    limit = ctx.limit if limit is None else limit
    picked = list(itertools.islice(matches(ctx, entity, patient_ids, **options), limit + 1))
    return picked[:limit], len(picked) > limit


class PatientCache:
    """Patient records by id for one response (responses repeat patients)."""

    def __init__(self, ctx: QueryContext) -> None:
        self._ctx = ctx
        self._cache: dict[str, PatientRecord | None] = {}

    def get(self, ref: PatientRef) -> PatientRecord | None:
        if ref.patient_id not in self._cache:
            found = self._ctx.store.get(self._ctx.conn.id, "patients", ref.patient_id)
            self._cache[ref.patient_id] = found if isinstance(found, PatientRecord) else None
        return self._cache[ref.patient_id]

    def block(self, ref: PatientRef) -> dict[str, Any]:
        return patient_block(self._ctx.conn, ref, self.get(ref))

    def identifiers(self, ref: PatientRef) -> dict[str, Any]:
        return {"Identifiers": self.block(ref)["Identifiers"]}


# ---- handlers ----------------------------------------------------------------------------


def patient_search(ctx: QueryContext) -> QueryAnswer:
    patient = _obj(ctx.body.get("Patient"))
    idents = _identifier_list(patient.get("Identifiers"))
    demo = _obj(patient.get("Demographics"))
    if idents:
        matches = resolve_patients(ctx, idents)
    elif all(isinstance(demo.get(k), str) and demo.get(k) for k in ("FirstName", "LastName", "DOB")):
        dob = demo["DOB"][:10]
        try:
            date.fromisoformat(dob)
        except ValueError:
            raise QueryError(400, "Patient.Demographics.DOB must be a date (YYYY-MM-DD)") from None
        matches = ctx.store.find_patients(
            ctx.conn.id, family=demo["LastName"], given=demo["FirstName"], birth_date=dob
        )
        matches = sorted(matches, key=lambda p: (p.last_updated, p.id))
    else:
        raise QueryError(
            400,
            "Incomplete search criteria: send Patient.Identifiers, or Patient.Demographics "
            "FirstName, LastName and DOB",
        )
    shown = matches[: ctx.limit]
    blocks = [patient_block(ctx.conn, patient=p) for p in shown]
    return QueryAnswer(
        {"Patient": blocks[0] if blocks else {}, "PotentialMatches": blocks[1:]},
        incomplete=len(matches) > len(shown),
    )


def _encounter_filters(ctx: QueryContext) -> Callable[[EncounterRecord], bool]:
    classes = _label_filter(ctx.body.get("PatientClasses"), PATIENT_CLASSES)
    facilities = {f.lower() for f in _strings(ctx.body.get("Facilities"))}
    departments = {d.lower() for d in _strings(ctx.body.get("Departments"))}

    def keep(e: EncounterRecord) -> bool:
        if classes is not None and e.class_code not in classes:
            return False
        if facilities and (e.location is None or e.location.facility.lower() not in facilities):
            return False
        return not departments or (e.location is not None and e.location.department.lower() in departments)

    return keep


def _visits_by_patient(ctx: QueryContext, encounters: Iterable[EncounterRecord]) -> list[dict[str, Any]]:
    cache = PatientCache(ctx)
    groups: dict[str, dict[str, Any]] = {}
    for e in encounters:
        group = groups.get(e.patient.patient_id)
        if group is None:
            group = groups[e.patient.patient_id] = {**cache.block(e.patient), "Visits": []}
        group["Visits"].append(encounter_visit(e))
    return list(groups.values())


def visit_query(ctx: QueryContext) -> QueryAnswer:
    numbers = set(_strings(ctx.body.get("VisitNumbers")))
    require_scope(
        ctx,
        "PatientAdmin.VisitQuery",
        ("VisitNumbers[]", bool(numbers)),
        ("Patients[].Identifiers[] (ID and IDType)", _has_patient_identifier(ctx.body.get("Patients"))),
    )
    patient_ids = _patients_filter(ctx, ctx.body.get("Patients"))
    statuses = _label_filter(ctx.body.get("VisitStatuses"), VISIT_STATUSES)
    start = parse_time(ctx.body.get("VisitStartDateTime"), "VisitStartDateTime")
    extra = _encounter_filters(ctx)

    def keep(e: EncounterRecord) -> bool:
        if numbers and e.visit_number not in numbers:
            return False
        if statuses is not None and e.status not in statuses:
            return False
        return extra(e)

    if numbers and patient_ids is None:
        found = [ctx.store.find_by_business_id(ctx.conn.id, "encounters", n) for n in sorted(numbers)]
        hits = sorted(
            (
                e
                for e in found
                if isinstance(e, EncounterRecord) and keep(e) and (start is None or e.start_at >= start)
            ),
            key=lambda e: (e.start_at, e.id),
        )
        picked, more = hits[: ctx.limit], len(hits) > ctx.limit
    else:
        picked, more = collect(
            ctx, "encounters", patient_ids, order="start_at", predicate=keep, date_ge=start
        )
    return QueryAnswer({"Patients": _visits_by_patient(ctx, picked)}, incomplete=more)


def census_query(ctx: QueryContext) -> QueryAnswer:
    extra = _encounter_filters(ctx)
    picked, more = collect(
        ctx,
        "encounters",
        None,
        order="start_at",
        predicate=lambda e: e.end_at is None and extra(e),
        statuses=IN_HOUSE_STATUSES,
    )
    return QueryAnswer({"Patients": _visits_by_patient(ctx, picked)}, incomplete=more)


def results_query(ctx: QueryContext) -> QueryAnswer:
    require_patients(ctx, "Results.Query")
    patient_ids = _patients_filter(ctx, ctx.body.get("Patients"))
    order_ids = set(_strings(ctx.body.get("OrderIDs")))
    statuses = _label_filter(ctx.body.get("ResultStatuses"), RESULT_STATUSES)
    procedures = {
        str(p.get("Code")) for p in ctx.body.get("Procedures") or [] if isinstance(p, dict) and p.get("Code")
    }
    groups = set(_strings(ctx.body.get("RelatedGroupIDs")))
    done_from, done_to = _window(
        _obj(ctx.body.get("Completion")), "StartDateTime", "EndDateTime", "Completion"
    )
    upd_from, upd_to = _window(
        _obj(ctx.body.get("LastUpdated")), "StartDateTime", "EndDateTime", "LastUpdated"
    )

    def keep(r: ResultRecord) -> bool:
        if order_ids and r.order_id not in order_ids:
            return False
        if procedures and r.panel.code not in procedures and r.code.code not in procedures:
            return False
        # Sandbox results belong to no related group, so a group filter matches nothing.
        return not groups

    # Results come grouped by order, and the cap counts orders: a panel's results share
    # their timestamps, so grouping keeps "move the window start" from stalling on ties.
    orders: dict[str, dict[str, Any]] = {}
    more = False
    cache = PatientCache(ctx)
    for r in matches(
        ctx,
        "results",
        patient_ids,
        predicate=keep,
        statuses=sorted(statuses) if statuses is not None else None,
        date_ge=done_from,
        date_lt=done_to,
        updated_ge=upd_from,
        updated_lt=upd_to,
    ):
        order = orders.get(r.order_id)
        if order is None:
            if len(orders) == ctx.limit:
                more = True
                break
            order = orders[r.order_id] = result_order(r)
            order["Patient"] = cache.identifiers(r.patient)
            order["Visit"] = {"VisitNumber": r.visit_number}
        else:
            order["Results"].extend(result_order(r)["Results"])
            order["LastUpdated"] = dm_datetime(r.last_updated)
    return QueryAnswer({"Orders": list(orders.values())}, incomplete=more)


def booked(ctx: QueryContext) -> QueryAnswer:
    if not ctx.body.get("StartDateTime"):
        raise QueryError(400, "Scheduling.Booked needs StartDateTime")
    start, stop = _window(ctx.body, "StartDateTime", "EndDateTime", "Booked")
    visit = _obj(ctx.body.get("Visit"))
    patient_ids = _patients_filter(ctx, visit.get("Patients"))
    number = visit.get("VisitNumber")
    providers = {
        str(p.get("ID")) for p in visit.get("AttendingProviders") or [] if isinstance(p, dict) and p.get("ID")
    }

    def keep(a: AppointmentRecord) -> bool:
        if number not in (None, "") and a.visit_number != str(number):
            return False
        return not providers or (a.provider is not None and a.provider.npi in providers)

    picked: list[AppointmentRecord] = []
    more = False
    if "appointments" in ctx.conn.entities:  # else the connection only writes appointments back
        picked, more = collect(
            ctx, "appointments", patient_ids, order="start_at", predicate=keep, date_ge=start, date_lt=stop
        )
    cache = PatientCache(ctx)
    visits = [
        {**appointment_visit(a), "AppointmentInfo": appointment_info(a), "Patient": cache.block(a.patient)}
        for a in picked
    ]
    known = {str(v.get("VisitNumber")) for v in visits}
    for visit_number, visit_block, written_patient, at in _written_appointments(ctx, patient_ids):
        if visit_number in known or (number not in (None, "") and visit_number != str(number)):
            continue
        if at is not None and (at < start or (stop is not None and at >= stop)):
            continue
        visits.append({**visit_block, "Patient": written_patient})
    return QueryAnswer({"Visits": visits}, incomplete=more)


def _written_appointments(
    ctx: QueryContext, patient_ids: list[str] | None
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], datetime | None]]:
    """(visit number, Visit block, Patient block, start) of appointments written back to this
    connection through the Data Model (latest Scheduling.New / Reschedule / Cancel per visit), so
    a client can find a write whose answer it never heard."""
    if ctx.writes is None:
        return
    latest: dict[str, tuple[str, dict[str, Any], str | None]] = {}
    for w in ctx.writes.to_json()["appointments"]:
        if w["connection_id"] == ctx.conn.id and w["surface"] == "datamodel":
            refused = (w["reason"] or "") if w["outcome"] == "rejected" else None
            latest[w["order_id"]] = (w["event"], w["payload"], refused)
    wanted = set(patient_ids) if patient_ids else None
    for visit_number, (event, payload, refused) in sorted(latest.items()):
        patient = _obj(payload.get("Patient"))
        idents = _identifier_list(patient.get("Identifiers"))
        if wanted is not None and (not idents or not {p.id for p in resolve_patients(ctx, idents)} & wanted):
            continue
        visit = dict(_obj(payload.get("Visit")))
        visit["VisitNumber"] = visit_number
        if event == "Scheduling-Cancel" or refused is not None:
            visit["Status"] = "Canceled"  # a refused write stays visible, in its refused state
        if refused:
            visit["CancelReason"] = refused
        try:
            at = parse_time(visit.get("VisitDateTime"), "Visit.VisitDateTime")
        except QueryError:
            at = None
        yield visit_number, visit, {"Identifiers": patient.get("Identifiers") or []}, at


def _one_patient(ctx: QueryContext, patient: Any) -> PatientRecord | None:
    idents = _identifier_list(_obj(patient).get("Identifiers"))
    if not idents:
        raise QueryError(400, "Patient.Identifiers (with ID and IDType) is required")
    matches = resolve_patients(ctx, idents)
    return matches[0] if matches else None


def clinical_patient_query(ctx: QueryContext, meta: dict[str, Any]) -> dict[str, Any]:
    patient = _one_patient(ctx, ctx.body.get("Patient"))
    if patient is None:
        raise QueryError(404, "No patient matches Patient.Identifiers at this destination")

    def latest(entity: str, order: str) -> list[Any]:
        if entity not in ctx.conn.entities:
            return []
        rows, _ = collect(ctx, entity, [patient.id], order=order, limit=10**9)
        return rows[-ctx.limit :]

    def section(entity: str, order: str) -> list[Any] | None:
        return latest(entity, order) if entity in ctx.conn.entities else None

    return clinical_summary(
        meta,
        ctx.conn,
        patient,
        now=ctx.store.now,
        encounters=latest("encounters", "start_at"),
        results=latest("results", "effective_at"),
        medications=[m for m in latest("medications", "last_updated") if isinstance(m, MedicationRecord)],
        problems=section("problems", "onset_at"),
        allergies=section("allergies", "recorded_at"),
        immunizations=section("immunizations", "occurred_at"),
        procedures=section("procedures", "performed_start"),
        orders=section("orders", "authored_at"),
    )


def document_query(ctx: QueryContext) -> QueryAnswer:
    patient = _one_patient(ctx, ctx.body.get("Patient"))
    document = _obj(ctx.body.get("Document"))
    start, stop = _window(document, "StartDate", "EndDate", "Document")
    types = {
        str(t.get(k)).lower()
        for t in document.get("Types") or []
        if isinstance(t, dict)
        for k in ("Code", "Name")
        if t.get(k)
    }
    visit_id = _obj(ctx.body.get("Visit")).get("ID")
    if patient is None:
        return QueryAnswer({"Documents": []})

    def keep(d: DocumentRecord) -> bool:
        if types and d.type.code.lower() not in types and d.type.display.lower() not in types:
            return False
        return visit_id in (None, "") or d.visit_number == str(visit_id)

    picked, more = collect(
        ctx, "documents", [patient.id], order="authored_at", predicate=keep, date_ge=start, date_lt=stop
    )
    return QueryAnswer(
        {
            "Patient": {"Identifiers": identifiers(patient, ctx.conn)},
            "Documents": [document_summary(d) for d in picked],
        },
        incomplete=more,
    )


def document_get(ctx: QueryContext) -> QueryAnswer:
    doc_id = _obj(ctx.body.get("Document")).get("ID")
    if doc_id in (None, ""):
        raise QueryError(400, "Document.ID is required")
    doc = ctx.store.find_by_business_id(ctx.conn.id, "documents", str(doc_id))
    if not isinstance(doc, DocumentRecord):
        raise QueryError(404, "No document with that Document.ID at this destination")
    return QueryAnswer(
        {
            "Document": {"ID": doc.document_id},
            "FileType": DOCUMENT_FILE_TYPES[doc.kind],
            "Data": base64_content(doc),
        }
    )


def _document_list_query(
    ctx: QueryContext, kind: str, query: str
) -> tuple[list[DocumentRecord], bool, PatientCache]:
    require_patients(ctx, query)
    patient_ids = _patients_filter(ctx, ctx.body.get("Patients"))
    numbers = set(_strings(ctx.body.get("VisitNumbers")))
    doc_ids = set(_strings(ctx.body.get("DocumentIDs")))
    types = {t.lower() for t in _strings(ctx.body.get("DocumentTypes"))}

    def keep(d: DocumentRecord) -> bool:
        if d.kind != kind:
            return False
        if numbers and d.visit_number not in numbers:
            return False
        if doc_ids and d.document_id not in doc_ids:
            return False
        return not types or d.type.display.lower() in types or d.type.code.lower() in types

    picked, more = collect(ctx, "documents", patient_ids, predicate=keep)
    return picked, more, PatientCache(ctx)


def notes_query(ctx: QueryContext) -> QueryAnswer:
    picked, more, cache = _document_list_query(ctx, "note", "Notes.Query")
    notes = [
        {
            "ContentType": "Plain Text",
            "DocumentID": d.document_id,
            "DocumentType": d.type.display,
            "DocumentationDateTime": dm_datetime(d.authored_at),
            "ServiceDateTime": dm_datetime(d.authored_at),
            "FileContents": text_content(d),
            "FileName": file_name(d),
            "FileType": DOCUMENT_FILE_TYPES[d.kind],
            "Patient": cache.identifiers(d.patient),
            "Visit": {"VisitNumber": d.visit_number},
        }
        for d in picked
    ]
    return QueryAnswer({"Notes": notes}, incomplete=more)


def media_query(ctx: QueryContext) -> QueryAnswer:
    picked, more, cache = _document_list_query(ctx, "cda", "Media.Query")
    media = [
        {
            "CreationDateTime": dm_datetime(d.authored_at),
            "ServiceDateTime": dm_datetime(d.authored_at),
            "DocumentDescription": d.title,
            "DocumentID": d.document_id,
            "DocumentType": d.type.display,
            "FileContents": base64_content(d),
            "FileName": file_name(d),
            "FileType": DOCUMENT_FILE_TYPES[d.kind],
            "Patient": cache.identifiers(d.patient),
            "Visit": {"VisitNumber": d.visit_number},
        }
        for d in picked
    ]
    return QueryAnswer({"Media": media}, incomplete=more)


# Open slots (Scheduling.AvailableSlots, Beta): the sandbox's clinic grid. Providers hold
# clinics where they have appointments within SESSION_LOOKAROUND of the window; each clinic
# day runs CLINIC_HOURS (UTC) on weekdays in SLOT_MINUTES slots; a slot is open unless one of
# the provider's appointments (not cancelled) overlaps it.
SLOT_MINUTES = 30
CLINIC_HOURS = (8, 17)
SESSION_LOOKAROUND = timedelta(days=28)
DEFAULT_SLOT_HORIZON = timedelta(days=7)  # window end when EndDateTime is absent
_CLOSED_APPOINTMENTS = ("cancelled", "noshow", "entered-in-error")


def available_slots(ctx: QueryContext) -> QueryAnswer:
    if not ctx.body.get("StartDateTime"):
        raise QueryError(400, "Scheduling.AvailableSlots needs StartDateTime")
    start, stop = _window(ctx.body, "StartDateTime", "EndDateTime", "AvailableSlots")
    assert start is not None
    stop = stop or start + DEFAULT_SLOT_HORIZON
    visit = _obj(ctx.body.get("Visit"))
    wanted_providers = {
        str(p.get("ID")) for p in visit.get("AttendingProviders") or [] if isinstance(p, dict) and p.get("ID")
    }
    wanted_places = {
        str(loc.get(k)).lower()
        for loc in visit.get("Locations") or []
        if isinstance(loc, dict)
        for k in ("Facility", "Department")
        if loc.get(k)
    }
    clinics: dict[str, tuple[Any, Any]] = {}  # npi -> (provider, location)
    busy: dict[str, list[tuple[datetime, datetime]]] = {}
    around = Query(
        ctx.conn.id, "appointments", date_ge=start - SESSION_LOOKAROUND, date_lt=stop + SESSION_LOOKAROUND
    )
    for a in ctx.store.iter(around):
        if not isinstance(a, AppointmentRecord) or a.provider is None or a.location is None:
            continue  # slots are offered by a known provider at a known place
        npi = a.provider.npi
        if wanted_providers and npi not in wanted_providers:
            continue
        place = {a.location.facility.lower(), a.location.department.lower()}
        if wanted_places and not place & wanted_places:
            continue
        clinics.setdefault(npi, (a.provider, a.location))
        if a.status not in _CLOSED_APPOINTMENTS:
            busy.setdefault(npi, []).append((a.start_at, a.start_at + timedelta(minutes=a.duration_minutes)))
    slots: list[dict[str, Any]] = []
    for t in _slot_times(start, stop):
        for npi in sorted(clinics):
            end = t + timedelta(minutes=SLOT_MINUTES)
            if any(b_start < end and t < b_end for b_start, b_end in busy.get(npi, ())):
                continue
            provider, location = clinics[npi]
            slots.append(
                {
                    "ID": f"{npi}-{t:%Y%m%d%H%M}",
                    "DateTime": dm_datetime(t),
                    "Duration": SLOT_MINUTES,
                    "Location": {
                        "Type": location.type,
                        "Facility": location.facility,
                        "Department": location.department,
                        "Room": location.room,
                    },
                    "Provider": provider_block(provider),
                    "Reason": None,
                    "Notes": [],
                }
            )
            if len(slots) > ctx.limit:
                return QueryAnswer({"AvailableSlots": slots[: ctx.limit]}, incomplete=True)
    return QueryAnswer({"AvailableSlots": slots})


def _slot_times(start: datetime, stop: datetime) -> Iterator[datetime]:
    """Slot start times in ``[start, stop)`` on weekday clinic hours, in order."""
    day = datetime(start.year, start.month, start.day, tzinfo=UTC)
    step = timedelta(minutes=SLOT_MINUTES)
    while day < stop:
        if day.weekday() < 5:
            t = day + timedelta(hours=CLINIC_HOURS[0])
            close = day + timedelta(hours=CLINIC_HOURS[1])
            while t + step <= close and t < stop:
                if t >= start:
                    yield t
                t += step
        day += timedelta(days=1)


def order_query(ctx: QueryContext) -> QueryAnswer:
    """Order.Query (Beta): the connection's lab orders (the orders behind its results) and
    the orders written back to it (``Order.New`` / ``Update`` / ``Cancel``, latest state),
    so a client can check for an order before re-sending it (REDOX-REFERENCE: idempotency)."""
    require_patients(ctx, "Order.Query")
    patient_ids = _patients_filter(ctx, ctx.body.get("Patients"))
    order_ids = set(_strings(ctx.body.get("OrderIDs")))
    numbers = set(_strings(ctx.body.get("VisitNumbers")))
    procedures = {
        str(p.get("Code")) for p in ctx.body.get("Procedures") or [] if isinstance(p, dict) and p.get("Code")
    }
    start, stop = _window(ctx.body, "StartDateTime", "EndDateTime", "Order")
    orders: dict[str, dict[str, Any]] = {}
    when: dict[str, datetime] = {}

    def wanted(order_id: str, visit_number: Any, code: Any, at: datetime | None) -> bool:
        if order_ids and order_id not in order_ids:
            return False
        if numbers and str(visit_number) not in numbers:
            return False
        if procedures and str(code) not in procedures:
            return False
        return at is None or ((start is None or at >= start) and (stop is None or at < stop))

    if "orders" in ctx.conn.entities:
        # The EHR's inbound lab orders, in every status (the same records as FHIR ServiceRequest).
        cache = PatientCache(ctx)
        for o in matches(ctx, "orders", patient_ids):
            if o.order_id in orders or not wanted(o.order_id, o.visit_number, o.code.code, o.authored_at):
                continue
            order = lab_order(o)
            order["Patient"] = cache.identifiers(o.patient)
            order["Visit"] = {"VisitNumber": o.visit_number}
            orders[o.order_id] = order
            when[o.order_id] = o.authored_at
    elif "results" in ctx.conn.entities:
        cache = PatientCache(ctx)
        for r in matches(ctx, "results", patient_ids):
            at = r.issued_at or r.effective_at
            if not r.has_order:  # an observation no order asked for is no order
                continue
            if r.order_id in orders or not wanted(r.order_id, r.visit_number, r.panel.code, at):
                continue
            order = result_order(r)
            order.pop("Results", None)
            order["Patient"] = cache.identifiers(r.patient)
            order["Visit"] = {"VisitNumber": r.visit_number}
            orders[r.order_id] = order
            when[r.order_id] = at
    for order_id, order, at in _written_orders(ctx, patient_ids):
        if order_id not in orders and wanted(
            order_id,
            _obj(order.get("Visit")).get("VisitNumber"),
            _obj(order.get("Procedure")).get("Code"),
            at,
        ):
            orders[order_id] = order
            when[order_id] = at or _EARLIEST
    ranked = sorted(orders, key=lambda oid: (when[oid], oid))
    shown = ranked[: ctx.limit]
    return QueryAnswer({"Orders": [orders[oid] for oid in shown]}, incomplete=len(ranked) > len(shown))


def _written_orders(
    ctx: QueryContext, patient_ids: list[str] | None
) -> Iterator[tuple[str, dict[str, Any], datetime | None]]:
    """(order id, Orders[] entry, transaction time) of orders written back to this connection."""
    if ctx.writes is None or not patient_ids:
        return
    wanted = set(patient_ids)
    latest: dict[str, tuple[str, dict[str, Any], str | None]] = {}
    for w in ctx.writes.to_json()["orders"]:
        if w["connection_id"] == ctx.conn.id:
            refused = (w["reason"] or "") if w["outcome"] == "rejected" else None
            latest[w["order_id"]] = (w["event"], w["payload"], refused)
    for order_id, (event, payload, refused) in sorted(latest.items()):
        idents = _identifier_list(_obj(payload.get("Patient")).get("Identifiers"))
        if not idents or not {p.id for p in resolve_patients(ctx, idents)} & wanted:
            continue
        order = dict(_obj(payload.get("Order")))
        order["ID"] = order_id
        order["Patient"] = {"Identifiers": _obj(payload.get("Patient")).get("Identifiers") or []}
        if "Visit" in payload:
            order["Visit"] = {"VisitNumber": _obj(payload.get("Visit")).get("VisitNumber")}
        if event == "Order-Cancel" or refused is not None:
            order["Status"] = "Canceled"  # a refused write stays visible, in its refused state
        if refused:
            order["Notes"] = [*(order.get("Notes") or []), refused]
        try:
            at = parse_time(order.get("TransactionDateTime"), "Order.TransactionDateTime")
        except QueryError:
            at = None
        yield order_id, order, at


@dataclass(frozen=True)
class QuerySpec:
    entity: str  # what the connection must expose (ConnectionSpec.entities)
    response_event: str
    answer: Callable[[QueryContext], QueryAnswer] | None  # None: Clinical Summary PatientQuery
    write_entity: str | None = None  # also allowed when the connection takes this write-back


QUERIES: dict[tuple[str, str], QuerySpec] = {
    ("PatientSearch", "Query"): QuerySpec("patients", "Response", patient_search),
    ("PatientAdmin", "VisitQuery"): QuerySpec("encounters", "VisitQueryResponse", visit_query),
    ("PatientAdmin", "CensusQuery"): QuerySpec("encounters", "CensusQueryResponse", census_query),
    ("Results", "Query"): QuerySpec("results", "QueryResponse", results_query),
    ("Scheduling", "Booked"): QuerySpec(
        "appointments", "BookedResponse", booked, write_entity="appointments"
    ),
    ("Scheduling", "AvailableSlots"): QuerySpec("appointments", "AvailableSlotsResponse", available_slots),
    ("Order", "Query"): QuerySpec("results", "QueryResponse", order_query, write_entity="orders"),
    ("Clinical Summary", "PatientQuery"): QuerySpec("documents", "PatientQueryResponse", None),
    ("Clinical Summary", "DocumentQuery"): QuerySpec("documents", "DocumentQueryResponse", document_query),
    ("Clinical Summary", "DocumentGet"): QuerySpec("documents", "DocumentGetResponse", document_get),
    ("Notes", "Query"): QuerySpec("documents", "QueryResponse", notes_query),
    ("Media", "Query"): QuerySpec("documents", "QueryResponse", media_query),
}
