"""The sync asset (raw + normalized layers, one step) and the analytics layer.

``redox_sync`` is one multi-asset because one ``sync_connection`` call writes all of its
tables at once: dlt loads both surfaces' staged tables in one pipeline run (the Data
Model's visit query writes several tables), then the connection is published into the
common model in one transaction. Splitting it per table would extract the same pages
several times. It calls the one runner, ``pipelines.sync.run_sync``, that ``redox-elt
sync`` and ``redox-elt demo`` run, so the CLI and the UI never diverge.

Every step that opens the DuckDB file runs in the ``duckdb_writer`` pool (limit 1 in
dagster.yaml) and takes the file's ``WriterLock`` (which also covers CLI syncs).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb
from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AutomationCondition,
    BackfillPolicy,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    MultiPartitionsDefinition,
    asset,
    multi_asset,
)
from pydantic import Field

from assets.column_metadata import normalized_lineage, relation_schema, with_column_schemas
from assets.partitions import first_day, windows_for_run
from assets.resources import RedoxResource, WarehouseResource
from assets.specs import (
    ANALYTICS_GROUP,
    COLUMN_LINEAGE,
    CROSSWALK,
    CROSSWALK_KEY,
    OWNERS,
    PANEL_KEY,
    PERSONS_KEY,
    normalized_key,
    normalized_specs,
    panel_spec,
    raw_key,
    raw_specs,
    schema_metadata,
)
from pipelines.access import AccessStats
from pipelines.model import ENTITIES
from pipelines.publish import ensure_model_tables, model_schema
from pipelines.sync import DEFAULT_LOOKBACK_S, ConnectionReport, SyncReport, run_sync
from pipelines.sync_context import DEFAULT_DISCOVER_DAYS, ConnectionWindow, SyncWindow
from pipelines.vocabulary import CHILD_TABLES, SURFACES
from pipelines.warehouse import WriterLock

DUCKDB_POOL = "duckdb_writer"
CONNECTION_TAG = "redox/connection"
MODE_LIVE, MODE_WINDOW = "live", "window"
# Metadata key carrying the run's per-connection reports (counts, timings, safe errors).
REPORTS_METADATA = "connection_reports"


class SyncConfig(Config):
    """How a sync run reads its partitions."""

    mode: str = Field(
        default=MODE_WINDOW,
        description=(
            "'window': sync the partition's days as a stateless window (backfill; the live cursor "
            "never moves). 'live': incremental sync from the connection's live cursor (schedules)."
        ),
    )
    window_start: str | None = Field(
        default=None, description="ISO-8601 instant overriding the partition's window start (CLI --since)."
    )
    window_end: str | None = Field(
        default=None, description="ISO-8601 instant overriding the partition's window end (CLI --until)."
    )
    lookback_s: float = Field(
        default=DEFAULT_LOOKBACK_S, description="Live mode: re-read this much before the cursor."
    )
    full: bool = Field(
        default=False,
        description="Re-pull every panel patient now, whatever the refresh schedule says (CLI --full).",
    )
    discover_days: int = Field(
        default=DEFAULT_DISCOVER_DAYS,
        ge=1,
        description="Live mode: discovery looks this many days back (CLI --discover-days).",
    )


def _instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def plan_windows(context: AssetExecutionContext, config: SyncConfig) -> list[ConnectionWindow]:
    """The (connection, window) pairs this run syncs."""
    if config.mode not in (MODE_LIVE, MODE_WINDOW):
        raise Failure(description=f"sync config: mode must be 'live' or 'window', got {config.mode!r}")
    keys = context.partition_keys if context.has_partition_key_range else None
    single = context.partition_key if not context.has_partition_key_range else None
    try:
        windows = windows_for_run(
            context.run.tags, keys, single, first_day(context.assets_def.partitions_def)
        )
    except ValueError as exc:
        raise Failure(description=str(exc)) from None
    connection_ids = list(dict.fromkeys(w.connection_id for w in windows))
    if config.window_start or config.window_end:
        # Exact bounds from the CLI (--since/--until); the partitions only name the connections.
        start = _instant(config.window_start) if config.window_start else None
        end = _instant(config.window_end) if config.window_end else None
        try:
            return [ConnectionWindow(c, SyncWindow(start, end)) for c in connection_ids]
        except ValueError as exc:
            raise Failure(description=str(exc)) from None
    if config.mode == MODE_LIVE:
        return [ConnectionWindow(c, SyncWindow()) for c in connection_ids]
    return windows


def report_metadata(reports: list[ConnectionReport]) -> MetadataValue:
    """The connections' reports as JSON metadata (counts and PHI-safe errors only)."""
    return MetadataValue.json(
        [
            {
                "connection_id": r.connection_id,
                "extracted": r.extracted,
                "quarantined": r.quarantined,
                "published": r.published,
                "seconds": {k: round(v, 3) for k, v in r.seconds.items()},
                "error": r.error,
                # requests, budget left, patients due / pulled / deferred (PHI-free counts)
                "access": r.access.to_dict() if r.access is not None else None,
            }
            for r in reports
        ]
    )


def reports_from_metadata(value: Any) -> list[ConnectionReport]:
    """The inverse of ``report_metadata`` (the CLI reads a run's reports back)."""
    return [
        ConnectionReport(
            d["connection_id"],
            extracted=dict(d["extracted"]),
            quarantined=dict(d["quarantined"]),
            published=dict(d["published"]),
            seconds=dict(d["seconds"]),
            error=d["error"],
            access=AccessStats(**d["access"]) if d.get("access") else None,
        )
        for d in value or []
    ]


def _materializations(report: SyncReport) -> Iterator[MaterializeResult]:
    """One result per asset: rows per synced connection and this run's extracted counts."""

    def result(key, table: str, extra: dict[str, MetadataValue] | None = None) -> MaterializeResult:
        rows = report.row_counts.get(table, {})
        metadata = {
            "dagster/row_count": MetadataValue.int(sum(rows.values())),
            "rows_by_connection": MetadataValue.json(rows),
            "table": MetadataValue.text(table),
            **(extra or {}),
        }
        return MaterializeResult(asset_key=key, metadata=metadata)

    panel = {
        c.connection_id: {
            k: v
            for k, v in c.access.to_dict().items()
            if k in ("mode", "requests", "budget_left", "discovered", "due", "pulled", "deferred", "failed")
        }
        for c in report.connections
        if c.access is not None
    }
    yield MaterializeResult(
        asset_key=PANEL_KEY,
        metadata={
            "patients_pulled": MetadataValue.int(sum(v.get("pulled", 0) for v in panel.values())),
            "patients_deferred": MetadataValue.int(sum(v.get("deferred", 0) for v in panel.values())),
            "by_connection": MetadataValue.json(panel),
        },
    )
    for spec in raw_specs():
        path = spec.key.path
        table = "raw.quarantine" if path[-1] == "quarantine" else f"raw.{path[1]}_{path[2]}"
        yield result(spec.key, table)
    # Topological order: the crosswalk before the entities that resolve through it.
    yield result(normalized_key("patients"), "redox.patients", _extracted(report, "patients"))
    yield result(CROSSWALK_KEY, f"redox.{CROSSWALK}", {REPORTS_METADATA: report_metadata(report.connections)})
    for entity in ENTITIES:
        if entity != "patients":
            yield result(normalized_key(entity), f"redox.{entity}", _extracted(report, entity))
    for child in CHILD_TABLES:
        yield result(normalized_key(child), f"redox.{child}")


def _extracted(report: SyncReport, entity: str) -> dict[str, MetadataValue]:
    """This run's extracted counts, and the table's column lineage (staged -> model)."""
    counts = {c.connection_id: c.extracted.get(entity, 0) for c in report.connections}
    lineage = normalized_lineage(entity, [raw_key(s, entity) for s in SURFACES], CROSSWALK_KEY)
    return {"extracted_this_run": MetadataValue.json(counts), COLUMN_LINEAGE: lineage}


@dataclass(frozen=True)
class SyncAssets:
    """The sync asset and the analytics asset built on one partitions definition."""

    redox_sync: AssetsDefinition
    persons: AssetsDefinition


def build_sync_assets(partitions_def: MultiPartitionsDefinition) -> SyncAssets:
    """The assets over ``partitions_def`` (its first day comes from the environment)."""

    @multi_asset(
        name="redox_sync",
        specs=with_column_schemas([panel_spec(), *raw_specs(), *normalized_specs()]),
        partitions_def=partitions_def,
        # One run per connection and contiguous day range (see assets/partitions.py).
        backfill_policy=BackfillPolicy.single_run(),
        # Any of its assets can be selected (`dagster asset materialize --select redox/patients`).
        # One pass over the API writes every table of the connection, so any selection runs the
        # whole sync; materializations are recorded for the selected assets.
        can_subset=True,
        pool=DUCKDB_POOL,
        description="Extract, load and publish the run's connections and days (pipelines.sync.run_sync).",
    )
    def redox_sync(
        context: AssetExecutionContext,
        config: SyncConfig,
        redox: RedoxResource,
        warehouse: WarehouseResource,
    ) -> Iterator[MaterializeResult]:
        windows = plan_windows(context, config)
        for cw in windows:
            context.log.info(
                "sync %s: %s",
                cw.connection_id,
                f"window {cw.window.start:%Y-%m-%d} .. {cw.window.end:%Y-%m-%d}"
                if cw.window.is_backfill
                else "live cursor",
            )
        report = run_sync(
            redox.settings(),
            warehouse.paths(),
            windows,
            run_id=context.run_id,
            caller="dagster",
            lookback_s=config.lookback_s,
            full=config.full,
            discover_days=config.discover_days,
        )
        if report.failures:
            failed = "; ".join(f"{c}: {why}" for c, why in sorted(report.failures.items()))
            raise Failure(
                description=f"{len(report.failures)} of {len(windows)} connections failed: {failed}",
                metadata={REPORTS_METADATA: report_metadata(report.connections)},
            )
        selected = context.selected_asset_keys
        yield from (m for m in _materializations(report) if m.asset_key in selected)

    @asset(
        key=PERSONS_KEY,
        deps=[normalized_key("patients"), CROSSWALK_KEY],
        group_name=ANALYTICS_GROUP,
        owners=OWNERS,
        kinds={"duckdb", "sql"},
        pool=DUCKDB_POOL,
        # Refreshed after the sync, but only once the blocking checks upstream have passed.
        automation_condition=AutomationCondition.eager()
        & AutomationCondition.all_deps_blocking_checks_passed(),
        metadata=schema_metadata(relation_schema("persons")),
        description="Persons across connections: patient keys linked on the shared enterprise id (view redox.persons).",
    )
    def persons(warehouse: WarehouseResource) -> MaterializeResult:
        paths = warehouse.paths()
        with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
            ensure_model_tables(con)
            ms = model_schema(con)
            n_persons, n_linked = con.execute(
                f"""SELECT count(*), count(*) FILTER (WHERE n > 1) FROM (
                        SELECT person_key, count(DISTINCT connection_id) AS n FROM {ms}.persons GROUP BY 1)"""
            ).fetchone()
        return MaterializeResult(
            metadata={
                "dagster/row_count": MetadataValue.int(int(n_persons)),
                "persons_in_several_connections": MetadataValue.int(int(n_linked)),
            }
        )

    return SyncAssets(redox_sync=redox_sync, persons=persons)
