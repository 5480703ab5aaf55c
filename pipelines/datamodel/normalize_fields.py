"""Field-level helpers of the Data Model normalizer: scalar coercion, codes, providers,
status vocabularies, document content.

Redox JSON is loose: numbers arrive as strings and strings as numbers (REDOX-REFERENCE §8.2),
objects arrive as ``null`` or full of ``null``s, and codes name their system three ways
(``Codeset``, ``CodeSystemName``, an OID in ``CodeSystem``). Everything here turns that
into the values the FHIR normalizer produces for the same record, so a row looks the
same whichever surface it came through. Nothing here raises on odd input: an unusable
value becomes ``None``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipelines.normalize_common import parse_ts

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"

# Code system names as Redox writes them, compared without spaces, dashes or case.
_SYSTEM_BY_NAME = {
    "LOINC": LOINC,
    "SNOMEDCT": SNOMED,
    "SNOMED": SNOMED,
    "SNOMEDCTUS": SNOMED,
    "RXNORM": RXNORM,
    "CPT": CPT,
    "CPT4": CPT,
    "ICD10": ICD10,
    "ICD10CM": ICD10,
    "CVX": CVX,
}
_SYSTEM_BY_OID = {
    "2.16.840.1.113883.6.1": LOINC,
    "2.16.840.1.113883.6.96": SNOMED,
    "2.16.840.1.113883.6.88": RXNORM,
    "2.16.840.1.113883.6.12": CPT,
    "2.16.840.1.113883.6.90": ICD10,
    "2.16.840.1.113883.12.292": CVX,
    "2.16.840.1.113883.6.59": CVX,
}
_KNOWN_URIS = frozenset(_SYSTEM_BY_OID.values())

# Provider identifier types that mean "this ID is an NPI" (the name and the NPI OID).
_NPI_TYPES = frozenset({"NPI", "2.16.840.1.113883.4.6"})


def as_dict(value: Any) -> dict[str, Any]:
    """An object field, or ``{}`` when it is ``null`` or not an object."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def first_dict(value: Any) -> dict[str, Any]:
    """The first object of an array field (``{}`` when there is none)."""
    return next((v for v in as_list(value) if isinstance(v, dict)), {})


def as_str(value: Any) -> str | None:
    """A scalar as text: ``1234`` and ``1234.0`` both become ``"1234"``; blanks become None."""
    if value is None or isinstance(value, bool | dict | list):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    return text or None


def as_float(value: Any) -> float | None:
    """A number that may arrive as a string (``"0.09"``); anything unparseable becomes None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def as_int(value: Any) -> int | None:
    number = as_float(value)
    return None if number is None else int(round(number))


_COMPACT = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?$")


def as_ts(value: Any) -> datetime | None:
    """Like ``parse_ts`` but an unparseable time is treated as absent, not as an error:
    the times Redox sends beside the record are descriptive, never its identity. The
    compact HL7 forms CCD sections carry (``20120807``, ``201208071430``) are read too."""
    text = as_str(value)
    compact = _COMPACT.match(text or "")
    if compact:
        y, mo, d, h, mi, sec = (int(g) if g else 0 for g in compact.groups())
        try:
            return datetime(y, mo, d, h, mi, sec, tzinfo=UTC)
        except ValueError:
            return None
    try:
        return parse_ts(text)
    except ValueError:
        return None


def clean_identifier(value: str) -> str:
    """HL7 CX form ``a1d4ee8aba494ca^^^&1.3.6.1…&ISO`` → its ID component ``a1d4ee8aba494ca``."""
    return value.split("^", 1)[0] if "^" in value else value


def code_system_uri(*candidates: Any) -> str | None:
    """The FHIR URI of the first recognised code system name / OID among ``candidates``;
    when none is recognised, the first one given, kept as Redox wrote it."""
    given = [c for c in (as_str(c) for c in candidates) if c]
    for candidate in given:
        if candidate in _KNOWN_URIS:
            return candidate
        oid = candidate.removeprefix("urn:oid:")
        if oid in _SYSTEM_BY_OID:
            return _SYSTEM_BY_OID[oid]
        name = candidate.upper().replace(" ", "").replace("-", "").replace("_", "")
        if name in _SYSTEM_BY_NAME:
            return _SYSTEM_BY_NAME[name]
    return given[0] if given else None


@dataclass(frozen=True, slots=True)
class Code:
    code: str | None
    system: str | None
    display: str | None


NO_CODE = Code(None, None, None)


def coded(block: Any) -> Code:
    """A Redox code object (``{Code, Codeset, Description}`` or ``{Code, CodeSystem,
    CodeSystemName, Name}``) as code / FHIR system URI / display."""
    b = as_dict(block)
    if not b:
        return NO_CODE
    code = as_str(b.get("Code"))
    system = code_system_uri(b.get("CodeSystemName"), b.get("Codeset"), b.get("CodeSystem")) if code else None
    display = as_str(b.get("Name")) or as_str(b.get("Description"))
    return Code(code, system, display)


def npi(provider: Any) -> str | None:
    """A provider's NPI: ``NPI``, else ``ID`` when its ``IDType`` says it is one."""
    p = as_dict(provider)
    direct = as_str(p.get("NPI"))
    if direct:
        return direct
    id_type = (as_str(p.get("IDType")) or "").upper()
    return as_str(p.get("ID")) if id_type in _NPI_TYPES else None


def provider_id(provider: Any) -> str | None:
    """A provider's NPI, else whatever ``ID`` it carries (provider ids are not PHI)."""
    p = as_dict(provider)
    return npi(p) or as_str(p.get("ID"))


def derived_id(kind: str, *parts: Any) -> str:
    """A stable id for a record that carries no business id of its own: ``kind`` plus a
    digest of the parts that identify it. A digest rather than the parts themselves
    because the parts include the patient's identifier, which must not show in an id."""
    digest = hashlib.sha256("|".join(as_str(p) or "" for p in parts).encode("utf-8")).hexdigest()
    return f"{kind}-{digest[:24]}"


def compact_stamp(value: datetime | None) -> str:
    return value.strftime("%Y%m%dT%H%M%SZ") if value else "undated"


# ---- value vocabularies: Redox words → the FHIR normalizer's values ------------------------


def _key(value: Any) -> str:
    return (as_str(value) or "").lower().replace("_", " ").replace("-", " ").strip()


def _slug(value: Any) -> str | None:
    text = as_str(value)
    return text.lower().replace(" ", "-").replace("_", "-") if text else None


def _lookup(value: Any, mapping: Mapping[str, str]) -> str | None:
    return mapping.get(_key(value))


SEXES = {
    "male": "male",
    "m": "male",
    "female": "female",
    "f": "female",
    "other": "other",
    "o": "other",
    "nonbinary": "other",
    "non binary": "other",
    "unknown": "unknown",
    "u": "unknown",
}


def sex(value: Any) -> str | None:
    """Redox ``Sex`` → FHIR gender; a value outside the vocabulary becomes ``unknown``."""
    if as_str(value) is None:
        return None
    return _lookup(value, SEXES) or "unknown"


PATIENT_CLASSES = {
    "inpatient": "IMP",
    "outpatient": "AMB",
    "ambulatory": "AMB",
    "emergency": "EMER",
    "observation": "OBSENC",
    "virtual": "VR",
    "telehealth": "VR",
    "home health": "HH",
}


def patient_class(value: Any) -> str | None:
    """``PatientClass`` → v3 ActCode; a class outside the vocabulary is kept as given."""
    return _lookup(value, PATIENT_CLASSES) or as_str(value)


VISIT_STATUSES = {
    "planned": "planned",
    "scheduled": "planned",
    "arrived": "arrived",
    "in progress": "in-progress",
    "active": "in-progress",
    "finished": "finished",
    "completed": "finished",
    "complete": "finished",
    "discharged": "finished",
    "canceled": "cancelled",
    "cancelled": "cancelled",
    "entered in error": "entered-in-error",
}


def visit_status(value: Any) -> str | None:
    return _lookup(value, VISIT_STATUSES)


RESULT_STATUSES = {
    "final": "final",
    "completed": "final",
    "complete": "final",
    "preliminary": "preliminary",
    "incomplete": "preliminary",
    "in process": "preliminary",
    "in progress": "preliminary",
    "pending": "preliminary",
    "corrected": "corrected",
    "amended": "corrected",
    "canceled": "cancelled",
    "cancelled": "cancelled",
    "entered in error": "entered-in-error",
}


def result_status(value: Any) -> str | None:
    """Result / order status → FHIR Observation status; unknown words are slugged."""
    return _lookup(value, RESULT_STATUSES) or _slug(value)


ABNORMAL_FLAGS = {
    "high": "H",
    "h": "H",
    "low": "L",
    "l": "L",
    "very high": "HH",
    "critical high": "HH",
    "critically high": "HH",
    "hh": "HH",
    "aa": "HH",  # the FHIR normalizer reads interpretation AA (critical abnormal) as HH
    "very low": "LL",
    "critical low": "LL",
    "critically low": "LL",
    "ll": "LL",
    "abnormal": "A",
    "very abnormal": "A",
    "a": "A",
    "normal": "N",
    "n": "N",
}


def abnormal_flag(value: Any) -> str | None:
    """``AbnormalFlag`` / ``Interpretation`` → H, L, HH, LL, A, N (else None, like FHIR)."""
    return _lookup(value, ABNORMAL_FLAGS)


APPOINTMENT_STATUSES = {
    "requested": "proposed",
    "proposed": "proposed",
    "pending": "pending",
    "scheduled": "booked",
    "booked": "booked",
    "confirmed": "booked",
    "arrived": "arrived",
    "checked in": "arrived",
    "completed": "fulfilled",
    "complete": "fulfilled",
    "fulfilled": "fulfilled",
    "canceled": "cancelled",
    "cancelled": "cancelled",
    "no show": "noshow",
    "noshow": "noshow",
    "entered in error": "entered-in-error",
}


def appointment_status(value: Any) -> str | None:
    return _lookup(value, APPOINTMENT_STATUSES)


MEDICATION_STATUSES = {
    "active": "active",
    "completed": "completed",
    "complete": "completed",
    "stopped": "stopped",
    "discontinued": "stopped",
    "on hold": "on-hold",
    "canceled": "cancelled",
    "cancelled": "cancelled",
    "entered in error": "entered-in-error",
}


def medication_status(value: Any) -> str | None:
    return _lookup(value, MEDICATION_STATUSES)


ADMINISTRATION_STATUSES = {
    "complete": "completed",
    "completed": "completed",
    "given": "completed",
    "in progress": "in-progress",
    "not given": "not-done",
    "not done": "not-done",
    "refused": "not-done",
    "held": "on-hold",
    "on hold": "on-hold",
    "stopped": "stopped",
    "entered in error": "entered-in-error",
}


def administration_status(value: Any) -> str | None:
    """``Administrations[].Status`` → FHIR MedicationAdministration status."""
    return _lookup(value, ADMINISTRATION_STATUSES) or _slug(value)


DOCUMENT_STATUSES = {
    "signed": "current",
    "final": "current",
    "current": "current",
    "available": "current",
    "replaced": "superseded",
    "superseded": "superseded",
    "entered in error": "entered-in-error",
    "deleted": "entered-in-error",
}


def document_status(value: Any) -> str | None:
    return _lookup(value, DOCUMENT_STATUSES)


PROBLEM_STATUSES = {
    "active": "active",
    "55561003": "active",
    "recurrence": "recurrence",
    "relapse": "relapse",
    "inactive": "inactive",
    "73425007": "inactive",
    "remission": "remission",
    "resolved": "resolved",
    "413322009": "resolved",
    "completed": "resolved",
}


def problem_status(status: Any) -> str | None:
    """A problem or allergy ``Status`` object (SNOMED code / name) or word → FHIR clinical status."""
    block = as_dict(status)
    if block:
        return _lookup(block.get("Code"), PROBLEM_STATUSES) or _lookup(block.get("Name"), PROBLEM_STATUSES)
    return _lookup(status, PROBLEM_STATUSES)


def source_word(status: Any) -> str | None:
    """The source's own status value: a code object's name (else its code), or the word."""
    block = as_dict(status)
    if block:
        return as_str(block.get("Name")) or as_str(block.get("Code"))
    return as_str(status)


CRITICALITIES = {
    "crith": "high",
    "high": "high",
    "high criticality": "high",
    "critl": "low",
    "low": "low",
    "low criticality": "low",
    "critu": "unable-to-assess",
    "unable to assess": "unable-to-assess",
    "unable to assess criticality": "unable-to-assess",
}


def criticality(block: Any) -> str | None:
    b = as_dict(block)
    return _lookup(b.get("Code"), CRITICALITIES) or _lookup(b.get("Name"), CRITICALITIES)


SEVERITIES = {
    "mild": "mild",
    "255604002": "mild",
    "moderate": "moderate",
    "6736007": "moderate",
    "mild to moderate": "moderate",
    "371923003": "moderate",
    "severe": "severe",
    "24484000": "severe",
    "moderate to severe": "severe",
    "371924009": "severe",
    "fatal": "severe",
    "399166001": "severe",
}


def severity(block: Any) -> str | None:
    """A severity code object → FHIR reaction severity (mild | moderate | severe)."""
    b = as_dict(block)
    return _lookup(b.get("Code"), SEVERITIES) or _lookup(b.get("Name"), SEVERITIES)


IMMUNIZATION_STATUSES = {
    "completed": "completed",
    "complete": "completed",
    "given": "completed",
    "administered": "completed",
    "not done": "not-done",
    "not given": "not-done",
    "refused": "not-done",
    "entered in error": "entered-in-error",
}


def immunization_status(value: Any) -> str | None:
    return _lookup(value, IMMUNIZATION_STATUSES)


PROCEDURE_STATUSES = {
    "completed": "completed",
    "complete": "completed",
    "active": "in-progress",
    "in progress": "in-progress",
    "aborted": "stopped",
    "stopped": "stopped",
    "cancelled": "not-done",
    "canceled": "not-done",
    "not done": "not-done",
    "held": "on-hold",
    "suspended": "on-hold",
    "on hold": "on-hold",
    "new": "preparation",
    "preparation": "preparation",
    "entered in error": "entered-in-error",
}


def procedure_status(value: Any) -> str | None:
    """A CCD procedure status (act status codes) → FHIR event status; else slugged."""
    return _lookup(value, PROCEDURE_STATUSES) or _slug(value)


REPORT_STATUSES = {
    "final": "final",
    "completed": "final",
    "complete": "final",
    "resulted": "final",
    "preliminary": "preliminary",
    "incomplete": "partial",
    "in process": "registered",
    "in progress": "partial",
    "pending": "registered",
    "corrected": "corrected",
    "amended": "amended",
    "canceled": "cancelled",
    "cancelled": "cancelled",
    "entered in error": "entered-in-error",
}


def report_status(value: Any) -> str | None:
    """``ResultsStatus`` / a panel's ``Status`` → FHIR DiagnosticReport status."""
    return _lookup(value, REPORT_STATUSES) or _slug(value)


ORDER_STATUSES = {
    "new": "active",
    "active": "active",
    "scheduled": "active",
    "in process": "active",
    "in progress": "active",
    "pending": "active",
    "resulted": "completed",
    "completed": "completed",
    "complete": "completed",
    "final": "completed",
    "on hold": "on-hold",
    "held": "on-hold",
    "canceled": "revoked",
    "cancelled": "revoked",
    "discontinued": "revoked",
    "entered in error": "entered-in-error",
}


def order_status(value: Any) -> str | None:
    """An order's ``Status`` → FHIR request status (None for a word outside the vocabulary)."""
    return _lookup(value, ORDER_STATUSES)


# CCD mood codes of PlanOfCare entries → FHIR request intent.
MOOD_INTENTS = {
    "intent": "plan",
    "request": "order",
    "appointment": "order",
    "appointment request": "order",
    "proposal": "proposal",
    "promise": "directive",
    "definition": "plan",
}


def mood_intent(value: Any) -> str | None:
    return _lookup(value, MOOD_INTENTS)


# ---- document content ----------------------------------------------------------------------

_FILE_TYPES = {
    "PDF": "application/pdf",
    "XML": "application/xml",
    "CDA": "application/xml",
    "CCD": "application/xml",
    "CCDA": "application/xml",
    "TXT": "text/plain",
    "TEXT": "text/plain",
    "RTF": "application/rtf",
    "HTML": "text/html",
    "HTM": "text/html",
    "JPG": "image/jpeg",
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "TIF": "image/tiff",
    "TIFF": "image/tiff",
    "DOC": "application/msword",
    "DOCX": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}


def content_type(file_type: Any, file_name: Any, content: bytes | None) -> str | None:
    """MIME type from ``FileType``, else the file name's extension, else the content's
    first bytes; ``application/octet-stream`` for content nothing identifies."""
    declared = (as_str(file_type) or "").upper().lstrip(".")
    if declared in _FILE_TYPES:
        return _FILE_TYPES[declared]
    if "/" in declared:  # already a MIME type
        return declared.lower()
    name = as_str(file_name) or ""
    extension = name.rsplit(".", 1)[-1].upper() if "." in name else ""
    if extension in _FILE_TYPES:
        return _FILE_TYPES[extension]
    if content:
        head = content.lstrip()[:5]
        if head.startswith(b"%PDF"):
            return "application/pdf"
        if head.startswith(b"<"):
            return "application/xml"
        return "application/octet-stream"
    return None


def decode_content(file_contents: Any, *, plain_text: bool) -> bytes | None:
    """The document's bytes: plain text as UTF-8, base64 decoded strictly. Blob URIs
    (``https://blob.redoxengine.com/…``) and placeholders that are not base64 give None."""
    text = as_str(file_contents)
    if text is None:
        return None
    if plain_text:
        return text.encode("utf-8")
    if text.startswith(("http://", "https://")):
        return None
    compact = "".join(text.split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data or None
