"""FHIR R4 resources → common-model rows (pure functions, no I/O).

Each ``normalize_*`` takes one resource and the connection id and returns a dict
whose keys are the staged schema of ``pipelines.model``. A resource that cannot be
normalized raises ``NormalizationError`` naming the problem (never PHI); the
caller quarantines it. ``refs`` resolves contained (``#id``) and bundled references
(``pipelines.fhir.references``), so a Location or Practitioner given by reference only
still fills its column. The clinical-record types (Condition, AllergyIntolerance,
Immunization, Procedure, DiagnosticReport, ServiceRequest) are in ``normalize_clinical``.
"""

from __future__ import annotations

from typing import Any

import orjson

from pipelines.fhir import references as R
from pipelines.fhir.references import NO_REFS, Refs
from pipelines.normalize_common import (
    NormalizationError,
    coding_text,
    first_coding,
    identifier_type,
    match_key,
    parse_date,
    parse_ts,
)
from pipelines.vocabulary import FHIR_RESOURCE_ENTITIES

INTERPRETATION_FLAGS = {"H", "L", "HH", "LL", "A", "N", "AA"}
TEST_TAGS = frozenset({"HTEST", "TEST", "test"})
UCUM = "http://unitsofmeasure.org"


def _lineage(resource: dict[str, Any], connection_id: str, raw_ref: str | None) -> dict[str, Any]:
    meta = resource.get("meta") or {}
    return {
        "connection_id": connection_id,
        "source_surface": "fhir",
        "source_id": resource.get("id"),
        "source_updated_at": parse_ts(meta.get("lastUpdated")),
        "raw_ref": raw_ref,
    }


def _identifiers(resource: dict[str, Any]) -> dict[str, str]:
    """Identifier type (MR, EHRID, NIST, EPI, VN, OrderID, ResultID, DocumentID...) → value."""
    out: dict[str, str] = {}
    for ident in resource.get("identifier") or []:
        value = ident.get("value")
        kind = identifier_type(
            ident.get("system"), ((ident.get("type") or {}).get("coding") or [{}])[0].get("code")
        )
        if value and kind and kind not in out:
            out[kind] = str(value)
    return out


def identifier_values(resource: dict[str, Any]) -> dict[str, str]:
    """Identifier type → value of a resource (the first of each type)."""
    return _identifiers(resource)


def _patient_ref(resource: dict[str, Any], field: str = "subject") -> dict[str, Any]:
    ref = resource.get(field) or resource.get("patient") or {}
    reference = ref.get("reference") or ""
    if reference.startswith("Patient/"):
        return {"patient_ref_type": "fhir", "patient_ref_value": reference.split("/", 1)[1]}
    ident = ref.get("identifier") or {}
    if ident.get("value"):
        return {
            "patient_ref_type": identifier_type(ident.get("system"), None) or "MR",
            "patient_ref_value": ident["value"],
        }
    raise NormalizationError(f"{resource.get('resourceType')}: no patient reference in '{field}'")


def patient_reference(resource: dict[str, Any]) -> dict[str, Any]:
    """The patient reference of any resource the pipeline reads (raises without one)."""
    if resource.get("resourceType") == "Appointment":
        for p in resource.get("participant") or []:
            actor = p.get("actor") or {}
            if (actor.get("reference") or "").startswith("Patient/"):
                return _patient_ref({"subject": actor})
    return _patient_ref(resource)


def _encounter_ref(resource: dict[str, Any]) -> str | None:
    enc = resource.get("encounter") or resource.get("context") or {}
    if isinstance(enc, dict) and "encounter" in enc:  # DocumentReference.context.encounter[]
        enc = (enc.get("encounter") or [{}])[0]
    ident = enc.get("identifier") or {}
    if ident.get("value"):
        return str(ident["value"])
    reference = enc.get("reference") or ""
    return reference.split("/", 1)[1] if reference.startswith("Encounter/") else None


def _require(value: Any, what: str) -> Any:
    if value in (None, ""):
        raise NormalizationError(f"missing {what}")
    return value


def normalize_patient(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> dict[str, Any]:
    ids = _identifiers(resource)
    logical_id = _require(resource.get("id"), "Patient.id")
    names = resource.get("name") or []
    name = next((n for n in names if n.get("use") in (None, "official", "usual")), names[0] if names else {})
    telecom = resource.get("telecom") or []
    phones = [t for t in telecom if t.get("system") == "phone"]
    emails = [t for t in telecom if t.get("system") == "email"]
    address = (resource.get("address") or [{}])[0]
    ext = {e.get("url", "").rsplit("/", 1)[-1]: e for e in resource.get("extension") or []}

    def us_core_text(key: str) -> str | None:
        e = ext.get(key) or {}
        for sub in e.get("extension") or []:
            if sub.get("url") == "text":
                return sub.get("valueString")
        for sub in e.get("extension") or []:
            if sub.get("url") == "ombCategory":
                return (sub.get("valueCoding") or {}).get("display")
        return None

    comm = (resource.get("communication") or [{}])[0]
    language = first_coding(comm.get("language"))
    deceased = resource.get("deceasedDateTime")
    tags = {t.get("code") for t in (resource.get("meta") or {}).get("tag") or [] if isinstance(t, dict)}
    row = _lineage(resource, connection_id, raw_ref)
    row.update(
        patient_ref_type="fhir",
        patient_ref_value=logical_id,
        mrn=ids.get("MR"),
        enterprise_id=ids.get("EPI"),
        ehr_id=ids.get("EHRID"),
        nist_id=ids.get("NIST"),
        family_name=name.get("family"),
        given_names=" ".join(name.get("given") or []) or None,
        birth_date=parse_date(resource.get("birthDate")),
        sex=resource.get("gender"),
        deceased_at=parse_ts(deceased) if deceased else None,
        race=us_core_text("us-core-race"),
        ethnicity=us_core_text("us-core-ethnicity"),
        language=language.get("code") if language else None,
        address_line=" ".join(address.get("line") or []) or None,
        city=address.get("city"),
        state=address.get("state"),
        postal_code=address.get("postalCode"),
        phone=(next((p for p in phones if p.get("use") == "home"), phones[0]) if phones else {}).get("value"),
        email=emails[0].get("value") if emails else None,
        # HTEST (v3 ActReason "test health data") is the standard tag; TEST an older habit.
        is_test=bool(tags & TEST_TAGS),
        active=resource.get("active", True) is not False,
        identifiers=ids,
    )
    return row


def normalize_encounter(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> dict[str, Any]:
    ids = _identifiers(resource)
    period = resource.get("period") or {}
    enc_type = first_coding((resource.get("type") or [None])[0])
    reason = first_coding((resource.get("reasonCode") or [None])[0])
    location = R.display(resource, (resource.get("location") or [{}])[0].get("location"), refs)
    attending = next(
        (
            p
            for p in resource.get("participant") or []
            if any(
                c.get("code") in ("ATND", "attender")
                for t in p.get("type") or []
                for c in t.get("coding") or []
            )
        ),
        (resource.get("participant") or [{}])[0] if resource.get("participant") else {},
    )
    attending_npi = R.npi(resource, attending.get("individual"), refs)
    disposition = first_coding((resource.get("hospitalization") or {}).get("dischargeDisposition"))
    service_name = R.display(resource, resource.get("serviceProvider"), refs)
    row = _lineage(resource, connection_id, raw_ref)
    row.update(_patient_ref(resource))
    row.update(
        encounter_id=ids.get("VN") or _require(resource.get("id"), "Encounter.id"),
        status=resource.get("status"),
        **{"class": (resource.get("class") or {}).get("code")},
        type_code=enc_type.get("code") if enc_type else None,
        type_system=enc_type.get("system") if enc_type else None,
        type_display=enc_type.get("display") if enc_type else None,
        start_at=parse_ts(period.get("start")),
        end_at=parse_ts(period.get("end")),
        location=service_name or location,
        department=location if service_name else None,
        attending_npi=attending_npi,
        reason_code=reason.get("code") if reason else None,
        reason_system=reason.get("system") if reason else None,
        reason_display=reason.get("display") if reason else None,
        discharge_disposition=coding_text(disposition),
    )
    return row


def _value_fields(holder: dict[str, Any]) -> dict[str, Any]:
    """``value[x]`` of an Observation or of one of its components: the number, its text, the
    coded value and the unit (UCUM code and system when the quantity gives them)."""
    quantity = holder.get("valueQuantity") or {}
    numeric = quantity.get("value")
    text = holder.get("valueString")
    concept = holder.get("valueCodeableConcept")
    coded = first_coding(concept) if concept else None
    if text is None and concept:
        text = coding_text(coded) or concept.get("text")
    for key in ("valueBoolean", "valueInteger", "valueDateTime", "valueTime"):
        if text is None and holder.get(key) is not None:
            text = str(holder[key]).lower() if key == "valueBoolean" else str(holder[key])
            if key == "valueInteger":
                numeric = holder[key]
    if numeric is not None and text is None:
        text = str(numeric)
    rng = (holder.get("referenceRange") or [{}])[0]
    interp = first_coding((holder.get("interpretation") or [None])[0])
    flag = interp.get("code") if interp else None
    return {
        "value_numeric": float(numeric) if numeric is not None else None,
        "value_text": text,
        "value_code": (coded or {}).get("code"),
        "value_code_system": (coded or {}).get("system"),
        "unit": quantity.get("code") or quantity.get("unit"),
        "unit_system": quantity.get("system") or (UCUM if quantity.get("code") else None),
        "reference_low": (rng.get("low") or {}).get("value"),
        "reference_high": (rng.get("high") or {}).get("value"),
        "reference_text": rng.get("text"),
        "abnormal_flag": ("HH" if flag == "AA" else flag) if flag in INTERPRETATION_FLAGS else None,
    }


def observation_components(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """``component[]`` (blood pressure's systolic and diastolic, a panel's parts) as rows of
    ``result_components`` without their lineage (publish adds it)."""
    out = []
    for component in resource.get("component") or []:
        if not isinstance(component, dict):
            continue
        code = first_coding(component.get("code")) or {}
        out.append(
            {
                "code": code.get("code"),
                "code_system": code.get("system"),
                "display": code.get("display"),
                **_value_fields(component),
            }
        )
    return out


def components_json(components: list[dict[str, Any]]) -> str | None:
    return orjson.dumps(components).decode() if components else None


def normalize_observation(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> dict[str, Any]:
    """One row per Observation of every category; components go to ``result_components``
    (a component-only blood pressure is one row with no value of its own)."""
    ids = _identifiers(resource)
    code = first_coding(resource.get("code"))
    if not code:
        raise NormalizationError("Observation without code")
    category = first_coding((resource.get("category") or [None])[0])
    based_on = (resource.get("basedOn") or [{}])[0]
    order_id = ((based_on.get("identifier") or {}).get("value")) or ids.get("OrderID")
    if order_id is None and (based_on.get("reference") or "").startswith("ServiceRequest/"):
        order_id = based_on["reference"].split("/", 1)[1]
    components = observation_components(resource)
    effective = parse_ts(
        resource.get("effectiveDateTime")
        or (resource.get("effectivePeriod") or {}).get("start")
        or resource.get("effectiveInstant")
    )
    row = _lineage(resource, connection_id, raw_ref)
    row.update(_patient_ref(resource))
    row.update(
        result_id=ids.get("ResultID")
        or (f"{order_id}-{code.get('code')}" if order_id else _require(resource.get("id"), "Observation.id")),
        encounter_id=_encounter_ref(resource),
        order_id=order_id,
        report_id=None,
        category=category.get("code") if category else None,
        code=code.get("code"),
        code_system=code.get("system"),
        display=code.get("display"),
        **_value_fields(resource),
        status=resource.get("status"),
        status_source=resource.get("status"),
        effective_at=effective,
        issued_at=parse_ts(resource.get("issued")),
        performer=R.provider(resource, (resource.get("performer") or [None])[0], refs),
        component_count=len(components) or None,
        components=components_json(components),
        match_key=match_key(code.get("code"), effective, instant=True),
    )
    return row


def normalize_medication(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> dict[str, Any]:
    ids = _identifiers(resource)
    is_request = resource.get("resourceType") == "MedicationRequest"
    code = first_coding(resource.get("medicationCodeableConcept"))
    if not code:  # a medicationReference to a contained or bundled Medication
        medication = refs.resolve(resource, resource.get("medicationReference")) or {}
        code = first_coding(medication.get("code"))
    if not code:
        raise NormalizationError(f"{resource.get('resourceType')} without medicationCodeableConcept")
    dosage = ((resource.get("dosageInstruction") if is_request else resource.get("dosage")) or [{}])[0]
    dose = ((dosage.get("doseAndRate") or [{}])[0].get("doseQuantity")) or {}
    route = first_coding(dosage.get("route"))
    repeat = (dosage.get("timing") or {}).get("repeat") or {}
    frequency = None
    if repeat.get("period") is not None:
        frequency = f"every {repeat['period']:g} {repeat.get('periodUnit', '')}".strip()
        if repeat.get("frequency") not in (None, 1):
            frequency = f"{repeat['frequency']}x {frequency}"
    if is_request:
        period = (resource.get("dispenseRequest") or {}).get("validityPeriod") or {}
        start = resource.get("authoredOn") or period.get("start")
        end = period.get("end")
        requester = R.npi(resource, resource.get("requester"), refs)
    else:
        period = resource.get("effectivePeriod") or {}
        start = period.get("start") or resource.get("effectiveDateTime")
        end = period.get("end")
        requester = None
    row = _lineage(resource, connection_id, raw_ref)
    row.update(_patient_ref(resource))
    row.update(
        medication_id=ids.get("OrderID")
        or _require(resource.get("id"), f"{resource.get('resourceType')}.id"),
        encounter_id=_encounter_ref(resource),
        kind="request" if is_request else "statement",
        status=resource.get("status"),
        intent=resource.get("intent"),
        code=code.get("code"),
        code_system=code.get("system"),
        display=code.get("display"),
        dose_quantity=dose.get("value"),
        dose_unit=dose.get("unit") or dose.get("code"),
        route=coding_text(route),
        frequency=frequency,
        start_at=parse_ts(start),
        end_at=parse_ts(end),
        prescriber_npi=requester,
    )
    return row


def normalize_appointment(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> dict[str, Any]:
    ids = _identifiers(resource)
    patient = practitioner = location = None
    for p in resource.get("participant") or []:
        actor = p.get("actor") if isinstance(p, dict) else None
        if not isinstance(actor, dict):
            continue
        kind = R.reference_type(resource, actor, refs)
        if kind == "Patient":
            patient = patient or actor
        elif kind == "Location":
            location = location or actor
        elif kind in ("Practitioner", "PractitionerRole") or (kind is None and actor.get("identifier")):
            practitioner = practitioner or actor
    if patient is None:
        raise NormalizationError("Appointment without a Patient participant")
    appt_type = first_coding(resource.get("appointmentType")) or first_coding(
        (resource.get("serviceType") or [None])[0]
    )
    start, end = parse_ts(resource.get("start")), parse_ts(resource.get("end"))
    duration = resource.get("minutesDuration")
    if duration is None and start and end:
        duration = int((end - start).total_seconds() // 60)
    ext = {e.get("url", "").rsplit("/", 1)[-1]: e for e in resource.get("extension") or []}
    old_visit = (ext.get("rescheduled-from") or {}).get("valueString")
    row = _lineage(resource, connection_id, raw_ref)
    row.update(_patient_ref({"subject": patient}))
    row.update(
        appointment_id=ids.get("VN") or _require(resource.get("id"), "Appointment.id"),
        status=resource.get("status"),
        start_at=start,
        end_at=end,
        duration_minutes=duration,
        type_code=appt_type.get("code") if appt_type else None,
        type_display=appt_type.get("display") if appt_type else None,
        reason=((resource.get("reasonCode") or [{}])[0]).get("text") or resource.get("description"),
        provider_npi=R.npi(resource, practitioner, refs),
        location=R.display(resource, location, refs),
        department=None,
        cancel_reason=coding_text(first_coding(resource.get("cancelationReason")))
        or (resource.get("cancelationReason") or {}).get("text"),
        rescheduled_from=old_visit,
    )
    return row


def normalize_document_reference(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> dict[str, Any]:
    ids = _identifiers(resource)
    doc_type = first_coding(resource.get("type"))
    attachment = ((resource.get("content") or [{}])[0]).get("attachment") or {}
    author = (resource.get("author") or [{}])[0]
    category = first_coding((resource.get("category") or [None])[0])
    content_type = attachment.get("contentType")
    kind = "cda" if content_type and "xml" in content_type else "note"
    if category and category.get("code") in ("CDA", "cda"):
        kind = "cda"
    row = _lineage(resource, connection_id, raw_ref)
    row.update(_patient_ref(resource))
    row.update(
        document_id=ids.get("DocumentID") or _require(resource.get("id"), "DocumentReference.id"),
        encounter_id=_encounter_ref(resource),
        kind=kind,
        type_code=doc_type.get("code") if doc_type else None,
        type_system=doc_type.get("system") if doc_type else None,
        title=attachment.get("title") or resource.get("description"),
        status=resource.get("status"),
        authored_at=parse_ts(resource.get("date") or attachment.get("creation")),
        author=R.provider(resource, author, refs),
        content_type=content_type,
        content_sha256=None,
        content_bytes=attachment.get("size"),
        content_url=attachment.get("url"),
    )
    return row


from pipelines.fhir import normalize_clinical as C  # noqa: E402 - it builds on the helpers above

_BY_TYPE = {
    "Condition": C.normalize_condition,
    "AllergyIntolerance": C.normalize_allergy,
    "Immunization": C.normalize_immunization,
    "Procedure": C.normalize_procedure,
    "DiagnosticReport": C.normalize_diagnostic_report,
    "ServiceRequest": C.normalize_service_request,
    "Patient": normalize_patient,
    "Encounter": normalize_encounter,
    "Observation": normalize_observation,
    "MedicationRequest": normalize_medication,
    "MedicationStatement": normalize_medication,
    "Appointment": normalize_appointment,
    "DocumentReference": normalize_document_reference,
}
# resource type → (entity, normalizer); the entity comes from the one vocabulary.
NORMALIZERS = {rtype: (FHIR_RESOURCE_ENTITIES[rtype], fn) for rtype, fn in _BY_TYPE.items()}
