"""Fixtures for the Dagster tests: an isolated redox-elt home, a registered sandbox
config limited to the connections a test needs, and in-process materialization helpers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import pytest
from dagster import DagsterInstance, ExecuteInProcessResult, materialize

from assets.partitions import CONNECTIONS_PARTITIONS_NAME, sync_partitions_def
from assets.resources import CheckThresholds, ConnectionsFileResource, WarehouseResource
from assets.sync_assets import build_sync_assets
from pipelines.model import ENTITIES as MODEL_ENTITIES
from pipelines.warehouse import WarehousePaths
from redox_elt.environment import Environment
from resources.client import SHARED
from resources.onboarding import connect_sandbox
from resources.settings import load_settings, write_settings
from sandbox.server import SandboxServer
from tests.conftest import import_rosters

ORCHESTRATION_PATIENTS = 120
DEFAULTS = Environment()
SYNC_ASSETS = build_sync_assets(sync_partitions_def(DEFAULTS.partitions_start))
redox_sync = SYNC_ASSETS.redox_sync
ENTITIES = MODEL_ENTITIES  # every entity of the common model, the clinical record included


@pytest.fixture(autouse=True, scope="module")
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test module gets its own vault home and master key, and no ambient config
    (module-scoped so a module's shared warehouse and its checks use one vault)."""
    home = tmp_path_factory.mktemp("redox-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REDOX_ELT_HOME", str(home))
        patch.setenv("REDOX_ELT_MASTER_KEY", "orchestration-test-" + home.name)
        patch.delenv("REDOX_ELT_CONFIG", raising=False)
        patch.delenv("REDOX_ELT_WAREHOUSE", raising=False)
        SHARED.reset()
        yield home
        SHARED.reset()


def register(server: SandboxServer, out_dir: Path, connection_ids: tuple[str, ...] | None = None) -> Path:
    """Onboard with ``server`` and keep only ``connection_ids`` in the written config."""
    path = connect_sandbox(server.url, out_dir / "connections.yaml", name="orchestration-test")
    if connection_ids:
        settings = load_settings(path)
        kept = tuple(c for c in settings.connections if c.id in connection_ids)
        write_settings(replace(settings, connections=kept), path)
    return path


@pytest.fixture
def small_sandbox(sandbox_factory: Callable[..., SandboxServer]) -> SandboxServer:
    return sandbox_factory(patients=ORCHESTRATION_PATIENTS)


def instance_with_connections(connection_ids: Any) -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME, list(connection_ids))
    return instance


def sync_resources(config_path: Path, warehouse_dir: Path) -> dict[str, Any]:
    return {
        "redox": ConnectionsFileResource(config_path=str(config_path)),
        "warehouse": WarehouseResource(path=str(warehouse_dir)),
        "thresholds": CheckThresholds(
            max_sync_age_hours=DEFAULTS.max_sync_age_hours, max_quarantine_rate=DEFAULTS.max_quarantine_rate
        ),
    }


def run_sync_asset(
    resources: Mapping[str, Any],
    instance: DagsterInstance,
    *,
    partition_key: str | None = None,
    tags: Mapping[str, str] | None = None,
    mode: str = "window",
) -> ExecuteInProcessResult:
    return materialize(
        [redox_sync],
        partition_key=partition_key,
        tags=dict(tags or {}),
        resources=dict(resources),
        instance=instance,
        run_config={"ops": {"redox_sync": {"config": {"mode": mode}}}},
    )


def model_counts(warehouse_file: Path, connection_id: str) -> dict[str, int]:
    with duckdb.connect(str(warehouse_file), read_only=True) as con:
        return {
            e: con.execute(
                f"SELECT count(*) FROM redox.{e} WHERE connection_id = ?", [connection_id]
            ).fetchone()[0]
            for e in ENTITIES
        }


def import_roster(server: SandboxServer, config_path: Path, warehouse_dir: Path) -> None:
    """Each EHR connection's roster in the warehouse's panel, imported as a user does."""
    settings = load_settings(config_path)
    wh = WarehousePaths.at(warehouse_dir)
    import_rosters(server.url, settings, wh.duckdb, warehouse_dir.parent / f"rosters-{warehouse_dir.name}")


def discovered_at(warehouse_file: Path, connection_id: str) -> str | None:
    """When the connection's last live discovery ran (a backfill window never moves it)."""
    with duckdb.connect(str(warehouse_file), read_only=True) as con:
        row = con.execute(
            "SELECT value FROM ops.connection_capabilities WHERE connection_id = ? AND capability = 'discovered_at'",
            [connection_id],
        ).fetchone()
    return row[0] if row else None


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        threading.Event().wait(poll_s)


CHECKS_JOB = "checks_only"


def run_checks(resources: Mapping[str, Any], connection_ids: Any) -> dict[tuple[str, str], Any]:
    """Execute every asset check of the code location (and nothing else) with ``resources``."""
    from dagster import AssetSelection, Definitions, define_asset_job

    from assets.checks import CHECKS

    defs = Definitions(
        assets=[redox_sync],
        asset_checks=CHECKS,
        jobs=[define_asset_job(CHECKS_JOB, selection=AssetSelection.all_asset_checks())],
        resources=dict(resources),
    )
    with instance_with_connections(connection_ids) as instance:
        result = defs.resolve_job_def(CHECKS_JOB).execute_in_process(instance=instance, raise_on_error=False)
    return {("/".join(e.asset_key.path), e.check_name): e for e in result.get_asset_check_evaluations()}
