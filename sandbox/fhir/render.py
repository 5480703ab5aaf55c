"""Canonical records -> FHIR R4 resources, as Redox's FHIR API returns them.

Pure functions of (record, connection). Practitioners and locations are not served as
resources of their own, so they travel as ``contained`` resources; encounters are referenced
logically by visit number because results, medications and documents only know that.
Every resource rendered here validates with ``fhir.resources.R4B`` (tests pin it).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from sandbox.config import ConnectionSpec
from sandbox.fhir import identifiers as ids
from sandbox.fhir import operations
from sandbox.population.records import (
    SNOMED,
    AllergyRecord,
    AppointmentRecord,
    Change,
    Coding,
    Component,
    DiagnosticReportRecord,
    DocumentRecord,
    EncounterRecord,
    ImmunizationRecord,
    Location,
    MedicationRecord,
    OrderRecord,
    PatientRecord,
    ProblemRecord,
    ProcedureRecord,
    Provider,
    Record,
    ResultRecord,
)

# FHIR resource type -> sandbox entity. Binary is a document's content.
RESOURCE_ENTITIES: dict[str, str] = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Observation": "results",
    "MedicationRequest": "medications",
    "MedicationStatement": "medications",
    "Appointment": "appointments",
    "DocumentReference": "documents",
    "Binary": "documents",
    "Condition": "problems",
    "AllergyIntolerance": "allergies",
    "Immunization": "immunizations",
    "Procedure": "procedures",
    "DiagnosticReport": "diagnostic_reports",
    "ServiceRequest": "orders",
}
# Medications are one entity rendered as two resource types (Query.category picks one).
MEDICATION_KINDS: dict[str, str] = {"MedicationRequest": "request", "MedicationStatement": "statement"}

_NAMESPACE = uuid.UUID("5b0f7f4e-3a56-4c59-9b0a-0d3f1c7a2e11")

INTERPRETATION_DISPLAY = {
    "H": "High",
    "L": "Low",
    "HH": "Critical high",
    "LL": "Critical low",
    "A": "Abnormal",
    "N": "Normal",
}
OBSERVATION_CATEGORY_DISPLAY = {
    "laboratory": "Laboratory",
    "vital-signs": "Vital Signs",
    "social-history": "Social History",
    "survey": "Survey",
    "exam": "Exam",
    "imaging": "Imaging",
    "procedure": "Procedure",
    "therapy": "Therapy",
    "activity": "Activity",
}
ENCOUNTER_CLASS_DISPLAY = {
    "AMB": "ambulatory",
    "IMP": "inpatient encounter",
    "EMER": "emergency",
    "OBSENC": "observation encounter",
    "VR": "virtual",
    "HH": "home health",
}
MARITAL_CODES = {
    "married": ("M", "Married"),
    "single": ("S", "Never Married"),
    "never married": ("S", "Never Married"),
    "divorced": ("D", "Divorced"),
    "widowed": ("W", "Widowed"),
    "separated": ("L", "Legally Separated"),
    "legally separated": ("L", "Legally Separated"),
    "domestic partner": ("T", "Domestic partner"),
    "unknown": ("UNK", "unknown"),
}
RACE_CODES = {
    "white": "2106-3",
    "black or african american": "2054-5",
    "asian": "2028-9",
    "american indian or alaska native": "1002-5",
    "native hawaiian or other pacific islander": "2076-8",
}
ETHNICITY_CODES = {"hispanic or latino": "2135-2", "not hispanic or latino": "2186-5"}
# MedicationStatement has no "cancelled": a statement about a medication never started is "not-taken".
STATEMENT_STATUS = {"cancelled": "not-taken"}
# Location levels, most general first: (record attribute, contained id, physical type code, display).
LOCATION_LEVELS = (
    ("facility", "loc-facility", "si", "Site"),
    ("department", "loc-department", "wa", "Ward"),
    ("room", "loc-room", "ro", "Room"),
    ("bed", "loc-bed", "bd", "Bed"),
)
UNITS_OF_TIME = {
    "s": "s",
    "sec": "s",
    "second": "s",
    "min": "min",
    "minute": "min",
    "h": "h",
    "hr": "h",
    "hour": "h",
    "d": "d",
    "day": "d",
    "wk": "wk",
    "week": "wk",
    "mo": "mo",
    "month": "mo",
    "a": "a",
    "year": "a",
}


# --- small shapes ---------------------------------------------------------------------------


def instant(value: datetime) -> str:
    """FHIR instant/dateTime in UTC with a ``Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def format_number(value: float) -> str:
    """The text form of a numeric value (``5`` not ``5.0``); the seed loader uses it for value_text."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() and abs(value) < 1e15 else float(value)


def coding(c: Coding) -> dict[str, str]:
    out = {"system": c.system, "code": c.code}
    if c.display:
        out["display"] = c.display
    return out


def concept(c: Coding) -> dict[str, Any]:
    if not c.code:  # known by its text alone (outside data)
        return {"text": c.display}
    out: dict[str, Any] = {"coding": [coding(c)]}
    if c.display:
        out["text"] = c.display
    return out


def _text_concept(text: str) -> dict[str, str]:
    return {"text": text}


def meta(record: Record, tags: list[dict[str, str]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"versionId": str(record.version), "lastUpdated": instant(record.last_updated)}
    if tags:
        out["tag"] = tags
    return out


def _quantity(value: float, unit: str | None, ucum: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"value": _json_number(value)}
    if unit:
        out["unit"] = unit
        if ucum:
            out["system"] = ids.UCUM
            out["code"] = unit
    return out


def _visit_reference(conn: ConnectionSpec, visit_number: str) -> dict[str, Any]:
    """A logical Encounter reference: results and documents only know the visit number."""
    return {"type": "Encounter", "identifier": {"system": ids.visit_system(conn.slug), "value": visit_number}}


def _patient_reference(patient_id: str) -> dict[str, str]:
    return {"reference": ids.patient_reference(patient_id), "type": "Patient"}


def practitioner(provider: Provider, local_id: str) -> dict[str, Any]:
    """A contained Practitioner; one known without an NPI (outside data) carries no identifier."""
    name: dict[str, Any] = {}
    if provider.last_name:
        name["family"] = provider.last_name
    if provider.first_name:
        name["given"] = [provider.first_name]
    if provider.credentials:
        name["suffix"] = list(provider.credentials)
    out: dict[str, Any] = {"resourceType": "Practitioner", "id": local_id}
    if provider.npi:
        out["identifier"] = [{"system": ids.NPI, "value": provider.npi}]
    if name:
        out["name"] = [name]
    return out


def practitioner_reference(provider: Provider, local_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {"reference": f"#{local_id}", "type": "Practitioner"}
    if provider.npi:
        out["identifier"] = {"system": ids.NPI, "value": provider.npi}
    display = " ".join(p for p in (provider.first_name, provider.last_name) if p)
    if display:
        out["display"] = display
    return out


def locations(location: Location) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Contained Location resources (facility > department > room > bed, linked by partOf),
    each with its physical type concept, most general first."""
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    parent: str | None = None
    for attr, local_id, code, display in LOCATION_LEVELS:
        name = getattr(location, attr)
        if not name:
            continue
        physical = {"coding": [{"system": ids.LOCATION_PHYSICAL_TYPE, "code": code, "display": display}]}
        resource: dict[str, Any] = {
            "resourceType": "Location",
            "id": local_id,
            "status": "active",
            "name": name,
            "mode": "instance",
            "physicalType": physical,
        }
        if attr == "department" and location.type:
            resource["type"] = [_text_concept(location.type)]
        if parent:
            resource["partOf"] = {"reference": f"#{parent}"}
        parent = local_id
        out.append((resource, physical))
    return out


# --- resources --------------------------------------------------------------------------------


def render_patient(r: PatientRecord, conn: ConnectionSpec) -> dict[str, Any]:
    identifier: list[dict[str, Any]] = []
    values = {"MR": r.mrn, "EHRID": r.ehr_id, "NIST": r.nist_id}
    for id_type in ids.PATIENT_ID_TYPES:
        value = values[id_type]
        if value and id_type in conn.id_types:
            ident: dict[str, Any] = {"system": ids.patient_system(conn.slug, id_type), "value": value}
            if id_type == "MR":
                ident = {
                    "use": "usual",
                    "type": {"coding": [{"system": ids.V2_IDENTIFIER_TYPE, "code": "MR"}]},
                    **ident,
                }
            identifier.append(ident)
    identifier.append({"system": ids.ENTERPRISE_SYSTEM, "value": r.enterprise_id})
    if r.ssn:
        identifier.append(
            {
                "type": {"coding": [{"system": ids.V2_IDENTIFIER_TYPE, "code": "SS"}]},
                "system": ids.SSN_SYSTEM,
                "value": r.ssn,
            }
        )
    name: dict[str, Any] = {"use": "official", "family": r.family_name}
    if r.given_names:
        name["given"] = list(r.given_names)
    out: dict[str, Any] = {
        "resourceType": "Patient",
        "id": r.id,
        "meta": meta(
            r,
            [{"system": ids.V3_ACT_REASON, "code": "HTEST", "display": "test health data"}]
            if r.is_test
            else None,
        ),
    }
    extension = []
    if r.race:
        extension.append(_omb_extension(ids.US_CORE_RACE, r.race, RACE_CODES))
    if r.ethnicity:
        extension.append(_omb_extension(ids.US_CORE_ETHNICITY, r.ethnicity, ETHNICITY_CODES))
    if extension:
        out["extension"] = extension
    out["identifier"] = identifier
    out["active"] = r.active
    out["name"] = [name]
    telecom = []
    if r.phone_home:
        telecom.append({"system": "phone", "value": r.phone_home, "use": "home"})
    if r.phone_mobile:
        telecom.append({"system": "phone", "value": r.phone_mobile, "use": "mobile"})
    if r.email:
        telecom.append({"system": "email", "value": r.email})
    if telecom:
        out["telecom"] = telecom
    out["gender"] = r.sex
    out["birthDate"] = r.birth_date.isoformat()
    if r.deceased_at:
        out["deceasedDateTime"] = instant(r.deceased_at)
    address = {
        k: v
        for k, v in (
            ("line", [r.address_line] if r.address_line else None),
            ("city", r.city),
            ("district", r.county),
            ("state", r.state),
            ("postalCode", r.postal_code),
        )
        if v
    }
    if address:
        out["address"] = [{"use": "home", **address}]
    if r.marital_status:
        known = MARITAL_CODES.get(r.marital_status.lower())
        status: dict[str, Any] = {"text": r.marital_status}
        if known:
            status["coding"] = [{"system": ids.V3_MARITAL_STATUS, "code": known[0], "display": known[1]}]
        out["maritalStatus"] = status
    if r.language:
        out["communication"] = [
            {
                "language": {"coding": [{"system": ids.BCP47, "code": r.language}], "text": r.language},
                "preferred": True,
            }
        ]
    return out


def _omb_extension(url: str, text: str, codes: dict[str, str]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    code = codes.get(text.lower())
    if code:
        parts.append(
            {
                "url": "ombCategory",
                "valueCoding": {"system": ids.CDC_RACE_ETHNICITY, "code": code, "display": text},
            }
        )
    parts.append({"url": "text", "valueString": text})
    return {"url": url, "extension": parts}


def render_encounter(r: EncounterRecord, conn: ConnectionSpec) -> dict[str, Any]:
    located = locations(r.location) if r.location else []
    contained = [
        *([practitioner(r.attending, "attending")] if r.attending else []),
        *(res for res, _ in located),
    ]
    identifier = [{"use": "official", "system": ids.visit_system(conn.slug), "value": r.visit_number}]
    if r.account_number:
        identifier.append({"system": ids.account_system(conn.slug), "value": r.account_number})
    period = {"start": instant(r.start_at)}
    if r.end_at:
        period["end"] = instant(r.end_at)
    out: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": r.id,
        "meta": meta(r),
        "contained": contained,
        "identifier": identifier,
        "status": r.status,
        "class": {
            "system": ids.V3_ACT_CODE,
            "code": r.class_code,
            "display": ENCOUNTER_CLASS_DISPLAY[r.class_code],
        },
        "type": [concept(r.type)] if r.type else [],
        "subject": _patient_reference(r.patient.patient_id),
        "participant": [
            {
                "type": [
                    {"coding": [{"system": ids.V3_PARTICIPATION_TYPE, "code": "ATND", "display": "attender"}]}
                ],
                "individual": practitioner_reference(r.attending, "attending"),
            }
        ]
        if r.attending
        else [],
        "period": period,
    }
    if r.appointment_id:
        out["appointment"] = [{"reference": f"Appointment/{r.appointment_id}"}]
    for key in ("contained", "type", "participant"):
        if not out[key]:
            del out[key]
    if r.reason:
        out["reasonCode"] = [concept(r.reason)]
    if r.discharge_disposition:
        out["hospitalization"] = {"dischargeDisposition": concept(r.discharge_disposition)}
    if located:
        out["location"] = [
            {"location": {"reference": f"#{res['id']}", "display": res["name"]}, "physicalType": physical}
            for res, physical in located
        ]
    return out


_ORDER_STATUS = {
    "final": "completed",
    "corrected": "completed",
    "preliminary": "active",
    "cancelled": "revoked",
    "entered-in-error": "entered-in-error",
}


def render_observation(r: ResultRecord, conn: ConnectionSpec) -> dict[str, Any]:
    order = {
        "resourceType": "ServiceRequest",
        "id": "order",
        "identifier": [{"system": ids.order_system(conn.slug), "value": r.order_id}],
        "status": _ORDER_STATUS[r.status],
        "intent": "order",
        "code": concept(r.panel),
        "subject": _patient_reference(r.patient.patient_id),
    }
    contained: list[dict[str, Any]] = [order]
    performer: list[dict[str, Any]] = []
    if r.performer:
        contained.append(practitioner(r.performer, "performer"))
        performer.append(practitioner_reference(r.performer, "performer"))
    if r.producer:
        performer.append({"type": "Organization", "display": r.producer})
    category_coding = {"system": ids.OBSERVATION_CATEGORY, "code": r.category}
    if r.category in OBSERVATION_CATEGORY_DISPLAY:
        category_coding["display"] = OBSERVATION_CATEGORY_DISPLAY[r.category]
    out: dict[str, Any] = {
        "resourceType": "Observation",
        "id": r.id,
        "meta": meta(r),
        "contained": contained,
        "identifier": [{"system": ids.result_system(conn.slug), "value": r.result_id}],
        "basedOn": [
            {
                "reference": "#order",
                "type": "ServiceRequest",
                "identifier": {"system": ids.order_system(conn.slug), "value": r.order_id},
            }
        ],
        "status": r.status,
        **({"category": [{"coding": [category_coding]}]} if r.category else {}),
        "code": concept(r.code),
        "subject": _patient_reference(r.patient.patient_id),
    }
    if r.visit_number:
        out["encounter"] = _visit_reference(conn, r.visit_number)
    out["effectiveDateTime"] = instant(r.effective_at)
    if r.issued_at:
        out["issued"] = instant(r.issued_at)
    if performer:
        out["performer"] = performer
    if r.components:
        pass  # a component-only Observation (blood pressure panel): the values are in component[]
    elif r.value_type == "Numeric" and r.value_numeric is not None:
        out["valueQuantity"] = _quantity(r.value_numeric, r.unit, ucum=True)
    elif r.value_type == "Coded Entry" and (r.value_text or r.value_code):
        if r.value_code is not None:
            out["valueCodeableConcept"] = concept(r.value_code)
        else:
            out["valueCodeableConcept"] = _text_concept(r.value_text or "")
    elif r.value_text:
        out["valueString"] = r.value_text
    else:
        out["dataAbsentReason"] = {"coding": [{"system": ids.DATA_ABSENT_REASON, "code": "unknown"}]}
    if r.abnormal_flag:
        out["interpretation"] = [_interpretation(r.abnormal_flag)]
    reference_range = _reference_range(r.reference_low, r.reference_high, r.reference_text, r.unit)
    if reference_range:
        out["referenceRange"] = [reference_range]
    if r.components:
        out["component"] = [_component(c) for c in r.components]
    return out


def _interpretation(flag: str) -> dict[str, Any]:
    display = INTERPRETATION_DISPLAY.get(flag)
    coded = {"system": ids.V3_INTERPRETATION, "code": flag}
    if display:
        coded["display"] = display
    return {"coding": [coded]}


def _reference_range(low: float | None, high: float | None, text: str | None, unit: str | None) -> dict:
    out: dict[str, Any] = {}
    if low is not None:
        out["low"] = _quantity(low, unit, ucum=True)
    if high is not None:
        out["high"] = _quantity(high, unit, ucum=True)
    if text:
        out["text"] = text
    return out


def _component(c: Component) -> dict[str, Any]:
    out: dict[str, Any] = {"code": concept(c.code)}
    if c.value_numeric is not None:
        out["valueQuantity"] = _quantity(c.value_numeric, c.unit, ucum=True)
    elif c.value_text:
        out["valueString"] = c.value_text
    else:
        out["dataAbsentReason"] = {"coding": [{"system": ids.DATA_ABSENT_REASON, "code": "unknown"}]}
    if c.abnormal_flag:
        out["interpretation"] = [_interpretation(c.abnormal_flag)]
    reference_range = _reference_range(c.reference_low, c.reference_high, None, c.unit)
    if reference_range:
        out["referenceRange"] = [reference_range]
    return out


def _status_concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _with_provider(out: dict[str, Any], provider: Provider | None, local_id: str) -> dict[str, Any] | None:
    """Adds the contained Practitioner; returns the reference to it (None without a provider)."""
    if provider is None:
        return None
    out.setdefault("contained", []).append(practitioner(provider, local_id))
    return practitioner_reference(provider, local_id)


def render_condition(r: ProblemRecord, conn: ConnectionSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Condition", "id": r.id, "meta": meta(r)}
    recorder = _with_provider(out, r.recorder, "recorder")
    out["identifier"] = [{"system": ids.problem_system(conn.slug), "value": r.problem_id}]
    error = r.status == "entered-in-error"
    if not error:  # con-5: no clinicalStatus on an entered-in-error Condition
        out["clinicalStatus"] = _status_concept(ids.CONDITION_CLINICAL, r.status)
    out["verificationStatus"] = _status_concept(
        ids.CONDITION_VERIFICATION, "entered-in-error" if error else "confirmed"
    )
    category_display = {
        "problem-list-item": "Problem List Item",
        "encounter-diagnosis": "Encounter Diagnosis",
    }
    category = {"system": ids.CONDITION_CATEGORY, "code": r.category}
    if r.category in category_display:
        category["display"] = category_display[r.category]
    out["category"] = [{"coding": [category]}]
    codings = [coding(c) for c in (r.code, r.alt_code) if c is not None and c.code]
    out["code"] = {"coding": codings, "text": r.code.display or (r.alt_code.display if r.alt_code else "")}
    for key in ("coding", "text"):
        if not out["code"][key]:
            del out["code"][key]
    out["subject"] = _patient_reference(r.patient.patient_id)
    if r.visit_number:
        out["encounter"] = _visit_reference(conn, r.visit_number)
    out["onsetDateTime"] = instant(r.onset_at)
    if r.abated_at and not error:
        out["abatementDateTime"] = instant(r.abated_at)
    out["recordedDate"] = instant(r.recorded_at)
    if recorder:
        out["recorder"] = recorder
    return out


def render_allergy(r: AllergyRecord, conn: ConnectionSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "AllergyIntolerance", "id": r.id, "meta": meta(r)}
    recorder = _with_provider(out, r.recorder, "recorder")
    out["identifier"] = [{"system": ids.allergy_system(conn.slug), "value": r.allergy_id}]
    error = r.status == "entered-in-error"
    if not error:  # ait-2: no clinicalStatus on an entered-in-error AllergyIntolerance
        out["clinicalStatus"] = _status_concept(ids.ALLERGY_CLINICAL, r.status)
    out["verificationStatus"] = _status_concept(
        ids.ALLERGY_VERIFICATION, "entered-in-error" if error else "confirmed"
    )
    if r.kind:
        out["type"] = r.kind
    if r.category:
        out["category"] = [r.category]
    if r.criticality:
        out["criticality"] = r.criticality
    out["code"] = concept(r.substance)
    out["patient"] = _patient_reference(r.patient.patient_id)
    if r.onset_at:
        out["onsetDateTime"] = instant(r.onset_at)
    out["recordedDate"] = instant(r.recorded_at)
    if recorder:
        out["recorder"] = recorder
    if r.reaction:
        reaction: dict[str, Any] = {"manifestation": [concept(r.reaction)]}
        if r.severity:
            reaction["severity"] = r.severity
        out["reaction"] = [reaction]
    return out


def render_immunization(r: ImmunizationRecord, conn: ConnectionSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Immunization", "id": r.id, "meta": meta(r)}
    performer = _with_provider(out, r.performer, "performer")
    out["identifier"] = [{"system": ids.immunization_system(conn.slug), "value": r.immunization_id}]
    out["status"] = r.status
    if r.status_reason:
        out["statusReason"] = concept(r.status_reason)
    out["vaccineCode"] = concept(r.vaccine)
    out["patient"] = _patient_reference(r.patient.patient_id)
    if r.visit_number:
        out["encounter"] = _visit_reference(conn, r.visit_number)
    out["occurrenceDateTime"] = instant(r.occurred_at)
    out["recorded"] = instant(r.recorded_at)
    out["primarySource"] = True
    if r.manufacturer:
        out["manufacturer"] = {"display": r.manufacturer}
    if r.lot_number:
        out["lotNumber"] = r.lot_number
    if r.route:
        out["route"] = concept(r.route)
    if r.dose_quantity is not None:
        out["doseQuantity"] = _quantity(r.dose_quantity, r.dose_unit, ucum=True)
    if performer:
        out["performer"] = [{"actor": performer}]
    return out


def render_procedure(r: ProcedureRecord, conn: ConnectionSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Procedure", "id": r.id, "meta": meta(r)}
    performer = _with_provider(out, r.performer, "performer")
    out["identifier"] = [{"system": ids.procedure_system(conn.slug), "value": r.procedure_id}]
    out["status"] = r.status
    out["code"] = concept(r.code)
    out["subject"] = _patient_reference(r.patient.patient_id)
    if r.visit_number:
        out["encounter"] = _visit_reference(conn, r.visit_number)
    period = {"start": instant(r.performed_start)}
    if r.performed_end:
        period["end"] = instant(r.performed_end)
    out["performedPeriod"] = period
    if performer:
        out["performer"] = [{"actor": performer}]
    if r.reason:
        out["reasonCode"] = [concept(r.reason)]
    if r.body_site:
        out["bodySite"] = [concept(r.body_site)]
    return out


def render_diagnostic_report(r: DiagnosticReportRecord, conn: ConnectionSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "DiagnosticReport", "id": r.id, "meta": meta(r)}
    performer = _with_provider(out, r.performer, "performer")
    order_identifier = {"system": ids.order_system(conn.slug), "value": r.order_id}
    out["identifier"] = [order_identifier]
    out["basedOn"] = [{"type": "ServiceRequest", "identifier": order_identifier}]
    out["status"] = r.status
    out["category"] = [
        {"coding": [{"system": ids.DIAGNOSTIC_SERVICE_SECTION, "code": "LAB", "display": "Laboratory"}]}
    ]
    out["code"] = concept(r.code)
    out["subject"] = _patient_reference(r.patient.patient_id)
    if r.visit_number:
        out["encounter"] = _visit_reference(conn, r.visit_number)
    out["effectiveDateTime"] = instant(r.effective_at)
    if r.issued_at:
        out["issued"] = instant(r.issued_at)
    performers = [performer] if performer else []
    if r.producer:
        performers.append({"type": "Organization", "display": r.producer})
    if performers:
        out["performer"] = performers
    if r.result_ids:
        out["result"] = [
            {
                "reference": f"Observation/{rid}",
                "type": "Observation",
                **({"identifier": {"system": ids.result_system(conn.slug), "value": bid}} if bid else {}),
            }
            for rid, bid in zip(
                r.result_ids, r.result_business_ids or (None,) * len(r.result_ids), strict=True
            )
        ]
    return out


LAB_PROCEDURE = Coding(SNOMED, "108252007", "Laboratory procedure")


def render_service_request(r: OrderRecord, conn: ConnectionSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "ServiceRequest", "id": r.id, "meta": meta(r)}
    requester = _with_provider(out, r.requester, "requester")
    out["identifier"] = [{"system": ids.order_system(conn.slug), "value": r.order_id}]
    out["status"] = r.status
    out["intent"] = r.intent
    out["category"] = [concept(LAB_PROCEDURE)]
    if r.priority:
        out["priority"] = r.priority
    out["code"] = concept(r.code)
    out["subject"] = _patient_reference(r.patient.patient_id)
    if r.visit_number:
        out["encounter"] = _visit_reference(conn, r.visit_number)
    out["occurrenceDateTime"] = instant(r.occurrence_at)
    out["authoredOn"] = instant(r.authored_at)
    if requester:
        out["requester"] = requester
    if r.reason:
        out["reasonCode"] = [concept(r.reason)]
    return out


def _dosage(r: MedicationRecord) -> dict[str, Any]:
    dosage: dict[str, Any] = {}
    repeat: dict[str, Any] = {}
    bounds = {}
    if r.start_at:
        bounds["start"] = instant(r.start_at)
    if r.end_at:
        bounds["end"] = instant(r.end_at)
    if bounds:
        repeat["boundsPeriod"] = bounds
    if r.frequency_period is not None and r.frequency_unit:
        repeat["frequency"] = 1
        repeat["period"] = _json_number(r.frequency_period)
        unit = r.frequency_unit.lower().rstrip("s") if len(r.frequency_unit) > 1 else r.frequency_unit
        repeat["periodUnit"] = UNITS_OF_TIME.get(unit, r.frequency_unit)
    if repeat:
        dosage["timing"] = {"repeat": repeat}
    if r.route:
        dosage["route"] = concept(r.route)
    if r.dose_quantity is not None:
        dosage["doseAndRate"] = [{"doseQuantity": _quantity(r.dose_quantity, r.dose_unit, ucum=False)}]
    return dosage


def render_medication(r: MedicationRecord, conn: ConnectionSpec) -> dict[str, Any]:
    """MedicationRequest or MedicationStatement, by ``r.kind``."""
    is_request = r.kind == "request"
    out: dict[str, Any] = {
        "resourceType": "MedicationRequest" if is_request else "MedicationStatement",
        "id": r.id,
        "meta": meta(r),
    }
    if r.prescriber:
        out["contained"] = [practitioner(r.prescriber, "prescriber")]
    out["identifier"] = [{"system": ids.order_system(conn.slug), "value": r.order_id}]
    dosage = _dosage(r)
    if is_request:
        out["status"] = r.status
        out["intent"] = r.intent or "order"
        out["medicationCodeableConcept"] = concept(r.code)
        out["subject"] = _patient_reference(r.patient.patient_id)
        if r.visit_number:
            out["encounter"] = _visit_reference(conn, r.visit_number)
        if r.start_at:
            out["authoredOn"] = instant(r.start_at)
        if r.prescriber:
            out["requester"] = practitioner_reference(r.prescriber, "prescriber")
        if dosage:
            out["dosageInstruction"] = [dosage]
    else:
        out["status"] = STATEMENT_STATUS.get(r.status, r.status)
        out["medicationCodeableConcept"] = concept(r.code)
        out["subject"] = _patient_reference(r.patient.patient_id)
        if r.visit_number:
            out["context"] = _visit_reference(conn, r.visit_number)
        period = {}
        if r.start_at:
            period["start"] = instant(r.start_at)
        if r.end_at:
            period["end"] = instant(r.end_at)
        if period:
            out["effectivePeriod"] = period
        out["dateAsserted"] = instant(r.last_updated)
        if r.prescriber:
            out["informationSource"] = practitioner_reference(r.prescriber, "prescriber")
        if dosage:
            out["dosage"] = [dosage]
    return out


def render_appointment(r: AppointmentRecord, conn: ConnectionSpec) -> dict[str, Any]:
    located = locations(r.location) if r.location else []
    contained = [
        *([practitioner(r.provider, "provider")] if r.provider else []),
        *(res for res, _ in located),
    ]
    participant_status = "needs-action" if r.status in ("proposed", "pending") else "accepted"
    participants: list[dict[str, Any]] = [
        {
            "actor": _patient_reference(r.patient.patient_id),
            "required": "required",
            "status": participant_status,
        },
    ]
    if r.provider:
        participants.append(
            {
                "type": [
                    {
                        "coding": [
                            {
                                "system": ids.V3_PARTICIPATION_TYPE,
                                "code": "PPRF",
                                "display": "primary performer",
                            }
                        ]
                    }
                ],
                "actor": practitioner_reference(r.provider, "provider"),
                "required": "required",
                "status": participant_status,
            }
        )
    if located:
        leaf = located[-1][0]
        participants.append(
            {
                "actor": {"reference": f"#{leaf['id']}", "type": "Location", "display": leaf["name"]},
                "required": "required",
                "status": participant_status,
            }
        )
    out: dict[str, Any] = {"resourceType": "Appointment", "id": r.id, "meta": meta(r)}
    if contained:
        out["contained"] = contained
    if r.rescheduled_from:
        out["extension"] = [{"url": ids.RESCHEDULED_FROM_EXTENSION, "valueString": r.rescheduled_from}]
    out["identifier"] = [{"use": "official", "system": ids.visit_system(conn.slug), "value": r.visit_number}]
    out["status"] = r.status
    if r.cancel_reason:
        out["cancelationReason"] = _text_concept(r.cancel_reason)
    if r.type:
        out["appointmentType"] = concept(r.type)
    if r.reason:
        out["reasonCode"] = [_text_concept(r.reason)]
    out["start"] = instant(r.start_at)
    if r.duration_minutes:
        out["end"] = instant(r.start_at + timedelta(minutes=r.duration_minutes))
        out["minutesDuration"] = r.duration_minutes
    out["participant"] = participants
    return out


def content_hash(content: bytes) -> str:
    """Attachment.hash: base64 of the SHA-1 of the data (FHIR R4)."""
    return base64.b64encode(hashlib.sha1(content).digest()).decode()


def render_document(r: DocumentRecord, conn: ConnectionSpec) -> dict[str, Any]:
    kind_code, kind_display = ("CDA", "CDA") if r.kind == "cda" else ("Note", "Note")
    out: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": r.id,
        "meta": meta(r),
        "contained": [practitioner(r.author, "author")] if r.author else [],
        "identifier": [{"system": ids.document_system(conn.slug), "value": r.document_id}],
        "status": r.status,
        "docStatus": "final",
        "type": concept(r.type),
        "category": [
            {
                "coding": [
                    {"system": ids.DOCUMENT_CATEGORY, "code": "clinical-note", "display": "Clinical Note"}
                ]
            },
            {"coding": [{"system": ids.DOCUMENT_KIND, "code": kind_code, "display": kind_display}]},
        ],
        "subject": _patient_reference(r.patient.patient_id),
        "date": instant(r.authored_at),
        "author": [practitioner_reference(r.author, "author")] if r.author else [],
        "description": r.title,
        "content": [
            {
                "attachment": {
                    "contentType": r.content_type,
                    "url": f"Binary/{r.id}",
                    "size": len(r.content),
                    "hash": content_hash(r.content),
                    "title": r.title,
                    "creation": instant(r.authored_at),
                }
            }
        ],
    }
    if r.visit_number:
        out["context"] = {"encounter": [_visit_reference(conn, r.visit_number)]}
    for key in ("contained", "author"):
        if not out[key]:
            del out[key]
    return out


def render_binary(r: DocumentRecord) -> dict[str, Any]:
    return {
        "resourceType": "Binary",
        "id": r.id,
        "meta": meta(r),
        "contentType": r.content_type,
        "data": base64.b64encode(r.content).decode(),
    }


_RENDERERS = {
    PatientRecord: render_patient,
    EncounterRecord: render_encounter,
    ResultRecord: render_observation,
    MedicationRecord: render_medication,
    AppointmentRecord: render_appointment,
    DocumentRecord: render_document,
    ProblemRecord: render_condition,
    AllergyRecord: render_allergy,
    ImmunizationRecord: render_immunization,
    ProcedureRecord: render_procedure,
    DiagnosticReportRecord: render_diagnostic_report,
    OrderRecord: render_service_request,
}


def resource_type(record: Record) -> str:
    """The FHIR resource type a record renders as."""
    if isinstance(record, MedicationRecord):
        return "MedicationRequest" if record.kind == "request" else "MedicationStatement"
    return {
        PatientRecord: "Patient",
        EncounterRecord: "Encounter",
        ResultRecord: "Observation",
        AppointmentRecord: "Appointment",
        DocumentRecord: "DocumentReference",
        ProblemRecord: "Condition",
        AllergyRecord: "AllergyIntolerance",
        ImmunizationRecord: "Immunization",
        ProcedureRecord: "Procedure",
        DiagnosticReportRecord: "DiagnosticReport",
        OrderRecord: "ServiceRequest",
    }[type(record)]


def render_resource(record: Record, conn: ConnectionSpec) -> dict[str, Any]:
    return _RENDERERS[type(record)](record, conn)


class RenderCache:
    """Rendered resource bytes per (connection, record type, id, version), bounded LRU.

    One per sandbox (not module-global) so two populations in one process never share entries.
    """

    def __init__(self, max_entries: int = 20_000) -> None:
        self._max = max_entries
        self._entries: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def resource_bytes(self, record: Record, conn: ConnectionSpec) -> bytes:
        key = (conn.id, type(record), record.id, record.version, record.last_updated)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        body = orjson.dumps(render_resource(record, conn))
        with self._lock:
            self._entries[key] = body
            if len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return body

    def __len__(self) -> int:
        return len(self._entries)


# --- notifications ----------------------------------------------------------------------------


def notification_event(change: Change) -> str:
    """The ``urn:redox:event-type`` code Redox would push for a change."""
    record = change.record
    if change.entity == "encounters" and change.kind != "cancel":
        if record.status == "planned":
            return operations.ENCOUNTER_PLANNED_EVENT
        if change.kind == "update" and record.status == "finished":
            return operations.ENCOUNTER_DISCHARGED_EVENT
    if change.entity == "appointments":
        if change.kind == "new" and record.rescheduled_from:
            return operations.APPOINTMENT_RESCHEDULED_EVENT
        if change.kind == "update" and record.status == "noshow":
            return operations.APPOINTMENT_NOSHOW_EVENT
    return operations.NOTIFICATION_EVENTS[(change.entity, change.kind)]


def render_notification(change: Change, conn: ConnectionSpec, base_url: str | None = None) -> dict[str, Any]:
    """A FHIR message Bundle as Redox pushes it to a destination (REDOX-REFERENCE §3.5):
    a MessageHeader (eventCoding ``urn:redox:event-type``, focus) then the changed resource.

    ``base_url`` is the connection's FHIR base (``SandboxState.fhir_base_url``); without it
    the entry's fullUrl is a ``urn:uuid:``.
    """
    record = change.record
    rtype = resource_type(record)
    seed = f"{conn.id}/{rtype}/{record.id}/{record.version}/{change.kind}"
    bundle_id = str(uuid.uuid5(_NAMESPACE, "bundle:" + seed))
    header_id = str(uuid.uuid5(_NAMESPACE, "header:" + seed))
    if base_url:
        full_url = f"{base_url.rstrip('/')}/{rtype}/{record.id}"
    else:
        full_url = f"urn:uuid:{uuid.uuid5(_NAMESPACE, 'resource:' + seed)}"
    header = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "eventCoding": {"system": ids.EVENT_TYPE_SYSTEM, "code": notification_event(change)},
        "source": {"name": conn.name, "endpoint": base_url or f"urn:redox:{conn.slug}"},
        "focus": [{"reference": full_url}],
    }
    return {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"lastUpdated": instant(record.last_updated)},
        "type": "message",
        "timestamp": instant(record.last_updated),
        "entry": [
            {"fullUrl": f"urn:uuid:{header_id}", "resource": header},
            {"fullUrl": full_url, "resource": render_resource(record, conn)},
        ],
    }
