"""FHIR notifications as Redox pushes them today (REDOX-REFERENCE §3.5 and §12.3).

A notification is a ``Bundle`` of type ``message`` whose first entry is a ``MessageHeader``
with ``eventUri`` ``https://fhir.redoxengine.com/EventDefinition/<Event>`` (e.g.
``PatientAdminPatientArrived``, ``ResultCreated``, ``DocumentReferenceCreated``,
``MedicationRequestUpdated``), ``source {name, endpoint}`` and ``focus[]``.

- **detailed** (``definition`` ``…/MessageDefinition/<Event>Full``): the changed resource and
  its Patient, in full.
- **lightweight**: references, the patient identifier and a timestamp only — a stub of the
  changed resource carrying its identifiers and patient reference, and a Patient stub with its
  MR identifier. The receiver learns who and what changed and schedules a refresh.

Entry ``fullUrl``s are search URLs in both forms Redox's examples show: the Patient's with the
system first (``Patient?identifier=urn:redox:…:MR|value``, the Scheduling example), the changed
resource's with the value first (``Observation?identifier=value|system``, the Result example).

The older ``eventCoding`` form (``sandbox.fhir.render.render_notification``) is accepted by
receivers but no longer sent.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

from sandbox.config import ConnectionSpec
from sandbox.fhir import identifiers as ids
from sandbox.fhir.render import instant, render_resource, resource_type
from sandbox.population.records import Change

EVENT_DEFINITION = "https://fhir.redoxengine.com/EventDefinition/"
MESSAGE_DEFINITION = "https://fhir.redoxengine.com/MessageDefinition/"
DETAILS = ("detailed", "lightweight")
_NAMESPACE = uuid.UUID("3d0c6f7e-5b1a-4f58-9d59-1b8f5c2e7a10")
_ARRIVING_CLASSES = frozenset({"IMP", "EMER", "OBSENC"})


def notification_event_name(change: Change) -> str:
    """The ``eventUri`` event of one population change."""
    record, kind = change.record, change.kind
    entity = change.entity
    if entity == "patients":
        return "PatientAdminPatientCreated" if kind == "new" else "PatientAdminPatientUpdated"
    if entity == "encounters":
        if kind == "cancel":
            return "PatientAdminVisitCancelled"
        if record.status == "planned":
            return "PatientAdminPatientPreAdmitted"
        if record.end_at is not None and record.status == "finished":
            return "PatientAdminPatientDischarged"
        if kind == "new":
            return (
                "PatientAdminPatientArrived"
                if record.class_code in _ARRIVING_CLASSES
                else "PatientAdminPatientRegistered"
            )
        return (
            "PatientAdminPatientTransferred"
            if record.class_code in _ARRIVING_CLASSES
            else "PatientAdminVisitUpdated"
        )
    if entity == "results":
        return "ResultCreated"  # Redox documents "created" only for results; status tells the rest
    if entity == "medications":
        prefix = resource_type(record)
        return prefix + {"new": "Created", "update": "Updated", "cancel": "Cancelled"}[kind]
    if entity == "appointments":
        if kind == "cancel":
            return "SchedulingAppointmentCancelled"
        if kind == "new":
            return (
                "SchedulingAppointmentUpdated" if record.rescheduled_from else "SchedulingAppointmentBooked"
            )
        return "SchedulingAppointmentNoShow" if record.status == "noshow" else "SchedulingAppointmentUpdated"
    if entity == "documents":
        return "DocumentReference" + {"new": "Created", "update": "Replaced", "cancel": "Deleted"}[kind]
    if entity == "orders":  # the Order family: service requests created, updated, cancelled
        return "ServiceRequest" + {"new": "Created", "update": "Updated", "cancel": "Cancelled"}[kind]
    raise ValueError(f"notification: unknown entity '{entity}'")


def _first_identifier(resource: dict[str, Any]) -> tuple[str, str] | None:
    for ident in resource.get("identifier") or []:
        system, value = ident.get("system"), ident.get("value")
        if isinstance(system, str) and isinstance(value, str) and system and value:
            return system, value
    return None


def _search_url(base: str, rtype: str, token: str) -> str:
    return f"{base}/{rtype}?identifier={quote(token, safe=':|/.-_')}"


def render_redox_notification(
    change: Change, conn: ConnectionSpec, base_url: str | None = None, detail: str = "detailed"
) -> dict[str, Any]:
    """The message Bundle Redox would push for ``change`` (``detail``: detailed | lightweight)."""
    if detail not in DETAILS:
        raise ValueError(f"notification detail must be one of {DETAILS}, got {detail!r}")
    record = change.record
    rtype = resource_type(record)
    event = notification_event_name(change)
    base = (base_url or f"urn:redox:{conn.slug}").rstrip("/")
    seed = f"{conn.id}/{rtype}/{record.id}/{record.version}/{change.kind}/{event}/{detail}"
    bundle_id = str(uuid.uuid5(_NAMESPACE, "bundle:" + seed))
    header_id = str(uuid.uuid5(_NAMESPACE, "header:" + seed))
    resource = render_resource(record, conn)
    own = _first_identifier(resource) if rtype != "Patient" else None
    resource_url = _search_url(base, rtype, f"{own[1]}|{own[0]}") if own else f"{base}/{rtype}/{record.id}"
    patient = getattr(record, "patient", None)
    mrn = patient.mrn if patient is not None else getattr(record, "mrn", None)
    mr_system = ids.patient_system(conn.slug, "MR")
    patient_url = _search_url(base, "Patient", f"{mr_system}|{mrn}") if mrn else None
    entries: list[dict[str, Any]] = []
    if rtype == "Patient":
        main_url = patient_url or f"{base}/Patient/{record.id}"
        if detail == "detailed":
            entries.append({"fullUrl": main_url, "resource": resource})
        else:
            entries.append({"fullUrl": main_url, "resource": _patient_stub(record.id, mr_system, mrn)})
    else:
        if detail == "detailed":
            entries.append({"fullUrl": resource_url, "resource": resource})
        else:
            stub = {"resourceType": rtype, "id": record.id}
            for key in ("identifier", "subject", "patient", "status", "meta"):
                if key in resource:
                    stub[key] = resource[key]
            entries.append({"fullUrl": resource_url, "resource": stub})
        if patient is not None and patient_url:
            entries.append(
                {"fullUrl": patient_url, "resource": _patient_stub(patient.patient_id, mr_system, mrn)}
            )
    header = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "eventUri": EVENT_DEFINITION + event,
        "source": {"name": conn.name, "endpoint": base},
        "focus": [{"reference": entries[0]["fullUrl"]}],
    }
    if detail == "detailed":
        header["definition"] = MESSAGE_DEFINITION + event + "Full"
    return {
        "resourceType": "Bundle",
        "id": bundle_id,
        "type": "message",
        "timestamp": instant(record.last_updated),
        "entry": [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}, *entries],
    }


def _patient_stub(patient_id: str, mr_system: str, mrn: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Patient", "id": patient_id}
    if mrn:
        out["identifier"] = [{"system": mr_system, "value": mrn}]
    return out
