"""Publish the staged per-surface tables (``raw.<surface>_<entity>``) into the common
model (``redox.<entity>``) and the identity crosswalk (``redox.patient_identifiers``).

Reconciliation rules (documented in warehouse/README.md):

* A patient's ``patient_key`` is derived from the connection and its local MRN (both
  surfaces carry it), so the same patient seen through FHIR and the Data Model in one
  connection is one key. Without an MRN the key falls back to the surface's own id.
  Demographics never link two records: near-duplicates stay apart.
* Every identifier seen (FHIR logical id, MR, EHRID, NIST, EPI) maps to that key in
  ``redox.patient_identifiers``; rows of other entities resolve their patient through it.
* A record exposed through both surfaces is one row, keyed by its business id (visit
  number, result id, order id, document id); the most recently updated version wins
  (FHIR on ties) and ``source_surface`` becomes ``both``.
* ``redox.persons`` links patient keys across connections on the shared enterprise id.

Each connection is rebuilt inside one transaction, so a killed publish leaves the
previous state; re-running it is idempotent.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from pipelines.analytics import ensure_analytics_views
from pipelines.describe import describe_schema
from pipelines.model import (
    ENTITY_COLUMNS,
    ENTITY_KEY,
    LINEAGE,
    identifiers_schema,
    published_schema,
)
from pipelines.model_docs import OUTBOX_DOCS, OUTBOX_TABLE_DOCS
from pipelines.quarantine import resolve_quarantine
from pipelines.vocabulary import CROSSWALK_TABLE, ENTITIES, MODEL_SCHEMA, staged_table_name
from pipelines.vocabulary import STAGING_SCHEMA as STAGING_SCHEMA  # re-exported for assets/
from pipelines.vocabulary import SURFACES as SURFACES  # re-exported for assets/
from pipelines.writeback.outbox import ensure_outbox_tables


def model_schema(con: duckdb.DuckDBPyConnection) -> str:
    """Where ``redox.<entity>`` lives. Normally schema ``redox``; but DuckDB 2.0 refuses a
    schema named like its catalog, and a file ``redox.duckdb`` is catalog ``redox`` — there
    the tables live in ``main``, which ``redox.<entity>`` then addresses as catalog.table."""
    catalog = con.execute("SELECT current_database()").fetchone()[0]
    return "main" if catalog == MODEL_SCHEMA else MODEL_SCHEMA


def _patient_key_sql(alias: str) -> str:
    return (
        f"CASE WHEN {alias}.mrn IS NOT NULL "
        f"THEN 'pk_' || substr(md5({alias}.connection_id || '|MR|' || {alias}.mrn), 1, 24) "
        f"ELSE 'pk_' || substr(md5({alias}.connection_id || '|' || {alias}.source_surface || '|' "
        f"|| {alias}.source_id), 1, 24) END"
    )


def ensure_model_tables(con: duckdb.DuckDBPyConnection) -> None:
    ms = model_schema(con)
    if ms != "main":
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {ms}")
    for entity in ENTITIES:
        _create_from_schema(con, f"{ms}.{entity}", published_schema(entity))
    _create_from_schema(con, f"{ms}.{CROSSWALK_TABLE}", identifiers_schema())
    con.execute(persons_view_sql(ms))
    # The write-back outboxes exist from the first sync, so users can fill them with SQL.
    ensure_outbox_tables(con)
    # Self-describing: comments from pipelines/model_docs.py, and the analytics views on top
    # (both write only what changed, so this is cheap at every publish).
    describe_schema(con, ms)
    describe_schema(con, STAGING_SCHEMA, {"quarantine"})
    describe_schema(con, "outbox", docs=OUTBOX_DOCS, table_docs=OUTBOX_TABLE_DOCS)
    ensure_analytics_views(con, ms)


def persons_view_sql(ms: str) -> str:
    """``{ms}.persons``: patient keys linked across connections on the enterprise id."""
    return f"""CREATE OR REPLACE VIEW {ms}.persons AS
        SELECT coalesce('ep_' || enterprise_id, connection_id || ':' || patient_key) AS person_key,
               connection_id, patient_key, enterprise_id
        FROM {ms}.patients"""


def _create_from_schema(con: duckdb.DuckDBPyConnection, table: str, schema: pa.Schema) -> None:
    empty = schema.empty_table()  # noqa: F841 - referenced by name in the SQL below
    con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM empty LIMIT 0")


def _existing_staged(con: duckdb.DuckDBPyConnection, entity: str) -> list[str]:
    tables = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", [STAGING_SCHEMA]
        ).fetchall()
    }
    return [s for s in SURFACES if staged_table_name(s, entity) in tables]


def _staged_union(con: duckdb.DuckDBPyConnection, entity: str, columns: list[str]) -> str | None:
    surfaces = _existing_staged(con, entity)
    if not surfaces:
        return None
    cols = ", ".join(f'"{c}"' for c in columns)
    # One surface record (its source id) is one row: a version staged under another key — it
    # arrived without its business identifier, or with a damaged one — is superseded by the
    # record's latest fetch. Landed page names start with their fetch time, so the newest
    # page wins in a live sync and in a replay alike.
    parts = [
        f"SELECT {cols} FROM {STAGING_SCHEMA}.{staged_table_name(s, entity)} WHERE connection_id = $conn "
        "QUALIFY source_id IS NULL OR row_number() OVER (PARTITION BY source_id "
        "ORDER BY regexp_extract(raw_ref, '[^/]*$') DESC NULLS LAST, ingested_at DESC) = 1"
        for s in surfaces
    ]
    return " UNION ALL ".join(parts)


def publish_connection(con: duckdb.DuckDBPyConnection, connection_id: str) -> dict[str, int]:
    """Rebuild ``redox.*`` rows of one connection from its staged rows. Returns row counts.

    Every load is followed by a publish, so this is also where quarantine entries whose
    record has since loaded in good shape are marked resolved (``resolve_quarantine``)."""
    ms = model_schema(con)
    ensure_model_tables(con)
    counts: dict[str, int] = {}
    con.execute("BEGIN TRANSACTION")
    try:
        _publish_identity(con, connection_id)
        counts["patients"] = _publish_patients(con, connection_id)
        for entity in ENTITIES:
            if entity != "patients":
                counts[entity] = _publish_entity(con, connection_id, entity)
        counts[CROSSWALK_TABLE] = _count(con, f"{ms}.{CROSSWALK_TABLE}", connection_id)
        resolve_quarantine(con, connection_id)
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return counts


def _stage_columns(entity: str) -> list[str]:
    """Columns of a staged row: lineage (the patient still a reference) + the entity's."""
    return (
        [c for c, _ in LINEAGE if c != "patient_key"]
        + ["patient_ref_type", "patient_ref_value"]
        + [c for c, _ in ENTITY_COLUMNS[entity]]
    )


def _latest_per_key(source: str, key: str) -> str:
    """Staged rows ranked per business key: ``rn = 1`` is the version that wins (most recent,
    FHIR on ties), ``n_surfaces`` how many surfaces showed it, ``first_source_id`` the id
    on the surface it was first seen through."""
    return f"""SELECT *, row_number() OVER (PARTITION BY connection_id, {key}
                         ORDER BY source_updated_at DESC NULLS LAST, source_surface = 'fhir' DESC, ingested_at DESC) AS rn,
                      count(DISTINCT source_surface) OVER (PARTITION BY connection_id, {key}) AS n_surfaces,
                      first_value(source_id) OVER (PARTITION BY connection_id, {key} ORDER BY ingested_at,
                         source_surface = 'fhir' DESC) AS first_source_id
            FROM {source}"""


def _count(con: duckdb.DuckDBPyConnection, table: str, connection_id: str) -> int:
    return con.execute(f"SELECT count(*) FROM {table} WHERE connection_id = ?", [connection_id]).fetchone()[0]


def _patient_rows_sql(con: duckdb.DuckDBPyConnection) -> str | None:
    union = _staged_union(con, "patients", _stage_columns("patients"))
    if union is None:
        return None
    return f"SELECT *, {_patient_key_sql('s')} AS patient_key FROM ({union}) s"


def _publish_identity(con: duckdb.DuckDBPyConnection, connection_id: str) -> None:
    ms = model_schema(con)
    con.execute(f"DELETE FROM {ms}.{CROSSWALK_TABLE} WHERE connection_id = $conn", {"conn": connection_id})
    rows = _patient_rows_sql(con)
    if rows is None:
        return
    id_columns = [("fhir", "CASE WHEN source_surface = 'fhir' THEN source_id END")] + [
        (t, c) for t, c in (("MR", "mrn"), ("EPI", "enterprise_id"), ("EHRID", "ehr_id"), ("NIST", "nist_id"))
    ]
    unpivot = " UNION ALL ".join(
        f"SELECT connection_id, '{t}' AS id_system, {expr} AS id_value, patient_key, source_surface, "
        f"ingested_at, source_updated_at FROM p"
        for t, expr in id_columns
    )
    con.execute(
        f"""INSERT INTO {ms}.{CROSSWALK_TABLE}
        WITH p AS ({rows}), ids AS ({unpivot})
        SELECT connection_id, id_system, id_value,
               arg_max(patient_key, coalesce(source_updated_at, TIMESTAMPTZ '1970-01-01 00:00:00+00')) AS patient_key,
               id_system AS id_type,
               CASE WHEN count(DISTINCT source_surface) > 1 THEN 'both' ELSE min(source_surface) END,
               min(ingested_at), max(ingested_at)
        FROM ids WHERE id_value IS NOT NULL
        GROUP BY connection_id, id_system, id_value""",
        {"conn": connection_id},
    )


def _publish_patients(con: duckdb.DuckDBPyConnection, connection_id: str) -> int:
    ms = model_schema(con)
    con.execute(f"DELETE FROM {ms}.patients WHERE connection_id = $conn", {"conn": connection_id})
    rows = _patient_rows_sql(con)
    if rows is None:
        return 0
    out_cols = [f.name for f in published_schema("patients")]
    select = ", ".join(_pick("latest", c) for c in out_cols)
    con.execute(
        f"""INSERT INTO {ms}.patients
        WITH p AS ({rows}), ranked AS ({_latest_per_key("p", "patient_key")})
        SELECT {select} FROM ranked latest WHERE rn = 1""",
        {"conn": connection_id},
    )
    return _count(con, f"{ms}.patients", connection_id)


def _pick(alias: str, column: str) -> str:
    if column == "source_surface":
        return (
            f"CASE WHEN {alias}.n_surfaces > 1 THEN 'both' ELSE {alias}.source_surface END AS source_surface"
        )
    if column == "source_id":
        return f"{alias}.first_source_id AS source_id"
    return f'{alias}."{column}"'


def _publish_entity(con: duckdb.DuckDBPyConnection, connection_id: str, entity: str) -> int:
    ms = model_schema(con)
    con.execute(f"DELETE FROM {ms}.{entity} WHERE connection_id = $conn", {"conn": connection_id})
    union = _staged_union(con, entity, _stage_columns(entity))
    if union is None:
        return 0
    key = ENTITY_KEY[entity]
    out_cols = [f.name for f in published_schema(entity)]
    select = ", ".join(
        "x.patient_key AS patient_key" if c == "patient_key" else _pick("latest", c) for c in out_cols
    )
    con.execute(
        f"""INSERT INTO {ms}.{entity}
        WITH s AS ({union}), ranked AS ({_latest_per_key("s", f'"{key}"')})
        SELECT {select}
        FROM ranked latest
        LEFT JOIN {ms}.{CROSSWALK_TABLE} x
          ON x.connection_id = latest.connection_id
         AND x.id_system = latest.patient_ref_type
         AND x.id_value = latest.patient_ref_value
        WHERE latest.rn = 1""",
        {"conn": connection_id},
    )
    return _count(con, f"{ms}.{entity}", connection_id)
