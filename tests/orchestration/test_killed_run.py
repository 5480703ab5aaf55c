"""A real deployment (``DAGSTER_HOME`` set, this repo's dagster.yaml): a CLI sync killed
with SIGKILL while it holds the ``duckdb_writer`` pool slot does not block the next one;
that one marks the dead run failed, completes, and leaves owner-only files and no dlt
load package (Parquet copies of staged rows) behind."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.test_utils import create_run_for_test

from assets.automation import SYNC_JOB
from assets.sync_assets import DUCKDB_POOL
from pipelines.warehouse import WarehousePaths
from redox_elt.sync_job import process_tags
from sandbox.server import SandboxServer
from tests.orchestration.conftest import register, wait_until

REPO = Path(__file__).resolve().parents[2]
CONNECTION = "northwind-fhir"


def _sync(config: Path, warehouse: Path, env: dict[str, str], **kwargs) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "redox_elt.cli",
        "sync",
        "--config",
        str(config),
        "--warehouse",
        str(warehouse),
    ]
    return subprocess.Popen(cmd, env=env, start_new_session=True, **kwargs)


def _slot_holder(instance: DagsterInstance) -> str | None:
    """The run holding the pool's slot, once that run is STARTED."""
    info = instance.event_log_storage.get_concurrency_info(DUCKDB_POOL)
    for slot in info.claimed_slots:
        run = instance.get_run_by_id(slot.run_id)
        if run is not None and run.status == DagsterRunStatus.STARTED:
            return slot.run_id
    return None


@pytest.mark.slow
def test_a_sigkilled_sync_does_not_block_the_next(small_sandbox: SandboxServer, tmp_path: Path) -> None:
    config = register(small_sandbox, tmp_path, (CONNECTION,))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = dict(os.environ, DAGSTER_HOME=str(home))
    warehouse = tmp_path / "data" / "redox.duckdb"

    first = _sync(config, warehouse, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            killed = wait_until(
                lambda: first.poll() is None and _slot_holder(instance),
                120,
                "the first sync to hold the pool slot",
            )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with DagsterInstance.from_config(str(home)) as instance:
        # The scenario is real: the dead run still holds the slot and is still "started".
        assert killed in instance.event_log_storage.get_concurrency_info(DUCKDB_POOL).active_run_ids
        assert instance.get_run_by_id(killed).status == DagsterRunStatus.STARTED

    second = _sync(config, warehouse, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = second.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(second.pid, signal.SIGKILL)
        pytest.fail("the sync after a killed one did not finish in 300 s (blocked on the pool?)")
    assert second.returncode == 0, (out + err)[-800:]

    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(killed).status == DagsterRunStatus.FAILURE
        finished = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.SUCCESS]))
        assert len(finished) == 1
        assert not instance.event_log_storage.get_concurrency_info(DUCKDB_POOL).claimed_slots

    # Owner-only files, and no load package left in dlt's working folders.
    paths = WarehousePaths.at(warehouse)
    loose = [p for p in paths.root.rglob("*") if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)]
    assert loose == []
    assert list(paths.dlt_dir.rglob("*.parquet")) == []
    packages = [p for p in paths.dlt_dir.rglob("load/*/*") if p.is_dir()]
    assert packages == []
    assert paths.duckdb.exists() and any(paths.landing_root.rglob("*"))


def test_sigterm_ends_a_sync_waiting_for_the_pool(small_sandbox: SandboxServer, tmp_path: Path) -> None:
    """A live run (this test's process) holds the slot: the CLI waits, says so, and SIGTERM ends it."""
    config = register(small_sandbox, tmp_path, (CONNECTION,))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    with DagsterInstance.from_config(str(home)) as instance:
        holder = create_run_for_test(
            instance, job_name=SYNC_JOB, status=DagsterRunStatus.STARTED, tags=process_tags()
        )
        storage = instance.event_log_storage
        storage.set_concurrency_slots(DUCKDB_POOL, 1)
        assert storage.claim_concurrency_slot(DUCKDB_POOL, holder.run_id, "redox_sync").is_claimed
        env = dict(os.environ, DAGSTER_HOME=str(home))
        waiting = _sync(
            config, tmp_path / "wh" / "redox.duckdb", env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            lines: list[str] = []
            reader = threading.Thread(
                target=lambda: lines.extend(ln.decode() for ln in waiting.stderr), daemon=True
            )
            reader.start()
            wait_until(
                lambda: (
                    any(f"waiting for the {DUCKDB_POOL} pool" in ln for ln in lines)
                    or waiting.poll() is not None
                ),
                120,
                "the CLI to report that it waits for the pool",
            )
            assert waiting.poll() is None, lines
            waiting.send_signal(signal.SIGTERM)
            assert waiting.wait(timeout=30) == 130
        finally:
            if waiting.poll() is None:
                os.killpg(waiting.pid, signal.SIGKILL)
                waiting.wait()
        # The live holder was left alone.
        assert holder.run_id in storage.get_concurrency_info(DUCKDB_POOL).active_run_ids
        assert instance.get_run_by_id(holder.run_id).status == DagsterRunStatus.STARTED
