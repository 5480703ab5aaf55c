"""Asset checks on the warehouse. Blocking (a failure stops the assets downstream, e.g.
the persons view): primary-key uniqueness, referential integrity to the crosswalk and
the quarantine rate. Warnings: freshness per connection and FHIR counts against the
source's reported totals. Metadata holds counts per connection only, never rows.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import duckdb
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    MetadataValue,
    asset_check,
    multi_asset_check,
)

from assets import check_queries as q
from assets.partitions import run_connections
from assets.resources import CheckThresholds, RedoxResource, WarehouseResource
from assets.specs import CROSSWALK, CROSSWALK_KEY, QUARANTINE_KEY, normalized_key, raw_key
from assets.sync_assets import DUCKDB_POOL
from pipelines.model import ENTITIES
from pipelines.vocabulary import CHILD_TABLES
from pipelines.warehouse import WriterLock
from resources.audit import AuditLog
from resources.client import RedoxClient

PK_CHECK = "primary_key_unique"
RI_CHECK = "patient_in_crosswalk"
FRESHNESS_CHECK = "connections_fresh"
QUARANTINE_CHECK = "quarantine_rate_under_threshold"
SOURCE_TOTALS_CHECK = "counts_match_source_totals"


@contextmanager
def read_warehouse(warehouse: WarehouseResource) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """A read-only connection taken under the writer lock: DuckDB refuses to open a file
    another process is writing. ``None`` when nothing was synced yet."""
    paths = warehouse.paths()
    with WriterLock(paths):
        if not paths.duckdb.exists():
            yield None
            return
        with duckdb.connect(str(paths.duckdb), read_only=True) as con:
            yield con


def _result(key, name: str, outcome: q.CheckOutcome, severity: AssetCheckSeverity) -> AssetCheckResult:
    return AssetCheckResult(
        asset_key=key,
        check_name=name,
        passed=outcome.passed,
        severity=severity,
        description=outcome.summary,
        metadata={"by_connection": MetadataValue.json(outcome.by_connection)},
    )


_PK_TARGETS = [*ENTITIES, *CHILD_TABLES, CROSSWALK]
PARENT_CHECK = "parent_row_exists"


def _selected(context: AssetCheckExecutionContext, entities: Iterable[str], check: str) -> list[str]:
    """The entities whose ``check`` this run selected (one asset materialized on its own
    runs only its own checks)."""
    keys = context.selected_asset_check_keys
    return [e for e in entities if AssetCheckKey(normalized_key(e), check) in keys]


@multi_asset_check(
    specs=[
        AssetCheckSpec(
            PK_CHECK, asset=normalized_key(e), blocking=True, description="One row per key, no null key part."
        )
        for e in _PK_TARGETS
    ],
    pool=DUCKDB_POOL,
    can_subset=True,
)
def primary_keys_unique(
    context: AssetCheckExecutionContext, warehouse: WarehouseResource
) -> Iterator[AssetCheckResult]:
    judged = run_connections(context.run.tags)
    with read_warehouse(warehouse) as con:
        for entity in _selected(context, _PK_TARGETS, PK_CHECK):
            outcome = (
                q.primary_key_violations(con, entity) if con else q.CheckOutcome(True, {}, "no warehouse yet")
            )
            outcome = q.judged_only(outcome, judged)
            yield _result(normalized_key(entity), PK_CHECK, outcome, AssetCheckSeverity.ERROR)


@multi_asset_check(
    specs=[
        AssetCheckSpec(
            RI_CHECK,
            asset=normalized_key(e),
            blocking=True,
            additional_deps=[CROSSWALK_KEY],
            description="Every row's patient_key is in redox.patient_identifiers for its connection.",
        )
        for e in q.PATIENT_LINKED
    ],
    pool=DUCKDB_POOL,
    can_subset=True,
)
def patients_in_crosswalk(
    context: AssetCheckExecutionContext, warehouse: WarehouseResource
) -> Iterator[AssetCheckResult]:
    """Orphans in a connection that has had a full (live) sync are an error and block
    downstream. In a connection that so far has only backfill windows, a row may name a
    patient updated outside the window: reported as a warning until the first live sync.
    A run judges the connections it synced (its partition tags)."""
    judged = run_connections(context.run.tags)
    with read_warehouse(warehouse) as con:
        full = q.fully_synced_connections(con) if con else set()
        for entity in _selected(context, q.PATIENT_LINKED, RI_CHECK):
            outcome = q.orphan_rows(con, entity) if con else q.CheckOutcome(True, {}, "no warehouse yet")
            outcome = q.judged_only(outcome, judged)
            severity = AssetCheckSeverity.ERROR
            if not outcome.passed and not (set(outcome.by_connection) & full):
                severity = AssetCheckSeverity.WARN
                outcome = q.CheckOutcome(
                    False, outcome.by_connection, outcome.summary + " (only backfill windows loaded so far)"
                )
            yield _result(normalized_key(entity), RI_CHECK, outcome, severity)


@multi_asset_check(
    specs=[
        AssetCheckSpec(
            PARENT_CHECK,
            asset=normalized_key(child),
            blocking=True,
            additional_deps=[normalized_key(parent)],
            description=f"Every row names a row of redox.{parent} (and, for a report's results, of redox.results).",
        )
        for child, parent in CHILD_TABLES.items()
    ],
    pool=DUCKDB_POOL,
)
def child_rows_have_parents(
    context: AssetCheckExecutionContext, warehouse: WarehouseResource
) -> Iterator[AssetCheckResult]:
    """A run judges the connections it synced (its partition tags)."""
    judged = run_connections(context.run.tags)
    with read_warehouse(warehouse) as con:
        for child in CHILD_TABLES:
            outcome = (
                q.rows_without_parent(con, child) if con else q.CheckOutcome(True, {}, "no warehouse yet")
            )
            outcome = q.judged_only(outcome, judged)
            yield _result(normalized_key(child), PARENT_CHECK, outcome, AssetCheckSeverity.ERROR)


@asset_check(
    asset=CROSSWALK_KEY,
    name=FRESHNESS_CHECK,
    pool=DUCKDB_POOL,
    description="Every configured connection synced successfully within $REDOX_ELT_MAX_SYNC_AGE_HOURS hours (default 26).",
)
def connections_fresh(
    redox: RedoxResource, warehouse: WarehouseResource, thresholds: CheckThresholds
) -> AssetCheckResult:
    max_age = timedelta(hours=thresholds.max_sync_age_hours)
    connection_ids = [c.id for c in redox.connections()]
    with read_warehouse(warehouse) as con:
        if con is None:
            outcome = q.CheckOutcome(False, dict.fromkeys(connection_ids), "no warehouse yet: nothing synced")
        else:
            outcome = q.sync_ages(con, connection_ids, max_age)
    return _result(CROSSWALK_KEY, FRESHNESS_CHECK, outcome, AssetCheckSeverity.WARN)


@asset_check(
    asset=QUARANTINE_KEY,
    name=QUARANTINE_CHECK,
    blocking=True,
    pool=DUCKDB_POOL,
    description="Quarantined share of each connection's items at most $REDOX_ELT_MAX_QUARANTINE_RATE (default 1%).",
)
def quarantine_rate(
    context: AssetCheckExecutionContext, warehouse: WarehouseResource, thresholds: CheckThresholds
) -> AssetCheckResult:
    """Judges the connections the run synced (its partition tags; every connection when the run
    has none): another connection's open quarantine must not fail this connection's sync."""
    max_rate = thresholds.max_quarantine_rate
    judged = run_connections(context.run.tags)
    with read_warehouse(warehouse) as con:
        outcome = (
            q.quarantine_rates(con, max_rate, judged) if con else q.CheckOutcome(True, {}, "no warehouse yet")
        )
    return _result(QUARANTINE_KEY, QUARANTINE_CHECK, outcome, AssetCheckSeverity.ERROR)


@multi_asset_check(
    specs=[
        AssetCheckSpec(
            SOURCE_TOTALS_CHECK,
            asset=raw_key("fhir", e),
            description=(
                "Staged + quarantined FHIR items equal the server's Bundle.total up to the newest record "
                "seen, where the server answers a count without a patient (Redox does not: then nothing "
                "is compared)."
            ),
        )
        for e in ENTITIES
    ],
    pool=DUCKDB_POOL,
    can_subset=True,
)
def fhir_counts_match_source(
    context: AssetCheckExecutionContext, redox: RedoxResource, warehouse: WarehouseResource
) -> Iterator[AssetCheckResult]:
    settings = redox.settings()
    fhir_connections = [c for c in settings.connections if "fhir" in c.surfaces]
    with read_warehouse(warehouse) as con:
        counts = (
            {c.id: q.warehouse_fhir_counts(con, c.id, c.entities) for c in fhir_connections} if con else {}
        )
    comparisons: dict[str, dict[str, dict[str, int]]] = {}
    audit = AuditLog(warehouse.paths().audit_log)  # the calls join the warehouse's audit trail
    try:
        for conn in fhir_connections:
            if not counts.get(conn.id):
                continue
            with RedoxClient(
                settings, conn, audit=audit, run_id=context.run.run_id, caller="dagster-check"
            ) as client:
                comparisons[conn.id] = q.reconcile_with_source(
                    counts[conn.id],
                    lambda entity, cutoff, client=client: q.fhir_source_total(client, entity, cutoff),
                )
    finally:
        audit.close()
    for entity in ENTITIES:
        if (
            AssetCheckKey(raw_key("fhir", entity), SOURCE_TOTALS_CHECK)
            not in context.selected_asset_check_keys
        ):
            continue
        per_conn = {c: cmp[entity] for c, cmp in comparisons.items() if entity in cmp}
        off = sorted(c for c, v in per_conn.items() if v["warehouse"] != v["source"])
        if off:
            summary = f"differs from the source in: {', '.join(off)}"
        elif per_conn:
            summary = f"matches the source in {len(per_conn)} connection(s)"
        else:
            summary = "no source total to compare: the server counts nothing without a patient (as Redox)"
        yield _result(
            raw_key("fhir", entity),
            SOURCE_TOTALS_CHECK,
            q.CheckOutcome(not off, per_conn, summary),
            AssetCheckSeverity.WARN,
        )


CHECKS = [
    primary_keys_unique,
    patients_in_crosswalk,
    child_rows_have_parents,
    quarantine_rate,
    connections_fresh,
    fhir_counts_match_source,
]
