"""The sandbox end to end: a real server on a free loopback port, an independent client.

The client here is deliberately not the project's own (``resources.client``): it signs its
own assertions with pyjwt, talks plain httpx, and checks payloads with the third-party
oracles the issue names — the ``redox`` package's models in strict mode (after dropping
``Meta.Message`` / ``Meta.Transmission``) and ``fhir.resources`` R4B.

The helpers at the top (``Live``, ``Receiver``, ``strict_redox``, ``fhir_valid``) are shared by
the other end-to-end modules (``test_control``, ``test_determinism``).
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fhir.resources.R4B import get_fhir_model_class
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from redox.factory import redox_object_factory

from sandbox.server import SandboxServer
from tests.conftest import sandbox_config

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_TYPES = (
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
)
# Which FHIR resource types together hold one truth entity.
ENTITY_TYPES = {
    "patients": ("Patient",),
    "encounters": ("Encounter",),
    "results": ("Observation",),
    "medications": ("MedicationRequest", "MedicationStatement"),
    "appointments": ("Appointment",),
    "documents": ("DocumentReference",),
    "problems": ("Condition",),
    "allergies": ("AllergyIntolerance",),
    "immunizations": ("Immunization",),
    "procedures": ("Procedure",),
    "diagnostic_reports": ("DiagnosticReport",),
    "orders": ("ServiceRequest",),
}

# Key generation is the slow part of a client; every Live client shares these.
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP384R1())


def public_jwk(private_key: Any, kid: str) -> dict[str, Any]:
    if isinstance(private_key, rsa.RSAPrivateKey):
        jwk = json.loads(RSAAlgorithm.to_jwk(private_key.public_key()))
        jwk.update(kid=kid, alg="RS384", use="sig")
    else:
        jwk = json.loads(ECAlgorithm.to_jwk(private_key.public_key()))
        jwk.update(kid=kid, alg="ES384", use="sig")
    return jwk


def strict_redox(payload: dict[str, Any]) -> Any:
    """The project's Data Model oracle: strict ``redox`` models, Message/Transmission dropped."""
    candidate = copy.deepcopy(payload)
    candidate["Meta"].pop("Message", None)
    candidate["Meta"].pop("Transmission", None)
    return redox_object_factory(candidate)


def fhir_valid(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def next_link(bundle: dict[str, Any]) -> str | None:
    return next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)


class Live:
    """A Redox client of a running sandbox, built only from the control plane's contract."""

    def __init__(self, url: str, client_name: str = "e2e-client") -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=60)
        self.meta = self.http.get(f"{self.url}/_sandbox/connections").json()
        self.conns = {c["id"]: c for c in self.meta["connections"]}
        self.token_url = self.meta["token_url"]
        self.key, self.kid = RSA_KEY, "e2e-rsa-1"
        self.client_id = self.register(client_name, [public_jwk(self.key, self.kid)])
        self._token: str | None = None

    def close(self) -> None:
        self.http.close()

    # ---- control plane --------------------------------------------------------------------

    def register(self, name: str, keys: list[dict[str, Any]]) -> str:
        r = self.http.post(f"{self.url}/_sandbox/clients", json={"name": name, "jwks": {"keys": keys}})
        assert r.status_code == 200, r.text
        return r.json()["client_id"]

    def truth(self) -> dict[str, Any]:
        r = self.http.get(f"{self.url}/_sandbox/truth")
        assert r.status_code == 200, r.text
        return r.json()

    def faults(self, **body: Any) -> dict[str, Any]:
        r = self.http.post(f"{self.url}/_sandbox/faults", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def advance(self, days: float, change_fraction: float) -> dict[str, Any]:
        r = self.http.post(
            f"{self.url}/_sandbox/advance", json={"days": days, "change_fraction": change_fraction}
        )
        assert r.status_code == 200, r.text
        return r.json()

    # ---- auth -----------------------------------------------------------------------------

    def assertion(self, key: Any = None, kid: str | None = None, alg: str = "RS384", **claims: Any) -> str:
        now = int(time.time())
        body = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + 240,
            "jti": str(uuid.uuid4()),
        }
        body.update(claims)
        return jwt.encode(body, key or self.key, algorithm=alg, headers={"kid": kid or self.kid})

    def token_call(self, assertion: str) -> httpx.Response:
        return self.http.post(
            self.token_url,
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
            },
        )

    def new_token(self) -> str:
        r = self.token_call(self.assertion())
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self.new_token()
        return self._token

    def bearer(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    # ---- FHIR -----------------------------------------------------------------------------

    def fhir_base(self, conn_id: str) -> str:
        return self.conns[conn_id]["fhir_base_url"]

    def fhir_search(
        self, conn_id: str, rtype: str, params: dict[str, str] | None = None, token: str | None = None
    ) -> httpx.Response:
        return self.http.post(
            f"{self.fhir_base(conn_id)}/{rtype}/_search", data=params or {}, headers=self.bearer(token)
        )

    def fhir_all(self, conn_id: str, rtype: str, params: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
        """Every resource of a search, following ``next`` links; -> (resources, Bundle.total)."""
        r = self.fhir_search(conn_id, rtype, params)
        resources: list[dict[str, Any]] = []
        totals = set()
        for _ in range(10_000):
            assert r.status_code == 200, r.text[:300]
            bundle = r.json()
            assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
            totals.add(bundle["total"])
            resources += [e["resource"] for e in bundle.get("entry", [])]
            url = next_link(bundle)
            if url is None:
                break
            r = self.http.post(url, headers=self.bearer())
        assert len(totals) == 1, f"Bundle.total changed while paging: {totals}"
        return resources, totals.pop()

    def fhir_read(self, conn_id: str, rtype: str, rid: str) -> httpx.Response:
        return self.http.get(f"{self.fhir_base(conn_id)}/{rtype}/{rid}", headers=self.bearer())

    # ---- Data Model -----------------------------------------------------------------------

    def dm(
        self,
        conn_id: str,
        data_model: str,
        event_type: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        **body: Any,
    ) -> httpx.Response:
        conn = self.conns[conn_id]
        meta = {
            "DataModel": data_model,
            "EventType": event_type,
            "Destinations": [{"ID": conn["destination_id"], "Name": conn["name"]}],
        }
        return self.http.post(
            conn["datamodel_url"],
            json={"Meta": meta, **body},
            headers={**self.bearer(token), **(headers or {})},
        )

    def dm_ok(self, conn_id: str, data_model: str, event_type: str, **body: Any) -> dict[str, Any]:
        """A Data Model answer that is 200, error-free and strictly valid."""
        r = self.dm(conn_id, data_model, event_type, **body)
        assert r.status_code == 200, f"{data_model}.{event_type}: {r.status_code} {r.text[:300]}"
        payload = r.json()
        assert "Errors" not in payload["Meta"], payload["Meta"]["Errors"]
        assert payload["Meta"]["Logs"][0]["ID"]
        strict_redox(payload)
        return payload


class Receiver:
    """A webhook destination on 127.0.0.1. ``answer_challenge=False`` is one that never verifies."""

    def __init__(self, answer_challenge: bool = True) -> None:
        self.events: list[tuple[dict[str, str], bytes]] = []
        self.challenges = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    data = json.loads(body)
                except ValueError:
                    data = None
                is_challenge = isinstance(data, dict) and "challenge" in data and "Meta" not in data
                with receiver._lock:
                    if is_challenge:
                        receiver.challenges += 1
                    else:
                        receiver.events.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.end_headers()
                if is_challenge and answer_challenge:
                    self.wfile.write(str(data["challenge"]).encode())

            def do_GET(self) -> None:  # noqa: N802 - the GET variant of the handshake
                with receiver._lock:
                    receiver.challenges += 1
                self.send_response(200)
                self.end_headers()
                if answer_challenge:
                    self.wfile.write(parse_qs(urlparse(self.path).query).get("challenge", [""])[0].encode())

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/redox-hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(body) for _, body in self.events]

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.events) >= count:
                    break
            time.sleep(0.05)
        return self.payloads()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def wait_until_delivered(live: Live, timeout_s: float = 30.0) -> dict[str, int]:
    """Poll truth until no webhook event is pending; -> the webhooks block."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = live.truth()["webhooks"]
        if stats["pending"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


# ---- a 1,000-patient population, served for real ----------------------------------------

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big() -> Iterator[Live]:
    server = SandboxServer(sandbox_config(patients=1000)).start()
    live = Live(server.url)
    live.server = server  # type: ignore[attr-defined]  # lets a test switch the search policy
    try:
        yield live
    finally:
        live.close()
        server.stop()


def roster_of(live: Live, conn_id: str) -> list[dict[str, str]]:
    r = live.http.get(f"{live.url}/_sandbox/roster", params={"connection": conn_id})
    assert r.status_code == 200, r.text
    return r.json()["patients"]


def test_every_fhir_resource_of_a_connection_validates_and_totals_agree_with_truth(big: Live) -> None:
    """The Redox way: each roster MRN -> one Patient search with ``_revinclude=*``."""
    conn_id = "northwind-fhir"
    counts = big.truth()["counts"][conn_id]
    served: dict[str, set[str]] = {t: set() for t in FHIR_TYPES}
    for ident in roster_of(big, conn_id):
        params = {"identifier": f"{ident['system']}|{ident['value']}", "_revinclude": "*", "_count": "500"}
        r = big.fhir_search(conn_id, "Patient", params)
        while True:
            assert r.status_code == 200, r.text[:300]
            bundle = r.json()
            assert bundle["total"] == 1
            for entry in bundle.get("entry", []):
                resource = entry["resource"]
                assert resource["id"] not in served[resource["resourceType"]], "served twice"
                served[resource["resourceType"]].add(resource["id"])
                fhir_valid(resource)
            url = next_link(bundle)
            if url is None:
                break
            r = big.http.post(url, headers=big.bearer())
    for entity, types in ENTITY_TYPES.items():
        assert sum(len(served[t]) for t in types) == counts[entity], entity


def test_small_pages_of_the_both_connection_page_completely(big: Live) -> None:
    conn_id = "riverbend-both"
    counts = big.truth()["counts"][conn_id]
    window = {"date": "ge1900-01-01"}  # encounters by date: the one search Redox allows without a patient
    encounters, total = big.fhir_all(conn_id, "Encounter", {"_count": "37", **window})
    assert total == len(encounters) == counts["encounters"]
    assert len({e["id"] for e in encounters}) == total
    first = big.fhir_search(conn_id, "Encounter", {"_count": "37", **window}).json()
    assert len(first["entry"]) == 37 and first["total"] == total and next_link(first)
    # The connection's default page size applies without _count.
    default = big.fhir_search(conn_id, "Encounter", window).json()
    assert len(default["entry"]) == big.conns[conn_id]["page_size"]
    assert default["total"] == counts["encounters"]


def test_documents_have_binary_content_that_reads_back(big: Live) -> None:
    conn_id = "northwind-fhir"
    entries: list[dict[str, Any]] = []
    for record in sample_patients(big, conn_id, 12):
        bundle = big.fhir_search(conn_id, "DocumentReference", {"patient": record["patient_id"]}).json()
        entries += bundle.get("entry", [])
    assert len(entries) >= 5
    for entry in entries[:5]:
        attachment = entry["resource"]["content"][0]["attachment"]
        binary_id = attachment["url"].rsplit("/", 1)[-1]
        raw = big.fhir_read(conn_id, "Binary", binary_id)
        assert raw.status_code == 200
        assert raw.headers["content-type"].startswith(attachment["contentType"])
        assert len(raw.content) == attachment["size"]
        as_json = big.http.get(
            f"{big.fhir_base(conn_id)}/Binary/{binary_id}",
            headers={**big.bearer(), "Accept": "application/fhir+json"},
        ).json()
        fhir_valid(as_json)


def sample_patients(live: Live, conn_id: str, n: int) -> list[dict[str, str]]:
    """``n`` of the connection's patients spread over the population, from truth.persons."""
    records = [
        rec
        for person in live.truth()["persons"]
        for rec in person["records"]
        if rec["connection_id"] == conn_id
    ]
    step = max(1, len(records) // n)
    return records[::step][:n]


def mr(record: dict[str, str]) -> list[dict[str, str]]:
    return [{"ID": record["mrn"], "IDType": "MR"}]


@pytest.mark.parametrize("conn_id", ["lakeside-dm", "riverbend-both"])
def test_every_query_type_validates_strictly_over_several_patients(big: Live, conn_id: str) -> None:
    answered: dict[str, int] = {}

    def ask(data_model: str, event_type: str, **body: Any) -> dict[str, Any]:
        payload = big.dm_ok(conn_id, data_model, event_type, **body)
        answered[f"{data_model}.{event_type}"] = answered.get(f"{data_model}.{event_type}", 0) + 1
        return payload

    for record in sample_patients(big, conn_id, 6):
        found = ask("PatientSearch", "Query", Patient={"Identifiers": mr(record)})
        assert {"ID": record["mrn"], "IDType": "MR"} in found["Patient"]["Identifiers"]
        demographics = found["Patient"]["Demographics"]
        by_demographics = ask(
            "PatientSearch",
            "Query",
            Patient={
                "Demographics": {k: demographics[k] for k in ("FirstName", "LastName", "DOB")},
            },
        )
        candidates = [by_demographics["Patient"], *by_demographics["PotentialMatches"]]
        assert any({"ID": record["mrn"], "IDType": "MR"} in p["Identifiers"] for p in candidates)
        patients = [{"Identifiers": mr(record)}]
        visits = ask("PatientAdmin", "VisitQuery", Patients=patients, VisitStartDateTime="2000-01-01")
        results = ask("Results", "Query", Patients=patients, LastUpdated={"StartDateTime": "2000-01-01"})
        summary = ask("Clinical Summary", "PatientQuery", Patient={"Identifiers": mr(record)})
        assert summary["Header"]["Patient"]["Identifiers"]
        docs = ask(
            "Clinical Summary",
            "DocumentQuery",
            Patient={"Identifiers": mr(record)},
            Document={"StartDate": "2000-01-01", "EndDate": "2030-12-31"},
        )
        for doc in docs["Documents"][:2]:
            ask("Clinical Summary", "DocumentGet", Document={"ID": doc["ID"]})
        ask("Notes", "Query", Patients=patients)
        ask("Media", "Query", Patients=patients)
        for visit in [v for p in visits["Patients"] for v in p["Visits"]][:1]:
            ask("PatientAdmin", "VisitQuery", VisitNumbers=[visit["VisitNumber"]])
        for order in results["Orders"][:1]:
            ask("Results", "Query", Patients=patients, OrderIDs=[order["ID"]])
            ask("Order", "Query", Patients=patients, OrderIDs=[order["ID"]])
    ask("PatientAdmin", "CensusQuery")
    ask("Scheduling", "Booked", StartDateTime="2026-10-01", EndDateTime="2026-12-31")
    ask("Scheduling", "AvailableSlots", StartDateTime="2026-11-02", EndDateTime="2026-11-06")
    assert len(answered) == 12, sorted(answered)  # every query type the sandbox answers


@pytest.fixture
def open_policy(big: Live) -> Iterator[None]:
    """``search_policy: open`` (not Redox: bare time windows) for one test."""
    config = big.server.state.config  # type: ignore[attr-defined]
    config.search_policy = "open"
    try:
        yield
    finally:
        config.search_policy = "redox"


@pytest.mark.usefixtures("open_policy")
def test_data_model_windows_enumerate_every_visit_and_result_of_truth(big: Live) -> None:
    conn_id = "lakeside-dm"
    page_size = big.conns[conn_id]["page_size"]
    counts = big.truth()["counts"][conn_id]
    visits: set[str] = set()
    cursor = "2000-01-01"
    for _ in range(500):
        body = big.dm_ok(conn_id, "PatientAdmin", "VisitQuery", VisitStartDateTime=cursor)
        page = [v for p in body["Patients"] for v in p["Visits"]]
        visits |= {v["VisitNumber"] for v in page}
        if len(page) < page_size:
            break
        cursor = max(v["VisitDateTime"] for v in page)
    assert len(visits) == counts["encounters"]
    results: set[str] = set()
    cursor = "2000-01-01"
    for _ in range(500):
        body = big.dm_ok(conn_id, "Results", "Query", LastUpdated={"StartDateTime": cursor})
        orders = body["Orders"]
        # A blood pressure panel's components carry the panel's result id in RelatedGroupID.
        results |= {r["RelatedGroupID"] or f"{o['ID']}-{r['Code']}" for o in orders for r in o["Results"]}
        if len(orders) < page_size:
            break
        cursor = max(o["LastUpdated"] for o in orders)
    assert len(results) == counts["results"]


def test_the_network_connection_answers_patient_and_document_queries_only(big: Live) -> None:
    conn_id = "carequality-network"
    assert big.conns[conn_id]["kind"] == "network" and big.conns[conn_id]["fhir_base_url"] is None
    truth = big.truth()
    person = next(p for p in truth["persons"] if any(r["connection_id"] == conn_id for r in p["records"]))
    epi = [{"ID": person["enterprise_id"], "IDType": "EPI"}]
    found = big.dm_ok(conn_id, "PatientSearch", "Query", Patient={"Identifiers": epi})
    assert found["Patient"]["Identifiers"]
    docs = big.dm_ok(
        conn_id,
        "Clinical Summary",
        "DocumentQuery",
        Patient={"Identifiers": epi},
        Document={"StartDate": "2000-01-01", "EndDate": "2030-12-31"},
    )
    for doc in docs["Documents"][:3]:
        got = big.dm_ok(conn_id, "Clinical Summary", "DocumentGet", Document={"ID": doc["ID"]})
        assert got["Data"]
    refused = big.dm(conn_id, "PatientAdmin", "VisitQuery", VisitStartDateTime="2000-01-01")
    assert refused.status_code == 403 and refused.json()["Meta"]["Errors"]
    assert big.conns[conn_id]["write_entities"] == []


def test_a_record_reads_the_same_through_both_surfaces(big: Live) -> None:
    conn_id = "riverbend-both"
    for record in sample_patients(big, conn_id, 4):
        fhir = big.fhir_read(conn_id, "Patient", record["patient_id"]).json()
        fhir_valid(fhir)
        dm = big.dm_ok(conn_id, "PatientSearch", "Query", Patient={"Identifiers": mr(record)})["Patient"]
        demographics = dm["Demographics"]
        assert fhir["birthDate"] == demographics["DOB"]
        assert fhir["name"][0]["family"] == demographics["LastName"]
        assert fhir["name"][0]["given"][0] == demographics["FirstName"]
        fhir_values = {i["value"] for i in fhir["identifier"]}
        dm_values = {i["ID"] for i in dm["Identifiers"]}
        assert record["mrn"] in fhir_values and record["mrn"] in dm_values
        assert dm_values <= fhir_values | {record["patient_id"]}
