"""Data Model record blocks → common-model rows: visits, result orders, medication
orders and administrations, scheduling visits, notes / media / clinical documents.

Each builder takes the block, the payload's ``EventContext`` and the row's patient
reference, and returns rows keyed like ``pipelines.model.staged_schema``. Values follow
the FHIR normalizer's vocabulary (see ``normalize_fields``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import orjson

from pipelines.datamodel.normalize_fields import (
    LOINC,
    Code,
    abnormal_flag,
    administration_status,
    appointment_status,
    as_dict,
    as_float,
    as_int,
    as_list,
    as_str,
    as_ts,
    coded,
    compact_stamp,
    content_type,
    decode_content,
    derived_id,
    document_status,
    first_dict,
    npi,
    patient_class,
    provider_id,
    report_status,
    result_status,
)
from pipelines.datamodel.normalize_patient import EventContext
from pipelines.model import COMPONENT_FIELDS
from pipelines.normalize_common import NormalizationError, match_key

Row = dict[str, Any]

# The blood-pressure panel: FHIR serves it as one Observation whose components are systolic
# and diastolic; the Data Model lists the two as separate observations of the same time.
# 85354-9 is the FHIR vital-signs profile's code; 55284-4 (Synthea, many EHRs) and 35094-2
# name the same panel, and a Results order keeps the one its source used.
BP_PANEL = Code("85354-9", LOINC, "Blood pressure panel with all children optional")
BP_PANELS = frozenset({"85354-9", "55284-4", "35094-2"})
BP_PARTS = ("8480-6", "8462-4")
# LOINC panels whose results are vital signs, not laboratory (Results.New carries no category).
VITAL_SIGNS_PANELS = frozenset({"85353-1", "8716-3", "34565-2", "29274-8"}) | BP_PANELS
# The FHIR vital-signs profile's observations (and the percentiles and pain score US Core and
# Synthea add): an order that names no panel is a vital sign when all its results are these.
VITAL_SIGN_CODES = VITAL_SIGNS_PANELS | frozenset(
    {
        "9279-1", "8867-4", "2708-6", "59408-5", "8310-5", "8302-2", "8306-3", "9843-4",
        "8289-1", "29463-7", "39156-5", "59576-9", "77606-2", "72514-3", *BP_PARTS,
    }
)  # fmt: skip
# Observation categories the Data Model does not name, read from the panel's code.
CATEGORY_BY_PANEL = {
    "72166-2": "social-history",
    "55757-9": "survey",  # PHQ-2 panel
    "55758-7": "survey",  # PHQ-2 total score
    "10210-3": "exam",
}
# Result value types whose Value is a number (HL7 table 0125 NM/SN, CDA PQ).
NUMERIC_VALUE_TYPES = frozenset({"numeric", "nm", "sn", "physicalquantity", "pq"})


def visit_number(visit: Any) -> str | None:
    """``Visit.VisitNumber``, which arrives as a number or a string."""
    return as_str(as_dict(visit).get("VisitNumber"))


def _require(value: str | None, ctx: EventContext, what: str) -> str:
    if not value:
        raise NormalizationError(f"{ctx.label}: {what}")
    return value


# ---- encounters --------------------------------------------------------------------------


def _visit_reason(visit: dict[str, Any], patient_diagnoses: Any) -> Code:
    """The visit's coded reason: ``Visit.Diagnoses[0]``; else the patient's diagnosis
    when it names the same thing as ``Visit.Reason`` (PatientAdmin visits carry no
    diagnoses of their own, so EHRs put them on the patient); else ``Reason`` as text."""
    reason_text = as_str(visit.get("Reason"))
    diagnosis = coded(first_dict(visit.get("Diagnoses")))
    if diagnosis.code is None:
        candidate = coded(first_dict(patient_diagnoses))
        if candidate.code and (reason_text is None or candidate.display == reason_text):
            diagnosis = candidate
    return Code(diagnosis.code, diagnosis.system, diagnosis.display or reason_text)


def encounter_row(
    visit: dict[str, Any],
    ctx: EventContext,
    ref: dict[str, str],
    status: str | None,
    *,
    where: str = "Visit",
    patient_diagnoses: Any = None,
) -> Row:
    """A PatientAdmin-style ``Visit`` (also VisitQueryResponse ``Visits[]``)."""
    number = _require(visit_number(visit), ctx, f"{where} has no VisitNumber")
    location = as_dict(visit.get("Location"))
    diagnosis = _visit_reason(visit, patient_diagnoses)
    visit_type = visit.get("Type")
    kind = coded(visit_type) if isinstance(visit_type, dict) else None
    start = as_ts(visit.get("VisitDateTime"))
    row = ctx.lineage(number, start)
    row.update(ref)
    row.update(
        encounter_id=number,
        status=status,
        **{"class": patient_class(visit.get("PatientClass"))},
        type_code=kind.code if kind else None,
        type_system=kind.system if kind else None,
        type_display=kind.display if kind else as_str(visit_type),
        start_at=start,
        end_at=as_ts(visit.get("DischargeDateTime")),
        location=as_str(location.get("Facility")),
        department=as_str(location.get("Department")),
        attending_npi=npi(visit.get("AttendingProvider")),
        reason_code=diagnosis.code,
        reason_system=diagnosis.system,
        reason_display=diagnosis.display,
        discharge_disposition=as_str(as_dict(visit.get("DischargeStatus")).get("Description"))
        or as_str(as_dict(visit.get("DischargeStatus")).get("Code")),
    )
    return row


# ---- results -----------------------------------------------------------------------------


def _value_numeric(value: Any, value_type: Any) -> float | None:
    """The numeric value when the value type says numeric (or is absent, as in vital
    signs) and the value parses; coded and text values stay text only."""
    kind = (as_str(value_type) or "").lower().replace(" ", "")
    if kind and kind not in NUMERIC_VALUE_TYPES:
        return None
    return as_float(value)


def result_row(
    ctx: EventContext,
    ref: dict[str, str],
    *,
    result_id: str,
    order_id: str | None,
    encounter_id: str | None,
    category: str,
    observation: dict[str, Any],
    status: Any,
    effective_at: datetime | None,
    issued_at: datetime | None,
    performer: str | None,
    report_id: str | None = None,
    version_time: datetime | None = None,
) -> Row:
    """The fields every result shape shares (Results orders, Flowsheet, Clinical Summary)."""
    code = coded(observation)
    rng = as_dict(observation.get("ReferenceRange"))
    value = observation.get("Value")
    value_code = coded(observation.get("CodedValue"))
    units = as_str(observation.get("Units"))
    row = ctx.lineage(result_id, version_time or issued_at or effective_at)
    row.update(ref)
    row.update(
        result_id=result_id,
        encounter_id=encounter_id,
        order_id=order_id,
        report_id=report_id,
        category=category,
        code=code.code,
        code_system=code.system,
        display=code.display,
        value_numeric=_value_numeric(value, observation.get("ValueType")),
        value_text=as_str(value) or value_code.display or value_code.code,
        value_code=value_code.code,
        value_code_system=value_code.system,
        unit=units,
        # Redox writes units as UCUM where the EHR does; the Data Model does not say so.
        unit_system=None,
        reference_low=as_float(rng.get("Low")),
        reference_high=as_float(rng.get("High")),
        reference_text=as_str(rng.get("Text")),
        abnormal_flag=abnormal_flag(observation.get("AbnormalFlag") or observation.get("Interpretation")),
        status=result_status(status),
        status_source=as_str(status),
        effective_at=effective_at,
        issued_at=issued_at,
        performer=performer,
        component_count=None,
        components=None,
        match_key=match_key(code.code, effective_at, instant=True),
    )
    return row


def order_result_rows(
    order: dict[str, Any],
    position: int,
    ctx: EventContext,
    ref: dict[str, str],
    encounter_id: str | None,
    *,
    application_id_fallback: bool,
) -> list[Row]:
    """``Orders[n].Results[]`` of Results New / NewUnsolicited / QueryResponse.

    ``result_id`` is ``<order id>-<result code>``, the FHIR Observation business id.
    NewUnsolicited orders may carry only ``ApplicationOrderID`` (REDOX-REFERENCE §2.7)."""
    order_id = as_str(order.get("ID"))
    if not order_id and application_id_fallback:
        order_id = as_str(order.get("ApplicationOrderID"))
    order_id = _require(order_id, ctx, f"Orders[{position}] has no ID")
    category = order_category(order)
    report_id = order_id if order_is_report(order) else None
    collected = as_ts(order.get("CollectionDateTime"))
    completed = as_ts(order.get("CompletionDateTime"))
    rows = []
    for index, result in enumerate(as_list(order.get("Results"))):
        if not isinstance(result, dict):
            continue
        code = _require(as_str(result.get("Code")), ctx, f"Orders[{position}].Results[{index}] has no Code")
        result_done = as_ts(result.get("CompletionDateTime"))
        performer = provider_id(result.get("Performer")) or as_str(
            as_dict(result.get("Producer")).get("Name")
        )
        rows.append(
            result_row(
                ctx,
                ref,
                result_id=f"{order_id}-{code}",
                order_id=order_id,
                encounter_id=encounter_id,
                category=category,
                observation=result,
                status=result.get("Status") or order.get("ResultsStatus"),
                # Collection is the clinically relevant time; completion is when it was issued.
                effective_at=collected or result_done or completed,
                issued_at=result_done or completed,
                performer=performer,
                report_id=report_id,
                version_time=as_ts(order.get("LastUpdated")),
            )
        )
    ordered = coded(order.get("Procedure"))
    panel = ordered if ordered.code in BP_PANELS and ordered.system in (None, LOINC) else BP_PANEL
    return fold_blood_pressure(rows, lambda systolic: f"{order_id}-{panel.code}", panel)


def order_category(order: dict[str, Any]) -> str:
    """An order's observation category (the Data Model names none): read from its panel, or
    — an order that names no panel — from its results' codes."""
    panel = coded(order.get("Procedure"))
    if panel.code is not None:
        if panel.code in VITAL_SIGNS_PANELS and panel.system in (None, LOINC):
            return "vital-signs"
        return CATEGORY_BY_PANEL.get(panel.code, "laboratory")
    codes = {as_str(r.get("Code")) for r in as_list(order.get("Results")) if isinstance(r, dict)}
    if codes and codes <= VITAL_SIGN_CODES:
        return "vital-signs"
    return CATEGORY_BY_PANEL.get(next(iter(codes)), "laboratory") if len(codes) == 1 else "laboratory"


def order_is_report(order: dict[str, Any]) -> bool:
    """Whether a Results order is a diagnostic report: a laboratory order that names what
    was ordered (``Procedure``). A report is a report *of* something (FHIR's
    ``DiagnosticReport.code`` is required); an order without a procedure carries
    observations no order asked for (a FHIR-native EHR's lone Observation), which are
    results and nothing more. Vital-sign, social-history, survey and exam orders are
    observations without a report."""
    return coded(order.get("Procedure")).code is not None and order_category(order) == "laboratory"


def order_report_row(
    order: dict[str, Any],
    ctx: EventContext,
    ref: dict[str, str],
    encounter_id: str | None,
    order_id: str,
    result_rows_of_order: list[Row],
) -> Row | None:
    """The report a laboratory Results order is (``order_is_report``): the order's procedure
    (the panel), its status and times, grouping the order's results (``result_refs`` = their
    result ids). None for an order that is no report."""
    panel = coded(order.get("Procedure"))
    results = [r["result_id"] for r in result_rows_of_order]
    if not order_is_report(order):
        return None
    collected = as_ts(order.get("CollectionDateTime"))
    completed = as_ts(order.get("CompletionDateTime"))
    row = ctx.lineage(order_id, as_ts(order.get("LastUpdated")) or completed or collected)
    row.update(ref)
    row.update(
        report_id=order_id,
        encounter_id=encounter_id,
        order_id=order_id,
        category="LAB",
        code=panel.code,
        code_system=panel.system,
        display=panel.display,
        status=report_status(order.get("ResultsStatus") or order.get("Status")),
        status_source=as_str(order.get("ResultsStatus")) or as_str(order.get("Status")),
        effective_at=collected or completed,
        issued_at=completed,
        performer=npi(order.get("Provider")),
        conclusion=None,
        result_count=len(results) or None,
        result_refs=orjson.dumps(results).decode() if results else None,
        match_key=match_key(panel.code, collected or completed),
    )
    return row


def fold_blood_pressure(
    rows: list[Row], panel_id: Callable[[Row], str], panel_code: Code = BP_PANEL
) -> list[Row]:
    """Systolic + diastolic rows of the same time → one blood-pressure panel row (no value
    of its own; the two in ``components``), as FHIR serves it. ``panel_id`` gives the panel
    row's result id from the systolic row; ``panel_code`` its code (the order's, when it names a
    blood-pressure panel). Rows without a partner stay as they are."""
    by_time: dict[Any, dict[str, Row]] = {}
    for row in rows:
        if row["code"] in BP_PARTS:
            by_time.setdefault(row["effective_at"], {}).setdefault(row["code"], row)
    folded: dict[int, Row] = {}
    drop: set[int] = set()
    for parts in by_time.values():
        if len(parts) != len(BP_PARTS):
            continue
        systolic = parts[BP_PARTS[0]]
        components = [{name: parts[code].get(name) for name in COMPONENT_FIELDS} for code in BP_PARTS]
        panel = dict(systolic)
        panel.update(
            result_id=panel_id(systolic),
            source_id=panel_id(systolic),
            code=panel_code.code,
            code_system=panel_code.system or LOINC,
            display=panel_code.display or BP_PANEL.display,
            value_numeric=None,
            value_text=None,
            value_code=None,
            value_code_system=None,
            unit=None,
            unit_system=None,
            reference_low=None,
            reference_high=None,
            reference_text=None,
            abnormal_flag=None,
            component_count=len(components),
            components=orjson.dumps(components).decode(),
            match_key=match_key(panel_code.code, systolic["effective_at"], instant=True),
        )
        folded[id(systolic)] = panel
        drop.add(id(parts[BP_PARTS[1]]))
    return [folded.get(id(r), r) for r in rows if id(r) not in drop]


def flowsheet_rows(
    observations: Any, ctx: EventContext, ref: dict[str, str], encounter_id: str | None
) -> list[Row]:
    """Flowsheet.New ``Observations[]``: continuous (vital-sign) data with no order."""
    rows = []
    for index, obs in enumerate(as_list(observations)):
        if not isinstance(obs, dict):
            continue
        code = _require(as_str(obs.get("Code")), ctx, f"Observations[{index}] has no Code")
        when = as_ts(obs.get("DateTime"))
        result_id = derived_id("flowsheet", ref["patient_ref_type"], ref["patient_ref_value"], code, when)
        rows.append(
            vital_sign_row(ctx, ref, obs, result_id, when, encounter_id, provider_id(obs.get("Observer")))
        )
    return fold_blood_pressure(
        rows,
        lambda systolic: derived_id(
            "flowsheet",
            ref["patient_ref_type"],
            ref["patient_ref_value"],
            BP_PANEL.code,
            systolic["effective_at"],
        ),
    )


def vital_sign_row(
    ctx: EventContext,
    ref: dict[str, str],
    obs: dict[str, Any],
    result_id: str,
    when: Any,
    encounter_id: str | None,
    performer: str | None,
) -> Row:
    """A vital sign outside any order (Flowsheet, Clinical Summary VitalSigns)."""
    return result_row(
        ctx,
        ref,
        result_id=result_id,
        order_id=None,
        encounter_id=encounter_id,
        category="vital-signs",
        observation=obs,
        status=obs.get("Status"),
        effective_at=when,
        issued_at=None,
        performer=performer,
    )


# ---- medications -------------------------------------------------------------------------


def frequency_text(frequency: Any) -> str | None:
    """``{Period: 8, Unit: "h"}`` → ``every 8 h``, as the FHIR normalizer writes timing."""
    f = as_dict(frequency)
    period = as_float(f.get("Period"))
    if period is None:
        return None
    return f"every {period:g} {as_str(f.get('Unit')) or ''}".strip()


def medication_fields(medication: dict[str, Any]) -> dict[str, Any]:
    product = coded(medication.get("Product"))
    dose = as_dict(medication.get("Dose"))
    route = as_dict(medication.get("Route"))
    return {
        "code": product.code,
        "code_system": product.system,
        "display": product.display,
        "dose_quantity": as_float(dose.get("Quantity")),
        "dose_unit": as_str(dose.get("Units")),
        "route": as_str(route.get("Name")) or as_str(route.get("Code")),
        "frequency": frequency_text(medication.get("Frequency")),
        "start_at": as_ts(medication.get("StartDate")),
        "end_at": as_ts(medication.get("EndDate")),
    }


def medication_order_status(event_type: str, end_at: datetime | None, event_time: datetime | None) -> str:
    """Medications carry no status field: the event is the signal. New / Update are
    active unless the order had already ended when the event was sent (completed)."""
    if event_type == "Cancel":
        return "cancelled"
    if end_at is not None and event_time is not None and end_at <= event_time:
        return "completed"
    return "active"


def medication_order_row(
    order: dict[str, Any], ctx: EventContext, ref: dict[str, str], encounter_id: str | None, event_type: str
) -> Row:
    """Medications New / Update / Cancel ``Order`` → a ``request`` row keyed by ``Order.ID``."""
    medication_id = _require(as_str(order.get("ID")), ctx, "Order has no ID")
    fields = medication_fields(as_dict(order.get("Medication")))
    row = ctx.lineage(medication_id, fields["start_at"])
    row.update(ref)
    row.update(
        medication_id=medication_id,
        encounter_id=encounter_id,
        kind="request",
        status=medication_order_status(event_type, fields["end_at"], ctx.event_time),
        intent="order",
        prescriber_npi=npi(order.get("Provider")),
        **fields,
    )
    return row


def administration_row(
    administration: dict[str, Any],
    position: int,
    ctx: EventContext,
    ref: dict[str, str],
    encounter_id: str | None,
) -> Row:
    """One ``Administrations[]`` entry. It has no id of its own: ``medication_id`` is
    ``<order id>-administration-<start, compact UTC>`` (a digest when the order id is absent)."""
    medication = as_dict(administration.get("Medication"))
    fields = medication_fields(medication)
    start = as_ts(administration.get("StartDate")) or fields["start_at"] or ctx.event_time
    order_id = as_str(as_dict(medication.get("Order")).get("ID"))
    if order_id:
        medication_id = f"{order_id}-administration-{compact_stamp(start)}"
    else:
        product = _require(
            fields["code"], ctx, f"Administrations[{position}] has neither an order ID nor a product"
        )
        medication_id = derived_id(
            "administration", ref["patient_ref_type"], ref["patient_ref_value"], product, start
        )
    fields.update(start_at=start, end_at=as_ts(administration.get("EndDate")) or fields["end_at"])
    row = ctx.lineage(medication_id, start)
    row.update(ref)
    row.update(
        medication_id=medication_id,
        encounter_id=encounter_id,
        kind="administration",
        status=administration_status(administration.get("Status")),
        intent=None,
        prescriber_npi=npi(administration.get("OrderedBy")),
        **fields,
    )
    return row


# ---- appointments ------------------------------------------------------------------------

_EVENT_APPOINTMENT_STATUS = {"New": "booked", "Reschedule": "booked", "Modification": "booked"}
_DEAD = frozenset({"cancelled", "entered-in-error"})


def appointment_row_status(event_type: str | None, visit: dict[str, Any]) -> str | None:
    """The event decides cancel / no-show; otherwise ``Visit.Status`` when it is a known
    word, else booked. A Cancel keeps an entered-in-error status the visit states."""
    stated = appointment_status(visit.get("Status"))
    if event_type == "Cancel":
        return stated if stated in _DEAD else "cancelled"
    if event_type == "NoShow":
        return "noshow"
    return stated or _EVENT_APPOINTMENT_STATUS.get(event_type or "", "booked")


def _appointment_type(visit: dict[str, Any], info: Any) -> tuple[str | None, str | None]:
    """``Visit.Type`` is free text; its code, when the EHR sends one, is the
    ``AppointmentInfo`` entry describing the same type."""
    vtype = visit.get("Type")
    if isinstance(vtype, dict):
        c = coded(vtype)
        return c.code, c.display
    display = as_str(vtype)
    if display:
        for entry in as_list(info):
            if isinstance(entry, dict) and as_str(entry.get("Description")) == display:
                return as_str(entry.get("Code")), display
    return None, display


def _rescheduled_from(visit: dict[str, Any], info: Any) -> str | None:
    old = as_str(visit.get("OldVisitNumber"))
    if old:
        return old
    for entry in as_list(info):
        if isinstance(entry, dict) and as_str(entry.get("Code")) == "OldVisitNumber":
            return as_str(entry.get("Value"))
    return None


def appointment_row(
    visit: dict[str, Any], info: Any, ctx: EventContext, ref: dict[str, str], event_type: str | None
) -> Row:
    """A Scheduling ``Visit`` (events and BookedResponse ``Visits[]``)."""
    number = _require(visit_number(visit), ctx, "Visit has no VisitNumber")
    start = as_ts(visit.get("VisitDateTime"))
    duration = as_int(visit.get("Duration"))
    type_code, type_display = _appointment_type(visit, info)
    location = as_dict(visit.get("Location"))
    row = ctx.lineage(number, start)
    row.update(ref)
    row.update(
        appointment_id=number,
        status=appointment_row_status(event_type, visit),
        start_at=start,
        end_at=start + timedelta(minutes=duration) if start and duration is not None else None,
        duration_minutes=duration,
        type_code=type_code,
        type_display=type_display,
        reason=as_str(visit.get("Reason")),
        provider_npi=npi(visit.get("VisitProvider")) or npi(visit.get("AttendingProvider")),
        location=as_str(location.get("Facility")),
        department=as_str(location.get("Department")),
        cancel_reason=as_str(visit.get("CancelReason")),
        rescheduled_from=_rescheduled_from(visit, info),
    )
    return row


# ---- documents ---------------------------------------------------------------------------

_EVENT_DOCUMENT_STATUS = {"New": "current", "Replace": "current", "Delete": "entered-in-error"}


def _content_fields(content: bytes | None, mime: str | None) -> dict[str, Any]:
    return {
        "kind": "cda" if mime and "xml" in mime else "note",
        "content_type": mime,
        "content_bytes": len(content) if content is not None else None,
        "content_sha256": hashlib.sha256(content).hexdigest() if content is not None else None,
        "content": content,
    }


def document_row(
    block: dict[str, Any],
    ctx: EventContext,
    ref: dict[str, str],
    encounter_id: str | None,
    event_type: str | None,
    *,
    what: str,
) -> Row:
    """A Notes ``Note`` or Media ``Media`` block (events and QueryResponse entries).

    Plain-text notes are their own bytes; base64 contents are decoded strictly, so
    placeholders and blob URIs give no content. ``kind`` is ``cda`` for XML content,
    ``note`` otherwise, as in the FHIR normalizer. A Replace names the document it
    supersedes in the extra ``supersedes`` key."""
    document_id = _require(as_str(block.get("DocumentID")), ctx, f"{what} has no DocumentID")
    plain = (as_str(block.get("ContentType")) or "").lower() == "plain text"
    content = decode_content(block.get("FileContents"), plain_text=plain)
    mime = "text/plain" if plain else content_type(block.get("FileType"), block.get("FileName"), content)
    authored = (
        as_ts(block.get("ServiceDateTime"))
        or as_ts(block.get("DocumentationDateTime"))
        or as_ts(block.get("CreationDateTime"))
    )
    status = document_status(block.get("Status")) or _EVENT_DOCUMENT_STATUS.get(event_type or "", "current")
    if event_type == "Delete":
        status = "entered-in-error"
    original = as_str(block.get("OriginalDocumentID"))
    row = ctx.lineage(document_id, authored)
    row.update(ref)
    row.update(
        document_id=document_id,
        encounter_id=encounter_id,
        type_code=as_str(block.get("DocumentType")),
        type_system=None,  # DocumentType is the EHR's free text, not a coded type
        title=as_str(block.get("DocumentDescription")) or as_str(block.get("FileName")),
        status=status,
        authored_at=authored,
        author=provider_id(block.get("Provider")),
        **_content_fields(content, mime),
    )
    if original and original != document_id:
        row["supersedes"] = original
    return row


def summary_document_row(entry: dict[str, Any], ctx: EventContext, ref: dict[str, str], position: int) -> Row:
    """A Clinical Summary DocumentQueryResponse ``Documents[]`` entry (metadata only)."""
    document_id = _require(as_str(entry.get("ID")), ctx, f"Documents[{position}] has no ID")
    doc_type = coded(entry.get("Type"))
    authored = as_ts(entry.get("DateTime"))
    mime = content_type(entry.get("FileType"), None, None)
    row = ctx.lineage(document_id, authored)
    row.update(ref)
    row.update(
        document_id=document_id,
        encounter_id=as_str(as_dict(entry.get("Visit")).get("ID")),
        type_code=doc_type.code,
        type_system=doc_type.system,
        title=as_str(entry.get("Title")),
        status=document_status(entry.get("EntryStatus")) or "current",
        authored_at=authored,
        author=provider_id(entry.get("Author")),
        **_content_fields(None, mime),
    )
    return row


def document_get_row(payload: dict[str, Any], ctx: EventContext, ref: dict[str, str]) -> Row:
    """A DocumentGetResponse: the document's id and its base64 ``Data``. It carries no
    metadata, so type / title / author stay null (the DocumentQueryResponse row has them)."""
    document_id = _require(as_str(as_dict(payload.get("Document")).get("ID")), ctx, "Document has no ID")
    content = decode_content(payload.get("Data"), plain_text=False)
    mime = content_type(payload.get("FileType"), None, content)
    row = ctx.lineage(document_id)
    row.update(ref)
    row.update(document_id=document_id, status="current", **_content_fields(content, mime))
    return row
