"""RedoxClient behaviour pinned with scripted HTTP answers (httpx.MockTransport, no sockets).

The same behaviours are exercised end to end against the real sandbox in test_live_sandbox.py;
here each failure mode is forced exactly once so the retry/re-auth/scope rules are precise.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from resources.audit import AuditLog, read_audit_file
from resources.auth import OAuthTokenProvider
from resources.client import (
    BudgetDeferred,
    DataModelError,
    PagingCycleError,
    PartialFailure,
    RedoxAPIError,
    RedoxAuthError,
    RedoxClient,
    RetryPolicy,
    ScopeError,
)
from resources.keys import KeyRing
from resources.quota import BudgetError, RequestBudget
from resources.settings import Settings, settings_from_dict
from resources.throttle import AdaptiveThrottle

BASE = "http://redox.test"
FHIR = f"{BASE}/fhir/R4/north-slug/Development"
CANARY_NAME = "Zyxwvutsrq"


class FakeTokens:
    """Hands out token-1, then token-2 after token-1 is invalidated, and so on."""

    kind = "oauth"

    def __init__(self) -> None:
        self.current = 1
        self.invalidated: list[str] = []

    def get_token(self) -> str:
        return f"token-{self.current}"

    def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        if token == f"token-{self.current}":
            self.current += 1


def settings(tmp_path: Path, **conn: Any) -> Settings:
    connection = {
        "id": "north",
        "surfaces": ["fhir", "datamodel"],
        "entities": ["patients", "results"],
        "write_entities": ["orders"],
        "fhir_base_url": FHIR,
        "datamodel_url": f"{BASE}/endpoint",
        "destination_id": "dest-1",
    }
    connection.update(conn)
    return settings_from_dict(
        {
            "token_url": f"{BASE}/v2/auth/token",
            "auth": {"client_id": "client-1"},
            "connections": [connection],
            "audit": {"path": str(tmp_path / "audit.jsonl")},
        }
    )


class Script:
    """Answers requests from a list of (status, body, headers) or callables, recording each request."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(answer):
            return answer(request)
        status, body, headers = (answer + ({},))[:3] if len(answer) == 2 else answer
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers=headers)


class FakeClock:
    """Wall time for the request budget; its sleep advances time and is recorded."""

    def __init__(self, waits: list[float]) -> None:
        self.now = 1_800_000_000.0
        self.waits = waits

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def make_client(
    tmp_path: Path,
    script: Script,
    tokens: FakeTokens | None = None,
    retry: RetryPolicy | None = None,
    budget_requests: int = 1000,
    **conn: Any,
) -> tuple[RedoxClient, list[float]]:
    sleeps: list[float] = []
    pauses: list[float] = []  # the throttle's and the budget's waits, kept apart from the retry backoff
    clock = FakeClock(pauses)
    client = RedoxClient(
        settings(tmp_path, **conn),
        "north",
        audit=AuditLog(tmp_path / "audit.jsonl"),
        http=httpx.Client(transport=httpx.MockTransport(script)),
        throttle=AdaptiveThrottle(initial_rps=1000.0, max_rps=1000.0, sleep=pauses.append),
        budget=RequestBudget(
            tmp_path / f"budget-{len(list(tmp_path.glob('budget-*')))}.sqlite",
            requests=budget_requests,
            window_s=300.0,
            clock=clock,
            sleep=clock.sleep,
        ),
        fhir_tokens=tokens or FakeTokens(),
        datamodel_tokens=tokens or FakeTokens(),
        retry=retry or RetryPolicy(max_attempts=4, base_delay_s=0.01),
        rng=random.Random(1),
        sleep=sleeps.append,
    )
    client.test_pauses = pauses  # type: ignore[attr-defined]
    return client, sleeps


def bundle(n: int, next_url: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "Patient", "id": f"p{i}"}} for i in range(n)],
    }
    if next_url:
        out["link"] = [{"relation": "next", "url": next_url}]
    return out


# ---- minimum necessary ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda c: list(c.fhir_search("Encounter", {})),  # entity not listed
        lambda c: list(c.fhir_search("Patient", {"_revinclude": "MedicationRequest:patient"})),
        lambda c: list(c.fhir_search("Condition", {})),  # no entity maps to it
        lambda c: c.fhir_read("Patient", "../../admin"),
        lambda c: c.fhir_operation(
            "Appointment/$appointment-create", {"resourceType": "Bundle"}, "k"
        ),  # not a write entity
        lambda c: c.datamodel({"Meta": {"DataModel": "Scheduling", "EventType": "New"}}),
        lambda c: c.datamodel({"Meta": {"DataModel": "Medications", "EventType": "PatientQuery"}}),
        lambda c: c.datamodel(
            {"Meta": {"DataModel": "Results", "EventType": "Query", "Destinations": [{"ID": "other"}]}}
        ),
    ],
    ids=[
        "entity",
        "revinclude",
        "unmapped-type",
        "bad-id",
        "write-entity",
        "dm-write",
        "dm-read",
        "dm-destination",
    ],
)
def test_out_of_scope_calls_are_refused_without_a_request(
    tmp_path: Path, call: Callable[[RedoxClient], Any]
) -> None:
    script = Script((200, bundle(0)))
    client, _ = make_client(tmp_path, script)
    with pytest.raises(ScopeError):
        call(client)
    assert script.requests == []
    assert not (tmp_path / "audit.jsonl").exists() or read_audit_file(tmp_path / "audit.jsonl")[0] == []


def test_surface_not_listed_is_refused(tmp_path: Path) -> None:
    script = Script((200, bundle(0)))
    client, _ = make_client(tmp_path, script, surfaces=["datamodel"], fhir_base_url=None)
    with pytest.raises(ScopeError, match="fhir surface"):
        list(client.fhir_search("Patient", {}))
    assert script.requests == []


# ---- FHIR search, paging, audit -----------------------------------------------------------------


def test_search_posts_form_follows_next_links_and_audits_templates_only(tmp_path: Path) -> None:
    page2 = f"{FHIR}/Patient/_search?_page_token=abc"
    script = Script((200, bundle(2, page2)), (405, {"resourceType": "OperationOutcome"}), (200, bundle(1)))
    client, _ = make_client(tmp_path, script)
    resources = list(
        client.fhir_search(
            "Patient", {"family": CANARY_NAME, "_lastUpdated": ["ge2024-01-01", "lt2025-01-01"]}
        )
    )
    assert [r["id"] for r in resources] == ["p0", "p1", "p0"]
    first, second, third = script.requests
    assert first.method == "POST" and first.url.path.endswith("/Patient/_search") and not first.url.query
    assert parse_qsl(first.content.decode()) == [
        ("family", CANARY_NAME),
        ("_lastUpdated", "ge2024-01-01"),
        ("_lastUpdated", "lt2025-01-01"),
    ]
    assert first.headers["Authorization"] == "Bearer token-1"
    assert (second.method, third.method) == ("POST", "GET")  # 405 on the next link -> GET
    records, _ = read_audit_file(tmp_path / "audit.jsonl")
    assert [r["status_code"] for r in records] == [200, 405, 200]
    assert {r["path_template"] for r in records} == {"/fhir/R4/{slug}/{env}/Patient/_search"}
    assert records[0]["record_count"] == 2
    raw = (tmp_path / "audit.jsonl").read_text()
    assert CANARY_NAME not in raw and "_page_token" not in raw and "token-1" not in raw


def test_next_link_to_another_host_is_not_followed(tmp_path: Path) -> None:
    script = Script((200, bundle(1, "https://evil.example/steal")))
    client, _ = make_client(tmp_path, script)
    with pytest.raises(RedoxAPIError, match="another host"):
        list(client.fhir_search("Patient", {}))
    assert len(script.requests) == 1


# ---- retries -------------------------------------------------------------------------------------


def test_401_reauthenticates_once_then_gives_up(tmp_path: Path) -> None:
    tokens = FakeTokens()
    script = Script((401, {"resourceType": "OperationOutcome"}))
    client, _ = make_client(tmp_path, script, tokens=tokens)
    with pytest.raises(RedoxAuthError, match="after re-authenticating"):
        client.fhir_read("Patient", "p1")
    assert len(script.requests) == 2
    assert tokens.invalidated == ["token-1"]
    assert [r.headers["Authorization"] for r in script.requests] == ["Bearer token-1", "Bearer token-2"]


def test_401_then_success_is_one_retry(tmp_path: Path) -> None:
    script = Script((401, {}), (200, {"resourceType": "Patient", "id": "p1"}))
    client, _ = make_client(tmp_path, script)
    assert client.fhir_read("Patient", "p1")["id"] == "p1"
    assert len(script.requests) == 2


def test_429_honours_retry_after_and_slows_the_throttle(tmp_path: Path) -> None:
    script = Script(
        (429, {}, {"Retry-After": "3", "X-RateLimit-Limit": "50"}), (200, {"resourceType": "Patient"})
    )
    client, _ = make_client(tmp_path, script)
    client.fhir_read("Patient", "p1")
    assert len(script.requests) == 2
    assert max(client.test_pauses) >= 2.9  # the retry waited for Retry-After
    assert client.throttle.stats().decreases == 1 and client.throttle.stats().ceiling <= 50


def test_429_without_retry_after_still_recovers(tmp_path: Path) -> None:
    script = Script((429, {}, {"X-RateLimit-Limit": "7500"}), (429, {}), (200, {"resourceType": "Patient"}))
    client, _ = make_client(tmp_path, script)
    client.fhir_read("Patient", "p1")
    assert len(script.requests) == 3


def test_500_is_retried_for_reads_but_not_for_writes(tmp_path: Path) -> None:
    read_script = Script((500, {}), (200, {"resourceType": "Patient"}))
    client, sleeps = make_client(tmp_path, read_script)
    client.fhir_read("Patient", "p1")
    assert len(read_script.requests) == 2 and len(sleeps) == 1

    write_script = Script((500, {"Meta": {"Errors": [{"Text": "boom"}]}}))
    writer, _ = make_client(tmp_path, write_script)
    with pytest.raises(RedoxAPIError) as caught:
        writer.datamodel({"Meta": {"DataModel": "Order", "EventType": "New"}, "Order": {"ID": "o-1"}})
    assert len(write_script.requests) == 1 and caught.value.status_code == 500


def test_retried_write_keeps_its_idempotency_key(tmp_path: Path) -> None:
    script = Script(
        (503, {}), (502, {}), lambda r: httpx.Response(200, json={"Meta": {"DataModel": "Order"}})
    )
    client, _ = make_client(tmp_path, script)
    payload = {"Meta": {"DataModel": "Order", "EventType": "New"}, "Order": {"ID": "o-1"}}
    client.datamodel(payload)
    keys = {r.headers["Idempotency-Key"] for r in script.requests}
    assert len(script.requests) == 3 and len(keys) == 1
    sent = json.loads(script.requests[0].content)
    assert sent["Meta"]["Destinations"] == [{"ID": "dest-1"}]
    # The same logical write made again later gets the same key; an explicit key wins.
    again = Script((200, {"Meta": {}}))
    client2, _ = make_client(tmp_path, again)
    client2.datamodel(payload)
    assert again.requests[0].headers["Idempotency-Key"] in keys
    client2.datamodel(payload, idempotency_key="outbox-42")
    assert again.requests[1].headers["Idempotency-Key"] == "outbox-42"


def test_queries_send_no_idempotency_key(tmp_path: Path) -> None:
    script = Script((200, {"Meta": {}, "Results": [{"a": 1}, {"b": 2}]}))
    client, _ = make_client(tmp_path, script)
    client.datamodel({"Meta": {"DataModel": "Results", "EventType": "Query"}, "Patient": {}})
    assert "Idempotency-Key" not in script.requests[0].headers
    assert read_audit_file(tmp_path / "audit.jsonl")[0][0]["record_count"] == 2


def test_broken_and_malformed_bodies_are_retried(tmp_path: Path) -> None:
    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    script = Script(drop, (200, b'{"resourceType":"Bun'), (200, bundle(1)))
    client, _ = make_client(tmp_path, script)
    assert len(list(client.fhir_search("Patient", {}))) == 1
    records, _ = read_audit_file(tmp_path / "audit.jsonl")
    assert [(r["status_code"], r["error"]) for r in records] == [
        (None, "RemoteProtocolError"),
        (200, "MalformedBody"),
        (200, None),
    ]


def test_unreachable_server_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    script = Script(refuse)
    client, sleeps = make_client(tmp_path, script)
    with pytest.raises(RedoxAPIError, match="failed after 4 attempts \\(last: ConnectError\\)"):
        client.fhir_read("Patient", "p1")
    assert len(script.requests) == 4 and len(sleeps) == 3


def test_meta_errors_fail_even_on_200_without_phi_in_the_message(tmp_path: Path) -> None:
    body = {
        "Meta": {
            "Errors": [
                {"ID": 1, "Text": f"no patient named {CANARY_NAME}", "Type": "query", "Module": "Send"},
                {"ID": 2, "Text": "x", "Type": CANARY_NAME, "Module": f"MRN {CANARY_NAME}"},
            ]
        }
    }
    script = Script((200, body))
    client, _ = make_client(tmp_path, script)
    with pytest.raises(DataModelError) as caught:
        client.datamodel({"Meta": {"DataModel": "PatientSearch", "EventType": "Query"}, "Patient": {}})
    assert isinstance(caught.value, PartialFailure) and caught.value.retryable
    assert CANARY_NAME not in str(caught.value) and CANARY_NAME not in repr(caught.value)
    assert CANARY_NAME not in "".join(caught.value.codes)
    assert "query/Send" in str(caught.value)
    assert "<unrecognized, 10 chars>/<unrecognized, 14 chars>" in str(caught.value)
    assert any(CANARY_NAME in d for d in caught.value.details)
    assert len(script.requests) == 1  # a partial failure is reported, not retried into the quota


# ---- token provider ------------------------------------------------------------------------------


def _token_endpoint(
    counter: list[int], lifetime: int = 300, delay_s: float = 0.2, unknown_kids: set[str] | None = None
):
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        import jwt

        kid = jwt.get_unverified_header(form["client_assertion"])["kid"]
        with lock:
            counter.append(1)
        time.sleep(delay_s)  # widen the race window for concurrent callers
        if unknown_kids and kid in unknown_kids:
            return httpx.Response(
                401,
                json={
                    "error": "invalid_request",
                    "error_description": "Public key not found, check client_id, kid and Redox dashboard settings",
                },
            )
        return httpx.Response(
            200,
            json={
                "access_token": f"at-{len(counter)}-{kid[:6]}",
                "token_type": "Bearer",
                "expires_in": lifetime,
            },
        )

    return handler


def test_twenty_concurrent_callers_cause_one_token_request(key_ring: KeyRing) -> None:
    calls: list[int] = []
    http = httpx.Client(transport=httpx.MockTransport(_token_endpoint(calls)))
    provider = OAuthTokenProvider(f"{BASE}/v2/auth/token", "client-1", key_ring, http)
    barrier = threading.Barrier(20)
    results: list[str] = []

    def call() -> None:
        barrier.wait()
        results.append(provider.get_token())

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 20
    assert "at-" not in repr(provider)


def test_unregistered_new_key_falls_back_to_the_previous_one_then_switches(key_ring: KeyRing) -> None:
    old = key_ring.load().newest
    new = key_ring.rotate()
    calls: list[int] = []
    unknown = {new.kid}
    clock = [0.0]
    http = httpx.Client(
        transport=httpx.MockTransport(_token_endpoint(calls, lifetime=10, delay_s=0, unknown_kids=unknown))
    )
    provider = OAuthTokenProvider(
        f"{BASE}/v2/auth/token",
        "client-1",
        key_ring,
        http,
        clock=lambda: clock[0],
        reprobe_after_s=30,
        min_lifetime_s=1,  # 10 s tokens on purpose: this test is about rotation, not clamping
    )
    provider.get_token()
    assert provider.signing_kid == old.kid and len(calls) == 2  # tried the new key, fell back
    clock[0] += 10
    provider.get_token()
    assert provider.signing_kid == old.kid and len(calls) == 3  # no re-probe before reprobe_after_s
    unknown.clear()  # the JWKS with the new key gets registered
    clock[0] += 30
    provider.get_token()
    assert provider.signing_kid == new.kid and len(calls) == 4


def test_search_parameters_may_be_given_as_pairs(tmp_path: Path) -> None:
    script = Script((200, bundle(0)))
    client, _ = make_client(tmp_path, script)
    list(
        client.fhir_search(
            "Patient", [("_lastUpdated", "ge2024-01-01"), ("_lastUpdated", "lt2025-01-01"), ("_count", 10)]
        )
    )
    assert parse_qsl(script.requests[0].content.decode()) == [
        ("_lastUpdated", "ge2024-01-01"),
        ("_lastUpdated", "lt2025-01-01"),
        ("_count", "10"),
    ]


def test_fhir_write_operation_sends_a_stable_idempotency_key(tmp_path: Path) -> None:
    ack = {"resourceType": "Bundle", "type": "message"}
    script = Script((503, {}), (200, ack))
    client, _ = make_client(tmp_path, script, write_entities=["orders"])
    order = {
        "resourceType": "Bundle",
        "type": "message",
        "entry": [{"resource": {"resourceType": "MessageHeader"}}],
    }
    assert (
        client.fhir_operation("ServiceRequest/$servicerequest-create", order, idempotency_key="outbox-7")
        == ack
    )
    first, second = script.requests
    assert (
        first.url.path.endswith("/ServiceRequest/$servicerequest-create")
        and first.headers["Content-Type"] == "application/fhir+json"
    )
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "outbox-7"
    templates = {r["path_template"] for r in read_audit_file(tmp_path / "audit.jsonl")[0]}
    assert templates == {"/fhir/R4/{slug}/{env}/ServiceRequest/$servicerequest-create"}


def test_document_content_is_read_relative_to_the_fhir_base_only(tmp_path: Path) -> None:
    script = Script((200, b"%PDF-1.7 binary", {"Content-Type": "application/pdf"}))
    client, _ = make_client(tmp_path, script, entities=["patients", "documents"])
    assert client.fetch_document_content("Binary/doc-1") == b"%PDF-1.7 binary"
    assert str(script.requests[0].url) == f"{FHIR}/Binary/doc-1"
    with pytest.raises(ScopeError, match="another host"):
        client.fetch_document_content("https://elsewhere.example/Binary/doc-1")
    assert len(script.requests) == 1
    assert (
        read_audit_file(tmp_path / "audit.jsonl")[0][0]["path_template"]
        == "/fhir/R4/{slug}/{env}/Binary/{id}"
    )


# ---- partial failures (REDOX-REFERENCE §12.11): HTTP 200 that is not "no data" ----------------------


def outcome(severity: str, code: str, text: str = "") -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code}
    if text:
        issue["diagnostics"] = text
    return {"resourceType": "OperationOutcome", "issue": [issue]}


@pytest.mark.parametrize(
    "page",
    [
        dict(
            bundle(2), entry=[*bundle(2)["entry"], {"resource": outcome("error", "exception", CANARY_NAME)}]
        ),
        dict(bundle(0), entry=[{"resource": outcome("fatal", "timeout")}]),
        dict(bundle(1), entry=[{"response": {"status": "500", "outcome": outcome("error", "transient")}}]),
        outcome("error", "processing"),
    ],
    ids=["entry-error", "entry-fatal", "batch-outcome", "bare-outcome"],
)
def test_fhir_partial_failures_raise_instead_of_returning_no_data(
    tmp_path: Path, page: dict[str, Any]
) -> None:
    script = Script((200, page))
    client, sleeps = make_client(tmp_path, script)
    with pytest.raises(PartialFailure) as caught:
        list(client.fhir_search("Patient", {"identifier": "urn:mrn|1"}))
    assert caught.value.status_code == 200 and caught.value.retryable
    assert CANARY_NAME not in str(caught.value) and "partial failure" in str(caught.value)
    assert len(script.requests) == 1 and sleeps == []


def test_warnings_inside_a_bundle_are_not_failures(tmp_path: Path) -> None:
    page = dict(bundle(1), entry=[*bundle(1)["entry"], {"resource": outcome("warning", "informational")}])
    client, _ = make_client(tmp_path, Script((200, page)))
    assert len(list(client.fhir_search_pages("Patient", {}))) == 1


def test_server_codes_carrying_a_name_are_replaced_by_their_length(tmp_path: Path) -> None:
    body = outcome(f"error {CANARY_NAME}", CANARY_NAME, f"patient {CANARY_NAME} not found")
    client, _ = make_client(tmp_path, Script((400, body)))
    with pytest.raises(RedoxAPIError) as caught:
        client.fhir_read("Patient", "p1")
    message = str(caught.value)
    assert CANARY_NAME not in message and CANARY_NAME not in "".join(caught.value.codes)
    assert "<unrecognized, 16 chars>:<unrecognized, 10 chars>" in message
    assert "HTTP 400" in message and any(CANARY_NAME in d for d in caught.value.details)


# ---- paging cycles ------------------------------------------------------------------------------


def test_a_next_link_to_its_own_page_stops_with_a_clear_error(tmp_path: Path) -> None:
    loop = f"{FHIR}/Patient/_search?page=2&family={CANARY_NAME}"
    script = Script((200, bundle(2, loop)), (200, bundle(1, loop)))
    client, _ = make_client(tmp_path, script)
    pages = []
    with pytest.raises(PagingCycleError, match="next link of page 2 was already followed") as caught:
        for page in client.fhir_search_pages("Patient", {}):
            pages.append(page)
    assert len(pages) == 2 and len(script.requests) == 2
    assert CANARY_NAME not in str(caught.value)


def test_fresh_links_serving_the_same_page_stop_too(tmp_path: Path) -> None:
    counter = iter(range(10_000))

    def same_page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=bundle(3, f"{FHIR}/Patient/_search?cursor={next(counter)}"))

    script = Script(same_page)
    client, _ = make_client(tmp_path, script)
    with pytest.raises(PagingCycleError, match="page 2 repeats the entries of page 1"):
        list(client.fhir_search_pages("Patient", {}))
    assert len(script.requests) == 2


def test_endless_empty_pages_stop(tmp_path: Path) -> None:
    counter = iter(range(10_000))
    script = Script(
        lambda r: httpx.Response(200, json=bundle(0, f"{FHIR}/Patient/_search?c={next(counter)}"))
    )
    client, _ = make_client(tmp_path, script)
    with pytest.raises(PagingCycleError, match="6 empty pages in a row"):
        list(client.fhir_search_pages("Patient", {}))
    assert len(script.requests) == 6


def test_next_links_are_optional(tmp_path: Path) -> None:
    script = Script((200, bundle(2, f"{FHIR}/Patient/_search?page=2")))
    client, _ = make_client(tmp_path, script)
    assert len(list(client.fhir_search_pages("Patient", {}, follow_next=False))) == 1
    assert len(script.requests) == 1


# ---- bounded waits ---------------------------------------------------------------------------------


def test_a_huge_retry_after_is_capped_at_the_redox_window(tmp_path: Path) -> None:
    script = Script((429, {}, {"Retry-After": "1000000"}), (200, {"resourceType": "Patient"}))
    client, _ = make_client(tmp_path, script)
    client.fhir_read("Patient", "p1")
    assert len(script.requests) == 2
    assert max(client.test_pauses) == pytest.approx(300.0, abs=1.0)  # waited the window, not 11 days


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "soon", "1e400"])
def test_odd_retry_after_values_do_not_break_the_retry(tmp_path: Path, value: str) -> None:
    script = Script((503, {}, {"Retry-After": value}), (200, {"resourceType": "Patient"}))
    client, sleeps = make_client(tmp_path, script)
    client.fhir_read("Patient", "p1")
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 1.0


def test_a_wait_past_the_call_deadline_fails_at_once(tmp_path: Path) -> None:
    script = Script((429, {}, {"Retry-After": "1000000"}), (200, {"resourceType": "Patient"}))
    client, _ = make_client(tmp_path, script, retry=RetryPolicy(max_attempts=4, deadline_s=60.0))
    with pytest.raises(BudgetDeferred, match="not sent") as caught:
        client.fhir_read("Patient", "p1")
    assert caught.value.retryable and len(script.requests) == 1
    assert max(client.test_pauses, default=0.0) <= 300.0

    slow = Script((503, {}, {"Retry-After": "120"}), (200, {"resourceType": "Patient"}))
    client, sleeps = make_client(tmp_path, slow, retry=RetryPolicy(max_attempts=4, deadline_s=60.0))
    with pytest.raises(RedoxAPIError, match="the next wait would pass the 60 s deadline"):
        client.fhir_read("Patient", "p1")
    assert sleeps == [] and len(slow.requests) == 1


# ---- the shared budget and priorities ------------------------------------------------------------


def test_low_priority_calls_wait_for_the_budget_and_events_go_first(tmp_path: Path) -> None:
    script = Script((200, {"resourceType": "Patient", "id": "p1"}))
    client, _ = make_client(tmp_path, script, budget_requests=20, retry=RetryPolicy(deadline_s=30.0))
    for _ in range(17):  # discovery may use 85% of 20
        client.fhir_read("Patient", "p1", priority="discovery")
    with pytest.raises(BudgetDeferred, match="'discovery' may use 17"):
        client.fhir_read("Patient", "p1", priority="discovery")
    assert len(script.requests) == 17
    client.fhir_read("Patient", "p1", priority="event")  # events may spend the reserve
    assert client.budget.stats().used == 18 and client.budget.remaining("refresh") == 0
    with pytest.raises(BudgetError, match="unknown priority"):
        client.fhir_read("Patient", "p1", priority="urgent")


def test_clients_of_one_redox_client_share_one_budget(tmp_path: Path) -> None:
    other = settings_from_dict(
        {
            "token_url": f"{BASE}/v2/auth/token",
            "auth": {"client_id": "client-1"},
            "quota": {"requests": 50, "window_s": 60},
            "connections": [
                {"id": "a", "surfaces": ["fhir"], "entities": ["patients"], "fhir_base_url": FHIR},
                {
                    "id": "b",
                    "surfaces": ["fhir"],
                    "entities": ["patients"],
                    "fhir_base_url": f"{BASE}/fhir/R4/b/Development",
                },
            ],
            "audit": {"path": str(tmp_path / "audit.jsonl")},
        }
    )
    audit = AuditLog(tmp_path / "audit.jsonl")
    a = RedoxClient(other, "a", audit=audit, fhir_tokens=FakeTokens())
    b = RedoxClient(other, "b", audit=audit, fhir_tokens=FakeTokens())
    assert a.budget is b.budget and a.throttle is b.throttle
    assert (a.budget.requests, a.budget.window_s) == (50, 60.0)
    assert a.budget.path.parent == tmp_path / "redox-home" / "quota"


# ---- token lifetimes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_in", "most"),
    [(-5, 5), (0, 5), ("NaN", 2), (1e308, 2), ("soon", 2), (300, 2), (None, 2)],
)
def test_token_lifetimes_are_clamped(key_ring: KeyRing, expires_in: Any, most: int) -> None:
    requests: list[int] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        requests.append(1)
        body = {"access_token": f"at-{len(requests)}", "token_type": "Bearer"}
        if expires_in is not None:
            body["expires_in"] = expires_in
        return httpx.Response(200, content=json.dumps(body).encode())

    clock = [0.0]
    provider = OAuthTokenProvider(
        f"{BASE}/v2/auth/token",
        "client-1",
        key_ring,
        httpx.Client(transport=httpx.MockTransport(endpoint)),
        clock=lambda: clock[0],
    )
    for _ in range(100):  # 100 calls, one a second
        provider.get_token()
        clock[0] += 1.0
    assert 1 <= len(requests) <= most, (expires_in, len(requests))
    clock[0] += 301.0
    provider.get_token()  # never kept past the documented 5 minutes
    assert len(requests) >= 2


def test_legacy_lifetimes_are_clamped() -> None:
    from resources.auth import LEGACY_MAX_LIFETIME_S, _parse_expires

    assert _parse_expires("2000-01-01T00:00:00Z") == 30.0
    assert _parse_expires("9999-12-31T23:59:59Z") == LEGACY_MAX_LIFETIME_S
    assert _parse_expires("garbage") == LEGACY_MAX_LIFETIME_S


# ---- the audit trail keeps one record per outbound call ---------------------------------------------


def test_every_attempt_and_token_call_is_audited(tmp_path: Path, key_ring: KeyRing) -> None:
    answers = iter([503, 401, 200])

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/v2/auth/token"):
            return httpx.Response(200, json={"access_token": "at-x", "expires_in": 300})
        return httpx.Response(next(answers), json={"resourceType": "Patient", "id": "p1"})

    http = httpx.Client(transport=httpx.MockTransport(server))
    audit = AuditLog(tmp_path / "audit.jsonl")
    provider = OAuthTokenProvider(f"{BASE}/v2/auth/token", "client-1", key_ring, http)
    clock = FakeClock([])
    client = RedoxClient(
        settings(tmp_path),
        "north",
        audit=audit,
        http=http,
        fhir_tokens=provider,
        datamodel_tokens=FakeTokens(),
        budget=RequestBudget(tmp_path / "b.sqlite", requests=100, clock=clock, sleep=clock.sleep),
        retry=RetryPolicy(base_delay_s=0.0),
        sleep=lambda s: None,
    )
    client.fhir_read("Patient", "p1")
    records, _ = read_audit_file(tmp_path / "audit.jsonl")
    assert [(r["surface"], r["status_code"], r["attempt"]) for r in records] == [
        ("auth", 200, 1),
        ("fhir", 503, 1),
        ("fhir", 401, 2),
        ("auth", 200, 1),
        ("fhir", 200, 3),
    ]
    assert client.budget.stats().used == 3  # API attempts spend the budget


# ---- bodies: size and time limits ------------------------------------------------------------------


def test_an_oversized_body_is_refused_without_retrying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resources.client as client_module

    monkeypatch.setattr(client_module, "MAX_BODY_BYTES", 1000)
    script = Script((200, bundle(50)))
    client, sleeps = make_client(tmp_path, script)
    with pytest.raises(RedoxAPIError, match="failed: BodyTooLarge"):
        list(client.fhir_search_pages("Patient", {}))
    assert len(script.requests) == 1 and sleeps == []
    assert read_audit_file(tmp_path / "audit.jsonl")[0][0]["error"] == "BodyTooLarge"


def test_a_trickling_body_is_cut_off_at_the_attempt_limit(tmp_path: Path) -> None:
    class Trickle(httpx.SyncByteStream):
        def __iter__(self):
            for _ in range(1000):
                yield b" "

    now = [0.0]

    def clock() -> float:  # every look at the clock is 10 s later: a very slow server
        now[0] += 10.0
        return now[0]

    answers = iter([httpx.Response(200, stream=Trickle()), httpx.Response(200, json=bundle(1))])
    script = Script(lambda r: next(answers))
    client, sleeps = make_client(tmp_path, script)
    client._clock = clock
    client.retry = RetryPolicy(deadline_s=100_000.0, base_delay_s=0.01)
    assert len(list(client.fhir_search_pages("Patient", {}))) == 1
    errors = [r["error"] for r in read_audit_file(tmp_path / "audit.jsonl")[0]]
    assert errors == ["BodyTooSlow", None] and len(sleeps) == 1


# ---- fuzz: hostile server answers end in a RedoxError with a PHI-free message, or in data -------------


def _hostile_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if depth > 2 or pick < 0.3:
        return rng.choice(
            [None, 1, -5, 1e308, True, "", CANARY_NAME, f"MRN {CANARY_NAME}", "error", "x" * 50]
        )
    if pick < 0.6:
        return [_hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = [
        "resourceType",
        "entry",
        "issue",
        "severity",
        "code",
        "Meta",
        "Errors",
        "Type",
        "Module",
        "link",
        "resource",
    ]
    return {rng.choice(keys): _hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _hostile_body(rng: random.Random) -> Any:
    shapes = [
        lambda: _hostile_value(rng),
        lambda: {"resourceType": "Bundle", "entry": [_hostile_value(rng) for _ in range(3)]},
        lambda: {
            "resourceType": "Bundle",
            "entry": [
                {
                    "resource": {
                        "resourceType": "OperationOutcome",
                        "issue": [
                            {
                                "severity": rng.choice(["error", "fatal", "warning", CANARY_NAME, None]),
                                "code": rng.choice(["processing", CANARY_NAME, 7]),
                            }
                        ],
                    }
                }
            ],
        },
        lambda: {"resourceType": "OperationOutcome", "issue": _hostile_value(rng)},
        lambda: {
            "Meta": {
                "Errors": [
                    {"Type": rng.choice(["query", CANARY_NAME]), "Module": CANARY_NAME, "Text": CANARY_NAME}
                ]
            }
        },
        lambda: {"Meta": _hostile_value(rng), "Results": _hostile_value(rng)},
        lambda: {
            "resourceType": "Bundle",
            "link": [
                {
                    "relation": "next",
                    "url": rng.choice([f"{FHIR}/Patient/_search?p=1", "https://evil.example/x", 5, None]),
                }
            ],
            "entry": [],
        },
    ]
    return rng.choice(shapes)()


def test_fuzzed_server_answers_never_escape_as_anything_but_redox_errors(tmp_path: Path) -> None:
    from resources.client import RedoxError

    rng = random.Random(1414)
    statuses = [200, 200, 200, 201, 400, 401, 403, 404, 409, 429, 500, 502, 503]
    outcomes: dict[str, int] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        status = rng.choice(statuses)
        headers = {}
        if rng.random() < 0.3:
            headers["Retry-After"] = rng.choice(["1000000", "-1", "nan", "soon", "0.5", "1e400"])
        if rng.random() < 0.2:
            headers["X-RateLimit-Limit"] = rng.choice(["0", "-3", "inf", "abc", "7500"])
        if rng.random() < 0.15:
            return httpx.Response(
                status, content=rng.choice([b"", b"{", b"<html>", b"\xff\xfe", b"[1,2"]), headers=headers
            )
        return httpx.Response(status, content=json.dumps(_hostile_body(rng)).encode(), headers=headers)

    calls = [
        lambda c: list(c.fhir_search_pages("Patient", {"identifier": "urn:mrn|1"})),
        lambda c: c.fhir_read("Patient", "p1"),
        lambda c: c.datamodel({"Meta": {"DataModel": "Results", "EventType": "Query"}, "Patient": {}}),
    ]
    for i in range(400):
        client, _ = make_client(
            tmp_path / f"c{i % 4}",
            Script(answer),
            retry=RetryPolicy(max_attempts=2, max_rate_limited=2, base_delay_s=0.0),
        )
        try:
            rng.choice(calls)(client)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except RedoxError as exc:
            text = str(exc) + repr(exc) + " ".join(exc.codes if hasattr(exc, "codes") else ())
            assert CANARY_NAME not in text, text
            assert "\n" not in str(exc)
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        finally:
            client.close()
            client.budget.close()
    assert outcomes.get("ok", 0) > 10 and outcomes.get("PartialFailure", 0) > 5, outcomes
