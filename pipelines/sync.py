"""One sync: for each selected connection, extract both surfaces with dlt into the
staged tables, then publish the common model. No orchestrator imports: the Dagster
assets and the CLI both call ``sync_connection``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dlt
import duckdb

from pipelines.datamodel import datamodel_source
from pipelines.fhir import fhir_source
from pipelines.lake import export_lake
from pipelines.landing import RawLanding
from pipelines.publish import model_schema, publish_connection
from pipelines.sync_context import SyncWindow
from pipelines.warehouse import WarehousePaths, WriterLock, table_exists
from resources.audit import AuditLog, load_audit_into_duckdb
from resources.client import RedoxClient
from resources.settings import ConnectionSettings, Settings

log = logging.getLogger(__name__)

DEFAULT_LOOKBACK_S = 3600.0
FHIR_PAGE_SIZE = 500


@dataclass
class ConnectionReport:
    connection_id: str
    extracted: dict[str, int] = field(default_factory=dict)  # staged rows per entity
    quarantined: dict[str, int] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=dict)  # rows in redox.<entity> after publish
    seconds: dict[str, float] = field(default_factory=dict)  # extract+load, publish
    error: str | None = None


@dataclass
class SyncReport:
    run_id: str
    window: SyncWindow
    connections: list[ConnectionReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.error is None for c in self.connections)


def pipeline_name(connection_id: str) -> str:
    """Distinct per connection: parallel pipelines with one name race on state."""
    return "redox_" + re.sub(r"[^a-z0-9_]", "_", connection_id.lower())


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


def build_sources(
    client: RedoxClient,
    conn: ConnectionSettings,
    landing: RawLanding,
    window: SyncWindow,
    lookback_s: float,
    known_enterprise_ids: tuple[str, ...] = (),
    known_patients: tuple[tuple[str, str], ...] = (),
) -> list[Any]:
    sources = []
    if "fhir" in conn.surfaces:
        sources.append(
            fhir_source(
                client,
                landing,
                conn.id,
                entities=tuple(conn.entities),
                window=window,
                # Ask for big pages; a server caps _count at what it allows (the sandbox: 500).
                page_size=max(conn.page_size or 0, FHIR_PAGE_SIZE),
                lookback_s=lookback_s,
            )
        )
    if "datamodel" in conn.surfaces:
        sources.append(
            datamodel_source(
                client,
                landing,
                conn.id,
                entities=tuple(conn.entities),
                window=window,
                lookback_s=lookback_s,
                page_size=conn.page_size or 100,
                also_fhir="fhir" in conn.surfaces,
                known_enterprise_ids=known_enterprise_ids,
                known_patients=known_patients,
            )
        )
    return sources


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


def datamodel_patients_known(paths: WarehousePaths, connection_id: str) -> tuple[tuple[str, str], ...]:
    """(identifier type, value) of every patient an earlier sync staged from the Data Model."""
    rows = _rows_if_table(
        paths,
        "raw",
        "datamodel_patients",
        "SELECT DISTINCT patient_ref_type, patient_ref_value FROM {table} "
        "WHERE connection_id = ? AND patient_ref_value IS NOT NULL ORDER BY 2",
        [connection_id],
    )
    return tuple((r[0], r[1]) for r in rows)


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
) -> ConnectionReport:
    """Extract + load + publish one connection. The caller holds the writer lock."""
    report = ConnectionReport(conn.id)
    landing = RawLanding(paths.landing_root)
    known = (
        enterprise_ids_known(paths, conn.id, only_new=not window.is_backfill)
        if conn.kind == "network"
        else ()
    )
    patients = datamodel_patients_known(paths, conn.id) if "datamodel" in conn.surfaces else ()
    started = time.monotonic()
    with RedoxClient(settings, conn, audit=audit, run_id=run_id, caller=caller) as client:
        pipeline = dlt.pipeline(
            pipeline_name=pipeline_name(conn.id),
            destination=dlt.destinations.duckdb(str(paths.duckdb)),
            dataset_name="raw",
            pipelines_dir=str(paths.dlt_dir),
        )
        info = pipeline.run(build_sources(client, conn, landing, window, lookback_s, known, patients))
        report.extracted, report.quarantined = _row_counts(info, conn.surfaces)
    report.seconds["extract_load"] = time.monotonic() - started
    started = time.monotonic()
    with duckdb.connect(str(paths.duckdb)) as con:
        report.published = publish_connection(con, conn.id)
    report.seconds["publish"] = time.monotonic() - started
    return report


def run_sync(
    settings: Settings,
    paths: WarehousePaths,
    *,
    connection_ids: Sequence[str] | None = None,
    window: SyncWindow | None = None,
    lookback_s: float = DEFAULT_LOOKBACK_S,
    run_id: str | None = None,
    caller: str = "cli",
    on_connection: Callable[[ConnectionReport], None] | None = None,
) -> SyncReport:
    """Sync the selected connections (all by default) one after another under the
    warehouse's writer lock, then load the audit trail into ``audit.api_calls``."""
    window = window or SyncWindow()
    run_id = run_id or uuid.uuid4().hex
    selected = (
        [settings.connection(c) for c in connection_ids] if connection_ids else list(settings.connections)
    )
    # Networks are asked about the people the EHR connections know, so they go last.
    selected.sort(key=lambda c: c.kind == "network")
    report = SyncReport(run_id=run_id, window=window)
    with WriterLock(paths):
        audit = AuditLog(paths.audit_log)
        try:
            for conn in selected:
                try:
                    conn_report = sync_connection(
                        settings,
                        conn,
                        paths,
                        window=window,
                        audit=audit,
                        run_id=run_id,
                        lookback_s=lookback_s,
                        caller=caller,
                    )
                except Exception as exc:  # noqa: BLE001 - one connection's failure must not stop the others
                    conn_report = ConnectionReport(
                        conn.id, error=f"{type(exc).__name__}: {safe_message(exc)}"
                    )
                    log.error("connection %s failed: %s", conn.id, conn_report.error)
                report.connections.append(conn_report)
                if on_connection:
                    on_connection(conn_report)
        finally:
            audit.close()
            load_audit_into_duckdb(paths.audit_log, paths.duckdb)
        if paths.destination == "parquet":
            export_lake(paths)
    return report


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
