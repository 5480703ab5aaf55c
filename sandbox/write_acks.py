"""The EHR's answer to a write-back, pushed through the webhook feed the way Redox reports it.

Redox write-back is asynchronous (REDOX-REFERENCE "Decisions", §12.2): a 200 means received;
the EHR's outcome comes back later as an event / notification to the organization's
destinations. The sandbox decides the outcome when it records the write
(``WriteLog.record``: accepted, or refused under the ``write_reject_rate`` fault with a reason
from ``faults.WRITE_REJECT_REASONS``) and queues one message per write, in the connection's
push family (``sandbox.webhooks.push_families``):

Data Model events (``conform``-ed to the event's ``redox`` schema, strict-valid):

- orders: ``Order.Update`` carrying the written ``Order.ID`` with ``Status: "Scheduled"`` (the
  EHR took the order; Redox does not enumerate order statuses, the sandbox uses HL7 ORC-5's
  "scheduled"), or ``Order.Cancel`` with ``Status: "Canceled"`` and the EHR's reason as the last
  ``Order.Notes`` entry when refused (and for an accepted cancel).
- appointments: ``Scheduling.New`` (booked), ``Reschedule`` (moved) or ``Cancel`` (our cancel,
  or a refusal with ``Visit.CancelReason``) for the written ``Visit.VisitNumber``.

FHIR notifications (message Bundles, §3.5 / §12.3; ``detailed`` or ``lightweight`` per
``ConnectionSpec.webhook_detail``):

- orders: ``ServiceRequestUpdated`` with ``ServiceRequest.status`` ``active``, or
  ``ServiceRequestCancelled`` with ``revoked`` and the reason as a ``note``.
- appointments: ``SchedulingAppointmentBooked`` / ``Updated`` / ``Cancelled`` with
  ``Appointment.status`` ``booked`` / ``cancelled`` and the reason as ``cancelationReason``.

The focus resource carries the identifier the write carried (the client's order id / visit
number), so the client can match the outcome to what it sent. The event time is when the EHR
processed the write (wall clock): outcomes concern written objects only, never population records.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sandbox.config import ConnectionSpec
from sandbox.datamodel.blocks import dm_datetime, event_meta, patient_block
from sandbox.datamodel.conform import conform
from sandbox.fhir import identifiers as ids
from sandbox.fhir.render import instant
from sandbox.fhir.writeback import refused_status, written_resource
from sandbox.population.records import PatientRecord
from sandbox.state import REJECTED, WriteRecord
from sandbox.webhooks import push_families

if TYPE_CHECKING:
    from sandbox.state import SandboxState


EVENT_DEFINITION = "https://fhir.redoxengine.com/EventDefinition/"
MESSAGE_DEFINITION = "https://fhir.redoxengine.com/MessageDefinition/"
ACCEPTED_ORDER_STATUS = "Scheduled"
# Where the EHR books an appointment written through FHIR without a department (the Data Model
# requires Visit.Location.Department): the sandbox's stand-in for the EHR's default.
DEFAULT_DEPARTMENT = "Scheduling"
_NAMESPACE = uuid.UUID("8b1f7c2e-3d4a-4e5b-9c6d-7e8f9a0b1c2d")


def report_outcome(state: SandboxState, conn: ConnectionSpec, write: WriteRecord) -> int:
    """Queue the EHR's outcome of ``write`` for every registered destination; how many
    payloads were queued per destination (0 for a state without a webhook sender)."""
    if state.webhooks is None:
        return 0
    payloads = outcome_payloads(state, conn, write)
    return state.webhooks.enqueue_payloads([(conn.id, p) for p in payloads])


def outcome_payloads(state: SandboxState, conn: ConnectionSpec, write: WriteRecord) -> list[dict[str, Any]]:
    """The outcome message(s) of one recorded write, one per push family of the connection."""
    out: list[dict[str, Any]] = []
    for family in push_families(state.config, conn):
        render = _datamodel_outcome if family == "datamodel" else _fhir_outcome
        out.append(render(state, conn, write))
    return out


# ---- shared: what was written --------------------------------------------------------------


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _fhir_entries(write: WriteRecord) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for e in write.payload.get("entry") or []
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]


def _written_patient(state: SandboxState, conn: ConnectionSpec, write: WriteRecord) -> PatientRecord | None:
    """The EHR's patient the write named, by FHIR id or any identifier it carried."""
    store = state.store
    if write.surface == "datamodel":
        for ident in _obj(write.payload.get("Patient")).get("Identifiers") or []:
            ident = _obj(ident)
            if isinstance(ident.get("ID"), str) and isinstance(ident.get("IDType"), str):
                found = store.find_patients(conn.id, identifier=ident["ID"], id_type=ident["IDType"])
                if found:
                    return found[0]
        return None
    for resource in _fhir_entries(write):
        if resource.get("resourceType") != "Patient":
            continue
        if isinstance(resource.get("id"), str):
            record = store.get(conn.id, "patients", resource["id"])
            if isinstance(record, PatientRecord):
                return record
        for ident in resource.get("identifier") or []:
            ident = _obj(ident)
            id_type = ids.id_type_of_system(str(ident.get("system") or ""), conn.slug)
            if id_type and isinstance(ident.get("value"), str):
                found = store.find_patients(conn.id, identifier=ident["value"], id_type=id_type)
                if found:
                    return found[0]
    return None


def _written_identifiers(write: WriteRecord, conn: ConnectionSpec) -> list[dict[str, str]]:
    """Data Model identifiers as the write carried them (when the EHR does not know the patient)."""
    if write.surface == "datamodel":
        return [_obj(i) for i in _obj(write.payload.get("Patient")).get("Identifiers") or []]
    out = []
    for resource in _fhir_entries(write):
        if resource.get("resourceType") == "Patient":
            for ident in resource.get("identifier") or []:
                ident = _obj(ident)
                id_type = ids.id_type_of_system(str(ident.get("system") or ""), conn.slug)
                if id_type and isinstance(ident.get("value"), str):
                    out.append({"ID": ident["value"], "IDType": id_type})
    return out


def _latest_with(state: SandboxState, write: WriteRecord, key: str) -> Any:
    """The newest value of a Data Model ``Visit`` field over the writes of this appointment
    (a cancel names only the visit; the EHR still knows where and when it was)."""
    found = None
    for w in state.writes.history(write.connection_id, write.kind, write.order_id):
        value = _obj(w.payload.get("Visit")).get(key) if w.surface == "datamodel" else _fhir_visit(w).get(key)
        if value not in (None, "", {}):
            found = value
        if w is write:
            break
    return found


# ---- Data Model ----------------------------------------------------------------------------


def _fhir_order(write: WriteRecord) -> dict[str, Any]:
    """Data Model ``Order`` fields from a written ServiceRequest."""
    sr = next((r for r in _fhir_entries(write) if r.get("resourceType") == "ServiceRequest"), {})
    coding = _obj(next(iter(_obj(sr.get("code")).get("coding") or []), None))
    codesets = {"http://loinc.org": "LOINC", "http://snomed.info/sct": "SNOMED CT"}
    procedure = {
        "Code": coding.get("code"),
        "Codeset": codesets.get(str(coding.get("system")), coding.get("system")),
        "Description": coding.get("display"),
    }
    return {"TransactionDateTime": sr.get("authoredOn"), "Procedure": procedure}


def _fhir_visit(write: WriteRecord) -> dict[str, Any]:
    """Data Model ``Visit`` fields from a written Appointment."""
    appt = next((r for r in _fhir_entries(write) if r.get("resourceType") == "Appointment"), {})
    facility = next(
        (
            _obj(p.get("actor")).get("display")
            for p in appt.get("participant") or []
            if isinstance(_obj(p.get("actor")).get("display"), str)
        ),
        None,
    )
    visit: dict[str, Any] = {
        "VisitDateTime": appt.get("start"),
        "Duration": appt.get("minutesDuration"),
        "Reason": next((_obj(r).get("text") for r in appt.get("reasonCode") or []), None),
    }
    if facility:
        visit["Location"] = {"Facility": facility}
    return visit


def _dm_patient(state: SandboxState, conn: ConnectionSpec, write: WriteRecord) -> dict[str, Any]:
    patient = _written_patient(state, conn, write)
    if patient is not None:
        return patient_block(conn, patient=patient)
    return {"Identifiers": _written_identifiers(write, conn), "Notes": []}


def _datamodel_outcome(state: SandboxState, conn: ConnectionSpec, write: WriteRecord) -> dict[str, Any]:
    refused = write.outcome == REJECTED
    now = datetime.now(UTC)
    patient = _dm_patient(state, conn, write)
    if write.kind == "orders":
        written = _obj(write.payload.get("Order")) if write.surface == "datamodel" else _fhir_order(write)
        cancelled = refused or write.event == "Order-Cancel"
        order = {
            "ID": write.order_id,
            "TransactionDateTime": written.get("TransactionDateTime") or dm_datetime(now),
            "Status": "Canceled" if cancelled else ACCEPTED_ORDER_STATUS,
            "Procedure": written.get("Procedure"),
            "Priority": written.get("Priority"),
            "Provider": written.get("Provider"),
            "Notes": [write.reason] if refused and write.reason else [],
        }
        event = "Cancel" if cancelled else "Update"
        payload: dict[str, Any] = {
            "Meta": event_meta("Order", event, conn, now),
            "Patient": patient,
            "Order": {k: v for k, v in order.items() if v is not None},
        }
        return conform(payload)
    cancelled = refused or write.event == "Scheduling-Cancel"
    event = "Cancel" if cancelled else ("Reschedule" if write.event == "Scheduling-Reschedule" else "New")
    location = dict(_obj(_latest_with(state, write, "Location")))
    location.setdefault("Department", location.get("Facility") or DEFAULT_DEPARTMENT)
    visit: dict[str, Any] = {
        "VisitNumber": write.order_id,
        "VisitDateTime": _latest_with(state, write, "VisitDateTime"),
        "Duration": _latest_with(state, write, "Duration") or 30,
        "Location": location,
        "Reason": _latest_with(state, write, "Reason"),
        "Status": "Canceled" if cancelled else "Scheduled",
    }
    if refused and write.reason:
        visit["CancelReason"] = write.reason
    payload = {
        "Meta": event_meta("Scheduling", event, conn, now),
        "Patient": patient,
        "Visit": {k: v for k, v in visit.items() if v is not None},
        "AppointmentInfo": [],
    }
    return conform(payload)


# ---- FHIR ----------------------------------------------------------------------------------


def _search_url(base: str, rtype: str, token: str) -> str:
    return f"{base}/{rtype}?identifier={quote(token, safe=':|/.-_')}"


def _focus_from_datamodel(
    conn: ConnectionSpec, write: WriteRecord, patient_ref: dict[str, Any]
) -> dict[str, Any]:
    """A written Data Model order / visit as the FHIR resource the EHR now holds."""
    if write.kind == "orders":
        order = _obj(write.payload.get("Order"))
        procedure = _obj(order.get("Procedure"))
        resource: dict[str, Any] = {
            "resourceType": "ServiceRequest",
            "identifier": [{"system": ids.order_system(conn.slug), "value": write.order_id}],
            "status": "revoked" if write.event == "Order-Cancel" else "active",
            "intent": "order",
            "subject": patient_ref,
        }
        if procedure.get("Code"):
            resource["code"] = {
                "coding": [{"code": procedure["Code"], "display": procedure.get("Description")}]
            }
    else:
        visit = _obj(write.payload.get("Visit"))
        resource = {
            "resourceType": "Appointment",
            "identifier": [{"system": ids.visit_system(conn.slug), "value": write.order_id}],
            "status": "cancelled" if write.event == "Scheduling-Cancel" else "booked",
            "participant": [{"actor": patient_ref, "status": "accepted"}],
        }
        if visit.get("VisitDateTime"):
            resource["start"] = visit["VisitDateTime"]
        if isinstance(visit.get("Duration"), int | float):
            resource["minutesDuration"] = int(visit["Duration"])
    resource["id"] = str(uuid.uuid5(_NAMESPACE, f"{conn.id}/{write.kind}/{write.order_id}"))
    if write.outcome == REJECTED:
        refused_status(resource, write.reason)
    return resource


def _fhir_event(write: WriteRecord, status: str) -> str:
    if write.kind == "orders":
        return "ServiceRequestCancelled" if status == "revoked" else "ServiceRequestUpdated"
    if status == "cancelled":
        return "SchedulingAppointmentCancelled"
    return (
        "SchedulingAppointmentUpdated"
        if write.event == "Scheduling-Reschedule"
        else "SchedulingAppointmentBooked"
    )


def _fhir_outcome(state: SandboxState, conn: ConnectionSpec, write: WriteRecord) -> dict[str, Any]:
    base = state.fhir_base_url(conn)
    patient = _written_patient(state, conn, write)
    if patient is not None:
        patient_ref: dict[str, Any] = {"reference": f"Patient/{patient.id}"}
    else:  # a patient the EHR does not know: referred to by what the write carried
        first = next(iter(_written_identifiers(write, conn)), {})
        system = ids.patient_system(conn.slug, str(first.get("IDType") or "MR"))
        patient_ref = {"identifier": {"system": system, "value": first.get("ID")}}
    rtype = "ServiceRequest" if write.kind == "orders" else "Appointment"
    focus = None
    if write.surface == "fhir":
        focus = written_resource(write.payload, rtype, write.event, write.outcome, write.reason)
    if focus is None:
        focus = _focus_from_datamodel(conn, write, patient_ref)
    detail = conn.webhook_detail
    if detail == "lightweight":
        keep = (
            "resourceType",
            "id",
            "identifier",
            "status",
            "subject",
            "participant",
            "note",
            "cancelationReason",
        )
        focus = {k: v for k, v in focus.items() if k in keep}
    event = _fhir_event(write, str(focus.get("status")))
    own = next(iter(focus.get("identifier") or []), {})
    focus_url = (
        _search_url(base, rtype, f"{own.get('value')}|{own.get('system')}")
        if own.get("value")
        else f"{base}/{rtype}/{focus['id']}"
    )
    entries = [{"fullUrl": focus_url, "resource": focus}]
    if patient is not None:
        mr_system = ids.patient_system(conn.slug, "MR")
        entries.append(
            {
                "fullUrl": _search_url(base, "Patient", f"{mr_system}|{patient.mrn}"),
                "resource": {
                    "resourceType": "Patient",
                    "id": patient.id,
                    "identifier": [{"system": mr_system, "value": patient.mrn}],
                },
            }
        )
    header_id = str(uuid.uuid4())
    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "eventUri": EVENT_DEFINITION + event,
        "source": {"name": conn.name, "endpoint": base},
        "focus": [{"reference": focus_url}],
    }
    if detail == "detailed":
        header["definition"] = MESSAGE_DEFINITION + event + "Full"
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "timestamp": instant(datetime.now(UTC)),
        "entry": [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}, *entries],
    }
