"""Validate write-back message Bundles (``ServiceRequest/$servicerequest-create``,
``Appointment/$appointment-create`` / ``-update`` / ``-cancel``, the older ``Appointment/$write``).

The body is a Bundle of type ``message`` whose first entry is a MessageHeader with the
operation's ``eventUri`` (the older generation: an ``urn:redox:event-type`` eventCoding), a
``source`` and a ``focus`` on the ServiceRequest / Appointment, which travels with its Patient.
Error messages name the problem, never a value from the body.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from sandbox.config import ConnectionSpec
from sandbox.fhir import identifiers as ids
from sandbox.fhir.operations import WriteOperation
from sandbox.fhir.render import instant

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_NAMESPACE = uuid.UUID("0c6b8f0e-5d0a-4f61-8d3c-7b7a2b51c9d4")


class WriteError(Exception):
    """A write-back the sandbox refuses with 400; ``message`` names the problem."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class ParsedWrite:
    event: str
    business_id: str  # order id, or the appointment's visit number
    focus: dict[str, Any]
    patient: dict[str, Any]
    request_id: str  # the request MessageHeader's id (or the Bundle's), for response.identifier
    fingerprint: str  # sha256 of the canonical focus resource + event


def _resources(bundle: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise WriteError("Bundle.entry must list the MessageHeader and the resources it carries")
    out = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise WriteError(f"Bundle.entry[{i}].resource must be a FHIR resource")
        full_url = entry.get("fullUrl")
        out.append((full_url if isinstance(full_url, str) else None, resource))
    return out


def _refers_to(reference: str, full_url: str | None, resource: dict[str, Any]) -> bool:
    if full_url and reference == full_url:
        return True
    rid = resource.get("id")
    if not isinstance(rid, str):
        return False
    local = f"{resource['resourceType']}/{rid}"
    return reference == local or reference.endswith("/" + local)


def _focus(header: dict[str, Any], resources: list[tuple[str | None, dict[str, Any]]], wanted: str) -> dict:
    focus = header.get("focus")
    candidates = [r for _, r in resources[1:] if r["resourceType"] == wanted]
    if focus is None:
        if len(candidates) == 1:
            return candidates[0]
        raise WriteError(
            f"MessageHeader.focus must reference the {wanted} (the bundle carries {len(candidates)})"
        )
    if not isinstance(focus, list):
        raise WriteError("MessageHeader.focus must be a list of references")
    for ref in focus:
        reference = ref.get("reference") if isinstance(ref, dict) else None
        if not isinstance(reference, str):
            continue
        for full_url, resource in resources[1:]:
            if resource["resourceType"] == wanted and _refers_to(reference, full_url, resource):
                return resource
    raise WriteError(f"MessageHeader.focus must reference a {wanted} entry of the bundle")


def _business_id(resource: dict[str, Any], suffix: str) -> str:
    identifiers = resource.get("identifier")
    if isinstance(identifiers, list):
        for ident in identifiers:
            if (
                isinstance(ident, dict)
                and isinstance(ident.get("system"), str)
                and ident["system"].endswith(suffix)
                and isinstance(ident.get("value"), str)
                and ident["value"].strip()
            ):
                return ident["value"]
    raise WriteError(
        f"{resource['resourceType']}.identifier needs an entry whose system ends with '{suffix}'"
    )


def _patient(resources: list[tuple[str | None, dict[str, Any]]]) -> dict[str, Any]:
    patients = [r for _, r in resources[1:] if r["resourceType"] == "Patient"]
    if not patients:
        raise WriteError("the bundle must carry the Patient the write is about")
    patient = patients[0]
    identifiers = patient.get("identifier")
    if not patient.get("id") and not (isinstance(identifiers, list) and identifiers):
        raise WriteError("the Patient needs an id or at least one identifier")
    return patient


def _check_focus(op: WriteOperation, event: str, focus: dict[str, Any]) -> None:
    if not isinstance(focus.get("status"), str):
        raise WriteError(f"{op.resource_type}.status is required")
    if op.resource_type == "ServiceRequest":
        if not isinstance(focus.get("intent"), str):
            raise WriteError("ServiceRequest.intent is required")
        if not isinstance(focus.get("subject"), dict):
            raise WriteError("ServiceRequest.subject must reference the Patient")
        if event != "Order-Cancel" and not isinstance(focus.get("code"), dict):
            raise WriteError("ServiceRequest.code (the ordered procedure) is required")
    else:
        participants = focus.get("participant")
        if not isinstance(participants, list) or not participants:
            raise WriteError("Appointment.participant must list at least the patient")
        if event != "Scheduling-Cancel" and not isinstance(focus.get("start"), str):
            raise WriteError("Appointment.start is required")


def _event(op: WriteOperation, header: dict[str, Any]) -> str:
    """The write log's event name for this request, from eventUri (or the older eventCoding)."""
    if op.event_uri is not None:
        if header.get("eventUri") != op.event_uri:
            raise WriteError(f"{op.resource_type}/{op.name} needs MessageHeader.eventUri '{op.event_uri}'")
        assert op.event is not None
        return op.event
    coding = header.get("eventCoding")
    if not isinstance(coding, dict) or coding.get("system") != ids.EVENT_TYPE_SYSTEM:
        raise WriteError(f"MessageHeader.eventCoding.system must be '{ids.EVENT_TYPE_SYSTEM}'")
    event = op.legacy_events.get(coding.get("code"))  # type: ignore[arg-type]
    if event is None:
        raise WriteError(f"{op.resource_type}/{op.name} accepts event codes {', '.join(op.legacy_events)}")
    return event


def parse_write(op: WriteOperation, bundle: Any) -> ParsedWrite:
    """Check a write-back message Bundle and pull out what the write log keys on."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise WriteError("the body must be a FHIR Bundle")
    if bundle.get("type") != "message":
        raise WriteError("Bundle.type must be 'message'")
    resources = _resources(bundle)
    header = resources[0][1]
    if header["resourceType"] != "MessageHeader":
        raise WriteError("the first Bundle entry must be a MessageHeader")
    event = _event(op, header)
    source = header.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("endpoint"), str):
        raise WriteError("MessageHeader.source.endpoint is required")
    focus = _focus(header, resources, op.resource_type)
    business_id = _business_id(focus, op.id_system_suffix)
    _check_focus(op, event, focus)
    patient = _patient(resources)
    fingerprint = hashlib.sha256(
        orjson.dumps({"event": event, "focus": focus}, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    request_id = next(
        (v for v in (header.get("id"), bundle.get("id")) if isinstance(v, str) and _FHIR_ID.match(v)),
        str(uuid.uuid5(_NAMESPACE, fingerprint)),
    )
    return ParsedWrite(event, business_id, focus, patient, request_id, fingerprint)


def response_bundle(
    op: WriteOperation, parsed: ParsedWrite, conn: ConnectionSpec, endpoint: str
) -> dict[str, Any]:
    """The acknowledgement: a message Bundle whose MessageHeader.response is ``ok``. Writes are
    asynchronous at Redox: ``ok`` means received, not delivered to the EHR."""
    header_id = str(uuid.uuid4())
    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "source": {"name": conn.name, "endpoint": endpoint},
        "response": {"identifier": parsed.request_id, "code": "ok"},
    }
    if op.event_uri is not None:
        header["eventUri"] = op.event_uri
    else:
        code = next(k for k, v in op.legacy_events.items() if v == parsed.event)
        header["eventCoding"] = {"system": ids.EVENT_TYPE_SYSTEM, "code": code}
    now = instant(datetime.now(UTC))
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": now},
        "type": "message",
        "timestamp": now,
        "entry": [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}],
    }


def written_resource(
    record_payload: dict[str, Any],
    resource_type: str,
    event: str,
    outcome: str | None = None,
    reason: str | None = None,
) -> dict[str, Any] | None:
    """The focus resource of a recorded write as a search (or the outcome notification) shows
    it: with an id derived from its business identifier, and the status a cancel leaves it in.
    A write the EHR refused (``outcome`` ``rejected``) shows its refused status — a revoked
    ServiceRequest with the reason as a note, a cancelled Appointment with the reason as its
    ``cancelationReason`` — so a client that finds it knows not to send it again."""
    for entry in record_payload.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == resource_type:
            out = dict(resource)
            out.setdefault(
                "id", str(uuid.uuid5(_NAMESPACE, orjson.dumps(resource.get("identifier")).decode()))
            )
            if event == "Scheduling-Cancel":
                out["status"] = "cancelled"
            if outcome == "rejected":
                refused_status(out, reason)
            return out
    return None


def refused_status(resource: dict[str, Any], reason: str | None) -> None:
    """Put a focus resource into the state an EHR refusal leaves it in (in place)."""
    if resource.get("resourceType") == "ServiceRequest":
        resource["status"] = "revoked"
        if reason:
            resource["note"] = [*(resource.get("note") or []), {"text": reason}]
    else:
        resource["status"] = "cancelled"
        if reason:
            resource["cancelationReason"] = {"text": reason}


def identifier_matches(resource: dict[str, Any], wanted: str) -> bool:
    """FHIR token search on ``identifier``: ``system|value``, ``|value`` or ``value``."""
    system, sep, value = wanted.partition("|")
    if not sep:
        system, value = "", wanted
    for ident in resource.get("identifier") or []:
        if not isinstance(ident, dict) or ident.get("value") != value:
            continue
        if not sep or not system or ident.get("system") == system:
            return True
    return False
