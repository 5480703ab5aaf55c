"""Write-back end to end against the sandbox: SQL-inserted orders and appointments arrive exactly
once through each connection's surface with Redox's documented operations, under post-commit
timeouts, 5xx, resets and kills between send and status commit; invalid rows fail and are never
sent; ``--dry-run`` sends nothing.

The crosswalk is built from the sandbox's truth (no sync: fast), exactly as a sync publishes it
(``redox.patient_identifiers``: ``fhir`` logical id, ``MR``, ``EPI``)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
from redox.factory import redox_object_factory

from pipelines.warehouse import WarehousePaths, WriterLock
from pipelines.writeback import ensure_outbox_tables
from pipelines.writeback.sender import Destination, Writer
from resources.onboarding import connect_sandbox
from resources.settings import load_settings
from sandbox.server import SandboxServer
from tests.conftest import sandbox_config

EHR = ("northwind-fhir", "lakeside-dm", "riverbend-both")
NOT_ENTITLED = "carequality-network"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("REDOX_ELT_HOME", "REDOX_ELT_MASTER_KEY")}
    os.environ["REDOX_ELT_HOME"] = str(home)
    os.environ["REDOX_ELT_MASTER_KEY"] = "writeback-master-key"
    server = SandboxServer(sandbox_config(patients=40, seed=5)).start()
    try:
        cfg = connect_sandbox(server.url, home / "connections.yaml")
        settings = load_settings(cfg)
        conns = tuple(dataclasses.replace(c, max_rps=500.0, timeout_s=5.0) for c in settings.connections)
        truth = httpx.get(f"{server.url}/_sandbox/truth", params={"persons": "true"}, timeout=60).json()
        yield {
            "server": server,
            "settings": dataclasses.replace(settings, connections=conns),
            "home": home,
            "cfg": cfg,
            "truth": truth,
        }
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def paths(env: dict[str, Any], tmp_path: Path) -> WarehousePaths:
    """A warehouse holding the crosswalk a sync would publish, and the (empty) outboxes."""
    env["server"].state.writes.writes.clear()
    faults(env, {})
    paths = WarehousePaths.at(tmp_path / "w.duckdb")
    with duckdb.connect(str(paths.duckdb)) as con:
        con.execute("CREATE SCHEMA redox")
        con.execute(
            "CREATE TABLE redox.patient_identifiers (connection_id VARCHAR, id_system VARCHAR, id_value VARCHAR, patient_key VARCHAR)"
        )
        for person in env["truth"]["persons"]:
            for r in person["records"]:
                key = patient_key(r)
                rows = [("fhir", r["patient_id"]), ("MR", r["mrn"]), ("EPI", person["enterprise_id"])]
                con.executemany(
                    "INSERT INTO redox.patient_identifiers VALUES (?, ?, ?, ?)",
                    [(r["connection_id"], s, v, key) for s, v in rows],
                )
        ensure_outbox_tables(con)
    return paths


def patient_key(record: dict[str, str]) -> str:
    return "pk-" + record["patient_id"][:12]


def patients_of(env: dict[str, Any], conn_id: str, n: int) -> list[str]:
    keys = [
        patient_key(r) for p in env["truth"]["persons"] for r in p["records"] if r["connection_id"] == conn_id
    ]
    return sorted(keys)[:n]


def faults(env: dict[str, Any], body: dict[str, Any]) -> None:
    httpx.post(f"{env['server'].url}/_sandbox/faults", json=body, timeout=10).raise_for_status()


def writes(env: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return httpx.get(f"{env['server'].url}/_sandbox/writes", timeout=30).json()


def insert_orders(paths: WarehousePaths, rows: list[tuple[str, str, str]], code: str = "4548-4") -> None:
    """Plain SQL naming only business columns, as a user would."""
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        for order_id, conn_id, key in rows:
            con.execute(
                "insert into outbox.orders (order_id, connection_id, patient_key, procedure_code, procedure_codeset, "
                "procedure_description, priority, ordered_at) values (?, ?, ?, ?, 'LOINC', 'Hemoglobin A1c', 'Routine', now())",
                [order_id, conn_id, key, code],
            )


def outbox(paths: WarehousePaths, kind: str = "orders") -> dict[str, tuple[str, str | None]]:
    key = "order_id" if kind == "orders" else "request_id"
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        return {
            r[0]: (r[1], r[2])
            for r in con.execute(f"select {key}, status, last_error from outbox.{kind}").fetchall()
        }


def dm_valid(payload: dict[str, Any]) -> None:
    p = json.loads(json.dumps(payload))
    for k in ("Message", "Transmission"):
        p.get("Meta", {}).pop(k, None)
    redox_object_factory(p)


def test_sql_orders_and_appointments_arrive_once_through_each_surface(
    env: dict[str, Any], paths: WarehousePaths
) -> None:
    ids = []
    for conn_id in EHR:
        rows = [(f"ord-{conn_id}-{i}", conn_id, k) for i, k in enumerate(patients_of(env, conn_id, 3))]
        ids += [r[0] for r in rows]
        insert_orders(paths, rows)
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        for conn_id in ("northwind-fhir", "lakeside-dm"):
            key = patients_of(env, conn_id, 1)[0]
            con.execute(
                "insert into outbox.appointments (request_id, appointment_id, connection_id, patient_key, start_at, reason, "
                "location_department) values (?, ?, ?, ?, timestamptz '2026-12-03 09:00:00+00', 'Follow-up', 'Clinic 3')",
                [f"{conn_id}-new", f"VN-{conn_id}", conn_id, key],
            )
    report = Writer(env["settings"], paths, out=lambda _s: None).run()
    assert (report.sent, report.failed, report.unknown) == (len(ids) + 2, 0, 0), report.failures
    # Reschedule and cancel need the appointment to exist: they go in a second round.
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        for conn_id in ("northwind-fhir", "lakeside-dm"):
            key = patients_of(env, conn_id, 1)[0]
            con.execute(
                "insert into outbox.appointments (request_id, appointment_id, action, connection_id, patient_key, start_at) "
                "values (?, ?, 'update', ?, ?, timestamptz '2026-12-04 10:00:00+00')",
                [f"{conn_id}-move", f"VN-{conn_id}", conn_id, key],
            )
            con.execute(
                "insert into outbox.appointments (request_id, appointment_id, action, connection_id, patient_key) "
                "values (?, ?, 'cancel', ?, ?)",
                [f"{conn_id}-cancel", f"VN-{conn_id}", conn_id, key],
            )
    Writer(env["settings"], paths, out=lambda _s: None).run()  # in insertion order: move, then cancel
    w = writes(env)
    got = Counter(x["order_id"] for x in w["orders"])
    assert set(got) == set(ids) and set(got.values()) == {1}
    for x in w["orders"]:
        conn = env["settings"].connection(x["connection_id"])
        if "fhir" in conn.surfaces:
            assert x["surface"] == "fhir"
            header = x["payload"]["entry"][0]["resource"]
            assert header["eventUri"] == "https://fhir.redoxengine.com/EventDefinition/ServiceRequestCreate"
            assert header["source"]["endpoint"] and header["focus"]
        else:
            assert x["surface"] == "datamodel"
            dm_valid(x["payload"])
    events = Counter((x["connection_id"], x["event"]) for x in w["appointments"])
    assert events == {
        (c, e): 1
        for c in ("northwind-fhir", "lakeside-dm")
        for e in ("Scheduling-New", "Scheduling-Reschedule", "Scheduling-Cancel")
    }
    for x in w["appointments"]:
        if x["surface"] == "datamodel":
            dm_valid(x["payload"])
    assert {s for s, _ in outbox(paths).values()} == {"acknowledged"}
    assert {s for s, _ in outbox(paths, "appointments").values()} <= {"sent", "acknowledged"}
    # A second run has nothing to do.
    assert Writer(env["settings"], paths, out=lambda _s: None).run().sent == 0
    assert len(writes(env)["orders"]) == len(ids)


class KilledBetweenSendAndCommit(BaseException):
    """Stands for SIGKILL: escapes every handler, after the server committed the write."""


class Crashing(Destination):
    def __init__(self, settings: Any, conn: Any, rng: random.Random, rate: float) -> None:
        super().__init__(settings, conn)
        self.rng, self.rate = rng, rate

    def send(self, request: Any) -> str | None:
        external_id = super().send(request)
        if self.rng.random() < self.rate:
            raise KilledBetweenSendAndCommit
        return external_id


def test_fault_trials_deliver_exactly_once(env: dict[str, Any], paths: WarehousePaths) -> None:
    """210 orders (70 per connection) under 30% timeouts after commit, 5xx, resets and 10% kills
    between send and status commit: each arrives once, no row is left ``sending``."""
    rng = random.Random(11)
    ids = []
    for conn_id in EHR:
        keys = patients_of(env, conn_id, 40)
        rows = [(f"trial-{conn_id}-{i}", conn_id, keys[i % len(keys)]) for i in range(70)]
        ids += [r[0] for r in rows]
        insert_orders(paths, rows)
    faults(env, {"timeout_after_commit_rate": 0.3, "error_rate": 0.1, "drop_rate": 0.05, "timeout_s": 0.05})
    kills = 0
    for _ in range(60):
        writer = Writer(
            env["settings"],
            paths,
            destination_factory=lambda s, c: Crashing(s, c, rng, 0.1),
            out=lambda _s: None,
            acknowledge=False,
        )
        try:
            writer.run()
        except KilledBetweenSendAndCommit:
            kills += 1
            continue
        if not any(s in ("pending", "sending") for s, _ in outbox(paths).values()):
            break
    faults(env, {})
    Writer(env["settings"], paths, out=lambda _s: None).run()
    got = Counter(x["order_id"] for x in writes(env)["orders"])
    assert kills >= 5
    assert set(got) == set(ids)
    assert [k for k, v in got.items() if v > 1] == []
    statuses = outbox(paths)
    assert {s for s, _ in statuses.values()} == {"acknowledged"}
    found = sum(1 for _, note in statuses.values() if note and "found at the destination" in note)
    assert found >= 10  # the post-commit timeouts and kills were resolved by looking, not re-sending


def test_invalid_rows_fail_with_a_reason_and_are_never_sent(
    env: dict[str, Any], paths: WarehousePaths
) -> None:
    fhir_key = patients_of(env, "northwind-fhir", 1)[0]
    insert_orders(
        paths, [("bad-patient", "northwind-fhir", "no-such-patient"), ("bad-conn", NOT_ENTITLED, fhir_key)]
    )
    insert_orders(paths, [("bad-code", "lakeside-dm", patients_of(env, "lakeside-dm", 1)[0])], code="")
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        con.execute(
            "insert into outbox.orders (order_id, connection_id, patient_key, procedure_code, procedure_codeset, priority) "
            "values ('bad-priority', 'northwind-fhir', ?, '4548-4', 'LOINC', 'whenever')",
            [fhir_key],
        )
        con.execute(
            "insert into outbox.orders (order_id, connection_id, patient_key, procedure_code, procedure_codeset) "
            "values ('bad-unknown-conn', 'nowhere', ?, '4548-4', 'LOINC')",
            [fhir_key],
        )
        con.execute(
            "insert into outbox.appointments (request_id, appointment_id, action, connection_id, patient_key) "
            "values ('bad-cancel', 'VN-NEVER', 'cancel', 'northwind-fhir', ?)",
            [fhir_key],
        )
    Writer(env["settings"], paths, out=lambda _s: None).run()
    statuses = {**outbox(paths), **outbox(paths, "appointments")}
    assert {k: s for k, (s, _) in statuses.items()} == dict.fromkeys(statuses, "failed")
    reasons = {k: r for k, (_, r) in statuses.items()}
    assert "unknown patient" in reasons["bad-patient"]
    assert "not entitled" in reasons["bad-conn"]
    assert "procedure_code is missing" in reasons["bad-code"]
    assert "priority must be one of" in reasons["bad-priority"]
    assert "not a connection" in reasons["bad-unknown-conn"]
    assert "does not exist" in reasons["bad-cancel"]
    assert fhir_key not in json.dumps(reasons)
    assert writes(env) == {"orders": [], "appointments": []}


def test_dry_run_sends_nothing_and_prints_no_phi(
    env: dict[str, Any], paths: WarehousePaths, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.writeback.cli import _writeback

    rows = [(f"dry-{c}", c, patients_of(env, c, 1)[0]) for c in EHR]
    insert_orders(paths, rows)
    args = type(
        "A",
        (),
        {"config": str(env["cfg"]), "warehouse": str(paths.duckdb), "dry_run": True, "connection": None},
    )
    assert _writeback(args) == 0
    printed = capsys.readouterr().out
    assert (
        "3 would be sent" in printed
        and "ServiceRequest/$servicerequest-create" in printed
        and "Order.New" in printed
    )
    phi = [v for p in env["truth"]["persons"] for r in p["records"] for v in (r["mrn"], r["patient_id"])]
    assert not [v for v in phi if v in printed]
    assert writes(env) == {"orders": [], "appointments": []}
    assert {s for s, _ in outbox(paths).values()} == {"pending"}


def test_sigkilled_writeback_process_then_rerun_delivers_exactly_once(
    env: dict[str, Any], paths: WarehousePaths
) -> None:
    rows = [(f"kill-{c}-{i}", c, k) for c in EHR for i, k in enumerate(patients_of(env, c, 8))]
    insert_orders(paths, rows)
    faults(env, {"latency_ms": 40, "timeout_after_commit_rate": 0.2, "timeout_s": 0.3})
    cmd = [
        sys.executable,
        "-m",
        "redox_elt.cli",
        "writeback",
        "--config",
        str(env["cfg"]),
        "--warehouse",
        str(paths.duckdb),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(writes(env)["orders"]) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a condition, not waiting a fixed time
        assert proc.poll() is None, "the writeback finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    faults(env, {})
    Writer(env["settings"], paths, out=lambda _s: None).run()
    got = Counter(x["order_id"] for x in writes(env)["orders"])
    assert set(got) == {r[0] for r in rows} and set(got.values()) == {1}
    assert {s for s, _ in outbox(paths).values()} == {"acknowledged"}


def test_outbox_ids_are_stable_business_ids(paths: WarehousePaths) -> None:
    """The documented insert works with only business columns; status defaults to pending."""
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        ensure_outbox_tables(con)  # idempotent
        oid = uuid.uuid4().hex
        con.execute(
            "insert into outbox.orders (order_id, connection_id, patient_key, procedure_code, procedure_codeset, "
            "procedure_description, priority, ordered_at) values (?, 'c', 'p', '1', 'LOINC', 'x', 'Routine', now())",
            [oid],
        )
        assert con.execute(
            "select status, attempts from outbox.orders where order_id = ?", [oid]
        ).fetchone() == ("pending", 0)
        with pytest.raises(duckdb.ConstraintException):
            con.execute("update outbox.orders set status = 'lost' where order_id = ?", [oid])


class LosesTheRescheduleAnswer(Destination):
    """The reschedule commits at the destination, and its answer is lost (a 504 after commit)."""

    def send(self, request: Any) -> str | None:
        from resources.client import RedoxAPIError

        external_id = super().send(request)
        if request.action == "update":
            raise RedoxAPIError("lost", connection_id=self.conn.id, operation="x", status_code=504)
        return external_id


def test_writes_to_one_appointment_keep_their_order_after_a_lost_answer(
    env: dict[str, Any], paths: WarehousePaths
) -> None:
    conn_id = "northwind-fhir"
    key = patients_of(env, conn_id, 1)[0]
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        for request_id, action, start in (
            ("a-new", "create", "2026-12-03 09:00:00+00"),
            ("a-move", "update", "2026-12-04 10:00:00+00"),
            ("a-cancel", "cancel", None),
        ):
            con.execute(
                "insert into outbox.appointments (request_id, appointment_id, action, connection_id, patient_key, "
                "start_at) values (?, 'VN-ORDER', ?, ?, ?, ?::timestamptz)",
                [request_id, action, conn_id, key, start],
            )
    first = Writer(
        env["settings"], paths, destination_factory=LosesTheRescheduleAnswer, out=lambda _s: None
    ).run()
    # The reschedule was found by looking, not re-sent; the cancel waited for it.
    assert (first.sent, first.found_after_unanswered_send) == (1, 1)
    assert outbox(paths, "appointments")["a-cancel"][0] == "pending"
    Writer(env["settings"], paths, out=lambda _s: None).run()
    events = [x["event"] for x in writes(env)["appointments"]]
    assert events == ["Scheduling-New", "Scheduling-Reschedule", "Scheduling-Cancel"]
