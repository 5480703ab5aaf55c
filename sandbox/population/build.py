"""Materialise full records from the synthetic population's compact columns.

Every record is built alone from its table row: the row's columns fix its shape (times, status,
links) and a hash of (seed, connection, entity, person, row) seeds a ``random.Random`` for the
details. Changes made by ``advance`` are stored as field overrides and applied on top.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

import numpy as np

from sandbox.config import ConnectionSpec, SandboxConfig
from sandbox.population import clinical, documents, vocab
from sandbox.population.generate import APPT_FOLLOW_UP, APPT_VISIT, ENC_CLASS_CODE, S
from sandbox.population.ids import M48, DecimalCode, HexCode, encode_uuid, mix64, record_key, salt
from sandbox.population.query import CATEGORY_VALUES, STATUS_VALUES
from sandbox.population.records import (
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
from sandbox.population.tables import ConnState, Persons, Snapshot

SEXES: tuple[str, ...] = ("male", "female", "other", "unknown")
N_CANONICAL = len(vocab.CANONICAL_PATIENTS)
_EPOCH_DAY = date(1970, 1, 1)
_CLASS_BY_CODE = {v: k for k, v in ENC_CLASS_CODE.items()}


@dataclass(frozen=True, slots=True)
class Person:
    family: str
    given: tuple[str, ...]
    birth_date: date
    sex: str
    race: str | None
    ethnicity: str | None
    language: str | None
    address_line: str | None
    city: str | None
    state: str | None
    postal_code: str | None
    county: str | None
    phone_home: str | None
    phone_mobile: str | None
    email: str | None
    ssn: str | None
    marital_status: str | None
    deceased_at: datetime | None
    is_test: bool
    height_cm: float  # vital-sign baselines, so one person's measurements agree over time
    weight_kg: float


@dataclass(frozen=True)
class ConnCodes:
    """A connection's id schemes and places (fixed for the population's life)."""

    table_salt: dict[str, int]
    mask: dict[str, int]
    mrn: DecimalCode
    account: DecimalCode
    visit: DecimalCode
    appointment: DecimalCode
    lab_order: DecimalCode
    med_order: DecimalCode
    document: DecimalCode
    problem: DecimalCode
    allergy: DecimalCode
    immunization: DecimalCode
    procedure: DecimalCode
    ehr_salt: int
    ehr_mask: int
    nist: HexCode
    hospitals: tuple[str, ...]
    clinics: tuple[str, ...]


def _npi(rng: random.Random) -> str:
    """A 10-digit NPI with a valid Luhn check digit (computed with the 80840 prefix)."""
    body = str(rng.choice((1, 2))) + "".join(str(rng.randrange(10)) for _ in range(8))
    total = 24  # the 80840 prefix's contribution
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return body + str((10 - total % 10) % 10)


def _weighted(pairs, rng: random.Random):
    return rng.choices([p[0] for p in pairs], weights=[p[1] for p in pairs], k=1)[0]


class RecordBuilder:
    def __init__(self, config: SandboxConfig) -> None:
        self.seed = config.seed & ((1 << 64) - 1)
        epoch = config.clock_start
        self.epoch = epoch if epoch.tzinfo else epoch.replace(tzinfo=UTC)
        self._person_salt = salt(self.seed, "person")
        self._epi_salt = salt(self.seed, "enterprise-id")
        self.epi_mask = salt(self.seed, "enterprise-id", "mask") & M48
        self._ssn = DecimalCode("", 8, salt(self.seed, "ssn"))
        self.providers = self._make_providers()
        self.codes = {c.id: self._make_codes(c) for c in config.connections}
        self._persons: Persons | None = None
        self._person_cached = lru_cache(maxsize=8192)(self._person_uncached)

    # ------------------------------------------------------------ setup

    def _make_providers(self) -> tuple[Provider, ...]:
        rng = random.Random(salt(self.seed, "providers"))
        generated = []
        for _ in range(160):
            female = rng.random() < 0.5
            first = rng.choice(vocab.FEMALE_GIVEN[3:] if female else vocab.MALE_GIVEN[4:])
            generated.append(
                Provider(
                    _npi(rng),
                    first,
                    rng.choice(vocab.FAMILY_NAMES[3:]),
                    rng.choice(vocab.PROVIDER_CREDENTIALS),
                )
            )
        return vocab.CANONICAL_PROVIDERS + tuple(generated)

    def _make_codes(self, spec: ConnectionSpec) -> ConnCodes:
        def s(*parts: object) -> int:
            return salt(self.seed, spec.id, *parts)

        from sandbox.population.records import ENTITIES

        base = re.sub(r"\s*\(.*?\)", "", spec.name).strip() or spec.id
        return ConnCodes(
            table_salt={e: s(e) for e in ENTITIES},
            mask={e: s(e, "mask") & M48 for e in ENTITIES},
            # Generated MRNs are ten digits led by a non-zero digit, so they never collide with
            # the canonical ones (0000000001...) or Myra Jones's seven-digit 4442362.
            mrn=DecimalCode(str(1 + s("mrn-prefix") % 9), 9, s("mrn")),
            account=DecimalCode("A", 9, s("account")),
            visit=DecimalCode("1", 8, s("visit")),
            appointment=DecimalCode("2", 8, s("appointment")),
            lab_order=DecimalCode("3", 8, s("lab-order")),
            med_order=DecimalCode("4", 8, s("med-order")),
            document=DecimalCode("DOC", 9, s("document")),
            problem=DecimalCode("PRB", 9, s("problem")),
            allergy=DecimalCode("ALG", 9, s("allergy")),
            immunization=DecimalCode("IMM", 9, s("immunization")),
            procedure=DecimalCode("PRC", 9, s("procedure")),
            ehr_salt=s("ehr"),
            ehr_mask=s("ehr", "mask") & M48,
            nist=HexCode(s("nist")),
            hospitals=(vocab.CANONICAL_FACILITY, f"{base} Main Campus"),
            clinics=(f"{base} Family Clinic", f"{base} Specialty Center"),
        )

    # ------------------------------------------------------------ persons

    def use_persons(self, persons: Persons) -> None:
        """Point at the newest person columns (persons are only ever appended)."""
        self._persons = persons

    def person(self, p: int) -> Person:
        return self._person_cached(int(p))

    def _person_uncached(self, p: int) -> Person:
        assert self._persons is not None
        rng = random.Random(mix64(self._person_salt + p))
        height = rng.gauss(170.0, 10.0)
        weight = max(rng.gauss(78.0, 16.0), 40.0)
        if p < N_CANONICAL:
            c = vocab.CANONICAL_PATIENTS[p]
            return Person(
                c.family, c.given, c.birth_date, c.sex, c.race, c.ethnicity, c.language, c.address_line, c.city,
                c.state, c.postal_code, c.county, c.phone_home, c.phone_mobile, c.email, c.ssn, c.marital_status,
                None, True, round(height, 1), round(weight, 1),
            )  # fmt: skip
        cols = self._persons
        given = (vocab.GIVEN_NAMES[int(cols.given[p])],)
        if cols.middle[p] >= 0:
            given += (vocab.GIVEN_NAMES[int(cols.middle[p])],)
        family = vocab.FAMILY_NAMES[int(cols.family[p])]
        birth = _EPOCH_DAY + timedelta(days=int(cols.dob[p]))
        age = (self.epoch.date() - birth).days / 365.25
        place = rng.choice(vocab.PLACES)
        language = _weighted(vocab.LANGUAGES, rng)
        hispanic = rng.random() < (0.85 if language == "es" else 0.12)
        race = _weighted(vocab.RACES, rng)
        marital = "Single" if age < 18 else rng.choices(vocab.MARITAL_STATUSES, weights=(50, 30, 11, 6, 3))[0]
        ssn = self._ssn_of(p) if rng.random() < 0.85 else None
        deceased = None
        if rng.random() < 0.003:
            deceased = self.epoch - timedelta(days=rng.randint(1, 30), minutes=rng.randrange(1440))
        scale = min(1.0, 0.35 + age / 18) if age < 18 else 1.0
        return Person(
            family=family,
            given=given,
            birth_date=birth,
            sex=SEXES[int(cols.sex[p])],
            race=race,
            ethnicity="Hispanic or Latino" if hispanic else "Not Hispanic or Latino",
            language=language,
            address_line=clinical.street_address(rng),
            city=place.city,
            state=place.state,
            postal_code=f"{place.zip_prefix}{rng.randrange(100):02d}",
            county=place.county,
            phone_home=clinical.phone(place.area_code, rng) if rng.random() < 0.8 else None,
            phone_mobile=clinical.phone(place.area_code, rng) if rng.random() < 0.7 else None,
            email=clinical.email(given[0], family, rng) if age >= 13 and rng.random() < 0.6 else None,
            ssn=ssn,
            marital_status=marital,
            deceased_at=deceased,
            is_test=False,
            height_cm=round(height * scale, 1),
            weight_kg=round(weight * scale * scale, 1),
        )

    def _ssn_of(self, p: int) -> str:
        # Area numbers 900-999 are never issued, so these can never be a real person's SSN; the
        # other eight digits are a bijection of the person number, so an SSN search needs no table.
        v = self._ssn.encode(p)
        return f"9{v[:2]}-{v[2:4]}-{v[4:]}"

    def ssn_person(self, ssn: str) -> int | None:
        """The person an SSN names (canonical or generated), or None; callers verify."""
        for p, c in enumerate(vocab.CANONICAL_PATIENTS):
            if c.ssn == ssn:
                return p
        if len(ssn) != 11 or ssn[0] != "9" or ssn[3] != "-" or ssn[6] != "-":
            return None
        return self._ssn.decode(ssn[1:3] + ssn[4:6] + ssn[7:])

    def enterprise_id(self, p: int) -> str:
        return encode_uuid(mix64(self._epi_salt + int(p)), int(p), self.epi_mask)

    # ------------------------------------------------------------ ids

    def record_id(self, cs: ConnState, entity: str, row: int) -> str:
        codes = self.codes[cs.spec.id]
        return encode_uuid(self._key(cs, entity, row), row, codes.mask[entity])

    def _key(self, cs: ConnState, entity: str, row: int) -> int:
        codes = self.codes[cs.spec.id]
        patient_row = row if entity == "patients" else int(cs.tables[entity].base.patient[row])
        return record_key(codes.table_salt[entity], int(cs.members[patient_row]), row)

    def mrn(self, cs: ConnState, row: int) -> str:
        person = int(cs.members[row])
        if person < N_CANONICAL:
            return vocab.CANONICAL_PATIENTS[person].mrn
        return self.codes[cs.spec.id].mrn.encode(row)

    def ehr_id(self, cs: ConnState, row: int) -> str:
        if "EHRID" not in cs.spec.id_types:
            return ""
        person = int(cs.members[row])
        if person < N_CANONICAL and vocab.CANONICAL_PATIENTS[person].ehr_id:
            return vocab.CANONICAL_PATIENTS[person].ehr_id  # type: ignore[return-value]
        codes = self.codes[cs.spec.id]
        return encode_uuid(mix64(codes.ehr_salt + row), row, codes.ehr_mask)

    def nist_id(self, cs: ConnState, row: int) -> str | None:
        if "NIST" not in cs.spec.id_types:
            return None
        person = int(cs.members[row])
        if person < N_CANONICAL and vocab.CANONICAL_PATIENTS[person].nist_id:
            return vocab.CANONICAL_PATIENTS[person].nist_id
        return self.codes[cs.spec.id].nist.encode(row)

    def patient_ref(self, cs: ConnState, patient_row: int) -> PatientRef:
        return PatientRef(self.record_id(cs, "patients", patient_row), self.mrn(cs, patient_row))

    def visit_number(self, cs: ConnState, enc_row: int) -> str | None:
        return None if enc_row < 0 else self.codes[cs.spec.id].visit.encode(enc_row)

    def appointment_number(self, cs: ConnState, row: int) -> str:
        """An appointment's visit number: the booking a visit fulfils shares the visit's number
        (as in an EHR, where check-in turns the appointment into the encounter); any other
        booking has its own."""
        base = cs.tables["appointments"].base
        if int(base.item[row]) == APPT_VISIT:
            return self.codes[cs.spec.id].visit.encode(int(base.link[row]))
        return self.codes[cs.spec.id].appointment.encode(row)

    def appointment_row_of_visit(self, cs: ConnState, enc_row: int) -> int | None:
        """The appointment row an encounter row fulfils, if any."""
        enc = cs.tables.get("encounters")
        if enc is None or "appointments" not in cs.tables or not 0 <= enc_row < len(enc):
            return None
        row = int(enc.base.link[enc_row])
        return row if row >= 0 else None

    def result_id(self, cs: ConnState, row: int) -> str:
        base = cs.tables["results"].base
        item = int(base.item[row])
        analyte = vocab.PANELS[item >> 4].analytes[item & 15]
        return f"{self.codes[cs.spec.id].lab_order.encode(int(base.order_no[row]))}-{analyte.code.code}"

    # ------------------------------------------------------------ records

    def build(self, snap: Snapshot, cs: ConnState, entity: str, row: int, *, current: bool = True) -> Record:
        """The record at ``row``; ``current=False`` gives it as created (no later changes)."""
        record = getattr(self, f"_build_{entity}")(snap, cs, row)
        if current:
            changed = snap.overrides.get((cs.spec.id, entity, row))
            if changed:
                for name, value in changed.items():
                    setattr(record, name, value)
        return record

    def _common(self, cs: ConnState, entity: str, row: int) -> tuple[dict, random.Random]:
        base = cs.tables[entity].base
        key = self._key(cs, entity, row)
        codes = self.codes[cs.spec.id]
        common = {
            "connection_id": cs.spec.id,
            "id": encode_uuid(key, row, codes.mask[entity]),
            "last_updated": self.at(int(base.lu[row])),
            "version": int(base.version[row]),
        }
        return common, random.Random(key)

    def at(self, seconds: int) -> datetime:
        return self.epoch + timedelta(seconds=seconds)

    def _provider(self, rng: random.Random, *, clinician: bool = True) -> Provider:
        if rng.random() < 0.12:
            return rng.choice(self.providers[:3] if clinician else self.providers[:4])
        return rng.choice(self.providers[4:])

    def _build_patients(self, snap: Snapshot, cs: ConnState, row: int) -> PatientRecord:
        common, _ = self._common(cs, "patients", row)
        person = int(cs.members[row])
        d = self.person(person)
        return PatientRecord(
            **common,
            person_index=person,
            mrn=self.mrn(cs, row),
            ehr_id=self.ehr_id(cs, row),
            enterprise_id=self.enterprise_id(person),
            nist_id=self.nist_id(cs, row),
            family_name=d.family,
            given_names=d.given,
            birth_date=d.birth_date,
            sex=d.sex,  # type: ignore[arg-type]
            race=d.race,
            ethnicity=d.ethnicity,
            language=d.language,
            address_line=d.address_line,
            city=d.city,
            state=d.state,
            postal_code=d.postal_code,
            county=d.county,
            phone_home=d.phone_home,
            phone_mobile=d.phone_mobile,
            email=d.email,
            ssn=d.ssn,
            marital_status=d.marital_status,
            deceased_at=d.deceased_at,
            is_test=d.is_test,
            active=int(cs.tables["patients"].base.status[row]) == S["patients"]["active"],
        )

    def _location(self, cs: ConnState, class_code: str, rng: random.Random, pediatric: bool) -> Location:
        codes = self.codes[cs.spec.id]
        if class_code in ("IMP", "OBSENC"):
            dept = rng.choice(vocab.INPATIENT_DEPARTMENTS)
            room = "136" if rng.random() < 0.05 else str(rng.randint(100, 450))
            return Location(rng.choice(codes.hospitals), dept, room, rng.choice(("A", "B")), "Inpatient")
        if class_code == "EMER":
            return Location(rng.choice(codes.hospitals), "ED", f"ED{rng.randint(1, 40)}", None, "Emergency")
        if class_code == "VR":
            return Location(rng.choice(codes.clinics), "Telehealth", None, None, "Virtual")
        dept = "Pediatrics" if pediatric else rng.choice(vocab.CLINIC_DEPARTMENTS)
        return Location(rng.choice(codes.clinics), dept, str(rng.randint(1, 30)), None, "Clinic")

    def _build_encounters(self, snap: Snapshot, cs: ConnState, row: int) -> EncounterRecord:
        common, rng = self._common(cs, "encounters", row)
        base = cs.tables["encounters"].base
        prow = int(base.patient[row])
        class_code = _CLASS_BY_CODE[int(base.category[row])]
        start = self.at(int(base.clin[row]))
        status = STATUS_VALUES["encounters"][int(base.status[row])]
        person = self.person(int(cs.members[prow]))
        pediatric = (start.date() - person.birth_date).days < 18 * 365
        pool = vocab.INPATIENT_REASONS if class_code in ("IMP", "OBSENC") else vocab.REASONS
        reason = rng.choice(pool)
        if class_code == "AMB" and rng.random() < 0.25:
            reason = vocab.REASONS[-1] if pediatric else vocab.REASONS[-2]
        elif rng.random() < 0.08:
            reason = None
        disposition = None
        if status == "finished" and class_code in ("IMP", "OBSENC", "EMER"):
            disposition = _weighted(vocab.DISCHARGE_DISPOSITIONS, rng)
        appt_row = self.appointment_row_of_visit(cs, row)
        return EncounterRecord(
            **common,
            patient=self.patient_ref(cs, prow),
            visit_number=self.codes[cs.spec.id].visit.encode(row),
            account_number=self.codes[cs.spec.id].account.encode(row),
            status=status,  # type: ignore[arg-type]
            class_code=class_code,  # type: ignore[arg-type]
            type=rng.choice(vocab.ENCOUNTER_TYPES[class_code]),
            start_at=start,
            end_at=start + timedelta(seconds=int(base.aux[row])) if status == "finished" else None,
            location=self._location(cs, class_code, rng, pediatric),
            attending=self._provider(rng),
            reason=reason,
            discharge_disposition=disposition,
            appointment_id=None if appt_row is None else self.record_id(cs, "appointments", appt_row),
        )

    def _build_results(self, snap: Snapshot, cs: ConnState, row: int) -> ResultRecord:
        common, rng = self._common(cs, "results", row)
        base = cs.tables["results"].base
        prow = int(base.patient[row])
        item = int(base.item[row])
        panel = vocab.PANELS[item >> 4]
        analyte = panel.analytes[item & 15]
        status = STATUS_VALUES["results"][int(base.status[row])]
        effective = self.at(int(base.clin[row]))
        order_no = int(base.order_no[row])
        # Order-level details are drawn from the order, so all of its observations agree.
        order_rng = random.Random(mix64(self.codes[cs.spec.id].table_salt["results"] ^ (order_no + 1)))
        performer = self._provider(order_rng, clinician=panel.category != "vital-signs")
        producer = order_rng.choice(vocab.LAB_PERFORMING) if panel.category == "laboratory" else None
        value_numeric = value_text = flag = None
        components: tuple[Component, ...] = ()
        if analyte.components:
            components = tuple(self._component(part, rng) for part in analyte.components)
        elif analyte.text_values:
            value_text = clinical.draw_text(analyte, rng)
            flag = clinical.text_flag(analyte, value_text)
        else:
            if analyte.code.code in ("8302-2", "29463-7"):
                d = self.person(int(cs.members[prow]))
                centre = d.height_cm if analyte.code.code == "8302-2" else d.weight_kg
                value_numeric = round(max(rng.gauss(centre, 0.01 * centre), 1.0), analyte.decimals)
            else:
                value_numeric = clinical.draw_numeric(analyte, rng)
            value_text = clinical.format_numeric(value_numeric, analyte.decimals)
            flag = clinical.numeric_flag(analyte, value_numeric)
        if analyte.components:
            reference_text = None
        elif analyte.text_values:
            reference_text = analyte.text_values[0]
        elif analyte.low is not None and analyte.high is not None:
            reference_text = f"{analyte.low:g}-{analyte.high:g}"
        elif analyte.high is not None:
            reference_text = f"<{analyte.high:g}"
        elif analyte.low is not None:
            reference_text = f">{analyte.low:g}"
        else:
            reference_text = None
        issued = None
        if status in ("final", "corrected"):
            issued = effective + timedelta(seconds=int(base.aux[row]))
            if status == "corrected":
                issued = common["last_updated"]
        return ResultRecord(
            **common,
            patient=self.patient_ref(cs, prow),
            visit_number=self.visit_number(cs, int(base.link[row])),
            order_id=self.codes[cs.spec.id].lab_order.encode(order_no),
            result_id=f"{self.codes[cs.spec.id].lab_order.encode(order_no)}-{analyte.code.code}",
            category=panel.category,  # type: ignore[arg-type]
            panel=panel.code,
            code=analyte.code,
            value_type=analyte.value_type,  # type: ignore[arg-type]
            value_numeric=value_numeric,
            value_text=value_text,
            unit=analyte.unit,
            reference_low=analyte.low,
            reference_high=analyte.high,
            reference_text=reference_text,
            abnormal_flag=flag,  # type: ignore[arg-type]
            status=status,  # type: ignore[arg-type]
            effective_at=effective,
            issued_at=issued,
            performer=performer,
            producer=producer,
            components=components,
            value_code=_value_code(analyte, value_text),
        )

    @staticmethod
    def _component(analyte: vocab.Analyte, rng: random.Random) -> Component:
        value = clinical.draw_numeric(analyte, rng)
        return Component(
            code=analyte.code,
            value_numeric=value,
            value_text=clinical.format_numeric(value, analyte.decimals),
            unit=analyte.unit,
            reference_low=analyte.low,
            reference_high=analyte.high,
            abnormal_flag=clinical.numeric_flag(analyte, value),
        )

    def _build_medications(self, snap: Snapshot, cs: ConnState, row: int) -> MedicationRecord:
        common, rng = self._common(cs, "medications", row)
        base = cs.tables["medications"].base
        drug = vocab.DRUGS[int(base.item[row])]
        kind = CATEGORY_VALUES["medications"][int(base.category[row])]
        status = STATUS_VALUES["medications"][int(base.status[row])]
        start = self.at(int(base.clin[row]))
        end = None
        if status == "completed":
            end = start + timedelta(seconds=int(base.aux[row]))
        elif status == "stopped":
            end = common["last_updated"]
        prescriber = self._provider(rng) if kind == "request" or rng.random() < 0.5 else None
        return MedicationRecord(
            **common,
            patient=self.patient_ref(cs, int(base.patient[row])),
            visit_number=self.visit_number(cs, int(base.link[row])),
            order_id=self.codes[cs.spec.id].med_order.encode(row),
            kind=kind,  # type: ignore[arg-type]
            status=status,  # type: ignore[arg-type]
            intent="order" if kind == "request" else None,
            code=drug.code,
            dose_quantity=float(drug.dose),
            dose_unit=drug.unit,
            route=drug.route,
            frequency_period=float(drug.period),
            frequency_unit=drug.period_unit,
            start_at=start,
            end_at=end,
            prescriber=prescriber,
        )

    def _build_appointments(self, snap: Snapshot, cs: ConnState, row: int) -> AppointmentRecord:
        common, rng = self._common(cs, "appointments", row)
        base = cs.tables["appointments"].base
        status = STATUS_VALUES["appointments"][int(base.status[row])]
        prow = int(base.patient[row])
        person = self.person(int(cs.members[prow]))
        start = self.at(int(base.clin[row]))
        pediatric = (start.date() - person.birth_date).days < 18 * 365
        appt_type = rng.choice(vocab.APPOINTMENT_TYPES)
        reason = "Check up" if appt_type.code == "CHECKUP" else rng.choice(vocab.APPOINTMENT_REASONS)
        provider = self._provider(rng)
        location = self._location(cs, "AMB", rng, pediatric)
        kind = int(base.item[row])
        if kind == APPT_VISIT:
            # Booked with the clinician and clinic the visit then took place with.
            visit = self._build_encounters(snap, cs, int(base.link[row]))
            provider, location = visit.attending, visit.location
            if appt_type.code == "FOLLOWUP":
                appt_type = next(t for t in vocab.APPOINTMENT_TYPES if t.code == "ROUTINE")
        elif kind == APPT_FOLLOW_UP:
            appt_type = next(t for t in vocab.APPOINTMENT_TYPES if t.code == "FOLLOWUP")
            reason = "Follow-up"
        return AppointmentRecord(
            **common,
            patient=self.patient_ref(cs, prow),
            visit_number=self.appointment_number(cs, row),
            status=status,  # type: ignore[arg-type]
            start_at=start,
            duration_minutes=int(base.aux[row]),
            type=appt_type,
            reason=reason,
            provider=provider,
            location=location,
            cancel_reason=rng.choice(vocab.CANCEL_REASONS) if status == "cancelled" else None,
        )

    def _build_documents(self, snap: Snapshot, cs: ConnState, row: int) -> DocumentRecord:
        common, rng = self._common(cs, "documents", row)
        base = cs.tables["documents"].base
        prow = int(base.patient[row])
        kind = CATEGORY_VALUES["documents"][int(base.category[row])]
        doc_type = (vocab.NOTE_TYPES if kind == "note" else vocab.CDA_TYPES)[int(base.item[row])]
        title = doc_type.display if kind == "note" else vocab.CDA_TITLES[doc_type.code]
        authored_s = int(base.clin[row])
        authored = self.at(authored_s)
        author = self._provider(rng)
        document_id = self.codes[cs.spec.id].document.encode(row)
        enc_row = int(base.link[row])
        patient = self._build_patients(snap, cs, prow)
        encounter = self._build_encounters(snap, cs, enc_row) if enc_row >= 0 else None
        if kind == "note":
            content = documents.note_text(
                patient=patient,
                title=title,
                authored_at=authored,
                author=author,
                encounter=encounter,
                rng=rng,
            )
            content_type = "text/plain"
        else:
            custodian = encounter.location.facility if encounter else cs.spec.name
            content = documents.cda_xml(
                document_id=document_id,
                doc_type=doc_type,
                title=title,
                patient=patient,
                author=author,
                custodian=custodian,
                authored_at=authored,
                encounters=self._history(snap, cs, "encounters", prow, authored_s, 5),
                medications=self._history(snap, cs, "medications", prow, authored_s, 10),
                results=self._history(snap, cs, "results", prow, authored_s, 16),
            )
            content_type = "application/xml"
        return DocumentRecord(
            **common,
            patient=self.patient_ref(cs, prow),
            visit_number=self.visit_number(cs, enc_row),
            document_id=document_id,
            kind=kind,  # type: ignore[arg-type]
            type=doc_type,
            title=title,
            status=STATUS_VALUES["documents"][int(base.status[row])],  # type: ignore[arg-type]
            authored_at=authored,
            author=author,
            content_type=content_type,
            content=content,
        )

    def _build_problems(self, snap: Snapshot, cs: ConnState, row: int) -> ProblemRecord:
        common, rng = self._common(cs, "problems", row)
        base = cs.tables["problems"].base
        problem = vocab.PROBLEMS[int(base.item[row])]
        status = STATUS_VALUES["problems"][int(base.status[row])]
        onset = self.at(int(base.clin[row]))
        abated = None
        if status == "resolved":
            abated = onset + timedelta(seconds=int(base.aux[row]))
        elif status == "inactive":
            abated = common["last_updated"]
        return ProblemRecord(
            **common,
            patient=self.patient_ref(cs, int(base.patient[row])),
            visit_number=self.visit_number(cs, int(base.link[row])),
            problem_id=self.codes[cs.spec.id].problem.encode(row),
            code=problem.code,
            alt_code=problem.snomed,
            status=status,  # type: ignore[arg-type]
            onset_at=onset,
            abated_at=abated,
            recorded_at=onset + timedelta(minutes=rng.randrange(1, 90)),
            recorder=self._provider(rng),
        )

    def _build_allergies(self, snap: Snapshot, cs: ConnState, row: int) -> AllergyRecord:
        common, rng = self._common(cs, "allergies", row)
        base = cs.tables["allergies"].base
        allergen = vocab.ALLERGENS[int(base.item[row])]
        recorded = self.at(int(base.clin[row]))
        reaction = rng.choice(vocab.REACTIONS) if rng.random() < 0.8 else None
        severity = None
        if reaction is not None:
            severity = "severe" if reaction.code == "39579001" else rng.choice(("mild", "mild", "moderate"))
        onset = None
        if rng.random() < 0.6:
            onset = recorded - timedelta(days=rng.randrange(30, 3650))
        return AllergyRecord(
            **common,
            patient=self.patient_ref(cs, int(base.patient[row])),
            allergy_id=self.codes[cs.spec.id].allergy.encode(row),
            substance=allergen.substance,
            kind=allergen.kind,  # type: ignore[arg-type]
            category=allergen.category,  # type: ignore[arg-type]
            criticality="high" if severity == "severe" else rng.choice(("low", "low", "unable-to-assess")),
            status=STATUS_VALUES["allergies"][int(base.status[row])],  # type: ignore[arg-type]
            reaction=reaction,
            severity=severity,  # type: ignore[arg-type]
            onset_at=onset,
            recorded_at=recorded,
            recorder=self._provider(rng),
        )

    def _build_immunizations(self, snap: Snapshot, cs: ConnState, row: int) -> ImmunizationRecord:
        common, rng = self._common(cs, "immunizations", row)
        base = cs.tables["immunizations"].base
        vaccine = vocab.VACCINES[int(base.item[row])]
        status = STATUS_VALUES["immunizations"][int(base.status[row])]
        given = self.at(int(base.clin[row]))
        done = status != "not-done"
        return ImmunizationRecord(
            **common,
            patient=self.patient_ref(cs, int(base.patient[row])),
            visit_number=self.visit_number(cs, int(base.link[row])),
            immunization_id=self.codes[cs.spec.id].immunization.encode(row),
            vaccine=vaccine.code,
            status=status,  # type: ignore[arg-type]
            status_reason=None if done else rng.choice(vocab.NOT_DONE_REASONS),
            occurred_at=given,
            recorded_at=given + timedelta(minutes=rng.randrange(1, 120)),
            lot_number=f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randrange(10000, 99999)}"
            if done
            else None,
            manufacturer=vaccine.manufacturer if done else None,
            route=vaccine.route if done else None,
            dose_quantity=vaccine.dose_ml if done else None,
            dose_unit="mL" if done else None,
            performer=self._provider(rng) if done else None,
        )

    def _build_procedures(self, snap: Snapshot, cs: ConnState, row: int) -> ProcedureRecord:
        common, rng = self._common(cs, "procedures", row)
        base = cs.tables["procedures"].base
        kind = vocab.PROCEDURES[int(base.item[row])]
        status = STATUS_VALUES["procedures"][int(base.status[row])]
        start = self.at(int(base.clin[row]))
        end = start + timedelta(seconds=int(base.aux[row])) if status == "completed" else None
        return ProcedureRecord(
            **common,
            patient=self.patient_ref(cs, int(base.patient[row])),
            visit_number=self.visit_number(cs, int(base.link[row])),
            procedure_id=self.codes[cs.spec.id].procedure.encode(row),
            code=kind.code,
            status=status,  # type: ignore[arg-type]
            performed_start=start,
            performed_end=end,
            body_site=kind.body_site,
            reason=rng.choice(vocab.REASONS) if rng.random() < 0.6 else None,
            performer=self._provider(rng),
        )

    def _order_details(self, cs: ConnState, order_no: int) -> tuple[Provider, str | None]:
        """The ordering provider and performing lab of a lab order (as its results draw them)."""
        order_rng = random.Random(mix64(self.codes[cs.spec.id].table_salt["results"] ^ (order_no + 1)))
        return self._provider(order_rng, clinician=True), order_rng.choice(vocab.LAB_PERFORMING)

    def _build_diagnostic_reports(self, snap: Snapshot, cs: ConnState, row: int) -> DiagnosticReportRecord:
        common, _ = self._common(cs, "diagnostic_reports", row)
        base = cs.tables["diagnostic_reports"].base
        first, n = int(base.link[row]), int(base.aux[row])
        order_no = int(base.order_no[row])
        results = cs.tables["results"].base
        status = STATUS_VALUES["diagnostic_reports"][int(base.status[row])]
        effective = self.at(int(base.clin[row]))
        issued = None
        if status in ("final", "corrected"):
            issued = effective + timedelta(seconds=int(results.aux[first]))
        performer, producer = self._order_details(cs, order_no)
        rows = range(first, first + n)
        return DiagnosticReportRecord(
            **common,
            patient=self.patient_ref(cs, int(base.patient[row])),
            visit_number=self.visit_number(cs, int(results.link[first])),
            order_id=self.codes[cs.spec.id].lab_order.encode(order_no),
            code=vocab.PANELS[int(base.item[row])].code,
            status=status,  # type: ignore[arg-type]
            effective_at=effective,
            issued_at=issued,
            performer=performer,
            producer=producer,
            result_ids=tuple(self.record_id(cs, "results", r) for r in rows),
            result_business_ids=tuple(self.result_id(cs, r) for r in rows),
        )

    def _build_orders(self, snap: Snapshot, cs: ConnState, row: int) -> OrderRecord:
        common, rng = self._common(cs, "orders", row)
        base = cs.tables["orders"].base
        order_no = int(base.order_no[row])
        authored = self.at(int(base.clin[row]))
        requester, _ = self._order_details(cs, order_no)
        return OrderRecord(
            **common,
            patient=self.patient_ref(cs, int(base.patient[row])),
            visit_number=self.visit_number(cs, int(base.link[row])),
            order_id=self.codes[cs.spec.id].lab_order.encode(order_no),
            code=vocab.PANELS[int(base.item[row])].code,
            status=STATUS_VALUES["orders"][int(base.status[row])],  # type: ignore[arg-type]
            intent="order",
            priority=_weighted(vocab.ORDER_PRIORITIES, rng),
            authored_at=authored,
            occurrence_at=authored + timedelta(seconds=int(base.aux[row])),
            requester=requester,
            reason=rng.choice(vocab.REASONS) if rng.random() < 0.7 else None,
        )

    def _history(self, snap: Snapshot, cs: ConnState, entity: str, prow: int, until: int, limit: int) -> list:
        """The patient's records of ``entity`` as they were when a summary was written: created
        (and clinically dated) no later than ``until``, most recent ``limit``, as created."""
        table = cs.tables.get(entity)
        if table is None:
            return []
        rows = table.index.patient_rows(prow)
        base = table.base
        rows = rows[(base.lu[rows] <= until) & (base.clin[rows] <= until)]
        rows = rows[np.lexsort((rows, base.clin[rows]))][-limit:]
        return [getattr(self, f"_build_{entity}")(snap, cs, int(r)) for r in rows]


def _value_code(analyte: vocab.Analyte, value_text: str | None) -> Coding | None:
    """The coding of a coded value (smoking status), when the analyte has codes."""
    for c in analyte.value_codes:
        if c.display == value_text:
            return c
    return None


def record_diff(base: Record, new: Record) -> dict:
    """Fields of ``new`` that differ from ``base`` (what an override stores)."""
    return {
        f.name: getattr(new, f.name) for f in fields(new) if getattr(new, f.name) != getattr(base, f.name)
    }
