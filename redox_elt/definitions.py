"""The Dagster code location (``[tool.dagster] module_name`` in pyproject.toml): it only
composes. The environment is read here, once (``redox_elt.environment``), and passed
down as values: which Redox resource serves the connections (a connections file or the
embedded sandbox), the warehouse, the partitions' first day, the crons and the check
thresholds. Loading it starts nothing: the embedded sandbox starts inside the first run
step that needs the API."""

from __future__ import annotations

from redox_elt.environment import Environment, harden_process

# Owner-only files and telemetry off before dlt or Dagster initialise (shared/STACK.md).
harden_process()

from dagster import Definitions, EnvVar, in_process_executor  # noqa: E402

from assets.analytics import analytics_views  # noqa: E402
from assets.automation import SENSORS, ScheduleSettings, build_schedules, build_sync_job  # noqa: E402
from assets.checks import CHECKS  # noqa: E402
from assets.partitions import sync_partitions_def  # noqa: E402
from assets.resources import (  # noqa: E402
    CheckThresholds,
    ConnectionsFileResource,
    EmbeddedSandboxResource,
    RedoxResource,
    WarehouseResource,
)
from assets.sync_assets import build_sync_assets  # noqa: E402
from assets.writeback import build_inbox_sensor, writeback_job  # noqa: E402
from pipelines.warehouse import DEFAULT_WAREHOUSE  # noqa: E402
from redox_elt.environment import CONFIG_ENV, WAREHOUSE_ENV  # noqa: E402


def redox_resource(env: Environment) -> RedoxResource:
    """A connections file when ``$REDOX_ELT_CONFIG`` names one, else the embedded sandbox."""
    if env.config_path:
        return ConnectionsFileResource(config_path=EnvVar(CONFIG_ENV))
    return EmbeddedSandboxResource(patients=env.sandbox_patients, seed=env.sandbox_seed)


def warehouse_resource(env: Environment) -> WarehouseResource:
    if env.warehouse:
        return WarehouseResource(path=EnvVar(WAREHOUSE_ENV))
    return WarehouseResource(path=str(DEFAULT_WAREHOUSE))


def build_definitions(
    env: Environment | None = None,
    redox: RedoxResource | None = None,
    warehouse: WarehouseResource | None = None,
) -> Definitions:
    """The code location's definitions; tests and the CLI pass their own resources."""
    env = env or Environment()
    partitions = sync_partitions_def(env.partitions_start)
    sync = build_sync_assets(partitions)
    job = build_sync_job(sync.redox_sync, partitions)
    when = ScheduleSettings(
        sync_cron=env.sync_cron,
        network_sync_cron=env.network_sync_cron,
        reconcile_cron=env.reconcile_cron,
        reconcile_days=env.reconcile_days,
    )
    return Definitions(
        assets=[sync.redox_sync, sync.persons, analytics_views],
        asset_checks=CHECKS,
        jobs=[job, writeback_job],
        schedules=build_schedules(job, when),
        sensors=[*SENSORS, build_inbox_sensor(job)],
        resources={
            "redox": redox or redox_resource(env),
            "warehouse": warehouse or warehouse_resource(env),
            "thresholds": CheckThresholds(
                max_sync_age_hours=env.max_sync_age_hours, max_quarantine_rate=env.max_quarantine_rate
            ),
        },
        # One process per run: the steps share the DuckDB pool anyway, so per-step processes
        # would only add start-up time (and an embedded sandbox per step). Connections run in
        # parallel as separate runs.
        executor=in_process_executor,
    )


defs = build_definitions(Environment.read())
