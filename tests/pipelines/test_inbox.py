"""The webhook inbox: the receiver's protocol (handshake, token, size, durability,
de-duplication) and the processing into the common model (event-time order, the panel,
``ops.events``, quarantine, idempotent replay)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest
from starlette.testclient import TestClient

from pipelines.inbox.envelope import classify
from pipelines.inbox.process import process_inbox
from pipelines.inbox.receiver import create_app, settings_resolver
from pipelines.inbox.store import Delivery, connect, inbox_path, stats, store_batch
from pipelines.publish import model_schema
from pipelines.warehouse import WarehousePaths
from resources.settings import settings_from_dict

TOKEN = "inbox-test-token"
EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "redox-examples" / "datamodel"
DEST_ID = "00000000-0000-4000-8000-0000000000aa"
CONN = "clinic-dm"


def settings() -> Any:
    return settings_from_dict(
        {
            "organization": "Test",
            "environment": "Development",
            "token_url": "http://127.0.0.1:9/v2/auth/token",
            "auth": {"client_id": "c", "key_ring": "signing-keys"},
            "connections": [
                {
                    "id": CONN,
                    "name": "Clinic",
                    "surfaces": ["datamodel"],
                    "datamodel_url": "http://127.0.0.1:9/endpoint",
                    "destination_id": DEST_ID,
                },
                {
                    "id": "north-fhir",
                    "name": "North (FHIR)",
                    "surfaces": ["fhir"],
                    "fhir_base_url": "http://127.0.0.1:9/fhir/R4/north/Development",
                },
            ],
        }
    )


@pytest.fixture
def paths(tmp_path: Path) -> WarehousePaths:
    return WarehousePaths.at(tmp_path / "w.duckdb")


@pytest.fixture
def client(paths: WarehousePaths):
    app = create_app(inbox_path(paths), TOKEN, settings_resolver(settings()), max_body_bytes=64 * 1024)
    with TestClient(app) as c:
        yield c


def counts(paths: WarehousePaths) -> dict[str, int]:
    with connect(inbox_path(paths), create=True) as con:
        return stats(con)


def example(*parts: str) -> bytes:
    return (EXAMPLES.joinpath(*parts)).read_bytes()


# ---- receiver ----------------------------------------------------------------------------


def test_handshake_answers_the_challenge_in_both_forms(client) -> None:
    r = client.post("/", json={"verification-token": TOKEN, "challenge": "c-post"})
    assert r.status_code == 200 and r.text == "c-post"
    r = client.get("/", params={"challenge": "c-get", "verification-token": TOKEN})
    assert r.status_code == 200 and r.text == "c-get"
    assert client.post("/", json={"verification-token": "nope", "challenge": "x"}).status_code == 403
    assert client.get("/", params={"challenge": "x", "verification-token": "nope"}).status_code == 403


def test_wrong_or_missing_token_is_refused_and_stores_nothing(client, paths) -> None:
    body = example("results", "newResults", "results-new.json")
    assert client.post("/", content=body).status_code == 401
    assert client.post("/", content=body, headers={"verification-token": "wrong"}).status_code == 403
    assert counts(paths)["distinct_messages"] == 0


def test_oversized_body_gets_413_and_is_not_stored(client, paths) -> None:
    big = b'{"Meta": {"DataModel": "Results", "EventType": "New"}, "x": "' + b"a" * 70_000 + b'"}'
    r = client.post("/", content=big, headers={"verification-token": TOKEN})
    assert r.status_code == 413

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(70):
            yield b"a" * 1024

    r = client.post("/", content=chunks(), headers={"verification-token": TOKEN})
    assert r.status_code == 413
    assert counts(paths)["distinct_messages"] == 0


def test_bom_and_extra_attribute_examples_are_accepted(client, paths) -> None:
    files = sorted(EXAMPLES.rglob("*.json"))
    extras = [f.read_bytes() for f in files if b'"Foo"' in f.read_bytes()]
    # Redox sends some payloads with a UTF-8 byte-order mark (the corpus notes it; add one).
    boms = [b"\xef\xbb\xbf" + example("results", "newResults", "timothy.json").lstrip(b"\xef\xbb\xbf")]
    assert extras
    for body in [*boms, *extras]:
        r = client.post("/", content=body, headers={"verification-token": TOKEN})
        assert r.status_code == 200
    got = counts(paths)
    # Stored, every one; a query response among them is not a pushed event (quarantined).
    responses = sum(b'"EventType": "PatientQueryResponse"' in b for b in extras)
    assert got["distinct_messages"] == len({*boms, *extras}) and got["quarantined"] == responses


def test_duplicates_are_stored_once_and_bad_content_is_stored_for_quarantine(client, paths) -> None:
    payload = json.loads(example("results", "newResults", "results-new.json").decode("utf-8-sig"))
    payload["Meta"]["Logs"] = [{"ID": "log-1", "AttemptID": "a-1"}]
    retry = copy.deepcopy(payload)
    retry["Meta"]["Logs"] = [{"ID": "log-1", "AttemptID": "a-2"}]  # Redox's retry: same Log ID
    headers = {"verification-token": TOKEN}
    for body in (payload, retry, payload):
        assert client.post("/", json=body, headers=headers).status_code == 200
    assert client.post("/", content=b"{not json", headers=headers).status_code == 200
    unknown = {"Meta": {"DataModel": "Teleportation", "EventType": "New"}}
    assert client.post("/", json=unknown, headers=headers).status_code == 200
    assert counts(paths) == {
        "distinct_messages": 3,
        "duplicates_dropped": 2,
        "quarantined": 2,
        "pending_processing": 3,
    }


# ---- processing --------------------------------------------------------------------------


def dm_event(model: str, event: str, at: str, log_id: str, visit: str = "V-1") -> dict[str, Any]:
    base = (
        json.loads(example("patientadmin", "discharge", "patientadmin-discharge.json").decode("utf-8-sig"))
        if model == "PatientAdmin"
        else json.loads(
            example("scheduling", "modification", "scheduling-modification.json").decode("utf-8-sig")
        )
    )
    base["Meta"].update(
        EventType=event,
        EventDateTime=at,
        Destinations=[{"ID": DEST_ID, "Name": "Clinic"}],
        Logs=[{"ID": log_id, "AttemptID": log_id}],
    )
    base["Visit"]["VisitNumber"] = visit
    if model == "PatientAdmin" and event != "Discharge":
        base["Visit"]["DischargeDateTime"] = None
    if model == "Scheduling" and event == "Cancel":
        base["Visit"]["CancelReason"] = "Patient request"
    return base


def deliver(paths: WarehousePaths, *payloads: dict[str, Any]) -> None:
    resolve = settings_resolver(settings())
    with connect(inbox_path(paths), create=True) as con:
        deliveries = []
        for p in payloads:
            body = json.dumps(p).encode()
            env = classify(body)
            deliveries.append(Delivery(env, body, resolve(env), datetime.now(UTC).isoformat()))
        store_batch(con, deliveries)


def published(paths: WarehousePaths, table: str, column: str, key: str, value: str) -> Any:
    with duckdb.connect(str(paths.duckdb)) as con:
        ms = model_schema(con)
        row = con.execute(f"SELECT {column} FROM {ms}.{table} WHERE {key} = ?", [value]).fetchone()
    return row[0] if row else None


def test_late_arrival_never_reopens_a_discharged_visit(paths) -> None:
    deliver(paths, dm_event("PatientAdmin", "Discharge", "2026-11-02T10:00:00.000Z", "L-dis"))
    first = process_inbox(paths, settings())
    assert first["processed"] == 1 and first["quarantined"] == 0
    assert published(paths, "encounters", "status", "encounter_id", "V-1") == "finished"
    deliver(paths, dm_event("PatientAdmin", "Arrival", "2026-11-01T08:00:00.000Z", "L-arr"))
    late = process_inbox(paths, settings())
    assert late["processed"] == 1 and late["stale_rows_dropped"] >= 1
    assert published(paths, "encounters", "status", "encounter_id", "V-1") == "finished"
    with duckdb.connect(str(paths.duckdb)) as con:
        events = con.execute("SELECT event_type, visit_number FROM ops.events ORDER BY event_at").fetchall()
    assert events == [("Arrival", "V-1"), ("Discharge", "V-1")]
    # The landed messages rebuild the same state without the inbox (renormalize replays them).
    from pipelines.renormalize import renormalize

    renormalize(paths, [CONN])
    assert published(paths, "encounters", "status", "encounter_id", "V-1") == "finished"


def test_late_reschedule_never_overrides_a_cancel(paths) -> None:
    # Both in one batch, in arrival order Cancel then (late) Reschedule; then once more apart.
    deliver(
        paths,
        dm_event("Scheduling", "Cancel", "2026-11-03T09:00:00.000Z", "S-can", visit="A-1"),
        dm_event("Scheduling", "Reschedule", "2026-11-02T09:00:00.000Z", "S-res", visit="A-1"),
    )
    process_inbox(paths, settings())
    assert published(paths, "appointments", "status", "appointment_id", "A-1") == "cancelled"
    deliver(paths, dm_event("Scheduling", "Reschedule", "2026-11-02T12:00:00.000Z", "S-res2", visit="A-1"))
    process_inbox(paths, settings())
    assert published(paths, "appointments", "status", "appointment_id", "A-1") == "cancelled"


def test_event_named_patient_enters_the_panel_due_and_replay_is_idempotent(paths) -> None:
    deliver(paths, dm_event("PatientAdmin", "Discharge", "2026-11-02T10:00:00.000Z", "L-p"))
    deliver(
        paths, {"Meta": {"DataModel": "Teleportation", "EventType": "New", "Destinations": [{"ID": DEST_ID}]}}
    )
    out = process_inbox(paths, settings())
    assert out["processed"] == 2 and out["quarantined"] == 1
    with duckdb.connect(str(paths.duckdb)) as con:
        panel = con.execute(
            "SELECT id_system, pull_reason, next_pull_due_at <= now() FROM ops.patient_panel "
            "WHERE connection_id = ? AND id_value = '0000000001'",
            [CONN],
        ).fetchall()
        quarantine = con.execute(
            "SELECT count(*) FROM raw.quarantine WHERE connection_id = ? AND reason LIKE 'unknown data model%'",
            [CONN],
        ).fetchone()[0]
        before = con.execute("SELECT count(*) FROM raw.datamodel_encounters").fetchone()[0]
    assert panel and panel[0][1] == "event" and panel[0][2] is True
    with duckdb.connect(str(paths.duckdb)) as con:  # one panel row per patient, by its MR
        assert con.execute("SELECT id_system FROM ops.patient_panel").fetchall() == [("MR",)]
    assert quarantine == 1
    assert counts(paths)["pending_processing"] == 0
    again = process_inbox(paths, settings(), since=datetime(2000, 1, 1, tzinfo=UTC))
    assert again["processed"] == 2
    with duckdb.connect(str(paths.duckdb)) as con:
        assert con.execute("SELECT count(*) FROM raw.datamodel_encounters").fetchone()[0] == before
        assert con.execute("SELECT count(*) FROM ops.events").fetchone()[0] == 1
    landed = list((paths.landing_root).rglob("*.json.gz"))
    assert len(landed) == 1  # the replay reused the landed page


def test_fhir_notifications_land_detailed_rows_and_lightweight_only_schedule_a_refresh(paths) -> None:
    from sandbox.app import build_store
    from sandbox.config import SandboxConfig
    from sandbox.fhir.notifications import render_redox_notification

    config, store = build_store(SandboxConfig(patients=40, seed=7))
    changes = [c for c in store.advance(2, 0.1) if c.record.connection_id == "northwind-fhir"]
    results = [c for c in changes if c.entity == "results"][:3]
    encounters = [c for c in changes if c.entity == "encounters"][:2]
    assert results and encounters
    conn = config.connection("northwind-fhir")
    base = "http://127.0.0.1:9/fhir/R4/north/Development"  # the configured connection's base
    detailed = [render_redox_notification(c, conn, base_url=base) for c in results]
    light = [render_redox_notification(c, conn, base_url=base, detail="lightweight") for c in encounters]
    deliver(paths, *detailed, *light)
    out = process_inbox(paths, settings())
    assert out["processed"] == 5 and out["quarantined"] == 0 and out["connections"] == ["north-fhir"]
    with duckdb.connect(str(paths.duckdb)) as con:
        ms = model_schema(con)
        n_results = con.execute(
            f"SELECT count(*) FROM {ms}.results WHERE connection_id = 'north-fhir'"
        ).fetchone()[0]
        n_encounters = (
            con.execute("SELECT count(*) FROM raw.fhir_encounters").fetchone()[0]
            if con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'fhir_encounters'"
            ).fetchone()[0]
            else 0
        )
        due = con.execute(
            "SELECT count(DISTINCT id_value) FROM ops.patient_panel WHERE connection_id = 'north-fhir' "
            "AND pull_reason = 'event'"
        ).fetchone()[0]
        events = con.execute("SELECT count(*) FROM ops.events WHERE connection_id = 'north-fhir'").fetchone()[
            0
        ]
    assert n_results == len({c.record.id for c in results})
    assert n_encounters == 0  # lightweight: no rows, the refresh pulls them
    patients = {c.record.patient.mrn for c in [*results, *encounters]}
    assert due == len(patients) and events == len(encounters)


def run_cli(*argv: str) -> int:
    """The ``redox-elt`` parser and verb, without ``main``'s process-wide signal and umask."""
    from redox_elt.cli import _apply_environment, build_parser
    from redox_elt.environment import Environment

    args = build_parser().parse_args(list(argv))
    _apply_environment(args, Environment.read({}))
    return int(args.func(args) or 0)


def test_cli_stats_replay_and_missing_token(paths, tmp_path: Path, capsys, monkeypatch) -> None:
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(settings().to_dict()))
    where = ["--config", str(config), "--warehouse", str(paths.duckdb)]
    assert run_cli("webhook", "stats", "--json", *where) == 2
    assert "no webhook inbox" in capsys.readouterr().err
    deliver(paths, dm_event("PatientAdmin", "Discharge", "2026-11-02T10:00:00.000Z", "L-cli"))
    assert run_cli("webhook", "replay", "--since", "2000-01-01", *where) == 0
    assert json.loads(capsys.readouterr().out)["processed"] == 1
    assert run_cli("webhook", "stats", "--json", *where) == 0
    assert json.loads(capsys.readouterr().out) == {
        "distinct_messages": 1,
        "duplicates_dropped": 0,
        "quarantined": 0,
        "pending_processing": 0,
    }
    monkeypatch.delenv("REDOX_ELT_WEBHOOK_TOKEN", raising=False)
    monkeypatch.setenv("REDOX_ELT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REDOX_ELT_MASTER_KEY", "k" * 32)
    assert run_cli("webhook", "serve", "--port", "1", *where) == 2
    err = capsys.readouterr().err
    assert "REDOX_ELT_WEBHOOK_TOKEN" in err and err.count("\n") == 1


def test_every_redox_event_example_is_processed_into_the_model(paths) -> None:
    payloads = []
    for f in sorted(EXAMPLES.rglob("*.json")):
        payload = json.loads(f.read_bytes().decode("utf-8-sig"))
        if any(w in str(payload["Meta"].get("EventType")) for w in ("Query", "Response", "Get")):
            continue
        payload["Meta"]["Destinations"] = [{"ID": DEST_ID, "Name": "Clinic"}]
        payloads.append(payload)
    assert len(payloads) >= 30
    deliver(paths, *payloads)
    out = process_inbox(paths, settings())
    assert out["processed"] == counts(paths)["distinct_messages"] and out["quarantined"] == 0
    with duckdb.connect(str(paths.duckdb)) as con:
        ms = model_schema(con)
        landed = {
            t: con.execute(f"SELECT count(*) FROM {ms}.{t} WHERE connection_id = ?", [CONN]).fetchone()[0]
            for t in ("patients", "encounters", "results", "medications", "appointments", "documents")
        }
    assert all(landed.values()), landed
