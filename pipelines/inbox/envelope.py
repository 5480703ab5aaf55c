"""What one delivered webhook body is, read without trusting it (pure functions).

The receiver classifies every authenticated body before storing it, so the inbox knows its
de-duplication key, family, event and — for content that can never be processed — the
quarantine reason, without a second parse. The processing reads the same ``Envelope``.

De-duplication keys (REDOX-REFERENCE "Decisions where Redox is silent", §4.3):

- Data Model: ``Meta.Logs[].ID`` — one Log per destination, stable across Redox's retries
  (each retry gets a new ``AttemptID``, so the body itself differs between attempts).
- FHIR notification: the ``Bundle.id``, else the ``MessageHeader.id``.
- Neither: the SHA-256 of the body (BOM stripped), so a byte-identical re-send is one row.

A body that is not JSON, not an object, a Data Model payload of a data model Redox does not
define, a query or query response, or a FHIR Bundle without a MessageHeader is still stored
(the receiver answers 200: Redox pauses the whole queue on any error status) but carries a
quarantine reason. Reasons name only vocabulary values and lengths, never content.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

UTF8_BOM = b"\xef\xbb\xbf"

# Redox's data models (developer.redoxengine.com/data-models). A payload naming another is
# quarantined as "unknown data model"; one named here but not mapped to the common model is
# quarantined by the processing with its own reason.
KNOWN_DATA_MODELS = frozenset(
    {
        "Claim",
        "Clinical Decisions",
        "Clinical Summary",
        "Device",
        "Financial",
        "Flowsheet",
        "Inventory",
        "Media",
        "Medications",
        "Notes",
        "Order",
        "Organization",
        "PatientAdmin",
        "Patient Education",
        "PatientSearch",
        "Provider",
        "Referral",
        "Research",
        "Results",
        "Scheduling",
        "SSO",
        "Surgical Scheduling",
        "Vaccination",
    }
)
# Event types that are requests or answers, not pushed events.
QUERY_EVENT_MARKERS = ("Query", "Response")

FAMILY_DATAMODEL = "datamodel"
FAMILY_FHIR = "fhir"
FAMILY_UNKNOWN = "unknown"

KEY_LOG = "log"
KEY_BUNDLE = "bundle"
KEY_HEADER = "header"
KEY_HASH = "sha256"

FHIR_EVENT_PREFIX = "https://fhir.redoxengine.com/EventDefinition/"


@dataclass(frozen=True)
class Envelope:
    dedupe_key: str  # "<kind>:<value>", unique per distinct message
    key_kind: str  # log | bundle | header | sha256
    family: str  # datamodel | fhir | unknown
    data_model: str | None  # Data Model ``Meta.DataModel``; "FHIR" for notifications
    event_type: str | None  # ``Meta.EventType`` or the notification's event name
    event_at: str | None  # ``Meta.EventDateTime`` / ``Bundle.timestamp`` as sent (ISO text)
    source_name: str | None  # ``Meta.Source.Name`` / ``MessageHeader.source.name``
    source_ref: str | None  # a Data Model destination id / a FHIR source endpoint
    quarantine_reason: str | None


def strip_bom(body: bytes) -> bytes:
    return body[len(UTF8_BOM) :] if body.startswith(UTF8_BOM) else body


def parse_body(body: bytes) -> Any:
    """The JSON value of ``body`` (a UTF-8 BOM tolerated); raises ``ValueError``."""
    try:
        return orjson.loads(strip_bom(body))
    except orjson.JSONDecodeError as exc:
        raise ValueError("body is not valid JSON") from exc


def content_hash(body: bytes) -> str:
    return hashlib.sha256(strip_bom(body)).hexdigest()


def verification_request(value: Any) -> tuple[str, str] | None:
    """``(token, challenge)`` when ``value`` is Redox's POST verification body (§4.1)."""
    if not isinstance(value, dict) or set(value) != {"verification-token", "challenge"}:
        return None
    token, challenge = value["verification-token"], value["challenge"]
    if isinstance(token, str) and isinstance(challenge, str):
        return token, challenge
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def classify(body: bytes, payload: Any = None, parsed: bool = False) -> Envelope:
    """Read ``body`` (or its already parsed ``payload``) into an ``Envelope``."""
    digest_key = f"{KEY_HASH}:{content_hash(body)}"
    if not parsed:
        try:
            payload = parse_body(body)
        except ValueError:
            return _unreadable(digest_key, f"body is not valid JSON ({len(body)} bytes)")
    if not isinstance(payload, dict):
        return _unreadable(digest_key, "body is not a JSON object")
    if payload.get("resourceType") == "Bundle":
        return _fhir(payload, digest_key)
    if isinstance(payload.get("Meta"), dict):
        return _datamodel(payload["Meta"], digest_key)
    return _unreadable(digest_key, "body is neither a Data Model payload (Meta) nor a FHIR Bundle")


def _unreadable(key: str, reason: str) -> Envelope:
    return Envelope(key, KEY_HASH, FAMILY_UNKNOWN, None, None, None, None, None, reason)


def _datamodel(meta: dict[str, Any], digest_key: str) -> Envelope:
    key, kind = digest_key, KEY_HASH
    logs = meta.get("Logs")
    if isinstance(logs, list):
        for entry in logs:
            log_id = _text(entry.get("ID")) if isinstance(entry, dict) else None
            if log_id:
                key, kind = f"{KEY_LOG}:{log_id}", KEY_LOG
                break
    data_model, event_type = _text(meta.get("DataModel")), _text(meta.get("EventType"))
    source = meta.get("Source") if isinstance(meta.get("Source"), dict) else {}
    destinations = meta.get("Destinations") if isinstance(meta.get("Destinations"), list) else []
    dest_id = next(
        (_text(d.get("ID")) for d in destinations if isinstance(d, dict) and _text(d.get("ID"))), None
    )
    reason = None
    if data_model is None or event_type is None:
        reason = "Meta.DataModel or Meta.EventType is missing"
    elif data_model not in KNOWN_DATA_MODELS:
        reason = "unknown data model (not one Redox defines)"
    elif any(marker in event_type for marker in QUERY_EVENT_MARKERS):
        reason = f"{data_model}.{event_type} is a query or response, not a pushed event"
    return Envelope(
        key,
        kind,
        FAMILY_DATAMODEL,
        data_model,
        event_type,
        _text(meta.get("EventDateTime")),
        _text(source.get("Name")),
        dest_id,
        reason,
    )


def notification_event(header: dict[str, Any]) -> str | None:
    """The event a MessageHeader names: the last segment of ``eventUri``, else the
    ``eventCoding`` code (the older ``urn:redox:event-type`` form)."""
    uri = _text(header.get("eventUri"))
    if uri:
        return uri.rstrip("/").rsplit("/", 1)[-1]
    coding = header.get("eventCoding")
    return _text(coding.get("code")) if isinstance(coding, dict) else None


def message_header(bundle: dict[str, Any]) -> dict[str, Any] | None:
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return None
    first = entries[0].get("resource")
    if isinstance(first, dict) and first.get("resourceType") == "MessageHeader":
        return first
    return None


def _fhir(bundle: dict[str, Any], digest_key: str) -> Envelope:
    header = message_header(bundle)
    key, kind = digest_key, KEY_HASH
    if _text(bundle.get("id")):
        key, kind = f"{KEY_BUNDLE}:{bundle['id']}", KEY_BUNDLE
    elif header is not None and _text(header.get("id")):
        key, kind = f"{KEY_HEADER}:{header['id']}", KEY_HEADER
    reason = None
    event = source_name = source_ref = None
    if bundle.get("type") != "message" or header is None:
        reason = "FHIR Bundle is not a notification (type message, MessageHeader first)"
    else:
        event = notification_event(header)
        source = header.get("source") if isinstance(header.get("source"), dict) else {}
        source_name, source_ref = _text(source.get("name")), _text(source.get("endpoint"))
        if event is None:
            reason = "MessageHeader names no event (eventUri or eventCoding)"
    return Envelope(
        key,
        kind,
        FAMILY_FHIR,
        "FHIR",
        event,
        _text(bundle.get("timestamp")),
        source_name,
        source_ref,
        reason,
    )
