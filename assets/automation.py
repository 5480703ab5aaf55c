"""The sync job, its schedules and the sensor that keeps connection partitions in step
with the config. Everything is on by default in ``dagster dev``; crons come from the
environment (read once in ``redox_elt/definitions.py``) so operators change them without
code.

* ``incremental_sync_ehr`` / ``incremental_sync_network`` (``$REDOX_ELT_SYNC_CRON``,
  default hourly; networks half an hour later by ``$REDOX_ELT_NETWORK_SYNC_CRON``, since a
  network is asked about the enterprise ids the EHR connections know): one live run per
  connection on partition (connection, today).
* ``daily_reconciliation`` (``$REDOX_ELT_RECONCILE_CRON``, default 04:00 UTC): one run per
  connection re-reading the last ``$REDOX_ELT_RECONCILE_DAYS`` (default 3) whole days as a
  stateless window, so late updates are caught and the live cursor is left alone.
* ``connection_partitions`` sensor: adds a ``connection`` partition for every connection
  in the config. Removed connections keep their partitions (and their history) until an
  operator deletes them.
* ``analytics_automation`` sensor: evaluates the assets' automation conditions (the
  analytics layer refreshes after a sync once the blocking checks pass). Dagster's own
  default automation sensor starts stopped; this one is on by default, as the README says.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from dagster import (
    AssetsDefinition,
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    MultiPartitionsDefinition,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    schedule,
    sensor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from assets.partitions import (
    CONNECTIONS_PARTITIONS_NAME,
    RANGE_END_TAG,
    RANGE_START_TAG,
    connection_partitions,
    partition_key,
)
from assets.resources import RedoxResource
from assets.sync_assets import CONNECTION_TAG, MODE_LIVE
from pipelines.sync_context import networks_last

SYNC_JOB = "redox_sync_job"
LIVE_RUN_CONFIG = {"ops": {"redox_sync": {"config": {"mode": MODE_LIVE}}}}


@dataclass(frozen=True)
class ScheduleSettings:
    """When the schedules fire (from the environment, read at the code location's edge)."""

    sync_cron: str
    network_sync_cron: str
    reconcile_cron: str
    reconcile_days: int


def build_sync_job(
    redox_sync: AssetsDefinition, partitions_def: MultiPartitionsDefinition
) -> UnresolvedAssetJobDefinition:
    return define_asset_job(
        SYNC_JOB,
        selection=AssetSelection.assets(redox_sync),
        partitions_def=partitions_def,
        description="Sync connections into the warehouse (with the checks on the synced assets).",
    )


def _group_connections(context: ScheduleEvaluationContext, redox: RedoxResource, kind: str) -> list[str]:
    """Configured connections of ``kind`` that already have a partition (the sensor adds them)."""
    known = set(context.instance.get_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME))
    return [c.id for c in redox.connections() if c.kind == kind and c.id in known]


def _tick_day(context: ScheduleEvaluationContext) -> date:
    moment: datetime = context.scheduled_execution_time
    return moment.date()


def _run_key(context: ScheduleEvaluationContext, connection_id: str) -> str:
    """One run per connection per tick (a schedule with several requests needs run keys)."""
    return f"{connection_id}@{context.scheduled_execution_time.isoformat()}"


def live_run_requests(
    context: ScheduleEvaluationContext, redox: RedoxResource, kind: str
) -> Iterator[RunRequest]:
    today = _tick_day(context)
    for connection_id in _group_connections(context, redox, kind):
        yield RunRequest(
            run_key=_run_key(context, connection_id),
            partition_key=partition_key(connection_id, today),
            run_config=LIVE_RUN_CONFIG,
            tags={CONNECTION_TAG: connection_id},
        )


def reconciliation_run_requests(
    context: ScheduleEvaluationContext, redox: RedoxResource, days: int
) -> Iterator[RunRequest]:
    today = _tick_day(context)
    first, last = today - timedelta(days=days), today - timedelta(days=1)
    known = set(context.instance.get_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME))
    for conn in networks_last(redox.connections(), lambda c: c.kind):
        if conn.id not in known:
            continue
        yield RunRequest(
            run_key=_run_key(context, conn.id),
            tags={
                RANGE_START_TAG: str(partition_key(conn.id, first)),
                RANGE_END_TAG: str(partition_key(conn.id, last)),
                CONNECTION_TAG: conn.id,
            },
        )


def build_schedules(job: UnresolvedAssetJobDefinition, when: ScheduleSettings) -> list[ScheduleDefinition]:
    @schedule(
        name="incremental_sync_ehr",
        cron_schedule=when.sync_cron,
        execution_timezone="UTC",
        job=job,
        default_status=DefaultScheduleStatus.RUNNING,
        description="Live incremental sync of every EHR connection, one run each ($REDOX_ELT_SYNC_CRON).",
    )
    def incremental_sync_ehr(
        context: ScheduleEvaluationContext, redox: RedoxResource
    ) -> Iterator[RunRequest]:
        yield from live_run_requests(context, redox, "ehr")

    @schedule(
        name="incremental_sync_network",
        cron_schedule=when.network_sync_cron,
        execution_timezone="UTC",
        job=job,
        default_status=DefaultScheduleStatus.RUNNING,
        description=(
            "Live incremental sync of every clinical-network connection, after the EHRs "
            "($REDOX_ELT_NETWORK_SYNC_CRON)."
        ),
    )
    def incremental_sync_network(
        context: ScheduleEvaluationContext, redox: RedoxResource
    ) -> Iterator[RunRequest]:
        yield from live_run_requests(context, redox, "network")

    @schedule(
        name="daily_reconciliation",
        cron_schedule=when.reconcile_cron,
        execution_timezone="UTC",
        job=job,
        default_status=DefaultScheduleStatus.RUNNING,
        description=(
            f"Re-read the last {when.reconcile_days} whole days of every connection as a stateless "
            "window ($REDOX_ELT_RECONCILE_CRON, $REDOX_ELT_RECONCILE_DAYS)."
        ),
    )
    def daily_reconciliation(
        context: ScheduleEvaluationContext, redox: RedoxResource
    ) -> Iterator[RunRequest]:
        yield from reconciliation_run_requests(context, redox, when.reconcile_days)

    return [incremental_sync_ehr, incremental_sync_network, daily_reconciliation]


@sensor(
    name="connection_partitions",
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a connection partition for every connection in the config ($REDOX_ELT_CONFIG or the sandbox).",
)
def connection_partitions_sensor(
    context: SensorEvaluationContext, redox: RedoxResource
) -> SensorResult | SkipReason:
    existing = set(context.instance.get_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME))
    new = [c.id for c in redox.connections() if c.id not in existing]
    if not new:
        return SkipReason(f"all {len(existing)} configured connections have partitions")
    return SensorResult(dynamic_partitions_requests=[connection_partitions.build_add_request(new)])


analytics_automation_sensor = AutomationConditionSensorDefinition(
    name="analytics_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates every asset's automation condition (analytics/* refresh after a sync).",
)

SENSORS: list[SensorDefinition] = [connection_partitions_sensor, analytics_automation_sensor]


def next_scheduled_runs(when: ScheduleSettings, now: datetime) -> dict[str, list[tuple[str, datetime]]]:
    """The next tick of each schedule that syncs a connection of each kind, after ``now``:
    ``{"ehr": [(schedule, at), ...], "network": [...]}`` (``redox-elt status`` shows them;
    they fire while the Dagster daemon runs)."""
    from dagster._utils.schedules import cron_string_iterator

    def next_tick(cron: str) -> datetime:
        return next(t for t in cron_string_iterator(now.timestamp(), cron, "UTC") if t > now)

    reconcile = ("daily_reconciliation", next_tick(when.reconcile_cron))
    return {
        "ehr": [("incremental_sync_ehr", next_tick(when.sync_cron)), reconcile],
        "network": [("incremental_sync_network", next_tick(when.network_sync_cron)), reconcile],
    }
