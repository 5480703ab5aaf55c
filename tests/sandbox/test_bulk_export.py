"""FHIR Bulk Data export (``Group/{id}/$export``) end to end against a real sandbox.

One connection is configured ``bulk_export: true``; a plain httpx client drives the FHIR Bulk
Data Access flow from the control plane's contract only: kick-off (``Prefer: respond-async``)
-> 202 + ``Content-Location`` -> poll 202 then 200 with the manifest -> NDJSON per type behind
the bearer token. The files must hold exactly truth's records, byte-equal to what per-patient
searches return, ``_since`` must limit them, and cancelling must remove the export.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from sandbox.config import default_connections
from sandbox.server import SandboxServer
from tests.conftest import sandbox_config
from tests.sandbox.test_server_e2e import ENTITY_TYPES, Live, fhir_valid, next_link

BULK = "northwind-fhir"
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    conns = [replace(c, bulk_export=True) if c.id == BULK else c for c in default_connections()]
    started = SandboxServer(sandbox_config(connections=conns)).start()
    yield started
    started.stop()


@pytest.fixture
def live(server: SandboxServer) -> Iterator[Live]:
    client = Live(server.url, client_name="bulk-client")
    yield client
    client.close()


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def kickoff_url(live: Live, conn_id: str = BULK, group: str | None = None) -> str:
    group = group or live.conns[conn_id]["bulk_group_id"]
    return f"{live.fhir_base(conn_id)}/Group/{group}/$export"


def kickoff(
    live: Live, params: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    return live.http.get(
        kickoff_url(live), params=params or {}, headers={**live.bearer(), **(headers or ASYNC)}
    )


def outcome(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]


def run_export(live: Live, params: dict[str, str] | None = None) -> dict[str, Any]:
    """Kick off, poll (202 then 200) and return the manifest."""
    started = kickoff(live, params)
    assert started.status_code == 202, started.text
    status_url = started.headers["Content-Location"]
    assert status_url.startswith(live.fhir_base(BULK))
    first = live.http.get(status_url, headers=live.bearer())
    assert first.status_code == 202 and first.headers["X-Progress"].startswith("in progress")
    done = live.http.get(status_url, headers=live.bearer())
    assert done.status_code == 200, done.text
    manifest = done.json()
    manifest["_status_url"] = status_url
    return manifest


def download(live: Live, url: str) -> list[dict[str, Any]]:
    r = live.http.get(url, headers=live.bearer())
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+ndjson")
    lines = r.content.splitlines()
    assert all(lines), "no blank lines in NDJSON"
    return [orjson.loads(line) for line in lines]


def test_connections_list_the_bulk_entitlement_and_group(live: Live) -> None:
    for conn_id, conn in live.conns.items():
        assert conn["bulk_export"] is (conn_id == BULK)
        assert (conn["bulk_group_id"] is not None) is (conn_id == BULK)
        assert conn["refresh_days"] == 7


def test_bulk_export_end_to_end_equals_truth_and_per_patient_searches(live: Live) -> None:
    manifest = run_export(live)
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert manifest["request"] == kickoff_url(live)
    truth = live.truth()
    assert instant(manifest["transactionTime"]) == datetime.fromisoformat(truth["now"])
    by_type: dict[str, list[dict[str, Any]]] = {}
    for output in manifest["output"]:
        assert output["url"].startswith(live.fhir_base(BULK))
        assert live.http.get(output["url"]).status_code == 401  # the bearer token is required
        resources = download(live, output["url"])
        assert len(resources) == output["count"] > 0
        assert {r["resourceType"] for r in resources} == {output["type"]}
        assert output["type"] not in by_type  # one file per type
        by_type[output["type"]] = resources
    counts = truth["counts"][BULK]
    for entity, types in ENTITY_TYPES.items():
        assert sum(len(by_type.get(t, [])) for t in types) == counts[entity], entity
        for t in types:
            assert len({r["id"] for r in by_type.get(t, [])}) == len(by_type.get(t, []))
    for resource in by_type["Patient"][:3] + by_type["Observation"][:3] + by_type["DocumentReference"][:3]:
        fhir_valid(resource)
    # Same renderers: a patient's revinclude search returns exactly the exported resources.
    exported = {(r["resourceType"], r["id"]): r for rs in by_type.values() for r in rs}
    for patient in by_type["Patient"][:: max(1, len(by_type["Patient"]) // 5)][:5]:
        r = live.fhir_search(BULK, "Patient", {"_id": patient["id"], "_revinclude": "*", "_count": "500"})
        bundle = r.json()
        assert next_link(bundle) is None
        for entry in bundle["entry"]:
            resource = entry["resource"]
            assert exported[(resource["resourceType"], resource["id"])] == resource


def test_since_limits_the_export_and_picks_up_changes(live: Live) -> None:
    full = run_export(live, {"_type": "Patient,Encounter,Observation"})
    assert [o["type"] for o in full["output"]] == ["Patient", "Encounter", "Observation"]
    everything = {o["type"]: download(live, o["url"]) for o in full["output"]}
    since = datetime.fromisoformat(live.truth()["now"]) - timedelta(days=60)
    stamp = since.isoformat().replace("+00:00", "Z")
    limited = run_export(live, {"_type": "Encounter,Observation", "_since": stamp})
    for output in limited["output"]:
        got = download(live, output["url"])
        expected = [r for r in everything[output["type"]] if instant(r["meta"]["lastUpdated"]) >= since]
        assert {r["id"] for r in got} == {r["id"] for r in expected} and 0 < len(got) < len(
            everything[output["type"]]
        )
    # After time moves, an export since the previous transactionTime holds exactly the changes.
    moved = live.advance(3, 0.05)
    assert moved["changes"] > 0
    delta = run_export(live, {"_since": full["transactionTime"]})
    changed = sum(o["count"] for o in delta["output"])
    assert 0 < changed <= moved["changes"]
    for output in delta["output"]:
        for resource in download(live, output["url"]):
            assert instant(resource["meta"]["lastUpdated"]) >= instant(full["transactionTime"])


def test_kickoff_refusals(live: Live) -> None:
    assert live.http.get(kickoff_url(live), headers=ASYNC).status_code == 401
    issue = outcome(kickoff(live, headers={"Accept": "application/fhir+json"}), 400)
    assert "respond-async" in issue["diagnostics"]
    outcome(kickoff(live, {"_type": "Practitioner"}), 400)
    outcome(kickoff(live, {"_since": "yesterday"}), 400)
    issue = outcome(kickoff(live, {"_typeFilter": "Observation?code=1"}), 400)
    assert "'_typeFilter'" in issue["diagnostics"]
    outcome(kickoff(live, {"_outputFormat": "text/csv"}), 400)
    assert (
        live.http.get(kickoff_url(live, group="not-a-group"), headers={**live.bearer(), **ASYNC}).status_code
        == 404
    )
    other = "riverbend-both"
    r = live.http.get(
        f"{live.fhir_base(other)}/Group/{live.conns[BULK]['bulk_group_id']}/$export",
        headers={**live.bearer(), **ASYNC},
    )
    assert outcome(r, 403)["code"] == "forbidden"


def test_cancel_removes_the_export_and_other_clients_cannot_see_it(live: Live, server: SandboxServer) -> None:
    started = kickoff(live, {"_type": "Patient"})
    status_url = started.headers["Content-Location"]
    stranger = Live(server.url, client_name="another-client")
    try:
        assert stranger.http.get(status_url, headers=stranger.bearer()).status_code == 404
    finally:
        stranger.close()
    assert live.http.get(status_url).status_code == 401
    cancelled = live.http.delete(status_url, headers=live.bearer())
    assert cancelled.status_code == 202
    assert outcome(live.http.get(status_url, headers=live.bearer()), 404)["code"] == "not-found"
    # A finished export's files go with it too.
    manifest = run_export(live, {"_type": "Patient"})
    url = manifest["output"][0]["url"]
    assert live.http.delete(manifest["_status_url"], headers=live.bearer()).status_code == 202
    assert live.http.get(url, headers=live.bearer()).status_code == 404
