"""One runner: what ``redox-elt demo`` runs (``run_sync`` over every sandbox connection)
leaves one ``ops.sync_runs`` row per connection and every asset check passing; a failed
connection is recorded too, as a failure the freshness check does not count."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from pipelines.sync import run_sync
from pipelines.sync_context import ConnectionWindow, SyncWindow, networks_last
from pipelines.warehouse import WarehousePaths
from resources.settings import load_settings
from sandbox.config import default_connections
from sandbox.server import SandboxServer
from tests.orchestration.conftest import register, run_checks, sync_resources

ALL = [c.id for c in default_connections()]


@pytest.mark.slow
def test_demo_leaves_one_run_row_per_connection_and_every_check_passing(
    small_sandbox: SandboxServer, tmp_path: Path
) -> None:
    config = register(small_sandbox, tmp_path)
    settings = load_settings(config)
    paths = WarehousePaths.at(tmp_path / "wh")

    report = run_sync(settings, paths, caller="demo")  # exactly what `redox-elt demo` runs

    assert report.ok, report.failures
    # Networks last: the network is asked about the enterprise ids the EHRs loaded.
    order = [c.connection_id for c in report.connections]
    assert order[-1] == "carequality-network" and sorted(order) == sorted(ALL)
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        rows = con.execute(
            "SELECT connection_id, mode, caller, status, error, published_rows FROM ops.sync_runs ORDER BY 1"
        ).fetchall()
    assert [r[0] for r in rows] == sorted(ALL)
    assert {r[1:5] for r in rows} == {("live", "demo", "success", None)}
    assert all(r[5] > 0 for r in rows)
    # The runner's counts are what Dagster's metadata and the CLI summary show.
    assert (
        report.row_counts["redox.patients"]["northwind-fhir"] == report.connections[0].published["patients"]
    )

    evaluations = run_checks(sync_resources(config, tmp_path / "wh"), ALL)
    failed = {k: e.description for k, e in evaluations.items() if not e.passed}
    assert evaluations and failed == {}


def test_a_failed_connection_is_recorded_and_not_counted_fresh(
    small_sandbox: SandboxServer, tmp_path: Path
) -> None:
    config = register(small_sandbox, tmp_path, ("northwind-fhir",))
    settings = load_settings(config)
    paths = WarehousePaths.at(tmp_path / "wh")
    windows = [ConnectionWindow("northwind-fhir"), ConnectionWindow("not-configured")]

    report = run_sync(settings, paths, windows, run_id="run-1", caller="cli")

    assert set(report.failures) == {"not-configured"}
    assert "no connection 'not-configured'" in report.failures["not-configured"]
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        rows = con.execute(
            "SELECT run_id, connection_id, status, error IS NULL FROM ops.sync_runs ORDER BY 2"
        ).fetchall()
    assert rows == [
        ("run-1", "northwind-fhir", "success", True),
        ("run-1", "not-configured", "failed", False),
    ]
    evaluations = run_checks(sync_resources(config, tmp_path / "wh"), ["northwind-fhir"])
    fresh = evaluations[("redox/patient_identifiers", "connections_fresh")]
    assert fresh.passed and set(fresh.metadata["by_connection"].value) == {"northwind-fhir"}


def test_networks_sort_last_and_keep_their_order() -> None:
    kinds = {"a": "network", "b": "ehr", "c": "network", "d": "ehr"}
    windows = [ConnectionWindow(c, SyncWindow()) for c in "abcd"]
    ordered = networks_last(windows, lambda w: kinds[w.connection_id])
    assert [w.connection_id for w in ordered] == ["b", "d", "a", "c"]


def test_an_old_run_table_gains_status_and_error(tmp_path: Path) -> None:
    from pipelines.sync_runs import ensure_sync_runs_table

    with duckdb.connect(str(tmp_path / "old.duckdb")) as con:
        con.execute("CREATE SCHEMA ops")
        con.execute(
            """CREATE TABLE ops.sync_runs (run_id VARCHAR, connection_id VARCHAR, mode VARCHAR,
               window_start TIMESTAMPTZ, window_end TIMESTAMPTZ, finished_at TIMESTAMPTZ,
               extracted_rows BIGINT, published_rows BIGINT, quarantined_rows BIGINT, caller VARCHAR)"""
        )
        con.execute("INSERT INTO ops.sync_runs (run_id, connection_id, mode) VALUES ('r', 'c', 'live')")
        ensure_sync_runs_table(con)
        assert con.execute("SELECT status, error FROM ops.sync_runs").fetchall() == [("success", None)]
