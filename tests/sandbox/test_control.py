"""The ``/_sandbox/`` control plane against the real server: every endpoint, its exact contract
shape, and the behaviour it controls (auth, webhooks, truth, writes, time, faults)."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sandbox.server import SandboxServer
from tests.sandbox.test_server_e2e import (
    EC_KEY,
    Live,
    Receiver,
    fhir_valid,
    public_jwk,
    strict_redox,
    wait_until_delivered,
)

ENTITIES = {
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
}
CONNECTION_KEYS = {
    "id",
    "revinclude",
    "bulk_export",
    "bulk_group_id",
    "refresh_days",
    "name",
    "kind",
    "surfaces",
    "entities",
    "write_entities",
    "fhir_base_url",
    "datamodel_url",
    "destination_id",
    "headers",
}
# A search Redox allows without a patient (REDOX-REFERENCE §3.3): encounters by date.
WINDOW = {"date": "ge1900-01-01"}
WRITE_KEYS = {"order_id", "connection_id", "surface", "idempotency_key", "payload", "received_at"}


@pytest.fixture
def live(sandbox_server: SandboxServer) -> Iterator[Live]:
    client = Live(sandbox_server.url)
    yield client
    client.close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(answer_challenge: bool = True) -> Receiver:
        made.append(Receiver(answer_challenge))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def register_webhook(live: Live, receiver: Receiver, token: str = "vt-e2e") -> httpx.Response:
    return live.http.post(f"{live.url}/_sandbox/webhooks", json={"url": receiver.url, "token": token})


# ---- GET /_sandbox/connections ----------------------------------------------------------


def test_connections_document_has_the_contract_shape(live: Live) -> None:
    doc = live.meta
    assert {"organization", "environment", "token_url", "legacy_auth_url", "connections"} <= set(doc)
    assert doc["environment"] == "Development" and doc["organization"]
    assert doc["token_url"] == f"{live.url}/v2/auth/token"
    assert doc["legacy_auth_url"] == f"{live.url}/auth"
    conns = doc["connections"]
    assert len(conns) >= 4
    for c in conns:
        assert set(c) >= CONNECTION_KEYS, c["id"]
        assert c["kind"] in ("ehr", "network")
        assert set(c["surfaces"]) <= {"fhir", "datamodel"} and c["surfaces"]
        assert set(c["entities"]) <= ENTITIES and "patients" in c["entities"]
        assert set(c["write_entities"]) <= {"orders", "appointments"}
        assert str(uuid.UUID(c["destination_id"])) == c["destination_id"]
        assert isinstance(c["headers"], dict)
        if "fhir" in c["surfaces"]:
            assert c["fhir_base_url"].startswith(f"{live.url}/fhir/R4/") and c["fhir_base_url"].endswith(
                "/Development"
            )
        else:
            assert c["fhir_base_url"] is None
        assert c["datamodel_url"] == (f"{live.url}/endpoint" if "datamodel" in c["surfaces"] else None)
    surfaces = [set(c["surfaces"]) for c in conns]
    assert {"fhir"} in surfaces and {"datamodel"} in surfaces and {"fhir", "datamodel"} in surfaces
    assert any(c["kind"] == "network" for c in conns)
    assert len({c["id"] for c in conns}) == len({c["destination_id"] for c in conns}) == len(conns)


# ---- POST /_sandbox/clients, /_sandbox/legacy-keys, and the token endpoints ----------------


def test_registering_the_same_name_again_replaces_the_key_set(live: Live) -> None:
    assert live.token_call(live.assertion()).status_code == 200
    newer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    again = live.register("e2e-client", [public_jwk(newer, "e2e-rsa-2")])
    assert again == live.client_id  # a rotation, not a new client
    old = live.token_call(live.assertion())
    assert old.status_code == 401
    assert old.json()["error_description"].startswith("Public key not found")
    assert live.token_call(live.assertion(key=newer, kid="e2e-rsa-2")).status_code == 200
    # An overlap period: both kids in one set, both sign.
    live.register("e2e-client", [public_jwk(newer, "e2e-rsa-2"), public_jwk(live.key, live.kid)])
    assert live.token_call(live.assertion()).status_code == 200
    assert live.token_call(live.assertion(key=newer, kid="e2e-rsa-2")).status_code == 200


def test_es384_clients_and_bad_jwks(live: Live) -> None:
    client_id = live.register("e2e-ec", [public_jwk(EC_KEY, "e2e-ec-1")])
    assert client_id != live.client_id
    r = live.token_call(live.assertion(key=EC_KEY, kid="e2e-ec-1", alg="ES384", iss=client_id, sub=client_id))
    assert r.status_code == 200 and r.json()["token_type"] == "Bearer" and r.json()["expires_in"] == 300
    for body in (
        {"name": "x"},
        {"name": "", "jwks": {"keys": []}},
        {"name": "x", "jwks": {"keys": [{"kty": "oct"}]}},
    ):
        bad = live.http.post(f"{live.url}/_sandbox/clients", json=body)
        assert bad.status_code == 400 and bad.json()["error"]


def test_auth_rejections_end_to_end(live: Live) -> None:
    def refused(assertion: str) -> dict[str, Any]:
        r = live.token_call(assertion)
        assert r.status_code == 401, r.text
        body = r.json()
        assert body["error"] == "invalid_request" and "access_token" not in body
        return body

    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(live.assertion(key=forger))  # bad signature: right kid, wrong key
    refused(live.assertion(aud="https://api.redoxengine.com/v2/auth/token"))  # wrong audience
    refused(live.assertion(exp=int(time.time()) - 120, iat=int(time.time()) - 200))  # expired
    refused(live.assertion(kid="never-registered"))
    once = live.assertion()
    assert live.token_call(once).status_code == 200
    refused(once)  # reused jti
    # Tokens: none, unknown, and a revoked one, on both surfaces.
    token = live.new_token()
    for header in ({}, {"Authorization": "Bearer not-a-token"}):
        r = live.http.post(
            f"{live.fhir_base('northwind-fhir')}/Encounter/_search", data=WINDOW, headers=header
        )
        assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
    live.faults(revoke_tokens=True)
    r = live.fhir_search("northwind-fhir", "Encounter", WINDOW, token=token)
    assert r.status_code == 401 and "revoked" in r.json()["issue"][0]["diagnostics"]
    r = live.dm("lakeside-dm", "PatientSearch", "Query", token=token, Patient={"Identifiers": []})
    assert r.status_code == 401 and r.json()["Meta"]["Errors"]
    assert live.faults() == {"global": {}, "connections": {}}  # revoking set no fault


def test_legacy_keys_authenticate_for_the_data_model_only(live: Live) -> None:
    r = live.http.post(f"{live.url}/_sandbox/legacy-keys")
    assert r.status_code == 200 and set(r.json()) == {"apiKey", "secret"}
    keys = r.json()
    auth_url = live.meta["legacy_auth_url"]
    wrong = live.http.post(f"{auth_url}/authenticate", json={"apiKey": keys["apiKey"], "secret": "wrong"})
    assert wrong.status_code == 401 and wrong.text == "Invalid request"
    r = live.http.post(f"{auth_url}/authenticate", json=keys)
    assert r.status_code == 200, r.text
    legacy = r.json()
    assert {"accessToken", "expires", "refreshToken"} <= set(legacy)
    record = next(
        p["records"][0] for p in live.truth()["persons"] if p["records"][0]["connection_id"] == "lakeside-dm"
    )
    ok = live.dm(
        "lakeside-dm",
        "PatientSearch",
        "Query",
        token=legacy["accessToken"],
        Patient={"Identifiers": [{"ID": record["mrn"], "IDType": "MR"}]},
    )
    assert ok.status_code == 200, ok.text
    strict_redox(ok.json())
    fhir = live.fhir_search("northwind-fhir", "Encounter", WINDOW, token=legacy["accessToken"])
    assert fhir.status_code == 401
    refreshed = live.http.post(
        f"{auth_url}/refreshToken", json={"apiKey": keys["apiKey"], "refreshToken": legacy["refreshToken"]}
    )
    assert refreshed.status_code == 200 and refreshed.json()["accessToken"] != legacy["accessToken"]
    reused = live.http.post(
        f"{auth_url}/refreshToken", json={"apiKey": keys["apiKey"], "refreshToken": legacy["refreshToken"]}
    )
    assert reused.status_code == 401


# ---- POST /_sandbox/webhooks --------------------------------------------------------------


def test_webhook_destinations_must_answer_the_challenge(live: Live, receivers) -> None:
    good, silent = receivers(), receivers(answer_challenge=False)
    r = register_webhook(live, good)
    assert r.status_code == 200, r.text
    assert r.json()["verified"] is True and r.json()["url"] == good.url and good.challenges == 1
    r = register_webhook(live, silent)
    assert r.status_code == 400 and r.json()["verified"] is False and "challenge" in r.json()["reason"]
    for body in ({"url": "ftp://x", "token": "t"}, {"url": good.url}, {}):
        assert live.http.post(f"{live.url}/_sandbox/webhooks", json=body).status_code == 400
    live.advance(1, 0.02)
    wait_until_delivered(live)
    assert good.events and not silent.events  # a refused destination never receives data


# ---- GET /_sandbox/truth ------------------------------------------------------------------


def test_truth_has_the_contract_shape_and_counts_agree_with_fhir_totals(live: Live) -> None:
    truth = live.truth()
    assert {"counts", "live", "persons", "webhooks"} <= set(truth)
    assert set(truth["webhooks"]) >= {"distinct_sent", "deliveries", "pending"}
    assert set(truth["counts"]) == set(live.conns) == set(truth["live"])
    for conn_id, conn in live.conns.items():
        assert set(truth["counts"][conn_id]) == set(conn["entities"])
        for entity, n in truth["counts"][conn_id].items():
            assert 0 <= truth["live"][conn_id][entity] <= n
    both = truth["counts"]["riverbend-both"]
    assert sum(truth["live"]["riverbend-both"].values()) < sum(both.values())  # some cancelled records
    bundle = live.fhir_search("riverbend-both", "Encounter", {"_count": "1", **WINDOW}).json()
    assert bundle["total"] == both["encounters"]  # counted once, though two surfaces expose it
    assert "persons" not in live.http.get(f"{live.url}/_sandbox/truth?persons=false").json()


def test_truth_persons_say_which_records_are_the_same_person(live: Live) -> None:
    truth = live.truth()
    persons = truth["persons"]
    assert len({p["enterprise_id"] for p in persons}) == len(persons)
    per_conn: dict[str, set[str]] = defaultdict(set)
    for person in persons:
        for rec in person["records"]:
            per_conn[rec["connection_id"]].add(rec["patient_id"])
    for conn_id, counts in truth["counts"].items():
        assert len(per_conn[conn_id]) == counts["patients"], conn_id
    shared = [p for p in persons if len({r["connection_id"] for r in p["records"]}) >= 2]
    assert shared, "no person is known to two connections"
    checked = 0
    for person in shared[:8]:
        assert len({r["mrn"] for r in person["records"]}) == len(person["records"])  # local MRNs
        for rec in person["records"]:
            conn = live.conns[rec["connection_id"]]
            if "fhir" in conn["surfaces"]:
                patient = live.fhir_read(rec["connection_id"], "Patient", rec["patient_id"]).json()
                values = {i["value"] for i in patient["identifier"]}
            else:
                found = live.dm_ok(
                    rec["connection_id"],
                    "PatientSearch",
                    "Query",
                    Patient={"Identifiers": [{"ID": rec["mrn"], "IDType": "MR"}]},
                )
                values = {i["ID"] for i in found["Patient"]["Identifiers"]}
            assert {rec["mrn"], person["enterprise_id"]} <= values
            checked += 1
    assert checked >= 16


def test_near_duplicates_share_demographics_but_are_different_people(sandbox_factory) -> None:
    # About the population, not search: list every patient under the (not-Redox) open policy.
    live = Live(sandbox_factory(patients=600, search_policy="open").url)
    people: dict[tuple, set[str]] = defaultdict(set)
    for conn_id in ("northwind-fhir", "riverbend-both"):
        patients, _ = live.fhir_all(conn_id, "Patient", {"_count": "500", "_lastUpdated": "ge1900-01-01"})
        for p in patients:
            epi = next(i["value"] for i in p["identifier"] if i["system"] == "urn:redox:enterprise:EPI")
            people[(p["name"][0]["family"], tuple(p["name"][0]["given"]), p["birthDate"])].add(epi)
    assert any(len(epis) > 1 for epis in people.values()), "no near-duplicate demographics"
    live.close()


# ---- GET /_sandbox/writes -----------------------------------------------------------------


def order_bundle(patient_id: str, order_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "message",
        "entry": [
            {
                "fullUrl": "urn:uuid:5d0c6f1e-2a1b-4c3d-8e9f-000000000001",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": "mh-e2e",
                    "eventUri": "https://fhir.redoxengine.com/EventDefinition/ServiceRequestCreate",
                    "source": {"name": "redox-elt", "endpoint": "urn:redox-elt"},
                    "focus": [{"reference": "ServiceRequest/sr-e2e"}],
                },
            },
            {
                "fullUrl": "urn:uuid:5d0c6f1e-2a1b-4c3d-8e9f-000000000002",
                "resource": {
                    "resourceType": "ServiceRequest",
                    "id": "sr-e2e",
                    "identifier": [{"system": "urn:redox:northwind-health:OrderID", "value": order_id}],
                    "status": "active",
                    "intent": "order",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "24323-8", "display": "CMP"}]},
                    "subject": {"reference": f"Patient/{patient_id}"},
                },
            },
            {
                "fullUrl": "urn:uuid:5d0c6f1e-2a1b-4c3d-8e9f-000000000003",
                "resource": {"resourceType": "Patient", "id": patient_id},
            },
        ],
    }


def dm_order(mrn: str, order_id: str) -> dict[str, Any]:
    return {
        "Patient": {"Identifiers": [{"ID": mrn, "IDType": "MR"}]},
        "Order": {
            "ID": order_id,
            "Status": "New",
            "Procedure": {"Code": "2345-7", "Codeset": "LOINC", "Description": "Glucose"},
        },
        "Visit": {"VisitNumber": "V-E2E-1"},
    }


def dm_appointment(mrn: str, visit_number: str) -> dict[str, Any]:
    return {
        "Patient": {"Identifiers": [{"ID": mrn, "IDType": "MR"}]},
        "Visit": {
            "VisitNumber": visit_number,
            "VisitDateTime": "2026-12-01T09:00:00.000Z",
            "Duration": 30,
            "Location": {"Facility": "RES General Hospital", "Department": "3S"},
        },
    }


def first_record(live: Live, conn_id: str) -> dict[str, str]:
    return next(r for p in live.truth()["persons"] for r in p["records"] if r["connection_id"] == conn_id)


def test_writes_lists_every_accepted_write_back_duplicates_included(live: Live) -> None:
    assert live.http.get(f"{live.url}/_sandbox/writes").json() == {"orders": [], "appointments": []}
    fhir_patient = first_record(live, "northwind-fhir")
    url = f"{live.fhir_base('northwind-fhir')}/ServiceRequest/$servicerequest-create"
    bundle = order_bundle(fhir_patient["patient_id"], "ORD-E2E-1")
    headers = {**live.bearer(), "Idempotency-Key": "idem-1"}
    first = live.http.post(url, json=bundle, headers=headers)
    assert first.status_code == 200, first.text
    fhir_valid(first.json())
    again = live.http.post(url, json=bundle, headers=headers)
    assert again.status_code == 200
    dm_patient = first_record(live, "lakeside-dm")
    for _ in range(2):
        r = live.dm("lakeside-dm", "Order", "New", **dm_order(dm_patient["mrn"], "ORD-E2E-2"))
        assert r.status_code == 200, r.text
        # An async SEND is acknowledged with the echoed Meta and one Log per destination (§2.3).
        ack = r.json()["Meta"]
        assert "Errors" not in ack and len(ack["Logs"]) == 1
        assert ack["Destinations"][0]["ID"] == live.conns["lakeside-dm"]["destination_id"]
    r = live.dm("lakeside-dm", "Scheduling", "New", **dm_appointment(dm_patient["mrn"], "VN-E2E-1"))
    assert r.status_code == 200, r.text
    writes = live.http.get(f"{live.url}/_sandbox/writes").json()
    assert set(writes) == {"orders", "appointments"}
    orders = writes["orders"]
    assert len(orders) == 4
    for w in orders + writes["appointments"]:
        assert set(w) >= WRITE_KEYS
    assert [(w["order_id"], w["connection_id"], w["surface"]) for w in orders] == [
        ("ORD-E2E-1", "northwind-fhir", "fhir"),
        ("ORD-E2E-1", "northwind-fhir", "fhir"),
        ("ORD-E2E-2", "lakeside-dm", "datamodel"),
        ("ORD-E2E-2", "lakeside-dm", "datamodel"),
    ]
    assert [w["duplicate"] for w in orders] == [False, True, False, True]
    assert [w["idempotency_key"] for w in orders] == ["idem-1", "idem-1", None, None]
    assert orders[0]["payload"] == bundle
    [appointment] = writes["appointments"]
    assert (appointment["order_id"], appointment["surface"]) == ("VN-E2E-1", "datamodel")
    refused = live.dm("carequality-network", "Order", "New", **dm_order(dm_patient["mrn"], "ORD-X"))
    assert refused.status_code == 403
    assert len(live.http.get(f"{live.url}/_sandbox/writes").json()["orders"]) == 4


# ---- POST /_sandbox/advance ---------------------------------------------------------------


def test_advance_grows_the_population_and_pushes_strictly_valid_events_in_order(
    live: Live, receivers
) -> None:
    receiver = receivers()
    assert register_webhook(live, receiver, "vt-advance").status_code == 200
    before = live.truth()
    moved = live.advance(1, 0.05)
    assert moved["changes"] > 0 and moved["now"] > before["now"]
    stats = wait_until_delivered(live)
    after = live.truth()
    assert after["now"] == moved["now"]
    for conn_id, counts in before["counts"].items():
        for entity, n in counts.items():
            assert after["counts"][conn_id][entity] >= n
    assert sum(map(sum, (c.values() for c in after["counts"].values()))) > sum(
        map(sum, (c.values() for c in before["counts"].values()))
    )
    assert any(
        after["live"][c][e] < after["counts"][c][e] - (before["counts"][c][e] - before["live"][c][e])
        for c in after["counts"]
        for e in after["counts"][c]
    ), "advance cancelled nothing"
    events = receiver.wait_for(stats["distinct_sent"])
    assert stats["pending"] == 0 and len(events) == stats["distinct_sent"] == stats["deliveries"] > 0
    for headers, _ in receiver.events:
        assert headers["verification-token"] == "vt-advance"
        assert headers["content-type"].startswith("application/json")
    # FHIR-only connections push FHIR notification Bundles, the others Data Model events.
    bundles = [e for e in events if e.get("resourceType") == "Bundle"]
    events = [e for e in events if "Meta" in e]
    assert bundles and len({b["id"] for b in bundles}) == len(bundles)
    assert all(b["entry"][0]["resource"]["eventUri"] for b in bundles)
    log_ids = [e["Meta"]["Logs"][0]["ID"] for e in events]
    assert len(set(log_ids)) == len(log_ids)
    times = [e["Meta"]["EventDateTime"] for e in events]
    assert times == sorted(times), "events arrived out of order"
    dm_conns = {c["destination_id"] for c in live.conns.values() if "datamodel" in c["surfaces"]}
    kinds = set()
    for event in events:
        strict_redox(event)
        assert {d["ID"] for d in event["Meta"]["Destinations"]} <= dm_conns
        kinds.add(event["Meta"]["DataModel"])
    assert {"PatientAdmin", "Results", "Scheduling", "Medications"} <= kinds
    assert kinds & {"Notes", "Media"}
    bad = live.http.post(f"{live.url}/_sandbox/advance", json={"days": -1})
    assert bad.status_code == 400


# ---- POST /_sandbox/faults ----------------------------------------------------------------


def patient_search(live: Live, conn_id: str = "northwind-fhir") -> httpx.Response:
    """A cheap search every FHIR connection answers 200 (encounters by date, no patient needed)."""
    return live.fhir_search(conn_id, "Encounter", {"_count": "5", **WINDOW})


def test_error_rate_gives_5xx_on_one_connection_only(live: Live) -> None:
    live.token  # noqa: B018 - fetch the token before the fault
    snapshot = live.faults(connection="northwind-fhir", error_rate=1.0)
    assert snapshot == {"global": {}, "connections": {"northwind-fhir": {"error_rate": 1.0}}}
    statuses = {patient_search(live).status_code for _ in range(12)}
    assert statuses <= {500, 502, 503} and len(statuses) >= 2
    outcome = patient_search(live).json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert patient_search(live, "riverbend-both").status_code == 200
    live.faults(connection="northwind-fhir", error_rate=0.5)
    statuses = [patient_search(live).status_code for _ in range(40)]
    assert 5 < statuses.count(200) < 35
    assert live.faults() == {"global": {}, "connections": {}}  # {} clears everything
    assert all(patient_search(live).status_code == 200 for _ in range(5))


def test_timeout_and_latency_faults(live: Live) -> None:
    live.token  # noqa: B018
    live.faults(timeout_rate=1.0, timeout_s=0.4)
    started = time.monotonic()
    r = patient_search(live)
    assert r.status_code == 504 and time.monotonic() - started >= 0.4
    with pytest.raises(httpx.ReadTimeout):
        live.http.post(
            f"{live.fhir_base('northwind-fhir')}/Encounter/_search",
            data=WINDOW,
            headers=live.bearer(),
            timeout=0.1,
        )
    live.faults()
    live.faults(latency_ms=300)
    started = time.monotonic()
    assert patient_search(live).status_code == 200
    assert time.monotonic() - started >= 0.3
    live.faults()
    started = time.monotonic()
    assert patient_search(live).status_code == 200
    assert time.monotonic() - started < 0.3


def test_drop_and_malformed_faults_break_the_body(live: Live) -> None:
    live.token  # noqa: B018
    live.faults(drop_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        patient_search(live)
    live.faults()
    live.faults(malformed_rate=1.0)
    r = patient_search(live)
    assert r.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)
    record = first_record(live, "lakeside-dm")
    r = live.dm(
        "lakeside-dm",
        "PatientSearch",
        "Query",
        Patient={"Identifiers": [{"ID": record["mrn"], "IDType": "MR"}]},
    )
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)
    live.faults()
    assert orjson.loads(patient_search(live).content)["resourceType"] == "Bundle"


def test_rate_limit_storm_gives_429_with_the_limit_header(live: Live) -> None:
    live.token  # noqa: B018
    live.faults(connection="northwind-fhir", rate_limit_rps=2)
    live.faults(connection="lakeside-dm", rate_limit_rps=2)
    statuses = [patient_search(live) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    limited = statuses[-1]
    assert limited.headers["X-RateLimit-Limit"] == "2" and "Retry-After" not in limited.headers
    assert limited.json()["issue"][0]["code"] == "throttled"
    record = first_record(live, "lakeside-dm")
    query = {"Patient": {"Identifiers": [{"ID": record["mrn"], "IDType": "MR"}]}}
    answers = [live.dm("lakeside-dm", "PatientSearch", "Query", **query) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    # This connection is configured to send Retry-After (Redox documents none by default).
    assert answers[-1].headers["X-RateLimit-Limit"] == "2" and int(answers[-1].headers["Retry-After"]) >= 1
    time.sleep(1.05)  # a rolling one-second window: slots free up
    assert patient_search(live).status_code == 200


def test_token_lifetime_fault_makes_tokens_expire(live: Live) -> None:
    live.faults(token_lifetime_s=1)
    r = live.token_call(live.assertion())
    assert r.json()["expires_in"] == 1
    token = r.json()["access_token"]
    assert patient_search(live).status_code == 200  # the cached token, issued before the fault
    assert live.fhir_search("northwind-fhir", "Encounter", WINDOW, token=token).status_code == 200
    time.sleep(1.1)
    expired = live.fhir_search("northwind-fhir", "Encounter", WINDOW, token=token)
    assert expired.status_code == 401 and "expired" in expired.json()["issue"][0]["diagnostics"]
    refused = live.http.post(
        f"{live.url}/_sandbox/faults", json={"connection": "northwind-fhir", "token_lifetime_s": 5}
    )
    assert refused.status_code == 400  # tokens are not tied to one connection
    live.faults()
    assert live.token_call(live.assertion()).json()["expires_in"] == 300


def test_timeout_after_commit_stores_the_write_and_the_retry_is_a_duplicate(live: Live) -> None:
    live.faults(connection="northwind-fhir", timeout_after_commit_rate=1.0, timeout_s=0.2)
    patient = first_record(live, "northwind-fhir")
    url = f"{live.fhir_base('northwind-fhir')}/ServiceRequest/$servicerequest-create"
    headers = {**live.bearer(), "Idempotency-Key": "commit-1"}
    lost = live.http.post(url, json=order_bundle(patient["patient_id"], "ORD-LOST"), headers=headers)
    assert lost.status_code == 504
    assert [w["order_id"] for w in live.http.get(f"{live.url}/_sandbox/writes").json()["orders"]] == [
        "ORD-LOST"
    ]
    live.faults()
    retry = live.http.post(url, json=order_bundle(patient["patient_id"], "ORD-LOST"), headers=headers)
    assert retry.status_code == 200
    orders = live.http.get(f"{live.url}/_sandbox/writes").json()["orders"]
    assert [w["duplicate"] for w in orders] == [False, True]


def message_id(event: dict) -> str:
    """What a receiver de-duplicates on: the Data Model Log ID, the FHIR Bundle id."""
    return event["Meta"]["Logs"][0]["ID"] if "Meta" in event else event["id"]


def event_time(event: dict) -> str:
    return event["Meta"]["EventDateTime"] if "Meta" in event else event["timestamp"]


def test_webhook_duplicate_fault_redelivers_with_the_same_log_id(live: Live, receivers) -> None:
    receiver = receivers()
    register_webhook(live, receiver)
    live.faults(webhook_duplicate_rate=1.0)
    live.advance(0.5, 0.02)
    distinct = wait_until_delivered(live)["distinct_sent"]
    # "pending" counts distinct events only: the last re-delivery may still be on its way.
    events = receiver.wait_for(2 * distinct)
    assert live.truth()["webhooks"]["deliveries"] == 2 * distinct == len(events) > 0
    log_ids = [message_id(e) for e in events]
    assert log_ids[0::2] == log_ids[1::2]  # each event goes out twice, back to back
    attempts = [e["Meta"]["Logs"][0]["AttemptID"] for e in events if "Meta" in e]
    assert len(set(attempts)) == len(attempts)  # every attempt gets a fresh AttemptID


def test_webhook_reorder_fault_swaps_events_but_loses_none(live: Live, receivers) -> None:
    receiver = receivers()
    register_webhook(live, receiver)
    live.faults(webhook_reorder=1.0)
    live.advance(0.5, 0.02)
    stats = wait_until_delivered(live)
    events = receiver.wait_for(stats["distinct_sent"])
    times = [event_time(e) for e in events]
    assert len(events) == stats["distinct_sent"] > 2 and times != sorted(times)
    assert len({message_id(e) for e in events}) == len(events)


def test_invalid_fault_bodies_are_refused_and_change_nothing(live: Live) -> None:
    live.faults(latency_ms=10)
    for body in ({"error_rate": 2}, {"nonsense": 1}, {"connection": "nowhere", "error_rate": 0.1}, [1]):
        r = live.http.post(f"{live.url}/_sandbox/faults", json=body)
        assert r.status_code == 400 and r.json()["error"]
    assert live.http.get(f"{live.url}/_sandbox/faults").json() == {
        "global": {"latency_ms": 10},
        "connections": {},
    }
