"""Clinical Summary sections (a CCD as JSON) → common-model rows.

Encounters, Results (results, and the panels as diagnostic reports), VitalSigns,
Medications, MedicationsAdministered here; Problems, Allergies, Immunizations, Procedures
and PlanOfCare in ``normalize_clinical``. Sections the common model has no table for
(SocialHistory, FamilyHistory, MedicalEquipment, AdvanceDirectives, Insurances, Goals,
CareTeams, HealthConcerns, FunctionalStatus, Assessment, and the narrative ``*Text``
blocks) are reported as skipped by the caller, not dropped silently.

Summary entries carry no order or record ids, so results and medication statements get
derived ids (``normalize_fields.derived_id``): a digest of the patient reference and the
codes and times that identify the entry, stable across re-sends of the same summary.
"""

from __future__ import annotations

from typing import Any

from pipelines.datamodel.normalize_fields import (
    as_dict,
    as_list,
    as_str,
    as_ts,
    coded,
    derived_id,
    first_dict,
    medication_status,
    npi,
    visit_status,
)
from pipelines.datamodel.normalize_patient import EventContext
from pipelines.datamodel.normalize_records import (
    BP_PANEL,
    CATEGORY_BY_PANEL,
    Row,
    fold_blood_pressure,
    medication_fields,
    result_row,
    vital_sign_row,
)

# Encounter identifier types that are the visit number the other events use, compared
# upper-case without spaces. Epic's contact serial number (CSN) is its visit number.
VISIT_ID_TYPES = frozenset({"VN", "VISITNUMBER", "VISIT", "VISITID", "ENCOUNTERNUMBER", "CSN"})

# Sections the normalizer maps; every other list-valued top-level key is reported skipped.
MAPPED_SECTIONS = frozenset(
    {
        "Encounters",
        "Results",
        "VitalSigns",
        "Medications",
        "MedicationsAdministered",
        "Problems",
        "ResolvedProblems",
        "Allergies",
        "Immunizations",
        "Procedures",
        "PlanOfCare",
    }
)


def _visit_id(identifiers: Any) -> str | None:
    for ident in as_list(identifiers):
        if not isinstance(ident, dict):
            continue
        id_type = (as_str(ident.get("IDType")) or "").upper().replace(" ", "")
        if id_type in VISIT_ID_TYPES or id_type.endswith("CSN"):
            value = as_str(ident.get("ID"))
            if value:
                return value
    return None


def encounter_rows(section: Any, ctx: EventContext, ref: dict[str, str]) -> list[Row]:
    """``Encounters[]`` entries that carry a visit-number identifier (others cannot be
    matched to the encounters PatientAdmin sends, so they are left out)."""
    rows = []
    for entry in as_list(section):
        if not isinstance(entry, dict):
            continue
        number = _visit_id(entry.get("Identifiers"))
        if number is None:
            continue
        start, end = as_ts(entry.get("DateTime")), as_ts(entry.get("EndDateTime"))
        kind = coded(entry.get("Type"))
        reason = coded(first_dict(entry.get("ReasonForVisit")))
        if reason.code is None and reason.display is None:
            reason = coded(first_dict(entry.get("Diagnosis")))
        disposition = coded(entry.get("DischargeDisposition"))
        location = first_dict(entry.get("Locations"))
        status = visit_status(entry.get("Status")) or ("finished" if end else None)
        row = ctx.lineage(number, start)
        row.update(ref)
        row.update(
            encounter_id=number,
            status=status,
            **{"class": None},
            type_code=kind.code,
            type_system=kind.system,
            type_display=kind.display,
            start_at=start,
            end_at=end,
            location=as_str(location.get("Name")),
            department=None,
            attending_npi=next((n for n in (npi(p) for p in as_list(entry.get("Providers"))) if n), None),
            reason_code=reason.code,
            reason_system=reason.system,
            reason_display=reason.display,
            discharge_disposition=disposition.display or disposition.code,
        )
        rows.append(row)
    return rows


def header_visit_row(visit: Any, ctx: EventContext, ref: dict[str, str]) -> Row | None:
    """VisitPush ``Header.Document.Visit``: the visit the pushed document summarises."""
    v = as_dict(visit)
    number = as_str(v.get("VisitNumber"))
    if number is None:
        return None
    start, end = as_ts(v.get("StartDateTime")), as_ts(v.get("EndDateTime"))
    location = as_dict(v.get("Location"))
    row = ctx.lineage(number, start)
    row.update(ref)
    row.update(
        encounter_id=number,
        status="finished" if end else "in-progress",
        **{"class": None},
        start_at=start,
        end_at=end,
        location=as_str(location.get("Facility")),
        department=as_str(location.get("Department")),
        reason_display=as_str(v.get("Reason")),
    )
    return row


def summary_result_id(ref: dict[str, str], panel_code: str | None, obs: dict[str, Any]) -> str:
    """The derived id of a summary panel's observation (the panel's report lists it)."""
    return derived_id(
        "summary-result",
        ref["patient_ref_type"],
        ref["patient_ref_value"],
        panel_code,
        obs.get("Code"),
        as_ts(obs.get("DateTime")),
    )


def result_rows(section: Any, ctx: EventContext, ref: dict[str, str]) -> list[Row]:
    """``Results[]`` panels with their ``Observations[]`` (laboratory); each result names the
    panel's report (``normalize_clinical.summary_report_rows``)."""
    from pipelines.datamodel.normalize_clinical import summary_report_id

    rows = []
    for panel in as_list(section):
        if not isinstance(panel, dict):
            continue
        panel_code = coded(panel)
        producer = as_str(as_dict(panel.get("Producer")).get("Name"))
        observations = [
            o for o in as_list(panel.get("Observations")) if isinstance(o, dict) and as_str(o.get("Code"))
        ]
        times = [t for t in (as_ts(o.get("DateTime")) for o in observations) if t is not None]
        is_lab = CATEGORY_BY_PANEL.get(panel_code.code or "", "laboratory") == "laboratory"
        report_id = (
            summary_report_id(ref, panel_code, min(times) if times else None)
            if is_lab and (panel_code.code or panel_code.display)
            else None
        )
        for obs in observations:
            when = as_ts(obs.get("DateTime"))
            result_id = summary_result_id(ref, panel_code.code, obs)
            rows.append(
                result_row(
                    ctx,
                    ref,
                    result_id=result_id,
                    order_id=None,
                    encounter_id=None,
                    category=CATEGORY_BY_PANEL.get(panel_code.code or "", "laboratory"),
                    observation=obs,
                    status=obs.get("Status") or panel.get("Status"),
                    effective_at=when,
                    issued_at=None,
                    performer=producer,
                    report_id=report_id,
                )
            )
    return rows


def vital_sign_rows(section: Any, ctx: EventContext, ref: dict[str, str]) -> list[Row]:
    """``VitalSigns[]`` groups (one per measurement time) with their ``Observations[]``."""
    rows = []
    for group in as_list(section):
        if not isinstance(group, dict):
            continue
        for obs in as_list(group.get("Observations")):
            if not isinstance(obs, dict) or as_str(obs.get("Code")) is None:
                continue
            when = as_ts(obs.get("DateTime")) or as_ts(group.get("DateTime"))
            result_id = derived_id(
                "summary-vital", ref["patient_ref_type"], ref["patient_ref_value"], obs.get("Code"), when
            )
            rows.append(vital_sign_row(ctx, ref, obs, result_id, when, None, None))
    return fold_blood_pressure(
        rows,
        lambda systolic: derived_id(
            "summary-vital",
            ref["patient_ref_type"],
            ref["patient_ref_value"],
            BP_PANEL.code,
            systolic["effective_at"],
        ),
    )


def medication_rows(
    section: Any, ctx: EventContext, ref: dict[str, str], *, kind: str, intent: str | None = None
) -> list[Row]:
    """``Medications[]`` (kind ``statement``) or ``MedicationsAdministered[]`` (kind
    ``administration``): ``medication_id`` = ``<kind>-`` + digest of the patient
    reference, product code system and code, and the start time (to the second: the same
    drug started twice on one day is two medications)."""
    rows = []
    for entry in as_list(section):
        if not isinstance(entry, dict):
            continue
        fields = medication_fields(entry)
        if fields["code"] is None and fields["display"] is None:
            continue
        start = fields["start_at"].isoformat(timespec="seconds") if fields["start_at"] else None
        medication_id = derived_id(
            kind,
            ref["patient_ref_type"],
            ref["patient_ref_value"],
            fields["code_system"],
            fields["code"],
            start,
        )
        status = medication_status(entry.get("Status"))
        if status is None:
            ended = (
                fields["end_at"] is not None
                and ctx.event_time is not None
                and fields["end_at"] <= ctx.event_time
            )
            status = "completed" if ended or kind == "administration" else "active"
        row = ctx.lineage(medication_id, fields["start_at"])
        row.update(ref)
        row.update(
            medication_id=medication_id,
            encounter_id=None,
            kind=kind,
            status=status,
            intent=intent,
            prescriber_npi=None,
            **fields,
        )
        rows.append(row)
    return rows


def skipped_sections(payload: dict[str, Any]) -> list[str]:
    """Top-level summary sections holding entries the common model has no table for."""
    return sorted(
        key
        for key, value in payload.items()
        if key not in MAPPED_SECTIONS and key not in ("Meta", "Header") and isinstance(value, list) and value
    )
