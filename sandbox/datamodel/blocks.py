"""Shared Redox Data Model building blocks rendered from canonical records.

Field names, nesting, ``null``s and date formats follow the Redox Dev Tools examples
(``shared/redox-examples/datamodel/``, REDOX-REFERENCE §2.6): objects with every sub-field
present and ``null`` when unknown, empty arrays rather than missing ones, datetimes as
``2015-05-06T06:00:58.872Z``, dates as ``YYYY-MM-DD``. Each block carries the union of the
fields Redox uses for it across data models; ``conform.project`` trims it per event.

The value vocabularies below are the sandbox's contract with the ELT's Data Model
normalizer: it maps these strings back to the canonical values.
"""

from __future__ import annotations

import base64
import itertools
import uuid
from datetime import UTC, date, datetime
from typing import Any

from sandbox.config import ConnectionSpec
from sandbox.population.records import (
    CODESET_NAMES,
    CPT,
    CVX,
    ICD10,
    LOINC,
    RXNORM,
    SNOMED,
    Coding,
    DocumentRecord,
    Location,
    PatientRecord,
    PatientRef,
    Provider,
)

# HL7 OIDs for Clinical Summary / Medications ``CodeSystem`` (names come from CODESET_NAMES).
CODE_SYSTEM_OIDS = {
    LOINC: "2.16.840.1.113883.6.1",
    SNOMED: "2.16.840.1.113883.6.96",
    RXNORM: "2.16.840.1.113883.6.88",
    CPT: "2.16.840.1.113883.6.12",
    ICD10: "2.16.840.1.113883.6.90",
    CVX: "2.16.840.1.113883.12.292",
}

SEXES = {"male": "Male", "female": "Female", "other": "Other", "unknown": "Unknown"}
PATIENT_CLASSES = {
    "AMB": "Outpatient",
    "IMP": "Inpatient",
    "EMER": "Emergency",
    "OBSENC": "Observation",
    "VR": "Virtual",
    "HH": "Home Health",
}
VISIT_STATUSES = {
    "planned": "Planned",
    "arrived": "Arrived",
    "in-progress": "In Progress",
    "finished": "Finished",
    "cancelled": "Canceled",
    "entered-in-error": "Entered in Error",
}
RESULT_STATUSES = {
    "final": "Final",
    "preliminary": "Preliminary",
    "corrected": "Corrected",
    "cancelled": "Canceled",
    "entered-in-error": "Entered in Error",
}
# Order-level ResultsStatus uses HL7 table 0123 words (REDOX-REFERENCE §2.7).
ORDER_RESULTS_STATUSES = {**RESULT_STATUSES, "entered-in-error": "Canceled"}
ABNORMAL_FLAGS = {
    "H": "High",
    "L": "Low",
    "HH": "Critical High",
    "LL": "Critical Low",
    "A": "Abnormal",
    "N": "Normal",
}
APPOINTMENT_STATUSES = {
    "proposed": "Requested",
    "pending": "Pending",
    "booked": "Scheduled",
    "arrived": "Arrived",
    "fulfilled": "Completed",
    "cancelled": "Canceled",
    "noshow": "No Show",
    "entered-in-error": "Entered in Error",
}
MEDICATION_STATUSES = {
    "active": "Active",
    "completed": "Completed",
    "stopped": "Stopped",
    "on-hold": "On Hold",
    "cancelled": "Canceled",
    "entered-in-error": "Entered in Error",
}
# Clinical Summary statuses of the new sections (SNOMED CT status concepts for problems and
# allergies, words elsewhere): the ELT's normalizer maps them back.
CLINICAL_STATUS_CODES = {
    "active": ("55561003", "Active"),
    "inactive": ("73425007", "Inactive"),
    "resolved": ("413322009", "Resolved"),
    "entered-in-error": (None, "Entered in Error"),
    "recurrence": ("246455001", "Recurrence"),
    "relapse": ("263855007", "Relapse phase"),
    "remission": ("277022003", "Remission phase"),
}
IMMUNIZATION_STATUSES = {
    "completed": "Completed",
    "not-done": "Not Done",
    "entered-in-error": "Entered in Error",
}
PROCEDURE_STATUSES = {
    "completed": "completed",
    "in-progress": "active",
    "not-done": "cancelled",
    "entered-in-error": "nullified",
    "preparation": "new",
    "on-hold": "held",
    "stopped": "aborted",
    "unknown": None,
}
ORDER_STATUSES = {
    "active": "Active",
    "completed": "Completed",
    "revoked": "Canceled",
    "entered-in-error": "Entered in Error",
    "draft": "Draft",
    "on-hold": "On Hold",
    "unknown": None,
}
ORDER_PRIORITIES = {"routine": "Routine", "urgent": "Urgent", "asap": "ASAP", "stat": "Stat"}
ALLERGY_TYPES = {
    ("medication", "allergy"): ("416098002", "Drug allergy"),
    ("medication", "intolerance"): ("59037007", "Drug intolerance"),
    ("food", "allergy"): ("414285001", "Food allergy"),
    ("food", "intolerance"): ("235719002", "Food intolerance"),
    ("environment", "allergy"): ("426232007", "Environmental allergy"),
    ("environment", "intolerance"): ("419199007", "Allergy to substance"),
}
SEVERITY_CODES = {
    "mild": ("255604002", "Mild"),
    "moderate": ("6736007", "Moderate"),
    "severe": ("24484000", "Severe"),
}
CRITICALITY_CODES = {
    "low": ("CRITL", "Low criticality"),
    "high": ("CRITH", "High criticality"),
    "unable-to-assess": ("CRITU", "Unable to assess criticality"),
}
DOCUMENT_STATUSES = {"current": "Signed", "superseded": "Replaced", "entered-in-error": "Entered in Error"}
DOCUMENT_FILE_TYPES = {"note": "TXT", "cda": "XML"}
ETHNICITY_HISPANIC = {"Hispanic or Latino": True, "Not Hispanic or Latino": False}

# Namespace for ids the sandbox derives (sources, summary documents): stable per name.
_NAMESPACE = uuid.UUID("2f0b8a0e-4c1e-5a55-9d6c-0d3f5e2b7a10")
# The deprecated numeric Meta.Message / Meta.Transmission ids (REDOX-REFERENCE §2.2).
_message_ids = itertools.count(4_573_000_000)
_transmission_ids = itertools.count(12_414_000)


def dm_datetime(value: datetime | None) -> str | None:
    """``2015-05-06T06:00:58.872Z`` (UTC, milliseconds), as Redox writes datetimes."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def dm_date(value: date | None) -> str | None:
    return None if value is None else value.isoformat()


def number(value: float | None) -> float | int | None:
    """Whole numbers as ints (``8`` not ``8.0``), like the Redox examples."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else value


def number_text(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def new_log() -> dict[str, str]:
    return {"ID": str(uuid.uuid4()), "AttemptID": str(uuid.uuid4())}


def next_message_id() -> int:
    return next(_message_ids)


def next_transmission_id() -> int:
    return next(_transmission_ids)


def source_of(conn: ConnectionSpec) -> dict[str, str]:
    """The Redox source standing for the connection's EHR when it sends events."""
    return {"ID": str(uuid.uuid5(_NAMESPACE, f"source:{conn.id}")), "Name": conn.name}


def destination_of(conn: ConnectionSpec) -> dict[str, str]:
    return {"ID": conn.destination_id, "Name": conn.name}


def derived_id(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, ":".join(parts)))


def event_meta(
    data_model: str, event_type: str, conn: ConnectionSpec, event_time: datetime
) -> dict[str, Any]:
    """``Meta`` of an event the connection's EHR sends (webhooks): Source = the EHR."""
    return {
        "DataModel": data_model,
        "EventType": event_type,
        "EventDateTime": dm_datetime(event_time),
        "Test": True,
        "Source": source_of(conn),
        "Destinations": [destination_of(conn)],
        "Logs": [new_log()],
        "Message": {"ID": next_message_id()},
        "Transmission": {"ID": next_transmission_id()},
        "FacilityCode": None,
    }


# ---- people and places -------------------------------------------------------------------


def empty_address() -> dict[str, None]:
    return {"StreetAddress": None, "City": None, "State": None, "ZIP": None, "County": None, "Country": None}


def location_block(loc: Location | None) -> dict[str, Any]:
    if loc is None:
        return {"Type": None, "Facility": None, "Department": None, "Room": None, "Bed": None}
    return {
        "Type": loc.type,
        "Facility": loc.facility,
        "Department": loc.department,
        "Room": loc.room,
        "Bed": loc.bed,
    }


def provider_block(p: Provider | None) -> dict[str, Any]:
    npi = p.npi if p and p.npi else None  # a provider known without an NPI (outside data)
    return {
        "NPI": npi,
        "ID": npi,
        "IDType": "NPI" if npi else None,
        "FirstName": p.first_name if p else None,
        "LastName": p.last_name if p else None,
        "Credentials": list(p.credentials) if p else [],
        "Address": empty_address(),
        "EmailAddresses": [],
        "PhoneNumber": {"Office": None},
        "Location": {"Type": None, "Facility": None, "Department": None, "Room": None},
    }


def identifiers(patient: PatientRecord, conn: ConnectionSpec) -> list[dict[str, str]]:
    """The identifiers this connection's EHR emits: MR always (every record refers to it),
    EHRID / NIST when the connection's ``id_types`` say so, EPI (enterprise) always."""
    out = [{"ID": patient.mrn, "IDType": "MR"}]
    if "EHRID" in conn.id_types and patient.ehr_id:
        out.append({"ID": patient.ehr_id, "IDType": "EHRID"})
    if "NIST" in conn.id_types and patient.nist_id:
        out.append({"ID": patient.nist_id, "IDType": "NIST"})
    out.append({"ID": patient.enterprise_id, "IDType": "EPI"})
    return out


def demographics(p: PatientRecord) -> dict[str, Any]:
    given = list(p.given_names)
    return {
        "FirstName": given[0] if given else None,
        "MiddleName": " ".join(given[1:]) or None,
        "LastName": p.family_name,
        "DOB": dm_date(p.birth_date),
        "SSN": p.ssn,
        "Sex": SEXES.get(p.sex, "Unknown"),
        "Race": p.race,
        "IsHispanic": ETHNICITY_HISPANIC.get(p.ethnicity or ""),
        "Religion": None,
        "MaritalStatus": p.marital_status,
        "IsDeceased": p.deceased_at is not None,
        "DeathDateTime": dm_datetime(p.deceased_at),
        "PhoneNumber": {"Home": p.phone_home, "Office": None, "Mobile": p.phone_mobile},
        "EmailAddresses": [p.email] if p.email else [],
        "Language": p.language,
        "Citizenship": [],
        "Address": {
            "StreetAddress": p.address_line,
            "City": p.city,
            "State": p.state,
            "ZIP": p.postal_code,
            "County": p.county,
            "Country": "US",
        },
    }


def patient_block(
    conn: ConnectionSpec, ref: PatientRef | None = None, patient: PatientRecord | None = None
) -> dict:
    """The ``Patient`` object. Without the patient record (a pure event render) only the
    MR from the record's ``PatientRef`` is known, which is all Redox requires."""
    if patient is None:
        if ref is None:
            raise ValueError("patient_block needs a PatientRecord or a PatientRef")
        return {"Identifiers": [{"ID": ref.mrn, "IDType": "MR"}], "Notes": []}
    return {
        "Identifiers": identifiers(patient, conn),
        "Demographics": demographics(patient),
        "Notes": [],
        "Contacts": [],
        "Diagnoses": [],
        "Allergies": [],
        "Insurances": [],
        "PCP": provider_block(None),
    }


# ---- codes -------------------------------------------------------------------------------


def codeset(c: Coding | None) -> str | None:
    return None if c is None else CODESET_NAMES.get(c.system)


def code_description(c: Coding | None) -> dict[str, Any]:
    """``{Code, Codeset, Description}`` (Results, Order, Scheduling)."""
    return {
        "Code": c.code if c and c.code else None,
        "Codeset": codeset(c),
        "Description": c.display if c else None,
    }


def code_system(c: Coding | None) -> dict[str, Any]:
    """``{Code, CodeSystem, CodeSystemName, Name, AltCodes}`` (Medications, Clinical Summary)."""
    return {
        "Code": c.code if c and c.code else None,
        "CodeSystem": CODE_SYSTEM_OIDS.get(c.system) if c else None,
        "CodeSystemName": codeset(c),
        "Name": c.display if c else None,
        "AltCodes": [],
    }


def diagnosis(c: Coding, documented: datetime | None) -> dict[str, Any]:
    return {
        "Code": c.code,
        "Codeset": codeset(c),
        "Name": c.display,
        "Type": None,
        "DocumentedDateTime": dm_datetime(documented),
    }


# ---- documents ---------------------------------------------------------------------------


def file_name(doc: DocumentRecord) -> str:
    return f"{doc.document_id}.{DOCUMENT_FILE_TYPES[doc.kind].lower()}"


def base64_content(doc: DocumentRecord) -> str:
    return base64.b64encode(doc.content).decode("ascii")


def text_content(doc: DocumentRecord) -> str:
    return doc.content.decode("utf-8", errors="replace")
