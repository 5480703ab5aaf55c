"""The write-back job and the webhook-inbox sensor: the two ways work reaches Dagster
from outside the schedules.

* ``writeback_job``: one op calling ``pipelines.writeback.sender.run_writeback`` (the
  function behind ``redox-elt writeback``), so outbox rows are delivered from Dagster with
  the same exactly-once bookkeeping as the CLI. Its metadata and failure message hold counts
  only (the report's failure reasons may name outbox keys; they stay in the warehouse).
* ``webhook_inbox_sensor``: reads the SQLite inbox's pending count per connection (a
  read-only SQLite query; the DuckDB writer lock is never taken) and requests a live sync
  run for each connection with pending messages. The run key carries the connection's
  newest pending sequence number, so a tick requests a run only when a new message arrived.
"""

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from dagster import (
    Config,
    DefaultSensorStatus,
    Failure,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    job,
    op,
    sensor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from assets.automation import LIVE_RUN_CONFIG
from assets.partitions import CONNECTIONS_PARTITIONS_NAME, partition_key
from assets.resources import RedoxResource, WarehouseResource
from assets.sync_assets import CONNECTION_TAG, DUCKDB_POOL
from pipelines.inbox.store import InboxError, inbox_path, opened

WRITEBACK_JOB = "writeback_job"
INBOX_SENSOR = "webhook_inbox_sensor"


class WritebackConfig(Config):
    """Run config of ``writeback_job`` (the CLI's ``--dry-run`` and ``--connection``)."""

    dry_run: bool = False
    connection: str | None = None


@op(
    name="redox_writeback",
    pool=DUCKDB_POOL,
    description="Send the open rows of outbox.orders / outbox.appointments to their connections, exactly once.",
)
def redox_writeback(
    context: OpExecutionContext, config: WritebackConfig, redox: RedoxResource, warehouse: WarehouseResource
) -> None:
    from pipelines.writeback.sender import run_writeback

    report = run_writeback(
        redox.settings(),
        warehouse.paths().root,
        dry_run=config.dry_run,
        connection_id=config.connection,
        # The report's lines may carry outbox keys: keep them out of Dagster's compute logs.
        out=lambda _line: None,
    )
    counts = {
        "sent": report.sent,
        "found_after_unanswered_send": report.found_after_unanswered_send,
        "failed": report.failed,
        "unknown": report.unknown,
        "acknowledged": report.acknowledged,
        "would_send": len(report.dry_run),
        "invalid": len(report.failures),
    }
    context.add_output_metadata({k: MetadataValue.int(v) for k, v in counts.items()})
    context.log.info(
        "writeback%s: %s",
        " (dry run)" if config.dry_run else "",
        ", ".join(f"{k}={v}" for k, v in counts.items()),
    )
    if report.failed and not config.dry_run:
        raise Failure(
            description=f"writeback: {report.failed} outbox row(s) ended failed; see the outbox tables for reasons",
            metadata={k: MetadataValue.int(v) for k, v in counts.items()},
        )


@job(name=WRITEBACK_JOB, description="Deliver the outbox (redox-elt writeback) from Dagster.")
def writeback_job() -> None:
    redox_writeback()


@dataclass(frozen=True)
class PendingInbox:
    """Pending (unprocessed) messages of one connection: how many, and the newest sequence."""

    connection_id: str
    count: int
    max_seq: int


def pending_by_connection(warehouse: WarehouseResource) -> list[PendingInbox]:
    """Pending messages per attributed connection; no inbox yet means none."""
    path = inbox_path(warehouse.paths())
    if not path.exists():
        return []
    try:
        with opened(path) as con:
            rows = con.execute(
                "SELECT connection_id, count(*), max(seq) FROM messages "
                "WHERE processed_at IS NULL AND connection_id IS NOT NULL "
                "GROUP BY connection_id ORDER BY connection_id"
            ).fetchall()
    except (InboxError, sqlite3.Error) as exc:
        raise InboxError(f"webhook inbox {path.name} cannot be read ({type(exc).__name__})") from None
    return [PendingInbox(str(c), int(n), int(s)) for c, n, s in rows]


def inbox_run_requests(
    context: SensorEvaluationContext, redox: RedoxResource, warehouse: WarehouseResource
) -> Iterator[RunRequest]:
    known = set(context.instance.get_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME))
    configured = {c.id for c in redox.connections()}
    today = datetime.now(UTC).date()
    for p in pending_by_connection(warehouse):
        if p.connection_id not in known or p.connection_id not in configured:
            continue
        yield RunRequest(
            run_key=f"inbox:{p.connection_id}@{p.max_seq}",
            partition_key=partition_key(p.connection_id, today),
            run_config=LIVE_RUN_CONFIG,
            tags={CONNECTION_TAG: p.connection_id},
        )


def build_inbox_sensor(sync_job: UnresolvedAssetJobDefinition | JobDefinition) -> SensorDefinition:
    @sensor(
        name=INBOX_SENSOR,
        job=sync_job,
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "A live sync run for each connection with unprocessed webhook messages in the inbox "
            "(one run per newly arrived message batch)."
        ),
    )
    def webhook_inbox_sensor(
        context: SensorEvaluationContext, redox: RedoxResource, warehouse: WarehouseResource
    ) -> Iterator[RunRequest | SkipReason]:
        requests = list(inbox_run_requests(context, redox, warehouse))
        if not requests:
            yield SkipReason("no pending webhook messages for a partitioned connection")
            return
        yield from requests

    return webhook_inbox_sensor
