"""Canonical records -> Redox Data Model JSON (pure functions).

Events (what the webhook sender pushes for the population's ``Change``s):

- patients: ``PatientAdmin.NewPatient`` (new), ``PatientUpdate`` (update, deactivation).
- encounters: ``PreAdmit`` (new, planned), ``Arrival`` (new/started inpatient, emergency,
  observation), ``Registration`` (new/started outpatient, virtual, home health), ``Transfer``
  (other inpatient update), ``VisitUpdate`` (other outpatient update), ``Discharge`` (``end_at``
  newly set; a new encounter that is already finished gives Arrival/Registration + Discharge),
  ``Cancel`` with ``Meta.CanceledEvent`` (cancelled / entered-in-error).
- results: ``Results.New``, one ``Orders[]`` entry holding this result; ``Orders[].ResultsStatus``
  and ``Results[].Status`` carry preliminary / final / corrected / canceled.
- medications: ``Medications.New`` / ``Update`` / ``Cancel`` (the Medications schema has no
  status field: the event type is the status signal; Clinical Summary carries ``Status``).
- appointments: ``Scheduling.New``, ``Reschedule`` (new record with ``rescheduled_from`` ->
  ``Visit.OldVisitNumber``), ``Modification``, ``Cancel`` (``Visit.CancelReason``), ``NoShow``.
- documents: text notes -> ``Notes.New`` / ``Replace`` / ``Delete``; C-CDA XML ->
  ``Media.New`` / ``Replace`` / ``Delete`` with base64 ``FileContents``.

``EventDateTime`` is the record's ``last_updated`` (the Data Model cursor of the common
model). Every payload is projected onto its event's ``redox`` schema (``conform``) and keeps
the deprecated numeric ``Meta.Message`` / ``Meta.Transmission`` ids real traffic carries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

from sandbox.config import ConnectionSpec
from sandbox.datamodel.blocks import (
    ABNORMAL_FLAGS,
    ALLERGY_TYPES,
    APPOINTMENT_STATUSES,
    CLINICAL_STATUS_CODES,
    CODE_SYSTEM_OIDS,
    CRITICALITY_CODES,
    DOCUMENT_FILE_TYPES,
    DOCUMENT_STATUSES,
    IMMUNIZATION_STATUSES,
    MEDICATION_STATUSES,
    ORDER_PRIORITIES,
    ORDER_RESULTS_STATUSES,
    ORDER_STATUSES,
    PATIENT_CLASSES,
    PROCEDURE_STATUSES,
    RESULT_STATUSES,
    SEVERITY_CODES,
    SEXES,
    VISIT_STATUSES,
    base64_content,
    code_description,
    code_system,
    codeset,
    derived_id,
    diagnosis,
    dm_date,
    dm_datetime,
    empty_address,
    event_meta,
    file_name,
    identifiers,
    location_block,
    number,
    number_text,
    patient_block,
    provider_block,
    text_content,
)
from sandbox.datamodel.conform import conform
from sandbox.population.records import (
    LOINC,
    PULL_ONLY_ENTITIES,
    SNOMED,
    AllergyRecord,
    AppointmentRecord,
    Change,
    Coding,
    DocumentRecord,
    EncounterRecord,
    ImmunizationRecord,
    MedicationRecord,
    OrderRecord,
    PatientRecord,
    ProblemRecord,
    ProcedureRecord,
    ResultRecord,
)
from sandbox.population.store import RecordStore

_R = TypeVar("_R")
INPATIENT_CLASSES = frozenset({"IMP", "EMER", "OBSENC"})
SUMMARY_TYPE = Coding(LOINC, "34133-9", "Summarization of Episode Note")
PROBLEM_CATEGORY = Coding(SNOMED, "55607006", "Problem")

# ---- record blocks -----------------------------------------------------------------------


def visit_reference(visit_number: str | None) -> dict[str, Any] | None:
    """The ``Visit`` of a result / medication / document: only its number is known."""
    if visit_number is None:
        return None
    return {
        "VisitNumber": visit_number,
        "VisitDateTime": None,
        "AccountNumber": None,
        "PatientClass": None,
        "Location": location_block(None),
    }


def encounter_visit(enc: EncounterRecord) -> dict[str, Any]:
    inpatient = enc.class_code in INPATIENT_CLASSES
    return {
        "VisitNumber": enc.visit_number,
        "AccountNumber": enc.account_number,
        "PatientClass": PATIENT_CLASSES[enc.class_code],
        "VisitDateTime": dm_datetime(enc.start_at),
        "Status": VISIT_STATUSES[enc.status],
        "Duration": None,
        "Reason": enc.reason.display if enc.reason else None,
        "Instructions": [],
        "Balance": None,
        "DiagnosisRelatedGroup": None,
        "DiagnosisRelatedGroupType": None,
        "AttendingProvider": provider_block(enc.attending),
        "ConsultingProvider": provider_block(None),
        "ReferringProvider": provider_block(None),
        "AdmittingProvider": provider_block(enc.attending if inpatient else None),
        "AdditionalStaff": [],
        "Location": location_block(enc.location),
        "Diagnoses": [diagnosis(enc.reason, enc.start_at)] if enc.reason else [],
        "Insurances": [],
        "DischargeDateTime": dm_datetime(enc.end_at),
        "DischargeStatus": code_description(enc.discharge_disposition),
        "DischargeLocation": location_block(None),
        "PreviousLocation": location_block(None),
    }


def result_entries(r: ResultRecord) -> list[dict[str, Any]]:
    """The ``Results[]`` entries of one result: one, or one per component of a component-only
    Observation (a blood pressure panel's systolic and diastolic values), each carrying the
    panel's result id in ``RelatedGroupID`` so a receiver can fold them back together."""
    if not r.components:
        return [result_entry(r)]
    out = []
    for c in r.components:
        part = replace(
            r,
            code=c.code,
            value_type="Numeric" if c.value_numeric is not None else "String",
            value_numeric=c.value_numeric,
            value_text=c.value_text,
            unit=c.unit,
            reference_low=c.reference_low,
            reference_high=c.reference_high,
            reference_text=None,
            abnormal_flag=c.abnormal_flag,  # type: ignore[arg-type]
            components=(),
        )
        out.append(result_entry(part, related_group=r.result_id))
    return out


def result_entry(r: ResultRecord, related_group: str | None = None) -> dict[str, Any]:
    value = r.value_text if r.value_text is not None else number_text(r.value_numeric)
    return {
        "Code": r.code.code,
        "Codeset": codeset(r.code),
        "Description": r.code.display,
        "RelatedGroupID": related_group,
        "Specimen": {"Source": None, "BodySite": None, "ID": None},
        "Value": value if value is not None else "",
        "ValueType": r.value_type,
        "CompletionDateTime": dm_datetime(r.issued_at),
        "FileType": None,
        "Units": r.unit,
        "Notes": [],
        "AbnormalFlag": ABNORMAL_FLAGS.get(r.abnormal_flag) if r.abnormal_flag else None,
        "Status": RESULT_STATUSES[r.status],
        "PrimaryResultsInterpreter": provider_block(None),
        "Producer": {"ID": None, "Name": r.producer, "IDType": None, "Address": empty_address()},
        "Performer": provider_block(r.performer),
        "ReferenceRange": {
            "Low": number(r.reference_low),
            "High": number(r.reference_high),
            "Text": r.reference_text,
        },
        "ObservationMethod": {"Code": None, "Codeset": None, "Description": None},
    }


def result_order(r: ResultRecord) -> dict[str, Any]:
    """One ``Orders[]`` entry holding this result (its order id, panel and status). A result
    no order asked for (``ResultRecord.has_order``) still needs an order to travel in — Redox
    requires ``Orders[].ID`` — but it names no ``Procedure``: the sandbox invents no order
    panel, so a receiver sees the observations and no lab report."""
    dead = r.status in ("cancelled", "entered-in-error")
    return {
        "ID": r.order_id,
        "ApplicationOrderID": None,
        "TransactionDateTime": dm_datetime(r.issued_at or r.effective_at),
        "CollectionDateTime": dm_datetime(r.effective_at),
        "CompletionDateTime": dm_datetime(r.issued_at),
        "LastUpdated": dm_datetime(r.last_updated),
        "Notes": [],
        "ResultsStatus": ORDER_RESULTS_STATUSES[r.status],
        "Procedure": code_description(r.panel if r.has_order else None),
        "Provider": provider_block(None),
        "ResultCopyProviders": [],
        "Status": "Canceled" if dead else "Resulted",
        "ResponseFlag": "Associated Segments",
        "Priority": None,
        "Results": result_entries(r),
    }


def medication_order(m: MedicationRecord) -> dict[str, Any]:
    route = code_system(m.route)
    return {
        "ID": m.order_id,
        "Notes": [],
        "Medication": {
            "Dose": {"Quantity": number(m.dose_quantity), "Units": m.dose_unit},
            "Rate": {"Quantity": None, "Units": None},
            "Route": route,
            "Product": code_system(m.code),
            "FreeTextSig": None,
            "StartDate": dm_datetime(m.start_at),
            "EndDate": dm_datetime(m.end_at),
            "Frequency": {"Period": number(m.frequency_period), "Unit": m.frequency_unit},
            "IsPRN": None,
            "Dispense": {"Amount": None, "Units": None},
            "NumberOfRefillsRemaining": None,
        },
        "Indications": [],
        "Provider": provider_block(m.prescriber),
        "EnteredBy": provider_block(None),
        "VerifiedBy": provider_block(None),
        "Priority": None,
    }


def appointment_info(a: AppointmentRecord) -> list[dict[str, Any]]:
    """The appointment type keeps its code here (``Visit.Type`` is free text)."""
    info = [{**code_description(a.type), "Value": a.type.code}] if a.type else []
    if a.rescheduled_from:
        info.append(
            {
                "Code": "OldVisitNumber",
                "Codeset": None,
                "Description": "Rescheduled from",
                "Value": a.rescheduled_from,
            }
        )
    return info


def appointment_visit(a: AppointmentRecord) -> dict[str, Any]:
    return {
        "VisitNumber": a.visit_number,
        "AccountNumber": None,
        "VisitDateTime": dm_datetime(a.start_at),
        "Duration": a.duration_minutes,
        "Status": APPOINTMENT_STATUSES[a.status],
        "Reason": a.reason,
        "Type": a.type.display if a.type else None,
        "PatientClass": "Outpatient",
        "Instructions": [],
        "AttendingProvider": provider_block(a.provider),
        "VisitProvider": provider_block(a.provider),
        "ConsultingProvider": provider_block(None),
        "ReferringProvider": provider_block(None),
        "AdditionalStaff": [],
        "Equipment": [],
        "Diagnoses": [],
        "Location": {
            "Type": a.location.type if a.location else None,
            "Facility": a.location.facility if a.location else None,
            "Department": a.location.department if a.location else None,
            "Room": a.location.room if a.location else None,
        },
        "CancelReason": a.cancel_reason,
        "NoShowReason": None,
        "OldVisitNumber": a.rescheduled_from,
        "OldDateTime": None,
        "LastUpdated": dm_datetime(a.last_updated),
    }


def note_block(d: DocumentRecord) -> dict[str, Any]:
    return {
        "ContentType": "Plain Text",
        "FileContents": text_content(d),
        "FileName": file_name(d),
        "FileType": DOCUMENT_FILE_TYPES[d.kind],
        "DocumentType": d.type.display,
        "DocumentID": d.document_id,
        # Replace events name the document they supersede; a new version keeps its id.
        "OriginalDocumentID": d.document_id,
        "DocumentDescription": d.title,
        "ServiceDateTime": dm_datetime(d.authored_at),
        "DocumentationDateTime": dm_datetime(d.authored_at),
        "Provider": provider_block(d.author),
        "Status": DOCUMENT_STATUSES[d.status],
        "Availability": "Unavailable" if d.status == "entered-in-error" else "Available",
        "Authenticator": provider_block(None),
        "Notifications": [],
        "Components": [],
    }


def media_block(d: DocumentRecord) -> dict[str, Any]:
    return {
        "FileType": DOCUMENT_FILE_TYPES[d.kind],
        "FileName": file_name(d),
        "FileContents": base64_content(d),
        "DocumentType": d.type.display,
        "DocumentID": d.document_id,
        "OriginalDocumentID": d.document_id,
        "DocumentDescription": d.title,
        "CreationDateTime": dm_datetime(d.authored_at),
        "ServiceDateTime": dm_datetime(d.authored_at),
        "Provider": provider_block(d.author),
        "Availability": "Unavailable" if d.status == "entered-in-error" else "Available",
        "Authenticated": None,
        "Authenticator": provider_block(None),
        "Notifications": [],
        "DirectAddressFrom": None,
        "DirectAddressTo": None,
    }


def document_summary(d: DocumentRecord) -> dict[str, Any]:
    """One ``Documents[]`` entry of a Clinical Summary DocumentQueryResponse."""
    return {
        "ID": d.document_id,
        "Title": d.title,
        "DateTime": dm_datetime(d.authored_at),
        "FileType": DOCUMENT_FILE_TYPES[d.kind],
        "Type": {"Code": d.type.code, "Codeset": codeset(d.type), "Name": d.type.display},
        "Author": {**provider_block(d.author), "Type": None},
        "Location": {"Type": None, "Facility": None, "Department": None, "Room": None},
        "Visit": {"ID": d.visit_number, "StartDateTime": None, "EndDateTime": None},
        "Locale": "US",
        "EntryType": None,
        "EntryStatus": DOCUMENT_STATUSES[d.status],
    }


# ---- events ------------------------------------------------------------------------------


def _record(change: Change, kind: type[_R]) -> _R:
    """The change's record, checked against the type its entity promises."""
    if not isinstance(change.record, kind):
        raise TypeError(f"render_event: a '{change.entity}' change carries a {type(change.record).__name__}")
    return change.record


def _event(data_model: str, event_type: str, conn: ConnectionSpec, event_time: datetime, **body: Any) -> dict:
    payload: dict[str, Any] = {"Meta": event_meta(data_model, event_type, conn, event_time)}
    payload.update({k: v for k, v in body.items() if v is not None})
    return conform(payload)


def _patient_events(change: Change, conn: ConnectionSpec) -> list[dict]:
    p = _record(change, PatientRecord)
    event = "NewPatient" if change.kind == "new" else "PatientUpdate"
    return [_event("PatientAdmin", event, conn, p.last_updated, Patient=patient_block(conn, patient=p))]


def _start_event(enc: EncounterRecord) -> str:
    if enc.status == "planned":
        return "PreAdmit"
    return "Arrival" if enc.class_code in INPATIENT_CLASSES else "Registration"


def _encounter_events(change: Change, conn: ConnectionSpec, patient: PatientRecord | None) -> list[dict]:
    enc = _record(change, EncounterRecord)
    block = patient_block(conn, enc.patient, patient)
    if enc.reason is not None:
        # PatientAdmin carries diagnoses on the patient (REDOX-REFERENCE §2.10 examples).
        block["Diagnoses"] = [diagnosis(enc.reason, enc.start_at)]
    visit = encounter_visit(enc)

    def one(event: str, **meta: Any) -> dict:
        payload = _event("PatientAdmin", event, conn, enc.last_updated, Patient=block, Visit=visit)
        payload["Meta"].update(meta)
        return payload

    if change.kind == "cancel":
        previous = change.previous_status or "arrived"
        canceled = "PreAdmit" if previous == "planned" else _start_event(enc)
        if previous == "finished":
            canceled = "Discharge"
        return [one("Cancel", CanceledEvent=canceled)]
    discharged = enc.end_at is not None and enc.status == "finished"
    if change.kind == "new":
        events = [one(_start_event(enc))]
        if discharged:
            events.append(one("Discharge"))
        return events
    if discharged and change.previous_status != "finished":
        return [one("Discharge")]
    if change.previous_status == "planned" and enc.status in ("arrived", "in-progress"):
        return [one(_start_event(enc))]
    return [one("Transfer" if enc.class_code in INPATIENT_CLASSES else "VisitUpdate")]


def _result_events(change: Change, conn: ConnectionSpec, patient: PatientRecord | None) -> list[dict]:
    r = _record(change, ResultRecord)
    order = result_order(r)
    return [
        _event(
            "Results",
            "New",
            conn,
            r.last_updated,
            Patient=patient_block(conn, r.patient, patient),
            Orders=[order],
            Visit=visit_reference(r.visit_number),
        )
    ]


def _medication_events(change: Change, conn: ConnectionSpec, patient: PatientRecord | None) -> list[dict]:
    m = _record(change, MedicationRecord)
    event = {"new": "New", "update": "Update", "cancel": "Cancel"}[change.kind]
    return [
        _event(
            "Medications",
            event,
            conn,
            m.last_updated,
            Patient=patient_block(conn, m.patient, patient),
            Visit=visit_reference(m.visit_number),
            Order=medication_order(m),
        )
    ]


def _appointment_event_type(change: Change) -> str:
    a = _record(change, AppointmentRecord)
    if change.kind == "cancel" or a.status in ("cancelled", "entered-in-error"):
        return "Cancel"
    if a.status == "noshow":
        return "NoShow"
    if change.kind == "new":
        return "Reschedule" if a.rescheduled_from else "New"
    return "Modification"


def _appointment_events(change: Change, conn: ConnectionSpec, patient: PatientRecord | None) -> list[dict]:
    a = _record(change, AppointmentRecord)
    return [
        _event(
            "Scheduling",
            _appointment_event_type(change),
            conn,
            a.last_updated,
            Patient=patient_block(conn, a.patient, patient),
            AppointmentInfo=appointment_info(a),
            Visit=appointment_visit(a),
        )
    ]


def _document_events(change: Change, conn: ConnectionSpec, patient: PatientRecord | None) -> list[dict]:
    d = _record(change, DocumentRecord)
    event = {"new": "New", "update": "Replace", "cancel": "Delete"}[change.kind]
    common = {
        "Patient": patient_block(conn, d.patient, patient),
        "Visit": visit_reference(d.visit_number),
        "Orders": [],
    }
    if d.kind == "note":
        return [_event("Notes", event, conn, d.last_updated, Note=note_block(d), **common)]
    return [_event("Media", event, conn, d.last_updated, Media=media_block(d), **common)]


def lab_order(o: OrderRecord) -> dict[str, Any]:
    """The ``Order`` of an inbound lab order (``Order.New`` / ``Update`` / ``Cancel``, and each
    ``Orders[]`` entry of ``Order.QueryResponse``)."""
    return {
        "ID": o.order_id,
        "ApplicationOrderID": None,
        "TransactionDateTime": dm_datetime(o.authored_at),
        "CollectionDateTime": dm_datetime(o.occurrence_at),
        "Status": ORDER_STATUSES[o.status],
        "Priority": ORDER_PRIORITIES.get(o.priority) if o.priority else None,
        "Expiration": None,
        "Comments": None,
        "Notes": [],
        "Procedure": code_description(o.code),
        "Provider": provider_block(o.requester),
        "OrderingFacility": {"Name": None, "Address": empty_address(), "PhoneNumber": None},
        "ResultCopyProviders": [],
        "Specimen": {"Source": None, "BodySite": None, "ID": None},
        "Diagnoses": [diagnosis(o.reason, o.authored_at)] if o.reason else [],
        "ClinicalInfo": [],
    }


def _order_events(change: Change, conn: ConnectionSpec, patient: PatientRecord | None) -> list[dict]:
    o = _record(change, OrderRecord)
    event = {"new": "New", "update": "Update", "cancel": "Cancel"}[change.kind]
    if change.kind != "cancel" and o.status in ("revoked", "entered-in-error"):
        event = "Cancel"
    return [
        _event(
            "Order",
            event,
            conn,
            o.last_updated,
            Patient=patient_block(conn, o.patient, patient),
            Visit=visit_reference(o.visit_number),
            Order=lab_order(o),
        )
    ]


def render_event(change: Change, conn: ConnectionSpec, patient: PatientRecord | None = None) -> list[dict]:
    """The Data Model event(s) Redox would push for one population change.

    A list because one change can be two events (a new, already finished encounter is an
    Arrival then a Discharge); empty when the connection does not speak the Data Model.
    ``patient`` (the change's patient record) adds demographics and every identifier;
    without it the Patient block carries the MR only. ``event_renderer`` supplies it.
    """
    if "datamodel" not in conn.surfaces:
        return []
    if change.entity == "patients":
        return _patient_events(change, conn)
    if change.entity in PULL_ONLY_ENTITIES:
        return []
    handlers: dict[str, Callable[[Change, ConnectionSpec, PatientRecord | None], list[dict]]] = {
        "encounters": _encounter_events,
        "results": _result_events,
        "medications": _medication_events,
        "appointments": _appointment_events,
        "documents": _document_events,
        "orders": _order_events,
    }
    handler = handlers.get(change.entity)
    if handler is None:
        raise ValueError(f"render_event: unknown entity '{change.entity}'")
    return handler(change, conn, patient)


def event_renderer(store: RecordStore) -> Callable[[Change, ConnectionSpec], list[dict]]:
    """``render_event`` with each change's patient looked up in ``store`` (full Patient blocks)."""

    def render(change: Change, conn: ConnectionSpec) -> list[dict]:
        patient = None
        ref = getattr(change.record, "patient", None)
        if ref is not None:
            found = store.get(conn.id, "patients", ref.patient_id)
            patient = found if isinstance(found, PatientRecord) else None
        return render_event(change, conn, patient)

    return render


# ---- Clinical Summary --------------------------------------------------------------------


def _cs_patient(patient: PatientRecord, conn: ConnectionSpec) -> dict[str, Any]:
    given = list(patient.given_names)
    return {
        "Identifiers": [{**i, "Type": None} for i in identifiers(patient, conn)],
        "Demographics": {
            "FirstName": given[0] if given else None,
            "MiddleName": " ".join(given[1:]) or None,
            "LastName": patient.family_name,
            "DOB": dm_date(patient.birth_date),
            "SSN": patient.ssn,
            "Sex": SEXES.get(patient.sex, "Unknown"),
            "Address": {
                "StreetAddress": patient.address_line,
                "City": patient.city,
                "State": patient.state,
                "County": patient.county,
                "Country": "US",
                "ZIP": patient.postal_code,
            },
            "PhoneNumber": {"Home": patient.phone_home, "Mobile": patient.phone_mobile},
            "EmailAddresses": [{"Address": patient.email}] if patient.email else [],
            "Language": patient.language,
            "Race": patient.race,
            "Ethnicity": patient.ethnicity,
            "Religion": None,
            "MaritalStatus": patient.marital_status,
            "IsDeceased": patient.deceased_at is not None,
            "DeathDateTime": dm_datetime(patient.deceased_at),
        },
    }


def _cs_encounter(enc: EncounterRecord) -> dict[str, Any]:
    reasons = [code_system(enc.reason)] if enc.reason else []
    return {
        "Identifiers": [{"ID": enc.visit_number, "IDType": "VisitNumber"}],
        "Type": code_system(enc.type),
        "DateTime": dm_datetime(enc.start_at),
        "EndDateTime": dm_datetime(enc.end_at),
        "Status": VISIT_STATUSES[enc.status],
        "Providers": [{**provider_block(enc.attending), "Role": code_system(None)}],
        "Locations": [
            {
                "Address": empty_address(),
                "Type": code_system(None),
                "Name": enc.location.facility,
                "Identifiers": [],
            }
        ]
        if enc.location
        else [],
        "Diagnosis": reasons,
        "ReasonForVisit": reasons,
        **(
            {"DischargeDisposition": code_system(enc.discharge_disposition)}
            if enc.discharge_disposition
            else {}
        ),
    }


def _cs_medication(m: MedicationRecord) -> dict[str, Any]:
    return {
        "Prescription": m.kind == "request",
        "FreeTextSig": None,
        "Dose": {"Quantity": number_text(m.dose_quantity), "Units": m.dose_unit},
        "Rate": {"Quantity": None, "Units": None},
        "Route": code_system(m.route),
        "StartDate": dm_datetime(m.start_at),
        "EndDate": dm_datetime(m.end_at),
        "Frequency": {"Period": number_text(m.frequency_period), "Unit": m.frequency_unit},
        "IsPRN": None,
        "Product": code_system(m.code),
        "Status": MEDICATION_STATUSES[m.status],
    }


def _cs_observations(r: ResultRecord) -> list[dict[str, Any]]:
    """One Clinical Summary observation, or one per component of a component-only result
    (same DateTime and status; the panel's code is not repeated)."""
    if not r.components:
        return [_cs_observation(r)]
    return [
        _cs_observation(
            replace(
                r,
                code=c.code,
                value_type="Numeric" if c.value_numeric is not None else "String",
                value_numeric=c.value_numeric,
                value_text=c.value_text,
                unit=c.unit,
                reference_low=c.reference_low,
                reference_high=c.reference_high,
                reference_text=None,
                abnormal_flag=c.abnormal_flag,  # type: ignore[arg-type]
                components=(),
            )
        )
        for c in r.components
    ]


def _cs_observation(r: ResultRecord) -> dict[str, Any]:
    value = r.value_text if r.value_text is not None else number_text(r.value_numeric)
    return {
        **code_system(r.code),
        "Status": RESULT_STATUSES[r.status],
        "Interpretation": ABNORMAL_FLAGS.get(r.abnormal_flag) if r.abnormal_flag else None,
        "DateTime": dm_datetime(r.effective_at),
        "CodedValue": code_system(r.value_code),
        "Value": value,
        "ValueType": "PhysicalQuantity" if r.value_type == "Numeric" else r.value_type,
        "Units": r.unit,
        "ReferenceRange": {
            "Low": number_text(r.reference_low),
            "High": number_text(r.reference_high),
            "Text": r.reference_text,
        },
    }


def _cs_results(results: Iterable[ResultRecord]) -> list[dict[str, Any]]:
    """Laboratory results grouped by order: one panel entry with its observations."""
    orders: dict[str, dict[str, Any]] = {}
    for r in results:
        entry = orders.get(r.order_id)
        if entry is None:
            entry = orders[r.order_id] = {
                **code_system(r.panel),
                "Status": RESULT_STATUSES[r.status],
                "Producer": {"ID": None, "Name": r.producer, "IDType": None, "Address": empty_address()},
                "Observations": [],
            }
        entry["Observations"].extend(_cs_observations(r))
    return list(orders.values())


def _cs_vital_signs(results: Iterable[ResultRecord]) -> list[dict[str, Any]]:
    """Vital signs grouped by measurement time."""
    groups: dict[str, dict[str, Any]] = {}
    for r in results:
        when = dm_datetime(r.effective_at) or ""
        group = groups.setdefault(when, {"DateTime": when, "Observations": []})
        for obs in _cs_observations(r):
            for key in ("CodedValue", "ValueType", "ReferenceRange"):
                obs.pop(key)
            group["Observations"].append(obs)
    return list(groups.values())


def _snomed_status(code: str | None, name: str) -> dict[str, Any]:
    return {
        "Code": code,
        "CodeSystem": CODE_SYSTEM_OIDS[SNOMED] if code else None,
        "CodeSystemName": "SNOMED CT" if code else None,
        "Name": name,
    }


def _cs_problem(p: ProblemRecord) -> dict[str, Any]:
    return {
        **code_system(p.code),
        "AltCodes": [code_system(p.alt_code)] if p.alt_code else [],
        "StartDate": dm_datetime(p.onset_at),
        "EndDate": dm_datetime(p.abated_at),
        "Category": code_system(PROBLEM_CATEGORY),
        "HealthStatus": code_system(None),
        "Status": _snomed_status(*CLINICAL_STATUS_CODES[p.status]),
        "Comment": None,
    }


def _cs_allergy(a: AllergyRecord) -> dict[str, Any]:
    type_code, type_name = ALLERGY_TYPES.get((a.category, a.kind), ("419199007", "Allergy to substance"))
    severity = _snomed_status(*SEVERITY_CODES[a.severity]) if a.severity else _snomed_status(None, None)  # type: ignore[arg-type]
    reactions = []
    if a.reaction:
        reactions.append({**code_system(a.reaction), "Severity": severity, "Text": None})
    criticality = {"Code": None, "CodeSystem": None, "CodeSystemName": None, "Name": None}
    if a.criticality:
        code, name = CRITICALITY_CODES[a.criticality]
        criticality = {
            "Code": code,
            "CodeSystem": "2.16.840.1.113883.5.1063",
            "CodeSystemName": "ObservationValue",
            "Name": name,
        }
    return {
        "Type": code_system(Coding(SNOMED, type_code, type_name)),
        "Substance": code_system(a.substance),
        "Reaction": reactions,
        "Severity": severity,
        "Criticality": criticality,
        "Status": _snomed_status(*CLINICAL_STATUS_CODES[a.status]),
        "StartDate": dm_datetime(a.onset_at),
        "EndDate": None,
        "Comment": None,
    }


def _cs_immunization(i: ImmunizationRecord) -> dict[str, Any]:
    return {
        "DateTime": dm_datetime(i.occurred_at),
        "Status": IMMUNIZATION_STATUSES[i.status],
        "Route": code_system(i.route),
        "Product": {**code_system(i.vaccine), "Manufacturer": i.manufacturer, "LotNumber": i.lot_number},
        "Dose": {"Quantity": number_text(i.dose_quantity), "Units": i.dose_unit},
        "ReasonNotGiven": i.status_reason.display if i.status_reason else None,
    }


def _cs_procedure(p: ProcedureRecord) -> dict[str, Any]:
    return {
        **code_system(p.code),
        "DateTime": dm_datetime(p.performed_start),
        "Status": PROCEDURE_STATUSES[p.status],
        "TargetSite": code_system(p.body_site),
    }


def _cs_plan_of_care(orders: Iterable[OrderRecord]) -> dict[str, Any]:
    """Planned care: the lab orders still open (active), with their collection time."""
    return {
        "Orders": [
            {**code_system(o.code), "Status": "Request", "DateTime": dm_datetime(o.occurrence_at)}
            for o in orders
            if o.status == "active"
        ],
        "Procedures": [],
        "Encounters": [],
        "MedicationAdministration": [],
        "Supplies": [],
        "Services": [],
    }


def _cs_problems(encounters: Iterable[EncounterRecord]) -> list[dict[str, Any]]:
    """Distinct encounter reasons (ICD-10) as the problem list, dated by first occurrence."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for enc in sorted(encounters, key=lambda e: (e.start_at, e.id)):
        if enc.reason is None or enc.status in ("cancelled", "entered-in-error"):
            continue
        key = (enc.reason.system, enc.reason.code)
        if key not in seen:
            seen[key] = {
                "StartDate": dm_datetime(enc.start_at),
                "EndDate": None,
                **code_system(enc.reason),
                "Category": code_system(Coding("http://snomed.info/sct", "55607006", "Problem")),
                "Status": {
                    "Code": "55561003",
                    "CodeSystem": "2.16.840.1.113883.6.96",
                    "CodeSystemName": "SNOMED CT",
                    "Name": "Active",
                },
                "Comment": None,
            }
    return list(seen.values())


def clinical_summary(
    meta: dict[str, Any],
    conn: ConnectionSpec,
    patient: PatientRecord,
    *,
    now: datetime,
    encounters: list[EncounterRecord],
    results: list[ResultRecord],
    medications: list[MedicationRecord],
    problems: list[ProblemRecord] | None = None,
    allergies: list[AllergyRecord] | None = None,
    immunizations: list[ImmunizationRecord] | None = None,
    procedures: list[ProcedureRecord] | None = None,
    orders: list[OrderRecord] | None = None,
) -> dict[str, Any]:
    """A ``Clinical Summary`` PatientQueryResponse (a CCD as JSON) for one patient.

    ``problems`` None (a population without a problem list) derives the problem list from the
    encounters' reasons, as before; a list (even empty) is the problem list."""
    labs = [r for r in results if r.category != "vital-signs"]
    vitals = [r for r in results if r.category == "vital-signs"]
    header = {
        "Document": {
            "Author": {**provider_block(None), "Type": None},
            "ID": derived_id("summary", conn.id, patient.id, dm_datetime(now) or ""),
            "Locale": "US",
            "Title": f"{conn.name}: Health Summary",
            "DateTime": dm_datetime(now),
            "Type": SUMMARY_TYPE.display,
            "TypeCode": code_system(SUMMARY_TYPE),
        },
        "Patient": _cs_patient(patient, conn),
    }
    payload: dict[str, Any] = {"Meta": meta, "Header": header}
    sections: dict[str, Any] = {
        "AllergyText": [_cs_allergy(a) for a in allergies or []],
        "EncountersText": [_cs_encounter(e) for e in encounters],
        "ImmunizationText": [_cs_immunization(i) for i in immunizations or []],
        "MedicationsText": [_cs_medication(m) for m in medications],
        "ProblemsText": _cs_problems(encounters) if problems is None else [_cs_problem(p) for p in problems],
        "ResultText": _cs_results(labs),
        "VitalSignsText": _cs_vital_signs(vitals),
        "ProceduresText": {
            "Procedures": [_cs_procedure(p) for p in procedures or []],
            "Observations": [],
            "Services": [],
        },
        "PlanOfCareText": _cs_plan_of_care(orders or []),
    }
    list_keys = {
        "AllergyText": "Allergies",
        "EncountersText": "Encounters",
        "ImmunizationText": "Immunizations",
        "MedicationsText": "Medications",
        "ProblemsText": "Problems",
        "ResultText": "Results",
        "VitalSignsText": "VitalSigns",
        "ProceduresText": "Procedures",
        "PlanOfCareText": "PlanOfCare",
    }
    for text_key, items in sections.items():
        payload[text_key] = None
        payload[list_keys[text_key]] = items
    return conform(payload)
