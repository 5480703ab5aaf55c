"""What a new user meets first: ``redox-elt sync`` prints progress and a summary, never
Dagster's engine log (that goes to a file beside the warehouse, or to stderr with ``-v``);
old history backfills from the CLI and from the first partition; every user error is one
line with exit code 2; a second sync says it waits for the writer lock; one asset of the
sync can be materialized on its own; the analytics automation sensor is on by default."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pytest
from dagster import AssetKey, AssetSelection, DefaultSensorStatus, materialize
from dagster._utils.error import serializable_error_info_from_exc_info

from assets.partitions import HISTORY_START, RANGE_END_TAG, RANGE_START_TAG, partition_key, windows_for_run
from pipelines.cli import check_warehouse_free
from pipelines.warehouse import WarehouseBusy, WarehousePaths, WriterLock
from redox_elt.cli import main
from redox_elt.definitions import build_definitions
from redox_elt.sync_job import root_cause
from sandbox.server import SandboxServer
from tests.orchestration.conftest import (
    import_roster,
    instance_with_connections,
    redox_sync,
    register,
    sync_resources,
)

FHIR = "northwind-fhir"
ENTITIES = ("appointments", "documents", "encounters", "medications", "patients", "results")


@pytest.fixture(autouse=True)
def no_dagster_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


def _sync(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["sync", *argv])
    out, err = capfd.readouterr()
    return code, out, err


def test_a_cli_sync_prints_progress_and_a_summary_and_no_engine_log(
    small_sandbox: SandboxServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = register(small_sandbox, tmp_path, (FHIR,))
    import_roster(small_sandbox, config, tmp_path / "wh")
    warehouse = tmp_path / "wh" / "redox.duckdb"
    capfd.readouterr()

    code, out, err = _sync(capfd, "--config", str(config), "--warehouse", str(warehouse))

    assert code == 0, out + err
    assert err == "", err  # nothing from the engine, dlt or the libraries
    assert "DEBUG" not in out and "dagster" not in out.lower().replace("dagster.log", "")
    lines = out.splitlines()
    # Not a terminal: one progress line per connection and entity, then the summary.
    assert lines[0] == f"sync {FHIR}: started (live, from the cursor)"
    for entity in ENTITIES:
        assert any(line.startswith(f"sync {FHIR}: {entity} ") and "rows fetched" in line for line in lines), (
            entity
        )
    wide = [line for line in lines if len(line) > 80 and not line.startswith("engine log: ")]  # a path
    assert not wide, wide
    for column in ("fetched", "in warehouse", "quarantined", "seconds"):
        assert any(line.strip().startswith(column) for line in lines), f"no legend for {column}"
    connection_row = next(
        line for line in lines if line.strip().startswith(FHIR) and line.rstrip()[-1].isdigit()
    )
    assert float(connection_row.split()[-1]) > 0  # a real time under `sync`
    engine_log = tmp_path / "wh" / "redox.dagster.log"
    assert f"engine log: {engine_log}" in out
    assert "RUN_START" in engine_log.read_text() and "RUN_SUCCESS" in engine_log.read_text()
    # raw.quarantine is there (empty) from the first sync.
    with duckdb.connect(str(warehouse), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw.quarantine").fetchone()[0] == 0

    # Old history: a window before the first partition day works from the CLI.
    code, out, err = _sync(
        capfd,
        "--config",
        str(config),
        "--warehouse",
        str(warehouse),
        "--since",
        "2020-01-01",
        "--until",
        "2020-02-01",
    )
    assert code == 0 and err == "", out + err
    assert f"sync {FHIR}: started (window 2020-01-01 00:00 .. 2020-02-01 00:00 UTC)" in out
    with duckdb.connect(str(warehouse), read_only=True) as con:
        row = con.execute(
            "SELECT mode, window_start, status FROM ops.sync_runs ORDER BY finished_at DESC LIMIT 1"
        ).fetchone()
    assert row[0] == "backfill" and row[1] == datetime(2020, 1, 1, tzinfo=UTC) and row[2] == "success"

    # -v: the engine log appears on stderr too.
    assert main(["-v", "sync", "--config", str(config), "--warehouse", str(warehouse)]) == 0
    assert "RUN_START" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--since", "2026-13-45"], "--since: not an ISO-8601 date or time"),
        (["--warehouse", "/proc/no-such-dir/w.duckdb"], "--warehouse: cannot write in /proc"),
        (["--since", "2020-01-01", "--until", "2019-01-01"], "start must be before end"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    small_sandbox: SandboxServer,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    args: list[str],
    says: str,
) -> None:
    config = register(small_sandbox, tmp_path, (FHIR,))
    base = ["--config", str(config), "--warehouse", str(tmp_path / "w.duckdb")]
    code, out, err = _sync(capfd, *base, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and says in err and "Traceback" not in err


def test_a_warehouse_open_in_another_program_is_one_line_and_exit_2(
    small_sandbox: SandboxServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = register(small_sandbox, tmp_path, (FHIR,))
    warehouse = tmp_path / "w.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb,sys; c=duckdb.connect({str(warehouse)!r}); print('ready', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        code, out, err = _sync(capfd, "--config", str(config), "--warehouse", str(warehouse))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert f"is open in another program (process {holder.pid}); close it" in err


def test_a_second_sync_says_it_waits_for_the_writer_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = WarehousePaths.at(tmp_path / "wh")
    fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running sync holds
    try:
        from io import StringIO

        said = StringIO()
        check_warehouse_free(paths, stream=said)  # before the sync starts
        assert "waiting for the writer lock: another sync is writing" in said.getvalue()
        # and whenever a run of it meets the lock later (between another sync's connections)
        with (
            caplog.at_level(logging.WARNING, logger="pipelines.warehouse"),
            pytest.raises(WarehouseBusy),
            WriterLock(paths, wait_s=0.3),
        ):
            pass
        assert caplog.text.count("waiting for the writer lock") == 1
    finally:
        os.close(fd)
    said = StringIO()
    check_warehouse_free(paths, stream=said)
    assert said.getvalue() == ""


def test_a_failed_step_is_summarised_by_its_root_cause(tmp_path: Path) -> None:
    paths = WarehousePaths.at(tmp_path / "wh")

    def chained(inner: BaseException) -> object:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise RuntimeError('Error occurred while executing op "redox_sync"') from exc
        except RuntimeError:
            return serializable_error_info_from_exc_info(sys.exc_info())

    locked = duckdb.IOException(
        'Could not set lock on file "w.duckdb": Conflicting lock is held in python (PID 4242)'
    )
    assert root_cause(chained(locked), paths).endswith(
        "is open in another program (process 4242); close it "
        "(a DuckDB shell, a notebook, a BI tool) or pass another --warehouse"
    )
    denied = PermissionError(13, "Permission denied", "/data/w.duckdb")
    assert (
        root_cause(chained(denied), paths)
        == "PermissionError: [Errno 13] Permission denied: '/data/w.duckdb'"
    )
    # Our own classes are written without PHI: their text is shown.
    from resources.settings import ConfigError

    ours = ConfigError("connection 'northwind-fhir': no surfaces")
    assert root_cause(chained(ours), paths) == "ConfigError: connection 'northwind-fhir': no surfaces"
    # A builtin's or a library's text may quote payload values: only its type is shown.
    leaky = ValueError("invalid literal for int() with base 10: 'Jane Doe'")
    assert root_cause(chained(leaky), paths) == "ValueError"


def test_the_first_partition_reaches_back_to_the_beginning_of_history() -> None:
    first = date(2024, 11, 1)
    tags = {
        RANGE_START_TAG: str(partition_key(FHIR, first)),
        RANGE_END_TAG: str(partition_key(FHIR, "2024-11-03")),
    }
    (cw,) = windows_for_run(tags, None, None, first)
    assert cw.window.start == HISTORY_START and cw.window.end == datetime(2024, 11, 4, tzinfo=UTC)
    (cw,) = windows_for_run({}, None, str(partition_key(FHIR, "2024-11-02")), first)
    assert cw.window.start == datetime(2024, 11, 2, tzinfo=UTC)


def test_one_entity_can_be_materialized_and_the_automation_sensor_is_on(
    small_sandbox: SandboxServer, tmp_path: Path
) -> None:
    config = register(small_sandbox, tmp_path, (FHIR,))
    import_roster(small_sandbox, config, tmp_path / "wh")
    from assets.checks import CHECKS

    result = materialize(
        [redox_sync, *CHECKS],
        selection=AssetSelection.assets(AssetKey(["redox", "patients"])),
        partition_key=str(partition_key(FHIR, "2026-10-20")),
        resources=sync_resources(config, tmp_path / "wh"),
        instance=instance_with_connections([FHIR]),
        run_config={"ops": {"redox_sync": {"config": {"mode": "window"}}}},
    )
    assert result.success
    assert [e.asset_key for e in result.get_asset_materialization_events()] == [
        AssetKey(["redox", "patients"])
    ]
    # Its own checks run, and only those (the multi-asset checks are subset too).
    evaluations = result.get_asset_check_evaluations()
    assert evaluations and {e.asset_key for e in evaluations} == {AssetKey(["redox", "patients"])}
    assert all(e.passed for e in evaluations)
    defs = build_definitions()
    sensor = next(s for s in defs.sensors if s.name == "analytics_automation")
    assert sensor.default_status == DefaultSensorStatus.RUNNING


def test_the_demo_records_into_the_dagster_home_the_readme_starts_dagster_dev_on(tmp_path: Path) -> None:
    from redox_elt.cli import demo_dagster_home
    from redox_elt.environment import Environment

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = demo_dagster_home(Environment(), tmp_path)
    assert env.dagster_home == str((tmp_path / ".dagster_home").resolve())
    assert (tmp_path / ".dagster_home" / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"
    # An operator's own DAGSTER_HOME wins.
    assert (
        demo_dagster_home(Environment(dagster_home="/srv/dagster"), tmp_path).dagster_home == "/srv/dagster"
    )
