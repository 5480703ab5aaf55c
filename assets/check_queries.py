"""The warehouse checks as plain functions over a DuckDB connection (or a Redox client
for source totals). Each returns counts per connection — never row contents — and
whether the check passed; ``assets/checks.py`` turns them into Dagster asset checks.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import orjson

from pipelines.fhir.settings import ENTITY_RESOURCE_TYPES, fhir_instant
from pipelines.model import CHILD_KEY, ENTITIES, ENTITY_KEY
from pipelines.publish import STAGING_SCHEMA, model_schema
from pipelines.quarantine import unresolved_quarantine_counts
from pipelines.resource_hints import QUARANTINE_TABLE, staged_table_name
from pipelines.sync_runs import CROSSWALK_TABLE, MODE_LIVE, STATUS_SUCCESS, SYNC_RUNS_TABLE
from pipelines.vocabulary import CHILD_TABLES
from pipelines.warehouse import table_columns
from resources.client import RedoxAPIError

CROSSWALK = CROSSWALK_TABLE
CROSSWALK_KEY_COLUMNS = ("connection_id", "id_system", "id_value")
# Entities whose rows must name a patient the crosswalk knows.
PATIENT_LINKED = tuple(e for e in ENTITIES if e != "patients") + tuple(CHILD_TABLES)
# Child tables and the parent key each row must name (the parent row must exist).
CHILD_PARENT = {child: (parent, ENTITY_KEY[parent]) for child, parent in CHILD_TABLES.items()}


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    # connection id -> number of offending rows (or the measured value); JSON-able
    by_connection: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


def judged_only(outcome: CheckOutcome, judged: Collection[str] | None) -> CheckOutcome:
    """A run judges the connections it synced (``judged``; every connection when None): a
    failure counted only in other connections passes here, their counts kept for display.
    Another connection's sync, running or failed, must not fail this one's."""
    if judged is None or outcome.passed or not outcome.by_connection:
        return outcome
    failing = {c for c, n in outcome.by_connection.items() if n}
    if failing & set(judged):
        return outcome
    return CheckOutcome(
        True,
        outcome.by_connection,
        f"{outcome.summary} (in {len(failing)} connection(s) this run did not sync)",
    )


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        f"{s}.{t}"
        for s, t in con.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
    }


def _model_table(con: duckdb.DuckDBPyConnection, name: str) -> str | None:
    table = f"{model_schema(con)}.{name}"
    return table if table in _tables(con) else None


def key_columns(entity: str) -> tuple[str, ...]:
    if entity == CROSSWALK:
        return CROSSWALK_KEY_COLUMNS
    if entity in CHILD_KEY:
        return CHILD_KEY[entity]
    return ("connection_id", ENTITY_KEY[entity])


def primary_key_violations(con: duckdb.DuckDBPyConnection, entity: str) -> CheckOutcome:
    """Rows sharing a key with another row, or with a null key part, per connection."""
    table = _model_table(con, entity)
    if table is None:
        return CheckOutcome(True, {}, f"redox.{entity} does not exist yet")
    cols = key_columns(entity)
    key = ", ".join(f'"{c}"' for c in cols)
    nulls = " OR ".join(f'"{c}" IS NULL' for c in cols)
    rows = con.execute(
        f"""SELECT connection_id, sum(n) FROM (
                SELECT connection_id, count(*) AS n FROM {table} GROUP BY {key} HAVING count(*) > 1
                UNION ALL
                SELECT connection_id, count(*) FROM {table} WHERE {nulls} GROUP BY connection_id)
            GROUP BY 1 ORDER BY 1"""
    ).fetchall()
    bad = {str(c): int(n) for c, n in rows}
    total = sum(bad.values())
    return CheckOutcome(total == 0, bad, f"{total} rows violate the key ({', '.join(cols)})")


def orphan_rows(con: duckdb.DuckDBPyConnection, entity: str) -> CheckOutcome:
    """Rows whose patient_key is null or unknown to the crosswalk of their connection."""
    table = _model_table(con, entity)
    crosswalk = _model_table(con, CROSSWALK)
    if table is None:
        return CheckOutcome(True, {}, f"redox.{entity} does not exist yet")
    if crosswalk is None:
        n = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        return CheckOutcome(n == 0, {}, f"{n} rows and no crosswalk")
    rows = con.execute(
        f"""SELECT e.connection_id, count(*) FROM {table} e
            WHERE e.patient_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM {crosswalk} x
                WHERE x.connection_id = e.connection_id AND x.patient_key = e.patient_key)
            GROUP BY 1 ORDER BY 1"""
    ).fetchall()
    bad = {str(c): int(n) for c, n in rows}
    total = sum(bad.values())
    return CheckOutcome(total == 0, bad, f"{total} {entity} rows have no patient in the crosswalk")


def rows_without_parent(con: duckdb.DuckDBPyConnection, child: str) -> CheckOutcome:
    """Child rows (a result's component, a report's result) whose parent row is missing, per
    connection. A report's result that is not in redox.results counts too: the report groups
    a result the warehouse does not hold."""
    table = _model_table(con, child)
    if table is None:
        return CheckOutcome(True, {}, f"redox.{child} does not exist yet")
    checks = [CHILD_PARENT[child]]
    if child == "diagnostic_report_results":
        checks.append(("results", "result_id"))
    bad: dict[str, int] = {}
    for parent, key in checks:
        parent_table = _model_table(con, parent)
        if parent_table is None:
            continue
        for cid, n in con.execute(
            f"""SELECT c.connection_id, count(*) FROM {table} c
                WHERE NOT EXISTS (SELECT 1 FROM {parent_table} p
                                  WHERE p.connection_id = c.connection_id AND p."{key}" = c."{key}")
                GROUP BY 1"""
        ).fetchall():
            bad[str(cid)] = bad.get(str(cid), 0) + int(n)
    total = sum(bad.values())
    return CheckOutcome(total == 0, bad, f"{total} {child} rows name a parent the warehouse does not hold")


def fully_synced_connections(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Connections with at least one successful live (full incremental) sync. Until then a
    warehouse may hold only backfill windows, whose rows can name patients not loaded yet."""
    if SYNC_RUNS_TABLE not in _tables(con):
        return set()
    return {
        r[0]
        for r in con.execute(
            f"SELECT DISTINCT connection_id FROM {SYNC_RUNS_TABLE} WHERE mode = '{MODE_LIVE}' "
            f"AND coalesce(status, '{STATUS_SUCCESS}') = '{STATUS_SUCCESS}'"
        ).fetchall()
    }


def sync_ages(
    con: duckdb.DuckDBPyConnection,
    connection_ids: Iterable[str],
    max_age: timedelta,
    now: datetime | None = None,
) -> CheckOutcome:
    """Hours since each connection's last successful sync (ops.sync_runs); a connection
    never synced, or older than ``max_age``, fails."""
    now = now or datetime.now(UTC)
    last: dict[str, datetime] = {}
    if SYNC_RUNS_TABLE in _tables(con):
        last = {
            c: t
            for c, t in con.execute(
                f"SELECT connection_id, max(finished_at) FROM {SYNC_RUNS_TABLE} "
                f"WHERE coalesce(status, '{STATUS_SUCCESS}') = '{STATUS_SUCCESS}' GROUP BY 1"
            ).fetchall()
        }
    ages: dict[str, float | None] = {}
    stale: list[str] = []
    for cid in sorted(connection_ids):
        at = last.get(cid)
        if at is None:
            ages[cid] = None
            stale.append(cid)
            continue
        age = now - at
        ages[cid] = round(age / timedelta(hours=1), 3)
        if age > max_age:
            stale.append(cid)
    hours = max_age / timedelta(hours=1)
    summary = (
        f"stale or never synced (> {hours:g} h): {', '.join(stale)}"
        if stale
        else f"all synced within {hours:g} h"
    )
    return CheckOutcome(not stale, ages, summary)


def quarantine_rates(
    con: duckdb.DuckDBPyConnection, max_rate: float, judged: Collection[str] | None = None
) -> CheckOutcome:
    """Open quarantined / (open quarantined + staged) rows per connection, against ``max_rate``;
    only the ``judged`` connections (all when None) can fail the check, the others are shown."""
    tables = _tables(con)
    staged = [
        f"{STAGING_SCHEMA}.{staged_table_name(s, e)}"
        for s in ("fhir", "datamodel")
        for e in ENTITIES
        if f"{STAGING_SCHEMA}.{staged_table_name(s, e)}" in tables
    ]
    if not staged:
        return CheckOutcome(True, {}, "nothing staged yet")
    union = " UNION ALL ".join(f"SELECT connection_id FROM {t}" for t in staged)
    good = dict(con.execute(f"SELECT connection_id, count(*) FROM ({union}) GROUP BY 1").fetchall())
    # Only open entries count: one resolved by a later load, or dismissed by a person, is no
    # longer a problem of the data (a stale quarantine must not fail every later check).
    quarantined = unresolved_quarantine_counts(con)
    rates: dict[str, float] = {}
    for cid in sorted(set(good) | set(quarantined)):
        q, g = quarantined.get(cid, 0), good.get(cid, 0)
        rates[str(cid)] = round(q / (q + g), 6) if q + g else 0.0
    over = [c for c, r in rates.items() if r > max_rate and (judged is None or c in judged)]
    summary = f"over {max_rate:.2%}: {', '.join(over)}" if over else f"all at or under {max_rate:.2%}"
    return CheckOutcome(not over, rates, summary)


def fhir_source_total(client: Any, entity: str, before: datetime) -> int | None:
    """What the FHIR server reports as the total of ``entity`` last updated before ``before``;
    None where the server refuses a count without a patient (Redox requires one of each
    resource's parameter sets and ``_lastUpdated`` never stands in for one, REDOX-REFERENCE
    §3.3): the organization-wide total is then not something a client can know."""
    total = 0
    for resource_type in ENTITY_RESOURCE_TYPES[entity]:
        params = {"_count": "0", "_lastUpdated": f"lt{fhir_instant(before)}"}
        try:
            first = next(iter(client.fhir_search_pages(resource_type, params, entity=entity)))
        except RedoxAPIError as exc:
            if exc.status_code == 400:
                return None
            raise
        total += int(orjson.loads(first).get("total") or 0)
    return total


def warehouse_fhir_counts(
    con: duckdb.DuckDBPyConnection, connection_id: str, entities: Sequence[str]
) -> dict[str, tuple[int, datetime | None]]:
    """Staged FHIR rows (plus quarantined FHIR items) per entity, and the cutoff to compare
    at: one second past the newest record seen, so later changes at the source are left
    out of both sides."""
    tables = _tables(con)
    out: dict[str, tuple[int, datetime | None]] = {}
    has_quarantine = f"{STAGING_SCHEMA}.{QUARANTINE_TABLE}" in tables
    unresolved = (
        " AND resolved_at IS NULL"
        if has_quarantine and "resolved_at" in table_columns(con, STAGING_SCHEMA, QUARANTINE_TABLE)
        else ""
    )
    for entity in entities:
        table = f"{STAGING_SCHEMA}.{staged_table_name('fhir', entity)}"
        if table not in tables:
            out[entity] = (0, None)
            continue
        newest = con.execute(
            f"SELECT max(source_updated_at) FROM {table} WHERE connection_id = ?", [connection_id]
        ).fetchone()[0]
        if newest is None:
            out[entity] = (0, None)
            continue
        cutoff = newest.replace(microsecond=0) + timedelta(seconds=1)
        n = con.execute(
            f"SELECT count(*) FROM {table} WHERE connection_id = ? AND source_updated_at < ?",
            [connection_id, cutoff],
        ).fetchone()[0]
        if has_quarantine:
            # A record still quarantined exists at the source but not here; one resolved since
            # is among the staged rows already.
            n += con.execute(
                f"""SELECT count(*) FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE}
                    WHERE connection_id = ? AND source_surface = 'fhir' AND entity = ?{unresolved}
                      AND (source_updated_at IS NULL OR source_updated_at < ?)""",
                [connection_id, entity, cutoff],
            ).fetchone()[0]
        out[entity] = (int(n), cutoff)
    return out


def reconcile_with_source(
    warehouse: Mapping[str, tuple[int, datetime | None]], source_total: Any
) -> dict[str, dict[str, int]]:
    """``{entity: {"warehouse": n, "source": m}}`` for every entity with a cutoff;
    ``source_total(entity, cutoff)`` asks the source."""
    out: dict[str, dict[str, int]] = {}
    for entity, (n, cutoff) in warehouse.items():
        if cutoff is None:
            continue
        total = source_total(entity, cutoff)
        if total is not None:  # None: the source cannot be counted without a patient
            out[entity] = {"warehouse": n, "source": int(total)}
    return out
