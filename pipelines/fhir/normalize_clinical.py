"""FHIR R4 clinical-record resources → rows of problems, allergies, immunizations,
procedures, diagnostic_reports and orders (pure functions, no I/O).

Same contract as ``pipelines.fhir.normalize``: one resource in, one staged row out, a
``NormalizationError`` (never PHI) for a resource that cannot be a row. The business key
is the resource's business identifier (``ProblemID``, ``AllergyID``, ``ImmunizationID``,
``ProcedureID``; a report or request by its ``OrderID``), else its logical id; ``match_key`` (code + clinical day) lets publish pair a Clinical Summary entry,
which has no id at all, with the resource for the same record. Codes keep system, code and
display; statuses keep the source's value in ``status_source`` beside the normalized one.
"""

from __future__ import annotations

from typing import Any

import orjson

from pipelines.fhir import references as R
from pipelines.fhir.normalize import _encounter_ref, _identifiers, _lineage, _patient_ref, _require
from pipelines.fhir.references import NO_REFS, Refs
from pipelines.normalize_common import NormalizationError, first_coding, match_key, parse_ts

Row = dict[str, Any]


def _code(concept: Any) -> dict[str, Any]:
    return (first_coding(concept) if isinstance(concept, dict) else None) or {}


def _status_code(concept: Any) -> str | None:
    """A status CodeableConcept's code (FHIR's own vocabulary), else its text."""
    coding = _code(concept)
    return coding.get("code") or coding.get("display")


def _notes(resource: dict[str, Any]) -> str | None:
    texts = [n.get("text") for n in resource.get("note") or [] if isinstance(n, dict) and n.get("text")]
    return "\n".join(texts) or None


def _onset(resource: dict[str, Any], prefix: str) -> Any:
    """``onset[x]`` / ``abatement[x]`` / ``performed[x]``: the dateTime, a Period's start or an
    Age-less string are read; an Age or Range has no calendar time (None)."""
    value = resource.get(f"{prefix}DateTime") or (resource.get(f"{prefix}Period") or {}).get("start")
    return parse_ts(value)


def _reason(resource: dict[str, Any]) -> dict[str, Any]:
    return _code((resource.get("reasonCode") or [None])[0])


def _row(resource: dict[str, Any], connection_id: str, raw_ref: str | None, field: str = "subject") -> Row:
    row = _lineage(resource, connection_id, raw_ref)
    row.update(_patient_ref(resource, field))
    return row


def normalize_condition(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> Row:
    code = _code(resource.get("code"))
    if not code:
        raise NormalizationError("Condition without code")
    onset = _onset(resource, "onset")
    clinical = _status_code(resource.get("clinicalStatus"))
    abated = _onset(resource, "abatement")
    row = _row(resource, connection_id, raw_ref)
    row.update(
        problem_id=_identifiers(resource).get("ProblemID") or _require(resource.get("id"), "Condition.id"),
        encounter_id=_encounter_ref(resource),
        category=_code((resource.get("category") or [None])[0]).get("code"),
        code=code.get("code"),
        code_system=code.get("system"),
        display=code.get("display"),
        # Without a clinical status, an abatement means the problem is over.
        status=clinical or ("resolved" if abated else None),
        status_source=clinical,
        verification_status=_status_code(resource.get("verificationStatus")),
        severity=_code(resource.get("severity")).get("display")
        or _code(resource.get("severity")).get("code"),
        health_status=None,
        onset_at=onset,
        abated_at=abated,
        recorded_at=parse_ts(resource.get("recordedDate")),
        recorder=R.provider(resource, resource.get("recorder") or resource.get("asserter"), refs),
        note=_notes(resource),
        match_key=match_key(code.get("code"), onset, text=code.get("display")),
    )
    return row


def normalize_allergy(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> Row:
    substance = _code(resource.get("code"))
    reactions = [r for r in resource.get("reaction") or [] if isinstance(r, dict)]
    if not substance and reactions:
        substance = _code(reactions[0].get("substance"))
    if not substance:
        raise NormalizationError("AllergyIntolerance without code")
    manifestations = [_code(m) for r in reactions for m in r.get("manifestation") or []]
    first = manifestations[0] if manifestations else {}
    severity = next((r.get("severity") for r in reactions if r.get("severity")), None)
    onset = _onset(resource, "onset")
    clinical = _status_code(resource.get("clinicalStatus"))
    categories = [c for c in resource.get("category") or [] if isinstance(c, str)]
    row = _row(resource, connection_id, raw_ref, "patient")
    row.update(
        allergy_id=_identifiers(resource).get("AllergyID")
        or _require(resource.get("id"), "AllergyIntolerance.id"),
        category=",".join(categories) or None,
        allergy_type=resource.get("type"),
        substance_code=substance.get("code"),
        substance_system=substance.get("system"),
        substance_display=substance.get("display"),
        status=clinical,
        status_source=clinical,
        verification_status=_status_code(resource.get("verificationStatus")),
        criticality=resource.get("criticality"),
        criticality_source=resource.get("criticality"),
        severity=severity,
        reaction_code=first.get("code"),
        reaction_system=first.get("system"),
        reaction_display=first.get("display"),
        reactions="; ".join(m.get("display") or m.get("code") or "" for m in manifestations) or None,
        onset_at=onset,
        ended_at=None,
        recorded_at=parse_ts(resource.get("recordedDate")),
        note=_notes(resource),
        match_key=match_key(substance.get("code"), None, text=substance.get("display")),
    )
    return row


def normalize_immunization(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> Row:
    vaccine = _code(resource.get("vaccineCode"))
    if not vaccine:
        raise NormalizationError("Immunization without vaccineCode")
    occurred = parse_ts(resource.get("occurrenceDateTime"))
    route = _code(resource.get("route"))
    dose = resource.get("doseQuantity") or {}
    performer = (resource.get("performer") or [{}])[0]
    manufacturer = resource.get("manufacturer")
    row = _row(resource, connection_id, raw_ref, "patient")
    row.update(
        immunization_id=_identifiers(resource).get("ImmunizationID")
        or _require(resource.get("id"), "Immunization.id"),
        encounter_id=_encounter_ref(resource),
        status=resource.get("status"),
        status_source=resource.get("status"),
        vaccine_code=vaccine.get("code"),
        vaccine_system=vaccine.get("system"),
        vaccine_display=vaccine.get("display"),
        occurred_at=occurred,
        lot_number=resource.get("lotNumber"),
        manufacturer=R.display(resource, manufacturer, refs),
        route_code=route.get("code"),
        route_system=route.get("system"),
        route_display=route.get("display"),
        site=_code(resource.get("site")).get("display") or _code(resource.get("site")).get("code"),
        dose_quantity=dose.get("value"),
        dose_unit=dose.get("code") or dose.get("unit"),
        performer=R.provider(resource, performer.get("actor") if isinstance(performer, dict) else None, refs),
        not_given_reason=_code(resource.get("statusReason")).get("display")
        or _code(resource.get("statusReason")).get("code"),
        match_key=match_key(vaccine.get("code"), occurred, text=vaccine.get("display")),
    )
    return row


def normalize_procedure(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> Row:
    code = _code(resource.get("code"))
    if not code:
        raise NormalizationError("Procedure without code")
    performed = _onset(resource, "performed")
    site = _code((resource.get("bodySite") or [None])[0])
    reason = _reason(resource)
    performer = (resource.get("performer") or [{}])[0]
    row = _row(resource, connection_id, raw_ref)
    row.update(
        procedure_id=_identifiers(resource).get("ProcedureID")
        or _require(resource.get("id"), "Procedure.id"),
        encounter_id=_encounter_ref(resource),
        category=_code(resource.get("category")).get("display")
        or _code(resource.get("category")).get("code"),
        code=code.get("code"),
        code_system=code.get("system"),
        display=code.get("display"),
        status=resource.get("status"),
        status_source=resource.get("status"),
        performed_at=performed,
        performed_end_at=parse_ts((resource.get("performedPeriod") or {}).get("end")),
        body_site_code=site.get("code"),
        body_site_system=site.get("system"),
        body_site_display=site.get("display"),
        performer=R.provider(resource, performer.get("actor") if isinstance(performer, dict) else None, refs),
        reason_code=reason.get("code"),
        reason_system=reason.get("system"),
        reason_display=reason.get("display"),
        note=_notes(resource),
        match_key=match_key(code.get("code"), performed, text=code.get("display")),
    )
    return row


def report_result_refs(resource: dict[str, Any]) -> list[str]:
    """``result[]`` of a DiagnosticReport as Observation logical ids (``Observation/<id>``,
    an absolute URL ending so, or a contained ``#id``)."""
    out = []
    for ref in resource.get("result") or []:
        text = ref.get("reference") if isinstance(ref, dict) else None
        if isinstance(text, str) and text:
            out.append(text.rstrip("/").split("/")[-1].lstrip("#"))
    return out


def normalize_diagnostic_report(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> Row:
    code = _code(resource.get("code"))
    if not code:
        raise NormalizationError("DiagnosticReport without code")
    effective = parse_ts(
        resource.get("effectiveDateTime") or (resource.get("effectivePeriod") or {}).get("start")
    )
    based_on = (resource.get("basedOn") or [{}])[0]
    order_id = (based_on.get("identifier") or {}).get("value")
    if order_id is None and (based_on.get("reference") or "").startswith("ServiceRequest/"):
        order_id = based_on["reference"].split("/", 1)[1]
    results = report_result_refs(resource)
    row = _row(resource, connection_id, raw_ref)
    row.update(
        # A lab report is keyed by its order (the Data Model's Results order ID) when it names one.
        report_id=_identifiers(resource).get("OrderID")
        or order_id
        or _require(resource.get("id"), "DiagnosticReport.id"),
        encounter_id=_encounter_ref(resource),
        order_id=order_id,
        category=_code((resource.get("category") or [None])[0]).get("code"),
        code=code.get("code"),
        code_system=code.get("system"),
        display=code.get("display"),
        status=resource.get("status"),
        status_source=resource.get("status"),
        effective_at=effective,
        issued_at=parse_ts(resource.get("issued")),
        performer=R.provider(resource, (resource.get("performer") or [None])[0], refs),
        conclusion=resource.get("conclusion"),
        result_count=len(results) or None,
        result_refs=orjson.dumps(results).decode() if results else None,
        match_key=match_key(code.get("code"), effective, text=code.get("display")),
    )
    return row


def normalize_service_request(
    resource: dict[str, Any], connection_id: str, raw_ref: str | None = None, refs: Refs = NO_REFS
) -> Row:
    code = _code(resource.get("code"))
    if not code:
        raise NormalizationError("ServiceRequest without code")
    occurrence = parse_ts(
        resource.get("occurrenceDateTime") or (resource.get("occurrencePeriod") or {}).get("start")
    )
    authored = parse_ts(resource.get("authoredOn"))
    reason = _reason(resource)
    placer = _identifiers(resource).get("OrderID")
    row = _row(resource, connection_id, raw_ref)
    row.update(
        # The placer order number when the request carries one (the Data Model's Order.ID).
        order_id=placer or _require(resource.get("id"), "ServiceRequest.id"),
        encounter_id=_encounter_ref(resource),
        category=_code((resource.get("category") or [None])[0]).get("display")
        or _code((resource.get("category") or [None])[0]).get("code"),
        code=code.get("code"),
        code_system=code.get("system"),
        display=code.get("display"),
        status=resource.get("status"),
        status_source=resource.get("status"),
        intent=resource.get("intent"),
        priority=resource.get("priority"),
        ordered_at=authored,
        occurrence_at=occurrence,
        requester_npi=R.npi(resource, resource.get("requester"), refs),
        performer=R.provider(resource, (resource.get("performer") or [None])[0], refs),
        reason_code=reason.get("code"),
        reason_system=reason.get("system"),
        reason_display=reason.get("display"),
        note=_notes(resource),
        match_key=match_key(code.get("code"), occurrence or authored, text=code.get("display")),
    )
    return row
