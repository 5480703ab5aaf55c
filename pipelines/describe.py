"""DuckDB ``COMMENT``s on every table, view and column of the common model and the analytics
views, from the one documentation source (``pipelines/model_docs.py``).

Applied at every publish (``ensure_model_tables``): the current comments are read in two
queries and only those that differ are written, so an unchanged warehouse costs no catalog
write and a changed doc reaches existing warehouses on their next sync.
"""

from __future__ import annotations

import duckdb

from pipelines.model_docs import COLUMN_DOCS, TABLE_DOCS, ColumnDoc, column_comment, column_doc


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def describe_schema(
    con: duckdb.DuckDBPyConnection,
    schema: str,
    tables: set[str] | None = None,
    docs: dict[str, dict[str, ColumnDoc]] | None = None,
    table_docs: dict[str, str] | None = None,
) -> int:
    """Comment every documented table (or view) of ``schema`` in the current catalog and its
    documented columns; ``tables`` limits which. ``docs`` / ``table_docs`` replace the common
    model's (``COLUMN_DOCS``, with the lineage columns, and ``TABLE_DOCS``) for another schema's
    tables. Returns how many comments were written."""
    table_docs = TABLE_DOCS if table_docs is None else table_docs

    def lookup(table: str, column: str) -> ColumnDoc | None:
        return column_doc(table, column) if docs is None else docs.get(table, {}).get(column)

    documented = set(COLUMN_DOCS if docs is None else docs)
    wanted = documented if tables is None else tables & documented
    current_tables = {
        name: comment
        for name, comment in con.execute(
            "SELECT table_name, comment FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = ? UNION ALL SELECT view_name, comment FROM duckdb_views() "
            "WHERE database_name = current_database() AND schema_name = ?",
            [schema, schema],
        ).fetchall()
        if name in wanted
    }
    kinds = dict(
        con.execute(
            "SELECT table_name, table_type FROM information_schema.tables "
            "WHERE table_catalog = current_database() AND table_schema = ?",
            [schema],
        ).fetchall()
    )
    statements: list[str] = []
    for table, comment in current_tables.items():
        target = f"{quote_ident(schema)}.{quote_ident(table)}"
        doc = table_docs.get(table)
        # An analytics view's comment is its question plus a definition fingerprint.
        if doc and not (comment or "").startswith(doc):
            kind = "VIEW" if kinds.get(table) == "VIEW" else "TABLE"
            statements.append(f"COMMENT ON {kind} {target} IS {quote_literal(doc)}")
    for table, column, comment in con.execute(
        "SELECT table_name, column_name, comment FROM duckdb_columns() "
        "WHERE database_name = current_database() AND schema_name = ?",
        [schema],
    ).fetchall():
        if table not in current_tables:
            continue
        doc = lookup(table, column)
        if doc is None:
            continue
        text = column_comment(doc)
        if comment != text:
            target = f"{quote_ident(schema)}.{quote_ident(table)}.{quote_ident(column)}"
            statements.append(f"COMMENT ON COLUMN {target} IS {quote_literal(text)}")
    for statement in statements:
        con.execute(statement)
    return len(statements)
