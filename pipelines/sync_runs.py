"""The run record every sync leaves in the warehouse, and the row counts it reports.

``ops.sync_runs`` is the freshness record: one row per connection per run, whatever
started it (``redox-elt sync``, ``redox-elt demo``, a Dagster schedule or backfill),
success or failure. A failed connection keeps its PHI-safe reason in ``error``, so an
operator sees it in the warehouse and the freshness check counts successes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import duckdb

from pipelines.model import ENTITIES
from pipelines.publish import STAGING_SCHEMA, SURFACES, model_schema
from pipelines.resource_hints import QUARANTINE_TABLE, staged_table_name
from pipelines.sync_context import SyncWindow
from pipelines.vocabulary import CHILD_TABLES

SYNC_RUNS_TABLE = "ops.sync_runs"
CROSSWALK_TABLE = "patient_identifiers"
STATUS_SUCCESS, STATUS_FAILED = "success", "failed"
MODE_LIVE, MODE_BACKFILL = "live", "backfill"

_COLUMNS = (
    "run_id",
    "connection_id",
    "mode",
    "window_start",
    "window_end",
    "finished_at",
    "extracted_rows",
    "published_rows",
    "quarantined_rows",
    "caller",
    "status",
    "error",
    "requests",
    "budget_left",
    "patients_due",
    "patients_pulled",
    "patients_deferred",
)
# Columns added after the table first shipped: (name, type). Older tables get them on first use.
_ADDED_COLUMNS = (
    ("status", f"VARCHAR DEFAULT '{STATUS_SUCCESS}'"),
    ("error", "VARCHAR"),
    ("requests", "BIGINT"),
    ("budget_left", "BIGINT"),
    ("patients_due", "BIGINT"),
    ("patients_pulled", "BIGINT"),
    ("patients_deferred", "BIGINT"),
)


def ensure_sync_runs_table(con: duckdb.DuckDBPyConnection) -> None:
    """Create ``ops.sync_runs``; a table from an earlier version gets the newer columns (rows
    from before the status column, successes only then, are marked successful)."""
    con.execute("CREATE SCHEMA IF NOT EXISTS ops")
    con.execute(
        f"""CREATE TABLE IF NOT EXISTS {SYNC_RUNS_TABLE} (
            run_id VARCHAR, connection_id VARCHAR, mode VARCHAR,
            window_start TIMESTAMPTZ, window_end TIMESTAMPTZ, finished_at TIMESTAMPTZ,
            extracted_rows BIGINT, published_rows BIGINT, quarantined_rows BIGINT, caller VARCHAR,
            status VARCHAR DEFAULT '{STATUS_SUCCESS}', error VARCHAR)"""
    )
    for name, sql_type in _ADDED_COLUMNS:
        con.execute(f"ALTER TABLE {SYNC_RUNS_TABLE} ADD COLUMN IF NOT EXISTS {name} {sql_type}")


def record_sync_run(
    con: duckdb.DuckDBPyConnection,
    *,
    run_id: str,
    connection_id: str,
    window: SyncWindow,
    caller: str,
    extracted: int,
    published: int,
    quarantined: int,
    error: str | None,
    access: dict | None = None,
) -> None:
    """One row for one connection's share of a run. ``access``: the extract's PHI-free counts
    (``pipelines.access.AccessStats.to_dict``): requests sent, budget left, patients due,
    pulled and deferred; absent when the connection failed before extracting."""
    access = access or {}
    ensure_sync_runs_table(con)
    con.execute(
        f"INSERT INTO {SYNC_RUNS_TABLE} ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
        [
            run_id,
            connection_id,
            MODE_BACKFILL if window.is_backfill else MODE_LIVE,
            window.start,
            window.end,
            datetime.now(UTC),
            extracted,
            published,
            quarantined,
            caller,
            STATUS_FAILED if error else STATUS_SUCCESS,
            error,
            access.get("requests"),
            access.get("budget_left"),
            access.get("due"),
            access.get("pulled"),
            access.get("deferred"),
        ],
    )


def _existing_tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        f"{s}.{t}"
        for s, t in con.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
    }


def table_row_counts(
    con: duckdb.DuckDBPyConnection, connection_ids: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Rows per connection in every table a sync writes, keyed ``raw.fhir_patients``,
    ``raw.quarantine``, ``redox.patients`` …; absent tables count zero. Counts only."""
    staged = [staged_table_name(s, e) for s in SURFACES for e in ENTITIES] + [QUARANTINE_TABLE]
    existing = _existing_tables(con)
    ms = model_schema(con)
    physical = {f"{STAGING_SCHEMA}.{t}": f"{STAGING_SCHEMA}.{t}" for t in staged}
    physical.update({f"redox.{t}": f"{ms}.{t}" for t in (*ENTITIES, *CHILD_TABLES, CROSSWALK_TABLE)})
    out: dict[str, dict[str, int]] = {}
    for logical, table in physical.items():
        counts = dict.fromkeys(connection_ids, 0)
        if table in existing:
            for cid, n in con.execute(f"SELECT connection_id, count(*) FROM {table} GROUP BY 1").fetchall():
                if cid in counts:
                    counts[cid] = int(n)
        out[logical] = counts
    return out
