"""Build and validate the request for one outbox row, for the target connection's surface.

FHIR: a message Bundle for Redox's documented operations (``ServiceRequest/$servicerequest-create``,
``Appointment/$appointment-create`` / ``-update`` / ``-cancel``): a MessageHeader with the
operation's ``eventUri``, ``source`` and ``focus``, the focus resource, and the Patient as the
destination knows it. Data Model: ``Order.New`` and ``Scheduling.New`` / ``Reschedule`` /
``Cancel``. The outbox id travels inside the message (``identifier`` with the systems below,
``Order.ID``, ``Visit.VisitNumber``) so the write can be found again after an unanswered send.

Every payload is validated before it is sent: Data Model payloads strictly by the ``redox``
package's models (``Meta.Message`` / ``Meta.Transmission`` removed, as the models do not carry
them), FHIR Bundles by ``fhir.resources`` (R4B) when it is installed, else structurally. A row
that cannot become a valid payload raises ``InvalidRow`` with a reason built only from column
names, vocabulary and counts, never a value.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.writeback.outbox import OutboxRow

ORDER_ID_SYSTEM = "urn:redox-elt:outbox:OrderID"  # ends with ":OrderID", as Redox's own order ids
VISIT_NUMBER_SYSTEM = "urn:redox-elt:outbox:VN"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
EVENT_DEFINITION = "https://fhir.redoxengine.com/EventDefinition/"
SOURCE = {"name": "redox-elt", "endpoint": "urn:redox-elt:writeback"}
_NAMESPACE = uuid.UUID("5f0d3a52-8d7e-4c1a-9b0e-6a2f1c3d4e5f")

FHIR_OPERATIONS = {
    ("orders", "create"): ("ServiceRequest", "$servicerequest-create", "ServiceRequestCreate"),
    ("appointments", "create"): ("Appointment", "$appointment-create", "AppointmentCreate"),
    ("appointments", "update"): ("Appointment", "$appointment-update", "AppointmentUpdate"),
    ("appointments", "cancel"): ("Appointment", "$appointment-cancel", "AppointmentCancel"),
}
DATAMODEL_EVENTS = {
    ("orders", "create"): ("Order", "New"),
    ("appointments", "create"): ("Scheduling", "New"),
    ("appointments", "update"): ("Scheduling", "Reschedule"),
    ("appointments", "cancel"): ("Scheduling", "Cancel"),
}
CODESET_SYSTEMS = {
    "LOINC": "http://loinc.org",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "SNOMED": "http://snomed.info/sct",
    "SNOMED CT": "http://snomed.info/sct",
    "HCPCS": "urn:oid:2.16.840.1.113883.6.285",
}
# Data Model Order.Priority values -> FHIR ServiceRequest.priority (None: no FHIR equivalent).
PRIORITIES = {
    "routine": "routine",
    "stat": "stat",
    "asap": "asap",
    "urgent": "urgent",
    "preoperative": None,
    "timing critical": None,
}
DATAMODEL_ID_TYPES = ("MR", "EHRID", "EPI", "NIST")


class InvalidRow(ValueError):
    """The row cannot become a valid payload; the message is PHI-free."""


@dataclass(frozen=True)
class PatientIds:
    fhir_id: str | None  # the destination's FHIR logical id
    identifiers: tuple[tuple[str, str], ...]  # (id type, value), MR first

    def datamodel(self) -> list[dict[str, str]]:
        return [{"ID": v, "IDType": t} for t, v in self.identifiers if t in DATAMODEL_ID_TYPES]


@dataclass(frozen=True)
class Request:
    """What the writer sends for one row (and what ``--dry-run`` describes)."""

    surface: str  # "fhir" | "datamodel"
    action: str  # "create" | "update" | "cancel"
    operation: str  # e.g. "ServiceRequest/$servicerequest-create", "Order.New"
    body: dict[str, Any]
    validated_by: str  # "redox models (strict)", "fhir.resources R4B", "structure only (...)"


def action_of(row: OutboxRow) -> str:
    return str(row.values.get("action") or "create") if row.kind == "appointments" else "create"


def business_id(row: OutboxRow) -> str:
    """What travels in the message: the order id, or the appointment's visit number."""
    return str(row.values["order_id"] if row.kind == "orders" else row.values["appointment_id"])


def _text(row: OutboxRow, column: str, *, required: bool = False, limit: int = 500) -> str | None:
    value = row.values.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InvalidRow(f"{column} is missing; fill it in the outbox row")
        return None
    text = str(value).strip()
    if len(text) > limit:
        raise InvalidRow(f"{column} is {len(text)} characters long (at most {limit})")
    return text


def _instant(row: OutboxRow, column: str, *, required: bool = False) -> datetime | None:
    value = row.values.get(column)
    if value is None:
        if required:
            raise InvalidRow(f"{column} is missing; give the time as a timestamp")
        return None
    if not isinstance(value, datetime):
        raise InvalidRow(f"{column} is not a timestamp")
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _fhir_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _npi(row: OutboxRow) -> str | None:
    npi = _text(row, "provider_npi", limit=10)
    if npi is not None and not (len(npi) == 10 and npi.isdigit()):
        raise InvalidRow("provider_npi must be 10 digits")
    return npi


def _priority(row: OutboxRow) -> str | None:
    priority = _text(row, "priority", limit=40)
    if priority is None:
        return None
    if priority.lower() not in PRIORITIES:
        raise InvalidRow(f"priority must be one of {', '.join(p.title() for p in PRIORITIES)}")
    return priority


def _duration(row: OutboxRow) -> int:
    minutes = row.values.get("duration_minutes")
    if minutes is None:
        return 30
    if not isinstance(minutes, int) or not 1 <= minutes <= 24 * 60:
        raise InvalidRow("duration_minutes must be a whole number of minutes between 1 and 1440")
    return minutes


def _uid(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(parts)))


# --- FHIR --------------------------------------------------------------------------------------


def _fhir_patient(patient: PatientIds, slug: str | None) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient"}
    if patient.fhir_id:
        resource["id"] = patient.fhir_id
    identifiers = []
    for id_type, value in patient.identifiers:
        if id_type == "EPI":
            identifiers.append({"system": "urn:redox:enterprise:EPI", "value": value})
        elif slug:
            identifiers.append({"system": f"urn:redox:{slug}:{id_type}", "value": value})
    if identifiers:
        resource["identifier"] = identifiers
    if "id" not in resource and not identifiers:
        raise InvalidRow(
            "the patient has no FHIR id or identifier at this connection in redox.patient_identifiers"
        )
    return resource


def _service_request(row: OutboxRow, patient_ref: str) -> dict[str, Any]:
    code = _text(row, "procedure_code", required=True, limit=64)
    codeset = _text(row, "procedure_codeset", required=True, limit=200) or ""
    system = CODESET_SYSTEMS.get(codeset.upper()) or (codeset if ":" in codeset else None)
    if system is None:
        raise InvalidRow(
            f"procedure_codeset has no FHIR code system; use {', '.join(CODESET_SYSTEMS)} or a URI"
        )
    coding: dict[str, Any] = {"system": system, "code": code}
    description = _text(row, "procedure_description")
    if description:
        coding["display"] = description
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": _uid("sr", business_id(row)),
        "identifier": [{"system": ORDER_ID_SYSTEM, "value": business_id(row)}],
        "status": "active",
        "intent": "order",
        "code": {"coding": [coding], **({"text": description} if description else {})},
        "subject": {"reference": patient_ref},
    }
    priority = _priority(row)
    if priority is not None:
        fhir_priority = PRIORITIES[priority.lower()]
        if fhir_priority is None:
            raise InvalidRow("priority has no FHIR equivalent (use Routine, Urgent, ASAP or Stat)")
        resource["priority"] = fhir_priority
    ordered_at = _instant(row, "ordered_at")
    if ordered_at is not None:
        resource["authoredOn"] = _fhir_time(ordered_at)
    npi = _npi(row)
    if npi:
        resource["requester"] = {"identifier": {"system": NPI_SYSTEM, "value": npi}}
    notes = _text(row, "notes", limit=4000)
    if notes:
        resource["note"] = [{"text": notes}]
    return resource


def _appointment(row: OutboxRow, action: str, patient_ref: str) -> dict[str, Any]:
    start = _instant(row, "start_at", required=action != "cancel")
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": _uid("appt", business_id(row)),
        "identifier": [{"system": VISIT_NUMBER_SYSTEM, "value": business_id(row)}],
        "status": "cancelled" if action == "cancel" else "booked",
        "participant": [{"actor": {"reference": patient_ref}, "status": "accepted"}],
    }
    if start is not None:
        minutes = _duration(row)
        resource["start"] = _fhir_time(start)
        resource["end"] = _fhir_time(start + timedelta(minutes=minutes))
        resource["minutesDuration"] = minutes
    reason = _text(row, "reason")
    if reason:
        resource["reasonCode"] = [{"text": reason}]
    npi = _npi(row)
    if npi:
        resource["participant"].append(
            {
                "actor": {"type": "Practitioner", "identifier": {"system": NPI_SYSTEM, "value": npi}},
                "status": "accepted",
            }
        )
    facility = _text(row, "location_facility", limit=200)
    if facility:
        resource["participant"].append({"actor": {"display": facility}, "status": "accepted"})
    notes = _text(row, "notes", limit=4000)
    if notes:
        resource["comment"] = notes
    return resource


def fhir_request(row: OutboxRow, patient: PatientIds, slug: str | None, now: datetime) -> Request:
    action = action_of(row)
    rtype, operation, event = FHIR_OPERATIONS[(row.kind, action)]
    patient_resource = _fhir_patient(patient, slug)
    patient_url = f"urn:uuid:{_uid('patient', business_id(row))}"
    patient_ref = f"Patient/{patient.fhir_id}" if patient.fhir_id else patient_url
    focus = (
        _service_request(row, patient_ref) if row.kind == "orders" else _appointment(row, action, patient_ref)
    )
    header_id = _uid("header", row.kind, row.key, action)
    focus_url = f"urn:uuid:{focus['id']}"
    bundle = {
        "resourceType": "Bundle",
        "id": _uid("bundle", row.kind, row.key, action),
        "type": "message",
        "timestamp": _fhir_time(now),
        "entry": [
            {
                "fullUrl": f"urn:uuid:{header_id}",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": header_id,
                    "eventUri": EVENT_DEFINITION + event,
                    "source": dict(SOURCE),
                    "focus": [{"reference": focus_url}],
                },
            },
            {"fullUrl": focus_url, "resource": focus},
            {"fullUrl": patient_url, "resource": patient_resource},
        ],
    }
    return Request("fhir", action, f"{rtype}/{operation}", bundle, validate_fhir(bundle))


def validate_fhir(bundle: dict[str, Any]) -> str:
    """Validate with ``fhir.resources`` R4B when installed (a dev dependency), else structurally.
    Returns which check ran; raises InvalidRow naming the failing elements (never values)."""
    try:
        from fhir.resources.R4B.bundle import Bundle
        from pydantic import ValidationError
    except ImportError:
        _check_structure(bundle)
        return "structure only (fhir.resources is not installed)"
    try:
        Bundle.model_validate(copy.deepcopy(bundle))
    except ValidationError as exc:
        where = sorted({".".join(str(p) for p in e["loc"][:6]) for e in exc.errors()})
        raise InvalidRow(f"the FHIR Bundle fails FHIR R4B validation at {', '.join(where[:5])}") from None
    return "fhir.resources R4B"


def _check_structure(bundle: dict[str, Any]) -> None:
    entries = bundle.get("entry") or []
    if bundle.get("type") != "message" or not entries:
        raise InvalidRow("the FHIR Bundle is not a message Bundle")
    if entries[0]["resource"].get("resourceType") != "MessageHeader":
        raise InvalidRow("the FHIR Bundle does not start with a MessageHeader")
    for entry in entries:
        resource = entry.get("resource") or {}
        if not isinstance(resource.get("resourceType"), str):
            raise InvalidRow("a FHIR Bundle entry has no resourceType")


# --- Data Model --------------------------------------------------------------------------------


def _dm_time(at: datetime) -> str:
    return _fhir_time(at)


def datamodel_request(
    row: OutboxRow, patient: PatientIds, destination_id: str | None, now: datetime, test: bool
) -> Request:
    action = action_of(row)
    data_model, event = DATAMODEL_EVENTS[(row.kind, action)]
    identifiers = patient.datamodel()
    if not identifiers:
        raise InvalidRow("the patient has no MR / EHRID / EPI / NIST identifier at this connection")
    meta: dict[str, Any] = {
        "DataModel": data_model,
        "EventType": event,
        "EventDateTime": _dm_time(now),
        "Test": test,
        "Source": {"Name": SOURCE["name"]},
    }
    if destination_id:
        meta["Destinations"] = [{"ID": destination_id}]
    body: dict[str, Any] = {"Meta": meta, "Patient": {"Identifiers": identifiers}}
    if row.kind == "orders":
        body["Order"] = _dm_order(row, now)
    else:
        body["Visit"] = _dm_visit(row, action)
    return Request("datamodel", action, f"{data_model}.{event}", body, validate_datamodel(body))


def _dm_order(row: OutboxRow, now: datetime) -> dict[str, Any]:
    procedure: dict[str, Any] = {
        "Code": _text(row, "procedure_code", required=True, limit=64),
        "Codeset": _text(row, "procedure_codeset", required=True, limit=200),
    }
    description = _text(row, "procedure_description")
    if description:
        procedure["Description"] = description
    order: dict[str, Any] = {
        "ID": business_id(row),
        "TransactionDateTime": _dm_time(_instant(row, "ordered_at") or now),
        "Status": "New",
        "Procedure": procedure,
    }
    priority = _priority(row)
    if priority is not None:
        order["Priority"] = next(
            p
            for p in ("Routine", "Stat", "ASAP", "Urgent", "Preoperative", "Timing Critical")
            if p.lower() == priority.lower()
        )
    npi = _npi(row)
    if npi:
        order["Provider"] = {"NPI": npi, "ID": npi, "IDType": "NPI"}
    notes = _text(row, "notes", limit=4000)
    if notes:
        order["Notes"] = [notes]
    return order


def _dm_visit(row: OutboxRow, action: str) -> dict[str, Any]:
    visit: dict[str, Any] = {"VisitNumber": business_id(row)}
    start = _instant(row, "start_at", required=action != "cancel")
    if start is not None:
        visit["VisitDateTime"] = _dm_time(start)
        visit["Duration"] = _duration(row)
    reason = _text(row, "reason")
    if reason:
        visit["Reason"] = reason
    npi = _npi(row)
    if npi:
        visit["AttendingProvider"] = {"ID": npi, "IDType": "NPI"}
    location = {
        k: v
        for k, v in (
            ("Facility", _text(row, "location_facility", limit=200)),
            ("Department", _text(row, "location_department", limit=200)),
        )
        if v
    }
    if location:
        visit["Location"] = location
    notes = _text(row, "notes", limit=4000)
    if notes:
        visit["Instructions"] = [notes]
    return visit


def validate_datamodel(payload: dict[str, Any]) -> str:
    """Strict ``redox`` models, after removing Meta.Message / Meta.Transmission (not modelled)."""
    from pydantic import ValidationError
    from redox.factory import redox_object_factory

    candidate = copy.deepcopy(payload)
    for key in ("Message", "Transmission"):
        candidate.get("Meta", {}).pop(key, None)
    try:
        redox_object_factory(candidate)
    except ValidationError as exc:
        where = sorted({".".join(str(p) for p in e["loc"][:6]) for e in exc.errors()})
        hint = ""
        if any(w.startswith("Visit.Location") for w in where):
            hint = " (Scheduling needs location_department)"
        raise InvalidRow(
            f"the Data Model payload fails the redox models at {', '.join(where[:5])}{hint}"
        ) from None
    return "redox models (strict)"


def describe(request: Request) -> dict[str, Any]:
    """A PHI-free view of a request for ``--dry-run``: operation, element names and counts."""

    def shape(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(v) for v in value[:3]] + ([f"... {len(value) - 3} more"] if len(value) > 3 else [])
        return type(value).__name__

    return {
        "surface": request.surface,
        "operation": request.operation,
        "validated_by": request.validated_by,
        "shape": shape(request.body),
    }
