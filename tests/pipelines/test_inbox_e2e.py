"""Pushed data end to end: the sandbox's real webhook feed (both payload families) into a
receiver on loopback, processed into the model and the patient panel, then one sync.

A patient first seen in an event — no roster, no discovery window covering them — is in the
panel and, after the next sync, has every one of their records in the warehouse; the
event-derived rows themselves already equal the sandbox's records before that sync."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import duckdb
import httpx

from pipelines.inbox.process import process_inbox
from pipelines.model import ENTITIES
from pipelines.publish import model_schema
from pipelines.sync import run_sync
from pipelines.warehouse import WarehousePaths
from resources.onboarding import connect_sandbox
from resources.settings import load_settings
from sandbox.population.store import Query
from tests.pipelines.inbox_receiver import wait_until

TOKEN = "e2e-inbox-token"
CONNECTIONS = ("northwind-fhir", "lakeside-dm", "riverbend-both")


def _panel(paths: WarehousePaths) -> dict[str, list[tuple[str, str, str]]]:
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        rows = con.execute(
            "SELECT connection_id, found_by, fhir_id, mrn FROM ops.patient_panel ORDER BY ALL"
        ).fetchall()
    out: dict[str, list[tuple[str, str, str]]] = {}
    for conn, found_by, fhir_id, mrn in rows:
        out.setdefault(conn, []).append((found_by, fhir_id, mrn))
    return out


def _warehouse_counts_by_mrn(paths: WarehousePaths, connection_id: str) -> dict[str, Counter]:
    """entity -> Counter(MRN -> rows) for one connection, through the crosswalk."""
    out: dict[str, Counter] = {}
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        ms = model_schema(con)
        for entity in ENTITIES:
            rows = con.execute(
                f"""SELECT i.id_value, count(DISTINCT t.source_id) FROM {ms}.{entity} t
                    JOIN {ms}.patient_identifiers i
                      ON i.connection_id = t.connection_id AND i.patient_key = t.patient_key
                     AND i.id_system = 'MR'
                    WHERE t.connection_id = ? GROUP BY 1""",
                [connection_id],
            ).fetchall()
            out[entity] = Counter(dict(rows))
    return out


def test_event_first_patients_get_every_record_after_the_next_sync(
    sandbox_factory, receiver, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("REDOX_ELT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REDOX_ELT_MASTER_KEY", "inbox-e2e-master-key")
    server = sandbox_factory(patients=80, seed=23)
    settings = load_settings(connect_sandbox(server.url, tmp_path / "connections.yaml"))
    settings = dataclasses.replace(
        settings, connections=tuple(dataclasses.replace(c, max_rps=200.0) for c in settings.connections)
    )
    paths = WarehousePaths.at(tmp_path / "wh" / "redox.duckdb")
    url = receiver(settings, paths, TOKEN)
    r = httpx.post(f"{server.url}/_sandbox/webhooks", json={"url": url, "token": TOKEN}, timeout=30)
    assert r.status_code == 200, r.text
    # Duplicates and reordering on, as Redox delivers.
    httpx.post(f"{server.url}/_sandbox/faults", json={"webhook_duplicate_rate": 0.3, "webhook_reorder": True})
    httpx.post(f"{server.url}/_sandbox/advance", json={"days": 1, "change_fraction": 0.03}, timeout=120)

    def delivered() -> bool:
        hooks = httpx.get(f"{server.url}/_sandbox/truth", params={"persons": "false"}).json()["webhooks"]
        return hooks["pending"] == 0

    wait_until(delivered, 120, "the sandbox to deliver every event")

    # No roster, no sync yet: the events alone put their patients into the panel.
    out = process_inbox(paths, settings)
    assert out["quarantined"] == 0, out
    panel = _panel(paths)
    assert set(panel) >= set(CONNECTIONS), "both surfaces' events should name patients"
    assert all(found_by == "event" for rows in panel.values() for found_by, _, _ in rows)

    store = server.state.store
    # Event-derived rows equal the sandbox's records: each pushed record is in the warehouse
    # once, in the version the sandbox holds now (the feed's last word on it).
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        ms = model_schema(con)
        tables = {
            t
            for (t,) in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", [ms]
            ).fetchall()
        }
        compared = 0
        for entity in ("results", "appointments"):
            if entity not in tables:
                continue
            for conn, source_id, status in con.execute(
                f"SELECT connection_id, source_id, status FROM {ms}.{entity}"
            ).fetchall():
                record = store.get(conn, entity, source_id) or store.find_by_business_id(
                    conn, entity, source_id
                )
                assert record is not None, f"an {entity} row from an event is unknown to the sandbox"
                assert status == record.status, (conn, entity, status, record.status)
                compared += 1
        events = con.execute("SELECT count(*) FROM ops.events").fetchone()[0]
    assert events > 0 and compared > 0

    # The next sync, with discovery covering nothing: only the event patients are pulled,
    # and each ends with all of their records.
    report = run_sync(settings, paths, connection_ids=list(CONNECTIONS), discover_days=0)
    assert report.ok, report.failures
    for conn in CONNECTIONS:
        got = _warehouse_counts_by_mrn(paths, conn)
        mrns = {mrn for _, _, mrn in _panel(paths)[conn]}
        assert mrns and None not in mrns, "every event patient should be known by MRN after the sync"
        for mrn in mrns:
            (patient,) = store.find_patients(conn, identifier=mrn, id_type="MR")
            fhir_id = patient.id
            for entity in ENTITIES:
                want = 1 if entity == "patients" else store.count(Query(conn, entity, patient_id=fhir_id))
                assert got[entity][mrn] == want, (conn, entity, got[entity][mrn], want)
        # Nobody else was pulled: the warehouse holds the event patients and no one more.
        assert set(got["patients"]) == mrns
