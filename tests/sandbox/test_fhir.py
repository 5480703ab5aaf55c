"""The sandbox's FHIR R4 surface: rendering, read/search/paging routes, write-back operations and
the ``--seed-from`` loader, over a small hand-made population in a brute-force in-test store."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.testclient import TestClient

from sandbox.auth import InvalidToken, TokenInfo
from sandbox.config import ConnectionSpec, SandboxConfig
from sandbox.fhir import identifiers as ids
from sandbox.fhir import paging
from sandbox.fhir.operations import (
    APPOINTMENT_CANCEL,
    APPOINTMENT_CREATE,
    APPOINTMENT_LEGACY_WRITE,
    APPOINTMENT_UPDATE,
    NOTIFICATION_EVENTS,
    ORDER_CREATE,
    WriteOperation,
)
from sandbox.fhir.render import (
    RenderCache,
    content_hash,
    format_number,
    render_binary,
    render_notification,
    render_resource,
    resource_type,
)
from sandbox.fhir.routes import routes
from sandbox.fhir.seed_from import load_seed_dir, read_seed_dir
from sandbox.population.query import matches, patient_matches, record_business_id
from sandbox.population.records import (
    ENTITY_RECORD_TYPES,
    LOINC,
    RXNORM,
    SNOMED,
    AppointmentRecord,
    Change,
    Coding,
    DocumentRecord,
    EncounterRecord,
    Location,
    MedicationRecord,
    PatientRecord,
    PatientRef,
    Provider,
    Record,
    ResultRecord,
)
from sandbox.population.store import Query, RecordStore
from sandbox.state import SandboxState

ENTITY_OF = {cls: entity for entity, cls in ENTITY_RECORD_TYPES.items()}
NOW = datetime(2026, 11, 1, tzinfo=UTC)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TOKEN = "Bearer good-token"
AUTH = {"Authorization": TOKEN}
FORM = {"Authorization": TOKEN, "Content-Type": "application/x-www-form-urlencoded"}

CLINIC = ConnectionSpec(
    id="clinic",
    name="Clinic (FHIR)",
    surfaces=("fhir",),
    slug="clinic-health",
    id_types=("MR", "EHRID", "NIST"),
    page_size=7,
    max_page_size=13,
)
LIMITED = ConnectionSpec(
    id="limited",
    name="Limited",
    surfaces=("fhir", "datamodel"),
    entities=("patients",),
    write_entities=(),
    slug="limited-net",
    id_types=("MR",),
)
DM_ONLY = ConnectionSpec(id="dm-only", name="DM only", surfaces=("datamodel",), slug="dm-only")


# --- a tiny store over hand-made records -----------------------------------------------------


class ListStore(RecordStore):
    """Brute-force RecordStore: the Query semantics of ``sandbox.population.query.matches``."""

    def __init__(self, records: Iterable[Record], now: datetime = NOW) -> None:
        self._now = now
        self.tables: dict[tuple[str, str], dict[str, Record]] = {}
        for r in records:
            self.tables.setdefault((r.connection_id, ENTITY_OF[type(r)]), {})[r.id] = r

    @property
    def now(self) -> datetime:
        return self._now

    def _select(self, query: Query) -> list[Record]:
        table = self.tables.get((query.connection_id, query.entity), {})
        return sorted((r for r in table.values() if matches(r, query)), key=lambda r: (r.last_updated, r.id))

    def count(self, query: Query) -> int:
        return len(self._select(query))

    def page(self, query: Query, offset: int, limit: int) -> list[Record]:
        return self._select(query)[max(0, offset) : max(0, offset) + limit]

    def get(self, connection_id: str, entity: str, record_id: str) -> Record | None:
        return self.tables.get((connection_id, entity), {}).get(record_id)

    def find_patients(
        self, connection_id, *, identifier=None, id_type=None, family=None, given=None, birth_date=None
    ):
        table = self.tables.get((connection_id, "patients"), {})
        return [
            p
            for p in table.values()
            if patient_matches(
                p, identifier=identifier, id_type=id_type, family=family, given=given, birth_date=birth_date
            )
        ]

    def find_by_business_id(self, connection_id: str, entity: str, business_id: str) -> Record | None:
        table = self.tables.get((connection_id, entity), {})
        return next((r for r in table.values() if record_business_id(r) == business_id), None)

    def touch(self, connection_id: str, entity: str, record_id: str, when: datetime) -> None:
        """An update as the population makes it: new lastUpdated, version + 1."""
        record = self.tables[(connection_id, entity)][record_id]
        self.tables[(connection_id, entity)][record_id] = dataclasses.replace(
            record, last_updated=when, version=record.version + 1
        )

    def advance(self, days: float, change_fraction: float) -> list[Change]:
        self._now += timedelta(days=days)
        return []  # the hand-made population never changes on its own; tests call touch()

    def counts(self, live_only: bool = False) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (conn, entity), table in self.tables.items():
            out.setdefault(conn, {})[entity] = len(table)
        return out

    def persons(self) -> list[dict]:
        by_person: dict[str, list[dict]] = {}
        for (conn, entity), table in self.tables.items():
            if entity == "patients":
                for p in table.values():
                    by_person.setdefault(p.enterprise_id, []).append(
                        {"connection_id": conn, "patient_id": p.id, "mrn": p.mrn}
                    )
        return [{"enterprise_id": k, "records": v} for k, v in sorted(by_person.items())]


class FakeAuth:
    def check_bearer(self, authorization_header: str | None, surface: str) -> TokenInfo:
        if authorization_header != TOKEN:
            raise InvalidToken("unknown access token")
        return TokenInfo(client_id="test-client", kind="oauth", expires_at=2e9, scope=None)


class FakeFaults:
    def __init__(self) -> None:
        self.on: set[str] = set()
        self.mangled = 0
        self.refusals: dict[str, str] = {}  # business id -> the EHR's reason to refuse its writes

    async def gate(self, conn: ConnectionSpec, request: Request) -> Response | None:
        return None

    def mangle(self, connection_id: str, body: bytes) -> bytes:
        self.mangled += 1
        return body

    def roll(self, connection_id: str, name: str) -> bool:
        return name in self.on

    async def stall(self, conn: ConnectionSpec, request: Request) -> Response:
        return Response(b'{"resourceType":"OperationOutcome"}', status_code=504)

    def write_refusal(self, connection_id: str, kind: str, business_id: str) -> str | None:
        return self.refusals.get(business_id)


# --- hand-made records -----------------------------------------------------------------------

PROVIDERS = (
    Provider("1234567893", "Ada", "Osei", ("MD",)),
    Provider("1679576722", "Lin", "Park", ("NP", "RN")),
)
LOCATIONS = (
    Location("Riverbend Main", "Cardiology", "12", "A", "Inpatient"),
    Location("Riverbend East", "Family Medicine", None, None, "Clinic"),
)
LABS = (
    (Coding(LOINC, "2345-7", "Glucose"), "mg/dL", 70.0, 99.0),
    (Coding(LOINC, "718-7", "Hemoglobin"), "g/dL", 12.0, 17.5),
    (Coding(LOINC, "8867-4", "Heart rate"), "/min", 60.0, 100.0),
)
PANEL = Coding(LOINC, "24323-8", "Comprehensive metabolic panel")
DRUGS = (
    Coding(RXNORM, "860975", "metformin 500 MG Oral Tablet"),
    Coding(RXNORM, "197361", "amlodipine 5 MG"),
)


def make_records(connection_id: str, patients: int = 12, seed: int = 3) -> list[Record]:
    """A small deterministic population; many records share a lastUpdated so paging meets ties."""
    rng = random.Random(seed)
    ticks = [T0 + timedelta(hours=h) for h in range(0, 4000, 97)]
    out: list[Record] = []
    for i in range(patients):
        pid = f"pat-{connection_id}-{i:03d}"
        mrn = f"MRN{i:05d}"
        out.append(
            PatientRecord(
                connection_id=connection_id,
                id=pid,
                last_updated=rng.choice(ticks),
                version=rng.randint(1, 3),
                person_index=i,
                mrn=mrn,
                ehr_id=f"ehr-{i:04d}",
                enterprise_id=f"epi-{i:04d}",
                nist_id=f"nist{i:04d}" if i % 3 else None,
                family_name=("Green", "Bixby", "Nakamura", "Okafor")[i % 4],
                given_names=("Keva",) if i % 2 else ("Timothy", "Jo"),
                birth_date=date(1950 + i, 1 + i % 12, 1 + i % 27),
                sex=("female", "male", "other", "unknown")[i % 4],
                race=("White", "Asian", "Other Race", None)[i % 4],
                ethnicity=("Not Hispanic or Latino", "Hispanic or Latino", None)[i % 3],
                language=("en", "es", None)[i % 3],
                address_line=f"{100 + i} Main St" if i % 5 else None,
                city=("Madison", "Verona")[i % 2],
                state="WI",
                postal_code=f"5370{i % 10}",
                county="Dane" if i % 2 else None,
                phone_home=f"+1608555{i:04d}" if i % 2 else None,
                phone_mobile=f"+1608777{i:04d}",
                email=f"person{i}@example.org" if i % 3 else None,
                ssn=f"999-00-{i:04d}" if i % 4 else None,
                marital_status=("Married", "Single", "Separated", None)[i % 4],
                deceased_at=T0 + timedelta(days=i) if i == 5 else None,
                is_test=i == 7,
                active=i != 4,
            )
        )
        ref = PatientRef(pid, mrn)
        for e in range(2):
            vn = f"VN{i:03d}{e}"
            start = T0 + timedelta(days=rng.randint(0, 200), hours=rng.randint(0, 23))
            status = ("finished", "in-progress", "cancelled", "planned", "arrived", "entered-in-error")[
                (i + e) % 6
            ]
            out.append(
                EncounterRecord(
                    connection_id=connection_id,
                    id=f"enc-{i:03d}-{e}",
                    last_updated=rng.choice(ticks),
                    version=1,
                    patient=ref,
                    visit_number=vn,
                    account_number=f"AN{i:03d}{e}" if e == 0 else None,
                    status=status,
                    class_code=("AMB", "IMP", "EMER", "OBSENC", "VR", "HH")[(i + e) % 6],
                    type=Coding(SNOMED, "185349003", "Encounter for check up"),
                    start_at=start,
                    end_at=start + timedelta(hours=2) if status == "finished" else None,
                    location=LOCATIONS[e % 2],
                    attending=PROVIDERS[i % 2],
                    reason=Coding("http://hl7.org/fhir/sid/icd-10-cm", "E11.9", "Type 2 diabetes")
                    if e
                    else None,
                    discharge_disposition=Coding(ids.DISCHARGE_DISPOSITION, "home", "Home")
                    if e == 0
                    else None,
                )
            )
            for k, (code, unit, low, high) in enumerate(LABS):
                value_type = ("Numeric", "Numeric", "String", "Coded Entry")[(i + e + k) % 4]
                value = round(rng.uniform(low * 0.6, high * 1.3), 1)
                flag = "H" if value > high else "L" if value < low else "N"
                order_id = f"ORD{i:03d}{e}"
                out.append(
                    ResultRecord(
                        connection_id=connection_id,
                        id=f"obs-{i:03d}-{e}-{k}",
                        last_updated=rng.choice(ticks[:8]),  # many ties
                        version=1,
                        patient=ref,
                        visit_number=vn if k else None,
                        order_id=order_id,
                        result_id=f"{order_id}-{code.code}",
                        category="vital-signs" if code.code == "8867-4" else "laboratory",
                        panel=PANEL,
                        code=code,
                        value_type=value_type,
                        value_numeric=value if value_type == "Numeric" else None,
                        value_text=format_number(value)
                        if value_type == "Numeric"
                        else ("Positive", "trace")[k % 2],
                        unit=unit if value_type == "Numeric" else None,
                        reference_low=low if value_type == "Numeric" else None,
                        reference_high=high if value_type == "Numeric" else None,
                        reference_text=f"{format_number(low)}-{format_number(high)}" if k == 0 else None,
                        abnormal_flag=(flag if value_type == "Numeric" else ("A", None)[k % 2]),
                        status=("final", "preliminary", "corrected", "cancelled", "entered-in-error")[
                            (i + k) % 5
                        ],
                        effective_at=start + timedelta(minutes=30 + k),
                        issued_at=start + timedelta(hours=3) if k != 1 else None,
                        performer=PROVIDERS[k % 2] if k != 2 else None,
                        producer="Riverbend Lab" if k != 1 else None,
                    )
                )
        for m in range(2):
            kind = ("request", "statement")[(i + m) % 2]
            start = T0 + timedelta(days=rng.randint(0, 300))
            out.append(
                MedicationRecord(
                    connection_id=connection_id,
                    id=f"med-{i:03d}-{m}",
                    last_updated=rng.choice(ticks),
                    version=1,
                    patient=ref,
                    visit_number=f"VN{i:03d}0" if m == 0 else None,
                    order_id=f"RX{i:03d}{m}",
                    kind=kind,
                    status=("active", "completed", "stopped", "on-hold", "cancelled", "entered-in-error")[
                        (i + m) % 6
                    ],
                    intent=("order", "plan")[i % 2] if kind == "request" else None,
                    code=DRUGS[m],
                    dose_quantity=500.0 if m == 0 else 1.5,
                    dose_unit="mg" if m == 0 else "tablet",
                    route=Coding(SNOMED, "26643006", "Oral route") if m == 0 else None,
                    frequency_period=12.0 if m == 0 else None,
                    frequency_unit="h" if m == 0 else None,
                    start_at=start,
                    end_at=start + timedelta(days=30) if i % 2 else None,
                    prescriber=PROVIDERS[m] if i % 3 else None,
                )
            )
        for a in range(2):
            status = ("booked", "cancelled", "fulfilled", "noshow", "proposed", "arrived")[(i + a) % 6]
            out.append(
                AppointmentRecord(
                    connection_id=connection_id,
                    id=f"apt-{i:03d}-{a}",
                    last_updated=rng.choice(ticks),
                    version=1,
                    patient=ref,
                    visit_number=f"SCH{i:03d}{a}",
                    status=status,
                    start_at=NOW + timedelta(days=rng.randint(-100, 100), hours=9),
                    duration_minutes=(15, 30, 45)[a % 3],
                    type=Coding("urn:redox:appointment-type", "FU", "Follow up"),
                    reason="Follow up" if a == 0 else None,
                    provider=PROVIDERS[a % 2],
                    location=LOCATIONS[a % 2],
                    cancel_reason="Patient request" if status == "cancelled" else None,
                    rescheduled_from=f"SCH{i:03d}9" if a == 1 and i % 2 else None,
                )
            )
        kind = ("note", "cda")[i % 2]
        content = (
            f"Progress note {i}: stable.".encode()
            if kind == "note"
            else f"<ClinicalDocument><id root='{i}'/></ClinicalDocument>".encode()
        )
        out.append(
            DocumentRecord(
                connection_id=connection_id,
                id=f"doc-{i:03d}",
                last_updated=rng.choice(ticks),
                version=1,
                patient=ref,
                visit_number=f"VN{i:03d}0" if i % 2 else None,
                document_id=f"DOC{i:04d}",
                kind=kind,
                type=Coding(LOINC, "11506-3", "Progress note")
                if kind == "note"
                else Coding(LOINC, "34133-9", "Summary"),
                title="Progress note" if kind == "note" else "Summary of episode note",
                status=("current", "superseded", "entered-in-error")[i % 3],
                authored_at=T0 + timedelta(days=i),
                author=PROVIDERS[i % 2],
                content_type="text/plain" if kind == "note" else "application/xml",
                content=content,
            )
        )
    return out


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def store() -> ListStore:
    return ListStore(make_records("clinic") + make_records("limited", patients=4, seed=9))


@pytest.fixture
def state(store: ListStore) -> SandboxState:
    config = SandboxConfig(connections=[CLINIC, LIMITED, DM_ONLY], patients=12)
    return SandboxState(config=config, store=store, auth=FakeAuth(), faults=FakeFaults(), webhooks=None)


@pytest.fixture
def client(state: SandboxState) -> TestClient:
    return TestClient(Starlette(routes=routes(state)), base_url="http://sandbox.test")


@pytest.fixture
def open_client(state: SandboxState) -> TestClient:
    """The same sandbox with ``search_policy: open`` (not Redox): for tests about filter and paging
    mechanics that need a search wider than one patient."""
    state.config = dataclasses.replace(state.config, search_policy="open")
    return TestClient(Starlette(routes=routes(state)), base_url="http://sandbox.test")


BASE = "/fhir/R4/clinic-health/Development"


def records_of(store: ListStore, entity: str, conn: str = "clinic") -> list[Record]:
    return sorted(store.tables[(conn, entity)].values(), key=lambda r: (r.last_updated, r.id))


def search(client: TestClient, rtype: str, params: dict | list, base: str = BASE) -> Any:
    r = client.post(f"{base}/{rtype}/_search", content=urlencode(params), headers=FORM)
    assert r.status_code == 200, r.text
    return r.json()


def search_all(
    client: TestClient, rtype: str, params: dict | list, follow: str = "POST"
) -> tuple[list[dict], list]:
    """Every resource of a search, following next links; also the totals each page reported."""
    bundle = search(client, rtype, params)
    resources, totals = [], []
    while True:
        totals.append(bundle["total"])
        resources += [e["resource"] for e in bundle.get("entry", [])]
        nxt = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        if nxt is None:
            return resources, totals
        r = client.post(nxt, headers=AUTH) if follow == "POST" else client.get(nxt, headers=AUTH)
        assert r.status_code == 200, r.text
        bundle = r.json()


def validate(resource: dict) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


# --- rendering -------------------------------------------------------------------------------


def test_every_rendered_resource_validates_with_fhir_resources_r4b(store: ListStore) -> None:
    seen_types = set()
    for (conn_id, _), table in store.tables.items():
        conn = CLINIC if conn_id == "clinic" else LIMITED
        for record in table.values():
            resource = render_resource(record, conn)
            validate(resource)
            seen_types.add(resource["resourceType"])
            assert resource["meta"]["versionId"] == str(record.version)
            assert resource["meta"]["lastUpdated"].endswith("Z")
            if isinstance(record, DocumentRecord):
                validate(render_binary(record))
            for kind in ("new", "update", "cancel"):
                bundle = render_notification(
                    Change(ENTITY_OF[type(record)], kind, record), conn, "https://x.test/b"
                )
                validate(bundle)
    assert seen_types == {
        "Patient",
        "Encounter",
        "Observation",
        "MedicationRequest",
        "MedicationStatement",
        "Appointment",
        "DocumentReference",
    }


def test_observation_carries_ucum_quantity_range_interpretation_and_logical_references(
    store: ListStore,
) -> None:
    numeric = next(r for r in records_of(store, "results") if r.value_type == "Numeric" and r.visit_number)
    obs = render_resource(numeric, CLINIC)
    assert obs["valueQuantity"] == {
        "value": numeric.value_numeric,
        "unit": numeric.unit,
        "system": "http://unitsofmeasure.org",
        "code": numeric.unit,
    }
    assert obs["referenceRange"][0]["low"]["value"] == numeric.reference_low
    assert obs["interpretation"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
        "code": numeric.abnormal_flag,
        "display": {"H": "High", "L": "Low", "N": "Normal"}[numeric.abnormal_flag],
    }
    assert obs["identifier"] == [{"system": "urn:redox:clinic-health:ResultID", "value": numeric.result_id}]
    assert obs["basedOn"][0]["identifier"] == {
        "system": "urn:redox:clinic-health:OrderID",
        "value": numeric.order_id,
    }
    assert obs["encounter"]["identifier"] == {
        "system": "urn:redox:clinic-health:VN",
        "value": numeric.visit_number,
    }
    assert obs["subject"]["reference"] == f"Patient/{numeric.patient.patient_id}"
    assert obs["category"][0]["coding"][0]["code"] == numeric.category


def test_patient_identifiers_follow_connection_id_types_and_share_the_enterprise_system(
    store: ListStore,
) -> None:
    record = next(p for p in records_of(store, "patients") if p.nist_id and p.ssn)
    systems = {i["system"]: i["value"] for i in render_resource(record, CLINIC)["identifier"]}
    assert systems == {
        "urn:redox:clinic-health:MR": record.mrn,
        "urn:redox:clinic-health:EHRID": record.ehr_id,
        "urn:redox:clinic-health:NIST": record.nist_id,
        "urn:redox:enterprise:EPI": record.enterprise_id,
        "http://hl7.org/fhir/sid/us-ssn": record.ssn,
    }
    limited = {i["system"] for i in render_resource(record, LIMITED)["identifier"]}
    assert limited == {
        "urn:redox:limited-net:MR",
        "urn:redox:enterprise:EPI",
        "http://hl7.org/fhir/sid/us-ssn",
    }


def test_statuses_map_to_fhir_value_sets(store: ListStore) -> None:
    for record in records_of(store, "medications"):
        rendered = render_resource(record, CLINIC)
        if record.kind == "statement" and record.status == "cancelled":
            assert rendered["status"] == "not-taken"
        else:
            assert rendered["status"] == record.status
    cancelled = next(a for a in records_of(store, "appointments") if a.status == "cancelled")
    apt = render_resource(cancelled, CLINIC)
    assert apt["cancelationReason"] == {"text": cancelled.cancel_reason}
    assert apt["identifier"][0] == {
        "use": "official",
        "system": "urn:redox:clinic-health:VN",
        "value": cancelled.visit_number,
    }
    actors = [p["actor"].get("type") for p in apt["participant"]]
    assert actors == ["Patient", "Practitioner", "Location"]


def test_document_reference_points_at_binary_with_size_and_sha1_hash(store: ListStore) -> None:
    doc = records_of(store, "documents")[0]
    attachment = render_resource(doc, CLINIC)["content"][0]["attachment"]
    assert attachment["url"] == f"Binary/{doc.id}"
    assert attachment["size"] == len(doc.content)
    assert (
        attachment["hash"]
        == base64.b64encode(hashlib.sha1(doc.content).digest()).decode()
        == content_hash(doc.content)
    )
    assert attachment["contentType"] == doc.content_type


def test_notification_is_a_message_bundle_with_redox_event_coding(store: ListStore) -> None:
    apt = records_of(store, "appointments")[0]
    bundle = render_notification(
        Change("appointments", "new", apt), CLINIC, "https://sb.test/fhir/R4/clinic-health/Development"
    )
    header = bundle["entry"][0]["resource"]
    assert bundle["type"] == "message"
    assert header["eventCoding"]["system"] == "urn:redox:event-type"
    expected = (
        "Scheduling-event-appointment-rescheduled"
        if apt.rescheduled_from
        else NOTIFICATION_EVENTS[("appointments", "new")]
    )
    assert header["eventCoding"]["code"] == expected
    assert header["focus"] == [{"reference": bundle["entry"][1]["fullUrl"]}]
    assert bundle["entry"][1]["fullUrl"].endswith(f"/Appointment/{apt.id}")
    patient = records_of(store, "patients")[0]
    updated = render_notification(Change("patients", "update", patient), CLINIC)
    assert updated["entry"][0]["resource"]["eventCoding"]["code"] == "PatientAdmin-patient-updated"
    assert updated["entry"][1]["fullUrl"].startswith("urn:uuid:")


def test_render_cache_serves_the_same_bytes_and_renders_new_versions(store: ListStore) -> None:
    cache = RenderCache(max_entries=3)
    patient = records_of(store, "patients")[0]
    first = cache.resource_bytes(patient, CLINIC)
    assert cache.resource_bytes(patient, CLINIC) is first
    bumped = dataclasses.replace(patient, version=patient.version + 1, last_updated=NOW)
    assert orjson.loads(cache.resource_bytes(bumped, CLINIC))["meta"]["versionId"] == str(patient.version + 1)
    for other in records_of(store, "patients")[1:6]:
        cache.resource_bytes(other, CLINIC)
    assert len(cache) == 3


# --- auth, routing, entitlements -------------------------------------------------------------


def test_bad_or_missing_token_is_401_operation_outcome(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = client.get(f"{BASE}/Patient/pat-clinic-000", headers=headers)
        assert r.status_code == 401
        assert r.json()["resourceType"] == "OperationOutcome"
        assert r.json()["issue"][0]["code"] == "login"


def test_unknown_slug_wrong_environment_and_data_model_only_connection_are_404(client: TestClient) -> None:
    for path in (
        "/fhir/R4/nowhere/Development/Patient/x",
        "/fhir/R4/clinic-health/Production/Patient/pat-clinic-000",
        "/fhir/R4/dm-only/Development/Patient/x",
    ):
        r = client.get(path, headers=AUTH)
        assert r.status_code == 404
        assert r.json()["resourceType"] == "OperationOutcome"


def test_resource_outside_the_connection_entitlements_is_403(client: TestClient, store: ListStore) -> None:
    base = "/fhir/R4/limited-net/Development"
    r = client.post(f"{base}/Observation/_search", data={"_lastUpdated": "ge2000-01-01"}, headers=FORM)
    assert r.status_code == 403
    assert r.json()["issue"][0]["code"] == "forbidden"
    assert client.get(f"{base}/Encounter/enc-000-0", headers=AUTH).status_code == 403
    limited_ids = ",".join(p.id for p in records_of(store, "patients", "limited"))
    assert search(client, "Patient", {"_id": limited_ids}, base)["total"] == 4


# --- read ------------------------------------------------------------------------------------


def test_read_returns_the_rendered_resource(client: TestClient, store: ListStore) -> None:
    for entity in ("patients", "encounters", "results", "medications", "appointments", "documents"):
        record = records_of(store, entity)[3]
        rtype = resource_type(record)
        r = client.get(f"{BASE}/{rtype}/{record.id}", headers=AUTH)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/fhir+json")
        assert r.headers["etag"] == f'W/"{record.version}"'
        assert r.json() == render_resource(record, CLINIC)


def test_read_of_missing_or_wrong_type_is_404(client: TestClient, store: ListStore) -> None:
    assert client.get(f"{BASE}/Patient/no-such-id", headers=AUTH).status_code == 404
    statement = next(m for m in records_of(store, "medications") if m.kind == "statement")
    r = client.get(f"{BASE}/MedicationRequest/{statement.id}", headers=AUTH)
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    assert client.get(f"{BASE}/Practitioner/x", headers=AUTH).status_code == 404


def test_binary_is_raw_content_or_json_by_accept(client: TestClient, store: ListStore) -> None:
    doc = records_of(store, "documents")[1]
    raw = client.get(f"{BASE}/Binary/{doc.id}", headers={**AUTH, "Accept": "*/*"})
    assert raw.status_code == 200
    assert raw.content == doc.content
    assert raw.headers["content-type"].startswith(doc.content_type)
    js = client.get(f"{BASE}/Binary/{doc.id}", headers={**AUTH, "Accept": "application/fhir+json"}).json()
    assert js["resourceType"] == "Binary" and base64.b64decode(js["data"]) == doc.content
    validate(js)


# --- search ----------------------------------------------------------------------------------


def ids_of(resources: list[dict]) -> list[str]:
    return [r["id"] for r in resources]


def test_get_search_is_405_saying_search_must_be_post(client: TestClient) -> None:
    for url in (f"{BASE}/Patient", f"{BASE}/Patient/_search", f"{BASE}/Patient?identifier=x"):
        r = client.get(url, headers=AUTH)
        assert r.status_code == 405
        assert "POST" in r.json()["issue"][0]["diagnostics"]


def test_search_values_in_the_url_are_refused(client: TestClient) -> None:
    r = client.post(f"{BASE}/Patient/_search?family=Green", headers=FORM)
    assert r.status_code == 400


def test_unknown_parameter_is_400_naming_it(client: TestClient) -> None:
    r = client.post(f"{BASE}/Observation/_search", data={"flavour": "x"}, headers=FORM)
    assert r.status_code == 400
    assert "'flavour'" in r.json()["issue"][0]["diagnostics"]


def test_required_parameter_sets_are_enforced_and_lastupdated_never_satisfies_one(
    client: TestClient, store: ListStore
) -> None:
    p = records_of(store, "patients")[0]
    refused = (
        ("Patient", {"gender": "male"}),
        ("Patient", {"gender": "male", "_lastUpdated": "ge2000-01-01"}),
        ("Patient", {"_count": "5"}),
        ("Patient", {"given": p.given_names[0], "family": p.family_name}),  # birthdate missing
        ("MedicationRequest", {"status": "active"}),
        ("MedicationRequest", {"status": "active", "date": "ge2000"}),
        ("MedicationStatement", {"_lastUpdated": "ge2000"}),
        ("Observation", {}),
        ("Observation", {"category": "laboratory", "date": "ge2000"}),
        ("DocumentReference", {"_lastUpdated": "ge2000", "_count": "5"}),
        ("Appointment", {"status": "booked"}),
        ("Encounter", {"_lastUpdated": "ge2000"}),
        ("Encounter", {"patient": ""}),  # a blank value is not a sent parameter
    )
    for rtype, params in refused:
        r = client.post(f"{BASE}/{rtype}/_search", data=params, headers=FORM)
        assert r.status_code == 400, (rtype, params)
        issue = r.json()["issue"][0]
        assert issue["code"] == "required"
        assert rtype in issue["diagnostics"] and "_id" in issue["diagnostics"]
        assert all(v not in issue["diagnostics"] for v in params.values() if len(v) > 3)
    diagnostics = client.post(f"{BASE}/Patient/_search", data={}, headers=FORM).json()["issue"][0]
    assert "_id | identifier | given+family+birthdate" in diagnostics["diagnostics"]
    accepted = (
        ("Encounter", {"date": "ge2026-01-01"}),
        ("Encounter", {"status": "finished"}),
        ("Appointment", {"date": "ge2026-01-01"}),
        ("Observation", {"subject": f"Patient/{p.id}", "_lastUpdated": "ge2000"}),
        ("MedicationStatement", {"patient.identifier": f"urn:redox:clinic-health:MR|{p.mrn}"}),
        ("DocumentReference", {"patient": p.id}),
        ("Patient", {"given": p.given_names[0], "family": p.family_name, "birthdate": str(p.birth_date)}),
    )
    for rtype, params in accepted:
        assert client.post(f"{BASE}/{rtype}/_search", data=params, headers=FORM).status_code == 200, rtype


def test_open_policy_keeps_the_permissive_rules_for_benchmarks(
    open_client: TestClient, store: ListStore
) -> None:
    client = open_client
    for rtype, params in (("Patient", {"gender": "male"}), ("MedicationRequest", {"status": "active"})):
        r = client.post(f"{BASE}/{rtype}/_search", data=params, headers=FORM)
        assert r.status_code == 400, rtype
        assert r.json()["issue"][0]["code"] == "required"
    assert search(client, "Patient", {"gender": "male", "_lastUpdated": "ge2000-01-01"})["total"] == 3
    assert search(client, "MedicationRequest", {"status": "active", "date": "ge2000"})["total"] >= 0
    assert search(client, "Observation", {})["total"] == len(records_of(store, "results"))


def test_search_by_id_identifier_and_patient(client: TestClient, store: ListStore) -> None:
    patients = records_of(store, "patients")
    p = next(x for x in patients if x.nist_id)
    assert ids_of(search_all(client, "Patient", {"_id": p.id})[0]) == [p.id]
    by_system = search_all(client, "Patient", {"identifier": f"urn:redox:clinic-health:MR|{p.mrn}"})[0]
    assert ids_of(by_system) == [p.id]
    assert ids_of(search_all(client, "Patient", {"identifier": p.nist_id})[0]) == [p.id]
    assert ids_of(
        search_all(client, "Patient", {"identifier": f"urn:redox:enterprise:EPI|{p.enterprise_id}"})[0]
    ) == [p.id]
    assert search(client, "Patient", {"identifier": f"urn:redox:other-slug:MR|{p.mrn}"})["total"] == 0
    assert search(client, "Patient", {"identifier": p.id})["total"] == 0  # a logical id is not an identifier

    mine = [r for r in records_of(store, "results") if r.patient.patient_id == p.id]
    for params in (
        {"patient": f"Patient/{p.id}"},
        {"patient": p.id},
        {"patient.identifier": f"urn:redox:clinic-health:MR|{p.mrn}"},
    ):
        assert ids_of(search_all(client, "Observation", params)[0]) == [r.id for r in mine]
    enc = records_of(store, "encounters")[0]
    assert ids_of(
        search_all(client, "Encounter", {"identifier": f"urn:redox:clinic-health:VN|{enc.visit_number}"})[0]
    ) == [enc.id]
    with_account = next(e for e in records_of(store, "encounters") if e.account_number)
    assert ids_of(
        search_all(
            client, "Encounter", {"identifier": f"urn:redox:clinic-health:AN|{with_account.account_number}"}
        )[0]
    ) == [with_account.id]
    obs = records_of(store, "results")[5]
    assert ids_of(
        search_all(
            client, "Observation", {"identifier": f"urn:redox:clinic-health:ResultID|{obs.result_id}"}
        )[0]
    ) == [obs.id]


def test_search_by_dates_with_prefixes_and_repeats(open_client: TestClient, store: ListStore) -> None:
    client = open_client
    params = [("date", "ge2026-02-01"), ("date", "lt2026-04-01")]
    got = ids_of(search_all(client, "Encounter", params)[0])
    lo, hi = datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    assert got == [e.id for e in records_of(store, "encounters") if lo <= e.start_at < hi]
    assert got
    day = records_of(store, "results")[0].effective_at
    on_day = ids_of(search_all(client, "Observation", {"effective": day.date().isoformat()})[0])
    assert on_day == [r.id for r in records_of(store, "results") if r.effective_at.date() == day.date()]
    gt_day = ids_of(search_all(client, "Observation", {"date": f"gt{day.date().isoformat()}"})[0])
    assert gt_day == [r.id for r in records_of(store, "results") if r.effective_at.date() > day.date()]
    stamp = records_of(store, "appointments")[2].start_at
    exact = ids_of(
        search_all(client, "Appointment", {"date": f"le{stamp.isoformat().replace('+00:00', 'Z')}"})[0]
    )
    assert exact == [a.id for a in records_of(store, "appointments") if a.start_at <= stamp]
    r = client.post(f"{BASE}/Encounter/_search", data={"date": "sa2026-01-01"}, headers=FORM)
    assert r.status_code == 400
    assert (
        client.post(f"{BASE}/Encounter/_search", data={"date": "yesterday"}, headers=FORM).status_code == 400
    )


def test_search_by_last_updated_window(open_client: TestClient, store: ListStore) -> None:
    client = open_client
    lo, hi = T0 + timedelta(hours=970), T0 + timedelta(hours=2910)
    params = [("_lastUpdated", "ge" + lo.isoformat()), ("_lastUpdated", "lt" + hi.isoformat())]
    got, totals = search_all(client, "Patient", params)
    expected = [p.id for p in records_of(store, "patients") if lo <= p.last_updated < hi]
    assert ids_of(got) == expected and totals[0] == len(expected)


def test_search_by_status_category_code_intent_and_demographics(
    open_client: TestClient, store: ListStore
) -> None:
    client = open_client
    results = records_of(store, "results")
    got = ids_of(search_all(client, "Observation", {"status": "final,corrected"})[0])
    assert got == [r.id for r in results if r.status in ("final", "corrected")]
    got = ids_of(search_all(client, "Observation", {"category": "vital-signs"})[0])
    assert got == [r.id for r in results if r.category == "vital-signs"]
    got = ids_of(search_all(client, "Observation", {"code": "http://loinc.org|2345-7"})[0])
    assert got == [r.id for r in results if r.code.code == "2345-7"]
    statements = [m for m in records_of(store, "medications") if m.kind == "statement"]
    got = ids_of(
        search_all(client, "MedicationStatement", {"status": "not-taken", "_lastUpdated": "ge2000"})[0]
    )
    assert got == [m.id for m in statements if m.status == "cancelled"]
    requests = [m for m in records_of(store, "medications") if m.kind == "request"]
    got = ids_of(search_all(client, "MedicationRequest", {"intent": "plan", "_lastUpdated": "ge2000"})[0])
    assert got == [m.id for m in requests if m.intent == "plan"] and got
    docs = records_of(store, "documents")
    got = ids_of(search_all(client, "DocumentReference", {"category": "urn:redox:document_kind|CDA"})[0])
    assert got == [d.id for d in docs if d.kind == "cda"]
    p = records_of(store, "patients")[2]
    got = ids_of(
        search_all(
            client,
            "Patient",
            {"given": p.given_names[0], "family": p.family_name, "birthdate": p.birth_date.isoformat()},
        )[0]
    )
    assert got == [p.id]
    got = ids_of(search_all(client, "Patient", {"gender": "female", "_lastUpdated": "ge2000"})[0])
    assert got == [x.id for x in records_of(store, "patients") if x.sex == "female"]
    got = ids_of(search_all(client, "Patient", {"active": "false", "_lastUpdated": "ge2000"})[0])
    assert got == [x.id for x in records_of(store, "patients") if not x.active]
    assert (
        client.post(f"{BASE}/Observation/_search", data={"status": "bogus"}, headers=FORM).status_code == 400
    )


def test_json_body_search_is_accepted(client: TestClient, store: ListStore) -> None:
    p = max(
        records_of(store, "patients"),
        key=lambda x: sum(
            1
            for r in records_of(store, "results")
            if r.patient.patient_id == x.id and r.category == "laboratory"
        ),
    )
    body = {"patient": p.id, "category": "laboratory", "_count": 3}
    r = client.post(f"{BASE}/Observation/_search", json=body, headers=AUTH)
    assert r.status_code == 200
    expected = sum(
        1 for x in records_of(store, "results") if x.category == "laboratory" and x.patient.patient_id == p.id
    )
    assert r.json()["total"] == expected and expected > 3
    assert len(r.json()["entry"]) == 3


@pytest.mark.parametrize("follow", ["POST", "GET"])
@pytest.mark.parametrize(
    ("rtype", "params"),
    [
        ("Observation", {"_count": "4"}),  # many lastUpdated ties
        ("Patient", {"_lastUpdated": "ge2000-01-01", "_count": "5"}),
        ("Observation", {"code": "2345-7,718-7", "_count": "3"}),  # filtered in the FHIR layer
        ("Encounter", {"status": "finished,planned,cancelled", "_count": "2"}),
    ],
)
def test_paging_through_next_links_gives_every_record_exactly_once(
    open_client: TestClient, store: ListStore, rtype: str, params: dict, follow: str
) -> None:
    client = open_client
    got, totals = search_all(client, rtype, params, follow)
    ids = ids_of(got)
    assert len(ids) == len(set(ids))
    assert set(totals) == {len(ids)}
    entity = {"Observation": "results", "Patient": "patients", "Encounter": "encounters"}[rtype]
    all_records = records_of(store, entity)
    if "code" in params:
        expected = [r.id for r in all_records if r.code.code in ("2345-7", "718-7")]
    elif "status" in params:
        expected = [r.id for r in all_records if r.status in ("finished", "planned", "cancelled")]
    else:
        expected = [r.id for r in all_records]
        assert totals[0] == store.count(Query("clinic", entity))
    assert ids == expected  # ordered by (lastUpdated, id)


def test_next_links_carry_only_an_opaque_token(client: TestClient, store: ListStore) -> None:
    p = records_of(store, "patients")[0]
    bundle = search(client, "Observation", {"patient": p.id, "_count": "1"})
    nxt = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    assert nxt.startswith(
        "http://sandbox.test/fhir/R4/clinic-health/Development/Observation/_search?_page_token="
    )
    assert p.id not in nxt
    assert all(
        e["fullUrl"] == f"http://sandbox.test{BASE}/Observation/{e['resource']['id']}"
        for e in bundle["entry"]
    )
    assert all(e["search"] == {"mode": "match"} for e in bundle["entry"])
    assert client.post(f"{BASE}/Observation/_search?_page_token=forged", headers=AUTH).status_code == 410


def next_url(bundle: dict) -> str | None:
    return next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)


def test_paging_survives_records_updated_between_pages(
    open_client: TestClient, store: ListStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records updated mid-paging move to the end; no unchanged record is skipped or repeated."""
    client = open_client
    scans = []
    monkeypatch.setattr(paging, "_locate", lambda *a, _real=paging._locate: scans.append(1) or _real(*a))
    before = [r.id for r in records_of(store, "results")]
    updated_at = {r.id: r.last_updated for r in records_of(store, "results")}
    first_tie_group = sum(1 for r in records_of(store, "results") if r.last_updated == updated_at[before[0]])
    assert first_tie_group + 2 <= CLINIC.max_page_size
    bundle = search(client, "Observation", {"_count": str(first_tie_group + 2)})
    first_page = ids_of([e["resource"] for e in bundle["entry"]])
    # Read already, and outside the cursor's lastUpdated tie group: every later offset shifts.
    earlier = next(i for i in first_page if updated_at[i] < updated_at[first_page[-1]])
    store.touch("clinic", "results", earlier, NOW)
    store.touch("clinic", "results", before[12], NOW + timedelta(seconds=1))  # not read yet
    bundle = client.post(next_url(bundle), headers=AUTH).json()
    second_page = ids_of([e["resource"] for e in bundle["entry"]])
    assert scans == []  # found again through its lastUpdated tie group, without a scan
    store.touch("clinic", "results", second_page[-1], NOW + timedelta(seconds=2))  # the cursor record itself
    seen = first_page + second_page
    while (url := next_url(bundle)) is not None:
        bundle = client.post(url, headers=AUTH).json()
        seen += ids_of([e["resource"] for e in bundle.get("entry", [])])
    assert scans == [1]
    touched = {earlier, second_page[-1], before[12]}
    assert set(before) <= set(seen)
    assert all(seen.count(i) == 1 for i in set(before) - touched)
    assert all(seen.count(i) <= 2 for i in touched)  # an updated record may be served again, as updated


def test_count_defaults_to_page_size_and_is_capped(open_client: TestClient) -> None:
    client = open_client
    assert len(search(client, "Observation", {})["entry"]) == CLINIC.page_size
    assert len(search(client, "Observation", {"_count": "500"})["entry"]) == CLINIC.max_page_size
    zero = search(client, "Observation", {"_count": "0"})
    assert "entry" not in zero and zero["total"] > 0
    assert client.post(f"{BASE}/Observation/_search", data={"_count": "-1"}, headers=FORM).status_code == 400


def test_search_bundles_validate_and_mangle_is_applied(
    client: TestClient, state: SandboxState, store: ListStore
) -> None:
    p = records_of(store, "patients")[0]
    bundle = search(client, "DocumentReference", {"patient": p.id, "_count": "5"})
    validate(bundle)
    assert bundle["type"] == "searchset"
    assert state.faults.mangled >= 1


# --- write-back ------------------------------------------------------------------------------


def order_bundle(order_id: str = "ORD-NEW-1", **changes: Any) -> dict:
    service_request = {
        "resourceType": "ServiceRequest",
        "id": "sr1",
        "identifier": [{"system": "urn:redox:clinic-health:OrderID", "value": order_id}],
        "status": "active",
        "intent": "order",
        "code": {"coding": [{"system": LOINC, "code": "24323-8", "display": "CMP"}]},
        "subject": {"reference": "Patient/pat-clinic-000"},
    }
    service_request.update(changes)
    return {
        "resourceType": "Bundle",
        "type": "message",
        "entry": [
            {
                "fullUrl": "urn:uuid:7b1c3c57-1d6c-4a8e-9b8e-0f4c4a1f0001",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": "mh-1",
                    "eventUri": ORDER_CREATE.event_uri,
                    "source": {"name": "redox-elt", "endpoint": "urn:redox-elt"},
                    "focus": [{"reference": "ServiceRequest/sr1"}],
                },
            },
            {"fullUrl": "urn:uuid:7b1c3c57-1d6c-4a8e-9b8e-0f4c4a1f0002", "resource": service_request},
            {
                "fullUrl": "urn:uuid:7b1c3c57-1d6c-4a8e-9b8e-0f4c4a1f0003",
                "resource": {
                    "resourceType": "Patient",
                    "id": "pat-clinic-000",
                    "identifier": [{"system": "urn:redox:clinic-health:MR", "value": "MRN00000"}],
                },
            },
        ],
    }


def appointment_bundle(visit: str = "SCH-NEW-1", op: WriteOperation = APPOINTMENT_CREATE) -> dict:
    bundle = order_bundle()
    bundle["entry"][0]["resource"]["eventUri"] = op.event_uri
    bundle["entry"][0]["resource"]["focus"] = [{"reference": "urn:uuid:7b1c3c57-1d6c-4a8e-9b8e-0f4c4a1f0002"}]
    bundle["entry"][1]["resource"] = {
        "resourceType": "Appointment",
        "identifier": [{"system": "urn:redox:clinic-health:VN", "value": visit}],
        "status": "booked",
        "start": "2026-12-01T09:00:00Z",
        "end": "2026-12-01T09:30:00Z",
        "participant": [{"actor": {"reference": "Patient/pat-clinic-000"}, "status": "accepted"}],
    }
    return bundle


def test_order_write_back_is_recorded_and_acknowledged(client: TestClient, state: SandboxState) -> None:
    validate(order_bundle())
    r = client.post(f"{BASE}/ServiceRequest/$servicerequest-create", json=order_bundle(), headers=AUTH)
    assert r.status_code == 200, r.text
    ack = r.json()
    validate(ack)
    header = ack["entry"][0]["resource"]
    assert header["response"] == {"identifier": "mh-1", "code": "ok"}
    assert header["eventUri"] == "https://fhir.redoxengine.com/EventDefinition/ServiceRequestCreate"
    [write] = state.writes.writes
    assert (write.kind, write.order_id, write.event, write.surface, write.connection_id) == (
        "orders",
        "ORD-NEW-1",
        "Order-New",
        "fhir",
        "clinic",
    )
    assert write.payload == order_bundle()


def test_every_write_is_recorded_even_with_the_same_idempotency_key(
    client: TestClient, state: SandboxState
) -> None:
    """Redox has no idempotency mechanism: a repeated write is a second write."""
    url = f"{BASE}/ServiceRequest/$servicerequest-create"
    first = client.post(url, json=order_bundle(), headers={**AUTH, "Idempotency-Key": "k1"})
    again = client.post(url, json=order_bundle(), headers={**AUTH, "Idempotency-Key": "k1"})
    assert [first.status_code, again.status_code] == [200, 200]
    assert [w.order_id for w in state.writes.writes] == ["ORD-NEW-1", "ORD-NEW-1"]
    assert [w.duplicate for w in state.writes.writes] == [False, True]
    assert len(again.json()["entry"]) == 1  # no "not applied twice" outcome: it was applied twice


def test_written_order_is_found_by_identifier_search(client: TestClient, state: SandboxState) -> None:
    client.post(f"{BASE}/ServiceRequest/$servicerequest-create", json=order_bundle("ORD-FIND"), headers=AUTH)
    form = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    hit = client.post(
        f"{BASE}/ServiceRequest/_search",
        content="identifier=urn:redox:clinic-health:OrderID|ORD-FIND",
        headers=form,
    )
    assert hit.status_code == 200, hit.text
    assert hit.json()["total"] == 1
    assert hit.json()["entry"][0]["resource"]["identifier"][0]["value"] == "ORD-FIND"
    miss = client.post(f"{BASE}/ServiceRequest/_search", content="identifier=ORD-NOPE", headers=form)
    assert miss.status_code == 200 and miss.json()["total"] == 0


@pytest.mark.parametrize("op", [APPOINTMENT_CREATE, APPOINTMENT_UPDATE, APPOINTMENT_CANCEL])
def test_appointment_write_back(client: TestClient, state: SandboxState, op: WriteOperation) -> None:
    r = client.post(f"{BASE}/Appointment/{op.name}", json=appointment_bundle(op=op), headers=AUTH)
    assert r.status_code == 200, r.text
    write = state.writes.writes[0]
    assert (write.kind, write.order_id, write.event) == ("appointments", "SCH-NEW-1", op.event)
    wrong_uri = client.post(
        f"{BASE}/Appointment/{op.name}", json=appointment_bundle(op=APPOINTMENT_LEGACY_WRITE), headers=AUTH
    )
    assert wrong_uri.status_code == 400 and "eventUri" in wrong_uri.text


def test_older_appointment_write_generation_is_accepted(client: TestClient, state: SandboxState) -> None:
    bundle = appointment_bundle()
    header = bundle["entry"][0]["resource"]
    del header["eventUri"]
    header["eventCoding"] = {"system": "urn:redox:event-type", "code": "Appointment-New"}
    r = client.post(f"{BASE}/Appointment/$write", json=bundle, headers=AUTH)
    assert r.status_code == 200, r.text
    assert state.writes.writes[0].event == "Scheduling-New"


@pytest.mark.parametrize(
    "invented",
    ["ServiceRequest/$order-new", "Appointment/$schedule-new", "ServiceRequest/$servicerequest-update"],
)
def test_invented_operations_are_404(client: TestClient, state: SandboxState, invented: str) -> None:
    r = client.post(f"{BASE}/{invented}", json=order_bundle(), headers=AUTH)
    assert r.status_code == 404
    assert state.writes.writes == []


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b.update(type="collection"), "Bundle.type"),
        (lambda b: b["entry"].reverse(), "MessageHeader"),
        (
            lambda b: b["entry"][0]["resource"].update(eventUri="https://x/EventDefinition/Explode"),
            "eventUri",
        ),
        (lambda b: b["entry"][0]["resource"].pop("source"), "source"),
        (
            lambda b: b["entry"][1]["resource"].update(identifier=[{"system": "urn:x:VN", "value": "1"}]),
            ":OrderID",
        ),
        (lambda b: b["entry"].pop(2), "Patient"),
        (lambda b: b["entry"][0]["resource"].update(focus=[{"reference": "ServiceRequest/nope"}]), "focus"),
        (lambda b: b["entry"][1]["resource"].pop("code"), "ServiceRequest.code"),
    ],
)
def test_bad_write_back_bundle_is_400_naming_the_problem(
    client: TestClient, state: SandboxState, mutate, needle
) -> None:
    bundle = order_bundle()
    mutate(bundle)
    r = client.post(f"{BASE}/ServiceRequest/$servicerequest-create", json=bundle, headers=AUTH)
    assert r.status_code == 400
    assert needle in r.json()["issue"][0]["diagnostics"]
    assert state.writes.writes == []


def test_write_back_refusals(client: TestClient, state: SandboxState) -> None:
    limited = "/fhir/R4/limited-net/Development"
    url = "ServiceRequest/$servicerequest-create"
    assert client.post(f"{limited}/{url}", json=order_bundle(), headers=AUTH).status_code == 403
    assert client.get(f"{BASE}/{url}", headers=AUTH).status_code == 405
    not_json = client.post(f"{BASE}/{url}", content=b"{oops", headers=AUTH)
    assert not_json.status_code == 400
    assert state.writes.writes == []


def test_oversized_body_is_413(client: TestClient, state: SandboxState) -> None:
    state.config.max_payload_bytes = 100
    r = client.post(f"{BASE}/ServiceRequest/$servicerequest-create", json=order_bundle(), headers=AUTH)
    assert r.status_code == 413 and r.json()["resourceType"] == "OperationOutcome"
    assert state.writes.writes == []


def test_timeout_after_commit_stores_the_write_but_the_client_gets_an_error(
    client: TestClient, state: SandboxState
) -> None:
    state.faults.on.add("timeout_after_commit")
    r = client.post(f"{BASE}/ServiceRequest/$servicerequest-create", json=order_bundle(), headers=AUTH)
    assert r.status_code == 504
    assert len(state.writes.writes) == 1


# --- --seed-from -----------------------------------------------------------------------------


def strip_connection(records: Iterable[Record]) -> list[Record]:
    return sorted(
        (dataclasses.replace(r, connection_id="x") for r in records), key=lambda r: (type(r).__name__, r.id)
    )


def test_seed_round_trip_render_write_ndjson_load_gives_the_same_records(tmp_path: Path) -> None:
    records = make_records("seeded", patients=9, seed=11)
    conn = ConnectionSpec(id="seeded", name="x", slug="seeded", id_types=("MR", "EHRID", "NIST"))
    by_type: dict[str, list[bytes]] = {}
    for record in records:
        resource = render_resource(record, conn)
        by_type.setdefault(resource["resourceType"], []).append(orjson.dumps(resource))
        if isinstance(record, DocumentRecord):
            by_type.setdefault("Binary", []).append(orjson.dumps(render_binary(record)))
    for rtype, lines in by_type.items():
        (tmp_path / f"{rtype}.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    loaded_conn, loaded = load_seed_dir(tmp_path)
    assert loaded_conn.id == "seeded" and set(loaded_conn.surfaces) == {"fhir", "datamodel"}
    flat = [r for entity in loaded.values() for r in entity]
    expected = {(type(r).__name__, r.id): r for r in strip_connection(records)}
    got = {(type(r).__name__, r.id): r for r in strip_connection(flat)}
    assert got.keys() == expected.keys()
    for key, record in expected.items():
        assert got[key] == record, key


def synthea_bundle() -> dict:
    patient_url = "urn:uuid:0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0001"
    encounter_url = "urn:uuid:0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0002"
    practitioner = {
        "reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999967892",
        "display": "Dr. Jane123 Smith456",
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_url,
                "resource": {
                    "resourceType": "Patient",
                    "id": "0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0001",
                    "identifier": [
                        {"system": "https://github.com/synthetichealth/synthea", "value": "0b1f6c1e-1111"},
                        {
                            "type": {"coding": [{"system": ids.V2_IDENTIFIER_TYPE, "code": "MR"}]},
                            "system": "http://hospital.smarthealthit.org",
                            "value": "mrn-42",
                        },
                        {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-12-3456"},
                    ],
                    "name": [
                        {"use": "official", "family": "Rath779", "given": ["Alva958"], "prefix": ["Mr."]}
                    ],
                    "telecom": [{"system": "phone", "value": "555-101-2020", "use": "home"}],
                    "gender": "male",
                    "birthDate": "1961-07-19",
                    "address": [
                        {"line": ["1 Elm St"], "city": "Boston", "state": "MA", "postalCode": "02108"}
                    ],
                    "maritalStatus": {
                        "coding": [{"system": ids.V3_MARITAL_STATUS, "code": "M"}],
                        "text": "M",
                    },
                    "communication": [{"language": {"coding": [{"system": ids.BCP47, "code": "en-US"}]}}],
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": encounter_url,
                "resource": {
                    "resourceType": "Encounter",
                    "id": "0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0002",
                    "identifier": [
                        {
                            "use": "official",
                            "system": "https://github.com/synthetichealth/synthea",
                            "value": "enc-1",
                        }
                    ],
                    "status": "finished",
                    "class": {"system": ids.V3_ACT_CODE, "code": "AMB"},
                    "type": [{"coding": [{"system": SNOMED, "code": "185349003", "display": "Check up"}]}],
                    "subject": {"reference": patient_url, "display": "Mr. Alva958 Rath779"},
                    "participant": [{"individual": practitioner}],
                    "period": {"start": "2020-03-01T10:00:00-05:00", "end": "2020-03-01T10:30:00-05:00"},
                    "location": [
                        {"location": {"reference": "Location?identifier=x|1", "display": "BOSTON CLINIC"}}
                    ],
                },
            },
            {
                "fullUrl": "urn:uuid:0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0003",
                "resource": {
                    "resourceType": "Observation",
                    "id": "0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0003",
                    "status": "final",
                    "category": [{"coding": [{"system": ids.OBSERVATION_CATEGORY, "code": "laboratory"}]}],
                    "code": {"coding": [{"system": LOINC, "code": "2345-7", "display": "Glucose"}]},
                    "subject": {"reference": patient_url},
                    "encounter": {"reference": encounter_url},
                    "effectiveDateTime": "2020-03-01T10:15:00-05:00",
                    "issued": "2020-03-01T10:15:00.123-05:00",
                    "valueQuantity": {
                        "value": 88.5,
                        "unit": "mg/dL",
                        "system": "http://unitsofmeasure.org",
                        "code": "mg/dL",
                    },
                },
            },
            {
                "fullUrl": "urn:uuid:0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0004",
                "resource": {
                    "resourceType": "Observation",
                    "id": "0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0004",
                    "status": "final",
                    "category": [{"coding": [{"system": ids.OBSERVATION_CATEGORY, "code": "survey"}]}],
                    "code": {"coding": [{"system": LOINC, "code": "72166-2"}]},
                    "subject": {"reference": patient_url},
                    "effectiveDateTime": "2020-03-01T10:15:00-05:00",
                },
            },
            {
                "fullUrl": "urn:uuid:0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0005",
                "resource": {
                    "resourceType": "MedicationRequest",
                    "id": "0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0005",
                    "status": "active",
                    "intent": "order",
                    "medicationCodeableConcept": {
                        "coding": [{"system": RXNORM, "code": "314076", "display": "lisinopril 10 MG"}]
                    },
                    "subject": {"reference": patient_url},
                    "encounter": {"reference": encounter_url},
                    "authoredOn": "2020-03-01T10:30:00-05:00",
                    "requester": practitioner,
                    "dosageInstruction": [
                        {
                            "timing": {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}},
                            "doseAndRate": [{"doseQuantity": {"value": 1}}],
                        }
                    ],
                },
            },
            {
                "fullUrl": "urn:uuid:0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0006",
                "resource": {
                    "resourceType": "DocumentReference",
                    "id": "0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0006",
                    "status": "current",
                    "type": {
                        "coding": [
                            {"system": LOINC, "code": "34117-2", "display": "History and physical note"}
                        ]
                    },
                    "subject": {"reference": patient_url},
                    "date": "2020-03-01T10:30:00.000-05:00",
                    "author": [practitioner],
                    "content": [
                        {
                            "attachment": {
                                "contentType": "text/plain; charset=utf-8",
                                "data": base64.b64encode(b"note").decode(),
                            }
                        }
                    ],
                    "context": {"encounter": [{"reference": encounter_url}]},
                },
            },
            {
                "fullUrl": "urn:uuid:0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0007",
                "resource": {"resourceType": "Claim", "id": "c1", "status": "active"},
            },
            {
                "fullUrl": "urn:uuid:0b1f6c1e-1111-4d3a-9a55-3c1f2f8e0008",
                "resource": {
                    "resourceType": "Encounter",
                    "id": "orphan",
                    "status": "finished",
                    "type": [{"coding": [{"system": SNOMED, "code": "1"}]}],
                    "subject": {"reference": "urn:uuid:missing"},
                    "period": {"start": "2020-01-01"},
                    "participant": [{"individual": practitioner}],
                },
            },
        ],
    }


def test_seed_from_a_synthea_style_bundle(tmp_path: Path) -> None:
    (tmp_path / "Rath779_Alva958.json").write_bytes(orjson.dumps(synthea_bundle()))
    loaded = read_seed_dir(tmp_path)
    records = loaded.records
    [patient] = records["patients"]
    assert (patient.mrn, patient.ehr_id, patient.ssn, patient.family_name) == (
        "mrn-42",
        "0b1f6c1e-1111",
        "999-12-3456",
        "Rath779",
    )
    assert patient.birth_date == date(1961, 7, 19) and patient.language == "en-US"
    [encounter] = records["encounters"]
    assert encounter.patient.patient_id == patient.id and encounter.visit_number == "enc-1"
    assert encounter.start_at == datetime(2020, 3, 1, 15, 0, tzinfo=UTC)
    assert encounter.attending.npi == "9999967892" and encounter.location.facility == "BOSTON CLINIC"
    by_category = {r.category: r for r in records["results"]}
    assert set(by_category) == {"laboratory", "survey"}  # every Observation category is served
    result = by_category["laboratory"]
    assert (result.value_numeric, result.unit, result.visit_number) == (88.5, "mg/dL", "enc-1")
    [med] = records["medications"]
    assert (med.kind, med.frequency_period, med.frequency_unit, med.visit_number) == (
        "request",
        0.5,
        "d",
        "enc-1",
    )
    [doc] = records["documents"]
    assert doc.content == b"note" and doc.visit_number == "enc-1" and doc.kind == "note"
    assert loaded.skipped == {
        "Encounter: subject is not a loaded Patient": 1,
        "Claim: resource type not served by the sandbox": 1,
    }
    for entity_records in records.values():
        for record in entity_records:
            validate(render_resource(record, loaded.connection))


def test_seed_from_refuses_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_seed_dir(tmp_path)


def test_seeded_files_are_served_through_the_routes(tmp_path: Path) -> None:
    """--seed-from end to end: FHIR files -> StaticPopulation -> the same search answers."""
    from sandbox.population.static import StaticPopulation

    records = make_records("seeded", patients=6, seed=5)
    conn = ConnectionSpec(id="seeded", name="x", slug="seeded", id_types=("MR", "EHRID", "NIST"))
    lines = [
        orjson.dumps(render_resource(r, conn)) for r in records if isinstance(r, PatientRecord | ResultRecord)
    ]
    (tmp_path / "export.ndjson").write_bytes(b"\n".join(lines))
    seeded, by_entity = load_seed_dir(tmp_path)
    population = StaticPopulation([seeded], {seeded.id: by_entity}, NOW)
    config = SandboxConfig(connections=[seeded], patients=6)
    state = SandboxState(config=config, store=population, auth=FakeAuth(), faults=FakeFaults(), webhooks=None)
    client = TestClient(Starlette(routes=routes(state)))
    base = "/fhir/R4/seeded/Development"
    refused = client.post(f"{base}/Observation/_search", data={"_count": "5"}, headers=FORM)
    assert refused.status_code == 400  # the seeded population is strict too
    state.config = dataclasses.replace(config, search_policy="open")  # paging over every result
    got, totals = [], set()
    bundle = search(client, "Observation", {"_count": "5"}, base)
    while True:
        totals.add(bundle["total"])
        got += ids_of([e["resource"] for e in bundle.get("entry", [])])
        if (url := next_url(bundle)) is None:
            break
        bundle = client.post(url, headers=AUTH).json()
    expected = sorted(
        (r for r in records if isinstance(r, ResultRecord)), key=lambda r: (r.last_updated, r.id)
    )
    assert got == [r.id for r in expected] and totals == {len(expected)}
    patient = next(r for r in records if isinstance(r, PatientRecord))
    read = client.get(f"{base}/Patient/{patient.id}", headers=AUTH).json()
    assert read == render_resource(dataclasses.replace(patient, connection_id="seeded"), seeded)


def test_the_synthetic_population_renders_valid_fhir() -> None:
    from sandbox.population.synthetic import SyntheticPopulation

    config = SandboxConfig(seed=5, patients=40)
    population = SyntheticPopulation(config)
    rendered = Counter()
    for conn in config.connections:
        for entity in conn.entities:
            for record in population.iter(Query(conn.id, entity)):
                resource = render_resource(record, conn)
                validate(resource)
                rendered[resource["resourceType"]] += 1
                if isinstance(record, DocumentRecord):
                    assert resource["content"][0]["attachment"]["hash"] == content_hash(record.content)
    assert set(rendered) == {
        "Patient",
        "Encounter",
        "Observation",
        "MedicationRequest",
        "MedicationStatement",
        "Appointment",
        "DocumentReference",
        "Condition",
        "AllergyIntolerance",
        "Immunization",
        "Procedure",
        "DiagnosticReport",
        "ServiceRequest",
    }


# --- _revinclude and _elements ---------------------------------------------------------------


def test_revinclude_pages_matches_and_includes_once_each_at_their_current_version(
    client: TestClient, store: ListStore
) -> None:
    p = records_of(store, "patients")[1]
    mine = {
        (resource_type(r), r.id)
        for entity in ("encounters", "results", "medications", "appointments", "documents")
        for r in records_of(store, entity)
        if r.patient.patient_id == p.id
    }
    assert len(mine) > 6
    bundle = search(client, "Patient", {"_id": p.id, "_revinclude": "*", "_count": "3"})
    entries = list(bundle["entry"])
    assert bundle["total"] == 1 and len(entries) == 3 and entries[0]["search"] == {"mode": "match"}
    # A record not served yet changes between pages: it is served once, as it is now.
    later = next(e for e in records_of(store, "results") if e.patient.patient_id == p.id)
    served_ids = {e["resource"]["id"] for e in entries}
    if later.id not in served_ids:
        store.touch("clinic", "results", later.id, NOW)
    while (url := next_url(bundle)) is not None:
        bundle = client.post(url, headers=AUTH).json()
        assert bundle["total"] == 1 and len(bundle.get("entry", [])) <= 3
        entries += bundle.get("entry", [])
    included = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in entries[1:]]
    assert all(e["search"] == {"mode": "include"} for e in entries[1:])
    assert len(included) == len(set(included)) and set(included) == mine
    if later.id not in served_ids:
        got = next(e["resource"] for e in entries if e["resource"]["id"] == later.id)
        assert got["meta"]["versionId"] == str(later.version + 1)
    validate(bundle)


def test_revinclude_is_refused_by_name_where_the_connection_does_not_honour_it(
    client: TestClient, state: SandboxState, store: ListStore
) -> None:
    p = records_of(store, "patients")[0]
    state.config = dataclasses.replace(
        state.config, connections=[dataclasses.replace(CLINIC, revinclude=False), LIMITED, DM_ONLY]
    )
    r = client.post(f"{BASE}/Patient/_search", data={"_id": p.id, "_revinclude": "*"}, headers=FORM)
    assert r.status_code == 400 and "'_revinclude'" in r.json()["issue"][0]["diagnostics"]
    limited = "/fhir/R4/limited-net/Development"
    q = records_of(store, "patients", "limited")[0]
    # `*` means the types this connection is entitled to: the limited one has none beyond Patient.
    assert search(client, "Patient", {"_id": q.id, "_revinclude": "*"}, limited)["total"] == 1
    r = client.post(
        f"{limited}/Patient/_search", data={"_id": q.id, "_revinclude": "Observation:patient"}, headers=FORM
    )
    assert r.status_code == 403


def test_elements_subsets_documents_and_tags_them(client: TestClient, store: ListStore) -> None:
    doc = records_of(store, "documents")[0]
    params = {"patient": doc.patient.patient_id, "_elements": "subject,masterIdentifier,date,type,context"}
    bundle = search(client, "DocumentReference", params)
    assert bundle["entry"]
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert "content" not in resource and resource["subject"]["reference"].endswith(doc.patient.patient_id)
        assert resource["meta"]["tag"][-1]["code"] == "SUBSETTED"
    # No validation: a SUBSETTED resource may lack required elements (FHIR R4 §3.1.1.5.9).


def test_a_refused_write_stays_visible_in_its_refused_state(client: TestClient, state: SandboxState) -> None:
    """The EHR refused the order and the appointment (``write_reject_rate``): a search by
    identifier still finds them, revoked / cancelled with the reason, so nobody re-sends them."""
    state.faults.refusals.update(
        {"ORD-NO": "unknown ordering provider", "SCH-NO": "slot no longer available"}
    )
    form = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    for url, bundle in (
        (f"{BASE}/ServiceRequest/$servicerequest-create", order_bundle("ORD-NO")),
        (f"{BASE}/ServiceRequest/$servicerequest-create", order_bundle("ORD-YES")),
        (f"{BASE}/Appointment/$appointment-create", appointment_bundle("SCH-NO")),
    ):
        assert client.post(url, json=bundle, headers=AUTH).status_code == 200  # received: 200 either way
    assert [(w.order_id, w.outcome, w.reason) for w in state.writes.writes] == [
        ("ORD-NO", "rejected", "unknown ordering provider"),
        ("ORD-YES", "accepted", None),
        ("SCH-NO", "rejected", "slot no longer available"),
    ]

    def found(rtype: str, token: str) -> dict[str, Any]:
        hit = client.post(f"{BASE}/{rtype}/_search", content=f"identifier={token}", headers=form)
        assert hit.status_code == 200, hit.text
        [entry] = hit.json()["entry"]
        return entry["resource"]

    refused = found("ServiceRequest", "urn:redox:clinic-health:OrderID|ORD-NO")
    assert refused["status"] == "revoked" and refused["note"][-1] == {"text": "unknown ordering provider"}
    assert found("ServiceRequest", "urn:redox:clinic-health:OrderID|ORD-YES")["status"] == "active"
    appointment = found("Appointment", "urn:redox:clinic-health:VN|SCH-NO")
    assert appointment["status"] == "cancelled"
    assert appointment["cancelationReason"] == {"text": "slot no longer available"}
    # A later write to the refused appointment is refused with the same reason.
    r = client.post(
        f"{BASE}/Appointment/$appointment-update",
        json=appointment_bundle("SCH-NO", APPOINTMENT_UPDATE),
        headers=AUTH,
    )
    assert r.status_code == 200
    assert (state.writes.writes[-1].outcome, state.writes.writes[-1].reason) == (
        "rejected",
        "slot no longer available",
    )
