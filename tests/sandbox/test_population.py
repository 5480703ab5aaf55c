"""The sandbox population: determinism, query semantics, evolution and realism.

Small populations keep this fast; every filter is checked against a brute-force evaluation of
the same ``Query`` (``sandbox.population.query.matches``) over every record.
"""

from __future__ import annotations

import re
import threading
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import timedelta

import pytest

from sandbox.config import SandboxConfig
from sandbox.population import vocab
from sandbox.population.clinical import ANALYTES, numeric_flag
from sandbox.population.query import matches, record_business_id, record_clinical_date
from sandbox.population.records import (
    DEAD_STATUSES,
    ENTITIES,
    ENTITY_RECORD_TYPES,
    LOINC,
    RXNORM,
    is_live,
)
from sandbox.population.static import StaticPopulation, StaticPopulationError
from sandbox.population.store import Query, RecordStore
from sandbox.population.synthetic import SyntheticPopulation

CONN = "riverbend-both"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def everything(store: RecordStore, connection_id: str, entity: str) -> list:
    return list(store.iter(Query(connection_id, entity), batch=500))


_SHARED_READS: dict[tuple, list] = {}


def shared(store: SyntheticPopulation, connection_id: str, entity: str) -> list:
    """``everything`` for the module's shared population, read once (tests never change it)."""
    key = (id(store), connection_id, entity)
    if key not in _SHARED_READS:
        _SHARED_READS[key] = everything(store, connection_id, entity)
    return _SHARED_READS[key]


@pytest.fixture(scope="module")
def config() -> SandboxConfig:
    return SandboxConfig(seed=11, patients=400)


@pytest.fixture(scope="module")
def pop(config: SandboxConfig) -> SyntheticPopulation:
    return SyntheticPopulation(config)


# ---------------------------------------------------------------- determinism


def test_same_seed_builds_identical_records_and_identical_advances() -> None:
    a = SyntheticPopulation(SandboxConfig(seed=5, patients=150))
    b = SyntheticPopulation(SandboxConfig(seed=5, patients=150))
    for spec in a._config.connections:
        for entity in spec.entities:
            assert everything(a, spec.id, entity) == everything(b, spec.id, entity)
    changes_a = a.advance(2, 0.05) + a.advance(0.5, 0.1)
    changes_b = b.advance(2, 0.05) + b.advance(0.5, 0.1)
    assert changes_a == changes_b
    assert a.counts() == b.counts() and a.persons() == b.persons()
    docs = everything(a, CONN, "documents")
    assert docs == everything(b, CONN, "documents")
    assert all(d.content for d in docs)


def test_different_seed_gives_different_data() -> None:
    a = SyntheticPopulation(SandboxConfig(seed=5, patients=150))
    b = SyntheticPopulation(SandboxConfig(seed=6, patients=150))
    assert [p.id for p in everything(a, CONN, "patients")] != [p.id for p in everything(b, CONN, "patients")]
    assert a.counts() != b.counts()


def test_clock_starts_at_config_and_history_spans_history_days(pop: SyntheticPopulation, config) -> None:
    assert pop.now == config.clock_start
    earliest = config.clock_start - timedelta(days=config.history_days)
    for entity in ("encounters", "results", "documents"):
        for r in shared(pop, CONN, entity):
            assert earliest <= r.last_updated <= config.clock_start
            assert earliest <= record_clinical_date(r) <= config.clock_start


# ---------------------------------------------------------------- counting, paging, filters


def test_counts_equal_records_paged_through(pop: SyntheticPopulation, config) -> None:
    counts, live = pop.counts(), pop.counts(live_only=True)
    assert set(counts) == {c.id for c in config.connections}
    for spec in config.connections:
        assert set(counts[spec.id]) == set(spec.entities)
        for entity in spec.entities:
            records = shared(pop, spec.id, entity)
            assert len(records) == counts[spec.id][entity] == pop.count(Query(spec.id, entity))
            assert sum(is_live(r) for r in records) == live[spec.id][entity]
            assert all(isinstance(r, ENTITY_RECORD_TYPES[entity]) for r in records)
    assert live[CONN]["results"] < counts[CONN]["results"]  # some start cancelled / in error


def test_pages_are_ordered_by_last_updated_then_id_and_stable(pop: SyntheticPopulation) -> None:
    for entity in ENTITIES:
        records = shared(pop, CONN, entity)
        keys = [(r.last_updated, r.id) for r in records]
        assert keys == sorted(keys)
        for size in (1, 7, 100):
            paged = []
            offset = 0
            while page := pop.page(Query(CONN, entity), offset, size):
                paged.extend(page)
                offset += size
            assert [r.id for r in paged] == [r.id for r in records]
    assert pop.page(Query(CONN, "results"), 10**9, 10) == []


def _filter_queries(pop: SyntheticPopulation, entity: str, records: list) -> list[Query]:
    now = pop.now
    patient_id = records[len(records) // 2].patient.patient_id if entity != "patients" else records[3].id
    some_ids = [r.id for r in records[::37]] + ["not-an-id", str(uuid.UUID(int=7, version=4))]
    cut = records[len(records) // 3].last_updated
    queries = [
        Query(CONN, entity, updated_ge=cut),
        Query(CONN, entity, updated_gt=cut),
        Query(CONN, entity, updated_le=cut),
        Query(CONN, entity, updated_lt=cut, updated_ge=now - timedelta(days=400)),
        Query(CONN, entity, updated_gt=cut + timedelta(microseconds=500_000)),
        Query(CONN, entity, date_ge=now - timedelta(days=90), date_lt=now - timedelta(days=30)),
        Query(CONN, entity, date_gt=now - timedelta(days=10), date_le=now + timedelta(days=30)),
        Query(CONN, entity, patient_id=patient_id),
        Query(CONN, entity, patient_id="unknown-patient"),
        Query(CONN, entity, ids=some_ids),
        Query(CONN, entity, ids=some_ids, updated_ge=cut),
        Query(CONN, entity, statuses=["cancelled", "entered-in-error", "inactive"]),
        Query(CONN, entity, statuses=["final", "finished", "active", "booked", "current"], updated_lt=cut),
        Query(CONN, entity, category="vital-signs"),
        Query(CONN, entity, category="statement", patient_id=patient_id),
        Query(CONN, entity, category="laboratory", statuses=["final"], date_ge=now - timedelta(days=200)),
        Query(CONN, entity, category="no-such-category"),
    ]
    return queries


@pytest.mark.parametrize("entity", ENTITIES)
def test_filters_agree_with_brute_force(pop: SyntheticPopulation, entity: str) -> None:
    records = shared(pop, CONN, entity)
    for q in _filter_queries(pop, entity, records):
        expected = [r.id for r in records if matches(r, q)]
        assert pop.count(q) == len(expected), q
        assert [r.id for r in pop.iter(q, batch=13)] == expected, q


def test_get_returns_the_paged_record_and_none_for_unknown_ids(pop: SyntheticPopulation) -> None:
    for entity in ENTITIES:
        for r in shared(pop, CONN, entity)[::50]:
            assert pop.get(CONN, entity, r.id) == r
        fake = str(uuid.UUID(int=12345, version=4))
        assert pop.get(CONN, entity, fake) is None
        assert pop.get(CONN, entity, "garbage") is None
    patient = shared(pop, CONN, "patients")[0]
    assert pop.get("northwind-fhir", "patients", patient.id) is None  # ids are per connection
    assert pop.get("carequality-network", "encounters", patient.id) is None  # entity not served there
    assert pop.count(Query("carequality-network", "results")) == 0
    with pytest.raises(KeyError):
        pop.count(Query("no-such-connection", "patients"))


def test_ids_are_uuids_and_business_ids_unique_per_connection(pop: SyntheticPopulation, config) -> None:
    for spec in config.connections:
        business: Counter = Counter()
        for entity in spec.entities:
            records = shared(pop, spec.id, entity)
            ids = [r.id for r in records]
            assert len(set(ids)) == len(ids)
            assert all(UUID_RE.match(i) for i in ids)
            business.update((entity, record_business_id(r)) for r in records if entity != "patients")
        assert all(n == 1 for n in business.values())
        mrns = [p.mrn for p in shared(pop, spec.id, "patients")]
        assert len(set(mrns)) == len(mrns)


def test_find_by_business_id(pop: SyntheticPopulation) -> None:
    for entity in ("encounters", "results", "medications", "appointments", "documents"):
        for r in shared(pop, CONN, entity)[::41]:
            assert pop.find_by_business_id(CONN, entity, record_business_id(r)) == r
        assert pop.find_by_business_id(CONN, entity, "000") is None
    result = shared(pop, CONN, "results")[0]
    assert result.result_id == f"{result.order_id}-{result.code.code}"
    assert pop.find_by_business_id(CONN, "results", f"{result.order_id}-0000-0") is None


# ---------------------------------------------------------------- patients and persons


def test_canonical_patients_are_in_every_ehr_connection(pop: SyntheticPopulation, config) -> None:
    for spec in config.connections:
        if spec.kind != "ehr":
            continue
        timothy = pop.find_patients(spec.id, identifier="0000000001", id_type="MR")
        assert len(timothy) == 1
        t = timothy[0]
        assert (t.family_name, t.given_names, t.birth_date.isoformat(), t.sex) == (
            "Bixby",
            ("Timothy", "Paul"),
            "2008-01-06",
            "male",
        )
        assert (t.address_line, t.city, t.state, t.postal_code, t.phone_home) == (
            "4762 Hickory Street",
            "Monroe",
            "WI",
            "53566",
            "+18088675301",
        )
        assert t.is_test and t.active
        assert t.ehr_id == ("e167267c-16c9-4fe3-96ae-9cff5703e90a" if "EHRID" in spec.id_types else "")
        assert t.nist_id == ("a1d4ee8aba494ca" if "NIST" in spec.id_types else None)
        barbara = pop.find_patients(spec.id, family="Bixby", given="Barbara", birth_date="1982-07-24")
        assert [b.mrn for b in barbara] == ["0000000002"] and barbara[0].email == "barb.bixby@test.net"
        assert pop.find_patients(spec.id, identifier="0000000003")[0].family_name == "Carthwright"
        assert pop.find_patients(spec.id, identifier="0000000004")[0].given_names == ("Elizabeth",)
        assert pop.find_patients(spec.id, family="Bixby", given="Kent")
        myra = pop.find_patients(spec.id, identifier="4442362", id_type="MR")[0]
        assert (myra.family_name, myra.birth_date.isoformat(), myra.sex) == ("Jones", "1947-05-01", "female")
        if "EHRID" in spec.id_types:
            walter = pop.find_patients(
                spec.id, identifier="e3fedf48-c8bf-4728-845f-cb810001b571", id_type="EHRID"
            )
            assert walter[0].mrn == "0000000003"
        # Each canonical patient has visits (the Data Model surface enumerates patients through them).
        assert pop.count(Query(spec.id, "encounters", patient_id=t.id)) >= 1


def test_find_patients_by_every_identifier_type(pop: SyntheticPopulation) -> None:
    patients = shared(pop, CONN, "patients")
    p = next(x for x in patients[10:] if x.ssn)
    by_type = {
        "MR": p.mrn,
        "EHRID": p.ehr_id,
        "NIST": p.nist_id,
        "EPI": p.enterprise_id,
        "ID": p.id,
        "SSN": p.ssn,
        "urn:redox:riverbend-medical:MR": p.mrn,
        "http://hl7.org/fhir/sid/us-ssn": p.ssn,
    }
    for id_type, value in by_type.items():
        assert [r.id for r in pop.find_patients(CONN, identifier=value, id_type=id_type)] == [p.id], id_type
        assert p.id in [r.id for r in pop.find_patients(CONN, identifier=value)], id_type
    assert pop.find_patients(CONN, identifier=p.mrn, id_type="NIST") == []
    assert pop.find_patients(CONN, identifier=p.mrn + "0") == []
    assert pop.find_patients(CONN) == []
    # northwind emits no NIST ids, lakeside no EHR ids.
    north = shared(pop, "northwind-fhir", "patients")[20]
    assert north.nist_id is None and north.ehr_id
    lake = shared(pop, "lakeside-dm", "patients")[20]
    assert lake.ehr_id == "" and lake.nist_id


def test_demographic_search_agrees_with_brute_force(pop: SyntheticPopulation) -> None:
    patients = shared(pop, CONN, "patients")
    for p in patients[::29]:
        birth = p.birth_date.isoformat()
        found = pop.find_patients(
            CONN, family=p.family_name.upper(), given=p.given_names[0], birth_date=birth
        )
        expected = [
            x.id
            for x in patients
            if x.family_name == p.family_name
            and p.given_names[0] in x.given_names
            and x.birth_date == p.birth_date
        ]
        assert sorted(r.id for r in found) == sorted(expected)
    assert pop.find_patients(CONN, family="Nosuchname") == []
    assert pop.find_patients(CONN, birth_date="not-a-date") == []


def test_near_duplicate_twins_share_demographics_but_not_identity(pop: SyntheticPopulation) -> None:
    people = {}
    for spec in pop._config.connections:
        for p in shared(pop, spec.id, "patients"):
            people[p.person_index] = p
    groups = defaultdict(list)
    for p in people.values():
        groups[(p.family_name, p.given_names, p.birth_date, p.sex)].append(p)
    twins = [g for g in groups.values() if len(g) > 1]
    assert len(twins) >= 0.02 * len(people) / 2
    for group in twins:
        assert len({p.enterprise_id for p in group}) == len(group)
        assert len({(p.address_line, p.postal_code) for p in group}) > 1


def test_a_person_in_several_connections_has_local_mrns_and_one_enterprise_id(
    pop: SyntheticPopulation, config
) -> None:
    by_person = defaultdict(list)
    for spec in config.connections:
        for p in everything(pop, spec.id, "patients"):
            by_person[p.person_index].append(p)
    shared = [recs for recs in by_person.values() if len(recs) >= 2 and not recs[0].is_test]
    assert shared
    for recs in shared:
        assert len({r.enterprise_id for r in recs}) == 1
        assert len({r.mrn for r in recs}) == len(recs)
        assert len({(r.family_name, r.birth_date) for r in recs}) == 1
    persons = pop.persons()
    assert [p["enterprise_id"] for p in persons] == sorted(p["enterprise_id"] for p in persons)
    assert len(persons) == len(by_person)
    entry = next(p for p in persons if p["enterprise_id"] == shared[0][0].enterprise_id)
    assert {(r["connection_id"], r["patient_id"], r["mrn"]) for r in entry["records"]} == {
        (r.connection_id, r.id, r.mrn) for r in shared[0]
    }


# ---------------------------------------------------------------- realism


def test_every_ehr_patient_has_an_encounter_and_volumes_are_plausible(
    pop: SyntheticPopulation, config
) -> None:
    for spec in config.connections:
        patients = everything(pop, spec.id, "patients")
        if "encounters" not in spec.entities:
            assert set(spec.entities) == {"patients", "documents"}
            continue
        with_visits = {e.patient.patient_id for e in everything(pop, spec.id, "encounters")}
        assert {p.id for p in patients} <= with_visits
    n = pop.counts()[CONN]["patients"]
    per_patient = {e: c / n for e, c in pop.counts()[CONN].items()}
    assert 3 <= per_patient["encounters"] <= 5
    assert 11 <= per_patient["results"] <= 19
    assert 2 <= per_patient["medications"] <= 4
    # ~3 bookings fulfilled by visits, ~0.5 follow-ups of stays, ~0.5 that never became visits.
    assert 3.5 <= per_patient["appointments"] <= 6
    assert 1.4 <= per_patient["documents"] <= 2.6


def test_demographics_look_real(pop: SyntheticPopulation) -> None:
    patients = shared(pop, CONN, "patients")
    states = {pl.state for pl in vocab.PLACES}
    for p in patients:
        assert p.state in states and re.fullmatch(r"\d{5}", p.postal_code)
        for phone in (p.phone_home, p.phone_mobile):
            assert phone is None or re.fullmatch(r"\+1[2-9]\d{9}", phone)
        assert p.email is None or re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]+", p.email)
        assert p.sex in ("male", "female", "other", "unknown")
    assert len({p.race for p in patients}) >= 4 and len({p.language for p in patients}) >= 3


def test_results_have_loinc_ucum_and_flags_consistent_with_values(pop: SyntheticPopulation) -> None:
    results = shared(pop, CONN, "results")
    categories = Counter(r.category for r in results)
    assert categories["laboratory"] and categories["vital-signs"]
    assert categories["social-history"] and categories["survey"] and categories["exam"]
    vital_codes = {"8867-4", "85354-9", "8310-5", "29463-7", "8302-2", "59408-5", "9279-1"}
    panels = {r.panel.code for r in results}
    assert {"58410-2", "51990-0", "24331-1", "4548-4", "3016-3"} <= panels
    flags = Counter()
    for r in results:
        assert r.code.system == LOINC and r.panel.system == LOINC
        analyte = ANALYTES[r.code.code]
        if r.category == "vital-signs":
            assert r.code.code in vital_codes
        if analyte.components:  # blood pressure: a component-only Observation
            assert r.value_numeric is None and r.value_text is None and r.abnormal_flag is None
            assert [c.code.code for c in r.components] == ["8480-6", "8462-4"]
            for c, part in zip(r.components, analyte.components, strict=True):
                assert c.unit == "mm[Hg]" and c.abnormal_flag == numeric_flag(part, c.value_numeric)
            continue
        assert not r.components
        if r.value_type == "Numeric":
            assert r.unit == analyte.unit and r.value_numeric is not None
            assert r.abnormal_flag == numeric_flag(analyte, r.value_numeric)
        else:
            assert r.value_text in analyte.text_values
            assert r.abnormal_flag == ("N" if r.value_text == analyte.text_values[0] else "A")
        assert r.issued_at is None or r.effective_at <= r.issued_at <= r.last_updated
        flags[r.abnormal_flag] += 1
    assert {"H", "L", "N", "A"} <= set(flags)
    by_order = defaultdict(set)
    for r in results:
        by_order[r.order_id].add((r.panel.code, r.visit_number, r.effective_at))
    assert all(len(v) == 1 for v in by_order.values())


def test_encounters_medications_appointments_documents_are_coded(pop: SyntheticPopulation) -> None:
    encounters = shared(pop, CONN, "encounters")
    assert {"AMB", "IMP", "EMER", "OBSENC", "VR"} <= {e.class_code for e in encounters}
    for e in encounters:
        if e.status == "finished":
            assert e.end_at is not None and e.start_at <= e.end_at
        if e.discharge_disposition is not None:
            assert e.class_code in ("IMP", "OBSENC", "EMER")
    assert any(e.discharge_disposition for e in encounters if e.class_code == "IMP")
    meds = shared(pop, CONN, "medications")
    assert {m.kind for m in meds} == {"request", "statement"}
    rxcuis = {d.code.code for d in vocab.DRUGS}
    assert all(m.code.system == RXNORM and m.code.code in rxcuis and m.route is not None for m in meds)
    assert {"197361", "314076", "860975"} <= rxcuis
    appts = shared(pop, CONN, "appointments")
    assert {"booked", "fulfilled", "cancelled", "noshow"} <= {a.status for a in appts}
    assert all(a.start_at > pop.now for a in appts if a.status == "booked")
    docs = shared(pop, CONN, "documents")
    assert {d.content_type for d in docs} == {"text/plain", "application/xml"}
    for d in docs:
        assert d.type.system == LOINC
        if d.kind == "cda":
            root = ET.fromstring(d.content)
            assert root.tag == "{urn:hl7-org:v3}ClinicalDocument"
            assert root.find("{urn:hl7-org:v3}code").get("code") == d.type.code
        else:
            assert d.content.decode().startswith(d.title.upper())
    network = shared(pop, "carequality-network", "documents")
    assert network and all(d.kind == "cda" and d.visit_number is None for d in network)


# ---------------------------------------------------------------- advance


_VISIT_TO_APPOINTMENT = {
    "planned": "booked",
    "arrived": "arrived",
    "in-progress": "arrived",
    "finished": "fulfilled",
    "cancelled": "cancelled",
    "entered-in-error": "entered-in-error",
}


def _assert_visits_are_booked(store: SyntheticPopulation, conn: str, *, moved: bool = False) -> None:
    """Every outpatient / virtual visit fulfils an appointment (same number, patient, start,
    length and a status its visit explains), and every finished stay booked a clinic follow-up
    3-14 days after discharge (``moved``: or later, once ``advance`` may have rescheduled it)."""
    encounters = everything(store, conn, "encounters")
    appointments = everything(store, conn, "appointments")
    by_number = {a.visit_number: a for a in appointments}
    assert len(by_number) == len(appointments)
    visits = [e for e in encounters if e.class_code in ("AMB", "VR")]
    assert visits
    for e in visits:
        a = by_number[e.visit_number]
        assert (a.id, a.patient, a.start_at) == (e.appointment_id, e.patient, e.start_at)
        assert a.status == _VISIT_TO_APPOINTMENT[e.status], (e.status, a.status)
        if e.end_at is not None and not moved:  # booked for as long as the visit then took
            length = -(-int((e.end_at - e.start_at).total_seconds()) // 60)
            assert a.duration_minutes == max(5, length)
        assert a.provider == e.attending and a.location == e.location
        assert store.find_by_business_id(conn, "appointments", e.visit_number) == a
        assert store.find_by_business_id(conn, "encounters", e.visit_number) == e
    assert all(e.appointment_id is None for e in encounters if e.class_code not in ("AMB", "VR"))
    follow_ups = defaultdict(list)
    for a in appointments:
        if a.type is not None and a.type.code == "FOLLOWUP" and a.visit_number.startswith("2"):
            follow_ups[a.patient.patient_id].append(a.start_at)
    stays = [e for e in encounters if e.class_code in ("IMP", "OBSENC", "EMER") and e.status == "finished"]
    assert stays
    latest = timedelta(days=14, minutes=5)
    for e in stays:
        assert e.end_at is not None
        gaps = [t - e.end_at for t in follow_ups[e.patient.patient_id]]
        assert any(timedelta(days=3) <= g and (moved or g <= latest) for g in gaps), "no follow-up booked"


def test_visits_fulfil_appointments_and_discharges_book_follow_ups(pop: SyntheticPopulation) -> None:
    for conn in ("northwind-fhir", "lakeside-dm", CONN):
        _assert_visits_are_booked(pop, conn)
    # The link is on the FHIR surface too: Encounter.appointment names the Appointment.
    from sandbox.fhir.render import render_encounter

    spec = pop._config.connection(CONN)
    visit = next(e for e in shared(pop, CONN, "encounters") if e.appointment_id)
    assert render_encounter(visit, spec)["appointment"] == [
        {"reference": f"Appointment/{visit.appointment_id}"}
    ]


def test_advance_keeps_bookings_in_step_with_their_visits() -> None:
    pop = SyntheticPopulation(SandboxConfig(seed=5, patients=250))
    changes = []
    for _ in range(4):
        changes += pop.advance(2, 0.06)
    _assert_visits_are_booked(pop, CONN, moved=True)
    followed = [
        c
        for c in changes
        if c.entity == "appointments" and c.kind != "new" and c.previous_status == "arrived"
    ]
    assert any(c.record.status == "fulfilled" for c in followed)
    assert any(
        c.entity == "appointments" and c.kind == "new" and c.record.start_at <= pop.now for c in changes
    )


@pytest.mark.parametrize(("patients", "seed"), [(300, 37), (300, 41), (1000, 42)])
def test_patient_free_queries_find_every_recently_active_patient(patients: int, seed: int) -> None:
    """What a client can learn without a roster (REDOX-REFERENCE "Decisions"): Data Model
    Scheduling.Booked over [now-30d, now+90d] plus the census; FHIR adds Encounter by date. Each
    finds every patient the truth calls active since now-30d."""
    store = SyntheticPopulation(SandboxConfig(seed=seed, patients=patients))
    since, horizon = store.now - timedelta(days=30), store.now + timedelta(days=90)
    for spec in store._config.connections:
        if spec.kind != "ehr":
            continue

        def who(entity: str, conn: str = spec.id, **window) -> set[str]:
            return {r.patient.patient_id for r in store.iter(Query(conn, entity, **window))}

        census = {
            e.patient.patient_id
            for e in store.iter(Query(spec.id, "encounters"))
            if e.status in ("arrived", "in-progress")
        }
        booked = who("appointments", date_ge=since, date_lt=horizon)
        found = (
            booked | census
            if spec.surfaces == ("datamodel",)
            else booked | census | who("encounters", date_ge=since)
        )
        active = who("encounters", date_ge=since) | who("appointments", date_ge=since)
        assert len(active) == store.active_patients(spec.id, since)
        assert active <= found, (spec.id, len(active - found))


def test_advance_creates_updates_and_cancels_in_time_order() -> None:
    pop = SyntheticPopulation(SandboxConfig(seed=3, patients=300))
    before_counts, start = pop.counts(), pop.now
    before = {e: {r.id: r for r in everything(pop, CONN, e)} for e in ENTITIES}
    changes = pop.advance(2, 0.05)
    assert pop.now == start + timedelta(days=2)
    assert [c.record.last_updated for c in changes] == sorted(c.record.last_updated for c in changes)
    assert all(start < c.record.last_updated <= pop.now for c in changes)
    kinds = Counter(c.kind for c in changes)
    total = sum(sum(v.values()) for v in before_counts.values())
    assert 0.03 * total <= len(changes) <= 0.08 * total
    assert kinds["new"] > 0.3 * len(changes) and kinds["update"] > 0.3 * len(changes) and kinds["cancel"] > 0
    after_counts = pop.counts()
    for spec in pop._config.connections:
        for e in spec.entities:
            new_here = sum(
                1 for c in changes if c.kind == "new" and c.entity == e and c.record.connection_id == spec.id
            )
            assert after_counts[spec.id][e] == before_counts[spec.id][e] + new_here
    for c in changes:
        if c.record.connection_id != CONN:
            continue
        current = pop.get(CONN, c.entity, c.record.id)
        assert current == c.record
        if c.kind == "new":
            assert c.record.id not in before[c.entity] and c.previous_status is None
            continue
        old = before[c.entity][c.record.id]
        assert c.record.version == old.version + 1 and c.record.last_updated > old.last_updated
        assert c.record != replace(old, version=c.record.version, last_updated=c.record.last_updated)
        if c.kind == "cancel":
            assert not is_live(c.record) and is_live(old)
    transitions = {(c.entity, c.previous_status, getattr(c.record, "status", None)) for c in changes}
    assert ("encounters", "in-progress", "finished") in transitions or (
        "results",
        "preliminary",
        "final",
    ) in transitions
    live = pop.counts(live_only=True)
    for spec in pop._config.connections:
        for e in spec.entities:
            records = everything(pop, spec.id, e)
            assert len(records) == after_counts[spec.id][e]
            assert sum(is_live(r) for r in records) == live[spec.id][e]
            keys = [(r.last_updated, r.id) for r in records]
            assert keys == sorted(keys)
    recent = Query(CONN, "results", updated_gt=start)
    assert {r.id for r in pop.iter(recent)} == {
        c.record.id for c in changes if c.entity == "results" and c.record.connection_id == CONN
    }


def test_advance_adds_patients_with_visits_and_keeps_lookups_working() -> None:
    pop = SyntheticPopulation(SandboxConfig(seed=4, patients=200))
    changes = pop.advance(7, 0.1) + pop.advance(3, 0.1)
    new_patients = [c.record for c in changes if c.entity == "patients" and c.kind == "new"]
    assert new_patients
    for p in new_patients:
        conn = p.connection_id
        assert pop.find_patients(conn, identifier=p.mrn, id_type="MR")[0].id == p.id
        assert pop.find_patients(conn, identifier=p.enterprise_id, id_type="EPI")[0].id == p.id
        if "encounters" in pop._config.connection(conn).entities:
            assert pop.count(Query(conn, "encounters", patient_id=p.id)) >= 1
    for c in changes[::25]:
        if c.entity != "patients":
            assert (
                pop.find_by_business_id(c.record.connection_id, c.entity, record_business_id(c.record))
                is not None
            )
    for e in ENTITIES:
        records = everything(pop, CONN, e)
        for q in _filter_queries(pop, e, records):
            assert [r.id for r in pop.iter(q, batch=50)] == [r.id for r in records if matches(r, q)]


def test_readers_never_see_a_half_applied_advance() -> None:
    pop = SyntheticPopulation(SandboxConfig(seed=8, patients=200))
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            snapshot_counts = pop.counts()
            now = pop.now
            n = pop.count(Query(CONN, "results"))
            if n < snapshot_counts[CONN]["results"]:
                problems.append("count went backwards")
            late = pop.page(Query(CONN, "results", updated_gt=now), 0, 5)
            if any(r.last_updated > pop.now for r in late):
                problems.append("record from the future")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(4):
        pop.advance(1, 0.05)
    stop.set()
    for t in threads:
        t.join()
    assert problems == []


def test_advance_rejects_bad_arguments_and_zero_days_changes_nothing(pop: SyntheticPopulation) -> None:
    with pytest.raises(ValueError):
        pop.advance(-1, 0.1)
    with pytest.raises(ValueError):
        pop.advance(1, 1.5)
    counts = pop.counts()
    assert pop.advance(0, 0.5) == [] and pop.counts() == counts


# ---------------------------------------------------------------- StaticPopulation


@pytest.fixture()
def static_and_source() -> tuple[StaticPopulation, SyntheticPopulation]:
    source = SyntheticPopulation(SandboxConfig(seed=21, patients=120))
    conns = [c for c in source._config.connections if c.id in (CONN, "carequality-network")]
    records = {c.id: {e: everything(source, c.id, e) for e in c.entities} for c in conns}
    return StaticPopulation(conns, records, source.now), source


def test_static_population_answers_queries_like_the_synthetic_one(static_and_source) -> None:
    static, source = static_and_source
    assert static.now == source.now
    full = source.counts()
    assert static.counts() == {c: full[c] for c in (CONN, "carequality-network")}
    assert static.counts(live_only=True)[CONN] == source.counts(live_only=True)[CONN]
    for entity in ENTITIES:
        records = everything(source, CONN, entity)
        assert everything(static, CONN, entity) == records
        for q in _filter_queries(source, entity, records):
            assert [r.id for r in static.iter(q, batch=9)] == [r.id for r in source.iter(q)], q
            assert static.count(q) == source.count(q)
        r = records[len(records) // 2]
        assert static.get(CONN, entity, r.id) == r
        if entity != "patients":
            assert static.find_by_business_id(CONN, entity, record_business_id(r)) == r
    p = everything(source, CONN, "patients")[7]
    for id_type, value in (
        ("MR", p.mrn),
        ("EPI", p.enterprise_id),
        (None, p.id),
        ("urn:redox:x:EHRID", p.ehr_id),
    ):
        assert [x.id for x in static.find_patients(CONN, identifier=value, id_type=id_type)] == [p.id]
    assert [x.id for x in static.find_patients(CONN, family=p.family_name, given=p.given_names[0])] == [
        x.id for x in source.find_patients(CONN, family=p.family_name, given=p.given_names[0])
    ]
    people = static.persons()
    assert [g["enterprise_id"] for g in people] == sorted(g["enterprise_id"] for g in people)
    assert sum(len(g["records"]) for g in people) == sum(
        static.counts()[c]["patients"] for c in static.counts()
    )


def test_static_population_advance_updates_cancels_and_clones(static_and_source) -> None:
    static, _ = static_and_source
    before = {e: {r.id: r for r in everything(static, CONN, e)} for e in ENTITIES}
    counts, start = static.counts(), static.now
    returned = static.page(Query(CONN, "results"), 0, 1)[0]
    returned.status = "cancelled"  # callers get copies: mutating one must not change the store
    assert static.get(CONN, "results", returned.id).status != "cancelled" or not is_live(
        before["results"][returned.id]
    )
    changes = static.advance(1, 0.1)
    assert static.now == start + timedelta(days=1)
    assert [c.record.last_updated for c in changes] == sorted(c.record.last_updated for c in changes)
    assert {c.kind for c in changes} == {"new", "update", "cancel"}
    for c in changes:
        if c.record.connection_id != CONN:
            continue
        assert start < c.record.last_updated <= static.now
        assert static.get(CONN, c.entity, c.record.id) == c.record
        if c.kind == "new":
            assert c.record.id not in before[c.entity] and c.record.version == 1
            assert (
                static.find_by_business_id(CONN, c.entity, record_business_id(c.record)) == c.record
                if c.entity != "patients"
                else True
            )
        else:
            old = before[c.entity][c.record.id]
            assert c.record.version == old.version + 1
            if c.kind == "cancel":
                assert (
                    getattr(c.record, "status", "inactive") in DEAD_STATUSES | {"inactive"}
                    or not c.record.active
                )
    after = static.counts()
    for e in ENTITIES:
        new_here = sum(
            1 for c in changes if c.kind == "new" and c.entity == e and c.record.connection_id == CONN
        )
        assert after[CONN][e] == counts[CONN][e] + new_here
        ids = [r.id for r in everything(static, CONN, e)]
        assert len(ids) == len(set(ids))
        business = [record_business_id(r) for r in everything(static, CONN, e)]
        assert e == "patients" or len(business) == len(set(business))


def test_static_population_rejects_inconsistent_input(static_and_source) -> None:
    _, source = static_and_source
    spec = source._config.connection("carequality-network")
    patients = everything(source, CONN, "patients")
    with pytest.raises(StaticPopulationError):
        StaticPopulation([spec], {CONN: {"patients": patients}}, source.now)
    with pytest.raises(StaticPopulationError):
        StaticPopulation([spec], {spec.id: {"encounters": []}}, source.now)
    with pytest.raises(StaticPopulationError):
        StaticPopulation(
            [spec], {spec.id: {"patients": patients}}, source.now
        )  # records of another connection
