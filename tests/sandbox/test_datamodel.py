"""The sandbox's Redox Data Model surface: rendering, queries, write-back and errors.

Every payload the surface renders, serves or accepts is checked with the project's
conformance oracle (shared/STACK.md): drop ``Meta.Message`` / ``Meta.Transmission``, then
``redox.factory.redox_object_factory`` in strict mode.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from redox.factory import redox_object_factory
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from sandbox.auth import InvalidToken, TokenInfo
from sandbox.config import ConnectionSpec, SandboxConfig
from sandbox.datamodel import routes as dm_routes
from sandbox.datamodel.render import event_renderer, render_event
from sandbox.population.records import (
    ICD10,
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
from sandbox.population.static import StaticPopulation
from sandbox.population.store import Query, RecordStore
from sandbox.population.synthetic import SyntheticPopulation
from sandbox.state import SandboxState, WriteLog

# Real Redox Dev Tools payloads (MIT, see tests/fixtures/redox-examples/LICENSE-*), vendored
# so the suite is hermetic.
EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "redox-examples" / "datamodel"
NOW = datetime(2026, 11, 1, tzinfo=UTC)
GOOD_TOKEN = "Bearer good-token"


def result_ids(orders: list[dict]) -> set[str]:
    """The result ids a Results answer holds: a blood pressure panel's component entries carry
    the panel's result id in RelatedGroupID (one result, two entries)."""
    return {r["RelatedGroupID"] or f"{o['ID']}-{r['Code']}" for o in orders for r in o["Results"]}


def strict(payload: dict[str, Any]) -> None:
    candidate = copy.deepcopy(payload)
    candidate["Meta"].pop("Message", None)
    candidate["Meta"].pop("Transmission", None)
    redox_object_factory(candidate)


# ---- a small hand-made population --------------------------------------------------------

PROVIDERS = (
    Provider("4356789876", "Pat", "Granite"),
    Provider("4236464757", "John", "Slate", ("DO",)),
    Provider("2434534567", "Sharon", "Chalk", ("MD", "PhD")),
)
LOCATIONS = (
    Location("RES General Hospital", "3N", "136", "B", "Inpatient"),
    Location("RES General Hospital", "3S", None, None, "Clinic"),
)
LABS = (
    (Coding(LOINC, "2345-7", "Glucose [Mass/volume] in Serum or Plasma"), "mg/dL", 70.0, 99.0, "laboratory"),
    (Coding(LOINC, "718-7", "Hemoglobin [Mass/volume] in Blood"), "g/dL", 12.0, 17.5, "laboratory"),
    (Coding(LOINC, "8480-6", "Systolic blood pressure"), "mm[Hg]", None, None, "vital-signs"),
)
PANEL = Coding(LOINC, "24323-8", "Comprehensive metabolic panel")
VITALS_PANEL = Coding(LOINC, "85353-1", "Vital signs panel")


def build_population(conn_id: str, n_patients: int, seed: int) -> dict[str, list[Record]]:
    """Deterministic records of every entity, with optional fields both set and unset."""
    rng = random.Random(seed)
    out: dict[str, list[Record]] = {e: [] for e in ENTITIES_ORDER}
    tick = iter(range(10**6))

    def updated() -> datetime:
        return NOW - timedelta(days=400) + timedelta(hours=next(tick))

    for i in range(n_patients):
        full = i % 3 != 2
        patient = PatientRecord(
            connection_id=conn_id,
            id=f"pat-{i:04d}",
            last_updated=updated(),
            version=1,
            person_index=i,
            mrn=f"{1000000 + i:010d}",
            ehr_id=str(uuid.UUID(int=rng.getrandbits(128))),
            enterprise_id=f"EPI{i:06d}",
            nist_id=f"{rng.getrandbits(60):015x}" if full else None,
            family_name=rng.choice(("Bixby", "Carthwright", "Jones", "Garcia")),
            given_names=("Timothy", "Paul") if i % 2 else ("Barbara",),
            birth_date=date(1950, 1, 1) + timedelta(days=rng.randrange(25000)),
            sex=rng.choice(("male", "female", "other", "unknown")),
            race=rng.choice(("White", "Asian", None)),
            ethnicity=rng.choice(("Hispanic or Latino", "Not Hispanic or Latino", None)),
            language="en" if full else None,
            address_line="4762 Hickory Street" if full else None,
            city="Monroe" if full else None,
            state="WI" if full else None,
            postal_code="53566" if full else None,
            county="Green" if full else None,
            phone_home="+18088675301" if full else None,
            phone_mobile="+19189368865" if i % 2 else None,
            email="someone@example.test" if full else None,
            ssn="101-01-0001" if full else None,
            marital_status="Married" if full else None,
            deceased_at=NOW - timedelta(days=3) if i == 5 else None,
            is_test=False,
        )
        out["patients"].append(patient)
        ref = PatientRef(patient.id, patient.mrn)
        for j in range(3):
            start = NOW - timedelta(days=300 - 40 * j + i)
            status = ("finished", "in-progress", "planned", "cancelled", "entered-in-error", "arrived")[
                (i + j) % 6
            ]
            cls = ("AMB", "IMP", "EMER", "OBSENC", "VR", "HH")[(i * 3 + j) % 6]
            vn = f"V{i:04d}{j}"
            out["encounters"].append(
                EncounterRecord(
                    connection_id=conn_id,
                    id=f"enc-{i:04d}-{j}",
                    last_updated=updated(),
                    version=1 + j,
                    patient=ref,
                    visit_number=vn,
                    account_number=f"A{i:04d}{j}" if j else None,
                    status=status,
                    class_code=cls,
                    type=Coding(SNOMED, "185349003", "Encounter for check up"),
                    start_at=start,
                    end_at=start + timedelta(hours=5) if status == "finished" else None,
                    location=LOCATIONS[j % 2],
                    attending=PROVIDERS[j % 3],
                    reason=Coding(ICD10, "N39.0", "Urinary tract infection") if j != 1 else None,
                    discharge_disposition=Coding(
                        "http://terminology.hl7.org/CodeSystem/discharge-disposition", "home", "Home"
                    )
                    if status == "finished"
                    else None,
                )
            )
            code, unit, low, high, category = LABS[(i + j) % 3]
            numeric = (i + j) % 4 != 0
            rstatus = ("final", "preliminary", "corrected", "cancelled", "entered-in-error")[(i + j) % 5]
            out["results"].append(
                ResultRecord(
                    connection_id=conn_id,
                    id=f"res-{i:04d}-{j}",
                    last_updated=updated(),
                    version=1,
                    patient=ref,
                    visit_number=vn if j != 2 else None,
                    order_id=f"ORD{i:04d}{j // 2}",
                    result_id=f"ORD{i:04d}{j // 2}-{code.code}",
                    category=category,
                    panel=VITALS_PANEL if category == "vital-signs" else PANEL,
                    code=code,
                    value_type="Numeric" if numeric else "String",
                    value_numeric=float(90 + i) if numeric else None,
                    value_text=str(90 + i) if numeric else "Positive Result",
                    unit=unit if numeric else None,
                    reference_low=low,
                    reference_high=high,
                    reference_text=None,
                    abnormal_flag=("H", "L", "HH", "LL", "A", "N", None)[(i + j) % 7],
                    status=rstatus,
                    effective_at=start + timedelta(hours=1),
                    issued_at=start + timedelta(hours=3) if j else None,
                    performer=PROVIDERS[2] if j else None,
                    producer="Redox Lab WI" if j else None,
                )
            )
            mstatus = ("active", "completed", "stopped", "on-hold", "cancelled", "entered-in-error")[
                (i + j) % 6
            ]
            out["medications"].append(
                MedicationRecord(
                    connection_id=conn_id,
                    id=f"med-{i:04d}-{j}",
                    last_updated=updated(),
                    version=1,
                    patient=ref,
                    visit_number=vn if j == 0 else None,
                    order_id=f"RX{i:04d}{j}",
                    kind="request" if j != 2 else "statement",
                    status=mstatus,
                    intent="order" if j != 2 else None,
                    code=Coding(RXNORM, "104894", "Ondansetron 4 MG Disintegrating Oral Tablet"),
                    dose_quantity=4.0 if j != 1 else 2.5,
                    dose_unit="mg",
                    route=Coding(SNOMED, "26643006", "Oral route") if j != 1 else None,
                    frequency_period=8.0 if j == 0 else None,
                    frequency_unit="h" if j == 0 else None,
                    start_at=start,
                    end_at=start + timedelta(days=10) if mstatus == "completed" else None,
                    prescriber=PROVIDERS[j % 3] if j != 2 else None,
                )
            )
            astatus = ("booked", "arrived", "fulfilled", "cancelled", "noshow", "proposed", "pending")[
                (i + j) % 7
            ]
            out["appointments"].append(
                AppointmentRecord(
                    connection_id=conn_id,
                    id=f"apt-{i:04d}-{j}",
                    last_updated=updated(),
                    version=1,
                    patient=ref,
                    visit_number=f"S{i:04d}{j}",
                    status=astatus,
                    start_at=NOW + timedelta(days=j * 7 - 10, hours=i),
                    duration_minutes=15 * (j + 1),
                    type=Coding(
                        "http://terminology.hl7.org/CodeSystem/v2-0276", "ROUTINE", "Routine appointment"
                    ),
                    reason="Check up" if j != 1 else None,
                    provider=PROVIDERS[j % 3],
                    location=LOCATIONS[1],
                    cancel_reason="Patient request" if astatus == "cancelled" else None,
                    rescheduled_from=f"S{i:04d}{j - 1}" if j == 2 else None,
                )
            )
            kind = "note" if j != 1 else "cda"
            out["documents"].append(
                DocumentRecord(
                    connection_id=conn_id,
                    id=f"doc-{i:04d}-{j}",
                    last_updated=updated(),
                    version=1,
                    patient=ref,
                    visit_number=vn if j != 2 else None,
                    document_id=f"DOC{i:04d}{j}",
                    kind=kind,
                    type=Coding(LOINC, "11506-3", "Progress note")
                    if kind == "note"
                    else Coding(LOINC, "34133-9", "Summary of episode note"),
                    title="Progress note" if kind == "note" else "Continuity of care document",
                    status=("current", "superseded", "entered-in-error")[(i + j) % 3],
                    authored_at=start + timedelta(hours=2),
                    author=PROVIDERS[j % 3],
                    content_type="text/plain" if kind == "note" else "application/xml",
                    content=(
                        f"Patient seen for visit {vn}. Plan: follow up.".encode()
                        if kind == "note"
                        else f"<ClinicalDocument><id root='{vn}'/></ClinicalDocument>".encode()
                    ),
                )
            )
    return out


ENTITIES_ORDER = ("patients", "encounters", "results", "medications", "appointments", "documents")


# ---- fixtures ----------------------------------------------------------------------------


class FakeAuth:
    def check_bearer(self, authorization_header: str | None, surface: str) -> TokenInfo:
        assert surface == "datamodel"
        if authorization_header != GOOD_TOKEN:
            raise InvalidToken("unknown access token")
        return TokenInfo(client_id="client-1", kind="oauth", expires_at=4e9, scope=None)


class FakeFaults:
    """The Faults surface the routes use, with switches tests flip."""

    def __init__(self) -> None:
        self.refuse: Response | None = None
        self.always: set[str] = set()
        self.mangle_all = False
        self.gated: list[str] = []
        self.refusals: dict[str, str] = {}  # business id -> the EHR's reason to refuse its writes

    async def gate(self, conn: ConnectionSpec, request: Request) -> Response | None:
        self.gated.append(conn.id)
        return self.refuse

    def mangle(self, connection_id: str, body: bytes) -> bytes:
        return body[: len(body) // 2] if self.mangle_all else body

    def roll(self, connection_id: str, name: str) -> bool:
        return name in self.always

    def rate(self, name: str, connection_id: str | None = None) -> float:
        return 0.0

    async def stall(self, conn: ConnectionSpec, request: Request) -> Response:
        return Response(b'{"Meta":{"Errors":[{"Text":"The request timed out"}]}}', 504)

    def shape_query(self, connection_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return body

    def write_refusal(self, connection_id: str, kind: str, business_id: str) -> str | None:
        return self.refusals.get(business_id)


def make_config(**conn_overrides: Any) -> SandboxConfig:
    conns = []
    for c in SandboxConfig().connections:
        conns.append(replace(c, **conn_overrides.get(c.id, {})))
    return SandboxConfig(connections=conns)


@pytest.fixture(scope="module")
def population() -> dict[str, dict[str, list[Record]]]:
    config = make_config()
    return {c.id: build_population(c.id, 24, seed=i) for i, c in enumerate(config.connections)}


class LocalServer:
    """The ASGI app served by uvicorn on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app: Starlette) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


ROUTE_CONFIG = {"riverbend-both": {"page_size": 7}}  # riverbend pages at 7 to exercise capping


@pytest.fixture(scope="module", params=["synthetic", "handmade"])
def store(request, population) -> RecordStore:
    """The real synthetic population (200 patients), and a StaticPopulation over the hand-made
    records (which has in-house encounters, rescheduled appointments and every status)."""
    config = make_config(**ROUTE_CONFIG)
    if request.param == "synthetic":
        return SyntheticPopulation(replace(config, seed=7, patients=200))
    shared = {c.id: {e: population[c.id].get(e, []) for e in c.entities} for c in config.connections}
    return StaticPopulation(config.connections, shared, NOW)


@pytest.fixture(scope="module")
def served(store) -> Iterator[tuple[httpx.Client, SandboxState]]:
    config = make_config(**ROUTE_CONFIG)
    state = SandboxState(config=config, store=store, auth=FakeAuth(), faults=FakeFaults(), webhooks=None)
    with (
        LocalServer(Starlette(routes=dm_routes.routes(state))) as base_url,
        httpx.Client(base_url=base_url) as client,
    ):
        yield client, state


@pytest.fixture
def env(served) -> tuple[httpx.Client, SandboxState, FakeFaults]:
    """The served routes with fresh faults and an empty write log for each test."""
    client, state = served
    state.faults = FakeFaults()
    state.writes = WriteLog()
    state.config.search_policy = "redox"  # every test runs strict unless it opens on purpose
    return client, state, state.faults


def open_policy(state: SandboxState) -> None:
    """Switch to ``search_policy: open`` (not Redox; the benchmarks' mode) for the rest of a test."""
    state.config.search_policy = "open"


def patients_of(*patients: PatientRecord) -> list[dict[str, Any]]:
    return [{"Identifiers": [{"ID": p.mrn, "IDType": "MR"}]} for p in patients]


def dest(state: SandboxState, conn_id: str) -> dict[str, str]:
    conn = state.config.connection(conn_id)
    return {"ID": conn.destination_id, "Name": conn.name}


def ask(
    client: httpx.Client,
    state: SandboxState,
    conn_id: str,
    data_model: str,
    event_type: str,
    path="/endpoint",
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    meta = {
        "DataModel": data_model,
        "EventType": event_type,
        "Destinations": [dest(state, conn_id)],
        "Source": {"ID": "7ce6f387-c33c-417d-8682-81e83628cbd9", "Name": "ELT"},
    }
    return client.post(
        path, json={"Meta": meta, **body}, headers={"Authorization": GOOD_TOKEN, **(headers or {})}
    )


def ok(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    payload = resp.json()
    assert "Errors" not in payload["Meta"]
    assert payload["Meta"]["Logs"][0]["ID"]
    strict(payload)
    return payload


def error_text(resp: httpx.Response) -> str:
    meta = resp.json()["Meta"]
    assert meta["Logs"] and meta["Logs"][0]["ID"]
    return " ".join(e["Text"] for e in meta["Errors"])


def records(state: SandboxState, conn_id: str, entity: str) -> list[Any]:
    return list(state.store.iter(Query(conn_id, entity)))


def patient_of(state: SandboxState, conn_id: str, record: Any) -> PatientRecord:
    return state.store.get(conn_id, "patients", record.patient.patient_id)


# ---- rendering ---------------------------------------------------------------------------


def all_changes(pop: dict[str, list[Record]]) -> Iterator[Change]:
    for entity, rows in pop.items():
        for r in rows:
            for kind in ("new", "update", "cancel"):
                for previous in (
                    (None, "planned", "arrived", "finished") if entity == "encounters" else (None,)
                ):
                    yield Change(entity, kind, r, previous)


def with_patients(pop: dict[str, list[Record]]) -> Callable[[Change, ConnectionSpec], list[dict]]:
    """``render_event`` given each change's patient record, as ``event_renderer`` does."""
    by_id = {p.id: p for p in pop["patients"]}

    def render(change: Change, conn: ConnectionSpec) -> list[dict]:
        ref = getattr(change.record, "patient", None)
        return render_event(change, conn, by_id.get(ref.patient_id) if ref else None)

    return render


def test_every_rendered_event_validates_strictly(population):
    config = make_config()
    seen: set[tuple[str, str]] = set()
    for conn in config.connections:
        if conn.id not in ("riverbend-both", "lakeside-dm"):  # every id type, every entity
            continue
        pop = {entity: rows[: len(rows) // 2] for entity, rows in population[conn.id].items()}
        full = with_patients(pop)
        for change in all_changes(pop):
            for render in (full, render_event):
                for payload in render(change, conn):
                    strict(payload)
                    meta = payload["Meta"]
                    seen.add((meta["DataModel"], meta["EventType"]))
                    assert meta["Destinations"] == [{"ID": conn.destination_id, "Name": conn.name}]
                    assert meta["Source"]["Name"] == conn.name
                    assert isinstance(meta["Message"]["ID"], int) and isinstance(
                        meta["Transmission"]["ID"], int
                    )
                    assert uuid.UUID(meta["Logs"][0]["ID"]) and uuid.UUID(meta["Logs"][0]["AttemptID"])
                    assert meta["EventDateTime"] == change.record.last_updated.strftime(
                        "%Y-%m-%dT%H:%M:%S.000Z"
                    )
    expected = (
        {
            ("PatientAdmin", e)
            for e in (
                "NewPatient",
                "PatientUpdate",
                "PreAdmit",
                "Arrival",
                "Registration",
                "Transfer",
                "VisitUpdate",
                "Discharge",
                "Cancel",
            )
        }
        | {("Results", "New")}
        | {("Medications", e) for e in ("New", "Update", "Cancel")}
        | {("Scheduling", e) for e in ("New", "Reschedule", "Modification", "Cancel", "NoShow")}
        | {(m, e) for m in ("Notes", "Media") for e in ("New", "Replace", "Delete")}
    )
    assert expected <= seen


def test_synthetic_population_and_its_changes_render_strictly_valid():
    config = SandboxConfig(seed=3, patients=60)
    store = SyntheticPopulation(config)
    render = event_renderer(store)
    count = 0
    for conn in config.connections:
        for entity in conn.entities:
            for record in store.iter(Query(conn.id, entity)):
                for payload in render(Change(entity, "new", record), conn):
                    strict(payload)
                    count += 1
    changes = store.advance(3, 0.05)
    assert changes
    for change in changes:
        for payload in render(change, config.connection(change.record.connection_id)):
            strict(payload)
            count += 1
    assert count > 1000


def test_events_carry_the_record_semantics(population):
    conn = make_config().connection("riverbend-both")
    pop = population[conn.id]
    render = with_patients(pop)

    patient = pop["patients"][0]
    [admin] = render(Change("patients", "new", patient), conn)
    ids = {i["IDType"]: i["ID"] for i in admin["Patient"]["Identifiers"]}
    assert ids["MR"] == patient.mrn and ids["EPI"] == patient.enterprise_id and ids["EHRID"] == patient.ehr_id
    demo = admin["Patient"]["Demographics"]
    assert demo["LastName"] == patient.family_name and demo["DOB"] == patient.birth_date.isoformat()
    assert demo["Sex"] in ("Male", "Female", "Other", "Unknown")

    finished = next(e for e in pop["encounters"] if e.status == "finished")
    events = render(Change("encounters", "new", finished), conn)
    assert [p["Meta"]["EventType"] for p in events][-1] == "Discharge"
    assert events[-1]["Visit"]["DischargeDateTime"] is not None
    cancelled = next(e for e in pop["encounters"] if e.status == "cancelled")
    [cancel] = render(Change("encounters", "cancel", cancelled, "arrived"), conn)
    assert cancel["Meta"]["EventType"] == "Cancel" and cancel["Meta"]["CanceledEvent"] in (
        "Arrival",
        "Registration",
    )

    prelim = next(r for r in pop["results"] if r.status == "preliminary")
    [res] = render(Change("results", "update", prelim), conn)
    assert (
        res["Orders"][0]["ResultsStatus"] == "Preliminary"
        and res["Orders"][0]["Results"][0]["Status"] == "Preliminary"
    )

    moved = next(a for a in pop["appointments"] if a.rescheduled_from and a.status == "booked")
    [sched] = render(Change("appointments", "new", moved), conn)
    assert (
        sched["Meta"]["EventType"] == "Reschedule"
        and sched["Visit"]["OldVisitNumber"] == moved.rescheduled_from
    )

    med = pop["medications"][0]
    [medication] = render(Change("medications", "new", med), conn)
    assert medication["Order"]["Medication"]["Product"]["CodeSystemName"] == "RxNorm"

    cda = next(d for d in pop["documents"] if d.kind == "cda")
    [media] = render(Change("documents", "update", cda), conn)
    assert media["Meta"]["DataModel"] == "Media" and media["Meta"]["EventType"] == "Replace"
    assert base64.b64decode(media["Media"]["FileContents"]) == cda.content
    note = next(d for d in pop["documents"] if d.kind == "note")
    [deleted] = render(Change("documents", "cancel", note), conn)
    assert deleted["Meta"]["DataModel"] == "Notes" and deleted["Meta"]["EventType"] == "Delete"


def test_identifiers_follow_the_connection_id_types(population):
    lakeside = make_config().connection("lakeside-dm")  # MR + NIST
    patient = next(p for p in population[lakeside.id]["patients"] if p.nist_id)
    [event] = render_event(Change("patients", "update", patient), lakeside)
    assert [i["IDType"] for i in event["Patient"]["Identifiers"]] == ["MR", "NIST", "EPI"]


def test_render_event_is_empty_for_fhir_only_connections(population):
    fhir_only = make_config().connection("northwind-fhir")
    patient = population[fhir_only.id]["patients"][0]
    assert render_event(Change("patients", "new", patient), fhir_only) == []


# ---- errors ------------------------------------------------------------------------------


def test_bad_token_is_401_with_errors(env):
    client, state, _ = env
    resp = client.post("/endpoint", json={"Meta": {}}, headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401
    assert "unknown access token" in error_text(resp)


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"Patient": {}}', 400, "Meta is required"),
        (b'{"Meta": {"EventType": "Query", "Destinations": [{"ID": "x"}]}}', 404, "DataModel"),
        (b'{"Meta": {"DataModel": "PatientSearch", "EventType": "Query"}}', 403, "Destinations"),
        (
            b'{"Meta": {"DataModel": "PatientSearch", "EventType": "Query", "Destinations": [{"ID": "nope"}]}}',
            404,
            "not found",
        ),
    ],
)
def test_malformed_requests_get_meta_errors(env, body, status, text):
    client, _, _ = env
    resp = client.post("/endpoint", content=body, headers={"Authorization": GOOD_TOKEN})
    assert resp.status_code == status
    assert text in error_text(resp)


def test_query_must_name_one_destination(env):
    client, state, _ = env
    meta = {
        "DataModel": "PatientSearch",
        "EventType": "Query",
        "Destinations": [dest(state, "riverbend-both"), dest(state, "lakeside-dm")],
    }
    resp = client.post("/query", json={"Meta": meta, "Patient": {}}, headers={"Authorization": GOOD_TOKEN})
    assert resp.status_code == 400 and "exactly one destination" in error_text(resp)


def test_surface_support_and_entitlement_are_enforced(env):
    client, state, _ = env
    resp = ask(client, state, "northwind-fhir", "PatientSearch", "Query", Patient={})
    assert resp.status_code == 403 and "Data Model" in error_text(resp)
    resp = ask(client, state, "carequality-network", "Results", "Query")
    assert resp.status_code == 403 and "results" in error_text(resp)
    resp = ask(client, state, "riverbend-both", "Flowsheet", "New")
    assert resp.status_code == 400 and "not supported" in error_text(resp)


def test_fault_gate_and_mangle_apply_after_the_connection_resolves(env):
    client, state, faults = env
    faults.refuse = Response(b'{"Meta":{"Errors":[{"Text":"Rate limit exceeded"}]}}', 429)
    assert ask(client, state, "lakeside-dm", "PatientSearch", "Query", Patient={}).status_code == 429
    assert faults.gated == ["lakeside-dm"]
    faults.refuse = None
    faults.mangle_all = True
    resp = ask(client, state, "lakeside-dm", "PatientSearch", "Query", Patient={})
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.content)


def test_every_shared_example_gets_a_clear_answer(env):
    client, _, _ = env
    files = sorted(EXAMPLES.rglob("*.json"))
    assert len(files) == 65
    for path in files:
        for route in ("/endpoint", "/query"):
            resp = client.post(route, content=path.read_bytes(), headers={"Authorization": GOOD_TOKEN})
            assert resp.status_code == 404, path
            assert "Destination" in error_text(resp)


def test_an_example_query_addressed_to_a_sandbox_destination_is_answered(env):
    client, state, _ = env
    payload = json.loads((EXAMPLES / "results/query/query.json").read_text())
    payload["Meta"]["Destinations"] = [dest(state, "riverbend-both")]
    resp = client.post("/query", json=payload, headers={"Authorization": GOOD_TOKEN})
    body = ok(resp)
    assert body["Meta"]["EventType"] == "QueryResponse"


# ---- queries -----------------------------------------------------------------------------


def test_patient_search_by_identifier_and_demographics(env):
    client, state, _ = env
    patient = records(state, "lakeside-dm", "patients")[4]
    for ident in ({"ID": patient.mrn, "IDType": "MR"}, {"ID": patient.enterprise_id, "IDType": "EPI"}):
        body = ok(
            ask(client, state, "lakeside-dm", "PatientSearch", "Query", Patient={"Identifiers": [ident]})
        )
        assert body["Meta"]["EventType"] == "Response" and body["Meta"]["IsIncomplete"] is False
        assert {"ID": patient.mrn, "IDType": "MR"} in body["Patient"]["Identifiers"]
        assert body["PotentialMatches"] == []
    demo = {
        "FirstName": patient.given_names[0],
        "LastName": patient.family_name,
        "DOB": patient.birth_date.isoformat(),
    }
    body = ok(ask(client, state, "lakeside-dm", "PatientSearch", "Query", Patient={"Demographics": demo}))
    found = [body["Patient"], *body["PotentialMatches"]]
    assert any({"ID": patient.mrn, "IDType": "MR"} in p["Identifiers"] for p in found)


def test_patient_search_no_match_no_criteria_and_many_matches(env):
    client, state, _ = env
    body = ok(
        ask(
            client,
            state,
            "lakeside-dm",
            "PatientSearch",
            "Query",
            Patient={"Identifiers": [{"ID": "does-not-exist", "IDType": "MR"}]},
        )
    )
    assert body["Patient"] == {} and body["PotentialMatches"] == []
    resp = ask(
        client,
        state,
        "lakeside-dm",
        "PatientSearch",
        "Query",
        Patient={"Demographics": {"LastName": "Jones"}},
    )
    assert resp.status_code == 400 and "Incomplete search criteria" in error_text(resp)
    # Many patients share one MR-free identifier pattern: search every MR at once on a capped connection.
    mrns = [{"ID": p.mrn, "IDType": "MR"} for p in records(state, "riverbend-both", "patients")[:10]]
    body = ok(ask(client, state, "riverbend-both", "PatientSearch", "Query", Patient={"Identifiers": mrns}))
    assert 1 + len(body["PotentialMatches"]) == 7 and body["Meta"]["IsIncomplete"] is True


def test_visit_query_windows_enumerate_every_visit_under_the_open_policy(env):
    client, state, _ = env
    open_policy(state)  # a bare VisitStartDateTime is refused by Redox (see test_strict_*)
    conn = state.config.connection("riverbend-both")
    start = NOW - timedelta(days=290)
    truth = {e.visit_number for e in records(state, conn.id, "encounters") if e.start_at >= start}
    seen: set[str] = set()
    cursor = dm_time(start)
    for _ in range(100):
        body = ok(ask(client, state, conn.id, "PatientAdmin", "VisitQuery", VisitStartDateTime=cursor))
        assert body["Meta"]["EventType"] == "VisitQueryResponse"
        visits = [v for p in body["Patients"] for v in p["Visits"]]
        assert len(visits) <= conn.page_size
        seen |= {v["VisitNumber"] for v in visits}
        if len(visits) < conn.page_size:
            break
        cursor = max(v["VisitDateTime"] for v in visits)
    assert seen == truth


def test_visit_query_filters(env):
    client, state, _ = env
    encounter = records(state, "lakeside-dm", "encounters")[5]
    patient = next(
        p for p in records(state, "lakeside-dm", "patients") if p.id == encounter.patient.patient_id
    )
    body = ok(
        ask(
            client,
            state,
            "lakeside-dm",
            "PatientAdmin",
            "VisitQuery",
            Patients=[{"Identifiers": [{"ID": patient.mrn, "IDType": "MR"}]}],
        )
    )
    assert len(body["Patients"]) == 1
    numbers = {v["VisitNumber"] for v in body["Patients"][0]["Visits"]}
    truth = {
        e.visit_number
        for e in records(state, "lakeside-dm", "encounters")
        if e.patient.patient_id == patient.id
    }
    assert encounter.visit_number in numbers and numbers == truth
    body = ok(
        ask(client, state, "lakeside-dm", "PatientAdmin", "VisitQuery", VisitNumbers=[encounter.visit_number])
    )
    assert [v["VisitNumber"] for p in body["Patients"] for v in p["Visits"]] == [encounter.visit_number]
    open_policy(state)  # a class filter alone names no patient: open policy only
    body = ok(ask(client, state, "lakeside-dm", "PatientAdmin", "VisitQuery", PatientClasses=["Inpatient"]))
    inpatient = {e.visit_number for e in records(state, "lakeside-dm", "encounters") if e.class_code == "IMP"}
    assert {v["VisitNumber"] for p in body["Patients"] for v in p["Visits"]} == inpatient


def test_census_lists_patients_in_house(env):
    client, state, _ = env
    body = ok(ask(client, state, "lakeside-dm", "PatientAdmin", "CensusQuery"))
    got = {v["VisitNumber"] for p in body["Patients"] for v in p["Visits"]}
    truth = {
        e.visit_number
        for e in records(state, "lakeside-dm", "encounters")
        if e.status in ("arrived", "in-progress") and e.end_at is None
    }
    assert got == truth
    if state.store.__class__ is StaticPopulation:  # the hand-made records have patients in house
        assert got


def test_results_query_last_updated_windows_enumerate_every_result_under_the_open_policy(env):
    client, state, _ = env
    open_policy(state)
    conn = state.config.connection("riverbend-both")
    rows = records(state, conn.id, "results")
    truth = {r.result_id for r in rows}
    seen: set[str] = set()
    cursor = "2000-01-01"
    for _ in range(200):
        body = ok(ask(client, state, conn.id, "Results", "Query", LastUpdated={"StartDateTime": cursor}))
        orders = body["Orders"]
        assert len({o["ID"] for o in orders}) == len(orders)  # one entry per order
        seen |= result_ids(orders)
        if len(orders) < conn.page_size:
            break
        # Every result up to the latest returned LastUpdated was returned: restart from there.
        cursor = max(o["LastUpdated"] for o in orders)
    assert seen == truth


def test_results_query_filters(env):
    client, state, _ = env
    open_policy(state)  # filters without a patient: open policy only
    rows = records(state, "lakeside-dm", "results")
    target = rows[3]
    body = ok(ask(client, state, "lakeside-dm", "Results", "Query", OrderIDs=[target.order_id]))
    [order] = body["Orders"]
    assert order["ID"] == target.order_id
    siblings = {r.result_id for r in rows if r.order_id == target.order_id}
    assert result_ids([order]) == siblings
    body = ok(ask(client, state, "lakeside-dm", "Results", "Query", ResultStatuses=["Corrected"]))
    assert body["Orders"] and {r["Status"] for o in body["Orders"] for r in o["Results"]} == {"Corrected"}
    lo, hi = rows[10].last_updated, rows[20].last_updated
    in_window = {r.result_id for r in rows if lo <= r.last_updated < hi}  # start inclusive, end exclusive
    body = ok(
        ask(
            client,
            state,
            "lakeside-dm",
            "Results",
            "Query",
            LastUpdated={"StartDateTime": dm_time(lo), "EndDateTime": dm_time(hi)},
        )
    )
    assert result_ids(body["Orders"]) == in_window
    resp = ask(client, state, "lakeside-dm", "Results", "Query", LastUpdated={"StartDateTime": "yesterday"})
    assert resp.status_code == 400 and "LastUpdated.StartDateTime" in error_text(resp)


def test_booked_window_caps_with_is_incomplete(env):
    client, state, _ = env
    conn = state.config.connection("riverbend-both")
    start, end = NOW - timedelta(days=30), NOW + timedelta(days=30)
    truth = {a.visit_number for a in records(state, conn.id, "appointments") if start <= a.start_at < end}
    body = ok(
        ask(
            client,
            state,
            conn.id,
            "Scheduling",
            "Booked",
            StartDateTime=dm_time(start),
            EndDateTime=dm_time(end),
        )
    )
    assert body["Meta"]["EventType"] == "BookedResponse" and body["Meta"]["IsIncomplete"] is True
    assert len(body["Visits"]) == conn.page_size
    seen = {v["VisitNumber"] for v in body["Visits"]}
    cursor = body["Visits"][-1]["VisitDateTime"]
    while body["Meta"]["IsIncomplete"]:
        body = ok(
            ask(
                client, state, conn.id, "Scheduling", "Booked", StartDateTime=cursor, EndDateTime=dm_time(end)
            )
        )
        seen |= {v["VisitNumber"] for v in body["Visits"]}
        cursor = body["Visits"][-1]["VisitDateTime"]
    assert seen == truth
    visit = body["Visits"][0]
    assert visit["Patient"]["Identifiers"] and visit["Duration"] > 0


def test_clinical_summary_patient_query(env):
    client, state, _ = env
    patient = records(state, "riverbend-both", "patients")[1]
    body = ok(
        ask(
            client,
            state,
            "riverbend-both",
            "Clinical Summary",
            "PatientQuery",
            Patient={"Identifiers": [{"ID": patient.mrn, "IDType": "MR"}]},
        )
    )
    assert body["Meta"]["EventType"] == "PatientQueryResponse"
    assert body["Header"]["Patient"]["Demographics"]["LastName"] == patient.family_name
    encounters = [
        e for e in records(state, "riverbend-both", "encounters") if e.patient.patient_id == patient.id
    ]
    assert len(body["Encounters"]) == min(len(encounters), 7)  # each section capped at page_size
    assert {i["ID"] for e in body["Encounters"] for i in e["Identifiers"]} <= {
        e.visit_number for e in encounters
    }
    resp = ask(
        client,
        state,
        "riverbend-both",
        "Clinical Summary",
        "PatientQuery",
        Patient={"Identifiers": [{"ID": "nobody", "IDType": "MR"}]},
    )
    assert resp.status_code == 404 and "No patient" in error_text(resp)


def test_document_query_and_get(env):
    client, state, _ = env
    conn_id = "carequality-network"
    patient = records(state, conn_id, "patients")[2]
    body = ok(
        ask(
            client,
            state,
            conn_id,
            "Clinical Summary",
            "DocumentQuery",
            Patient={"Identifiers": [{"ID": patient.enterprise_id, "IDType": "EPI"}]},
            Document={"StartDate": "2020-01-01", "EndDate": "2030-12-31"},
        )
    )
    docs = body["Documents"]
    truth = [d for d in records(state, conn_id, "documents") if d.patient.patient_id == patient.id]
    assert {d["ID"] for d in docs} == {d.document_id for d in truth}
    assert [d["DateTime"] for d in docs] == sorted(d["DateTime"] for d in docs)
    for summary in docs:
        got = ok(
            ask(client, state, conn_id, "Clinical Summary", "DocumentGet", Document={"ID": summary["ID"]})
        )
        record = next(d for d in truth if d.document_id == summary["ID"])
        assert base64.b64decode(got["Data"]) == record.content and got["FileType"] == summary["FileType"]
    resp = ask(client, state, conn_id, "Clinical Summary", "DocumentGet", Document={"ID": "missing"})
    assert resp.status_code == 404
    only = docs[0]["DateTime"]
    body = ok(
        ask(
            client,
            state,
            conn_id,
            "Clinical Summary",
            "DocumentQuery",
            Patient={"Identifiers": [{"ID": patient.mrn, "IDType": "MR"}]},
            Document={"StartDate": only, "EndDate": dm_time(parse(only) + timedelta(milliseconds=1))},
        )
    )
    assert [d["ID"] for d in body["Documents"]] == [docs[0]["ID"]]


def test_notes_and_media_queries(env):
    client, state, _ = env
    note = next(d for d in records(state, "lakeside-dm", "documents") if d.kind == "note")
    writer = patient_of(state, "lakeside-dm", note)
    body = ok(ask(client, state, "lakeside-dm", "Notes", "Query", Patients=patients_of(writer)))
    assert note.document_id in {n["DocumentID"] for n in body["Notes"]}
    assert all(n["ContentType"] == "Plain Text" for n in body["Notes"])
    doc = next(d for d in records(state, "lakeside-dm", "documents") if d.kind == "cda")
    owner = patient_of(state, "lakeside-dm", doc)
    body = ok(
        ask(
            client,
            state,
            "lakeside-dm",
            "Media",
            "Query",
            Patients=patients_of(owner),
            DocumentIDs=[doc.document_id],
        )
    )
    [media] = body["Media"]
    assert base64.b64decode(media["FileContents"]) == doc.content


# ---- strict queries (search_policy "redox", the default) ---------------------------------


@pytest.mark.parametrize(
    ("data_model", "event_type", "body", "needs"),
    [
        ("Results", "Query", {"LastUpdated": {"StartDateTime": "2020-01-01"}}, "Patients[]"),
        ("Results", "Query", {"OrderIDs": ["SECRET-ORDER-1"]}, "Patients[]"),
        ("Results", "Query", {"Patients": [{"Identifiers": []}]}, "Patients[]"),
        ("Notes", "Query", {"DocumentIDs": ["SECRET-DOC-1"]}, "Patients[]"),
        ("Media", "Query", {}, "Patients[]"),
        ("Order", "Query", {"StartDateTime": "2020-01-01"}, "Patients[]"),
        ("PatientAdmin", "VisitQuery", {"VisitStartDateTime": "2020-01-01"}, "VisitNumbers[] or Patients[]"),
        ("Clinical Summary", "PatientQuery", {}, "Patient"),
        (
            "Clinical Summary",
            "DocumentQuery",
            {"Document": {"StartDate": "2020-01-01"}},
            "Patient",
        ),
        ("PatientSearch", "Query", {"Patient": {"Demographics": {"LastName": "SECRET"}}}, "Incomplete"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_strict_queries_without_a_patient_are_refused_like_redox(env, data_model, event_type, body, needs):
    client, state, _ = env
    resp = ask(client, state, "riverbend-both", data_model, event_type, **body)
    assert resp.status_code == 400
    meta = resp.json()["Meta"]
    assert meta["Errors"] and all(e["Text"] for e in meta["Errors"]) and meta["Logs"][0]["ID"]
    text = error_text(resp)
    assert needs in text
    assert "SECRET" not in text and "2020-01-01" not in text  # names fields, never echoes values


def test_strict_policy_allows_the_documented_unscoped_queries(env):
    client, state, _ = env
    start, end = dm_time(NOW - timedelta(days=30)), dm_time(NOW + timedelta(days=30))
    booked = ok(
        ask(client, state, "riverbend-both", "Scheduling", "Booked", StartDateTime=start, EndDateTime=end)
    )
    assert booked["Meta"]["EventType"] == "BookedResponse"
    ok(ask(client, state, "riverbend-both", "PatientAdmin", "CensusQuery"))
    slots = ok(
        ask(
            client,
            state,
            "riverbend-both",
            "Scheduling",
            "AvailableSlots",
            StartDateTime=start,
            EndDateTime=end,
        )
    )
    assert slots["Meta"]["EventType"] == "AvailableSlotsResponse"
    encounter = records(state, "riverbend-both", "encounters")[3]
    body = ok(
        ask(
            client,
            state,
            "riverbend-both",
            "PatientAdmin",
            "VisitQuery",
            VisitNumbers=[encounter.visit_number],
        )
    )
    assert [v["VisitNumber"] for p in body["Patients"] for v in p["Visits"]] == [encounter.visit_number]


def test_per_patient_queries_answer_under_the_strict_policy(env):
    client, state, _ = env
    result = records(state, "lakeside-dm", "results")[4]
    patient = patient_of(state, "lakeside-dm", result)
    body = ok(ask(client, state, "lakeside-dm", "Results", "Query", Patients=patients_of(patient)))
    truth = {
        r.result_id for r in records(state, "lakeside-dm", "results") if r.patient.patient_id == patient.id
    }
    assert result_ids(body["Orders"]) == truth


def test_booked_takes_an_optional_patient_filter(env):
    client, state, _ = env
    appointment = records(state, "riverbend-both", "appointments")[2]
    patient = patient_of(state, "riverbend-both", appointment)
    body = ok(
        ask(
            client,
            state,
            "riverbend-both",
            "Scheduling",
            "Booked",
            StartDateTime="2000-01-01",
            EndDateTime="2040-01-01",
            Visit={"Patients": patients_of(patient)},
        )
    )
    truth = {
        a.visit_number
        for a in records(state, "riverbend-both", "appointments")
        if a.patient.patient_id == patient.id
    }
    assert appointment.visit_number in {v["VisitNumber"] for v in body["Visits"]}
    assert {v["VisitNumber"] for v in body["Visits"]} <= truth


def test_open_policy_keeps_the_permissive_behaviour(env):
    client, state, _ = env
    open_policy(state)
    ok(ask(client, state, "lakeside-dm", "Results", "Query", LastUpdated={"StartDateTime": "2000-01-01"}))
    ok(ask(client, state, "lakeside-dm", "Notes", "Query"))
    ok(ask(client, state, "lakeside-dm", "PatientAdmin", "VisitQuery", VisitStartDateTime="2000-01-01"))


def test_available_slots_are_open_clinic_times_that_avoid_booked_appointments(env):
    client, state, _ = env
    conn = state.config.connection("lakeside-dm")
    appts = [a for a in records(state, conn.id, "appointments") if a.status not in ("cancelled", "noshow")]
    target = appts[0]
    day = target.start_at.replace(hour=0, minute=0, second=0, microsecond=0)
    body = ok(
        ask(
            client,
            state,
            conn.id,
            "Scheduling",
            "AvailableSlots",
            StartDateTime=dm_time(day - timedelta(days=3)),
            EndDateTime=dm_time(day + timedelta(days=4)),
            Visit={"AttendingProviders": [{"ID": target.provider.npi}]},
        )
    )
    slots = body["AvailableSlots"]
    assert slots and len(slots) <= conn.page_size
    busy = [
        (a.start_at, a.start_at + timedelta(minutes=a.duration_minutes))
        for a in appts
        if a.provider.npi == target.provider.npi
    ]
    for slot in slots:
        begin = parse(slot["DateTime"])
        assert slot["Provider"]["ID"] == target.provider.npi and slot["Duration"] == 30
        assert begin.weekday() < 5 and 8 <= begin.hour < 17
        assert not any(b < begin + timedelta(minutes=30) and begin < e for b, e in busy)
    assert [s["DateTime"] for s in slots] == sorted(s["DateTime"] for s in slots)
    resp = ask(client, state, conn.id, "Scheduling", "AvailableSlots", EndDateTime="2030-01-01")
    assert resp.status_code == 400 and "StartDateTime" in error_text(resp)


def test_order_query_finds_lab_orders_and_written_orders(env):
    client, state, _ = env
    # The hand-made population has no inbound orders: its patients' answers hold written ones only.
    source = records(state, "riverbend-both", "orders") or records(state, "riverbend-both", "results")
    patient = patient_of(state, "riverbend-both", source[1])
    body = ok(ask(client, state, "riverbend-both", "Order", "Query", Patients=patients_of(patient)))
    assert body["Meta"]["EventType"] == "QueryResponse"
    # The EHR's inbound lab orders (the orders entity, every status), as FHIR serves them.
    truth = {
        o.order_id for o in records(state, "riverbend-both", "orders") if o.patient.patient_id == patient.id
    }
    got = {o["ID"] for o in body["Orders"]}
    assert got <= truth and len(got) == len(body["Orders"]) == min(len(truth), 7)
    assert all(o["Patient"]["Identifiers"] for o in body["Orders"])
    # An order written back is found before it is re-sent (no idempotency at Redox).
    write = order_body("ORD-WRITTEN-1", patient.mrn)
    assert ask(client, state, "riverbend-both", "Order", "New", **write).status_code == 200
    body = ok(
        ask(
            client,
            state,
            "riverbend-both",
            "Order",
            "Query",
            Patients=patients_of(patient),
            OrderIDs=["ORD-WRITTEN-1"],
        )
    )
    [order] = body["Orders"]
    assert order["ID"] == "ORD-WRITTEN-1" and order["Status"] == "New"
    assert ask(client, state, "riverbend-both", "Order", "Cancel", **write).status_code == 200
    body = ok(
        ask(
            client,
            state,
            "riverbend-both",
            "Order",
            "Query",
            Patients=patients_of(patient),
            OrderIDs=["ORD-WRITTEN-1"],
        )
    )
    assert body["Orders"][0]["Status"] == "Canceled"


def test_a_refused_write_stays_visible_to_order_query_and_booked(env):
    """The EHR refused an order and an appointment: the queries show them cancelled with the
    reason (the client finds them and never re-sends)."""
    client, state, _ = env
    result = records(state, "riverbend-both", "results")[1]
    patient = patient_of(state, "riverbend-both", result)
    state.faults.refusals.update(
        {"ORD-REFUSED": "unknown ordering provider", "S-REFUSED": "slot no longer available"}
    )
    assert (
        ask(
            client, state, "riverbend-both", "Order", "New", **order_body("ORD-REFUSED", patient.mrn)
        ).status_code
        == 200
    )
    body = ok(
        ask(
            client,
            state,
            "riverbend-both",
            "Order",
            "Query",
            Patients=patients_of(patient),
            OrderIDs=["ORD-REFUSED"],
        )
    )
    [order] = body["Orders"]
    assert (order["Status"], order["Notes"][-1]) == ("Canceled", "unknown ordering provider")
    visit = {
        "VisitNumber": "S-REFUSED",
        "VisitDateTime": "2026-11-20T15:00:00.000Z",
        "Duration": 30,
        "Location": {"Facility": "RES General Hospital", "Department": "3S"},
    }
    new = {"Patient": {"Identifiers": [{"ID": patient.mrn, "IDType": "MR"}]}, "Visit": visit}
    assert ask(client, state, "riverbend-both", "Scheduling", "New", **new).status_code == 200
    body = ok(
        ask(
            client,
            state,
            "riverbend-both",
            "Scheduling",
            "Booked",
            StartDateTime="2026-11-01T00:00:00.000Z",
            Visit={"VisitNumber": "S-REFUSED"},
        )
    )
    [booked] = [v for v in body["Visits"] if v["VisitNumber"] == "S-REFUSED"]
    assert (booked["Status"], booked["CancelReason"]) == ("Canceled", "slot no longer available")
    assert [w["outcome"] for w in state.writes.to_json()["appointments"]] == ["rejected"]


# ---- write-back --------------------------------------------------------------------------


def order_body(order_id: str, mrn: str) -> dict[str, Any]:
    return {
        "Patient": {"Identifiers": [{"ID": mrn, "IDType": "MR"}]},
        "Order": {
            "ID": order_id,
            "Status": "New",
            "Procedure": {"Code": "2345-7", "Codeset": "LOINC", "Description": "Glucose"},
        },
        "Visit": {"VisitNumber": "V1"},
    }


def test_order_write_is_recorded_and_duplicates_flagged(env):
    client, state, _ = env
    resp = ask(client, state, "riverbend-both", "Order", "New", **order_body("ORD-1", "0000000001"))
    assert resp.status_code == 200
    meta = resp.json()["Meta"]
    assert meta["DataModel"] == "Order" and meta["Logs"][0]["ID"] and "Errors" not in meta
    assert meta["Destinations"] == [dest(state, "riverbend-both")]
    ask(client, state, "riverbend-both", "Order", "New", **order_body("ORD-1", "0000000001"))
    ask(
        client,
        state,
        "riverbend-both",
        "Order",
        "Cancel",
        headers={"Idempotency-Key": "k1"},
        **order_body("ORD-1", "0000000001"),
    )
    ask(
        client,
        state,
        "riverbend-both",
        "Order",
        "Cancel",
        headers={"Idempotency-Key": "k1"},
        **order_body("ORD-1", "0000000001"),
    )
    writes = state.writes.to_json()["orders"]
    assert [(w["event"], w["duplicate"]) for w in writes] == [
        ("Order-New", False),
        ("Order-New", True),
        ("Order-Cancel", False),
        ("Order-Cancel", True),
    ]
    assert writes[0]["surface"] == "datamodel" and writes[0]["order_id"] == "ORD-1"
    assert writes[2]["idempotency_key"] == "k1"


def test_scheduling_write_keys_on_visit_number(env):
    client, state, _ = env
    body = {
        "Patient": {"Identifiers": [{"ID": "0000000001", "IDType": "MR"}]},
        "Visit": {
            "VisitNumber": "S-77",
            "VisitDateTime": "2026-11-20T15:00:00.000Z",
            "Duration": 30,
            "Location": {"Facility": "RES General Hospital", "Department": "3S"},
            "OldVisitNumber": "S-70",
        },
    }
    resp = ask(client, state, "lakeside-dm", "Scheduling", "Reschedule", **body)
    assert resp.status_code == 200, resp.text
    [write] = state.writes.to_json()["appointments"]
    assert write["appointment_id"] == "S-77" and write["event"] == "Scheduling-Reschedule"


def test_invalid_or_unentitled_writes_are_refused(env):
    client, state, _ = env
    bad = order_body("ORD-2", "0000000001")
    bad["Order"]["Colour"] = "blue"
    resp = ask(client, state, "riverbend-both", "Order", "New", **bad)
    assert resp.status_code == 400 and "Order.Colour" in error_text(resp)
    missing = order_body("ORD-3", "0000000001")
    del missing["Order"]["ID"]
    resp = ask(client, state, "riverbend-both", "Order", "Update", **missing)
    assert resp.status_code == 400 and "Order.ID" in error_text(resp)
    resp = ask(client, state, "carequality-network", "Order", "New", **order_body("ORD-4", "0000000001"))
    assert resp.status_code == 403 and "write-back" in error_text(resp)
    assert state.writes.to_json()["orders"] == []


def test_timeout_after_commit_stores_the_write_but_fails_the_response(env):
    client, state, faults = env
    faults.always.add("timeout_after_commit")
    resp = ask(client, state, "riverbend-both", "Order", "New", **order_body("ORD-9", "0000000001"))
    assert resp.status_code == 504
    assert [w["order_id"] for w in state.writes.to_json()["orders"]] == ["ORD-9"]


def dm_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
