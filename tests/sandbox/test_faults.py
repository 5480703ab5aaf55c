"""Fault injection and rolling-window rate limiting (REDOX-REFERENCE §6)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import replace

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from sandbox.config import SandboxConfig
from sandbox.faults import ConnectionDropped, Faults

DM_PATH = "/endpoint"
FHIR_PATH = "/fhir/R4/riverbend-medical/Development/Patient/_search"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_config(quota_requests: int | None = 7500, quota_window_s: float = 300.0, **connection_overrides):
    config = SandboxConfig(quota_requests=quota_requests, quota_window_s=quota_window_s)
    connections = [replace(c, **connection_overrides.get(c.id, {})) for c in config.connections]
    return replace(config, connections=connections)


def gated_app(config: SandboxConfig, faults: Faults) -> Starlette:
    """An app whose two endpoints do nothing but pass the gate for ``?conn=<id>``."""

    async def handler(request: Request) -> Response:
        conn = config.connection(request.query_params.get("conn", "riverbend-both"))
        refused = await faults.gate(conn, request)
        if refused is not None:
            return refused
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[Route(DM_PATH, handler, methods=["POST"]), Route(FHIR_PATH, handler, methods=["POST"])]
    )


def bearer_client(header: str | None) -> str | None:
    """Test stand-in for ``AuthServer.client_of``: the token *is* the client id."""
    return header.split()[-1] if header else None


class Harness:
    def __init__(self, config: SandboxConfig, seed: int = 11) -> None:
        self.clock = FakeClock()
        self.config = config
        self.faults = Faults(config, seed=seed, clock=self.clock)
        self.faults.bind_clients(bearer_client)
        self.client = TestClient(gated_app(config, self.faults))

    def post(
        self, path: str = DM_PATH, conn: str = "riverbend-both", client: str = "client-a"
    ) -> httpx.Response:
        return self.client.post(path, params={"conn": conn}, headers={"Authorization": f"Bearer {client}"})


@pytest.fixture
def small_window() -> Harness:
    return Harness(
        make_config(quota_requests=3, quota_window_s=10.0, **{"lakeside-dm": {"retry_after": True}})
    )


# ---- the per-client quota ----------------------------------------------------------------------


def test_rolling_window_429_carries_limit_header_but_no_retry_after(small_window: Harness) -> None:
    assert [small_window.post().status_code for _ in range(3)] == [200, 200, 200]
    refused = small_window.post()
    assert refused.status_code == 429
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert "Retry-After" not in refused.headers
    assert refused.headers["cache-control"] == "private, no-cache, no-store, must-revalidate"
    errors = refused.json()["Meta"]["Errors"]
    assert len(errors) == 1 and "Rate limit" in errors[0]["Text"]


def test_window_rolls_rather_than_resetting(small_window: Harness) -> None:
    small_window.post()  # t=1000
    small_window.clock.now += 6
    small_window.post()  # t=1006
    small_window.post()  # t=1006
    assert small_window.post().status_code == 429
    small_window.clock.now = 1009.9
    assert small_window.post().status_code == 429  # still inside the first request's window
    small_window.clock.now = 1010.5  # the t=1000 request has left the window: one slot
    assert small_window.post().status_code == 200
    assert small_window.post().status_code == 429
    small_window.clock.now = 1016.1  # both t=1006 requests have left
    assert [small_window.post().status_code for _ in range(3)] == [200, 200, 429]


def test_refused_requests_do_not_extend_the_window(small_window: Harness) -> None:
    for _ in range(3):
        small_window.post()
    for _ in range(50):
        small_window.clock.now += 0.1
        assert small_window.post().status_code == 429
    small_window.clock.now = 1010.01
    assert small_window.post().status_code == 200


def test_retry_after_is_sent_only_when_the_connection_says_so(small_window: Harness) -> None:
    small_window.post(conn="lakeside-dm")
    small_window.clock.now += 2.5
    small_window.post(conn="lakeside-dm")
    small_window.post(conn="lakeside-dm")
    refused = small_window.post(conn="lakeside-dm")
    assert refused.status_code == 429
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["Retry-After"] == "8"  # the first request leaves after 7.5 s, rounded up
    assert "Retry-After" not in small_window.post(conn="riverbend-both").headers


def test_fhir_paths_get_an_operation_outcome(small_window: Harness) -> None:
    for _ in range(3):
        small_window.post(FHIR_PATH)
    refused = small_window.post(FHIR_PATH)
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/fhir+json")
    outcome = refused.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "throttled"
    assert outcome["issue"][0]["severity"] == "error"


def test_one_client_shares_its_quota_across_connections_and_surfaces(small_window: Harness) -> None:
    assert small_window.post(conn="riverbend-both").status_code == 200
    assert small_window.post(FHIR_PATH, conn="northwind-fhir").status_code == 200
    assert small_window.post(conn="lakeside-dm").status_code == 200
    for conn in ("riverbend-both", "northwind-fhir", "lakeside-dm"):
        assert small_window.post(conn=conn).status_code == 429
    usage = small_window.faults.quota_usage()["client-a"]
    assert (usage["used"], usage["limit"], usage["rejected"]) == (3, 3, 3)


def test_each_client_has_its_own_quota(small_window: Harness) -> None:
    for _ in range(3):
        small_window.post(client="client-a")
    assert small_window.post(client="client-a").status_code == 429
    assert small_window.post(client="client-b").status_code == 200
    usage = small_window.faults.quota_usage()
    assert usage["client-a"]["used"] == 3 and usage["client-b"]["used"] == 1
    assert usage["client-b"]["rejected"] == 0


def test_a_lifted_quota_counts_but_never_refuses() -> None:
    harness = Harness(make_config(quota_requests=None))
    assert all(harness.post().status_code == 200 for _ in range(50))
    usage = harness.faults.quota_usage()["client-a"]
    assert (usage["used"], usage["limit"], usage["rejected"]) == (50, None, 0)


def test_rate_limit_rps_fault_uses_a_one_second_window_and_clears(small_window: Harness) -> None:
    small_window.faults.set({"rate_limit_rps": 2, "connection": "northwind-fhir"})
    statuses = [small_window.post(conn="northwind-fhir", client=f"c{i}").status_code for i in range(3)]
    assert statuses == [200, 200, 429]
    assert small_window.post(conn="northwind-fhir", client="c9").headers["X-RateLimit-Limit"] == "2"
    small_window.clock.now += 1.01
    assert small_window.post(conn="northwind-fhir", client="c3").status_code == 200
    small_window.faults.set({})
    assert all(small_window.post(conn="northwind-fhir", client=f"d{i}").status_code == 200 for i in range(20))


# ---- injected failures -------------------------------------------------------------------------


def test_error_rate_gives_a_mix_of_500_502_503_with_bodies() -> None:
    harness = Harness(make_config())
    harness.faults.set({"error_rate": 1.0})
    responses = [harness.post() for _ in range(40)]
    assert {r.status_code for r in responses} == {500, 502, 503}
    assert all(r.json()["Meta"]["Errors"][0]["Text"] for r in responses)
    fhir = harness.post(FHIR_PATH)
    assert fhir.json()["resourceType"] == "OperationOutcome"


def test_partial_error_rate_is_reproducible_from_the_seed() -> None:
    def statuses(seed: int) -> list[int]:
        harness = Harness(make_config(), seed=seed)
        harness.faults.set({"error_rate": 0.3})
        return [harness.post().status_code for _ in range(60)]

    first = statuses(5)
    assert first == statuses(5)
    assert 5 < sum(s != 200 for s in first) < 35


def test_timeout_rate_stalls_then_answers_504() -> None:
    harness = Harness(make_config())
    harness.faults.set({"timeout_rate": 1.0, "timeout_s": 0.2})
    started = time.monotonic()
    response = harness.post(FHIR_PATH)
    assert time.monotonic() - started >= 0.2
    assert response.status_code == 504
    assert response.json()["issue"][0]["code"] == "timeout"


def test_latency_adds_connection_and_fault_delays() -> None:
    harness = Harness(make_config(**{"riverbend-both": {"latency_ms": 100.0}}))
    harness.faults.set({"latency_ms": 100})
    started = time.monotonic()
    assert harness.post().status_code == 200
    assert time.monotonic() - started >= 0.2


def test_drop_rate_aborts_the_response_in_process() -> None:
    harness = Harness(make_config())
    harness.faults.set({"drop_rate": 1.0})
    with pytest.raises(ConnectionDropped):
        harness.post()


def test_drop_rate_breaks_the_connection_over_real_http() -> None:
    config = make_config()
    faults = Faults(config, seed=3)
    faults.set({"drop_rate": 1.0, "connection": "riverbend-both"})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(gated_app(config, faults), log_level="critical", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=5) as client:
            for path in (DM_PATH, FHIR_PATH):
                with pytest.raises(httpx.TransportError):
                    client.post(path, params={"conn": "riverbend-both"})
            # Other connections are unaffected, and the server keeps serving.
            assert client.post(DM_PATH, params={"conn": "lakeside-dm"}).json() == {"ok": True}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# ---- mangle, roll, rate ------------------------------------------------------------------------


def test_mangle_truncates_into_invalid_json_only_when_asked() -> None:
    faults = Faults(make_config(), seed=1)
    body = json.dumps(
        {"Meta": {"DataModel": "Results"}, "Orders": [{"ID": str(i)} for i in range(20)]}
    ).encode()
    assert faults.mangle("riverbend-both", body) == body
    faults.set({"malformed_rate": 1.0, "connection": "riverbend-both"})
    for _ in range(20):
        mangled = faults.mangle("riverbend-both", body + b"\n")
        assert body.startswith(mangled) and len(mangled) < len(body)
        with pytest.raises(ValueError):
            json.loads(mangled)
    assert faults.mangle("lakeside-dm", body) == body


def test_roll_and_rate_resolve_connection_then_global_then_config() -> None:
    config = replace(make_config(), webhook_duplicate_rate=0.25)
    faults = Faults(config, seed=1)
    assert faults.rate("webhook_duplicate_rate") == 0.25
    assert faults.rate("webhook_reorder", "lakeside-dm") == 0.0
    assert faults.rate("timeout_after_commit", "lakeside-dm") == 0.0
    assert not faults.roll("lakeside-dm", "timeout_after_commit")

    faults.set({"timeout_after_commit_rate": 1.0, "webhook_duplicate_rate": 0.5})
    faults.set({"connection": "lakeside-dm", "timeout_after_commit_rate": 0.0, "webhook_reorder": 1.0})
    assert faults.rate("webhook_duplicate_rate", "lakeside-dm") == 0.5
    assert faults.rate("webhook_reorder", "lakeside-dm") == 1.0
    assert faults.rate("webhook_reorder", "riverbend-both") == 0.0
    assert faults.roll("riverbend-both", "timeout_after_commit")
    assert faults.roll("riverbend-both", "timeout_after_commit_rate")
    assert not faults.roll("lakeside-dm", "timeout_after_commit")
    with pytest.raises(ValueError, match="unknown probability fault"):
        faults.rate("nonsense")


def test_connection_fault_overrides_global_one() -> None:
    harness = Harness(make_config())
    harness.faults.set({"error_rate": 1.0})
    harness.faults.set({"error_rate": 0.0, "connection": "lakeside-dm"})
    assert harness.post(conn="riverbend-both").status_code >= 500
    assert harness.post(conn="lakeside-dm").status_code == 200


def test_token_lifetime_override_is_global_and_clearable() -> None:
    faults = Faults(make_config(), seed=1)
    assert faults.token_lifetime_s() is None
    faults.set({"token_lifetime_s": 2})
    assert faults.token_lifetime_s() == 2.0
    faults.set({"token_lifetime_s": None})
    assert faults.token_lifetime_s() is None


def test_timeout_s_defaults_to_ten_seconds() -> None:
    faults = Faults(make_config(), seed=1)
    assert faults.timeout_s("lakeside-dm") == 10.0
    faults.set({"timeout_s": 0.5, "connection": "lakeside-dm"})
    assert faults.timeout_s("lakeside-dm") == 0.5
    assert faults.timeout_s("riverbend-both") == 10.0


# ---- set / snapshot / clear --------------------------------------------------------------------


def test_snapshot_shows_global_and_connection_faults_and_empty_body_clears_all() -> None:
    harness = Harness(make_config())
    harness.faults.set({"error_rate": 1.0, "latency_ms": 5})
    snapshot = harness.faults.set({"connection": "lakeside-dm", "drop_rate": 0.5, "rate_limit_rps": 3})
    assert snapshot == {
        "global": {"error_rate": 1.0, "latency_ms": 5.0},
        "connections": {"lakeside-dm": {"drop_rate": 0.5, "rate_limit_rps": 3}},
    }
    assert harness.faults.snapshot() == snapshot
    assert harness.faults.set({}) == {"global": {}, "connections": {}}
    assert harness.post().status_code == 200


def test_connection_alone_clears_only_that_connection() -> None:
    faults = Faults(make_config(), seed=1)
    faults.set({"error_rate": 0.5})
    faults.set({"connection": "lakeside-dm", "drop_rate": 0.5})
    assert faults.set({"connection": "lakeside-dm"}) == {"global": {"error_rate": 0.5}, "connections": {}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"explode_rate": 0.1}, "explode_rate"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"timeout_rate": "0.5"}, "timeout_rate"),
        ({"malformed_rate": True}, "malformed_rate"),
        ({"rate_limit_rps": 0}, "rate_limit_rps"),
        ({"rate_limit_rps": 2.5}, "rate_limit_rps"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"token_lifetime_s": 0}, "token_lifetime_s"),
        ({"token_lifetime_s": 5, "connection": "lakeside-dm"}, "token_lifetime_s"),
        ({"timeout_s": float("inf")}, "timeout_s"),
        ({"error_rate": 0.1, "connection": "nowhere"}, "connection"),
        ({"error_rate": 0.1, "connection": 3}, "connection"),
        ({"revoke_tokens": 3}, "revoke_tokens"),
    ],
)
def test_invalid_fault_bodies_name_the_field_and_change_nothing(body, field) -> None:
    faults = Faults(make_config(), seed=1)
    faults.set({"latency_ms": 1})
    before = faults.snapshot()
    with pytest.raises(ValueError, match=field):
        faults.set({"error_rate": 0.2, **body})
    assert faults.snapshot() == before


def test_body_must_be_an_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        Faults(make_config(), seed=1).set([("error_rate", 1)])  # type: ignore[arg-type]


# ---- partial failures and bad entries (unit level; end to end in test_quota_and_response_faults) -


def _bundle(n: int = 40) -> dict:
    return {
        "resourceType": "Bundle",
        "id": "b1",
        "type": "searchset",
        "total": n,
        "link": [{"relation": "self", "url": "http://x/self"}, {"relation": "next", "url": "http://x/next"}],
        "entry": [
            {
                "fullUrl": f"http://x/Encounter/e{i}",
                "resource": {
                    "resourceType": "Encounter",
                    "id": f"e{i}",
                    "meta": {"lastUpdated": "2026-01-02T03:04:05Z"},
                    "status": "finished",
                    "identifier": [{"system": "urn:redox:x:VN", "value": f"V{i}"}],
                    "period": {"start": "2024-12-31T10:00:00Z"},
                },
                "search": {"mode": "match"},
            }
            for i in range(n)
        ],
    }


def _results_body(n: int = 40) -> dict:
    return {
        "Meta": {"DataModel": "Results", "EventType": "QueryResponse"},
        "Orders": [
            {
                "ID": f"ORD{i}",
                "Status": "Resulted",
                "TransactionDateTime": "2024-12-31T10:00:00.000Z",
                "Patient": {"Identifiers": [{"ID": f"M{i}", "IDType": "MR"}]},
            }
            for i in range(n)
        ],
    }


def test_fhir_bad_entries_are_stable_per_seed_and_record_and_cover_every_defect() -> None:
    faults = Faults(make_config(), seed=3)
    clean = json.dumps(_bundle()).encode()
    assert faults.mangle("riverbend-both", clean) == clean  # no fault: byte-identical
    faults.set({"bad_entry_rate": 0.5})
    first, again = faults.mangle("riverbend-both", clean), faults.mangle("riverbend-both", clean)
    assert first == again
    other_seed = Faults(make_config(), seed=4)
    other_seed.set({"bad_entry_rate": 0.5})
    assert other_seed.mangle("riverbend-both", clean) != first
    entries = json.loads(first)["entry"]
    good = _bundle()["entry"]
    seen = set()
    for before, after in zip(good, entries, strict=True):
        if after == before:
            continue
        if not isinstance(after, dict):
            assert after in (1, "x", None)
            seen.add("wrong_type")
            continue
        resource = after["resource"]
        if resource["resourceType"] == "Basic":
            seen.add("unknown_type")
        elif "id" not in resource:
            seen.add("missing_id")
        elif resource.get("identifier") == []:
            seen.add("empty_identifiers")
        elif resource["period"]["start"] == "31/12/2024":
            seen.add("bad_date")
        elif resource["status"] == 1:
            seen.add("wrong_type")
        else:
            raise AssertionError(f"unexpected change: {resource}")
        assert resource.get("meta") == before["resource"]["meta"]  # meta.lastUpdated is kept
    assert seen == {"unknown_type", "missing_id", "bad_date", "wrong_type", "empty_identifiers"}
    faults.set({})
    assert faults.mangle("riverbend-both", clean) == clean


def test_fhir_partial_failure_replaces_the_results_with_an_outcome() -> None:
    faults = Faults(make_config(), seed=3)
    faults.set({"partial_failure_rate": 1.0, "connection": "northwind-fhir"})
    failed = json.loads(faults.mangle("northwind-fhir", json.dumps(_bundle()).encode()))
    assert failed["total"] == 0 and failed["link"] == [{"relation": "self", "url": "http://x/self"}]
    [entry] = failed["entry"]
    assert entry["search"]["mode"] == "outcome" and entry["resource"]["issue"][0]["severity"] == "error"
    # Other bodies (reads, outcomes, other connections) are left alone.
    read = json.dumps({"resourceType": "Patient", "id": "p"}).encode()
    assert faults.mangle("northwind-fhir", read) == read
    assert faults.mangle("riverbend-both", json.dumps(_bundle()).encode()) == json.dumps(_bundle()).encode()


def test_datamodel_partial_failures_are_reproducible_from_the_seed() -> None:
    def outcomes(seed: int) -> list[bool]:
        faults = Faults(make_config(), seed=seed)
        faults.set({"partial_failure_rate": 0.4})
        return ["Errors" in faults.shape_query("lakeside-dm", _results_body())["Meta"] for _ in range(50)]

    first = outcomes(9)
    assert first == outcomes(9)
    assert 5 < sum(first) < 40
    faults = Faults(make_config(), seed=9)
    faults.set({"partial_failure_rate": 1.0})
    failed = faults.shape_query("lakeside-dm", _results_body())
    [error] = failed["Meta"]["Errors"]
    assert set(error) == {"ID", "Text", "Type", "Module", "DestinationStatusCode"}
    assert (error["Type"], error["Module"]) == ("query", "Send") and failed["Orders"] == []


def test_datamodel_bad_entries_damage_records_deterministically() -> None:
    faults = Faults(make_config(), seed=2)
    faults.set({"bad_entry_rate": 0.5, "connection": "lakeside-dm"})
    first = faults.shape_query("lakeside-dm", _results_body())
    assert first == faults.shape_query("lakeside-dm", _results_body())
    clean = _results_body()["Orders"]
    changed = [(a, b) for a, b in zip(clean, first["Orders"], strict=True) if a != b]
    assert 5 < len(changed) < 35
    kinds = set()
    for _good, bad in changed:
        if not isinstance(bad, dict):
            kinds.add("wrong_type")
        elif bad["ID"] == "":
            kinds.add("missing_id")
        elif bad["Patient"]["Identifiers"] == []:
            kinds.add("empty_identifiers")
        elif bad["TransactionDateTime"] == "31/12/2024":
            kinds.add("bad_date")
        else:
            assert bad["Status"] == 1
            kinds.add("wrong_type")
    assert kinds == {"missing_id", "bad_date", "wrong_type", "empty_identifiers"}
    assert faults.shape_query("riverbend-both", _results_body()) == _results_body()


def test_ndjson_lines_get_the_same_defects() -> None:
    faults = Faults(make_config(), seed=3)
    lines = b"".join(json.dumps(e["resource"]).encode() + b"\n" for e in _bundle()["entry"])
    assert faults.damage_ndjson("riverbend-both", lines) == lines
    faults.set({"bad_entry_rate": 0.5})
    damaged = faults.damage_ndjson("riverbend-both", lines)
    assert damaged == faults.damage_ndjson("riverbend-both", lines) != lines
    assert len(damaged.splitlines()) == 40


def test_new_rate_faults_are_validated_like_the_others() -> None:
    faults = Faults(make_config(), seed=1)
    for name in ("partial_failure_rate", "bad_entry_rate"):
        with pytest.raises(ValueError, match=name):
            faults.set({name: 1.5})


def test_one_request_to_several_destinations_counts_once() -> None:
    config = make_config(quota_requests=5)
    faults = Faults(config, seed=1)
    faults.bind_clients(bearer_client)

    async def handler(request: Request) -> Response:
        for conn_id in ("riverbend-both", "lakeside-dm", "northwind-fhir"):
            refused = await faults.gate(config.connection(conn_id), request)
            if refused is not None:
                return refused
        return JSONResponse({"ok": True})

    client = TestClient(Starlette(routes=[Route(DM_PATH, handler, methods=["POST"])]))
    statuses = [client.post(DM_PATH, headers={"Authorization": "Bearer c"}).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    assert faults.quota_usage()["c"]["used"] == 5
