"""``--seed-from DIR``: serve FHIR R4 files as one sandbox connection.

Reads bulk-export NDJSON (one resource per line, e.g. ``Patient.ndjson``, optionally gzipped)
and Bundle JSON files (Synthea writes transaction/collection bundles whose references are
``urn:uuid:`` fullUrls), and turns every resource type Redox documents a FHIR search for —
Patient, Encounter, Observation (every category, component-only ones included),
MedicationRequest, MedicationStatement, Appointment, DocumentReference, Condition,
AllergyIntolerance, Immunization, Procedure, DiagnosticReport and ServiceRequest — into canonical
records, the inverse of ``sandbox.fhir.render``. Optional fields that are missing stay missing
(an Encounter without a type, a practitioner without an NPI are served as they are). What still
cannot be mapped is skipped and counted by reason, and the counts are logged at start-up;
reasons never contain values from the files (they may be PHI).
"""

from __future__ import annotations

import base64
import gzip
import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson

from sandbox.config import ConnectionSpec, SandboxConfig
from sandbox.fhir import identifiers as ids
from sandbox.fhir.render import format_number
from sandbox.fhir.search import STATUS_VALUES
from sandbox.population.records import CVX as CVX_SYSTEM
from sandbox.population.records import (
    ENTITIES,
    ICD10,
    AllergyRecord,
    AppointmentRecord,
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
    PatientRef,
    ProblemRecord,
    ProcedureRecord,
    Provider,
    Record,
    ResultRecord,
)

log = logging.getLogger(__name__)

SEEDED_CONNECTION_ID = "seeded"
SYNTHEA_ID_SYSTEM = "https://github.com/synthetichealth/synthea"
_NAMESPACE = uuid.UUID("3f1d2a8c-6b7e-4e0f-a1c9-52d8e4b7f0a6")
_PHYSICAL_LEVELS = {"si": "facility", "bu": "facility", "wa": "department", "ro": "room", "bd": "bed"}
_ENCOUNTER_STATUS = {
    "planned": "planned",
    "arrived": "arrived",
    "triaged": "arrived",
    "in-progress": "in-progress",
    "onleave": "in-progress",
    "finished": "finished",
    "cancelled": "cancelled",
    "entered-in-error": "entered-in-error",
}
_ENCOUNTER_CLASS = {"AMB": "AMB", "IMP": "IMP", "EMER": "EMER", "OBSENC": "OBSENC", "VR": "VR", "HH": "HH"}
_ENCOUNTER_CLASS_ALIASES = {"ACUTE": "IMP", "NONAC": "IMP", "PRENC": "AMB", "SS": "AMB", "FLD": "AMB"}
_RESULT_STATUS = {
    "final": "final",
    "preliminary": "preliminary",
    "registered": "preliminary",
    "corrected": "corrected",
    "amended": "corrected",
    "cancelled": "cancelled",
    "entered-in-error": "entered-in-error",
}
_REQUEST_STATUS = {
    "active": "active",
    "completed": "completed",
    "stopped": "stopped",
    "on-hold": "on-hold",
    "draft": "on-hold",
    "cancelled": "cancelled",
    "entered-in-error": "entered-in-error",
}
_STATEMENT_STATUS = {
    "active": "active",
    "intended": "active",
    "completed": "completed",
    "stopped": "stopped",
    "on-hold": "on-hold",
    "not-taken": "cancelled",
    "entered-in-error": "entered-in-error",
}
_APPOINTMENT_STATUS = {
    "proposed": "proposed",
    "pending": "pending",
    "waitlist": "pending",
    "booked": "booked",
    "arrived": "arrived",
    "checked-in": "arrived",
    "fulfilled": "fulfilled",
    "cancelled": "cancelled",
    "noshow": "noshow",
    "entered-in-error": "entered-in-error",
}
_CONDITION_STATUS = {
    "active": "active",
    "recurrence": "recurrence",
    "relapse": "relapse",
    "inactive": "inactive",
    "remission": "remission",
    "resolved": "resolved",
}
_ALLERGY_STATUS = {"active": "active", "inactive": "inactive", "resolved": "resolved"}
# FHIR's status value sets, as the search layer checks them.
_IMMUNIZATION_STATUS = STATUS_VALUES["Immunization"]
_PROCEDURE_STATUS = STATUS_VALUES["Procedure"]
_REPORT_STATUS = STATUS_VALUES["DiagnosticReport"]
_ORDER_STATUS = STATUS_VALUES["ServiceRequest"]
_ORDER_PRIORITY = frozenset({"routine", "urgent", "asap", "stat"})
_OBSERVATION_CATEGORIES = (
    "laboratory",
    "vital-signs",
    "social-history",
    "survey",
    "exam",
    "imaging",
    "procedure",
    "therapy",
    "activity",
)
# Read only to resolve references (NPIs, medication codes, document content, report results).
_SUPPORTING_TYPES = frozenset(
    {"Practitioner", "PractitionerRole", "Medication", "Binary", "Location", "Organization"}
)
# Types the sandbox serves, by the entity they load into (the order they are loaded in).
SERVED_TYPES: dict[str, str] = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Observation": "results",
    "MedicationRequest": "medications",
    "MedicationStatement": "medications",
    "Appointment": "appointments",
    "DocumentReference": "documents",
    "Condition": "problems",
    "AllergyIntolerance": "allergies",
    "Immunization": "immunizations",
    "Procedure": "procedures",
    "ServiceRequest": "orders",
    "DiagnosticReport": "diagnostic_reports",
}
_FLAGS = frozenset({"H", "L", "HH", "LL", "A", "N"})
_SEX = frozenset({"male", "female", "other", "unknown"})


class Skip(Exception):
    """A resource that cannot become a record; ``reason`` is counted (never holds file values)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class SeedLoad:
    connection: ConnectionSpec
    records: dict[str, list[Record]]
    skipped: Counter = field(default_factory=Counter)  # "<ResourceType>: <reason>" -> count


def seeded_connection() -> ConnectionSpec:
    return ConnectionSpec(
        id=SEEDED_CONNECTION_ID,
        name="Seeded from FHIR files",
        surfaces=("fhir", "datamodel"),
        slug=SEEDED_CONNECTION_ID,
        membership=1.0,
        id_types=("MR", "EHRID", "NIST"),
    )


def load_seed_dir(
    path: str | Path, updated_at: datetime | None = None
) -> tuple[ConnectionSpec, dict[str, list[Record]]]:
    """The seeded connection and its records by entity. ``updated_at`` stands in for a missing
    ``meta.lastUpdated`` (default: the sandbox's default clock start)."""
    loaded = read_seed_dir(path, updated_at)
    lines = startup_report(loaded)
    log.info(lines[0])
    for line in lines[1:]:  # what is lost is worth a warning: shown at the default log level
        log.warning(line)
    return loaded.connection, loaded.records


def startup_report(loaded: SeedLoad) -> list[str]:
    """What ``--seed-from`` serves and what it cannot, as start-up lines: counts per entity, then
    one line per reason a resource was not served (resource type and reason only, never values)."""
    served = ", ".join(f"{entity} {len(records)}" for entity, records in loaded.records.items() if records)
    lines = [
        f"seed-from: serving {sum(len(v) for v in loaded.records.values())} records ({served or 'none'})"
    ]
    lines += [f"seed-from: not served: {reason}: {n}" for reason, n in sorted(loaded.skipped.items())]
    return lines


def read_seed_dir(path: str | Path, updated_at: datetime | None = None) -> SeedLoad:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--seed-from: not a directory: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_fhir_file(p))
    if not files:
        raise ValueError(f"--seed-from: no .ndjson, .ndjson.gz or .json files in {root}")
    loader = _Loader(seeded_connection(), updated_at or SandboxConfig().clock_start)
    for file in files:
        for full_url, resource in _read_file(file, loader.skipped):
            loader.add(full_url, resource)
    return loader.build()


# --- reading files ----------------------------------------------------------------------------


def _is_fhir_file(p: Path) -> bool:
    name = p.name.lower()
    return name.endswith((".ndjson", ".ndjson.gz", ".json"))


def _read_file(path: Path, skipped: Counter) -> Iterator[tuple[str | None, dict[str, Any]]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        if path.name.lower().endswith(".json"):
            try:
                yield from _unpack(orjson.loads(fh.read()), None, skipped)
            except orjson.JSONDecodeError:
                skipped["file: not valid JSON"] += 1
            return
        for line in fh:
            if not line.strip():
                continue
            try:
                yield from _unpack(orjson.loads(line), None, skipped)
            except orjson.JSONDecodeError:
                skipped["file: an NDJSON line is not valid JSON"] += 1


def _unpack(data: Any, full_url: str | None, skipped: Counter) -> Iterator[tuple[str | None, dict[str, Any]]]:
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        skipped["file: not a FHIR resource"] += 1
        return
    if data["resourceType"] == "Bundle":
        for entry in data.get("entry") or []:
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                yield from _unpack(entry["resource"], entry.get("fullUrl"), skipped)
        return
    yield full_url, data


# --- small parsers ----------------------------------------------------------------------------


def parse_datetime(value: Any) -> datetime | None:
    """A FHIR date/dateTime/instant as an aware UTC datetime (dates at midnight UTC)."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        if "T" in text:
            parsed = datetime.fromisoformat(text)
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
        parts = [int(p) for p in text.split("-")]
        return datetime(
            parts[0], parts[1] if len(parts) > 1 else 1, parts[2] if len(parts) > 2 else 1, tzinfo=UTC
        )
    except (ValueError, IndexError):
        return None


def _coding(concept: Any, prefer: str | None = None) -> Coding | None:
    if not isinstance(concept, dict):
        return None
    codings = [c for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]
    if prefer:
        codings.sort(key=lambda c: c.get("system") != prefer)
    if not codings:
        return None
    c = codings[0]
    return Coding(
        str(c.get("system") or ""), str(c["code"]), str(c.get("display") or concept.get("text") or "")
    )


def _text(concept: Any) -> str | None:
    if not isinstance(concept, dict):
        return None
    if concept.get("text"):
        return str(concept["text"])
    for c in concept.get("coding") or []:
        if isinstance(c, dict) and (c.get("display") or c.get("code")):
            return str(c.get("display") or c.get("code"))
    return None


def _identifier(resource: dict[str, Any], suffix: str) -> str | None:
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and str(ident.get("system", "")).endswith(suffix) and ident.get("value"):
            return str(ident["value"])
    return None


def _first_identifier(resource: dict[str, Any]) -> str | None:
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value"):
            return str(ident["value"])
    return None


def _codings(concept: Any) -> list[Coding]:
    if not isinstance(concept, dict):
        return []
    return [
        Coding(str(c.get("system") or ""), str(c["code"]), str(c.get("display") or concept.get("text") or ""))
        for c in concept.get("coding") or []
        if isinstance(c, dict) and c.get("code")
    ]


def _text_only(concept: Any) -> Coding | None:
    """A concept known by its text alone, as a Coding without system and code (rendered back as
    ``{"text": ...}``)."""
    text = _text(concept)
    return Coding("", "", text) if text else None


def _status_code(concept: Any) -> str | None:
    """The code of a status CodeableConcept (clinicalStatus, verificationStatus)."""
    codings = _codings(concept)
    return codings[0].code if codings else None


def _flag(r: dict[str, Any]) -> str | None:
    flags = [c.get("code") for i in r.get("interpretation") or [] for c in (i.get("coding") or [])]
    return next((f for f in flags if f in _FLAGS), None)


def _value(r: dict[str, Any]) -> tuple[str, float | None, str | None, str | None, Coding | None]:
    """(value type, numeric, text, unit, coding) of an Observation's or component's value[x]."""
    if isinstance(r.get("valueQuantity"), dict) and r["valueQuantity"].get("value") is not None:
        quantity = r["valueQuantity"]
        numeric = float(quantity["value"])
        return "Numeric", numeric, format_number(numeric), quantity.get("code") or quantity.get("unit"), None
    if r.get("valueInteger") is not None:
        numeric = float(r["valueInteger"])
        return "Numeric", numeric, format_number(numeric), None, None
    if isinstance(r.get("valueCodeableConcept"), dict):
        concept = r["valueCodeableConcept"]
        return "Coded Entry", None, _text(concept), None, _coding(concept)
    for key in ("valueString", "valueDateTime", "valueTime"):
        if r.get(key) is not None:
            return "String", None, str(r[key]), None, None
    if r.get("valueBoolean") is not None:
        return "String", None, "true" if r["valueBoolean"] else "false", None, None
    return "String", None, None, None, None


def _component(c: dict[str, Any]) -> Component:
    _, numeric, text, unit, _ = _value(c)
    ranges = c.get("referenceRange") or [{}]
    low, high = (ranges[0].get("low") or {}), (ranges[0].get("high") or {})
    return Component(
        code=_coding(c.get("code"), "http://loinc.org"),  # type: ignore[arg-type]
        value_numeric=numeric,
        value_text=text,
        unit=unit,
        reference_low=float(low["value"]) if low.get("value") is not None else None,
        reference_high=float(high["value"]) if high.get("value") is not None else None,
        abnormal_flag=_flag(c),
    )


def _based_on_identifier(resource: dict[str, Any]) -> str | None:
    """The first ``basedOn`` logical identifier's value: the order a result or report answers."""
    return next(
        (
            str(b["identifier"]["value"])
            for b in resource.get("basedOn") or []
            if isinstance(b, dict) and isinstance(b.get("identifier"), dict) and b["identifier"].get("value")
        ),
        None,
    )


def _version(resource: dict[str, Any]) -> int:
    raw = (resource.get("meta") or {}).get("versionId")
    try:
        return max(1, int(raw))
    except (TypeError, ValueError):
        return 1


# --- the loader -------------------------------------------------------------------------------


class _Loader:
    def __init__(self, conn: ConnectionSpec, updated_at: datetime) -> None:
        self.conn = conn
        self.updated_at = updated_at
        self.skipped: Counter = Counter()
        self.by_type: dict[str, list[tuple[str | None, dict[str, Any]]]] = {}
        self.by_url: dict[str, dict[str, Any]] = {}  # fullUrl and Type/id -> resource
        self.practitioner_npis: dict[str, str] = {}  # Practitioner fullUrl / Type/id -> NPI
        self.patients: dict[str, PatientRecord] = {}  # resource key -> record
        self.visits: dict[str, str] = {}  # Encounter resource key -> visit number
        self.results: dict[str | None, ResultRecord] = {}  # Observation resource key -> served record

    def add(self, full_url: str | None, resource: dict[str, Any]) -> None:
        rtype = resource["resourceType"]
        self.by_type.setdefault(rtype, []).append((full_url, resource))
        if full_url:
            self.by_url[full_url] = resource
        if resource.get("id"):
            self.by_url[f"{rtype}/{resource['id']}"] = resource

    def _resolve(self, reference: Any) -> dict[str, Any] | None:
        """A Reference's target among the loaded resources (urn:uuid, Type/id or absolute URL)."""
        ref = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(ref, str):
            return None
        if ref in self.by_url:
            return self.by_url[ref]
        parts = ref.rstrip("/").split("/")
        if len(parts) >= 2:
            return self.by_url.get(f"{parts[-2]}/{parts[-1]}")
        return None

    def _key(self, full_url: str | None, resource: dict[str, Any]) -> str:
        return f"{resource['resourceType']}/{resource['id']}" if resource.get("id") else str(full_url)

    def _record_id(self, full_url: str | None, resource: dict[str, Any]) -> str:
        if resource.get("id"):
            return str(resource["id"])
        if full_url and full_url.startswith("urn:uuid:"):
            return full_url.removeprefix("urn:uuid:")
        raise Skip("resource without an id or urn:uuid fullUrl")

    def _base(self, full_url: str | None, resource: dict[str, Any]) -> dict[str, Any]:
        updated = parse_datetime((resource.get("meta") or {}).get("lastUpdated")) or self.updated_at
        return {
            "connection_id": self.conn.id,
            "id": self._record_id(full_url, resource),
            "last_updated": updated,
            "version": _version(resource),
        }

    def _patient_ref(self, reference: Any) -> PatientRef:
        target = self._resolve(reference)
        if target is None or target.get("resourceType") != "Patient":
            raise Skip("subject is not a loaded Patient")
        record = self.patients.get(f"Patient/{target.get('id')}") or next(
            (p for url, p in self.patients.items() if self.by_url.get(url) is target), None
        )
        if record is None:
            raise Skip("subject Patient was itself skipped")
        return PatientRef(patient_id=record.id, mrn=record.mrn)

    def _visit(self, reference: Any) -> str | None:
        if not isinstance(reference, dict):
            return None
        logical = reference.get("identifier")
        if isinstance(logical, dict) and logical.get("value"):
            return str(logical["value"])
        target = self._resolve(reference)
        if target is None:
            return None
        return self.visits.get(f"Encounter/{target.get('id')}") or next(
            (vn for url, vn in self.visits.items() if self.by_url.get(url) is target), None
        )

    def _contained(self, resource: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
        return [
            c
            for c in resource.get("contained") or []
            if isinstance(c, dict) and c.get("resourceType") == rtype
        ]

    def _provider(self, resource: dict[str, Any], reference: Any) -> Provider | None:
        if not isinstance(reference, dict):
            return None
        ref = reference.get("reference")
        target: dict[str, Any] | None = None
        if isinstance(ref, str) and ref.startswith("#"):
            target = next(
                (c for c in self._contained(resource, "Practitioner") if c.get("id") == ref[1:]), None
            )
        elif isinstance(ref, str):
            target = self._resolve(reference)
        npi = None
        if target is not None:
            npi = _identifier(target, ids.NPI)
        if npi is None and isinstance(reference.get("identifier"), dict):
            ident = reference["identifier"]
            if ident.get("system") == ids.NPI and ident.get("value"):
                npi = str(ident["value"])
        if npi is None and isinstance(ref, str) and "identifier=" in ref and ids.NPI in ref:
            npi = ref.rsplit("|", 1)[-1]
        if target is not None and target.get("resourceType") not in (
            None,
            "Practitioner",
            "PractitionerRole",
        ):
            return None  # a Patient, Organization ... is not a provider
        if not npi and target is None and not reference.get("display"):
            return None
        npi = npi or ""  # a practitioner known without an NPI is served without one
        if target is not None and target.get("name"):
            name = target["name"][0]
            given = (name.get("given") or [""])[0]
            return Provider(
                npi=npi,
                first_name=str(given),
                last_name=str(name.get("family") or ""),
                credentials=tuple(name.get("suffix") or ()),
            )
        display = str(reference.get("display") or "").removeprefix("Dr. ").strip()
        first, _, last = display.partition(" ")
        return Provider(npi=npi, first_name=first, last_name=last, credentials=())

    def _first_provider(self, resource: dict[str, Any], references: Iterable[Any]) -> Provider | None:
        """The first of ``references`` that is a provider (read lazily: later ones are not looked at)."""
        return next((p for p in (self._provider(resource, ref) for ref in references) if p is not None), None)

    def _first_performer(self, resource: dict[str, Any]) -> Provider | None:
        """The first ``performer[].actor`` that is a provider (Immunization, Procedure)."""
        actors = (x.get("actor") for x in resource.get("performer") or [] if isinstance(x, dict))
        return self._first_provider(resource, actors)

    def _performer_and_producer(self, resource: dict[str, Any]) -> tuple[Provider | None, Any]:
        """A result's or report's ``performer`` split in two: the first provider among the people,
        and the name of the first organization (the producing lab), either one ``None``."""
        performer, producer = None, None
        for ref in resource.get("performer") or []:
            if not isinstance(ref, dict):
                continue
            if ref.get("type") == "Organization" or "Organization" in str(ref.get("reference", "")):
                producer = producer or ref.get("display") or (self._resolve(ref) or {}).get("name")
            else:
                performer = performer or self._provider(resource, ref)
        return performer, producer

    def _location(
        self, resource: dict[str, Any], references: list[Any], fallback: str | None
    ) -> Location | None:
        levels: dict[str, str] = {}
        location_type = None
        for loc in self._contained(resource, "Location"):
            code = ((loc.get("physicalType") or {}).get("coding") or [{}])[0].get("code")
            level = _PHYSICAL_LEVELS.get(code)
            if level and loc.get("name"):
                levels.setdefault(level, str(loc["name"]))
                if level == "department" and loc.get("type"):
                    location_type = _text(loc["type"][0])
        if "facility" not in levels:
            names = [
                str(n)
                for r in references
                if isinstance(r, dict)
                for n in [r.get("display") or (self._resolve(r) or {}).get("name")]
                if n
            ]
            if names:
                levels["facility"] = names[0]
            elif fallback:
                levels["facility"] = fallback
            else:
                return None  # served without a location
        return Location(
            facility=levels["facility"],
            department=levels.get("department", levels["facility"]),
            room=levels.get("room"),
            bed=levels.get("bed"),
            type=location_type,
        )

    # --- per resource type ---------------------------------------------------------------------

    def patient(self, full_url: str | None, r: dict[str, Any], index: int) -> PatientRecord:
        names = [n for n in r.get("name") or [] if isinstance(n, dict)]
        name = next((n for n in names if n.get("use") == "official"), names[0] if names else None)
        if not name or not name.get("family"):
            raise Skip("no name.family")
        birth = parse_datetime(r.get("birthDate"))
        if birth is None:
            raise Skip("no birthDate")
        base = self._base(full_url, r)
        mrn = _identifier(r, ":MR") or next(
            (
                str(i["value"])
                for i in r.get("identifier") or []
                if isinstance(i, dict)
                and i.get("value")
                and any(c.get("code") == "MR" for c in (i.get("type") or {}).get("coding") or [])
            ),
            None,
        )
        ehr_id = _identifier(r, ":EHRID") or _identifier(r, SYNTHEA_ID_SYSTEM) or base["id"]
        telecom = [t for t in r.get("telecom") or [] if isinstance(t, dict) and t.get("value")]
        phones = {t.get("use"): str(t["value"]) for t in reversed(telecom) if t.get("system") == "phone"}
        address = next((a for a in r.get("address") or [] if isinstance(a, dict)), {})
        communication = next((c for c in r.get("communication") or [] if isinstance(c, dict)), {})
        language = _coding(communication.get("language"), ids.BCP47)
        marital = r.get("maritalStatus")
        deceased = parse_datetime(r.get("deceasedDateTime"))
        tags = (r.get("meta") or {}).get("tag") or []
        return PatientRecord(
            **base,
            person_index=index,
            mrn=mrn or base["id"],
            ehr_id=ehr_id,
            enterprise_id=_identifier(r, ids.ENTERPRISE_SYSTEM) or str(uuid.uuid5(_NAMESPACE, base["id"])),
            nist_id=_identifier(r, ":NIST"),
            family_name=str(name["family"]),
            given_names=tuple(str(g) for g in name.get("given") or ()),
            birth_date=date(birth.year, birth.month, birth.day),
            sex=r.get("gender") if r.get("gender") in _SEX else "unknown",
            race=self._omb(r, ids.US_CORE_RACE),
            ethnicity=self._omb(r, ids.US_CORE_ETHNICITY),
            language=language.code if language else None,
            address_line=(address.get("line") or [None])[0],
            city=address.get("city"),
            state=address.get("state"),
            postal_code=address.get("postalCode"),
            county=address.get("district"),
            phone_home=phones.get("home"),
            phone_mobile=phones.get("mobile"),
            email=next((str(t["value"]) for t in telecom if t.get("system") == "email"), None),
            ssn=_identifier(r, ids.SSN_SYSTEM),
            marital_status=(marital.get("text") or _text(marital)) if isinstance(marital, dict) else None,
            deceased_at=deceased,
            is_test=any(isinstance(t, dict) and t.get("code") == "HTEST" for t in tags),
            active=r.get("active", True) is not False,
        )

    @staticmethod
    def _omb(r: dict[str, Any], url: str) -> str | None:
        for ext in r.get("extension") or []:
            if isinstance(ext, dict) and ext.get("url") == url:
                parts = ext.get("extension") or []
                text = next((p.get("valueString") for p in parts if p.get("url") == "text"), None)
                if text:
                    return str(text)
                coding = next((p.get("valueCoding") for p in parts if p.get("url") == "ombCategory"), None)
                if coding and coding.get("display"):
                    return str(coding["display"])
        return None

    def encounter(self, full_url: str | None, r: dict[str, Any]) -> EncounterRecord:
        status = _ENCOUNTER_STATUS.get(r.get("status"))
        if status is None:
            raise Skip("status has no sandbox equivalent")
        period = r.get("period") or {}
        # An Encounter without a period (allowed in R4) is dated by its end or its last update.
        base_updated = parse_datetime((r.get("meta") or {}).get("lastUpdated")) or self.updated_at
        start = parse_datetime(period.get("start")) or parse_datetime(period.get("end")) or base_updated
        visit_type = _coding((r.get("type") or [None])[0])  # optional: served without one
        attending = self._first_provider(r, (part.get("individual") for part in r.get("participant") or []))
        klass = str((r.get("class") or {}).get("code") or "AMB")
        base = self._base(full_url, r)
        hospitalization = r.get("hospitalization") or {}
        return EncounterRecord(
            **base,
            patient=self._patient_ref(r.get("subject")),
            visit_number=_identifier(r, ":VN") or _first_identifier(r) or base["id"],
            account_number=_identifier(r, ":AN"),
            status=status,
            class_code=_ENCOUNTER_CLASS.get(klass) or _ENCOUNTER_CLASS_ALIASES.get(klass, "AMB"),
            type=visit_type,
            start_at=start,
            end_at=parse_datetime(period.get("end")),
            location=self._location(
                r,
                [loc.get("location") for loc in r.get("location") or [] if isinstance(loc, dict)],
                (r.get("serviceProvider") or {}).get("display"),
            ),
            attending=attending,
            reason=_coding((r.get("reasonCode") or [None])[0]),
            discharge_disposition=_coding(hospitalization.get("dischargeDisposition")),
        )

    def observation(self, full_url: str | None, r: dict[str, Any]) -> ResultRecord:
        categories = [
            c.get("code")
            for cat in r.get("category") or []
            if isinstance(cat, dict)
            for c in (cat.get("coding") or [])
            if isinstance(c, dict) and c.get("system") in (None, ids.OBSERVATION_CATEGORY)
        ]
        # The first standard category (laboratory, vital-signs, social-history, survey, exam ...);
        # an Observation without one is served without one.
        category = next((c for c in categories if c in _OBSERVATION_CATEGORIES), None)
        status = _RESULT_STATUS.get(r.get("status"))
        if status is None:
            raise Skip("status has no sandbox equivalent")
        code = _coding(r.get("code"), "http://loinc.org")
        if code is None:
            raise Skip("no code")
        effective = parse_datetime(r.get("effectiveDateTime")) or parse_datetime(
            (r.get("effectivePeriod") or {}).get("start")
        )
        effective = effective or parse_datetime(r.get("effectiveInstant")) or parse_datetime(r.get("issued"))
        if effective is None:
            raise Skip("no effective time")
        base = self._base(full_url, r)
        orders = self._contained(r, "ServiceRequest")
        order_id = _based_on_identifier(r) or (orders and _identifier(orders[0], ":OrderID")) or base["id"]
        panel = (_coding(orders[0].get("code")) if orders else None) or code
        value_type, numeric, text, unit, value_code = _value(r)
        ranges = r.get("referenceRange") or [{}]
        low, high = (ranges[0].get("low") or {}), (ranges[0].get("high") or {})
        performer, producer = self._performer_and_producer(r)
        components = tuple(
            _component(c) for c in r.get("component") or [] if isinstance(c, dict) and _coding(c.get("code"))
        )
        return ResultRecord(
            **base,
            patient=self._patient_ref(r.get("subject")),
            visit_number=self._visit(r.get("encounter")),
            order_id=str(order_id),
            result_id=_identifier(r, ":ResultID") or base["id"],
            category=category,
            panel=panel,
            code=code,
            value_type=value_type,  # type: ignore[arg-type]
            value_numeric=numeric,
            value_text=text,
            unit=unit or (low.get("code") or high.get("code") or None),
            reference_low=float(low["value"]) if low.get("value") is not None else None,
            reference_high=float(high["value"]) if high.get("value") is not None else None,
            reference_text=ranges[0].get("text"),
            abnormal_flag=_flag(r),  # type: ignore[arg-type]
            status=status,  # type: ignore[arg-type]
            effective_at=effective,
            issued_at=parse_datetime(r.get("issued")),
            performer=performer,
            producer=producer,
            components=components,
            value_code=value_code,
        )

    def condition(self, full_url: str | None, r: dict[str, Any]) -> ProblemRecord:
        codings = _codings(r.get("code")) or [c for c in (_text_only(r.get("code")),) if c is not None]
        if not codings:
            raise Skip("no code")
        icd = next((c for c in codings if c.system in (ICD10, "http://hl7.org/fhir/sid/icd-10")), None)
        code = icd or codings[0]
        alt = next((c for c in codings if c is not code), None)
        error = _status_code(r.get("verificationStatus")) == "entered-in-error"
        clinical = _status_code(r.get("clinicalStatus"))
        abated = parse_datetime(r.get("abatementDateTime")) or parse_datetime(
            (r.get("abatementPeriod") or {}).get("end")
        )
        if error:
            status = "entered-in-error"
        elif clinical is None:
            status = "resolved" if abated else "active"  # clinicalStatus is optional in R4
        elif clinical in _CONDITION_STATUS:
            status = _CONDITION_STATUS[clinical]
        else:
            raise Skip("clinicalStatus has no sandbox equivalent")
        base = self._base(full_url, r)
        recorded = parse_datetime(r.get("recordedDate"))
        onset = (
            parse_datetime(r.get("onsetDateTime"))
            or parse_datetime((r.get("onsetPeriod") or {}).get("start"))
            or recorded
            or base["last_updated"]
        )
        category = next(
            (
                str(c["code"])
                for cat in r.get("category") or []
                if isinstance(cat, dict)
                for c in cat.get("coding") or []
                if isinstance(c, dict) and c.get("code")
            ),
            "problem-list-item",
        )
        return ProblemRecord(
            **base,
            patient=self._patient_ref(r.get("subject")),
            visit_number=self._visit(r.get("encounter")),
            problem_id=_identifier(r, ":ProblemID") or _first_identifier(r) or base["id"],
            code=code,
            alt_code=alt,
            status=status,  # type: ignore[arg-type]
            onset_at=onset,
            abated_at=abated,
            recorded_at=recorded or onset,
            recorder=self._provider(r, r.get("recorder") or r.get("asserter")),
            category=category,
        )

    def allergy(self, full_url: str | None, r: dict[str, Any]) -> AllergyRecord:
        substance = _coding(r.get("code"))
        if substance is None:
            raise Skip("no code")
        error = _status_code(r.get("verificationStatus")) == "entered-in-error"
        clinical = _status_code(r.get("clinicalStatus"))
        if error:
            status = "entered-in-error"
        elif clinical is None:
            status = "active"
        elif clinical in _ALLERGY_STATUS:
            status = _ALLERGY_STATUS[clinical]
        else:
            raise Skip("clinicalStatus has no sandbox equivalent")
        base = self._base(full_url, r)
        onset = parse_datetime(r.get("onsetDateTime")) or parse_datetime(
            (r.get("onsetPeriod") or {}).get("start")
        )
        reaction = next((x for x in r.get("reaction") or [] if isinstance(x, dict)), {})
        manifestation = _coding(next(iter(reaction.get("manifestation") or []), None))
        categories = [
            c for c in r.get("category") or [] if c in ("medication", "food", "environment", "biologic")
        ]
        return AllergyRecord(
            **base,
            patient=self._patient_ref(r.get("patient")),
            allergy_id=_identifier(r, ":AllergyID") or _first_identifier(r) or base["id"],
            substance=substance,
            kind=r.get("type") if r.get("type") in ("allergy", "intolerance") else None,
            category=categories[0] if categories else None,
            criticality=r.get("criticality")
            if r.get("criticality") in ("low", "high", "unable-to-assess")
            else None,
            status=status,  # type: ignore[arg-type]
            reaction=manifestation,
            severity=reaction.get("severity")
            if reaction.get("severity") in ("mild", "moderate", "severe")
            else None,
            onset_at=onset,
            recorded_at=parse_datetime(r.get("recordedDate")) or onset or base["last_updated"],
            recorder=self._provider(r, r.get("recorder") or r.get("asserter")),
        )

    def immunization(self, full_url: str | None, r: dict[str, Any]) -> ImmunizationRecord:
        status = r.get("status")
        if status not in _IMMUNIZATION_STATUS:
            raise Skip("status has no sandbox equivalent")
        vaccine = _coding(r.get("vaccineCode"), CVX_SYSTEM)
        if vaccine is None:
            raise Skip("no vaccineCode")
        base = self._base(full_url, r)
        # occurrenceString ("January 2012") has no instant: dated by when it was recorded.
        occurred = (
            parse_datetime(r.get("occurrenceDateTime"))
            or parse_datetime(r.get("recorded"))
            or base["last_updated"]
        )
        dose = r.get("doseQuantity") if isinstance(r.get("doseQuantity"), dict) else {}
        manufacturer = r.get("manufacturer") if isinstance(r.get("manufacturer"), dict) else None
        maker = None
        if manufacturer:
            maker = manufacturer.get("display") or (self._resolve(manufacturer) or {}).get("name")
        performer = self._first_performer(r)
        return ImmunizationRecord(
            **base,
            patient=self._patient_ref(r.get("patient")),
            visit_number=self._visit(r.get("encounter")),
            immunization_id=_identifier(r, ":ImmunizationID") or _first_identifier(r) or base["id"],
            vaccine=vaccine,
            status=status,  # type: ignore[arg-type]
            status_reason=_coding(r.get("statusReason")),
            occurred_at=occurred,
            recorded_at=parse_datetime(r.get("recorded")) or occurred,
            lot_number=str(r["lotNumber"]) if r.get("lotNumber") else None,
            manufacturer=str(maker) if maker else None,
            route=_coding(r.get("route")),
            dose_quantity=float(dose["value"]) if dose.get("value") is not None else None,
            dose_unit=(dose.get("code") or dose.get("unit")) if dose else None,
            performer=performer,
        )

    def procedure(self, full_url: str | None, r: dict[str, Any]) -> ProcedureRecord:
        status = r.get("status")
        if status not in _PROCEDURE_STATUS:
            raise Skip("status has no sandbox equivalent")
        code = _coding(r.get("code"))
        if code is None:
            raise Skip("no code")
        period = r.get("performedPeriod") if isinstance(r.get("performedPeriod"), dict) else {}
        start = parse_datetime(r.get("performedDateTime")) or parse_datetime(period.get("start"))
        base = self._base(full_url, r)
        start = start or parse_datetime(period.get("end")) or base["last_updated"]
        performer = self._first_performer(r)
        return ProcedureRecord(
            **base,
            patient=self._patient_ref(r.get("subject")),
            visit_number=self._visit(r.get("encounter")),
            procedure_id=_identifier(r, ":ProcedureID") or _first_identifier(r) or base["id"],
            code=code,
            status=status,
            performed_start=start,
            performed_end=parse_datetime(period.get("end")),
            body_site=_coding(next(iter(r.get("bodySite") or []), None)),
            reason=_coding(next(iter(r.get("reasonCode") or []), None)),
            performer=performer,
        )

    def service_request(self, full_url: str | None, r: dict[str, Any]) -> OrderRecord:
        status = r.get("status")
        if status not in _ORDER_STATUS:
            raise Skip("status has no sandbox equivalent")
        code = _coding(r.get("code"), "http://loinc.org")
        if code is None:
            raise Skip("no code")
        base = self._base(full_url, r)
        occurrence = parse_datetime(r.get("occurrenceDateTime")) or parse_datetime(
            (r.get("occurrencePeriod") or {}).get("start")
        )
        authored = parse_datetime(r.get("authoredOn")) or occurrence or base["last_updated"]
        return OrderRecord(
            **base,
            patient=self._patient_ref(r.get("subject")),
            visit_number=self._visit(r.get("encounter")),
            order_id=_identifier(r, ":OrderID") or _first_identifier(r) or base["id"],
            code=code,
            status=status,
            intent=str(r.get("intent") or "order"),
            priority=r.get("priority") if r.get("priority") in _ORDER_PRIORITY else None,
            authored_at=authored,
            occurrence_at=occurrence or authored,
            requester=self._provider(r, r.get("requester")),
            reason=_coding(next(iter(r.get("reasonCode") or []), None)),
        )

    def diagnostic_report(self, full_url: str | None, r: dict[str, Any]) -> DiagnosticReportRecord:
        status = r.get("status")
        if status not in _REPORT_STATUS:
            raise Skip("status has no sandbox equivalent")
        code = _coding(r.get("code"), "http://loinc.org")
        if code is None:
            raise Skip("no code")
        effective = (
            parse_datetime(r.get("effectiveDateTime"))
            or parse_datetime((r.get("effectivePeriod") or {}).get("start"))
            or parse_datetime(r.get("issued"))
        )
        if effective is None:
            raise Skip("no effective time")
        base = self._base(full_url, r)
        performer, producer = self._performer_and_producer(r)
        # Grouped results: the served Observations the report references (others are not served).
        results = [self.results.get(self._target_key(ref)) for ref in r.get("result") or []]
        served = [x for x in results if x is not None]
        order_id = _identifier(r, ":OrderID") or _based_on_identifier(r) or _first_identifier(r) or base["id"]
        return DiagnosticReportRecord(
            **base,
            patient=self._patient_ref(r.get("subject")),
            visit_number=self._visit(r.get("encounter")),
            order_id=order_id,
            code=code,
            status=status,
            effective_at=effective,
            issued_at=parse_datetime(r.get("issued")),
            performer=performer,
            producer=str(producer) if producer else None,
            result_ids=tuple(x.id for x in served),
            result_business_ids=tuple(x.result_id for x in served),
        )

    def _target_key(self, reference: Any) -> str | None:
        """The loaded resource a reference points at, as the key its record was kept under."""
        target = self._resolve(reference)
        if target is None:
            return None
        return f"{target['resourceType']}/{target['id']}" if target.get("id") else f"#{id(target)}"

    def medication(self, full_url: str | None, r: dict[str, Any]) -> MedicationRecord:
        is_request = r["resourceType"] == "MedicationRequest"
        status = (_REQUEST_STATUS if is_request else _STATEMENT_STATUS).get(r.get("status"))
        if status is None:
            raise Skip("status has no sandbox equivalent")
        code = _coding(r.get("medicationCodeableConcept"), "http://www.nlm.nih.gov/research/umls/rxnorm")
        reference = r.get("medicationReference")
        if code is None and isinstance(reference, dict):
            ref = str(reference.get("reference") or "")
            target = (
                next((c for c in self._contained(r, "Medication") if c.get("id") == ref[1:]), None)
                if ref.startswith("#")
                else self._resolve(reference)
            )
            code = (
                _coding(target.get("code"), "http://www.nlm.nih.gov/research/umls/rxnorm") if target else None
            )
            if code is None:  # a medication named only by text is served by its name
                code = _text_only(target.get("code") if target else None) or _text_only(
                    {"text": reference.get("display")}
                )
        code = code or _text_only(r.get("medicationCodeableConcept"))
        if code is None:
            raise Skip("no medication code")
        dosage = next(iter(r.get("dosageInstruction" if is_request else "dosage") or []), {})
        repeat = (dosage.get("timing") or {}).get("repeat") or {}
        bounds = repeat.get("boundsPeriod") or {}
        effective = r.get("effectivePeriod") or {}
        dose = next(
            (
                d.get("doseQuantity")
                for d in dosage.get("doseAndRate") or []
                if isinstance(d.get("doseQuantity"), dict)
            ),
            None,
        )
        period = repeat.get("period")
        frequency = repeat.get("frequency") or 1
        base = self._base(full_url, r)
        start = (
            parse_datetime(bounds.get("start"))
            or parse_datetime(effective.get("start"))
            or parse_datetime(r.get("effectiveDateTime"))
            or parse_datetime(r.get("authoredOn"))
        )
        prescriber_ref = r.get("requester") if is_request else r.get("informationSource")
        return MedicationRecord(
            **base,
            patient=self._patient_ref(r.get("subject")),
            visit_number=self._visit(r.get("encounter") if is_request else r.get("context")),
            order_id=_identifier(r, ":OrderID") or _first_identifier(r) or base["id"],
            kind="request" if is_request else "statement",
            status=status,
            intent=(r.get("intent") or "order") if is_request else None,
            code=code,
            dose_quantity=float(dose["value"]) if dose and dose.get("value") is not None else None,
            dose_unit=(dose.get("unit") or dose.get("code")) if dose else None,
            route=_coding(dosage.get("route")),
            frequency_period=float(period) / float(frequency) if period is not None else None,
            frequency_unit=repeat.get("periodUnit") if period is not None else None,
            start_at=start,
            end_at=parse_datetime(bounds.get("end")) or parse_datetime(effective.get("end")),
            prescriber=self._provider(r, prescriber_ref),
        )

    def appointment(self, full_url: str | None, r: dict[str, Any]) -> AppointmentRecord:
        status = _APPOINTMENT_STATUS.get(r.get("status"))
        if status is None:
            raise Skip("status has no sandbox equivalent")
        requested = next((p for p in r.get("requestedPeriod") or [] if isinstance(p, dict)), {})
        # A proposed appointment may have only a requested period (app-3): it starts then.
        start = parse_datetime(r.get("start")) or parse_datetime(requested.get("start"))
        if start is None:
            raise Skip("no start or requestedPeriod")
        end = parse_datetime(r.get("end"))
        minutes = r.get("minutesDuration")
        if minutes is None and end is not None:
            minutes = int((end - start).total_seconds() // 60)
        minutes = minutes or 0  # unknown length: served without end and minutesDuration
        visit_type = _coding(r.get("appointmentType")) or _coding((r.get("serviceType") or [None])[0])
        actors = [
            p.get("actor") for p in r.get("participant") or [] if isinstance(p, dict) and p.get("actor")
        ]
        patient = next(
            (a for a in actors if "Patient" in str(a.get("reference", "")) or a.get("type") == "Patient"),
            None,
        )
        if patient is None:
            patient = next(
                (a for a in actors if (self._resolve(a) or {}).get("resourceType") == "Patient"), None
            )
        location_refs = [
            a for a in actors if a.get("type") == "Location" or "Location" in str(a.get("reference", ""))
        ]
        people = [a for a in actors if a is not patient and not any(a is loc for loc in location_refs)]
        provider = self._first_provider(r, people)
        base = self._base(full_url, r)
        rescheduled = next(
            (
                str(e.get("valueString"))
                for e in r.get("extension") or []
                if isinstance(e, dict)
                and e.get("url") == ids.RESCHEDULED_FROM_EXTENSION
                and e.get("valueString")
            ),
            None,
        )
        return AppointmentRecord(
            **base,
            patient=self._patient_ref(patient),
            visit_number=_identifier(r, ":VN") or _first_identifier(r) or base["id"],
            status=status,
            start_at=start,
            duration_minutes=int(minutes),
            type=visit_type,
            reason=_text((r.get("reasonCode") or [None])[0]),
            provider=provider,
            location=self._location(r, location_refs, None),
            cancel_reason=_text(r.get("cancelationReason")),
            rescheduled_from=rescheduled,
        )

    def document(self, full_url: str | None, r: dict[str, Any]) -> DocumentRecord:
        status = r.get("status")
        if status not in ("current", "superseded", "entered-in-error"):
            raise Skip("status has no sandbox equivalent")
        doc_type = _coding(r.get("type"))
        if doc_type is None:
            raise Skip("no type")
        attachment = next(
            (c.get("attachment") for c in r.get("content") or [] if isinstance(c.get("attachment"), dict)),
            None,
        )
        if attachment is None:
            raise Skip("no content attachment")
        if attachment.get("data") is not None:
            content = base64.b64decode(attachment["data"])
        else:
            binary = self._resolve({"reference": attachment.get("url")}) if attachment.get("url") else None
            if binary is None or binary.get("resourceType") != "Binary" or binary.get("data") is None:
                raise Skip("content is neither inline nor a loaded Binary")
            content = base64.b64decode(binary["data"])
        authored = parse_datetime(r.get("date")) or parse_datetime(attachment.get("creation"))
        authored = authored or parse_datetime(((r.get("context") or {}).get("period") or {}).get("start"))
        if authored is None:
            raise Skip("no date")
        author = self._first_provider(r, r.get("author") or [])
        # A document without a practitioner author is served without one.
        kinds = {
            str(c.get("code")).lower()
            for cat in r.get("category") or []
            for c in cat.get("coding") or []
            if c.get("system") == ids.DOCUMENT_KIND
        }
        content_type = str(attachment.get("contentType") or "text/plain")
        kind = "cda" if "cda" in kinds or (not kinds and "xml" in content_type) else "note"
        base = self._base(full_url, r)
        encounters = (r.get("context") or {}).get("encounter") or []
        master = (r.get("masterIdentifier") or {}).get("value")
        return DocumentRecord(
            **base,
            patient=self._patient_ref(r.get("subject")),
            visit_number=self._visit(encounters[0]) if encounters else None,
            document_id=_identifier(r, ":DocumentID") or master or _first_identifier(r) or base["id"],
            kind=kind,
            type=doc_type,
            title=str(r.get("description") or attachment.get("title") or doc_type.display or doc_type.code),
            status=status,
            authored_at=authored,
            author=author,
            content_type=content_type,
            content=content,
        )

    # --- assembly ------------------------------------------------------------------------------

    def build(self) -> SeedLoad:
        records: dict[str, dict[str, Record]] = {entity: {} for entity in ENTITIES}
        patients = sorted(self.by_type.get("Patient", []), key=lambda item: str(item[1].get("id") or item[0]))
        for index, (full_url, resource) in enumerate(patients):
            record = self._convert("Patient", lambda u=full_url, r=resource, i=index: self.patient(u, r, i))
            if record is not None and self._keep(records["patients"], record, "Patient"):
                self.patients[self._key(full_url, resource)] = record
                if full_url:
                    self.patients[full_url] = record
        for full_url, resource in self.by_type.get("Encounter", []):
            record = self._convert("Encounter", lambda u=full_url, r=resource: self.encounter(u, r))
            if record is not None and self._keep(records["encounters"], record, "Encounter"):
                self.visits[self._key(full_url, resource)] = record.visit_number
                if full_url:
                    self.visits[full_url] = record.visit_number
        plan = (
            ("Observation", self.observation),
            ("MedicationRequest", self.medication),
            ("MedicationStatement", self.medication),
            ("Appointment", self.appointment),
            ("DocumentReference", self.document),
            ("Condition", self.condition),
            ("AllergyIntolerance", self.allergy),
            ("Immunization", self.immunization),
            ("Procedure", self.procedure),
            ("ServiceRequest", self.service_request),
            ("DiagnosticReport", self.diagnostic_report),  # after Observation: it groups them
        )
        for rtype, convert in plan:
            entity = SERVED_TYPES[rtype]
            for full_url, resource in self.by_type.get(rtype, []):
                record = self._convert(rtype, lambda u=full_url, r=resource, c=convert: c(u, r))
                if (
                    record is not None
                    and self._keep(records[entity], record, rtype)
                    and rtype == "Observation"
                ):
                    key = f"Observation/{resource['id']}" if resource.get("id") else f"#{id(resource)}"
                    self.results[key] = record
        self._order_reported_results(records["diagnostic_reports"].values())
        served = set(SERVED_TYPES)
        for rtype, resources in self.by_type.items():
            if rtype not in served and rtype not in _SUPPORTING_TYPES:
                self.skipped[f"{rtype}: resource type not served by the sandbox"] += len(resources)
        return SeedLoad(
            self.conn, {entity: list(by_id.values()) for entity, by_id in records.items()}, self.skipped
        )

    def _order_reported_results(self, reports: Iterable[DiagnosticReportRecord]) -> None:
        """A DiagnosticReport is the order its Observations answer: Redox's Data Model sends a
        lab report as one Results order (``Orders[].ID``, ``Procedure`` = the report's code)
        with the report's results, and FHIR names that order in each Observation's
        ``basedOn``. So the results a report groups take its order number and panel (the
        first report wins for a result two reports share)."""
        by_id = {r.id: r for r in self.results.values()}
        claimed: set[str] = set()
        for report in sorted(reports, key=lambda r: r.id):
            for result_id in report.result_ids:
                result = by_id.get(result_id)
                if result is None or result_id in claimed:
                    continue
                claimed.add(result_id)
                result.order_id, result.panel = report.order_id, report.code

    def _convert(self, rtype: str, convert: Any) -> Any:
        try:
            return convert()
        except Skip as skip:
            self.skipped[f"{rtype}: {skip.reason}"] += 1
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            self.skipped[f"{rtype}: malformed resource"] += 1
        return None

    def _keep(self, by_id: dict[str, Record], record: Record, rtype: str) -> bool:
        """Keep one record per id: the highest version (a resource may appear in several files)."""
        existing = by_id.get(record.id)
        if existing is not None:
            self.skipped[f"{rtype}: duplicate id"] += 1
            if (existing.version, existing.last_updated) >= (record.version, record.last_updated):
                return False
        by_id[record.id] = record
        return True
