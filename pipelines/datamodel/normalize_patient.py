"""Data Model ``Patient`` blocks → the patient reference of every row and ``patients`` rows.

Also holds ``EventContext``: what every row of one payload shares (lineage, the event time,
a PHI-free label for error messages).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipelines.datamodel.normalize_fields import (
    as_dict,
    as_list,
    as_str,
    as_ts,
    clean_identifier,
    sex,
)
from pipelines.normalize_common import NormalizationError, identifier_type, parse_date

HISPANIC = "Hispanic or Latino"
NOT_HISPANIC = "Not Hispanic or Latino"


@dataclass(frozen=True, slots=True)
class EventContext:
    connection_id: str
    raw_ref: str | None
    label: str  # "Results.New": names the payload in errors without any of its values
    event_time: datetime | None  # Meta.EventDateTime
    is_test: bool  # Meta.Test: the message is a test message (not a property of the patient)
    # A response to a query: its EventDateTime is when the query was answered, which says
    # nothing about when the records changed.
    from_query: bool = False

    def lineage(self, source_id: str | None, own_time: datetime | None = None) -> dict[str, Any]:
        """Lineage columns. ``source_updated_at`` is the source's own time of this version: an
        event's time (the change it announces), else the record's own last-updated or
        clinical time — never a query's response time, which would outrank every other
        surface's version of the record whatever its age."""
        return {
            "connection_id": self.connection_id,
            "source_surface": "datamodel",
            "source_id": source_id,
            "source_updated_at": own_time if self.from_query else (self.event_time or own_time),
            "raw_ref": self.raw_ref,
        }


def identifier_map(patient: Any) -> dict[str, str]:
    """``Identifiers[]`` → identifier type → value, in payload order. Known types take the
    crosswalk's canonical names (MRN → MR); others keep their ``IDType`` (e.g. an OID)."""
    out: dict[str, str] = {}
    for ident in as_list(as_dict(patient).get("Identifiers")):
        if not isinstance(ident, dict):
            continue
        value, id_type = as_str(ident.get("ID")), as_str(ident.get("IDType"))
        if not value or not id_type:
            continue
        out.setdefault(identifier_type(None, id_type) or id_type, clean_identifier(value))
    return out


def has_identifiers(patient: Any) -> bool:
    return bool(identifier_map(patient))


def patient_reference(patient: Any, ctx: EventContext) -> dict[str, str]:
    """``patient_ref_type`` / ``patient_ref_value``: the MR when present, else the first
    identifier. Raises when the block has no usable identifier."""
    ids = identifier_map(patient)
    if not ids:
        raise NormalizationError(f"{ctx.label}: Patient has no Identifiers")
    ref_type = "MR" if "MR" in ids else next(iter(ids))
    return {"patient_ref_type": ref_type, "patient_ref_value": ids[ref_type]}


def _ethnicity(demo: dict[str, Any]) -> str | None:
    hispanic = demo.get("IsHispanic")
    if hispanic is True:
        return HISPANIC
    if hispanic is False:
        return NOT_HISPANIC
    return as_str(demo.get("Ethnicity"))


def _email(demo: dict[str, Any]) -> str | None:
    """``EmailAddresses`` holds strings in most models, ``{Address}`` objects in Clinical Summary."""
    for entry in as_list(demo.get("EmailAddresses")):
        value = as_str(entry.get("Address")) if isinstance(entry, dict) else as_str(entry)
        if value:
            return value
    return None


def _safe_date(value: Any) -> Any:
    try:
        return parse_date(as_str(value))
    except ValueError:
        return None


def _has_content(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_content(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_content(v) for v in value)
    return value not in (None, "")


def patient_row(patient: Any, ctx: EventContext) -> dict[str, Any]:
    """One ``patients`` row (plus the ``identifiers`` map the crosswalk reads)."""
    ids = identifier_map(patient)
    ref = patient_reference(patient, ctx)
    demo = as_dict(as_dict(patient).get("Demographics"))
    address = as_dict(demo.get("Address"))
    phones = as_dict(demo.get("PhoneNumber"))
    given = " ".join(n for n in (as_str(demo.get("FirstName")), as_str(demo.get("MiddleName"))) if n)
    row = ctx.lineage(ref["patient_ref_value"])
    if not _has_content(demo):
        # A reference-only block (identifiers, no demographics: result query responses,
        # events that name the patient by MR) has no cursor time, so it never outranks a
        # row that carries demographics; it still gives the crosswalk the identifiers.
        row["source_updated_at"] = None
    row.update(ref)
    row.update(
        mrn=ids.get("MR"),
        enterprise_id=ids.get("EPI"),
        family_name=as_str(demo.get("LastName")),
        given_names=given or None,
        birth_date=_safe_date(demo.get("DOB")),
        sex=sex(demo.get("Sex")),
        deceased_at=as_ts(demo.get("DeathDateTime")),
        race=as_str(demo.get("Race")),
        ethnicity=_ethnicity(demo),
        language=as_str(demo.get("Language")),
        address_line=as_str(address.get("StreetAddress")),
        city=as_str(address.get("City")),
        state=as_str(address.get("State")),
        postal_code=as_str(address.get("ZIP")),
        phone=as_str(phones.get("Home")) or as_str(phones.get("Mobile")),
        email=_email(demo),
        # Meta.Test flags the message (every message of a test environment), not the person:
        # the Data Model carries no per-patient test flag, so the column stays unknown here
        # and the FHIR surface's (HTEST tag) fills it where both are seen.
        is_test=None,
        active=True,
        identifiers=ids,
    )
    return row
