"""The EHR's outcome of each write-back reaches its outbox row, through the webhook feed alone.

A sandbox with ``write_reject_rate`` refuses a share of the orders and appointments written
back, and pushes every outcome to a real receiver (``create_app`` under uvicorn on loopback) in
each connection's family: FHIR notifications for ``northwind-fhir``, Data Model events for
``lakeside-dm`` and for ``riverbend-both`` (written through FHIR, pushed as Data Model). After the
inbox is processed, every outbox row is ``acknowledged`` or ``failed`` exactly as
``/_sandbox/writes`` says, refused rows with the EHR's reason — and the writer never looked a
single write up. The lookup path reads the refused state too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pytest

from pipelines.inbox.envelope import FAMILY_DATAMODEL, parse_body
from pipelines.inbox.process import process_inbox
from pipelines.inbox.store import connect, inbox_path
from pipelines.publish import ensure_model_tables, model_schema
from pipelines.warehouse import WarehousePaths, WriterLock
from pipelines.writeback import ensure_outbox_tables
from pipelines.writeback.inbox_acks import settle_outcomes
from pipelines.writeback.sender import Destination, Writer
from resources.onboarding import connect_sandbox
from resources.settings import load_settings
from sandbox.datamodel.conform import strict_check
from sandbox.faults import WRITE_REJECT_REASONS
from tests.pipelines.inbox_receiver import wait_until

TOKEN = "writeback-outcomes-token"
EHR = ("northwind-fhir", "lakeside-dm", "riverbend-both")
REJECT_RATE = 0.3


@pytest.fixture
def env(sandbox_factory, tmp_path: Path, monkeypatch) -> dict[str, Any]:
    """A small sandbox, settings for it, and a warehouse holding the crosswalk a sync publishes."""
    monkeypatch.setenv("REDOX_ELT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REDOX_ELT_MASTER_KEY", "writeback-outcomes-master-key")
    server = sandbox_factory(patients=30, seed=11)
    settings = load_settings(connect_sandbox(server.url, tmp_path / "connections.yaml"))
    settings = dataclasses.replace(
        settings,
        connections=tuple(dataclasses.replace(c, max_rps=500.0, timeout_s=5.0) for c in settings.connections),
    )
    truth = httpx.get(f"{server.url}/_sandbox/truth", params={"persons": "true"}, timeout=60).json()
    paths = WarehousePaths.at(tmp_path / "wh" / "w.duckdb")
    paths.duckdb.parent.mkdir(parents=True, exist_ok=True)
    keys: dict[str, list[str]] = {}
    with duckdb.connect(str(paths.duckdb)) as con:
        ensure_model_tables(con)  # the tables a first sync creates, outboxes included
        for person in truth["persons"]:
            for r in person["records"]:
                key = "pk-" + r["patient_id"][:12]
                keys.setdefault(r["connection_id"], []).append(key)
                rows = [("fhir", r["patient_id"]), ("MR", r["mrn"]), ("EPI", person["enterprise_id"])]
                con.executemany(
                    "INSERT INTO redox.patient_identifiers (connection_id, id_system, id_value, patient_key) "
                    "VALUES (?, ?, ?, ?)",
                    [(r["connection_id"], s, v, key) for s, v in rows],
                )
    return {
        "server": server,
        "settings": settings,
        "paths": paths,
        "keys": {c: sorted(k) for c, k in keys.items()},
    }


class CountingDestination(Destination):
    """The real destination, counting lookups: the event path must need none."""

    lookups = 0

    def look(self, row, request):  # type: ignore[no-untyped-def]
        CountingDestination.lookups += 1
        return super().look(row, request)


def _faults(env: dict[str, Any], body: dict[str, Any]) -> None:
    httpx.post(f"{env['server'].url}/_sandbox/faults", json=body, timeout=10).raise_for_status()


def _insert(env: dict[str, Any], per_connection: int) -> None:
    """Orders and appointment creates for every EHR connection, by plain SQL."""
    paths = env["paths"]
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        for conn in EHR:
            for i, key in enumerate(env["keys"][conn][:per_connection]):
                con.execute(
                    "insert into outbox.orders (order_id, connection_id, patient_key, procedure_code, procedure_codeset, "
                    "procedure_description, priority, ordered_at) values (?, ?, ?, '4548-4', 'LOINC', 'Hemoglobin A1c', 'Routine', now())",
                    [f"o-{conn}-{i}", conn, key],
                )
                con.execute(
                    "insert into outbox.appointments (request_id, appointment_id, connection_id, patient_key, start_at, "
                    "duration_minutes, reason, location_department) values (?, ?, ?, ?, "
                    "timestamptz '2026-12-03 09:00:00+00' + to_minutes(?), 30, 'Follow-up', 'Clinic 3')",
                    [f"a-{conn}-{i}", f"VN-{conn}-{i}", conn, key, 30 * i],
                )


def _rows(paths: WarehousePaths, kind: str) -> dict[tuple[str, str], tuple[str, str | None, str, str]]:
    """(connection, business id) -> (status, last_error, action, request key) per outbox row."""
    id_col, key_col, action = (
        ("order_id", "order_id", "'create'")
        if kind == "orders"
        else ("appointment_id", "request_id", "action")
    )
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        rows = con.execute(
            f"select connection_id, {id_col}, status, last_error, {action}, {key_col} from outbox.{kind} order by seq"
        ).fetchall()
    return {(r[0], r[1]) if kind == "orders" else (r[0], r[5]): (r[2], r[3], r[4], r[5]) for r in rows}


def _writes(env: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return httpx.get(f"{env['server'].url}/_sandbox/writes", timeout=30).json()


def _delivered(env: dict[str, Any]) -> Callable[[], bool]:
    def check() -> bool:
        truth = httpx.get(
            f"{env['server'].url}/_sandbox/truth", params={"persons": "false"}, timeout=30
        ).json()
        return truth["webhooks"]["pending"] == 0

    return check


def _assert_rows_match_the_ehr(env: dict[str, Any]) -> tuple[int, int]:
    """Every outbox row is settled exactly as the sandbox's verdict on its write says."""
    writes = _writes(env)
    accepted = refused = 0
    orders = _rows(env["paths"], "orders")
    verdicts = {(w["connection_id"], w["order_id"]): w for w in writes["orders"]}
    assert set(verdicts) == set(orders)
    for key, (status, last_error, _, _) in orders.items():
        w = verdicts[key]
        if w["outcome"] == "rejected":
            assert w["reason"] in WRITE_REJECT_REASONS["orders"]
            assert (status, last_error) == ("failed", f"refused by the EHR: {w['reason']}"), key
            refused += 1
        else:
            assert (w["outcome"], w["reason"], status) == ("accepted", None, "acknowledged"), key
            accepted += 1
    appointments = _rows(env["paths"], "appointments")
    by_visit: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for w in writes["appointments"]:
        by_visit.setdefault((w["connection_id"], w["appointment_id"]), []).append(w)
    with WriterLock(env["paths"]), duckdb.connect(str(env["paths"].duckdb)) as con:
        request_visit = dict(
            con.execute("select request_id, appointment_id from outbox.appointments").fetchall()
        )
    for (conn, request_id), (status, last_error, action, _) in appointments.items():
        history = by_visit[(conn, request_visit[request_id])]
        w = next(
            x
            for x in history
            if x["event"].endswith({"create": "New", "update": "Reschedule", "cancel": "Cancel"}[action])
        )
        if w["outcome"] == "rejected":
            assert w["reason"] in WRITE_REJECT_REASONS["appointments"]
            assert (status, last_error) == ("failed", f"refused by the EHR: {w['reason']}"), request_id
            refused += 1
        else:
            assert status == "acknowledged", (request_id, status)
            accepted += 1
    return accepted, refused


def test_pushed_outcomes_settle_every_row_without_a_lookup(env: dict[str, Any], receiver) -> None:
    url = receiver(env["settings"], env["paths"], TOKEN)
    r = httpx.post(f"{env['server'].url}/_sandbox/webhooks", json={"url": url, "token": TOKEN}, timeout=30)
    assert r.status_code == 200 and r.json()["verified"], r.text
    _faults(env, {"write_reject_rate": REJECT_RATE, "webhook_duplicate_rate": 0.2, "webhook_reorder": True})
    _insert(env, per_connection=6)
    CountingDestination.lookups = 0
    report = Writer(
        env["settings"],
        env["paths"],
        destination_factory=CountingDestination,
        out=lambda _s: None,
        acknowledge=False,
    ).run()
    assert (report.sent, report.failed, report.unknown) == (36, 0, 0), report.summary()
    # Reschedule one and cancel another appointment the Data Model connection's EHR booked.
    booked = sorted(
        w["appointment_id"]
        for w in _writes(env)["appointments"]
        if w["connection_id"] == "lakeside-dm" and w["outcome"] == "accepted"
    )
    assert len(booked) >= 2
    with WriterLock(env["paths"]), duckdb.connect(str(env["paths"].duckdb)) as con:
        move, drop = (
            con.execute(
                "select appointment_id, patient_key from outbox.appointments where appointment_id = ?", [b]
            ).fetchone()
            for b in booked[:2]
        )
        con.execute(
            "insert into outbox.appointments (request_id, appointment_id, action, connection_id, patient_key, start_at) "
            "values ('move-1', ?, 'update', 'lakeside-dm', ?, timestamptz '2026-12-09 15:00:00+00')",
            list(move),
        )
        con.execute(
            "insert into outbox.appointments (request_id, appointment_id, action, connection_id, patient_key) "
            "values ('drop-1', ?, 'cancel', 'lakeside-dm', ?)",
            list(drop),
        )
    report = Writer(
        env["settings"],
        env["paths"],
        destination_factory=CountingDestination,
        out=lambda _s: None,
        acknowledge=False,
    ).run()
    assert report.sent == 2, report.summary()
    wait_until(_delivered(env), 60, "the sandbox to push every outcome")
    out = process_inbox(env["paths"], env["settings"])
    assert out["quarantined"] == 0, out

    accepted, refused = _assert_rows_match_the_ehr(env)
    assert accepted and refused, "the fault should refuse some writes and accept others"
    after = _rows(env["paths"], "appointments")
    assert after[("lakeside-dm", "move-1")][0] == "acknowledged"
    assert after[("lakeside-dm", "drop-1")][0] == "acknowledged"
    assert CountingDestination.lookups == 0, "the event path needs no lookup"

    # Each connection heard in its own family, and every Data Model outcome passes the strict oracle.
    inbox = connect(inbox_path(env["paths"]), create=False)
    try:
        stored = inbox.execute(
            "select family, connection_id, data_model, event_type, body from messages"
        ).fetchall()
    finally:
        inbox.close()
    families = {(conn, family) for family, conn, *_ in stored}
    assert {
        ("northwind-fhir", "fhir"),
        ("lakeside-dm", "datamodel"),
        ("riverbend-both", "datamodel"),
    } <= families
    dm_events = {(model, event) for family, _, model, event, _ in stored if family == FAMILY_DATAMODEL}
    assert {
        ("Order", "Update"),
        ("Order", "Cancel"),
        ("Scheduling", "New"),
        ("Scheduling", "Reschedule"),
        ("Scheduling", "Cancel"),
    } <= dm_events
    for family, _, _, _, body in stored:
        if family == FAMILY_DATAMODEL:
            strict_check(parse_body(body))

    # Orders' outcomes are not clinical data; the EHR's appointments are, in the state it holds.
    with duckdb.connect(str(env["paths"].duckdb), read_only=True) as con:
        ms = model_schema(con)
        assert not con.execute(
            f"select count(*) from {ms}.medications where source_id like 'o-%'"
        ).fetchone()[0]
        statuses = dict(
            con.execute(
                f"select source_id, status from {ms}.appointments where connection_id = 'lakeside-dm' "
                "and source_id like 'VN-%'"
            ).fetchall()
        )
    for w in _writes(env)["appointments"]:
        if w["connection_id"] == "lakeside-dm":
            cancelled = w["outcome"] == "rejected" or w["appointment_id"] == drop[0]
            assert statuses.get(w["appointment_id"]) == ("cancelled" if cancelled else "booked"), w[
                "appointment_id"
            ]

    # Processing every message again changes nothing.
    before = (_rows(env["paths"], "orders"), _rows(env["paths"], "appointments"))
    process_inbox(env["paths"], env["settings"], since=datetime_min())
    assert (_rows(env["paths"], "orders"), _rows(env["paths"], "appointments")) == before


def datetime_min():  # noqa: ANN201 - helper for "every message again"
    from datetime import UTC, datetime

    return datetime(2000, 1, 1, tzinfo=UTC)


def test_lookups_read_the_refused_state_and_never_resend(env: dict[str, Any]) -> None:
    """No destination registered: the lookup fallback settles rows from what the EHR shows."""
    _faults(env, {"write_reject_rate": REJECT_RATE})
    _insert(env, per_connection=3)
    writer = Writer(env["settings"], env["paths"], out=lambda _s: None)
    report = writer.run()
    assert report.sent == 18 and report.acknowledged + report.refused == 18, report.summary()
    accepted, refused = _assert_rows_match_the_ehr(env)
    assert (accepted, refused) == (report.acknowledged, report.refused)
    assert refused
    # A refused write stays visible in its refused state: rows whose answer was lost (back in
    # ``sending``) are found there, failed with the reason again, and never re-sent.
    before = (_rows(env["paths"], "orders"), _rows(env["paths"], "appointments"))
    sent = len(_writes(env)["orders"]) + len(_writes(env)["appointments"])
    with WriterLock(env["paths"]), duckdb.connect(str(env["paths"].duckdb)) as con:
        for kind in ("orders", "appointments"):
            con.execute(
                f"update outbox.{kind} set status = 'sending', last_error = null where status = 'failed'"
            )
    again = Writer(env["settings"], env["paths"], out=lambda _s: None).run()
    assert again.found_after_unanswered_send == refused and again.sent == 0, again.summary()
    assert len(_writes(env)["orders"]) + len(_writes(env)["appointments"]) == sent
    assert (_rows(env["paths"], "orders"), _rows(env["paths"], "appointments")) == before


def _dm(model: str, event: str, **body: Any) -> tuple[str, str, bytes]:
    return (
        "lakeside-dm",
        FAMILY_DATAMODEL,
        orjson.dumps({"Meta": {"DataModel": model, "EventType": event}, **body}),
    )


def test_an_appointment_outcome_settles_the_row_it_answers_whatever_the_arrival_order(tmp_path: Path) -> None:
    """Outcomes of a create and of our own cancel, arriving cancel first (Redox may reorder),
    settle both rows right; a refusal fails the create; duplicates change nothing."""
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        ensure_outbox_tables(con)
        con.execute(
            "insert into outbox.appointments (request_id, appointment_id, action, connection_id, patient_key, status) values "
            "('c1', 'V1', 'create', 'lakeside-dm', 'k', 'sent'), ('x1', 'V1', 'cancel', 'lakeside-dm', 'k', 'sending'), "
            "('c2', 'V2', 'create', 'lakeside-dm', 'k', 'sent'), ('c3', 'V3', 'create', 'lakeside-dm', 'k', 'pending')"
        )
        con.execute(
            "insert into outbox.orders (order_id, connection_id, patient_key, status) values "
            "('O1', 'lakeside-dm', 'k', 'sent'), ('O2', 'lakeside-dm', 'k', 'sent')"
        )
        messages = [
            _dm("Scheduling", "Cancel", Visit={"VisitNumber": "V1"}),
            _dm("Scheduling", "New", Visit={"VisitNumber": "V1"}),
            _dm(
                "Scheduling",
                "Cancel",
                Visit={"VisitNumber": "V2", "CancelReason": "slot no longer available"},
            ),
            _dm("Scheduling", "New", Visit={"VisitNumber": "V3"}),  # still pending: not ours to settle yet
            _dm("Order", "Update", Order={"ID": "O1", "Status": "Scheduled"}),
            _dm(
                "Order",
                "Cancel",
                Order={"ID": "O2", "Status": "Canceled", "Notes": ["unknown ordering provider"]},
            ),
            _dm("Order", "Update", Order={"ID": "someone-elses"}),
            None,
        ]
        consumed = settle_outcomes(con, messages)
        assert consumed == [False, False, False, False, True, True, False, False]
        assert settle_outcomes(con, messages) == consumed  # again: nothing moves
        rows = dict(
            con.execute(
                "select request_id, status || coalesce(' / ' || last_error, '') from outbox.appointments"
            ).fetchall()
        )
        orders = dict(
            con.execute(
                "select order_id, status || coalesce(' / ' || last_error, '') from outbox.orders"
            ).fetchall()
        )
    assert rows == {
        "c1": "acknowledged",
        "x1": "acknowledged",
        "c2": "failed / refused by the EHR: slot no longer available",
        "c3": "pending",
    }
    assert orders == {"O1": "acknowledged", "O2": "failed / refused by the EHR: unknown ordering provider"}
