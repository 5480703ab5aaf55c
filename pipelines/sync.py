"""The one sync runner: for each connection window, extract the connection the way Redox
allows (the patient panel: discovery, per-patient pulls, bulk backfill; ``pipelines.access``)
with dlt into the staged tables, then publish the common model; record the run (requests,
budget left, patients deferred), load the audit trail.
No orchestrator imports: ``redox-elt sync``, ``redox-elt demo`` and every Dagster asset
call ``run_sync``; its per-connection step is ``sync_connection``.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dlt
import duckdb

from pipelines.access import AccessStats, extract_connection
from pipelines.inbox.process import process_inbox
from pipelines.lake import export_lake
from pipelines.landing import RawLanding
from pipelines.panel import mark_identifiers_due
from pipelines.publish import model_schema, publish_connection
from pipelines.quarantine import ensure_quarantine_table, patients_to_refetch, quarantined_enterprise_ids
from pipelines.sync_context import (
    DEFAULT_DISCOVER_DAYS,
    ConnectionWindow,
    SyncWindow,
    networks_last,
    pipeline_name,
)
from pipelines.sync_runs import CROSSWALK_TABLE, record_sync_run, table_row_counts
from pipelines.vocabulary import OPS_SCHEMA, STAGING_SCHEMA
from pipelines.warehouse import WarehousePaths, WriterLock, table_exists
from resources.audit import AuditLog, load_audit_into_duckdb
from resources.client import RedoxClient
from resources.settings import ConnectionSettings, Settings

log = logging.getLogger(__name__)

DEFAULT_LOOKBACK_S = 3600.0


@dataclass
class ConnectionReport:
    """One connection's share of a run: counts and timings only, never row contents."""

    connection_id: str
    window: SyncWindow = field(default_factory=SyncWindow)
    extracted: dict[str, int] = field(default_factory=dict)  # staged rows per entity
    quarantined: dict[str, int] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=dict)  # rows in redox.<entity> after publish
    seconds: dict[str, float] = field(default_factory=dict)  # extract+load, publish
    error: str | None = None
    # The extract's PHI-free counts: requests, budget left, patients due / pulled / deferred …
    access: AccessStats | None = None


@dataclass
class SyncReport:
    """What a run did: the CLI prints it, Dagster turns it into materialization metadata."""

    run_id: str
    connections: list[ConnectionReport] = field(default_factory=list)
    # rows per table per synced connection ("raw.fhir_patients" -> {connection: n}),
    # counted under the writer lock at the end of the run
    row_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # the webhook inbox processed before the connections (pipelines.inbox.process stats)
    inbox: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.error is None for c in self.connections)

    @property
    def failures(self) -> dict[str, str]:
        return {c.connection_id: c.error for c in self.connections if c.error is not None}


# dlt keeps each load package (Parquet copies of the staged rows: PHI) after loading it,
# and merge loads leave the rows in the staging dataset; neither is needed once loaded.
DLT_RETENTION = {"load.delete_completed_jobs": True, "load.truncate_staging_dataset": True}


def configure_dlt_retention() -> None:
    """Keep no copy of loaded rows outside the warehouse (set before each pipeline runs,
    so it holds whoever imported dlt first)."""
    for key, value in DLT_RETENTION.items():
        dlt.config[key] = value


def drop_completed_packages(pipeline: Any) -> None:
    """Delete the folders of fully loaded packages (what ``delete_completed_jobs`` leaves:
    package state and schema). A package with failed jobs is kept for inspection; pending
    packages are kept, since the next run loads them."""
    for load_id in pipeline.list_completed_load_packages():
        package = pipeline.get_load_package_info(load_id)
        if package.jobs.get("failed_jobs"):
            continue
        shutil.rmtree(package.package_path, ignore_errors=True)


def _row_counts(info: Any, surfaces: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    extracted: dict[str, int] = {}
    quarantined: dict[str, int] = {}
    trace = getattr(info, "pipeline", None)
    last = trace.last_trace if trace is not None else None
    counts: dict[str, int] = {}
    if last is not None and last.last_normalize_info is not None:
        counts = dict(last.last_normalize_info.row_counts)
    for table, n in counts.items():
        if table == "quarantine":
            quarantined["all"] = quarantined.get("all", 0) + n
            continue
        for surface in surfaces:
            prefix = f"{surface}_"
            if table.startswith(prefix):
                entity = table[len(prefix) :]
                extracted[entity] = extracted.get(entity, 0) + n
    return extracted, quarantined


def _rows_if_table(
    paths: WarehousePaths, schema: str | None, table: str, sql: str, params: list
) -> list[tuple]:
    """Rows of a read-only query against ``{schema}.{table}`` (``schema`` None: the model's),
    or none when the warehouse or the table does not exist yet (a first sync)."""
    if not paths.duckdb.exists():
        return []
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        schema = schema or model_schema(con)
        if not table_exists(con, schema, table):
            return []
        return con.execute(sql.format(table=f"{schema}.{table}"), params).fetchall()


def enterprise_ids_known(
    paths: WarehousePaths, except_connection: str, *, only_new: bool = False
) -> tuple[str, ...]:
    """Enterprise ids other connections have shown: what a clinical network is asked about.

    ``only_new`` leaves out people the network already answered for: a network query is
    slow (several calls per person, cross-organization latency), so live runs ask about new
    people only and a backfill window re-asks everyone."""
    known = "SELECT DISTINCT id_value FROM {table} WHERE id_system = 'EPI' AND connection_id <> ?"
    asked = " EXCEPT SELECT id_value FROM {table} WHERE id_system = 'EPI' AND connection_id = ?"
    sql = (known + asked if only_new else known) + " ORDER BY 1"
    params = [except_connection, except_connection] if only_new else [except_connection]
    return tuple(r[0] for r in _rows_if_table(paths, None, "patient_identifiers", sql, params))


def network_questions(paths: WarehousePaths, connection_id: str, *, everyone: bool) -> tuple[str, ...]:
    """Whom a clinical network is asked about: new people (everyone for a backfill or
    ``--full``), plus the people a quarantined record of the network belongs to — asked
    again until it loads."""
    known = set(enterprise_ids_known(paths, connection_id, only_new=not everyone))
    if paths.duckdb.exists():
        with duckdb.connect(str(paths.duckdb)) as con:
            known |= quarantined_enterprise_ids(con, connection_id)
    return tuple(sorted(known))


def sync_connection(
    settings: Settings,
    conn: ConnectionSettings,
    paths: WarehousePaths,
    *,
    window: SyncWindow,
    audit: AuditLog,
    run_id: str,
    lookback_s: float = DEFAULT_LOOKBACK_S,
    caller: str = "cli",
    full: bool = False,
    discover_days: int = DEFAULT_DISCOVER_DAYS,
) -> ConnectionReport:
    """Extract + load + publish one connection. The caller holds the writer lock.

    The extract is the patient panel's (``pipelines.access``): discovery and panel bookkeeping
    first, then per-patient pulls (or the bulk backfill, or the network's questions) while dlt
    loads; only once the rows loaded does the panel record who was pulled. No DuckDB
    connection stays open across ``pipeline.run``."""
    report = ConnectionReport(conn.id, window=window)
    landing = RawLanding(paths.landing_root)
    known = (
        network_questions(paths, conn.id, everyone=window.is_backfill or full)
        if conn.kind == "network"
        else ()
    )
    if conn.kind != "network":
        requeue_quarantined(paths, conn.id)
    started = time.monotonic()
    configure_dlt_retention()
    with RedoxClient(settings, conn, audit=audit, run_id=run_id, caller=caller) as client:
        extract = extract_connection(
            client, conn, landing, paths, window=window, full=full, discover_days=discover_days,
            lookback_s=lookback_s, known_enterprise_ids=known,
        )  # fmt: skip
        report.access = extract.stats
        pipeline = dlt.pipeline(
            pipeline_name=pipeline_name(conn.id),
            destination=dlt.destinations.duckdb(str(paths.duckdb)),
            dataset_name=STAGING_SCHEMA,
            pipelines_dir=str(paths.dlt_dir),
        )
        info = pipeline.run(extract.sources)
        extract.finish(paths)
        report.extracted, report.quarantined = _row_counts(info, conn.surfaces)
        drop_completed_packages(pipeline)
    report.seconds["extract_load"] = time.monotonic() - started
    started = time.monotonic()
    with duckdb.connect(str(paths.duckdb)) as con:
        report.published = publish_connection(con, conn.id)
    report.seconds["publish"] = time.monotonic() - started
    return report


def requeue_quarantined(paths: WarehousePaths, connection_id: str) -> int:
    """Patients with open quarantine entries are due again: what failed to load is fetched
    on every sync until it loads (the entry resolves) or a person dismisses it."""
    if not paths.duckdb.exists():
        return 0
    with duckdb.connect(str(paths.duckdb)) as con:
        if not table_exists(con, OPS_SCHEMA, "patient_panel"):
            return 0
        return mark_identifiers_due(con, connection_id, patients_to_refetch(con, connection_id))


def connection_windows(
    settings: Settings, connection_ids: Sequence[str] | None = None, window: SyncWindow | None = None
) -> list[ConnectionWindow]:
    """The selected connections (all by default), each over ``window`` (default: live)."""
    ids = list(connection_ids) if connection_ids else [c.id for c in settings.connections]
    return [ConnectionWindow(settings.connection(c).id, window or SyncWindow()) for c in ids]


def run_sync(
    settings: Settings,
    paths: WarehousePaths,
    windows: Sequence[ConnectionWindow] | None = None,
    *,
    run_id: str | None = None,
    caller: str = "cli",
    lookback_s: float = DEFAULT_LOOKBACK_S,
    on_connection: Callable[[ConnectionReport], None] | None = None,
    connection_ids: Sequence[str] | None = None,
    window: SyncWindow | None = None,
    full: bool = False,
    discover_days: int = DEFAULT_DISCOVER_DAYS,
) -> SyncReport:
    """The one sync runner (``redox-elt sync``, ``redox-elt demo`` and every Dagster asset).

    Syncs each connection window in order (clinical networks last) under the warehouse's
    writer lock; one connection's failure does not stop the others. Every connection's
    outcome is recorded in ``ops.sync_runs``; then the audit trail is loaded, the lake
    exported (Parquet destination) and the rows counted for the caller's summary.
    ``windows`` defaults to ``connection_ids`` (all by default) over ``window`` (live).
    ``full`` re-pulls every panel patient now; ``discover_days`` is how far back discovery
    looks on a live run."""
    if windows is None:
        windows = connection_windows(settings, connection_ids, window)
    run_id = run_id or uuid.uuid4().hex
    report = SyncReport(run_id=run_id)
    kinds = {c.id: c.kind for c in settings.connections}
    with WriterLock(paths):
        # Pushed events first: they add the patients they name to the panel, due now.
        report.inbox = process_inbox(paths, settings, connection_ids=[w.connection_id for w in windows])
        audit = AuditLog(paths.audit_log)
        try:
            for cw in networks_last(windows, lambda w: kinds.get(w.connection_id)):
                try:
                    conn_report = sync_connection(
                        settings,
                        settings.connection(cw.connection_id),
                        paths,
                        window=cw.window,
                        audit=audit,
                        run_id=run_id,
                        lookback_s=lookback_s,
                        caller=caller,
                        full=full,
                        discover_days=discover_days,
                    )
                except Exception as exc:  # noqa: BLE001 - one connection's failure must not stop the others
                    conn_report = ConnectionReport(
                        cw.connection_id, window=cw.window, error=f"{type(exc).__name__}: {safe_message(exc)}"
                    )
                    log.error("connection %s failed: %s", cw.connection_id, conn_report.error)
                _record(paths, run_id, conn_report, caller)
                report.connections.append(conn_report)
                if on_connection:
                    on_connection(conn_report)
        finally:
            audit.close()
            load_audit_into_duckdb(paths.audit_log, paths.duckdb)
        with duckdb.connect(str(paths.duckdb)) as con:
            ensure_quarantine_table(con)  # empty until something is quarantined, but queryable
        if paths.destination == "parquet" and any(c.error is None for c in report.connections):
            export_lake(paths)
        with duckdb.connect(str(paths.duckdb), read_only=True) as con:
            report.row_counts = table_row_counts(con, [c.connection_id for c in report.connections])
    return report


def _record(paths: WarehousePaths, run_id: str, report: ConnectionReport, caller: str) -> None:
    with duckdb.connect(str(paths.duckdb)) as con:
        record_sync_run(
            con,
            run_id=run_id,
            connection_id=report.connection_id,
            window=report.window,
            caller=caller,
            extracted=sum(report.extracted.values()),
            published=sum(n for e, n in report.published.items() if e != CROSSWALK_TABLE),
            quarantined=sum(report.quarantined.values()),
            error=report.error,
            access=report.access.to_dict() if report.access is not None else None,
        )


def safe_message(exc: Exception) -> str:
    """Our own errors are written without PHI and are shown; a library's error text can
    echo payload values, so for those only the chain of exception types is shown."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 5:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if type(e).__module__.split(".")[0] in ("pipelines", "resources", "sandbox"):
            return str(e)[:500]
    return " <- ".join(type(e).__name__ for e in chain)
