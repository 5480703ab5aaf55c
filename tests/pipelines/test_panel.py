"""The patient panel on a temporary DuckDB: roster import, due order, rolling refresh, the
cursor moving only over what loaded, and PHI-free views."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from pipelines import panel as P
from pipelines.panel_cli import register

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
CONN = "northwind-fhir"


@pytest.fixture
def con(tmp_path: Path):
    c = duckdb.connect(str(tmp_path / "w.duckdb"))
    P.create_tables(c)
    yield c
    c.close()


def roster(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "roster.csv"
    path.write_text(text)
    return path


def test_roster_import_maps_redox_systems_and_is_idempotent(con, tmp_path: Path) -> None:
    path = roster(
        tmp_path, "system,value\nurn:redox:northwind-health:MR,MRN001\nMR,MRN002\n\nurn:oid:1.2.3,X9\n"
    )
    first = P.add_roster(con, CONN, path, now=T0)
    assert (first.added, first.already, first.skipped_blank) == (3, 0, 1)
    again = P.add_roster(con, CONN, path, now=T0)
    assert (again.added, again.already) == (0, 3)
    rows = con.execute(
        "SELECT id_system, id_value, found_by, pull_reason FROM ops.patient_panel ORDER BY 2"
    ).fetchall()
    assert rows == [
        ("MR", "MRN001", "roster", "new_patient"),
        ("MR", "MRN002", "roster", "new_patient"),
        ("urn:oid:1.2.3", "X9", "roster", "new_patient"),
    ]
    assert (
        P.fhir_identifier_token("MR", "MRN001", "northwind-health") == "urn:redox:northwind-health:MR|MRN001"
    )
    assert P.datamodel_id_type("urn:redox:lakeside:MR") == "MR"


def test_demographic_roster_rows_wait_for_resolution(con, tmp_path: Path) -> None:
    path = roster(tmp_path, "given,family,birthdate\nAda,Lovelace,1815-12-10\n")
    result = P.add_roster(con, CONN, path, now=T0)
    assert (result.added, result.pending) == (0, 1)
    [(key, given, family, born)] = P.pending_demographics(con, CONN)
    P.resolve_pending(con, CONN, key, "resolved", P.Sighting("MR", "M7", "roster"), now=T0)
    assert P.pending_demographics(con, CONN) == []
    assert P.panel_stats(con, [CONN])[CONN]["patients"] == 1


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("mrn\nX\n", "header"),
        ("system,value\nMR,\n", "line 2"),
        ("given,family,birthdate\nA,B,31/12/1990\n", "YYYY-MM-DD"),
        ("", "empty"),
    ],
)
def test_bad_roster_is_one_clear_line_without_values(con, tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(P.RosterError) as err:
        P.add_roster(con, CONN, roster(tmp_path, text))
    assert fragment in str(err.value)
    assert "31/12/1990" not in str(err.value)


def _pulled(con, system: str, value: str, at: datetime, refresh_days: int = 7) -> None:
    P.mark_pulled(con, CONN, [P.PullOutcome(system, value, at, ok=True)], refresh_days=refresh_days)


def test_due_order_events_then_new_patients_then_refresh(con) -> None:
    for v in ("A", "B", "C", "D"):
        P.record_sighting(con, CONN, P.Sighting("MR", v, "roster"), now=T0)
    for v in ("A", "B", "C"):
        _pulled(con, "MR", v, T0)
    later = T0 + timedelta(days=8)  # A, B, C are past their 7-day refresh
    P.record_sighting(con, CONN, P.Sighting("MR", "C", "event", changed_at=later), now=later)
    P.record_sighting(con, CONN, P.Sighting("MR", "E", "encounter_window", T0, T0), now=later)
    due = P.select_due(con, CONN, now=later)
    assert [(d.id_value, d.reason) for d in due] == [
        ("C", "event"),
        ("D", "new_patient"),
        ("E", "new_patient"),
        ("A", "refresh"),
        ("B", "refresh"),
    ]
    assert [d.priority for d in due] == ["event", "new_patient", "new_patient", "refresh", "refresh"]


def test_rolling_refresh_and_discovered_activity(con) -> None:
    P.record_sighting(con, CONN, P.Sighting("MR", "A", "roster"), now=T0)
    _pulled(con, "MR", "A", T0, refresh_days=3)
    assert P.select_due(con, CONN, now=T0 + timedelta(days=2)) == []
    # Discovery shows a visit that started before the pull: nothing new.
    P.record_sighting(
        con, CONN, P.Sighting("MR", "A", "encounter_window", T0 - timedelta(hours=1), T0 - timedelta(hours=1)),
        now=T0 + timedelta(days=1),
    )  # fmt: skip
    assert P.select_due(con, CONN, now=T0 + timedelta(days=2)) == []
    # ... and one updated after it: due now, as activity.
    seen = T0 + timedelta(days=1)
    P.record_sighting(con, CONN, P.Sighting("MR", "A", "booked_window", seen, seen), now=seen)
    [due] = P.select_due(con, CONN, now=seen)
    assert due.reason == "activity" and due.priority == "event"
    assert P.select_due(con, CONN, now=T0 + timedelta(days=3, seconds=1))  # the refresh date too
    ways = con.execute("SELECT found_ways FROM ops.patient_panel").fetchone()[0]
    assert sorted(ways) == ["booked_window", "encounter_window", "roster"]


def test_full_makes_everyone_due(con) -> None:
    for v in ("A", "B"):
        P.record_sighting(con, CONN, P.Sighting("MR", v, "roster"), now=T0)
        _pulled(con, "MR", v, T0)
    assert P.select_due(con, CONN, now=T0 + timedelta(hours=1)) == []
    assert P.mark_all_due(con, CONN, now=T0 + timedelta(hours=1)) == 2
    assert {d.reason for d in P.select_due(con, CONN, now=T0 + timedelta(hours=1))} == {"full"}


def test_cursor_moves_only_over_what_loaded(con) -> None:
    for v in ("A", "B"):
        P.record_sighting(con, CONN, P.Sighting("MR", v, "roster"), now=T0)
    # A pull whose outcomes were never applied (the load was killed) leaves both due.
    assert len(P.select_due(con, CONN, now=T0)) == 2
    counts = P.mark_pulled(
        con,
        CONN,
        [
            P.PullOutcome("MR", "A", T0, ok=True),
            P.PullOutcome("MR", "B", T0, ok=False, error="DataModelError HTTP 200 error/DataModels"),
        ],
    )
    assert counts["pulled"] == 1 and counts["failed"] == 1
    [due] = P.select_due(con, CONN, now=T0 + timedelta(minutes=1))
    assert due.id_value == "B"
    row = con.execute(
        "SELECT consecutive_failures, last_full_pull_at FROM ops.patient_panel WHERE id_value = 'B'"
    ).fetchone()
    assert row == (1, None)


def test_fhir_id_row_merges_into_mrn_row_once_resolved(con) -> None:
    P.record_sighting(con, CONN, P.Sighting("MR", "M1", "roster"), now=T0)
    P.record_sighting(con, CONN, P.Sighting("fhir", "p-1", "encounter_window", T0, T0, fhir_id="p-1"), now=T0)
    assert P.panel_stats(con, [CONN])[CONN]["patients"] == 2
    counts = P.mark_pulled(con, CONN, [P.PullOutcome("fhir", "p-1", T0, ok=True, fhir_id="p-1", mrn="M1")])
    assert counts["merged"] == 1
    [(system, ways)] = con.execute("SELECT id_system, found_ways FROM ops.patient_panel").fetchall()
    assert system == "MR" and sorted(ways) == ["encounter_window", "roster"]
    # Later sightings by FHIR id land on the same row.
    assert not P.record_sighting(con, CONN, P.Sighting("fhir", "p-1", "census", fhir_id="p-1"), now=T0)


def test_stats_and_list_carry_no_identifiers(con, tmp_path: Path, capsys) -> None:
    P.add_roster(con, CONN, roster(tmp_path, "system,value\nMR,SECRET-MRN-1\nMR,SECRET-MRN-2\n"), now=T0)
    _pulled(con, "MR", "SECRET-MRN-1", T0)
    stats = P.panel_stats(con, [CONN, "lakeside-dm"], now=T0)
    assert stats[CONN]["patients"] == 2 and stats[CONN]["pulled"] == 1 and stats[CONN]["never_pulled"] == 1
    assert stats[CONN]["found_by"] == {"roster": 2} and stats["lakeside-dm"]["patients"] == 0
    listed = P.panel_list(con, CONN, now=T0)
    assert len({r["key"] for r in listed}) == 2
    blob = json.dumps(stats) + json.dumps(listed)
    assert "SECRET" not in blob


def test_cli_add_list_stats(tmp_path: Path, capsys) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    wh = str(tmp_path / "wh" / "redox.duckdb")
    path = roster(tmp_path, "system,value\nMR,SECRET-1\nMR,SECRET-2\n")
    args = parser.parse_args(["panel", "add", "--connection", CONN, "--file", str(path), "--warehouse", wh])
    args.config = None
    from pipelines import panel_cli

    assert panel_cli.import_roster(wh, CONN, path).added == 2
    for argv in (
        ["panel", "list", "--connection", CONN, "--warehouse", wh],
        ["panel", "stats", "--json", "--warehouse", wh],
    ):
        a = parser.parse_args(argv)
        assert a.func(a) == 0
    out = capsys.readouterr().out
    assert "SECRET" not in out
    assert json.loads(out[out.index("{") :])[CONN]["patients"] == 2


def test_documented_sql_roster_path_and_events(con) -> None:
    con.execute("CREATE TABLE my_patients AS SELECT * FROM (VALUES ('S1'), ('S2')) t(mrn)")
    sql = """
        INSERT INTO ops.patient_panel (connection_id, id_system, id_value, found_by, found_ways,
                                       first_seen_at, next_pull_due_at, pull_priority, pull_reason)
        SELECT 'northwind-fhir', 'MR', mrn, 'roster', ['roster'], now(), now(), 2, 'new_patient'
        FROM my_patients
        ON CONFLICT DO NOTHING
    """
    con.execute(sql)
    con.execute(sql)  # idempotent
    assert [d.id_value for d in P.select_due(con, CONN, now=T0)] == ["S1", "S2"]
    # An event names S2 (by its Redox system URI): it goes first.
    assert not P.record_event(con, CONN, "urn:redox:northwind-health:MR", "S2", event_at=T0, now=T0)
    assert [(d.id_value, d.reason) for d in P.select_due(con, CONN, now=T0)][0] == ("S2", "event")


def test_sandbox_roster_is_written_as_a_user_csv_and_imported_through_panel_add(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import SimpleNamespace

    from pipelines.panel_cli import import_sandbox_rosters

    class Roster(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            conn = self.path.split("connection=", 1)[1]
            body = json.dumps(
                {
                    "connection": conn,
                    "patients": [{"system": "urn:redox:nw:MR", "value": f"{conn}-{i}"} for i in range(3)],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Roster)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        conns = (SimpleNamespace(id="a", kind="ehr"), SimpleNamespace(id="net", kind="network"))
        settings = SimpleNamespace(
            connections=conns, connection=lambda cid: next(c for c in conns if c.id == cid)
        )
        wh = tmp_path / "wh" / "redox.duckdb"
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        results = import_sandbox_rosters(url, settings, wh, tmp_path)
        assert set(results) == {"a"} and results["a"].added == 3
        assert (tmp_path / "roster-a.csv").read_text().splitlines()[0] == "system,value"
        assert import_sandbox_rosters(url, settings, wh, tmp_path)["a"].already == 3
    finally:
        httpd.shutdown()
        httpd.server_close()
