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
  number, result id, order id, document id), ``source_surface = both``. Records one surface
  gives no shared id (Clinical Summary entries) are paired with the other surface's record
  of the same patient and ``match_key`` (code + clinical day). Each surface's latest version
  of a record is taken whole; across surfaces the row is merged field by field: every
  column takes the value of the surface row with the newest source-own time
  (``source_updated_at``, FHIR on ties) among those where it is not null. A value is never
  replaced by a null, so every field either surface knows is kept.
* Child tables follow their parents: ``result_components`` from the merged results'
  components, ``diagnostic_report_results`` from the merged reports' result references
  (FHIR Observation ids resolved to result ids through the staged FHIR results).
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
    CHILD_COLUMNS,
    ENTITY_COLUMNS,
    ENTITY_KEY,
    F64,
    LINEAGE,
    PATIENT_REF,
    STAGED_ONLY_COLUMNS,
    STR,
    TS,
    child_schema,
    identifiers_schema,
    published_schema,
)
from pipelines.model_docs import OUTBOX_DOCS, OUTBOX_TABLE_DOCS
from pipelines.quarantine import resolve_quarantine
from pipelines.vocabulary import CHILD_TABLES, CROSSWALK_TABLE, ENTITIES, MODEL_SCHEMA, staged_table_name
from pipelines.vocabulary import STAGING_SCHEMA as STAGING_SCHEMA  # re-exported for assets/
from pipelines.vocabulary import SURFACES as SURFACES  # re-exported for assets/
from pipelines.warehouse import table_columns
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
    for child in CHILD_TABLES:
        _create_from_schema(con, f"{ms}.{child}", child_schema(child))
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
    # One surface record (its source id) is one row: a version staged under another key — it
    # arrived without its business identifier, or with a damaged one — is superseded by the
    # record's latest fetch. Landed page names start with their fetch time, so the newest
    # page wins in a live sync and in a replay alike.
    parts = [
        f"SELECT {_select_columns(con, staged_table_name(s, entity), columns)} "
        f"FROM {STAGING_SCHEMA}.{staged_table_name(s, entity)} WHERE connection_id = $conn "
        "QUALIFY source_id IS NULL OR row_number() OVER (PARTITION BY source_id "
        "ORDER BY regexp_extract(raw_ref, '[^/]*$') DESC NULLS LAST, ingested_at DESC) = 1"
        for s in surfaces
    ]
    return " UNION ALL ".join(parts)


def _select_columns(con: duckdb.DuckDBPyConnection, table: str, columns: list[str]) -> str:
    """The columns of a staged table in model order; one the table does not have yet (a
    column added to the model after the table was last loaded) reads as null."""
    present = set(table_columns(con, STAGING_SCHEMA, table))
    types = {f.name: f.type for f in pa.schema(LINEAGE + _ALL_STAGED_FIELDS)}
    return ", ".join(
        f'"{c}"' if c in present else f'CAST(NULL AS {_SQL_TYPE.get(types.get(c), "VARCHAR")}) AS "{c}"'
        for c in columns
    )


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
        + [c for c, _ in STAGED_ONLY_COLUMNS.get(entity, [])]
    )


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
    merged = _field_merge(
        "p", "patient_key", [c for c in _stage_columns("patients") if c not in _REF_COLUMNS]
    )
    out_cols = ", ".join(f'"{f.name}"' for f in published_schema("patients"))
    con.execute(
        f"""INSERT INTO {ms}.patients
        WITH p AS ({rows}), merged AS ({merged})
        SELECT {out_cols} FROM merged""",
        {"conn": connection_id},
    )
    return _count(con, f"{ms}.patients", connection_id)


_REF_COLUMNS = ("patient_ref_type", "patient_ref_value")
_EPOCH = "TIMESTAMPTZ '1970-01-01 00:00:00+00'"


def _field_merge(source: str, key: str, columns: list[str]) -> str:
    """One row per ``(connection_id, key)`` of ``source``, every column merged field by field:
    the value of the surface row with the newest source-own time (``source_updated_at``; FHIR
    on ties, then the later staging) among the rows where that column is not null — so a
    value is never replaced by a null, and every field either surface knows is kept.
    ``source_surface`` is ``both`` when more than one surface holds the record; ``source_id``
    is the id on the surface it was first seen through."""
    order = f"{{'t': coalesce(source_updated_at, {_EPOCH}), 'f': source_surface = 'fhir', 'i': ingested_at}}"
    picks = []
    for c in columns:
        if c in ("connection_id", key):
            continue
        if c == "source_surface":
            picks.append(
                "CASE WHEN count(DISTINCT source_surface) > 1 THEN 'both' ELSE min(source_surface) END AS source_surface"
            )
        elif c == "source_id":
            picks.append("arg_min(source_id, {'i': ingested_at, 'f': source_surface <> 'fhir'}) AS source_id")
        else:
            picks.append(f'arg_max("{c}", {order}) FILTER (WHERE "{c}" IS NOT NULL) AS "{c}"')
    return f"""SELECT connection_id, {key}, {", ".join(picks)}
            FROM {source} GROUP BY connection_id, {key}"""


def _staged_with_patient(con: duckdb.DuckDBPyConnection, entity: str, union: str) -> str:
    """Staged rows with their patient resolved through the crosswalk, reduced to each
    surface's latest version of each record (a surface's newer version replaces its older one
    whole; only across surfaces are fields merged)."""
    ms = model_schema(con)
    key = ENTITY_KEY[entity]
    return f"""SELECT s.* EXCLUDE (patient_ref_type, patient_ref_value), x.patient_key AS patient_key
        FROM ({union}) s
        LEFT JOIN {ms}.{CROSSWALK_TABLE} x
          ON x.connection_id = s.connection_id
         AND x.id_system = s.patient_ref_type
         AND x.id_value = s.patient_ref_value
        QUALIFY row_number() OVER (PARTITION BY s.connection_id, s.source_surface, s."{key}"
                                   ORDER BY s.source_updated_at DESC NULLS LAST, s.ingested_at DESC) = 1"""


# Visits and bookings share their visit number across surfaces, but a FHIR Encounter or
# Appointment that arrives without identifiers (an EHR's omission, or a defect) is known there
# only by its logical id: a lone FHIR record of a patient then pairs with the lone Data Model
# record of the same start instant, and takes the visit number (the business key) from it.
VISIT_MATCH = {
    "encounters": "strftime(l.start_at, '%Y-%m-%dT%H:%M:%S')",
    "appointments": "strftime(l.start_at, '%Y-%m-%dT%H:%M:%S')",
}


def _paired_keys(latest: str, key: str, match: str = "l.match_key") -> str:
    """Records that carry no business id both surfaces share (a Clinical Summary entry has
    no id at all) are paired on (patient, ``match``, by default the staged ``match_key``):
    among the records of a patient seen on one surface only, the n-th Data Model record
    takes the key of the n-th FHIR record with the same match (or, for visits, the other way
    round: see ``VISIT_MATCH``). Everything else keeps its own key."""
    return f"""WITH k AS (
            SELECT connection_id, "{key}" AS bk, count(DISTINCT source_surface) AS n
            FROM {latest} GROUP BY ALL),
        lone AS (
            SELECT l.connection_id, l.source_surface, l."{key}" AS bk, l.patient_key, {match} AS match_key,
                   row_number() OVER (PARTITION BY l.connection_id, l.source_surface, l.patient_key, {match}
                                      ORDER BY coalesce(l.source_updated_at, {_EPOCH}), l."{key}") AS nth
            FROM {latest} l JOIN k ON k.connection_id = l.connection_id AND k.bk = l."{key}"
            WHERE k.n = 1 AND {match} IS NOT NULL AND l.patient_key IS NOT NULL)
        SELECT d.connection_id, d.bk AS dm_key, f.bk AS fhir_key
        FROM lone d JOIN lone f
          ON f.connection_id = d.connection_id AND f.patient_key = d.patient_key
         AND f.match_key = d.match_key AND f.nth = d.nth
        WHERE d.source_surface = 'datamodel' AND f.source_surface = 'fhir'"""


def _merged_entity_sql(con: duckdb.DuckDBPyConnection, entity: str) -> str | None:
    """Every staged column of ``entity`` (staged-only ones included), one row per record."""
    columns = _stage_columns(entity)
    union = _staged_union(con, entity, columns)
    if union is None:
        return None
    key = ENTITY_KEY[entity]
    latest = _staged_with_patient(con, entity, union)
    merge_columns = [c for c in columns if c not in _REF_COLUMNS] + ["patient_key"]
    if "match_key" in columns:
        keyed = f"""SELECT l.* REPLACE (coalesce(p.fhir_key, l."{key}") AS "{key}")
            FROM latest l LEFT JOIN pairs p
              ON l.source_surface = 'datamodel' AND p.connection_id = l.connection_id AND p.dm_key = l."{key}" """
        return f"""WITH latest AS ({latest}), pairs AS ({_paired_keys("latest", key)}), keyed AS ({keyed})
            {_field_merge("keyed", f'"{key}"', merge_columns)}"""
    if entity in VISIT_MATCH:
        keyed = f"""SELECT l.* REPLACE (coalesce(p.dm_key, l."{key}") AS "{key}")
            FROM latest l LEFT JOIN pairs p
              ON l.source_surface = 'fhir' AND p.connection_id = l.connection_id AND p.fhir_key = l."{key}" """
        pairs = _paired_keys("latest", key, VISIT_MATCH[entity])
        return f"""WITH latest AS ({latest}), pairs AS ({pairs}), keyed AS ({keyed})
            {_field_merge("keyed", f'"{key}"', merge_columns)}"""
    if entity == "medications":
        keyed = f"""SELECT l.* REPLACE (coalesce(p.order_key, l."{key}") AS "{key}")
            FROM latest l LEFT JOIN pairs p
              ON l.source_surface = 'datamodel' AND l.kind = 'statement'
             AND p.connection_id = l.connection_id AND p.summary_key = l."{key}" """
        return f"""WITH latest AS ({latest}), pairs AS ({_summary_medication_orders("latest", key)}),
            keyed AS ({keyed}) {_field_merge("keyed", f'"{key}"', merge_columns)}"""
    return f"WITH latest AS ({latest}) {_field_merge('latest', f'{chr(34)}{key}{chr(34)}', merge_columns)}"


def _summary_medication_orders(latest: str, key: str) -> str:
    """A Clinical Summary medication (the Data Model's ``Medications[]`` carry no id: staged as a
    ``statement`` with a derived id) is the same medication as a record with an id — a
    Medications event's ``Order.ID``, a FHIR MedicationRequest / MedicationStatement — of the
    same patient, drug code and start time (to the second): it takes that record's key, so the
    drug a patient was ordered once is one row, whichever surfaces and events showed it."""
    return f"""SELECT s.connection_id, s."{key}" AS summary_key, min(o."{key}") AS order_key
        FROM {latest} s JOIN {latest} o
          ON o.connection_id = s.connection_id AND o.patient_key = s.patient_key
         AND o.code = s.code AND o.start_at = s.start_at
         AND NOT (o.source_surface = 'datamodel' AND o.kind = 'statement')
        WHERE s.source_surface = 'datamodel' AND s.kind = 'statement'
        GROUP BY ALL"""


def _publish_entity(con: duckdb.DuckDBPyConnection, connection_id: str, entity: str) -> int:
    ms = model_schema(con)
    con.execute(f"DELETE FROM {ms}.{entity} WHERE connection_id = $conn", {"conn": connection_id})
    for child, parent in CHILD_TABLES.items():
        if parent == entity:
            con.execute(f"DELETE FROM {ms}.{child} WHERE connection_id = $conn", {"conn": connection_id})
    merged = _merged_entity_sql(con, entity)
    if merged is None:
        return 0
    out_cols = ", ".join(f'"{f.name}"' for f in published_schema(entity))
    con.execute("DROP TABLE IF EXISTS _publish_merged")
    con.execute(f"CREATE TEMP TABLE _publish_merged AS {merged}", {"conn": connection_id})
    try:
        con.execute(f"INSERT INTO {ms}.{entity} SELECT {out_cols} FROM _publish_merged")
        if entity == "results":
            _publish_components(con, ms)
        elif entity == "diagnostic_reports":
            _publish_report_results(con, ms, connection_id)
    finally:
        con.execute("DROP TABLE IF EXISTS _publish_merged")
    return _count(con, f"{ms}.{entity}", connection_id)


def _publish_components(con: duckdb.DuckDBPyConnection, ms: str) -> None:
    """``redox.result_components``: the merged results' ``components`` JSON, one row each."""
    fields = ", ".join(
        f"CAST(c.value ->> '{f}' AS {_SQL_TYPE[t]}) AS \"{f}\""
        for f, t in CHILD_COLUMNS["result_components"][4:]
    )
    con.execute(
        f"""INSERT INTO {ms}.result_components
        SELECT r.connection_id, r.patient_key, r.result_id, CAST(c.key AS INTEGER) AS position, {fields}
        FROM _publish_merged r, json_each(r.components) c
        WHERE r.components IS NOT NULL"""
    )


def _publish_report_results(con: duckdb.DuckDBPyConnection, ms: str, connection_id: str) -> None:
    """``redox.diagnostic_report_results``: the results each merged report groups. A FHIR
    report names Observations by logical id, resolved to their result ids through the staged
    FHIR results; a Data Model report names result ids already."""
    fhir_results = f"{STAGING_SCHEMA}.{staged_table_name('fhir', 'results')}"
    has_fhir = "fhir" in _existing_staged(con, "results")
    resolve = (
        f"""LEFT JOIN (SELECT DISTINCT source_id, arg_max(result_id, ingested_at) AS result_id
                       FROM {fhir_results} WHERE connection_id = $conn GROUP BY source_id) o
              ON o.source_id = (c.value ->> '$')"""
        if has_fhir
        else ""
    )
    result_id = "coalesce(o.result_id, c.value ->> '$')" if has_fhir else "c.value ->> '$'"
    params = {"conn": connection_id} if has_fhir else {}
    con.execute(
        f"""INSERT INTO {ms}.diagnostic_report_results
        SELECT DISTINCT ON (r.connection_id, r.report_id, position) r.connection_id, r.patient_key,
               r.report_id, CAST(c.key AS INTEGER) AS position, {result_id} AS result_id
        FROM _publish_merged r, json_each(r.result_refs) c
        {resolve}
        WHERE r.result_refs IS NOT NULL""",
        params,
    )


_SQL_TYPE = {
    STR: "VARCHAR",
    F64: "DOUBLE",
    TS: "TIMESTAMPTZ",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN",
    pa.date32(): "DATE",
}
_ALL_STAGED_FIELDS = [
    *PATIENT_REF,
    *(f for cols in ENTITY_COLUMNS.values() for f in cols),
    *(f for cols in STAGED_ONLY_COLUMNS.values() for f in cols),
]
