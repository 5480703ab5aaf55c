"""Webhook delivery: verification handshake, ordered at-least-once delivery, retries, injection.

A real receiver (``http.server`` on 127.0.0.1:<free port>) plays the customer's endpoint; the
retry ladder is time-scaled so the tests take seconds.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from redox.factory import redox_object_factory

from sandbox.config import SandboxConfig
from sandbox.datamodel.render import render_event
from sandbox.population.records import Change, PatientRecord
from sandbox.webhooks import WebhookSender

TOKEN = "receiver-secret"
NOW = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass
class Receiver:
    """What the fake destination does and what it saw."""

    verify: str = "post"  # "post" | "get" | "wrong"
    fail_next: int = 0  # answer 500 to this many data pushes
    slow_next: int = 0  # sleep past the sender's timeout on this many data pushes
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            assert time.monotonic() < deadline, f"received {len(self.received)} of {n}"
            time.sleep(0.01)


def make_handler(rx: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output quiet
            return

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            query = parse_qs(urlparse(self.path).query)
            if rx.verify == "get" and query.get("verification-token") == [TOKEN]:
                self._answer(200, query["challenge"][0].encode())
            else:
                self._answer(404, b"")

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if "challenge" in body:
                if (
                    rx.verify == "post"
                    and self.headers.get("application-name") == "RedoxEngine"
                    and (body.get("verification-token") == TOKEN)
                ):
                    self._answer(200, json.dumps({"challenge": body["challenge"]}).encode())
                elif rx.verify == "wrong":
                    self._answer(200, b"ok")
                else:
                    self._answer(405, b"")
                return
            if self.headers.get("verification-token") != TOKEN:
                self._answer(403, b"")
                return
            with rx.lock:
                rx.attempts.append(body)
                slow = rx.slow_next > 0
                rx.slow_next -= slow
                fail = not slow and rx.fail_next > 0
                rx.fail_next -= fail
            if slow:
                time.sleep(1.0)
                return self._answer(200, b"")
            if fail:
                return self._answer(500, b"")
            with rx.lock:
                rx.received.append(body)
                rx.headers.append(dict(self.headers))
            self._answer(200, b"")

    return Handler


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    rx = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(rx))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield rx, f"http://127.0.0.1:{server.server_address[1]}/redox"
    server.shutdown()
    server.server_close()


class Rates:
    """Fault rates as ``sandbox.faults.Faults.rate`` reports them: overrides, else config."""

    def __init__(self, config: SandboxConfig, **overrides: float) -> None:
        self.config = config
        self.overrides = overrides

    def rate(self, name: str, connection_id: str | None = None) -> float:
        return self.overrides.get(name, float(getattr(self.config, name, 0.0)))


@pytest.fixture
def make_sender() -> Iterator[Callable[..., WebhookSender]]:
    senders: list[WebhookSender] = []

    def make(**overrides: float) -> WebhookSender:
        config = SandboxConfig(seed=11, webhook_time_scale=0.001, webhook_timeout_s=0.5)
        sender = WebhookSender(config, render_event, Rates(config, **overrides))
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        sender.close()


def patient_changes(n: int, conn_id: str = "lakeside-dm") -> list[Change]:
    changes = []
    for i in range(n):
        patient = PatientRecord(
            connection_id=conn_id,
            id=f"p{i}",
            last_updated=NOW + timedelta(minutes=i),
            version=1,
            person_index=i,
            mrn=f"{i:010d}",
            ehr_id=f"ehr-{i}",
            enterprise_id=f"EPI{i}",
            nist_id=None,
            family_name="Bixby",
            given_names=("Timothy",),
            birth_date=date(2008, 1, 6),
            sex="male",
            race=None,
            ethnicity=None,
            language="en",
            address_line=None,
            city=None,
            state=None,
            postal_code=None,
            county=None,
            phone_home=None,
            phone_mobile=None,
            email=None,
            ssn=None,
            marital_status=None,
            deceased_at=None,
            is_test=True,
        )
        changes.append(Change("patients", "new", patient))
    return changes


def mrn(payload: dict[str, Any]) -> str:
    return payload["Patient"]["Identifiers"][0]["ID"]


def connections() -> list:
    return SandboxConfig().connections


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_post_handshake_verifies_and_data_flows_in_order(receiver, make_sender):
    rx, url = receiver
    sender = make_sender()
    result = sender.register(url, TOKEN)
    assert result["verified"] is True and result["verification_method"] == "POST"
    assert sender.enqueue(patient_changes(25), connections()) == 25
    rx.wait_for(25)
    assert [mrn(p) for p in rx.received] == [f"{i:010d}" for i in range(25)]
    assert all(
        h["verification-token"] == TOKEN and h["Content-Type"] == "application/json" for h in rx.headers
    )
    assert len({p["Meta"]["Logs"][0]["ID"] for p in rx.received}) == 25
    for payload in rx.received:  # what went over the wire passes the strict oracle
        candidate = copy.deepcopy(payload)
        del candidate["Meta"]["Message"], candidate["Meta"]["Transmission"]
        redox_object_factory(candidate)
    wait_until(lambda: sender.stats()["pending"] == 0)
    assert sender.stats() == {"distinct_sent": 25, "deliveries": 25, "pending": 0}


def test_get_handshake_is_the_fallback(receiver, make_sender):
    rx, url = receiver
    rx.verify = "get"
    result = make_sender().register(url, TOKEN)
    assert result["verified"] is True and result["verification_method"] == "GET"


def test_wrong_challenge_is_refused_and_never_receives_data(receiver, make_sender):
    rx, url = receiver
    rx.verify = "wrong"
    sender = make_sender()
    result = sender.register(url, TOKEN)
    assert result["verified"] is False and "challenge" in result["reason"]
    assert sender.enqueue(patient_changes(3), connections()) == 0
    time.sleep(0.2)
    assert rx.attempts == [] and sender.stats() == {"distinct_sent": 0, "deliveries": 0, "pending": 0}


def test_unreachable_destination_is_refused(make_sender):
    result = make_sender().register("http://127.0.0.1:9/nowhere", TOKEN)
    assert result["verified"] is False and "error code" in result["reason"]


def test_failures_pause_the_feed_and_retry_with_a_stable_log_id(receiver, make_sender):
    rx, url = receiver
    sender = make_sender()
    assert sender.register(url, TOKEN)["verified"]
    rx.fail_next, rx.slow_next = 3, 1  # three 500s, then one timeout, all on the first event
    sender.enqueue(patient_changes(5), connections())
    rx.wait_for(5)
    first = [a for a in rx.attempts if mrn(a) == "0000000000"]
    assert len(first) == 5
    assert len({a["Meta"]["Logs"][0]["ID"] for a in first}) == 1
    assert len({a["Meta"]["Logs"][0]["AttemptID"] for a in first}) == 5
    assert [mrn(p) for p in rx.received] == [f"{i:010d}" for i in range(5)]
    wait_until(lambda: sender.stats()["pending"] == 0)
    assert sender.stats() == {"distinct_sent": 5, "deliveries": 9, "pending": 0}


def test_duplicates_reuse_the_log_id(receiver, make_sender):
    rx, url = receiver
    sender = make_sender(webhook_duplicate_rate=0.5)
    sender.register(url, TOKEN)
    sender.enqueue(patient_changes(30), connections())
    wait_until(lambda: sender.stats()["pending"] == 0)
    stats = sender.stats()
    rx.wait_for(stats["deliveries"])
    ids = [p["Meta"]["Logs"][0]["ID"] for p in rx.received]
    assert len(ids) > 30 and len(set(ids)) == 30 == stats["distinct_sent"]
    first_seen = list(dict.fromkeys(mrn(p) for p in rx.received))
    assert first_seen == [f"{i:010d}" for i in range(30)]  # duplicates never reorder the feed
    assert len({p["Meta"]["Logs"][0]["AttemptID"] for p in rx.received}) == len(rx.received)


def test_reordering_swaps_neighbours_deterministically(receiver, make_sender):
    rx, url = receiver
    orders = []
    for _ in range(2):
        rx.received.clear()
        sender = make_sender(webhook_reorder=0.3)
        sender.register(url, TOKEN)
        sender.enqueue(patient_changes(30), connections())
        rx.wait_for(30)
        orders.append([mrn(p) for p in rx.received])
        sender.close()
    expected = [f"{i:010d}" for i in range(30)]
    assert orders[0] != expected and sorted(orders[0]) == expected
    assert orders[0] == orders[1]  # the same seed makes the same decisions
    assert all(abs(orders[0].index(m) - i) <= 2 for i, m in enumerate(expected))


def test_pending_counts_undelivered_events_and_close_is_prompt(receiver, make_sender):
    rx, url = receiver
    config = SandboxConfig(seed=3, webhook_time_scale=1.0, webhook_steady_s=120.0, webhook_timeout_s=0.5)
    sender = WebhookSender(config, render_event, Rates(config))
    sender.register(url, TOKEN)
    rx.fail_next = 10**6
    sender.enqueue(patient_changes(4), connections())
    wait_until(lambda: sender.stats()["deliveries"] >= 2)  # the first retry is immediate, then +10 s
    assert sender.stats()["pending"] == 4 and sender.stats()["distinct_sent"] == 0
    started = time.monotonic()
    sender.close()
    assert time.monotonic() - started < 2.0
    assert sender.enqueue(patient_changes(1), connections()) == 0


def test_every_destination_gets_its_own_log(receiver, make_sender):
    rx, url = receiver
    sender = make_sender()
    sender.register(url, TOKEN)
    sender.register(url.replace("/redox", "/second"), TOKEN)
    sender.enqueue(patient_changes(3), connections())
    rx.wait_for(6)
    ids = [p["Meta"]["Logs"][0]["ID"] for p in rx.received]
    assert len(set(ids)) == 6
    wait_until(lambda: sender.stats()["pending"] == 0)


def test_changes_of_fhir_only_connections_send_no_data_model_events(receiver, make_sender):
    rx, url = receiver
    sender = make_sender()
    sender.register(url, TOKEN)
    assert sender.enqueue(patient_changes(3, conn_id="northwind-fhir"), connections()) == 0
    assert sender.enqueue(patient_changes(2), {c.id: c for c in connections()}) == 2
    rx.wait_for(2)


def test_config_rates_apply_without_overrides(receiver):
    rx, url = receiver
    config = replace(SandboxConfig(seed=5, webhook_time_scale=0.001), webhook_duplicate_rate=1.0)
    sender = WebhookSender(config, render_event, Rates(config))
    try:
        sender.register(url, TOKEN)
        sender.enqueue(patient_changes(4), connections())
        rx.wait_for(8)
        assert [mrn(p) for p in rx.received] == [f"{i:010d}" for i in range(4) for _ in range(2)]
    finally:
        sender.close()


# ---- payload families (issue 10) ---------------------------------------------------------


def test_each_connection_pushes_in_the_family_of_its_surface():
    from sandbox.config import SandboxConfigError
    from sandbox.webhooks import push_families

    config = SandboxConfig()
    by_id = {c.id: c for c in config.connections}
    assert push_families(config, by_id["northwind-fhir"]) == ("fhir",)
    assert push_families(config, by_id["lakeside-dm"]) == ("datamodel",)
    assert push_families(config, by_id["riverbend-both"]) == ("datamodel",)
    assert push_families(replace(config, webhook_fhir=True), by_id["riverbend-both"]) == ("datamodel", "fhir")
    assert push_families(config, replace(by_id["riverbend-both"], webhook_family="fhir")) == ("fhir",)
    with pytest.raises(SandboxConfigError, match="needs the 'datamodel' surface"):
        replace(by_id["northwind-fhir"], webhook_family="datamodel")


@pytest.fixture(scope="module")
def advanced_changes():
    from sandbox.app import build_store

    config, store = build_store(SandboxConfig(patients=40, seed=7))
    return config, store.advance(2, 0.1)


def test_fhir_notifications_name_the_event_uri_and_both_fullurl_forms(advanced_changes):
    from fhir.resources.R4B.bundle import Bundle

    from sandbox.fhir.notifications import render_redox_notification
    from sandbox.population.records import PULL_ONLY_ENTITIES

    config, changes = advanced_changes
    conn = config.connection("northwind-fhir")
    base = "http://127.0.0.1:9/fhir/R4/northwind-health/Development"
    own = [c for c in changes if c.record.connection_id == conn.id and c.entity == "results"]
    assert own, "the advance changed no result"
    bundle = render_redox_notification(own[0], conn, base_url=base)
    Bundle.model_validate(bundle)
    header = bundle["entry"][0]["resource"]
    assert header["eventUri"] == "https://fhir.redoxengine.com/EventDefinition/ResultCreated"
    assert header["definition"].endswith("/ResultCreatedFull")
    result_url, patient_url = bundle["entry"][1]["fullUrl"], bundle["entry"][2]["fullUrl"]
    # The changed resource: value first; the Patient: system first (both forms Redox shows).
    assert result_url.startswith(f"{base}/Observation?identifier=") and "|urn:redox:" in result_url
    assert patient_url.startswith(f"{base}/Patient?identifier=urn:redox:northwind-health:MR|")
    light = render_redox_notification(own[0], conn, base_url=base, detail="lightweight")
    assert "definition" not in light["entry"][0]["resource"]
    assert "valueQuantity" not in light["entry"][1]["resource"] and light["id"] != bundle["id"]
    events = {
        render_redox_notification(c, conn)["entry"][0]["resource"]["eventUri"].rsplit("/", 1)[1]
        for c in changes
        if c.record.connection_id == conn.id and c.entity not in PULL_ONLY_ENTITIES
    }
    assert {"ResultCreated", "PatientAdminPatientArrived"} & events


def test_family_renderer_sends_fhir_only_connections_notifications(receiver, advanced_changes):
    from sandbox.fhir.notifications import render_redox_notification
    from sandbox.webhooks import family_renderer

    rx, url = receiver
    config, changes = advanced_changes
    config = replace(config, webhook_time_scale=0.001)
    render = family_renderer(config, render_event, lambda ch, c: render_redox_notification(ch, c))
    sender = WebhookSender(config, render, Rates(config))
    try:
        sender.register(url, TOKEN)
        fhir_only = [c for c in changes if c.record.connection_id == "northwind-fhir"][:5]
        dm = [c for c in changes if c.record.connection_id == "lakeside-dm"][:5]
        queued = sender.enqueue(fhir_only + dm, config.connections)
        rx.wait_for(queued)
        wait_until(lambda: sender.stats()["pending"] == 0)
        kinds = ["fhir" if p.get("resourceType") == "Bundle" else "datamodel" for p in rx.received]
        assert kinds.count("fhir") >= len(fhir_only) and "datamodel" in kinds
        assert sender.stats()["distinct_sent"] == queued
    finally:
        sender.close()


def test_reorder_fault_accepts_true_as_occasional_reordering():
    from sandbox.faults import WEBHOOK_REORDER_ON, Faults

    faults = Faults(SandboxConfig(), seed=1)
    faults.set({"webhook_reorder": True, "webhook_duplicate_rate": 0.3})
    assert faults.rate("webhook_reorder") == WEBHOOK_REORDER_ON and 0 < WEBHOOK_REORDER_ON < 1
    faults.set({"webhook_reorder": False})
    assert faults.rate("webhook_reorder") == 0.0
