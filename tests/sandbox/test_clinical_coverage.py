"""The whole clinical record through the sandbox (issue 12, sandbox side): problems, allergies,
immunizations, procedures, diagnostic reports and inbound lab orders, Observations of every
category and component-only ones — generated, served through FHIR and the Data Model with the
same codes and times, counted by ``/_sandbox/truth``; and outside FHIR data (a third-party
fixture) served by ``--seed-from`` without loss.

Checked end to end against a real server with the independent client and oracles of
``test_server_e2e`` (strict ``redox`` models, ``fhir.resources`` R4B).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.datamodel.render import render_event
from sandbox.fhir.notifications import render_redox_notification
from sandbox.fhir.seed_from import SERVED_TYPES, read_seed_dir, startup_report
from sandbox.population.synthetic import SyntheticPopulation
from sandbox.server import SandboxServer
from tests.conftest import sandbox_config
from tests.sandbox.test_server_e2e import Live, fhir_valid, strict_redox

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "third-party-fhir"
NEW_TYPES = {
    "Condition": "problems",
    "AllergyIntolerance": "allergies",
    "Immunization": "immunizations",
    "Procedure": "procedures",
    "DiagnosticReport": "diagnostic_reports",
    "ServiceRequest": "orders",
}
CONN = "riverbend-both"  # speaks FHIR and the Data Model
PATIENT_PARAM = {"AllergyIntolerance": "patient", "Immunization": "patient"}


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    started = SandboxServer(sandbox_config()).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def live(server: SandboxServer) -> Iterator[Live]:
    client = Live(server.url, client_name="clinical-client")
    yield client
    client.close()


def mrn_identifier(live: Live, conn_id: str, patient: dict[str, Any]) -> str:
    system = f"urn:redox:{live.conns[conn_id]['destination_slug']}:MR"
    value = next(i["value"] for i in patient["identifier"] if i["system"] == system)
    return f"{system}|{value}"


@pytest.fixture(scope="module")
def patient(server: SandboxServer, live: Live) -> dict[str, Any]:
    from sandbox.population.store import Query

    store = server.state.store
    counts: Counter[str] = Counter()
    for entity in NEW_TYPES.values():
        for r in store.iter(Query(CONN, entity)):
            counts[r.patient.patient_id] += 1  # type: ignore[attr-defined]
    best = max(counts, key=lambda pid: (counts[pid], pid))
    return live.fhir_read(CONN, "Patient", best).json()


# ---- the synthetic population --------------------------------------------------------------


def test_truth_counts_every_entity_and_the_result_components(server: SandboxServer, live: Live) -> None:
    truth = live.truth()
    store = server.state.store
    for conn in server.state.config.connections:
        counts = truth["counts"][conn.id]
        assert set(counts) == set(conn.entities)
        if conn.kind == "ehr":
            for entity in NEW_TYPES.values():
                assert counts[entity] > 0, (conn.id, entity)
            # One report and one inbound order per laboratory order.
            assert counts["diagnostic_reports"] == counts["orders"]
    # Components: two per blood pressure panel, counted from the records themselves.
    from sandbox.population.store import Query

    for conn_id, per in truth["components"].items():
        results = list(store.iter(Query(conn_id, "results")))
        assert per == {"result_components": sum(len(r.components) for r in results)}
        assert per["result_components"] > 0
        live_parts = sum(
            len(r.components) for r in results if r.status not in ("cancelled", "entered-in-error")
        )
        assert truth["live_components"][conn_id] == {"result_components": live_parts}
    categories = Counter(r.category for r in store.iter(Query(CONN, "results")))
    assert {"laboratory", "vital-signs", "social-history", "survey", "exam"} <= set(categories)


def test_new_types_refuse_a_search_without_a_required_set(live: Live) -> None:
    for rtype in NEW_TYPES:
        r = live.fhir_search(CONN, rtype, {"_lastUpdated": "ge2000-01-01"})
        assert r.status_code == 400, (rtype, r.text[:200])
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "patient" in outcome["issue"][0]["diagnostics"]
    # Redox lists no `code` for AllergyIntolerance: refused by name, never echoed.
    r = live.fhir_search(CONN, "AllergyIntolerance", {"patient": "x", "code": "secret-value"})
    assert r.status_code == 400 and "code" in r.text and "secret-value" not in r.text


def test_every_new_type_searches_by_patient_identifier_reads_and_validates(
    live: Live, patient: dict[str, Any]
) -> None:
    ident = mrn_identifier(live, CONN, patient)
    seen: dict[str, int] = {}
    for rtype in NEW_TYPES:
        by_identifier, total = live.fhir_all(CONN, rtype, {"patient.identifier": ident})
        by_id, _ = live.fhir_all(CONN, rtype, {PATIENT_PARAM.get(rtype, "patient"): patient["id"]})
        assert [r["id"] for r in by_identifier] == [r["id"] for r in by_id]
        assert total == len(by_identifier)
        for resource in by_identifier:
            fhir_valid(resource)
            assert resource["resourceType"] == rtype
            ref = (resource.get("subject") or resource.get("patient"))["reference"]
            assert ref == f"Patient/{patient['id']}"
            read = live.fhir_read(CONN, rtype, resource["id"])
            assert read.status_code == 200 and read.json() == resource
        seen[rtype] = len(by_identifier)
    assert seen["DiagnosticReport"] == seen["ServiceRequest"] > 0
    assert sum(seen.values()) > seen["DiagnosticReport"] * 2


def test_diagnostic_reports_group_the_patients_own_results(live: Live, patient: dict[str, Any]) -> None:
    reports, _ = live.fhir_all(CONN, "DiagnosticReport", {"patient": patient["id"]})
    orders, _ = live.fhir_all(CONN, "ServiceRequest", {"patient": patient["id"]})
    order_ids = {o["identifier"][0]["value"] for o in orders}
    assert reports
    for report in reports:
        assert report["identifier"][0]["value"] in order_ids  # the report's lab order is served
        for ref in report["result"]:
            obs = live.fhir_read(CONN, "Observation", ref["reference"].split("/", 1)[1]).json()
            assert obs["subject"]["reference"] == f"Patient/{patient['id']}"
            assert obs["identifier"][0]["value"] == ref["identifier"]["value"]
            assert obs["basedOn"][0]["identifier"]["value"] == report["identifier"][0]["value"]
        # `result` finds the report from one of its Observations.
        first = report["result"][0]["reference"]
        found, _ = live.fhir_all(CONN, "DiagnosticReport", {"patient": patient["id"], "result": first})
        assert report["id"] in {r["id"] for r in found}


def test_observations_of_every_category_and_component_only_blood_pressure(
    live: Live, server: SandboxServer
) -> None:
    from sandbox.population.store import Query

    store = server.state.store
    bp = next(r for r in store.iter(Query(CONN, "results")) if r.components)
    obs = live.fhir_read(CONN, "Observation", bp.id).json()
    fhir_valid(obs)
    assert not any(k.startswith("value") for k in obs) and "dataAbsentReason" not in obs
    assert [c["code"]["coding"][0]["code"] for c in obs["component"]] == ["8480-6", "8462-4"]
    assert all(c["valueQuantity"]["code"] == "mm[Hg]" for c in obs["component"])
    for category in ("social-history", "survey", "exam"):
        rec = next(r for r in store.iter(Query(CONN, "results", category=category)))
        found, _ = live.fhir_all(
            CONN, "Observation", {"patient": rec.patient.patient_id, "category": category}
        )
        assert rec.id in {r["id"] for r in found}
        assert all(r["category"][0]["coding"][0]["code"] == category for r in found)


def test_revinclude_covers_the_new_types(live: Live) -> None:
    conn_id = "northwind-fhir"  # honours _revinclude (riverbend does not)
    roster = live.http.get(f"{live.url}/_sandbox/roster", params={"connection": conn_id}).json()["patients"]
    included: Counter[str] = Counter()
    for ident in roster[:15]:
        token = f"{ident['system']}|{ident['value']}"
        entries: list[dict[str, Any]] = []
        r = live.fhir_search(conn_id, "Patient", {"identifier": token, "_revinclude": "*", "_count": "200"})
        while True:
            assert r.status_code == 200, r.text[:200]
            bundle = r.json()
            entries += bundle.get("entry", [])
            nxt = next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None)
            if nxt is None:
                break
            r = live.http.post(nxt, headers=live.bearer())
        for e in entries:
            if e["search"]["mode"] == "include":
                included[e["resource"]["resourceType"]] += 1
    for rtype in ("Condition", "Immunization", "DiagnosticReport", "ServiceRequest"):
        assert included[rtype] > 0, rtype


def test_clinical_summary_carries_the_same_records_as_fhir(live: Live, patient: dict[str, Any]) -> None:
    mrn = mrn_identifier(live, CONN, patient).split("|", 1)[1]
    summary = live.dm_ok(
        CONN, "Clinical Summary", "PatientQuery", Patient={"Identifiers": [{"ID": mrn, "IDType": "MR"}]}
    )
    conditions, _ = live.fhir_all(CONN, "Condition", {"patient": patient["id"]})
    fhir_problems = {
        (c["code"]["coding"][0]["code"], c["onsetDateTime"].replace("Z", "")) for c in conditions
    }
    dm_problems = {(p["Code"], p["StartDate"].removesuffix(".000Z")) for p in summary["Problems"]}
    assert fhir_problems == dm_problems and fhir_problems

    allergies, _ = live.fhir_all(CONN, "AllergyIntolerance", {"patient": patient["id"]})
    assert {a["code"]["coding"][0]["code"] for a in allergies} == {
        a["Substance"]["Code"] for a in summary["Allergies"]
    }
    immunizations, _ = live.fhir_all(CONN, "Immunization", {"patient": patient["id"]})
    assert Counter(
        (i["vaccineCode"]["coding"][0]["code"], i["occurrenceDateTime"].replace("Z", ""))
        for i in immunizations
    ) == Counter(
        (i["Product"]["Code"], i["DateTime"].removesuffix(".000Z")) for i in summary["Immunizations"]
    )
    assert all(i["Product"]["CodeSystemName"] == "CVX" for i in summary["Immunizations"])
    procedures, _ = live.fhir_all(CONN, "Procedure", {"patient": patient["id"]})
    assert Counter(
        (p["code"]["coding"][0]["code"], p["performedPeriod"]["start"].replace("Z", "")) for p in procedures
    ) == Counter(
        (p["Code"], p["DateTime"].removesuffix(".000Z")) for p in summary["Procedures"]["Procedures"]
    )
    orders, _ = live.fhir_all(CONN, "ServiceRequest", {"patient": patient["id"], "status": "active"})
    assert {(o["code"]["coding"][0]["code"], o["occurrenceDateTime"].replace("Z", "")) for o in orders} == {
        (o["Code"], o["DateTime"].removesuffix(".000Z")) for o in summary["PlanOfCare"]["Orders"]
    }
    # Vital signs: a blood pressure panel appears as its systolic and diastolic observations.
    vitals = [o["Code"] for group in summary["VitalSigns"] for o in group["Observations"]]
    assert "85354-9" not in vitals
    assert vitals.count("8480-6") == vitals.count("8462-4")
    # Every order, whatever its status, through Order.Query (the same ids as FHIR ServiceRequest).
    all_orders, _ = live.fhir_all(CONN, "ServiceRequest", {"patient": patient["id"]})
    answer = live.dm_ok(CONN, "Order", "Query", Patients=[{"Identifiers": [{"ID": mrn, "IDType": "MR"}]}])
    assert {o["ID"] for o in answer["Orders"]} == {o["identifier"][0]["value"] for o in all_orders}


def test_every_clinical_summary_example_section_validates_in_our_shape(live: Live) -> None:
    """Our sections use the field names of Redox's own example (shared redox-examples)."""
    example_dir = Path(__file__).resolve().parents[1] / "fixtures" / "redox-examples" / "datamodel"
    examples = sorted((example_dir / "clinicalsummary").rglob("*.json"))
    example = next(
        (json.loads(p.read_text()) for p in examples if "Problems" in p.read_text()),
        None,
    )
    if example is None:
        pytest.skip("no Clinical Summary example at hand")
    roster = live.http.get(f"{live.url}/_sandbox/roster", params={"connection": CONN}).json()["patients"]
    summary = live.dm_ok(
        CONN,
        "Clinical Summary",
        "PatientQuery",
        Patient={"Identifiers": [{"ID": roster[0]["value"], "IDType": "MR"}]},
    )
    for section in ("Problems", "Allergies", "Immunizations"):
        if example.get(section) and summary[section]:
            assert set(summary[section][0]) <= set(example[section][0]) | {"Status", "ReasonNotGiven"}


def test_order_changes_push_order_events_and_service_request_notifications(server: SandboxServer) -> None:
    population = SyntheticPopulation(sandbox_config(patients=60))
    changes = population.advance(5, 0.2)
    conns = {c.id: c for c in population._config.connections}  # type: ignore[attr-defined]
    kinds = Counter()
    for change in changes:
        conn = conns[change.record.connection_id]
        if change.entity == "orders":
            events = render_event(change, conn) if "datamodel" in conn.surfaces else []
            for event in events:
                strict_redox(event)
                assert event["Meta"]["DataModel"] == "Order"
                kinds[event["Meta"]["EventType"]] += 1
            if "fhir" in conn.surfaces:
                note = render_redox_notification(change, conn)
                assert note["entry"][0]["resource"]["eventUri"].startswith(
                    "https://fhir.redoxengine.com/EventDefinition/ServiceRequest"
                )
                fhir_valid(note["entry"][1]["resource"])
        elif change.entity in ("problems", "allergies", "immunizations", "procedures", "diagnostic_reports"):
            assert render_event(change, conn) == []  # pull-only: no Data Model family pushes them
    assert kinds["New"] > 0


# ---- outside data: the third-party fixture ------------------------------------------------


def file_counts(root: Path) -> Counter[str]:
    """Resources per mapped entity in the fixture files, counted independently of the loader."""
    counts: Counter[str] = Counter()
    for path in sorted(root.rglob("*.json")):
        data = json.loads(path.read_text())
        resources = [e["resource"] for e in data["entry"]] if data["resourceType"] == "Bundle" else [data]
        for resource in resources:
            entity = SERVED_TYPES.get(resource["resourceType"])
            if entity is not None:
                counts[entity] += 1
    return counts


@pytest.fixture(scope="module")
def seeded() -> Iterator[SandboxServer]:
    started = SandboxServer(sandbox_config(), seed_from=FIXTURE).start()
    yield started
    started.stop()


def test_third_party_fixture_is_small_and_licensed() -> None:
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 2_000_000
    readme = (FIXTURE / "README.md").read_text()
    assert "Apache License 2.0" in readme and "CC0" in readme
    assert list(FIXTURE.glob("LICENSE-*"))


def test_seed_from_serves_every_mapped_resource_of_the_third_party_files(seeded: SandboxServer) -> None:
    expected = file_counts(FIXTURE)
    assert expected["results"] > 200 and expected["problems"] and expected["allergies"]
    client = Live(seeded.url, client_name="seeded-client")
    try:
        counts = client.truth()["counts"]["seeded"]
        assert {e: n for e, n in counts.items() if n} == dict(expected)
        components = client.truth()["components"]["seeded"]["result_components"]
        assert components >= 2 * 32  # Synthea's component-only blood pressure panels
        # Every served resource is found by a per-patient search and validates.
        roster = client.http.get(f"{client.url}/_sandbox/roster", params={"connection": "seeded"}).json()
        served: Counter[str] = Counter()
        for ident in roster["patients"]:
            patients, _ = client.fhir_all(
                "seeded", "Patient", {"identifier": f"{ident['system']}|{ident['value']}"}
            )
            [patient] = patients
            for rtype, entity in {**NEW_TYPES, "Observation": "results", "Encounter": "encounters"}.items():
                found, _ = client.fhir_all(
                    "seeded", rtype, {PATIENT_PARAM.get(rtype, "patient"): patient["id"]}
                )
                for resource in found:
                    fhir_valid(resource)
                served[entity] += len(found)
        for entity in (*NEW_TYPES.values(), "results", "encounters"):
            assert served[entity] == expected[entity], entity
        # The Data Model surface serves the same outside records (strictly valid).
        sections: Counter[str] = Counter()
        for ident in roster["patients"]:
            summary = client.dm_ok(
                "seeded",
                "Clinical Summary",
                "PatientQuery",
                Patient={"Identifiers": [{"ID": ident["value"], "IDType": "MR"}]},
            )
            sections["problems"] += len(summary["Problems"])
            sections["allergies"] += len(summary["Allergies"])
            sections["immunizations"] += len(summary["Immunizations"])
            sections["procedures"] += len(summary["Procedures"]["Procedures"])
        assert dict(sections) == {e: expected[e] for e in sections}
    finally:
        client.close()


def test_seed_from_lists_what_it_cannot_serve_without_values() -> None:
    loaded = read_seed_dir(FIXTURE)
    lines = startup_report(loaded)
    assert lines[0].startswith("seed-from: serving ")
    not_served = {line.split(": ")[2] for line in lines[1:]}
    assert not_served == {"Claim", "ExplanationOfBenefit", "CarePlan", "ImagingStudy"}
    assert all("resource type not served by the sandbox" in line for line in lines[1:])
    # Counts only: no names, identifiers or clinical values from the files.
    assert not any(word in "\n".join(lines) for word in ("Johnnie", "Luna", "Chalmers", "Peter"))


def test_seed_from_groups_a_reports_results_and_invents_no_order_panel() -> None:
    """A DiagnosticReport's Observations carry its order number and panel (the Data Model
    sends a lab report as one Results order); an Observation no order asked for keeps its own
    id as order number and is flagged as such, so no surface invents an order panel for it."""
    loaded = read_seed_dir(FIXTURE)
    results = {r.id: r for r in loaded.records["results"]}
    reports = loaded.records["diagnostic_reports"]
    grouped = {rid for report in reports for rid in report.result_ids}
    assert len(reports) == 3 and len(grouped) == 23
    for report in reports:
        for rid in report.result_ids:
            assert (results[rid].order_id, results[rid].panel) == (report.order_id, report.code)
            assert results[rid].has_order
    lone = [r for r in results.values() if r.id not in grouped]
    assert lone and not any(r.has_order for r in lone)


def test_seeded_results_query_sends_reports_as_orders_and_lone_observations_without_a_procedure(
    seeded: SandboxServer,
) -> None:
    client = Live(seeded.url, client_name="seeded-results")
    try:
        roster = client.http.get(f"{client.url}/_sandbox/roster", params={"connection": "seeded"}).json()
        orders = []
        for ident in roster["patients"]:
            answer = client.dm_ok(
                "seeded",
                "Results",
                "Query",
                Patients=[{"Identifiers": [{"ID": ident["value"], "IDType": "MR"}]}],
            )
            orders += answer["Orders"]
    finally:
        client.close()
    with_procedure = [o for o in orders if o["Procedure"]["Code"]]
    # The files' three lab reports (Synthea's two CBCs of 11 results, HL7's f001 with the one
    # of its results in the folder); every other order is a lone Observation, panel-less.
    assert sorted((o["Procedure"]["Code"], len(o["Results"])) for o in with_procedure) == [
        ("58410-2", 1),
        ("58410-2", 11),
        ("58410-2", 11),
    ]
    assert len(orders) - len(with_procedure) == file_counts(FIXTURE)["results"] - 23
