"""Canonical, surface-neutral records of the sandbox population.

The population (``sandbox.population``) produces these; the FHIR renderer
(``sandbox.fhir``) and the Data Model renderer (``sandbox.datamodel``) turn the
same record into the shape each surface speaks. Because both surfaces render one
record, a connection that speaks both exposes identical data through both.

All datetimes are timezone-aware UTC. Codes keep system, code and display.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

ENTITIES: tuple[str, ...] = (
    "patients",
    "encounters",
    "results",
    "medications",
    "appointments",
    "documents",
    "problems",
    "allergies",
    "immunizations",
    "procedures",
    "diagnostic_reports",
    "orders",
)
WRITE_ENTITIES: tuple[str, ...] = ("orders", "appointments")
# Entities Redox pushes no event family for, on either surface (REDOX-REFERENCE §3.5, §12.3):
# clients pull them (FHIR searches per patient, Clinical Summary queries).
PULL_ONLY_ENTITIES = frozenset({"problems", "allergies", "immunizations", "procedures", "diagnostic_reports"})

# Code systems, as FHIR URIs, with the Redox Data Model ``Codeset`` name beside each.
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
CVX = "http://hl7.org/fhir/sid/cvx"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
CODESET_NAMES = {
    LOINC: "LOINC",
    SNOMED: "SNOMED CT",
    RXNORM: "RxNorm",
    CPT: "CPT",
    ICD10: "ICD-10",
    CVX: "CVX",
}


@dataclass(frozen=True, slots=True)
class Coding:
    system: str  # FHIR URI (see constants above); Data Model renders CODESET_NAMES[system]
    code: str
    display: str


@dataclass(frozen=True, slots=True)
class Provider:
    npi: str
    first_name: str
    last_name: str
    credentials: tuple[str, ...] = ("MD",)


@dataclass(frozen=True, slots=True)
class Location:
    facility: str
    department: str
    room: str | None = None
    bed: str | None = None
    type: str | None = None  # e.g. "Inpatient", "Clinic"


@dataclass(frozen=True, slots=True)
class PatientRef:
    """How other records point at their patient, within one connection."""

    patient_id: str  # FHIR logical id of the patient in this connection
    mrn: str  # local medical record number in this connection


@dataclass(slots=True)
class RecordBase:
    connection_id: str
    id: str  # FHIR logical id (stable, unique per connection and entity)
    last_updated: datetime  # FHIR meta.lastUpdated / Data Model event time
    version: int  # FHIR meta.versionId; bumps on every update


@dataclass(slots=True)
class PatientRecord(RecordBase):
    person_index: int  # which synthetic person (same across connections)
    mrn: str  # identifier type MR, system urn:redox:<slug>:MR
    ehr_id: str  # identifier type EHRID (uuid)
    enterprise_id: str  # identifier type EPI: shared by every connection that knows this person
    nist_id: str | None  # identifier type NIST (only some connections)
    family_name: str
    given_names: tuple[str, ...]
    birth_date: date
    sex: Literal["male", "female", "other", "unknown"]
    race: str | None
    ethnicity: str | None  # "Hispanic or Latino" / "Not Hispanic or Latino"
    language: str | None  # BCP-47 / ISO 639-1, e.g. "en"
    address_line: str | None
    city: str | None
    state: str | None
    postal_code: str | None
    county: str | None
    phone_home: str | None  # E.164
    phone_mobile: str | None
    email: str | None
    ssn: str | None
    marital_status: str | None
    deceased_at: datetime | None
    is_test: bool
    active: bool = True


@dataclass(slots=True)
class EncounterRecord(RecordBase):
    patient: PatientRef
    visit_number: str  # business id shared by both surfaces (FHIR identifier urn:redox:<slug>:VN)
    account_number: str | None
    status: Literal["planned", "arrived", "in-progress", "finished", "cancelled", "entered-in-error"]
    class_code: Literal["AMB", "IMP", "EMER", "OBSENC", "VR", "HH"]  # v3 ActCode
    type: Coding | None  # CPT or SNOMED visit type (outside data may have none)
    start_at: datetime
    end_at: datetime | None
    location: Location | None
    attending: Provider | None
    reason: Coding | None  # ICD-10
    discharge_disposition: Coding | None
    appointment_id: str | None = None  # the Appointment (record id) this visit fulfils


@dataclass(frozen=True, slots=True)
class Component:
    """One ``Observation.component`` (a blood pressure's systolic or diastolic value)."""

    code: Coding
    value_numeric: float | None
    value_text: str | None
    unit: str | None  # UCUM
    reference_low: float | None = None
    reference_high: float | None = None
    abnormal_flag: str | None = None  # H/L/HH/LL/A/N


@dataclass(slots=True)
class ResultRecord(RecordBase):
    patient: PatientRef
    visit_number: str | None
    order_id: str  # accession / order number (Data Model Orders[].ID)
    result_id: str  # business id "<order_id>-<code>" (FHIR Observation.identifier)
    # FHIR observation-category code (the sandbox generates the first five); None when the source
    # Observation carries no category.
    category: str | None
    panel: Coding  # ordered procedure (Data Model Orders[].Procedure), LOINC
    code: Coding  # LOINC of this observation
    value_type: Literal["Numeric", "String", "Coded Entry"]
    value_numeric: float | None
    value_text: str | None  # for String / Coded Entry (and the string form of numeric values)
    unit: str | None  # UCUM
    reference_low: float | None
    reference_high: float | None
    reference_text: str | None
    abnormal_flag: Literal["H", "L", "HH", "LL", "A", "N"] | None
    status: Literal["final", "preliminary", "corrected", "cancelled", "entered-in-error"]
    effective_at: datetime
    issued_at: datetime | None
    performer: Provider | None
    producer: str | None  # performing lab name
    # Component-only Observations (blood pressure panel): no value of their own, the values here.
    components: tuple[Component, ...] = ()
    value_code: Coding | None = None  # coded value's coding (SNOMED smoking status), when known

    @property
    def has_order(self) -> bool:
        """Whether an order asked for this result. An outside Observation that names no order
        (no ``basedOn``, no contained ServiceRequest, in no DiagnosticReport) is given its own
        id as order number by ``--seed-from``; the Data Model then shows it as a Results
        order that names no procedure, which is no report (see ``datamodel.render``)."""
        return self.order_id != self.id


@dataclass(slots=True)
class MedicationRecord(RecordBase):
    patient: PatientRef
    visit_number: str | None
    order_id: str  # medication order number (Data Model Order.ID)
    kind: Literal["request", "statement"]  # FHIR MedicationRequest vs MedicationStatement
    status: Literal["active", "completed", "stopped", "on-hold", "cancelled", "entered-in-error"]
    intent: str | None  # MedicationRequest.intent ("order"); None for statements
    code: Coding  # RxNorm
    dose_quantity: float | None
    dose_unit: str | None
    route: Coding | None  # SNOMED route
    frequency_period: float | None  # e.g. 8 with unit "h" -> every 8 hours
    frequency_unit: str | None
    start_at: datetime | None
    end_at: datetime | None
    prescriber: Provider | None


@dataclass(slots=True)
class AppointmentRecord(RecordBase):
    patient: PatientRef
    visit_number: str  # scheduling visit number (the appointment id both surfaces carry)
    status: Literal[
        "proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow", "entered-in-error"
    ]
    start_at: datetime
    duration_minutes: int
    type: Coding | None
    reason: str | None
    provider: Provider | None
    location: Location | None
    cancel_reason: str | None = None
    rescheduled_from: str | None = None  # old visit number when this one replaced another


@dataclass(slots=True)
class DocumentRecord(RecordBase):
    patient: PatientRef
    visit_number: str | None
    document_id: str  # business id (Data Model Document.ID / DocumentID)
    kind: Literal["note", "cda"]
    type: Coding  # LOINC document type, e.g. 11506-3 Progress note, 34133-9 Summary of episode note
    title: str
    status: Literal["current", "superseded", "entered-in-error"]
    authored_at: datetime
    author: Provider | None
    content_type: str  # "text/plain" or "application/xml"
    content: bytes = field(repr=False, default=b"")  # note text or C-CDA-like XML (deterministic)


@dataclass(slots=True)
class ProblemRecord(RecordBase):
    """A problem-list entry (FHIR Condition, Data Model Clinical Summary ``Problems``)."""

    patient: PatientRef
    visit_number: str | None
    problem_id: str  # business id (FHIR identifier urn:redox:<slug>:ProblemID)
    code: Coding  # ICD-10-CM
    alt_code: Coding | None  # SNOMED CT equivalent
    # clinical status (condition-clinical) or entered-in-error
    status: Literal[
        "active", "inactive", "resolved", "entered-in-error", "recurrence", "relapse", "remission"
    ]
    onset_at: datetime
    abated_at: datetime | None
    recorded_at: datetime
    recorder: Provider | None
    category: str = "problem-list-item"  # condition-category: problem-list-item | encounter-diagnosis


@dataclass(slots=True)
class AllergyRecord(RecordBase):
    """An allergy or intolerance (FHIR AllergyIntolerance, Clinical Summary ``Allergies``)."""

    patient: PatientRef
    allergy_id: str  # business id (urn:redox:<slug>:AllergyID)
    substance: Coding  # RxNorm (medication) or SNOMED CT (food, environment)
    kind: Literal["allergy", "intolerance"] | None
    category: Literal["medication", "food", "environment", "biologic"] | None
    criticality: Literal["low", "high", "unable-to-assess"] | None
    status: Literal["active", "inactive", "resolved", "entered-in-error"]  # clinical status
    reaction: Coding | None  # SNOMED manifestation
    severity: Literal["mild", "moderate", "severe"] | None
    onset_at: datetime | None
    recorded_at: datetime
    recorder: Provider | None


@dataclass(slots=True)
class ImmunizationRecord(RecordBase):
    """A vaccine given or not given (FHIR Immunization, Clinical Summary ``Immunizations``)."""

    patient: PatientRef
    visit_number: str | None
    immunization_id: str  # business id (urn:redox:<slug>:ImmunizationID)
    vaccine: Coding  # CVX
    status: Literal["completed", "not-done", "entered-in-error"]
    status_reason: Coding | None  # not-done only (v3 ActReason)
    occurred_at: datetime
    recorded_at: datetime
    lot_number: str | None
    manufacturer: str | None
    route: Coding | None  # v3 RouteOfAdministration
    dose_quantity: float | None
    dose_unit: str | None  # UCUM
    performer: Provider | None


@dataclass(slots=True)
class ProcedureRecord(RecordBase):
    """A procedure performed (FHIR Procedure, Clinical Summary ``Procedures.Procedures``)."""

    patient: PatientRef
    visit_number: str | None
    procedure_id: str  # business id (urn:redox:<slug>:ProcedureID)
    code: Coding  # CPT or SNOMED CT
    status: str  # FHIR Procedure.status (generated: in-progress | completed | not-done | entered-in-error)
    performed_start: datetime
    performed_end: datetime | None
    body_site: Coding | None  # SNOMED CT
    reason: Coding | None  # ICD-10
    performer: Provider | None


@dataclass(slots=True)
class DiagnosticReportRecord(RecordBase):
    """A lab report grouping the results of one lab order (FHIR DiagnosticReport)."""

    patient: PatientRef
    visit_number: str | None
    order_id: str  # business id: the lab order (accession) number, as on its results
    code: Coding  # the panel (LOINC)
    status: str  # FHIR DiagnosticReport.status
    effective_at: datetime
    issued_at: datetime | None
    performer: Provider | None
    producer: str | None
    result_ids: tuple[str, ...]  # FHIR logical ids of the grouped Observations
    result_business_ids: tuple[str, ...]  # their ResultIDs, same order


@dataclass(slots=True)
class OrderRecord(RecordBase):
    """An inbound lab order (FHIR ServiceRequest, Data Model ``Order``)."""

    patient: PatientRef
    visit_number: str | None
    order_id: str  # business id (urn:redox:<slug>:OrderID), the same number its results carry
    code: Coding  # ordered panel (LOINC)
    status: str  # FHIR ServiceRequest.status (generated: active | completed | revoked | entered-in-error)
    intent: str  # "order"
    priority: Literal["routine", "urgent", "asap", "stat"] | None
    authored_at: datetime
    occurrence_at: datetime  # collection time
    requester: Provider | None
    reason: Coding | None  # ICD-10


Record = (
    PatientRecord
    | EncounterRecord
    | ResultRecord
    | MedicationRecord
    | AppointmentRecord
    | DocumentRecord
    | ProblemRecord
    | AllergyRecord
    | ImmunizationRecord
    | ProcedureRecord
    | DiagnosticReportRecord
    | OrderRecord
)

ENTITY_RECORD_TYPES: dict[str, type] = {
    "patients": PatientRecord,
    "encounters": EncounterRecord,
    "results": ResultRecord,
    "medications": MedicationRecord,
    "appointments": AppointmentRecord,
    "documents": DocumentRecord,
    "problems": ProblemRecord,
    "allergies": AllergyRecord,
    "immunizations": ImmunizationRecord,
    "procedures": ProcedureRecord,
    "diagnostic_reports": DiagnosticReportRecord,
    "orders": OrderRecord,
}

# Statuses that a complete sync still holds but that `live` leaves out (``revoked`` is a
# ServiceRequest's cancelled).
DEAD_STATUSES = frozenset({"cancelled", "entered-in-error", "revoked"})


def is_live(record: Record) -> bool:
    status = getattr(record, "status", None)
    if isinstance(record, PatientRecord):
        return record.active
    return status not in DEAD_STATUSES


@dataclass(frozen=True, slots=True)
class Change:
    """One change made by ``Population.advance``; the webhook sender turns it into events."""

    entity: str  # one of ENTITIES
    kind: Literal["new", "update", "cancel"]  # cancel = cancelled or entered-in-error
    record: Record
    previous_status: str | None = None
