"""Fixtures for the Dagster tests: an isolated redox-elt home, a registered sandbox
config limited to the connections a test needs, and in-process materialization helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import pytest
from dagster import DagsterInstance, ExecuteInProcessResult, materialize
from dlt.common.versioned_state import decompress_state

from assets.partitions import CONNECTIONS_PARTITIONS_NAME
from assets.sync_assets import redox_sync
from pipelines.sync import pipeline_name
from resources.client import SHARED
from resources.dagster import RedoxResource, WarehouseResource
from resources.onboarding import connect_sandbox
from resources.settings import load_settings, write_settings
from sandbox.server import SandboxServer

ORCHESTRATION_PATIENTS = 120
ENTITIES = ("patients", "encounters", "results", "medications", "appointments", "documents")


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
        "redox": RedoxResource(config_path=str(config_path)),
        "warehouse": WarehouseResource(path=str(warehouse_dir)),
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


def live_cursor(warehouse_file: Path, connection_id: str) -> Any:
    """The connection's dlt resource state (its live cursors) as stored in the warehouse,
    with the row version; ``None`` when no state was ever stored."""
    with duckdb.connect(str(warehouse_file), read_only=True) as con:
        row = con.execute(
            "SELECT version, state FROM raw._dlt_pipeline_state WHERE pipeline_name = ? ORDER BY version DESC LIMIT 1",
            [pipeline_name(connection_id)],
        ).fetchone()
    if row is None:
        return None
    version, blob = row
    state = decompress_state(blob)
    return version, state.get("sources")
