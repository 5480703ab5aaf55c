"""Analytics views over the common model (see ``views.py`` for the SQL and the question each
answers). ``ensure_analytics_views`` creates or updates them in schema ``analytics`` at every
publish: a view whose definition is unchanged is left alone (its comment carries a
fingerprint of the definition), so refreshing is free when nothing changed."""

from __future__ import annotations

import hashlib
from functools import cache

import duckdb

from pipelines.analytics.views import ANALYTICS_VIEWS, BUILDERS, VIEW_QUESTIONS, Inputs, read_inputs
from pipelines.describe import describe_schema, quote_literal

ANALYTICS_SCHEMA = "analytics"

__all__ = [
    "ANALYTICS_SCHEMA",
    "ANALYTICS_VIEWS",
    "analytics_schema",
    "ensure_analytics_views",
    "relation_columns",
    "view_sql",
]


def analytics_schema(con: duckdb.DuckDBPyConnection) -> str:
    """``analytics``, unless the file itself is named analytics.duckdb (DuckDB 2.0 refuses a
    schema named like its catalog): then ``main``."""
    catalog = con.execute("SELECT current_database()").fetchone()[0]
    return "main" if catalog == ANALYTICS_SCHEMA else ANALYTICS_SCHEMA


def view_sql(name: str, inputs: Inputs) -> str:
    return BUILDERS[name](inputs).strip()


def _fingerprint(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()[:16]


def _comment(name: str, sql: str) -> str:
    return f"{VIEW_QUESTIONS[name]} [definition {_fingerprint(sql)}]"


def ensure_analytics_views(con: duckdb.DuckDBPyConnection, model_schema: str) -> list[str]:
    """Create or update every analytics view over ``model_schema`` (which must hold the model
    tables and ``persons``); returns the names of the views (re)created."""
    schema = analytics_schema(con)
    if schema != "main":
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    inputs = read_inputs(con, model_schema)
    current = dict(
        con.execute(
            "SELECT view_name, comment FROM duckdb_views() WHERE database_name = current_database() "
            "AND schema_name = ?",
            [schema],
        ).fetchall()
    )
    changed: list[str] = []
    for name in ANALYTICS_VIEWS:
        sql = view_sql(name, inputs)
        comment = _comment(name, sql)
        if current.get(name) == comment:
            continue
        con.execute(f"CREATE OR REPLACE VIEW {schema}.{name} AS {sql}")
        con.execute(f"COMMENT ON VIEW {schema}.{name} IS {quote_literal(comment)}")
        changed.append(name)
    if changed:
        describe_schema(con, schema, set(changed))
    return changed


@cache
def relation_columns() -> dict[str, list[tuple[str, str]]]:
    """(column, DuckDB type) of the persons view, the analytics views and the panel, read
    from an empty in-memory warehouse built with the warehouse's own DDL (once per process)."""
    from pipelines.panel import create_tables as create_panel_tables
    from pipelines.publish import ensure_model_tables  # publish imports this package

    con = duckdb.connect(":memory:")
    try:
        con.execute("CREATE SCHEMA IF NOT EXISTS ops")
        create_panel_tables(con)
        ensure_model_tables(con)
        out: dict[str, list[tuple[str, str]]] = {}
        for schema, name in [("redox", "persons"), ("ops", "patient_panel")] + [
            (ANALYTICS_SCHEMA, v) for v in ANALYTICS_VIEWS
        ]:
            rows = con.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
                [schema, name],
            ).fetchall()
            out[name] = [(c, t.lower()) for c, t in rows]
        return out
    finally:
        con.close()
