"""End to end on a running sandbox: the per-client quota (REDOX-REFERENCE §12.6), partial
failures (§12.11) and the ``bad_entry_rate`` fault (issue 14), over real HTTP."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest

from sandbox.config import SandboxConfig, SandboxConfigError, default_connections, load_config
from sandbox.damage import NON_OBJECTS
from sandbox.server import SandboxServer
from tests.sandbox.test_bulk_export import BULK, download, run_export
from tests.sandbox.test_server_e2e import Live

QUOTA = 12


@pytest.fixture(scope="module")
def quota_server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(patients=60, quota_requests=QUOTA, quota_window_s=300.0)) as server:
        yield server


@pytest.fixture(scope="module")
def fault_server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(patients=80, seed=5)) as server:
        yield server


@pytest.fixture
def live(fault_server: SandboxServer) -> Iterator[Live]:
    client = Live(fault_server.url, "faults-client")
    client.faults()  # {} clears every fault
    yield client
    client.faults()
    client.close()


def legacy_token(url: str) -> str:
    with httpx.Client(timeout=30) as http:
        key = http.post(f"{url}/_sandbox/legacy-keys").json()
        r = http.post(f"{url}/auth/authenticate", json=key)
        assert r.status_code == 200, r.text
        return r.json()["accessToken"]


def mrns(live: Live, conn_id: str) -> list[dict[str, str]]:
    """The connection's MR identifiers (from the truth's persons, as a roster would hold them)."""
    return [
        {"ID": record["mrn"], "IDType": "MR"}
        for person in live.truth()["persons"]
        for record in person["records"]
        if record["connection_id"] == conn_id
    ]


def a_patient(live: Live, conn_id: str) -> dict[str, str]:
    return mrns(live, conn_id)[0]


# ---- one quota per client ----------------------------------------------------------------------


def test_one_client_shares_one_quota_across_connections_and_surfaces(quota_server: SandboxServer) -> None:
    live = Live(quota_server.url, "quota-client")
    other_token = legacy_token(quota_server.url)  # a second client (legacy key) of the same sandbox
    try:
        token = live.token

        def call(i: int) -> httpx.Response:
            if i % 3 == 0:
                return live.fhir_search("northwind-fhir", "Patient", {"_id": "nobody"}, token=token)
            conn = "lakeside-dm" if i % 3 == 1 else "riverbend-both"
            return live.dm(
                conn,
                "PatientSearch",
                "Query",
                token=token,
                Patient={"Identifiers": [{"ID": "x", "IDType": "MR"}]},
            )

        # Two concurrent workers of one client: together they get exactly the quota.
        statuses: list[int] = []
        lock = threading.Lock()

        def worker(offset: int) -> None:
            for i in range(offset, offset + 30, 2):
                status = call(i).status_code
                with lock:
                    statuses.append(status)

        threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sum(s != 429 for s in statuses) == QUOTA
        assert statuses.count(429) == 30 - QUOTA

        fhir_refused = call(0)
        assert fhir_refused.status_code == 429
        assert fhir_refused.headers["X-RateLimit-Limit"] == str(QUOTA)
        assert "Retry-After" not in fhir_refused.headers  # northwind does not send it
        dm_refused = call(1)  # lakeside-dm is configured retry_after: true
        assert dm_refused.status_code == 429 and int(dm_refused.headers["Retry-After"]) >= 1
        assert dm_refused.json()["Meta"]["Errors"]

        # Another client has its own budget.
        answer = live.dm(
            "lakeside-dm", "PatientSearch", "Query", token=other_token, Patient={"Identifiers": [{"ID": "x"}]}
        )
        assert answer.status_code == 200

        quota = live.truth()["quota"]
        mine = quota[live.client_id]
        assert (mine["used"], mine["limit"], mine["rejected"]) == (QUOTA, QUOTA, 30 - QUOTA + 2)
        assert sum(1 for usage in quota.values() if usage["used"] == 1) == 1  # the legacy client
    finally:
        live.close()


def test_connections_document_reports_the_client_quota(quota_server: SandboxServer) -> None:
    doc = httpx.get(f"{quota_server.url}/_sandbox/connections", timeout=10).json()
    for conn in doc["connections"]:
        assert conn["rate_limit"] == {"requests": QUOTA, "window_s": 300.0, "scope": "client"}


# ---- partial failures --------------------------------------------------------------------------


def test_partial_failure_answers_200_with_meta_errors_and_no_results(live: Live) -> None:
    ident = a_patient(live, "lakeside-dm")
    live.faults(connection="lakeside-dm", partial_failure_rate=1.0)
    r = live.dm("lakeside-dm", "PatientSearch", "Query", Patient={"Identifiers": [ident]})
    assert r.status_code == 200
    body = r.json()
    [error] = body["Meta"]["Errors"]
    assert error["Type"] == "query" and error["Module"] == "Send" and error["Text"]
    assert error["DestinationStatusCode"] in (500, 502, 503, 504) and isinstance(error["ID"], int)
    assert body["Patient"] == {} and body["PotentialMatches"] == []
    live.faults()
    clean = live.dm_ok("lakeside-dm", "PatientSearch", "Query", Patient={"Identifiers": [ident]})
    assert clean["Patient"]["Identifiers"]


def test_partial_failure_on_a_fhir_search_is_an_outcome_entry(live: Live) -> None:
    live.faults(connection="northwind-fhir", partial_failure_rate=1.0)
    r = live.fhir_search("northwind-fhir", "Encounter", {"date": "ge2000-01-01"})
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and bundle["total"] == 0
    [entry] = bundle["entry"]
    assert entry["search"] == {"mode": "outcome"}
    outcome = entry["resource"]
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "error"
    assert not any(link.get("relation") == "next" for link in bundle.get("link", []))


# ---- bad entries -------------------------------------------------------------------------------


def _defect(good: dict[str, Any], bad: Any) -> str:
    """Which documented defect turned ``good`` into ``bad`` (fails on anything else)."""
    if bad in NON_OBJECTS:
        return "wrong_type"
    assert isinstance(bad, dict)
    changed = {k for k in good.keys() | bad.keys() if good.get(k) != bad.get(k)}
    if bad.get("resourceType") == "Basic":
        assert changed == {"resourceType"}
        return "unknown_type"
    if "id" in good and "id" not in bad:
        assert changed == {"id"}
        return "missing_id"
    if bad.get("identifier") == [] and good.get("identifier"):
        return "empty_identifiers"
    assert len(changed) == 1, changed
    [field] = changed
    if isinstance(bad[field], int):
        return "wrong_type"
    assert "/" in str(bad[field]) or "/" in repr(bad[field])  # DD/MM/YYYY somewhere inside
    return "bad_date"


def test_bad_entries_are_deterministic_per_record_and_cleared_by_reset(live: Live) -> None:
    params = {"date": "ge2000-01-01", "_count": "200"}
    clean = {
        e["resource"]["id"]: e["resource"]
        for e in live.fhir_search("riverbend-both", "Encounter", params).json()["entry"]
    }
    assert len(clean) >= 20
    live.faults(connection="riverbend-both", bad_entry_rate=0.3)
    first = live.fhir_search("riverbend-both", "Encounter", params).json()["entry"]
    again = live.fhir_search("riverbend-both", "Encounter", params).json()["entry"]
    assert first == again  # the same records, with the same defects, on every read
    assert len(first) == len(clean)
    defects = []
    for good, entry in zip(clean.values(), first, strict=True):
        bad = entry["resource"] if isinstance(entry, dict) else entry
        if bad != good:
            defects.append(_defect(good, bad))
    assert 0 < len(defects) < len(clean)
    assert len(set(defects)) >= 2
    live.faults()  # {} clears: the retry gets every record whole
    healed = live.fhir_search("riverbend-both", "Encounter", params).json()["entry"]
    assert [e["resource"] for e in healed] == list(clean.values())


def test_bad_entries_reach_data_model_records(live: Live) -> None:
    for ident in mrns(live, "riverbend-both")[:40]:
        query = {"Patients": [{"Identifiers": [ident]}]}
        clean = live.dm_ok("riverbend-both", "PatientAdmin", "VisitQuery", **query)
        if clean["Patients"] and len(clean["Patients"][0]["Visits"]) >= 2:
            break
    else:
        pytest.fail("no riverbend patient with two visits among the first 40")
    live.faults(connection="riverbend-both", bad_entry_rate=1.0)
    r = live.dm("riverbend-both", "PatientAdmin", "VisitQuery", **query)
    assert r.status_code == 200
    damaged = r.json()
    assert damaged["Patients"] != clean["Patients"] and len(damaged["Patients"]) == len(clean["Patients"])
    live.faults()
    assert (
        live.dm_ok("riverbend-both", "PatientAdmin", "VisitQuery", **query)["Patients"] == clean["Patients"]
    )


# ---- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"connections": [{"id": "a", "name": "A", "rate_limit": 10}]}, "'rate_limit' was removed"),
        ({"connections": [{"id": "a", "name": "A", "rate_window_s": 10}]}, "quota_window_s"),
        ({"search_policy": "lenient"}, "search_policy must be one of"),
        ({"quota_requests": 0}, "quota_requests must be a whole number"),
        ({"quota_requests": 2.5}, "quota_requests must be a whole number"),
        ({"quota_window_s": 0}, "quota_window_s must be a positive number"),
        ({"max_assertion_lifetime_s": float("nan")}, "max_assertion_lifetime_s"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(tmp_path, document: dict, message: str) -> None:
    path = tmp_path / "sandbox.json"
    path.write_text(json.dumps(document))
    with pytest.raises(SandboxConfigError, match=re.escape(message)):
        load_config(path)


def test_defaults_are_redox_strict_with_the_documented_quota() -> None:
    config = SandboxConfig()
    assert (config.search_policy, config.quota_requests, config.quota_window_s) == ("redox", 7500, 300.0)
    assert config.max_assertion_lifetime_s == 300.0


# ---- bad entries in bulk NDJSON ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bulk_server() -> Iterator[SandboxServer]:
    conns = [replace(c, bulk_export=True) if c.id == BULK else c for c in default_connections()]
    with SandboxServer(SandboxConfig(patients=60, seed=8, connections=conns)) as server:
        yield server


def test_bad_entries_reach_bulk_ndjson_files_and_clear(bulk_server: SandboxServer) -> None:
    live = Live(bulk_server.url, "bulk-faults-client")
    try:
        manifest = run_export(live)
        url = next(o["url"] for o in manifest["output"] if o["type"] == "Encounter")
        clean = download(live, url)
        live.faults(connection=BULK, bad_entry_rate=0.3)
        damaged = live.http.get(url, headers=live.bearer())
        assert damaged.status_code == 200
        lines = [orjson.loads(line) for line in damaged.content.splitlines()]
        assert len(lines) == len(clean)
        changed = [(good, bad) for good, bad in zip(clean, lines, strict=True) if good != bad]
        assert 0 < len(changed) < len(clean)
        assert {_defect(good, bad) for good, bad in changed} <= {
            "unknown_type",
            "missing_id",
            "bad_date",
            "wrong_type",
            "empty_identifiers",
        }
        assert live.http.get(url, headers=live.bearer()).content == damaged.content
        live.faults()
        assert download(live, url) == clean
    finally:
        live.close()
