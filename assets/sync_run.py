"""What one Dagster sync run does, without Dagster: sync each (connection, window) with
the same ``sync_connection`` the CLI uses, under the warehouse's writer lock, then load
the audit trail, record the run in ``ops.sync_runs`` and count rows for metadata.

``ops.sync_runs`` is the freshness record: one row per connection per successful sync,
whatever started it (schedule, UI backfill, CLI).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb

from assets.partitions import ConnectionWindow
from assets.specs import CROSSWALK
from pipelines.lake import export_lake
from pipelines.model import ENTITIES
from pipelines.publish import STAGING_SCHEMA, SURFACES, model_schema
from pipelines.resource_hints import QUARANTINE_TABLE, staged_table_name
from pipelines.sync import DEFAULT_LOOKBACK_S, ConnectionReport, safe_message, sync_connection
from pipelines.sync_context import SyncWindow
from pipelines.warehouse import WarehousePaths, WriterLock
from resources.audit import AuditLog, load_audit_into_duckdb
from resources.settings import Settings

log = logging.getLogger(__name__)

SYNC_RUNS_TABLE = "ops.sync_runs"


class SyncRunFailed(RuntimeError):
    """At least one connection failed; the message names them, with PHI-safe reasons."""


@dataclass
class RunOutcome:
    reports: list[ConnectionReport] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # connection id -> safe reason
    # rows per table per synced connection, counted before the writer lock is released
    row_counts: dict[str, dict[str, int]] = field(default_factory=dict)


def ensure_sync_runs_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE SCHEMA IF NOT EXISTS ops")
    con.execute(
        f"""CREATE TABLE IF NOT EXISTS {SYNC_RUNS_TABLE} (
            run_id VARCHAR, connection_id VARCHAR, mode VARCHAR,
            window_start TIMESTAMPTZ, window_end TIMESTAMPTZ, finished_at TIMESTAMPTZ,
            extracted_rows BIGINT, published_rows BIGINT, quarantined_rows BIGINT, caller VARCHAR)"""
    )


def _record(
    paths: WarehousePaths, run_id: str, cw: ConnectionWindow, report: ConnectionReport, caller: str
) -> None:
    with duckdb.connect(str(paths.duckdb)) as con:
        ensure_sync_runs_table(con)
        published = sum(n for e, n in report.published.items() if e != CROSSWALK)
        con.execute(
            f"INSERT INTO {SYNC_RUNS_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                cw.connection_id,
                "backfill" if cw.window.is_backfill else "live",
                cw.window.start,
                cw.window.end,
                datetime.now(UTC),
                sum(report.extracted.values()),
                published,
                sum(report.quarantined.values()),
                caller,
            ],
        )


def run_windows(
    settings: Settings,
    paths: WarehousePaths,
    windows: Sequence[ConnectionWindow],
    *,
    run_id: str,
    lookback_s: float = DEFAULT_LOOKBACK_S,
    caller: str = "dagster",
) -> RunOutcome:
    """Sync every window in order (clinical networks last: they are asked about the
    enterprise ids the EHR connections know). One connection's failure does not stop
    the others; the caller decides what a failure means for the run."""
    kinds = {c.id: c.kind for c in settings.connections}
    ordered = sorted(windows, key=lambda w: (kinds.get(w.connection_id) == "network", w.connection_id))
    outcome = RunOutcome()
    with WriterLock(paths):
        audit = AuditLog(paths.audit_log)
        try:
            for cw in ordered:
                try:
                    conn = settings.connection(cw.connection_id)
                    report = sync_connection(
                        settings,
                        conn,
                        paths,
                        window=cw.window,
                        audit=audit,
                        run_id=run_id,
                        lookback_s=lookback_s,
                        caller=caller,
                    )
                except Exception as exc:  # noqa: BLE001 - reported per connection, raised by the caller
                    outcome.failures[cw.connection_id] = f"{type(exc).__name__}: {safe_message(exc)}"
                    log.error(
                        "connection %s failed: %s", cw.connection_id, outcome.failures[cw.connection_id]
                    )
                    continue
                _record(paths, run_id, cw, report, caller)
                outcome.reports.append(report)
        finally:
            audit.close()
            load_audit_into_duckdb(paths.audit_log, paths.duckdb)
        if paths.destination == "parquet" and outcome.reports:
            export_lake(paths)
        outcome.row_counts = table_row_counts(paths, [r.connection_id for r in outcome.reports])
    return outcome


def live_windows(connection_ids: Sequence[str]) -> list[ConnectionWindow]:
    return [ConnectionWindow(c, SyncWindow()) for c in connection_ids]


def _existing_tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        f"{s}.{t}"
        for s, t in con.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
    }


def table_row_counts(paths: WarehousePaths, connection_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Rows per connection in every table the sync asset owns, keyed ``raw.fhir_patients``,
    ``redox.patients`` …; absent tables count zero. Counts only, never contents."""
    ms_tables = [*ENTITIES, CROSSWALK]
    staged = [staged_table_name(s, e) for s in SURFACES for e in ENTITIES] + [QUARANTINE_TABLE]
    out: dict[str, dict[str, int]] = {}
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        existing = _existing_tables(con)
        ms = model_schema(con)
        physical = {f"{STAGING_SCHEMA}.{t}": f"{STAGING_SCHEMA}.{t}" for t in staged}
        physical.update({f"redox.{t}": f"{ms}.{t}" for t in ms_tables})
        for logical, table in physical.items():
            counts = dict.fromkeys(connection_ids, 0)
            if table in existing:
                for cid, n in con.execute(
                    f"SELECT connection_id, count(*) FROM {table} GROUP BY 1"
                ).fetchall():
                    if cid in counts:
                        counts[cid] = n
            out[logical] = counts
    return out
