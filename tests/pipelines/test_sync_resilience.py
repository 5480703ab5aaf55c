"""End to end under stress, apart from test_sync_e2e so the two run side by side: a sync
SIGKILLed at ten points then re-run, and a sync of every connection under the documented
quota."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pytest

from pipelines.model import ENTITIES, ENTITY_KEY
from pipelines.sync import run_sync
from pipelines.warehouse import WarehousePaths
from resources.onboarding import connect_sandbox
from resources.settings import load_settings
from sandbox.server import SandboxServer
from tests.conftest import import_rosters, sandbox_config
from tests.pipelines.test_sync_e2e import EHR, assert_equals_truth, env, fast, with_rosters  # noqa: F401


@pytest.mark.slow
def test_sync_killed_at_random_points_then_rerun_equals_truth(env: dict, tmp_path: Path) -> None:  # noqa: F811
    """SIGKILL the CLI sync mid-extract, mid-load and mid-publish; a re-run must heal."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from resources.settings import write_settings

    cfg = write_settings(env["settings"], tmp_path / "fast.yaml")
    wh = tmp_path / "redox.duckdb"
    with_rosters(env, WarehousePaths.at(wh))
    cmd = [sys.executable, "-m", "redox_elt.cli", "sync", "--config", str(cfg), "--warehouse", str(wh)]
    for c in EHR:
        cmd += ["--connection", c]
    # Ten kill points spread over a run (start-up, extract, load, publish, audit load).
    rng = random.Random(5)
    for delay in sorted(rng.uniform(0.5, 14.0) for _ in range(10)):
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-500:]
    assert_equals_truth(env["server"], WarehousePaths.at(wh))
    with duckdb.connect(str(wh), read_only=True) as con:
        for e in ENTITIES:
            key = ENTITY_KEY[e]
            assert (
                con.execute(
                    f"select count(*) - count(distinct (connection_id, {key})) from redox.{e}"
                ).fetchone()[0]
                == 0
            )


def test_every_connection_under_the_documented_quota_draws_no_429(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox's real default quota (7,500 per 5 minutes per client): the client's shared
    budget (90% of it, copied by ``sandbox connect``) keeps a sync of all four connections
    from ever being refused."""
    monkeypatch.setenv("REDOX_ELT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REDOX_ELT_MASTER_KEY", "quota-master-key")
    with SandboxServer(sandbox_config(patients=60, seed=3, quota_requests=7500)) as server:
        settings = fast(load_settings(connect_sandbox(server.url, tmp_path / "home" / "c.yaml")))
        assert settings.quota.requests == 6750
        paths = WarehousePaths.at(tmp_path / "wh" / "redox.duckdb")
        import_rosters(server.url, settings, paths.duckdb, tmp_path / "rosters")
        report = run_sync(settings, paths)
        assert report.ok, report.failures
        assert_equals_truth(server, paths)
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        calls, refused = con.execute(
            "select count(*), count(*) filter (where status_code = 429) from audit.api_calls"
        ).fetchone()
    assert calls > 0 and refused == 0
    assert sum(c.access.requests for c in report.connections) <= 6750
