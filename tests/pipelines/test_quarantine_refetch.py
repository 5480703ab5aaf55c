"""A transient bad answer never costs data: records the server sent damaged are quarantined one
by one (the rest of each page loads, no connection fails), the patients they belong to are
made due again, and once the server answers well the re-sync loads them and the quarantine
holds nothing open. End to end against a real sandbox with ``bad_entry_rate``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest

from pipelines.quarantine import patients_to_refetch, unresolved_quarantine_counts
from pipelines.sync import run_sync
from pipelines.warehouse import WarehousePaths
from resources.onboarding import connect_sandbox
from resources.settings import load_settings
from sandbox.server import SandboxServer
from tests.conftest import import_rosters, sandbox_config
from tests.pipelines.test_sync_e2e import EHR, assert_equals_truth, fast


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    saved = {k: os.environ.get(k) for k in ("REDOX_ELT_HOME", "REDOX_ELT_MASTER_KEY")}
    os.environ["REDOX_ELT_HOME"] = str(tmp_path / "home")
    os.environ["REDOX_ELT_MASTER_KEY"] = "refetch-master-key"
    try:
        yield tmp_path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_quarantined_records_load_on_the_next_plain_sync_and_resolve(home: Path) -> None:
    server = SandboxServer(sandbox_config(patients=80, seed=23)).start()
    try:
        settings = fast(load_settings(connect_sandbox(server.url, home / "connections.yaml")))
        paths = WarehousePaths.at(home / "w" / "redox.duckdb")
        import_rosters(server.url, settings, paths.duckdb, home)
        httpx.post(f"{server.url}/_sandbox/faults", json={"bad_entry_rate": 0.05}).raise_for_status()

        first = run_sync(settings, paths)  # every connection, the network included
        assert first.ok, first.failures
        with duckdb.connect(str(paths.duckdb), read_only=True) as con:
            open_before = unresolved_quarantine_counts(con)
        assert sum(open_before.values()) > 0, "bad_entry_rate 0.05 quarantined nothing"
        assert open_before.get("carequality-network"), "the network's records were not hit"

        httpx.post(f"{server.url}/_sandbox/faults", json={}).raise_for_status()
        with duckdb.connect(str(paths.duckdb)) as con:
            requeued = {c: len(patients_to_refetch(con, c)) for c in EHR}
        assert sum(requeued.values()) > 0, "no quarantined record named a patient to fetch again"
        second = run_sync(settings, paths)  # a plain sync, no --full
        assert second.ok, second.failures

        assert_equals_truth(server, paths)
        with duckdb.connect(str(paths.duckdb), read_only=True) as con:
            still_open = {c: n for c, n in unresolved_quarantine_counts(con).items() if n}
        assert not still_open, f"quarantine entries still open after the re-fetch: {still_open}"
    finally:
        server.stop()
