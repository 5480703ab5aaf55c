"""How an existing record changes when simulated time moves on.

Both population backends pick which records change; these functions decide *how* each one
changes, so an update always means something a downstream system would care about (an encounter
finishes, a preliminary result becomes final, a booked appointment is kept or missed ...).
They never mutate their input: they return a new record with ``version`` bumped and
``last_updated`` set to the time of the change.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta

from sandbox.population import clinical, vocab
from sandbox.population.query import record_status
from sandbox.population.records import (
    AllergyRecord,
    AppointmentRecord,
    Component,
    DiagnosticReportRecord,
    DocumentRecord,
    EncounterRecord,
    ImmunizationRecord,
    MedicationRecord,
    OrderRecord,
    PatientRecord,
    ProblemRecord,
    ProcedureRecord,
    Record,
    ResultRecord,
)

# Statuses an update moves forward (the rest get a secondary change); backends prefer these.
TRANSITIONAL: dict[str, frozenset[str]] = {
    "patients": frozenset(),
    "encounters": frozenset({"planned", "arrived", "in-progress"}),
    "results": frozenset({"preliminary"}),
    "medications": frozenset({"active", "on-hold"}),
    "appointments": frozenset({"proposed", "pending", "booked", "arrived"}),
    "documents": frozenset(),
    "problems": frozenset({"active"}),
    "allergies": frozenset({"active"}),
    "immunizations": frozenset(),
    "procedures": frozenset({"in-progress"}),
    "diagnostic_reports": frozenset({"registered", "preliminary"}),
    "orders": frozenset({"active"}),
}
# Entities with no "cancelled" status: a cancel is an entered-in-error correction.
_ERROR_ONLY = (ProblemRecord, AllergyRecord, ImmunizationRecord, ProcedureRecord)


def update_record(record: Record, rng: random.Random, at: datetime) -> Record:
    """The next version of a live record."""
    bumped = {"version": record.version + 1, "last_updated": at}
    if isinstance(record, PatientRecord):
        return replace(record, **bumped, **_patient_change(record, rng))
    if isinstance(record, EncounterRecord):
        return replace(record, **bumped, **_encounter_change(record, rng, at))
    if isinstance(record, ResultRecord):
        return replace(record, **bumped, **_result_change(record, rng, at))
    if isinstance(record, MedicationRecord):
        return replace(record, **bumped, **_medication_change(record, rng, at))
    if isinstance(record, AppointmentRecord):
        return replace(record, **bumped, **_appointment_change(record, rng, at))
    if isinstance(record, DocumentRecord):
        return replace(record, **bumped, **_document_change(record, rng, at))
    if isinstance(record, ProblemRecord):
        return replace(record, **bumped, **_problem_change(record, rng, at))
    if isinstance(record, AllergyRecord):
        return replace(record, **bumped, **_allergy_change(record, rng, at))
    if isinstance(record, ImmunizationRecord):
        return replace(record, **bumped, **_immunization_change(record, rng, at))
    if isinstance(record, ProcedureRecord):
        return replace(record, **bumped, **_procedure_change(record, rng, at))
    if isinstance(record, DiagnosticReportRecord):
        return replace(record, **bumped, **_report_change(record, rng, at))
    if isinstance(record, OrderRecord):
        return replace(record, **bumped, **_order_change(record, rng, at))
    raise TypeError(f"unknown record type {type(record).__name__}")


def cancel_record(record: Record, rng: random.Random, at: datetime) -> Record:
    """Cancel, enter in error, or (patients) deactivate a live record."""
    bumped = {"version": record.version + 1, "last_updated": at}
    if isinstance(record, PatientRecord):
        return replace(record, active=False, **bumped)
    if isinstance(record, (DocumentRecord, *_ERROR_ONLY)):
        return replace(record, status="entered-in-error", **bumped)
    status = record_status(record)
    early = status in {
        "planned",
        "arrived",
        "preliminary",
        "proposed",
        "pending",
        "booked",
        "active",
        "on-hold",
    }
    new_status = "cancelled" if early and rng.random() < 0.8 else "entered-in-error"
    if isinstance(record, OrderRecord) and new_status == "cancelled":
        new_status = "revoked"  # a ServiceRequest has no "cancelled"
    if isinstance(record, AppointmentRecord) and new_status == "cancelled":
        return replace(record, status="cancelled", cancel_reason=rng.choice(vocab.CANCEL_REASONS), **bumped)
    return replace(record, status=new_status, **bumped)


def _patient_change(record: PatientRecord, rng: random.Random) -> dict:
    area = record.phone_home[2:5] if record.phone_home and record.phone_home.startswith("+1") else "608"
    roll = rng.random()
    if roll < 0.35:
        return {"phone_mobile": clinical.phone(area, rng)}
    if roll < 0.6:
        given = record.given_names[0] if record.given_names else "patient"
        return {"email": clinical.email(given, record.family_name, rng)}
    if roll < 0.85:
        return {"address_line": clinical.street_address(rng)}
    choices = [m for m in vocab.MARITAL_STATUSES if m != record.marital_status]
    return {"marital_status": rng.choice(choices)}


def _encounter_change(record: EncounterRecord, rng: random.Random, at: datetime) -> dict:
    if record.status == "planned":
        return {"status": "arrived", "start_at": min(record.start_at, at)}
    if record.status == "arrived":
        return {"status": "in-progress"}
    if record.status == "in-progress":
        change: dict = {"status": "finished", "end_at": max(at, record.start_at)}
        if record.class_code in ("IMP", "OBSENC", "EMER"):
            change["discharge_disposition"] = _weighted(vocab.DISCHARGE_DISPOSITIONS, rng)
        return change
    # A finished visit gets its final coded diagnosis.
    pool = vocab.INPATIENT_REASONS if record.class_code in ("IMP", "OBSENC") else vocab.REASONS
    options = [r for r in pool if record.reason is None or r.code != record.reason.code]
    return {"reason": rng.choice(options)}


def _result_change(record: ResultRecord, rng: random.Random, at: datetime) -> dict:
    status = "final" if record.status == "preliminary" else "corrected"
    analyte = clinical.ANALYTES.get(record.code.code)
    change: dict = {"status": status, "issued_at": at}
    if analyte is None:
        return change
    if analyte.components:
        parts = []
        for part, old in zip(analyte.components, record.components, strict=False):
            base = old.value_numeric if old.value_numeric is not None else part.mean
            value = round(
                max(base + rng.choice((-1, 1)) * part.sd * 0.3 * (0.5 + rng.random()), 1.0), part.decimals
            )
            parts.append(
                Component(part.code, value, clinical.format_numeric(value, part.decimals), part.unit,
                          part.low, part.high, clinical.numeric_flag(part, value))
            )  # fmt: skip
        return change | {"components": tuple(parts)}
    if analyte.text_values:
        value = clinical.draw_text(analyte, rng)
        return change | {"value_text": value, "abnormal_flag": clinical.text_flag(analyte, value)}
    base = record.value_numeric if record.value_numeric is not None else analyte.mean
    step = max(analyte.sd * 0.3, 10 ** (-analyte.decimals))
    value = round(max(base + rng.choice((-1, 1)) * step * (0.5 + rng.random()), step), analyte.decimals)
    return change | {
        "value_numeric": value,
        "value_text": clinical.format_numeric(value, analyte.decimals),
        "abnormal_flag": clinical.numeric_flag(analyte, value),
    }


def _medication_change(record: MedicationRecord, rng: random.Random, at: datetime) -> dict:
    if record.status == "active":
        roll = rng.random()
        if roll < 0.7:
            return {"status": "completed", "end_at": max(at, record.start_at or at)}
        if roll < 0.85:
            return {"status": "stopped", "end_at": max(at, record.start_at or at)}
        return {"status": "on-hold"}
    # on-hold, completed or stopped: therapy resumes.
    return {"status": "active", "end_at": None}


def _appointment_change(record: AppointmentRecord, rng: random.Random, at: datetime) -> dict:
    if record.status in ("proposed", "pending"):
        return {"status": "booked"}
    if record.status == "booked":
        if record.start_at <= at:
            roll = rng.random()
            if roll < 0.15:
                return {"status": "noshow"}
            return {"status": "arrived" if roll < 0.35 else "fulfilled"}
        # Still in the future: moved to another slot.
        shift = timedelta(days=rng.randint(1, 21), minutes=15 * rng.randint(-8, 8))
        return {"start_at": max(record.start_at + shift, at + timedelta(hours=1))}
    if record.status == "arrived":
        return {"status": "fulfilled"}
    options = [r for r in vocab.APPOINTMENT_REASONS if r != record.reason]
    return {"reason": rng.choice(options)}


def _document_change(record: DocumentRecord, rng: random.Random, at: datetime) -> dict:
    if record.status == "superseded":
        return {"status": "current"}
    if rng.random() < 0.2:
        return {"status": "superseded"}
    stamp = at.strftime("%Y-%m-%d %H:%M UTC")
    if record.content_type == "text/plain":
        addendum = f"\n\nADDENDUM ({stamp}): {rng.choice(vocab.PLANS)}\n".encode()
        return {"content": record.content + addendum, "title": _amended(record.title)}
    marker = f"<!-- amended {stamp} -->\n".encode()
    return {"content": record.content + marker, "title": _amended(record.title)}


def _problem_change(record: ProblemRecord, rng: random.Random, at: datetime) -> dict:
    if record.status == "active":
        return {"status": "resolved", "abated_at": max(at, record.onset_at)}
    return {"status": "active", "abated_at": None}  # a recurrence


def _allergy_change(record: AllergyRecord, rng: random.Random, at: datetime) -> dict:
    if record.status == "active":
        return {"status": rng.choice(("inactive", "resolved"))}
    severity = rng.choice(("mild", "moderate", "severe"))
    return {"severity": severity, "criticality": "high" if severity == "severe" else record.criticality}


def _immunization_change(record: ImmunizationRecord, rng: random.Random, at: datetime) -> dict:
    # A documentation correction: the lot number is re-keyed from the vial.
    if record.lot_number is None:
        return {"recorded_at": at}
    return {"lot_number": f"{record.lot_number[0]}{rng.randrange(10000, 99999)}"}


def _procedure_change(record: ProcedureRecord, rng: random.Random, at: datetime) -> dict:
    if record.status == "in-progress":
        return {"status": "completed", "performed_end": max(at, record.performed_start)}
    return {"reason": rng.choice(vocab.REASONS)}


def _report_change(record: DiagnosticReportRecord, rng: random.Random, at: datetime) -> dict:
    if record.status in ("registered", "preliminary"):
        return {"status": "final", "issued_at": at}
    return {"status": "corrected", "issued_at": at}


def _order_change(record: OrderRecord, rng: random.Random, at: datetime) -> dict:
    if record.status == "active":
        return {"status": "completed"}
    return {"priority": "urgent" if record.priority == "routine" else "routine"}


def _amended(title: str) -> str:
    return title if title.endswith("(amended)") else f"{title} (amended)"


def _weighted(pairs, rng: random.Random):
    items = [p[0] for p in pairs]
    weights = [p[1] for p in pairs]
    return rng.choices(items, weights=weights, k=1)[0]
