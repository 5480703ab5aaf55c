"""Redox Data Model JSON (one payload) → common-model rows (pure functions, no I/O).

``normalize_datamodel(payload, connection_id, raw_ref)`` returns ``DataModelRows``: rows per
entity of ``pipelines.model`` (keys = ``staged_schema(entity)`` columns; patient rows add an
``identifiers`` map, document rows a ``content`` bytes key the loader stores
content-addressed and drops), the ``outcome`` and, for a non-clinical payload, the
``reason``. Values match the FHIR normalizer's (``pipelines.fhir.normalize``), so the same
record reads the same through either surface. The full column ← field mapping per entity
is in ``warehouse/README.md``.

What each payload becomes
-------------------------
- Any payload with a ``Patient`` block holding identifiers → a ``patients`` row
  (``patient_ref`` = the MR identifier, else the first identifier).
- PatientAdmin NewPatient / PatientUpdate → patient. PatientMerge → patient, with the
  retired identifiers in the extra key ``merged_identifiers``. Visit events → patient +
  encounter, status from the event: PreAdmit → planned; Registration, Arrival, Transfer,
  VisitUpdate → in-progress (the Data Model cannot tell FHIR ``arrived`` from
  ``in-progress``; a Transfer / VisitUpdate already carrying ``DischargeDateTime`` →
  finished, a VisitUpdate whose visit starts after the event → planned); Discharge →
  finished; Cancel → cancelled (whatever ``Meta.CanceledEvent`` names). VisitQueryResponse /
  CensusQueryResponse → patients + their visits (``Visit.Status``; census visits are
  in-progress). VisitMerge → patient only (skipped: the merged visit).
- Results New / NewUnsolicited / QueryResponse → patient + one result per
  ``Orders[].Results[]`` (systolic + diastolic of one time folded into one blood-pressure panel
  result with components), and a diagnostic report per laboratory order. Flowsheet New →
  patient + vital-sign results.
- Medications New / Update / Cancel → patient + a ``request``; Administration → patient +
  one ``administration`` per ``Administrations[]``.
- Scheduling (and SurgicalScheduling) New / Reschedule / Modification / Cancel / NoShow and
  BookedResponse ``Visits[]`` → patient + appointment.
- Notes / Media New / Replace / Delete / QueryResponse → patient + document.
- Clinical Summary PatientQueryResponse / PatientPush / VisitPush / VisitQueryResponse →
  patient (``Header.Patient``) + encounters (entries with a visit-number identifier, and a
  VisitPush's ``Header.Document.Visit``), results (``Results``; lab panels also as diagnostic
  reports), vital signs (``VitalSigns``), medication statements (``Medications``),
  administrations (``MedicationsAdministered``), problems (``Problems``, ``ResolvedProblems``),
  allergies, immunizations, procedures (``Procedures.*``) and orders (``PlanOfCare``; planned
  medications are medication requests with intent ``plan``). DocumentQueryResponse → documents
  (metadata); DocumentGetResponse → the document's content.
- Order New / Update / Cancel / GroupedOrders / QueryResponse → patient + orders.
- Vaccination New / Update / Cancel → patient + immunizations.
- PatientSearch Response → the matched patient (``PotentialMatches`` skipped: unconfirmed).
- Every other data model holding a patient → patient only; the rest of the payload is named
  in ``skipped``.

Version time: an event's rows take ``Meta.EventDateTime`` as ``source_updated_at``; a query
response's rows take the record's own last-updated or clinical time (the response time says
nothing about when the record changed). ``is_test`` stays null: ``Meta.Test`` marks the message.

Outcome ``not-clinical`` (no rows; ``reason`` says why):
- "a query request carries no records" — Query, PatientQuery, VisitQuery, DocumentQuery,
  DocumentGet, Booked, AvailableSlots, LocationQuery, CensusQuery, ProviderQuery … (a
  response that echoes its request's EventType, as Redox does, is recognised by its content).
- "the response reports a failed request (Meta.Errors)".
- "the response holds no records" — a query response with nothing in it (PatientSearch's
  ``"Patient": {}`` no-match included).
- "available slots are not appointments" — Scheduling AvailableSlotsResponse / PushSlots.
- "a scheduling block without a patient is not an appointment".
- "<DataModel> is not an entity of the common model" — a payload of another data model
  (Referral, Financial, Claim, Provider, Organization, Device …) with no patient identifiers.

``NormalizationError`` (message names the event and the field, never a value): a payload
that claims records but cannot give them an identity — no ``Meta.DataModel``, a Patient
without usable identifiers, an order / document / visit / appointment without its id, a
result without a code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pipelines.datamodel import normalize_clinical as clinical
from pipelines.datamodel import normalize_records as records
from pipelines.datamodel import normalize_summary as summary
from pipelines.datamodel.normalize_fields import as_dict, as_list, as_str, as_ts, visit_status
from pipelines.datamodel.normalize_patient import (
    EventContext,
    has_identifiers,
    identifier_map,
    patient_reference,
    patient_row,
)
from pipelines.model import ENTITY_KEY
from pipelines.normalize_common import NormalizationError, parse_ts
from pipelines.quarantine import ITEM_ID, ITEM_POSITION, QuarantineEntry
from pipelines.vocabulary import ENTITIES

ROWS = "rows"
NOT_CLINICAL = "not-clinical"

QUERY_REQUEST = "a query request carries no records"
FAILED_RESPONSE = "the response reports a failed request (Meta.Errors)"
EMPTY_RESPONSE = "the response holds no records"

# Query requests and the response each one is answered by (Redox echoes the request's
# EventType in some responses, REDOX-REFERENCE §8.3, so content decides which it is).
QUERY_RESPONSES = {
    "Query": "QueryResponse",
    "PatientQuery": "PatientQueryResponse",
    "VisitQuery": "VisitQueryResponse",
    "DocumentQuery": "DocumentQueryResponse",
    "DocumentGet": "DocumentGetResponse",
    "Booked": "BookedResponse",
    "AvailableSlots": "AvailableSlotsResponse",
    "LocationQuery": "LocationQueryResponse",
    "CensusQuery": "CensusQueryResponse",
    "ProviderQuery": "ProviderQueryResponse",
    "NormalizationQuery": "NormalizationQueryResponse",
}
# Top-level keys only a response carries.
RESPONSE_KEYS = (
    "Orders",
    "Notes",
    "Media",
    "Visits",
    "Header",
    "Documents",
    "Data",
    "PotentialMatches",
    "AvailableSlots",
)

# Answers to queries (their EventDateTime is the answer's time, not the records').
RESPONSE_EVENTS = frozenset({*QUERY_RESPONSES.values(), "Response"})

VISIT_EVENTS = frozenset(
    {"PreAdmit", "Registration", "Arrival", "Transfer", "Discharge", "VisitUpdate", "Cancel"}
)
VISIT_EVENT_STATUS = {
    "PreAdmit": "planned",
    "Registration": "in-progress",
    "Arrival": "in-progress",
    "Transfer": "in-progress",
    "VisitUpdate": "in-progress",
    "Discharge": "finished",
    "Cancel": "cancelled",
}
SCHEDULING_EVENTS = frozenset({"New", "Reschedule", "Modification", "Cancel", "NoShow"})
DOCUMENT_EVENTS = frozenset({"New", "Replace", "Delete"})
SUMMARY_EVENTS = frozenset({"PatientQueryResponse", "PatientPush", "VisitPush", "VisitQueryResponse"})
# Parts of a payload that hold records of no common-model entity, reported as skipped.
NON_MODEL_PARTS = {"Referral": ("Referral",)}


@dataclass(slots=True)
class DataModelRows:
    rows: dict[str, list[dict[str, Any]]]
    outcome: str  # "rows" | "not-clinical"
    reason: str | None = None  # why a payload is not-clinical
    event: str = ""  # "Results.New": the data model and event the payload was read as
    skipped: tuple[str, ...] = field(default_factory=tuple)  # payload parts with no common-model table
    quarantined: list[QuarantineEntry] = field(default_factory=list)  # records refused one by one

    def count(self) -> int:
        return sum(len(v) for v in self.rows.values())


class _Collector:
    """Rows of one payload, de-duplicated per entity key (the first occurrence wins: the
    top-level Patient block is the fullest one)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {entity: [] for entity in ENTITIES}
        self._seen: set[tuple[str, Any]] = set()
        self.skipped: list[str] = []
        self.quarantined: list[QuarantineEntry] = []

    def not_an_object(self, entity: str, where: str) -> None:
        """A list item that is not a JSON object (``1``, ``"x"``, ``null``): quarantined by position."""
        self.quarantined.append(
            QuarantineEntry(entity, where, f"{where} is not an object", item_kind=ITEM_POSITION)
        )

    def record(
        self,
        entity: str,
        item_id: str | None,
        where: str,
        ref: dict[str, str] | None,
        build: Callable[[], Any],
        times: Iterable[tuple[str, Any]] = (),
    ) -> Any:
        """Run ``build`` for one record of a list; a record it refuses (or one carrying a
        time that is not ISO-8601) is quarantined on its own and the rest of the payload goes
        on. Returns ``build``'s result, or None when the record was quarantined."""
        try:
            for name, value in times:
                if value not in (None, "") and _unparseable(value):
                    raise NormalizationError(f"{where}.{name} is not an ISO-8601 time")
            return build()
        except NormalizationError as exc:
            ref = ref or {}
            self.quarantined.append(
                QuarantineEntry(
                    entity,
                    item_id or where,
                    str(exc),
                    ref.get("patient_ref_type"),
                    ref.get("patient_ref_value"),
                    ITEM_ID if item_id else ITEM_POSITION,
                )
            )
            return None

    def add(self, entity: str, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            if entity == "patients":
                key: Any = (row["patient_ref_type"], row["patient_ref_value"])
            else:
                key = row[ENTITY_KEY[entity]]
            if (entity, key) not in self._seen:
                self._seen.add((entity, key))
                self.rows[entity].append(row)

    def patient(self, block: Any, ctx: EventContext) -> dict[str, str]:
        """Add the block's patient row; return its patient reference (raises without ids)."""
        ref = patient_reference(block, ctx)
        self.add("patients", [patient_row(block, ctx)])
        return ref

    def skip(self, *parts: str) -> None:
        self.skipped.extend(p for p in parts if p not in self.skipped)


def _unparseable(value: Any) -> bool:
    try:
        parse_ts(as_str(value))
    except ValueError:
        return True
    return False


def _patient_ref_or_none(block: Any, ctx: EventContext) -> dict[str, str] | None:
    try:
        return patient_reference(block, ctx)
    except NormalizationError:
        return None


class _NotClinical(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _data_model(meta: dict[str, Any]) -> str:
    name = as_str(meta.get("DataModel"))
    if not name:
        raise NormalizationError("payload has no Meta.DataModel")
    return name.replace(" ", "")  # "Clinical Summary" → "ClinicalSummary", as the redox package does


def _is_response_content(payload: dict[str, Any]) -> bool:
    if any(key in payload for key in RESPONSE_KEYS):
        return True
    patients = as_list(payload.get("Patients"))
    return any(isinstance(p, dict) and ("Visits" in p or "Demographics" in p) for p in patients)


def _read_event(payload: dict[str, Any], meta: dict[str, Any], event_type: str | None) -> str:
    event = event_type or as_str(meta.get("EventType")) or ""
    if event in QUERY_RESPONSES:
        if event_type is None and _is_response_content(payload):
            return QUERY_RESPONSES[event]
        raise _NotClinical(QUERY_REQUEST)
    return event


def _require_patient(payload: dict[str, Any], fallback: Any) -> Any:
    block = payload.get("Patient")
    return block if has_identifiers(block) or fallback is None else fallback


# ---- per data model ----------------------------------------------------------------------


def _patient_admin(payload: dict[str, Any], event: str, ctx: EventContext, out: _Collector) -> None:
    if event in ("VisitQueryResponse", "CensusQueryResponse"):
        for position, entry in enumerate(as_list(payload.get("Patients"))):
            if not isinstance(entry, dict):
                out.not_an_object("patients", f"Patients[{position}]")
                continue
            if not has_identifiers(entry):
                _quarantine_unidentified(entry, f"Patients[{position}]", out)
                continue
            ref = out.record(
                "patients",
                None,
                f"Patients[{position}]",
                _patient_ref_or_none(entry, ctx),
                lambda entry=entry: out.patient(entry, ctx),
            )
            if ref is None:
                continue
            visits = as_list(entry.get("Visits")) or (
                [entry["Visit"]] if isinstance(entry.get("Visit"), dict) else []
            )
            for number, visit in enumerate(visits):
                if not isinstance(visit, dict):
                    out.not_an_object("encounters", f"Patients[{position}].Visits[{number}]")
                    continue
                default = "in-progress" if event == "CensusQueryResponse" else None
                status = visit_status(visit.get("Status")) or default
                row = out.record(
                    "encounters",
                    records.visit_number(visit),
                    f"Patients[{position}].Visits[{number}]",
                    ref,
                    lambda visit=visit, status=status, ref=ref: records.encounter_row(
                        visit, ctx, ref, status, where="Visits[]"
                    ),
                    times=(("VisitDateTime", visit.get("VisitDateTime")),),
                )
                if row is not None:
                    out.add("encounters", [row])
        return
    ref = out.patient(payload.get("Patient"), ctx)
    if event == "PatientMerge":
        previous = identifier_map({"Identifiers": as_dict(payload.get("Patient")).get("PreviousIdentifiers")})
        out.rows["patients"][0]["merged_identifiers"] = previous
    elif event == "VisitMerge":
        out.skip("Visit (visit merge)")
    elif event in VISIT_EVENTS:
        visit = as_dict(payload.get("Visit"))
        status = _visit_event_status(event, visit, ctx)
        diagnoses = as_dict(payload.get("Patient")).get("Diagnoses")
        out.add("encounters", [records.encounter_row(visit, ctx, ref, status, patient_diagnoses=diagnoses)])


def _quarantine_unidentified(entry: dict[str, Any], where: str, out: _Collector) -> None:
    """A visit-query patient without identifiers cannot be keyed: its visits are quarantined
    by their visit numbers (a later good copy resolves them), or the patient by position."""
    reason = f"{where} has no Identifiers"
    visits = [v for v in as_list(entry.get("Visits")) if isinstance(v, dict)]
    for number, visit in enumerate(visits):
        visit_id = records.visit_number(visit)
        out.quarantined.append(
            QuarantineEntry(
                "encounters",
                visit_id or f"{where}.Visits[{number}]",
                reason,
                item_kind=ITEM_ID if visit_id else ITEM_POSITION,
            )
        )
    if not visits:
        out.quarantined.append(QuarantineEntry("patients", where, reason, item_kind=ITEM_POSITION))


def _visit_event_status(event: str, visit: dict[str, Any], ctx: EventContext) -> str:
    status = VISIT_EVENT_STATUS[event]
    if event in ("Transfer", "VisitUpdate") and as_ts(visit.get("DischargeDateTime")):
        return "finished"
    if event == "VisitUpdate":
        start = as_ts(visit.get("VisitDateTime"))
        if start and ctx.event_time and start > ctx.event_time:
            return "planned"
    return status


def _results(payload: dict[str, Any], event: str, ctx: EventContext, out: _Collector, fallback: Any) -> None:
    top_patient = payload.get("Patient")
    top_ref = out.patient(_require_patient(payload, fallback), ctx) if event != "QueryResponse" else None
    for position, order in enumerate(as_list(payload.get("Orders"))):
        if not isinstance(order, dict):
            out.not_an_object("results", f"Orders[{position}]")
            continue
        where = f"Orders[{position}]"
        ref = top_ref
        if ref is None:
            block = order.get("Patient") if has_identifiers(order.get("Patient")) else top_patient
            block = block if has_identifiers(block) else fallback
            ref = out.record(
                "results", as_str(order.get("ID")), where, None, lambda b=block: out.patient(b, ctx)
            )
            if ref is None:
                continue
        visit = order.get("Visit") if records.visit_number(order.get("Visit")) else payload.get("Visit")
        rows = out.record(
            "results",
            as_str(order.get("ID")),
            where,
            ref,
            lambda order=order, position=position, ref=ref, visit=visit: records.order_result_rows(
                order,
                position,
                ctx,
                ref,
                records.visit_number(visit),
                application_id_fallback=event != "New",
            ),
            times=(("LastUpdated", order.get("LastUpdated")),),
        )
        if rows is not None:
            out.add("results", rows)
            if rows:
                report = records.order_report_row(
                    order, ctx, ref, records.visit_number(visit), rows[0]["order_id"], rows
                )
                if report is not None:
                    out.add("diagnostic_reports", [report])


def _flowsheet(payload: dict[str, Any], ctx: EventContext, out: _Collector) -> None:
    ref = out.patient(payload.get("Patient"), ctx)
    encounter = records.visit_number(payload.get("Visit"))
    out.add("results", records.flowsheet_rows(payload.get("Observations"), ctx, ref, encounter))


def _medications(payload: dict[str, Any], event: str, ctx: EventContext, out: _Collector) -> None:
    ref = out.patient(payload.get("Patient"), ctx)
    encounter = records.visit_number(payload.get("Visit"))
    if event == "Administration":
        for position, item in enumerate(as_list(payload.get("Administrations"))):
            if isinstance(item, dict):
                out.add("medications", [records.administration_row(item, position, ctx, ref, encounter)])
    elif event in ("New", "Update", "Cancel"):
        order = as_dict(payload.get("Order"))
        out.add("medications", [records.medication_order_row(order, ctx, ref, encounter, event)])


def _scheduling(
    payload: dict[str, Any], event: str, ctx: EventContext, out: _Collector, fallback: Any
) -> None:
    if event in ("AvailableSlotsResponse", "PushSlots"):
        raise _NotClinical("available slots are not appointments")
    if event == "BookedResponse":
        for position, visit in enumerate(as_list(payload.get("Visits"))):
            if not isinstance(visit, dict):
                out.not_an_object("appointments", f"Visits[{position}]")
                continue
            where = f"Visits[{position}]"
            number = records.visit_number(visit)
            block = visit.get("Patient") if has_identifiers(visit.get("Patient")) else fallback
            ref = out.record("appointments", number, where, None, lambda b=block: out.patient(b, ctx))
            if ref is None:
                continue
            row = out.record(
                "appointments",
                number,
                where,
                ref,
                lambda visit=visit, ref=ref: records.appointment_row(
                    visit, visit.get("AppointmentInfo"), ctx, ref, None
                ),
                times=(("VisitDateTime", visit.get("VisitDateTime")),),
            )
            if row is not None:
                out.add("appointments", [row])
        return
    patient = as_dict(payload.get("Patient"))
    if not identifier_map(patient) and not patient.get("Demographics"):
        raise _NotClinical("a scheduling block without a patient is not an appointment")
    ref = out.patient(patient, ctx)
    if event in SCHEDULING_EVENTS:
        visit = as_dict(payload.get("Visit"))
        out.add(
            "appointments", [records.appointment_row(visit, payload.get("AppointmentInfo"), ctx, ref, event)]
        )


def _documents(payload: dict[str, Any], model: str, event: str, ctx: EventContext, out: _Collector) -> None:
    block_key, list_key = ("Note", "Notes") if model == "Notes" else ("Media", "Media")
    if event == "QueryResponse":
        for position, entry in enumerate(as_list(payload.get(list_key))):
            if not isinstance(entry, dict):
                out.not_an_object("documents", f"{list_key}[{position}]")
                continue
            where = f"{list_key}[{position}]"
            doc_id = as_str(entry.get("DocumentID") or entry.get("ID"))
            block = entry.get("Patient") or payload.get("Patient")
            ref = out.record("documents", doc_id, where, None, lambda b=block: out.patient(b, ctx))
            if ref is None:
                continue
            encounter = records.visit_number(entry.get("Visit"))
            row = out.record(
                "documents",
                doc_id,
                where,
                ref,
                lambda entry=entry, ref=ref, encounter=encounter, where=where: records.document_row(
                    entry, ctx, ref, encounter, None, what=where
                ),
            )
            if row is not None:
                out.add("documents", [row])
        return
    ref = out.patient(payload.get("Patient"), ctx)
    if event in DOCUMENT_EVENTS:
        block = as_dict(payload.get(block_key))
        encounter = records.visit_number(payload.get("Visit"))
        out.add("documents", [records.document_row(block, ctx, ref, encounter, event, what=block_key)])


def _clinical_summary(
    payload: dict[str, Any], event: str, ctx: EventContext, out: _Collector, fallback: Any
) -> None:
    if event == "DocumentQueryResponse":
        ref = out.patient(_require_patient(payload, fallback), ctx)
        for position, entry in enumerate(as_list(payload.get("Documents"))):
            if not isinstance(entry, dict):
                out.not_an_object("documents", f"Documents[{position}]")
                continue
            row = out.record(
                "documents",
                as_str(entry.get("ID")),
                f"Documents[{position}]",
                ref,
                lambda entry=entry, position=position: records.summary_document_row(
                    entry, ctx, ref, position
                ),
            )
            if row is not None:
                out.add("documents", [row])
        return
    if event == "DocumentGetResponse":
        ref = out.patient(_require_patient(payload, fallback), ctx)
        out.add("documents", [records.document_get_row(payload, ctx, ref)])
        return
    if event not in SUMMARY_EVENTS:
        if has_identifiers(payload.get("Patient")):
            out.patient(payload.get("Patient"), ctx)
            out.skip(f"Clinical Summary {event}")
            return
        raise _NotClinical(f"Clinical Summary {event} is not an entity of the common model")
    header = as_dict(payload.get("Header"))
    block = (
        header.get("Patient")
        if has_identifiers(header.get("Patient"))
        else _require_patient(payload, fallback)
    )
    ref = out.patient(block, ctx)
    visit_row = summary.header_visit_row(as_dict(header.get("Document")).get("Visit"), ctx, ref)
    if visit_row is not None:
        out.add("encounters", [visit_row])
    out.add("encounters", summary.encounter_rows(payload.get("Encounters"), ctx, ref))
    out.add("results", summary.result_rows(payload.get("Results"), ctx, ref))
    out.add("results", summary.vital_sign_rows(payload.get("VitalSigns"), ctx, ref))
    out.add("medications", summary.medication_rows(payload.get("Medications"), ctx, ref, kind="statement"))
    out.add(
        "medications",
        summary.medication_rows(payload.get("MedicationsAdministered"), ctx, ref, kind="administration"),
    )
    out.add("diagnostic_reports", clinical.summary_report_rows(payload.get("Results"), ctx, ref))
    out.add("problems", clinical.problem_rows(payload.get("Problems"), ctx, ref))
    out.add("problems", clinical.problem_rows(payload.get("ResolvedProblems"), ctx, ref))
    out.add("allergies", clinical.allergy_rows(payload.get("Allergies"), ctx, ref))
    out.add("immunizations", clinical.immunization_rows(payload.get("Immunizations"), ctx, ref))
    out.add("procedures", clinical.procedure_rows(payload.get("Procedures"), ctx, ref))
    out.add("orders", clinical.plan_of_care_rows(payload.get("PlanOfCare"), ctx, ref))
    planned = as_dict(payload.get("PlanOfCare")).get("MedicationAdministration")
    out.add("medications", summary.medication_rows(planned, ctx, ref, kind="request", intent="plan"))
    out.skip(*summary.skipped_sections(payload))


ORDER_EVENTS = frozenset({"New", "Update", "Cancel", "GroupedOrders"})


def _order(payload: dict[str, Any], event: str, ctx: EventContext, out: _Collector, fallback: Any) -> None:
    """The Order data model: New / Update / Cancel carry one ``Order``, GroupedOrders and a
    QueryResponse ``Orders[]`` (each may name its own patient)."""
    if event not in ORDER_EVENTS and event != "QueryResponse":
        raise _NotClinical(f"Order {event} is not an entity of the common model")
    top = payload.get("Patient") if has_identifiers(payload.get("Patient")) else fallback
    orders = as_list(payload.get("Orders")) if "Orders" in payload else [payload.get("Order")]
    top_ref = out.patient(top, ctx) if has_identifiers(top) else None
    for position, order in enumerate(orders):
        where = f"Orders[{position}]" if "Orders" in payload else "Order"
        if not isinstance(order, dict):
            out.not_an_object("orders", where)
            continue
        ref = top_ref
        if has_identifiers(order.get("Patient")):
            ref = out.record(
                "orders", as_str(order.get("ID")), where, None, lambda o=order: out.patient(o["Patient"], ctx)
            )
        if ref is None:
            out.quarantined.append(
                QuarantineEntry(
                    "orders",
                    as_str(order.get("ID")) or where,
                    f"{where} names no patient",
                    item_kind=ITEM_ID if as_str(order.get("ID")) else ITEM_POSITION,
                )
            )
            continue
        visit = order.get("Visit") if records.visit_number(order.get("Visit")) else payload.get("Visit")
        row = out.record(
            "orders",
            as_str(order.get("ID")),
            where,
            ref,
            lambda order=order, ref=ref, visit=visit: clinical.order_row(
                order, ctx, ref, records.visit_number(visit), event
            ),
        )
        if row is not None:
            out.add("orders", [row])


def _vaccination(
    payload: dict[str, Any], event: str, ctx: EventContext, out: _Collector, fallback: Any
) -> None:
    """Vaccination New / Update (and a PatientQueryResponse) ``Vaccinations[]`` → immunizations."""
    block = _require_patient(payload, fallback)
    if not has_identifiers(block):
        raise _NotClinical("Vaccination is not an entity of the common model")
    ref = out.patient(block, ctx)
    rows = clinical.vaccination_rows(
        payload.get("Vaccinations"), ctx, ref, records.visit_number(payload.get("Visit"))
    )
    if event == "Cancel":
        for row in rows:
            row.update(status="entered-in-error", status_source="Cancel")
    out.add("immunizations", rows)


def _patient_search(payload: dict[str, Any], event: str, ctx: EventContext, out: _Collector) -> None:
    if event != "Response":
        raise _NotClinical(f"PatientSearch {event} is not an entity of the common model")
    if not has_identifiers(payload.get("Patient")):
        raise _NotClinical(EMPTY_RESPONSE)
    out.patient(payload.get("Patient"), ctx)
    if as_list(payload.get("PotentialMatches")):
        out.skip("PotentialMatches")


def _other(payload: dict[str, Any], model: str, event: str, ctx: EventContext, out: _Collector) -> None:
    """A data model with no common-model entity: its patient, when it names one."""
    patient = payload.get("Patient")
    if not has_identifiers(patient):
        raise _NotClinical(f"{model} is not an entity of the common model")
    out.patient(patient, ctx)
    parts = [p for p in NON_MODEL_PARTS.get(model, ()) if payload.get(p) or as_dict(patient).get(p)]
    if as_list(payload.get("PotentialMatches")):
        parts.append("PotentialMatches")
    out.skip(*(parts or [f"{model}.{event}"]))


# ---- entry point -------------------------------------------------------------------------


def normalize_datamodel(
    payload: dict[str, Any],
    connection_id: str,
    raw_ref: str | None = None,
    *,
    event_type: str | None = None,
    patient: dict[str, Any] | None = None,
) -> DataModelRows:
    """Normalize one Data Model payload (see the module docstring for every outcome).

    ``event_type`` overrides ``Meta.EventType`` — pass the response type when the caller
    knows it (it sent the query). ``patient`` is the ``Patient`` block of the query a
    response answers, for responses that carry none (DocumentGetResponse)."""
    if not isinstance(payload, dict):
        raise NormalizationError("payload is not a JSON object")
    meta = as_dict(payload.get("Meta"))
    model = _data_model(meta)
    out = _Collector()
    label = f"{model}.{event_type or as_str(meta.get('EventType')) or '?'}"
    try:
        event = _read_event(payload, meta, event_type)
        label = f"{model}.{event}"
        if as_list(meta.get("Errors")):
            raise _NotClinical(FAILED_RESPONSE)
        ctx = EventContext(
            connection_id=connection_id,
            raw_ref=raw_ref,
            label=label,
            event_time=as_ts(meta.get("EventDateTime")),
            is_test=meta.get("Test") is True,
            from_query=event in RESPONSE_EVENTS,
        )
        handlers: dict[str, Callable[[], None]] = {
            "PatientAdmin": lambda: _patient_admin(payload, event, ctx, out),
            "Results": lambda: _results(payload, event, ctx, out, patient),
            "Flowsheet": lambda: _flowsheet(payload, ctx, out),
            "Medications": lambda: _medications(payload, event, ctx, out),
            "Scheduling": lambda: _scheduling(payload, event, ctx, out, patient),
            "SurgicalScheduling": lambda: _scheduling(payload, event, ctx, out, patient),
            "Notes": lambda: _documents(payload, "Notes", event, ctx, out),
            "Media": lambda: _documents(payload, "Media", event, ctx, out),
            "ClinicalSummary": lambda: _clinical_summary(payload, event, ctx, out, patient),
            "PatientSearch": lambda: _patient_search(payload, event, ctx, out),
            "Order": lambda: _order(payload, event, ctx, out, patient),
            "Vaccination": lambda: _vaccination(payload, event, ctx, out, patient),
        }
        handlers.get(model, lambda: _other(payload, model, event, ctx, out))()
    except _NotClinical as outcome:
        return DataModelRows(
            rows={entity: [] for entity in ENTITIES}, outcome=NOT_CLINICAL, reason=outcome.reason, event=label
        )
    if not any(out.rows.values()):
        reason = "every record was quarantined" if out.quarantined else EMPTY_RESPONSE
        return DataModelRows(
            rows=out.rows, outcome=NOT_CLINICAL, reason=reason, event=label, quarantined=out.quarantined
        )
    return DataModelRows(
        rows=out.rows, outcome=ROWS, event=label, skipped=tuple(out.skipped), quarantined=out.quarantined
    )
