"""Small parsing helpers both surfaces' normalizers share."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime
from typing import Any


class NormalizationError(ValueError):
    """A payload cannot become a common-model row. The message names the problem, never PHI."""


def safe_reason(exc: Exception) -> str:
    """An error message safe to store and log: NormalizationError messages are written
    without PHI; anything else is reduced to its type."""
    if isinstance(exc, NormalizationError):
        return str(exc)
    return f"unexpected {type(exc).__name__} while normalizing"


# Identifier types the crosswalk knows, recognised from Redox-style systems
# (urn:redox:<slug>:MR) or from the identifier's type code.
_CANONICAL = {
    "MR": "MR",
    "MRN": "MR",
    "EHRID": "EHRID",
    "NIST": "NIST",
    "EPI": "EPI",
    "VN": "VN",
    "ORDERID": "OrderID",
    "RESULTID": "ResultID",
    "DOCUMENTID": "DocumentID",
    "PROBLEMID": "ProblemID",
    "ALLERGYID": "AllergyID",
    "IMMUNIZATIONID": "ImmunizationID",
    "PROCEDUREID": "ProcedureID",
    "SSN": "SSN",
    "NPI": "NPI",
}


def identifier_type(system: str | None, type_code: str | None) -> str | None:
    """``urn:redox:northwind:MR`` → ``MR``; ``urn:redox:enterprise:EPI`` → ``EPI``."""
    if system:
        tail = system.rsplit(":", 1)[-1] if system.startswith("urn:") else None
        if tail and tail.upper() in _CANONICAL:
            return _CANONICAL[tail.upper()]
        if system == "http://hl7.org/fhir/sid/us-ssn":
            return "SSN"
        if system == "http://hl7.org/fhir/sid/us-npi":
            return "NPI"
    if type_code and type_code.upper() in _CANONICAL:
        return _CANONICAL[type_code.upper()]
    return None


def parse_ts(value: Any) -> datetime | None:
    """ISO-8601 (with Z or offset, date-only allowed) → aware UTC datetime."""
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).strip()
    try:
        if len(text) == 10:
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise NormalizationError(f"not an ISO-8601 time ({len(text)} chars)") from exc
    return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)


def parse_date(value: Any) -> date | None:
    if value in (None, ""):
        return None
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError as exc:
        raise NormalizationError("not an ISO-8601 date") from exc


def first_coding(concept: dict[str, Any] | None) -> dict[str, Any] | None:
    if not concept:
        return None
    codings = concept.get("coding") or []
    if codings:
        return codings[0]
    if concept.get("text"):
        return {"code": None, "system": None, "display": concept["text"]}
    return None


def coding_text(coding: dict[str, Any] | None) -> str | None:
    if not coding:
        return None
    return coding.get("display") or coding.get("code")


def provider_label(ref: dict[str, Any] | None) -> str | None:
    """A provider reference → its NPI or display (provider names are not PHI)."""
    if not ref:
        return None
    ident = ref.get("identifier") or {}
    return ident.get("value") or ref.get("display")


# LOINC codes that name the same measurement: a blood-pressure panel is coded 85354-9 by
# the FHIR vital-signs profile, 55284-4 by Synthea and many EHRs, 35094-2 by older ones.
# The Data Model rebuilds a panel from its systolic and diastolic parts and cannot know
# which code the source used, so the match key treats the three as one.
SAME_MEASUREMENT = {"55284-4": "85354-9", "35094-2": "85354-9"}


def match_key(code: Any, when: Any, *, instant: bool = False, text: Any = None) -> str | None:
    """What identifies a clinical entry when a surface gives it no id: its code and the UTC
    day of its clinical time, as a short digest. Both surfaces compute it the same way, so
    publish can pair a Clinical Summary entry with the FHIR resource for the same record;
    the day (not the instant) because a summary often carries dates only — except for
    results (``instant``), measured several times a day.

    An entry known only by its text (a problem the EHR never coded) is keyed by ``text``,
    normalized (case and runs of whitespace ignored) and kept apart from codes. None
    without a code or a text."""
    if code in (None, ""):
        words = " ".join(str(text).split()).casefold() if text not in (None, "") else ""
        if not words:
            return None
        code = f"text:{words}"
    else:
        code = SAME_MEASUREMENT.get(str(code), code)
    day = ""
    if isinstance(when, datetime):
        utc = when.astimezone(UTC)
        day = utc.isoformat(timespec="seconds") if instant else utc.date().isoformat()
    elif isinstance(when, date):
        day = when.isoformat()
    return "mk_" + hashlib.sha256(f"{code}|{day}".encode()).hexdigest()[:24]
