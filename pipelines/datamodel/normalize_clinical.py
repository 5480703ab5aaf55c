"""Data Model clinical-record entries → rows of problems, allergies, immunizations,
procedures, diagnostic_reports and orders.

Sources: the Clinical Summary sections (``Problems``, ``Allergies``, ``Immunizations``,
``Procedures.{Procedures,Observations,Services}``, ``PlanOfCare.{Orders,Procedures,Services,
Encounters,Supplies}``, ``Results`` panels as reports), the Order data model's ``Order``
(events and query responses) and the Vaccination model's ``Vaccinations[]``.

Clinical Summary entries carry no ids, so each gets a derived id
(``normalize_fields.derived_id``: a digest of the patient reference, the entry's kind, code
and time — stable across re-sends of the same summary) and a ``match_key`` (code + clinical
day, computed exactly as the FHIR normalizer does) that publish uses to pair the entry with
the FHIR resource for the same record when a connection speaks both surfaces. Codes keep
system (as a FHIR URI where Redox names a known system), code and display; statuses keep
the source's word in ``status_source`` beside the FHIR value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from pipelines.datamodel.normalize_fields import (
    Code,
    as_dict,
    as_float,
    as_list,
    as_str,
    as_ts,
    coded,
    criticality,
    derived_id,
    immunization_status,
    mood_intent,
    npi,
    order_status,
    problem_status,
    procedure_status,
    provider_id,
    report_status,
    severity,
    source_word,
)
from pipelines.datamodel.normalize_patient import EventContext
from pipelines.normalize_common import NormalizationError, match_key

Row = dict[str, Any]


def _entries(section: Any) -> Iterator[dict[str, Any]]:
    for entry in as_list(section):
        if isinstance(entry, dict):
            yield entry


def _comment(entry: dict[str, Any]) -> str | None:
    texts = [as_str(entry.get("Comment"))]
    texts += [
        as_str(as_dict(c).get("Text")) if isinstance(c, dict) else as_str(c)
        for c in as_list(entry.get("Comments"))
    ]
    joined = "\n".join(t for t in texts if t)
    return joined or None


def _has_code(code: Code) -> bool:
    return code.code is not None or code.display is not None


def _id(kind: str, ref: dict[str, str], code: Code, when: Any) -> str:
    stamp = when.isoformat(timespec="seconds") if when is not None else None
    return derived_id(
        kind, ref["patient_ref_type"], ref["patient_ref_value"], code.system, code.code or code.display, stamp
    )


class _SectionIds:
    """Ids for one section's entries, which carry none: derived from (patient, code, time).
    Two entries alike in all three — the same procedure twice in one visit — are told apart
    by their place among those twins (the first keeps the plain id, the n-th gets ``n`` in its
    digest), which holds while the summary lists them in the same order, as it does."""

    def __init__(self, ref: dict[str, str]) -> None:
        self.ref = ref
        self.seen: Counter[str] = Counter()

    def __call__(self, kind: str, code: Code, when: Any) -> str:
        plain = _id(kind, self.ref, code, when)
        self.seen[plain] += 1
        nth = self.seen[plain]
        return plain if nth == 1 else derived_id(kind, plain, nth)


_AT = object()  # ``_entry_row``'s default match time: the row's clinical time


def _entry_row(
    ctx: EventContext,
    ref: dict[str, str],
    id_column: str,
    record_id: str,
    code: Code,
    at: Any,
    /,
    *,
    key_at: Any = _AT,
    **fields: Any,
) -> Row:
    """The row every section entry makes: its lineage (record id, clinical time ``at``), the
    patient reference, the record's id under ``id_column``, the entity's ``fields``, and the
    cross-surface ``match_key`` (code or text, and ``key_at`` — by default ``at``). The leading
    arguments are positional-only: ``fields`` holds columns such as ``code`` too."""
    row = ctx.lineage(record_id, at)
    row.update(ref)
    row[id_column] = record_id
    row.update(fields)
    row["match_key"] = match_key(code.code, at if key_at is _AT else key_at, text=code.display)
    return row


def problem_rows(section: Any, ctx: EventContext, ref: dict[str, str]) -> list[Row]:
    """``Problems[]`` (and ``ResolvedProblems[]``) → problems."""
    rows = []
    ids = _SectionIds(ref)
    for entry in _entries(section):
        code = coded(entry)
        if not _has_code(code):
            continue
        onset = as_ts(entry.get("StartDate"))
        ended = as_ts(entry.get("EndDate"))
        status = problem_status(entry.get("Status"))
        problem_id = ids("problem", code, onset)
        row = _entry_row(
            ctx,
            ref,
            "problem_id",
            problem_id,
            code,
            onset,
            encounter_id=None,
            category=coded(entry.get("Category")).display or coded(entry.get("Category")).code,
            code=code.code,
            code_system=code.system,
            display=code.display,
            status=status,
            status_source=source_word(entry.get("Status")),
            verification_status=None,
            severity=None,
            health_status=coded(entry.get("HealthStatus")).display,
            onset_at=onset,
            abated_at=ended,
            recorded_at=None,
            recorder=None,
            note=_comment(entry),
        )
        rows.append(row)
    return rows


def allergy_rows(section: Any, ctx: EventContext, ref: dict[str, str]) -> list[Row]:
    """``Allergies[]`` → allergies (the substance is the allergy's code)."""
    rows = []
    ids = _SectionIds(ref)
    for entry in _entries(section):
        substance = coded(entry.get("Substance"))
        if not _has_code(substance):
            continue
        onset = as_ts(entry.get("StartDate"))
        reactions = [r for r in as_list(entry.get("Reaction")) if isinstance(r, dict)]
        first = coded(reactions[0]) if reactions else Code(None, None, None)
        reaction_severity = next(
            (severity(r.get("Severity")) for r in reactions if severity(r.get("Severity"))), None
        )
        allergy_type = coded(entry.get("Type"))
        allergy_id = ids("allergy", substance, onset)
        row = _entry_row(
            ctx,
            ref,
            "allergy_id",
            allergy_id,
            substance,
            onset,
            key_at=None,
            category=_allergy_category(allergy_type),
            allergy_type=_allergy_kind(allergy_type),
            substance_code=substance.code,
            substance_system=substance.system,
            substance_display=substance.display,
            status=problem_status(entry.get("Status")),
            status_source=source_word(entry.get("Status")),
            verification_status="refuted" if entry.get("IsNegativeIndicator") is True else None,
            criticality=criticality(entry.get("Criticality")),
            criticality_source=source_word(entry.get("Criticality")),
            severity=severity(entry.get("Severity")) or reaction_severity,
            reaction_code=first.code,
            reaction_system=first.system,
            reaction_display=first.display,
            reactions="; ".join(
                coded(r).display or coded(r).code or as_str(r.get("Text")) or "" for r in reactions
            )
            or None,
            onset_at=onset,
            ended_at=as_ts(entry.get("EndDate")),
            recorded_at=None,
            note=_comment(entry),
        )
        rows.append(row)
    return rows


# SNOMED allergy-type concepts (the CCD allergy value set) → FHIR category and type.
_ALLERGY_CATEGORY = {
    "419511003": "medication",
    "416098002": "medication",
    "59037007": "medication",
    "414285001": "food",
    "235719002": "food",
    "418471000": "food",
    "426232007": "environment",
    "419199007": "environment",
    "418038007": "environment",
}
_INTOLERANCE = frozenset({"59037007", "235719002", "418471000"})


def _allergy_category(kind: Code) -> str | None:
    if kind.code in _ALLERGY_CATEGORY:
        return _ALLERGY_CATEGORY[kind.code]
    text = (kind.display or "").lower()
    for word in ("medication", "food", "environment"):
        if word in text or (word == "medication" and "drug" in text):
            return word
    return None


def _allergy_kind(kind: Code) -> str | None:
    if kind.code is None and kind.display is None:
        return None
    if kind.code in _INTOLERANCE or "intolerance" in (kind.display or "").lower():
        return "intolerance"
    return "allergy"


def immunization_rows(section: Any, ctx: EventContext, ref: dict[str, str]) -> list[Row]:
    """Clinical Summary ``Immunizations[]`` → immunizations."""
    rows = []
    ids = _SectionIds(ref)
    for entry in _entries(section):
        product = as_dict(entry.get("Product"))
        vaccine = coded(product)
        if not _has_code(vaccine):
            continue
        when = as_ts(entry.get("DateTime"))
        route = coded(entry.get("Route"))
        dose = as_dict(entry.get("Dose"))
        not_given = as_str(entry.get("ReasonNotGiven"))
        immunization_id = ids("immunization", vaccine, when)
        row = _entry_row(
            ctx,
            ref,
            "immunization_id",
            immunization_id,
            vaccine,
            when,
            encounter_id=None,
            status=immunization_status(entry.get("Status")) or ("not-done" if not_given else "completed"),
            status_source=as_str(entry.get("Status")),
            vaccine_code=vaccine.code,
            vaccine_system=vaccine.system,
            vaccine_display=vaccine.display,
            occurred_at=when,
            lot_number=as_str(product.get("LotNumber")),
            manufacturer=as_str(product.get("Manufacturer")),
            route_code=route.code,
            route_system=route.system,
            route_display=route.display,
            site=None,
            dose_quantity=as_float(dose.get("Quantity")),
            dose_unit=as_str(dose.get("Units")),
            performer=None,
            not_given_reason=not_given,
        )
        rows.append(row)
    return rows


def vaccination_rows(
    section: Any, ctx: EventContext, ref: dict[str, str], encounter_id: str | None
) -> list[Row]:
    """Vaccination data model ``Vaccinations[]`` → immunizations; the order id is the key
    when the entry carries one."""
    rows = []
    ids = _SectionIds(ref)
    for entry in _entries(section):
        product = as_dict(entry.get("Product"))
        vaccine = coded(product)
        if not _has_code(vaccine):
            continue
        when = as_ts(entry.get("DateTime"))
        route, site = coded(entry.get("Route")), coded(entry.get("Site"))
        dose = as_dict(entry.get("Dose"))
        refused = as_str(entry.get("RefusalReason"))
        order_id = as_str(as_dict(entry.get("Order")).get("ID"))
        immunization_id = order_id or ids("immunization", vaccine, when)
        manufacturer = product.get("Manufacturer")
        row = _entry_row(
            ctx,
            ref,
            "immunization_id",
            immunization_id,
            vaccine,
            when,
            encounter_id=encounter_id,
            status="not-done" if refused else "completed",
            status_source=None,
            vaccine_code=vaccine.code,
            vaccine_system=vaccine.system,
            vaccine_display=vaccine.display,
            occurred_at=when,
            lot_number=as_str(product.get("LotNumber")),
            manufacturer=as_str(as_dict(manufacturer).get("Name")) or as_str(manufacturer),
            route_code=route.code,
            route_system=route.system,
            route_display=route.display or route.code,
            site=site.display or site.code,
            dose_quantity=as_float(dose.get("Quantity")),
            dose_unit=as_str(dose.get("Units")),
            performer=provider_id(entry.get("Provider")),
            not_given_reason=refused,
        )
        rows.append(row)
    return rows


# ``Procedures`` sub-lists and the FHIR Procedure category each stands for.
PROCEDURE_KINDS = (("Procedures", "procedure"), ("Observations", "observation"), ("Services", "act"))


def procedure_rows(section: Any, ctx: EventContext, ref: dict[str, str]) -> list[Row]:
    """``Procedures.{Procedures,Observations,Services}[]`` (CCD procedure activity
    procedure / observation / act) → procedures, the sub-list named in ``category``."""
    block = as_dict(section)
    rows = []
    ids = _SectionIds(ref)
    for key, category in PROCEDURE_KINDS:
        for entry in _entries(block.get(key)):
            code = coded(entry)
            if not _has_code(code):
                continue
            when = as_ts(entry.get("DateTime"))
            site = coded(entry.get("TargetSite"))
            procedure_id = ids(f"procedure-{category}", code, when)
            row = _entry_row(
                ctx,
                ref,
                "procedure_id",
                procedure_id,
                code,
                when,
                encounter_id=None,
                category=category,
                code=code.code,
                code_system=code.system,
                display=code.display,
                status=procedure_status(entry.get("Status")),
                status_source=as_str(entry.get("Status")),
                performed_at=when,
                performed_end_at=None,
                body_site_code=site.code,
                body_site_system=site.system,
                body_site_display=site.display,
                performer=None,
                reason_code=None,
                reason_system=None,
                reason_display=None,
                note=_comment(entry),
            )
            rows.append(row)
    return rows


# ``PlanOfCare`` sub-lists that are requests for a service, and the category each is.
PLAN_KINDS = (
    ("Orders", "order"),
    ("Procedures", "procedure"),
    ("Services", "service"),
    ("Encounters", "encounter"),
    ("Supplies", "supply"),
)


def plan_of_care_rows(section: Any, ctx: EventContext, ref: dict[str, str]) -> list[Row]:
    """``PlanOfCare`` requests → orders (``category`` names the sub-list; the entry's mood —
    ``Status`` "Request", "Intent" … — becomes the FHIR intent, and stays in status_source).
    Planned medications are medications, not orders (see ``plan_medication_rows``)."""
    block = as_dict(section)
    rows = []
    ids = _SectionIds(ref)
    for key, category in PLAN_KINDS:
        for entry in _entries(block.get(key)):
            code = coded(entry if key != "Supplies" else entry.get("Product") or entry)
            if not _has_code(code):
                continue
            when = as_ts(entry.get("DateTime"))
            order_id = ids(f"plan-{category}", code, when)
            row = _entry_row(
                ctx,
                ref,
                "order_id",
                order_id,
                code,
                when,
                encounter_id=None,
                category=category,
                code=code.code,
                code_system=code.system,
                display=code.display,
                status=order_status(entry.get("Status")) or "active",
                status_source=as_str(entry.get("Status")),
                intent=mood_intent(entry.get("Status")) or "plan",
                priority=None,
                ordered_at=None,
                occurrence_at=when,
                requester_npi=None,
                performer=None,
                reason_code=None,
                reason_system=None,
                reason_display=None,
                note=_comment(entry),
            )
            rows.append(row)
    return rows


def summary_report_rows(section: Any, ctx: EventContext, ref: dict[str, str]) -> list[Row]:
    """Clinical Summary ``Results[]`` panels → diagnostic_reports grouping the panel's
    results (whose ids ``normalize_summary.result_rows`` derives the same way)."""
    import orjson

    from pipelines.datamodel.normalize_records import CATEGORY_BY_PANEL
    from pipelines.datamodel.normalize_summary import summary_result_id

    rows = []
    for panel in _entries(section):
        code = coded(panel)
        if not _has_code(code) or CATEGORY_BY_PANEL.get(code.code or "", "laboratory") != "laboratory":
            continue
        observations = [
            o for o in as_list(panel.get("Observations")) if isinstance(o, dict) and as_str(o.get("Code"))
        ]
        times = [t for t in (as_ts(o.get("DateTime")) for o in observations) if t is not None]
        when = min(times) if times else None
        report_id = summary_report_id(ref, code, when)
        results = [summary_result_id(ref, code.code, o) for o in observations]
        row = _entry_row(
            ctx,
            ref,
            "report_id",
            report_id,
            code,
            when,
            encounter_id=None,
            order_id=None,
            category="LAB",
            code=code.code,
            code_system=code.system,
            display=code.display,
            status=report_status(panel.get("Status")),
            status_source=as_str(panel.get("Status")),
            effective_at=when,
            issued_at=None,
            performer=as_str(as_dict(panel.get("Producer")).get("Name")),
            conclusion=None,
            result_count=len(results) or None,
            result_refs=orjson.dumps(results).decode() if results else None,
        )
        rows.append(row)
    return rows


def summary_report_id(ref: dict[str, str], code: Code, when: Any) -> str:
    return _id("summary-report", ref, code, when)


def order_row(
    order: dict[str, Any], ctx: EventContext, ref: dict[str, str], encounter_id: str | None, event: str
) -> Row:
    """The Order data model's ``Order`` (New / Update / Cancel / QueryResponse ``Orders[]``)."""
    order_id = as_str(order.get("ID")) or as_str(order.get("ApplicationOrderID"))
    if not order_id:
        raise NormalizationError(f"{ctx.label}: Order has no ID")
    procedure = coded(order.get("Procedure"))
    ordered = as_ts(order.get("TransactionDateTime"))
    occurrence = as_ts(order.get("CollectionDateTime"))
    diagnosis = coded(next((d for d in as_list(order.get("Diagnoses")) if isinstance(d, dict)), None))
    stated = order_status(order.get("Status"))
    status = "revoked" if event == "Cancel" else (stated or "active")
    notes = [as_str(n) for n in as_list(order.get("Notes"))] + [as_str(order.get("Comments"))]
    row = _entry_row(
        ctx,
        ref,
        "order_id",
        order_id,
        procedure,
        as_ts(order.get("LastUpdated")) or ordered,
        key_at=occurrence or ordered,
        encounter_id=encounter_id,
        category=None,
        code=procedure.code,
        code_system=procedure.system,
        display=procedure.display,
        status=status,
        status_source=as_str(order.get("Status"))
        or (event if event in ("New", "Update", "Cancel") else None),
        intent="order",
        priority=_priority(order.get("Priority")),
        ordered_at=ordered,
        occurrence_at=occurrence,
        requester_npi=npi(order.get("Provider")),
        performer=as_str(as_dict(order.get("OrderingFacility")).get("Name")),
        reason_code=diagnosis.code,
        reason_system=diagnosis.system,
        reason_display=diagnosis.display,
        note="\n".join(n for n in notes if n) or None,
    )
    return row


_PRIORITIES = {
    "stat": "stat",
    "asap": "asap",
    "routine": "routine",
    "urgent": "urgent",
    "timing critical": "urgent",
}


def _priority(value: Any) -> str | None:
    text = (as_str(value) or "").lower()
    return _PRIORITIES.get(text, text or None)
