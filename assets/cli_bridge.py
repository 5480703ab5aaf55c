"""``redox-elt sync`` through the Dagster job, in-process, so the CLI and the UI run the
same asset code (issue item 7).

One run per connection (EHRs first, networks last), each on partition (connection, today)
for a live sync, or on the day range covering ``--since``/``--until`` with the exact
bounds passed as run config. With ``DAGSTER_HOME`` set the runs are recorded in that
instance, so CLI syncs appear in the UI's history; otherwise an ephemeral instance is
used. Returns the same ``SyncReport`` as ``pipelines.sync.run_sync``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus

from assets.partitions import CONNECTIONS_PARTITIONS_NAME, RANGE_END_TAG, RANGE_START_TAG, partition_key
from assets.specs import CROSSWALK, QUARANTINE_KEY, normalized_key
from assets.sync_assets import CONNECTION_TAG, MODE_LIVE, MODE_WINDOW
from pipelines.model import ENTITIES
from pipelines.sync import DEFAULT_LOOKBACK_S, ConnectionReport, SyncReport
from pipelines.sync_context import SyncWindow
from pipelines.warehouse import WarehousePaths
from resources.dagster import RedoxResource, WarehouseResource
from resources.settings import load_settings

SYNC_JOB = "redox_sync_job"


def _instance() -> DagsterInstance:
    return DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()


def run_plan(connection_id: str, window: SyncWindow, lookback_s: float, today: datetime) -> dict[str, Any]:
    """Partition, tags and run config of one connection's CLI run."""
    config: dict[str, Any] = {
        "mode": MODE_WINDOW if window.is_backfill else MODE_LIVE,
        "lookback_s": lookback_s,
    }
    if window.start is not None:
        config["window_start"] = window.start.isoformat()
    if window.end is not None:
        config["window_end"] = window.end.isoformat()
    tags = {CONNECTION_TAG: connection_id}
    key = None
    if window.is_backfill:
        assert window.end is not None
        first = (window.start or window.end - timedelta(days=1)).astimezone(UTC).date()
        last = (window.end - timedelta(microseconds=1)).astimezone(UTC).date()
        tags[RANGE_START_TAG] = str(partition_key(connection_id, first))
        tags[RANGE_END_TAG] = str(partition_key(connection_id, last))
    else:
        key = str(partition_key(connection_id, today.date()))
    return {"partition_key": key, "tags": tags, "run_config": {"ops": {"redox_sync": {"config": config}}}}


def _report(connection_id: str, result: Any) -> ConnectionReport:
    report = ConnectionReport(connection_id)
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        message = failures[0].step_failure_data.error.message.strip() if failures else "run failed"
        report.error = message.splitlines()[-1][:500] if message else "run failed"
        return report
    for event in result.get_asset_materialization_events():
        key, metadata = event.asset_key, event.materialization.metadata
        rows = metadata["rows_by_connection"].value.get(connection_id, 0)
        if key == QUARANTINE_KEY:
            report.quarantined["all"] = rows
        for entity in (*ENTITIES, CROSSWALK):
            if key == normalized_key(entity):
                report.published[entity] = rows
                extracted = metadata.get("extracted_this_run")
                if extracted is not None:
                    report.extracted[entity] = extracted.value.get(connection_id, 0)
    return report


def run_sync_job(
    config_path: str | Path | None,
    paths: WarehousePaths,
    *,
    connection_ids: Sequence[str] | None = None,
    window: SyncWindow | None = None,
    lookback_s: float = DEFAULT_LOOKBACK_S,
) -> SyncReport:
    """Sync the selected connections (all by default) by executing the Dagster sync job."""
    from redox_elt.definitions import build_definitions

    window = window or SyncWindow()
    settings = load_settings(config_path)
    selected = (
        [settings.connection(c) for c in connection_ids] if connection_ids else list(settings.connections)
    )
    selected.sort(key=lambda c: c.kind == "network")
    defs = build_definitions(
        RedoxResource(config_path=str(settings.source_path)),
        WarehouseResource(path=str(paths.duckdb), destination=paths.destination),
    )
    job = defs.resolve_job_def(SYNC_JOB)
    report = SyncReport(run_id=uuid.uuid4().hex, window=window)
    today = datetime.now(UTC)
    with _instance() as instance:
        instance.add_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME, [c.id for c in selected])
        for conn in selected:
            plan = run_plan(conn.id, window, lookback_s, today)
            result = job.execute_in_process(instance=instance, raise_on_error=False, **plan)
            conn_report = _report(conn.id, result)
            if result.dagster_run.status != DagsterRunStatus.SUCCESS and conn_report.error is None:
                conn_report.error = "run failed"
            report.connections.append(conn_report)
    return report
