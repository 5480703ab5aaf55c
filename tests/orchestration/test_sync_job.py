"""``redox_elt.sync_job``: the CLI's sync executed as the Dagster job, through the one runner."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pytest

from assets.partitions import RANGE_END_TAG, RANGE_START_TAG, partition_key
from pipelines.cli import sync_window
from pipelines.sync import connection_windows
from pipelines.sync_context import SyncWindow
from pipelines.warehouse import WarehousePaths
from redox_elt.definitions import build_definitions
from redox_elt.environment import Environment
from redox_elt.sync_job import DagsterSyncRunner, run_plan
from resources.settings import load_settings
from sandbox.population.store import Query
from sandbox.server import SandboxServer
from tests.orchestration.conftest import ENTITIES, import_roster, model_counts, register

FHIR_CONN = "northwind-fhir"


def test_a_cli_window_becomes_a_day_range_with_its_exact_bounds() -> None:
    window = SyncWindow(datetime(2026, 10, 3, 12, 30, tzinfo=UTC), datetime(2026, 10, 5, tzinfo=UTC))
    plan = run_plan(FHIR_CONN, window, 60.0, datetime(2026, 11, 25, tzinfo=UTC))
    assert plan["partition_key"] is None
    assert plan["tags"][RANGE_START_TAG] == str(partition_key(FHIR_CONN, "2026-10-03"))
    assert plan["tags"][RANGE_END_TAG] == str(partition_key(FHIR_CONN, "2026-10-04"))  # end is exclusive
    config = plan["run_config"]["ops"]["redox_sync"]["config"]
    assert (
        config["window_start"] == window.start.isoformat() and config["window_end"] == window.end.isoformat()
    )
    # Before the first partition day: the range label is clamped, the exact bounds are kept.
    early = SyncWindow(datetime(2020, 1, 1, tzinfo=UTC), datetime(2024, 11, 3, tzinfo=UTC))
    plan = run_plan(FHIR_CONN, early, 60.0, datetime(2026, 11, 25, tzinfo=UTC), date(2024, 11, 1))
    assert plan["tags"][RANGE_START_TAG] == str(partition_key(FHIR_CONN, "2024-11-01"))
    assert plan["tags"][RANGE_END_TAG] == str(partition_key(FHIR_CONN, "2024-11-02"))
    assert plan["run_config"]["ops"]["redox_sync"]["config"]["window_start"] == early.start.isoformat()
    live = run_plan(FHIR_CONN, SyncWindow(), 60.0, datetime(2026, 11, 25, 9, tzinfo=UTC))
    assert live["partition_key"] == str(partition_key(FHIR_CONN, "2026-11-25"))
    assert live["run_config"]["ops"]["redox_sync"]["config"]["mode"] == "live"


def test_the_cli_sync_runs_the_dagster_job_live_and_windowed(
    small_sandbox: SandboxServer, tmp_path: Path
) -> None:
    config = register(small_sandbox, tmp_path, (FHIR_CONN,))
    settings = load_settings(config)
    run_sync_job = DagsterSyncRunner(Environment(), build_definitions)
    store = small_sandbox.state.store
    everything = {e: store.count(Query(FHIR_CONN, e)) for e in ENTITIES}

    live = WarehousePaths.at(tmp_path / "live")
    import_roster(small_sandbox, config, tmp_path / "live")
    report = run_sync_job(settings, live, connection_windows(settings))
    assert report.ok, [c.error for c in report.connections]
    assert report.connections[0].published == {
        **everything,
        "patient_identifiers": report.connections[0].published["patient_identifiers"],
    }
    # The extract's counts travel back through the run's metadata.
    assert report.connections[0].access.pulled > 0 and report.connections[0].access.requests > 0

    # A window re-pulls the panel patients active in it; the run is recorded with its bounds.
    window = SyncWindow(datetime(2026, 10, 3, 12, 30, tzinfo=UTC), datetime(2026, 10, 17, 6, tzinfo=UTC))
    report = run_sync_job(settings, live, connection_windows(settings, window=window), full=False)
    assert report.ok, [c.error for c in report.connections]
    assert model_counts(live.duckdb, FHIR_CONN) == everything
    with duckdb.connect(str(live.duckdb), read_only=True) as con:
        rows = con.execute(
            "SELECT mode, window_start, window_end, caller, status, error, requests, patients_deferred "
            "FROM ops.sync_runs ORDER BY finished_at"
        ).fetchall()
    assert [r[:6] for r in rows] == [
        ("live", None, None, "dagster", "success", None),
        ("backfill", window.start, window.end, "dagster", "success", None),
    ]
    assert all(r[6] > 0 and r[7] == 0 for r in rows)


@pytest.mark.parametrize(
    ("since", "until", "says"),
    [
        (None, "2026-10-01", "--until needs --since"),
        ("0001-01-01", None, "--since: '0001-01-01' is outside"),
        ("2026-10-01", "9999-12-31", "--until: '9999-12-31' is outside"),
        ("yesterday", None, "--since: not an ISO-8601"),
        ("2026-10-02", "2026-10-01", "start must be before end"),
    ],
)
def test_a_window_the_cli_cannot_sync_is_one_clear_line(since: str, until: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        sync_window(since, until)


def test_renormalize_without_a_warehouse_is_one_line_and_creates_nothing(tmp_path: Path, capsys) -> None:
    import os
    import signal

    from redox_elt.cli import main

    missing = tmp_path / "nowhere" / "redox.duckdb"
    handler, umask = signal.getsignal(signal.SIGTERM), os.umask(0o077)
    try:
        assert main(["renormalize", "--warehouse", str(missing)]) == 2
    finally:  # main() sets the process's SIGTERM handler and umask: give pytest its own back
        signal.signal(signal.SIGTERM, handler)
        os.umask(umask)
    assert "no warehouse at" in capsys.readouterr().err
    assert not missing.parent.exists()
