"""The sandbox refuses what Redox refuses, and offers what Redox offers (issue 9).

An independent client (plain httpx through ``Live``, which knows only the control plane's
contract) against a real default sandbox: broad searches are refused with an OperationOutcome
naming the required parameter sets; the searches Redox allows without a patient (Encounter and
Appointment by date) answer; ``_revinclude`` returns exactly what per-type patient searches
return, and a connection that does not honour it refuses it by name; ``_elements`` leaves a
document's content out; the roster and ``active_since`` contracts agree with truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from sandbox.population.records import AppointmentRecord, EncounterRecord
from sandbox.population.store import Query
from sandbox.population.synthetic import SyntheticPopulation
from sandbox.server import SandboxServer
from tests.conftest import sandbox_config
from tests.sandbox.test_server_e2e import Live, fhir_valid, next_link

REVINCLUDE_TYPES = (
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
)
SUBSETTED = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    started = SandboxServer(sandbox_config()).start()
    yield started
    started.stop()


@pytest.fixture
def live(server: SandboxServer) -> Iterator[Live]:
    client = Live(server.url, client_name="strict-client")
    yield client
    client.close()


def roster(live: Live, conn_id: str) -> list[dict[str, str]]:
    r = live.http.get(f"{live.url}/_sandbox/roster", params={"connection": conn_id})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"connection", "patients"} and body["connection"] == conn_id
    return body["patients"]


def refused(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    return outcome["issue"][0]


def every_page(live: Live, response: httpx.Response) -> tuple[list[dict[str, Any]], set[int]]:
    """(entries of every page, the totals the pages reported), following next links."""
    entries: list[dict[str, Any]] = []
    totals: set[int] = set()
    while True:
        assert response.status_code == 200, response.text[:300]
        bundle = response.json()
        totals.add(bundle["total"])
        entries += bundle.get("entry", [])
        url = next_link(bundle)
        if url is None:
            return entries, totals
        response = live.http.post(url, headers=live.bearer())


def patient_by_identifier(live: Live, conn_id: str, ident: dict[str, str]) -> dict[str, Any]:
    bundle = live.fhir_search(
        conn_id, "Patient", {"identifier": f"{ident['system']}|{ident['value']}"}
    ).json()
    assert bundle["total"] == 1
    return bundle["entry"][0]["resource"]


def patient_reference(resource: dict[str, Any]) -> str:
    if resource["resourceType"] == "Appointment":
        refs = [p["actor"]["reference"] for p in resource["participant"] if "actor" in p]
        return next(r for r in refs if r.startswith("Patient/")).split("/", 1)[1]
    return (resource.get("subject") or resource["patient"])["reference"].split("/", 1)[1]


# ---- refusals ---------------------------------------------------------------------------------


def test_broad_searches_are_refused_with_the_required_sets_named(live: Live) -> None:
    for rtype, params, expected in (
        (
            "Patient",
            {"_count": "50", "_lastUpdated": "ge1900-01-01"},
            "_id | identifier | given+family+birthdate",
        ),
        ("Observation", {"category": "laboratory", "_lastUpdated": "ge1900-01-01"}, "patient"),
        ("Observation", {"date": "ge2026-01-01"}, "patient"),
        ("MedicationRequest", {"_lastUpdated": "ge2026-01-01"}, "patient"),
        ("MedicationStatement", {"_count": "10"}, "patient"),
        ("DocumentReference", {"_lastUpdated": "ge1900-01-01"}, "identifier"),
        ("Appointment", {"status": "booked"}, "date"),
        ("Encounter", {"_lastUpdated": "ge1900-01-01", "_count": "5"}, "date"),
    ):
        issue = refused(live.fhir_search("northwind-fhir", rtype, params))
        assert issue["code"] == "required", rtype
        assert expected in issue["diagnostics"] and "1900" not in issue["diagnostics"], rtype


def test_the_searches_redox_allows_without_a_patient_answer(live: Live) -> None:
    counts = live.truth()["counts"]["northwind-fhir"]
    encounters, totals = every_page(
        live, live.fhir_search("northwind-fhir", "Encounter", {"date": "ge1900-01-01", "_count": "200"})
    )
    assert totals == {counts["encounters"]} and len({e["resource"]["id"] for e in encounters}) == len(
        encounters
    )
    assert len(encounters) == counts["encounters"]
    booked = live.fhir_search("northwind-fhir", "Appointment", {"date": "ge2026-11-01", "_count": "5"})
    assert booked.status_code == 200 and booked.json()["total"] > 0
    for entry in booked.json()["entry"]:
        assert entry["resource"]["start"] >= "2026-11-01"
    assert live.fhir_search("northwind-fhir", "Encounter", {"status": "in-progress"}).status_code == 200


# ---- _revinclude ------------------------------------------------------------------------------


def test_revinclude_returns_the_patient_and_exactly_what_per_type_searches_return(live: Live) -> None:
    conn_id = "northwind-fhir"
    assert live.conns[conn_id]["revinclude"] is True
    patients = roster(live, conn_id)
    checked = 0
    for ident in patients[:: max(1, len(patients) // 6)][:6]:
        patient = patient_by_identifier(live, conn_id, ident)
        per_type: dict[str, set[str]] = {}
        for rtype in REVINCLUDE_TYPES:
            found, _ = every_page(
                live, live.fhir_search(conn_id, rtype, {"patient": patient["id"], "_count": "50"})
            )
            per_type[rtype] = {e["resource"]["id"] for e in found}
        params = {"identifier": f"{ident['system']}|{ident['value']}", "_revinclude": "*", "_count": "7"}
        entries, totals = every_page(live, live.fhir_search(conn_id, "Patient", params))
        assert totals == {1}  # FHIR: total counts matches only
        matches = [e for e in entries if e["search"]["mode"] == "match"]
        assert [m["resource"]["id"] for m in matches] == [patient["id"]]
        assert matches[0]["resource"] == patient
        included: dict[str, set[str]] = {t: set() for t in REVINCLUDE_TYPES}
        for e in entries:
            if e["search"]["mode"] == "include":
                resource = e["resource"]
                included[resource["resourceType"]].add(resource["id"])
                assert patient_reference(resource) == patient["id"]
                assert e["fullUrl"].endswith(f"/{resource['resourceType']}/{resource['id']}")
        assert included == per_type
        assert len(entries) == 1 + sum(len(v) for v in per_type.values())  # nothing served twice
        checked += sum(len(v) for v in per_type.values())
    assert checked > 20


def test_revinclude_with_explicit_types(live: Live) -> None:
    conn_id = "northwind-fhir"
    ident = roster(live, conn_id)[3]
    patient = patient_by_identifier(live, conn_id, ident)
    params = [
        ("_id", patient["id"]),
        ("_revinclude", "Observation:patient"),
        ("_revinclude", "MedicationRequest:subject"),
    ]
    r = live.http.post(
        f"{live.fhir_base(conn_id)}/Patient/_search",
        content=urlencode(params),  # a repeated parameter
        headers={**live.bearer(), "Content-Type": "application/x-www-form-urlencoded"},
    )
    entries, _ = every_page(live, r)
    types = {e["resource"]["resourceType"] for e in entries if e["search"]["mode"] == "include"}
    assert types <= {"Observation", "MedicationRequest"}
    expected = {
        e["resource"]["id"]
        for rtype in ("Observation", "MedicationRequest")
        for e in every_page(live, live.fhir_search(conn_id, rtype, {"patient": patient["id"]}))[0]
    }
    assert {e["resource"]["id"] for e in entries if e["search"]["mode"] == "include"} == expected
    for bad in ("Practitioner:patient", "Observation:performer", "Observation"):
        issue = refused(live.fhir_search(conn_id, "Patient", {"_id": patient["id"], "_revinclude": bad}))
        assert "_revinclude" in issue["diagnostics"]
    issue = refused(live.fhir_search(conn_id, "Observation", {"patient": patient["id"], "_revinclude": "*"}))
    assert "'_revinclude'" in issue["diagnostics"]  # only Patient search takes it


def test_a_connection_that_does_not_honour_revinclude_refuses_it_by_name(live: Live) -> None:
    conn_id = "riverbend-both"
    assert live.conns[conn_id]["revinclude"] is False
    ident = roster(live, conn_id)[0]
    params = {"identifier": f"{ident['system']}|{ident['value']}", "_revinclude": "*"}
    issue = refused(live.fhir_search(conn_id, "Patient", params))
    assert issue["code"] == "not-supported" and "'_revinclude'" in issue["diagnostics"]
    del params["_revinclude"]
    assert live.fhir_search(conn_id, "Patient", params).json()["total"] == 1


# ---- _elements --------------------------------------------------------------------------------


def test_elements_leaves_document_content_out_and_marks_the_subset(live: Live) -> None:
    conn_id = "northwind-fhir"
    truth_docs = 0
    for ident in roster(live, conn_id)[:40]:
        patient = patient_by_identifier(live, conn_id, ident)
        full, _ = every_page(live, live.fhir_search(conn_id, "DocumentReference", {"patient": patient["id"]}))
        if not full:
            continue
        params = {"patient": patient["id"], "_elements": "subject,masterIdentifier,date,type,context"}
        slim, _ = every_page(live, live.fhir_search(conn_id, "DocumentReference", params))
        assert [e["resource"]["id"] for e in slim] == [e["resource"]["id"] for e in full]
        for whole, part in zip(full, slim, strict=True):
            doc, subset = whole["resource"], part["resource"]
            assert "content" not in subset and "content" in doc
            assert set(subset) <= {
                "resourceType",
                "id",
                "meta",
                "subject",
                "masterIdentifier",
                "date",
                "type",
                "context",
            }
            for key in ("subject", "date", "type", "context", "masterIdentifier"):
                assert subset.get(key) == doc.get(key)
            tags = subset["meta"]["tag"]
            assert any(t["system"] == SUBSETTED and t["code"] == "SUBSETTED" for t in tags)
            assert subset["meta"]["lastUpdated"] == doc["meta"]["lastUpdated"]
            truth_docs += 1
        if truth_docs >= 5:
            break
    assert truth_docs >= 5
    issue = refused(live.fhir_search(conn_id, "DocumentReference", {"patient": "x", "_elements": "flavour"}))
    assert "_elements" in issue["diagnostics"] and "flavour" not in issue["diagnostics"]
    issue = refused(live.fhir_search(conn_id, "Observation", {"patient": "x", "_elements": "code"}))
    assert "'_elements'" in issue["diagnostics"]


# ---- control plane: roster and active_since ---------------------------------------------------


def test_roster_holds_every_patient_truth_counts_with_the_fhir_mrn_system(live: Live) -> None:
    truth = live.truth()
    for conn_id, conn in live.conns.items():
        patients = roster(live, conn_id)
        assert len(patients) == truth["counts"][conn_id]["patients"], conn_id
        assert len({p["value"] for p in patients}) == len(patients)
        system = f"urn:redox:{conn['destination_slug']}:MR"
        assert {p["system"] for p in patients} == {system}
        assert system.rsplit(":", 1)[1] == "MR"  # the Data Model IDType
        mrns = {
            r["mrn"]
            for person in truth["persons"]
            for r in person["records"]
            if r["connection_id"] == conn_id
        }
        assert {p["value"] for p in patients} == mrns
    for ident in roster(live, "northwind-fhir")[::25]:
        resource = patient_by_identifier(live, "northwind-fhir", ident)
        fhir_valid(resource)
        assert {"system": ident["system"], "value": ident["value"]} in [
            {"system": i["system"], "value": i["value"]} for i in resource["identifier"]
        ]
    missing = live.http.get(f"{live.url}/_sandbox/roster", params={"connection": "nowhere"})
    assert missing.status_code == 404 and "error" in missing.json()
    assert live.http.get(f"{live.url}/_sandbox/roster").status_code == 400


def test_active_since_counts_patients_with_an_encounter_or_appointment_from_then_on(live: Live) -> None:
    now = datetime.fromisoformat(live.truth()["now"])
    since = now - timedelta(days=30)
    stamp = since.isoformat().replace("+00:00", "Z")
    r = live.http.get(f"{live.url}/_sandbox/truth", params={"active_since": stamp, "persons": "false"})
    assert r.status_code == 200, r.text
    active = r.json()["active"]
    ehr = {c for c, conn in live.conns.items() if conn["kind"] == "ehr"}
    assert set(active) == ehr
    # Independently, over FHIR: encounters and appointments by date (no patient needed).
    for conn_id in ("northwind-fhir", "riverbend-both"):
        seen: set[str] = set()
        for rtype in ("Encounter", "Appointment"):
            found, _ = every_page(
                live, live.fhir_search(conn_id, rtype, {"date": f"ge{stamp}", "_count": "200"})
            )
            seen |= {patient_reference(e["resource"]) for e in found}
        assert active[conn_id] == len(seen) > 0, conn_id
    # And by brute force over the same population (the Data-Model-only connection too).
    population = SyntheticPopulation(sandbox_config())
    for conn_id in ehr:
        patients = {
            r.patient.patient_id
            for entity in ("encounters", "appointments")
            for r in population.iter(Query(conn_id, entity))
            if isinstance(r, EncounterRecord | AppointmentRecord) and r.start_at >= since
        }
        assert active[conn_id] == len(patients), conn_id
    # The same instant with an offset, escaped or (as a hand-built URL sends it) not.
    for url in (
        httpx.URL(
            f"{live.url}/_sandbox/truth", params={"active_since": since.isoformat(), "persons": "false"}
        ),
        f"{live.url}/_sandbox/truth?persons=false&active_since={since.isoformat()}",
    ):
        assert live.http.get(url).json()["active"] == active
    later = live.http.get(
        f"{live.url}/_sandbox/truth", params={"active_since": "2100-01-01", "persons": "false"}
    )
    assert all(n == 0 for n in later.json()["active"].values())
    bad = live.http.get(f"{live.url}/_sandbox/truth", params={"active_since": "last tuesday"})
    assert bad.status_code == 400 and "active_since" in bad.json()["error"]
    assert "active" not in live.http.get(f"{live.url}/_sandbox/truth", params={"persons": "false"}).json()


def test_roster_and_active_fast_paths_agree_with_the_record_level_definitions() -> None:
    """Both backends' column-level roster / active counts equal the RecordStore definitions."""
    from sandbox.population.static import StaticPopulation
    from sandbox.population.store import RecordStore
    from tests.sandbox.test_fhir import CLINIC, ENTITY_OF, NOW, make_records

    synthetic = SyntheticPopulation(sandbox_config())
    by_entity: dict[str, list] = {}
    for record in make_records("clinic"):
        by_entity.setdefault(ENTITY_OF[type(record)], []).append(record)
    static = StaticPopulation([CLINIC], {"clinic": by_entity}, NOW)
    for store, conn_ids in ((synthetic, [c.id for c in sandbox_config().connections]), (static, ["clinic"])):
        for conn_id in conn_ids:
            assert sorted(store.roster(conn_id)) == sorted(RecordStore.roster(store, conn_id))
            for since in (store.now - timedelta(days=400), store.now - timedelta(days=20), store.now):
                assert store.active_patients(conn_id, since) == RecordStore.active_patients(
                    store, conn_id, since
                )


def test_config_keys_of_the_access_issue_fail_fast_with_the_field_named(tmp_path) -> None:
    from sandbox.config import SandboxConfigError, load_config

    def load(text: str):
        path = tmp_path / "sandbox.yaml"
        path.write_text(text)
        return load_config(path)

    assert load("search_policy: open\n").search_policy == "open"
    assert load("patients: 10\n").search_policy == "redox"
    one = "connections:\n  - {id: a, name: A, surfaces: [fhir], %s}\n"
    loaded = load(one % "bulk_export: true, refresh_days: 2, revinclude: false").connections[0]
    assert (loaded.bulk_export, loaded.refresh_days, loaded.revinclude) == (True, 2, False)
    for text, field in (
        ("search_policy: closed\n", "search_policy"),
        (one % "refresh_days: 0", "refresh_days"),
        ("connections:\n  - {id: a, name: A, surfaces: [datamodel], bulk_export: true}\n", "bulk_export"),
    ):
        with pytest.raises(SandboxConfigError, match=field):
            load(text)
