"""The warehouse describes itself: every model and analytics column has a doc, the DuckDB
COMMENTs carry it (written only when they change), and warehouse/README.md's column tables are
generated from the same source and up to date. No sandbox: an empty warehouse suffices."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from pipelines.analytics import ANALYTICS_VIEWS, ensure_analytics_views, relation_columns
from pipelines.describe import describe_schema
from pipelines.docs_readme import README, child_columns, render
from pipelines.model import ENTITY_COLUMNS, identifiers_schema, published_schema
from pipelines.model_docs import COLUMN_DOCS, TABLE_DOCS, column_doc
from pipelines.publish import ensure_model_tables, model_schema
from pipelines.vocabulary import CROSSWALK_TABLE


def _model_relations() -> dict[str, list[str]]:
    out = {e: published_schema(e).names for e in ENTITY_COLUMNS}
    out |= {t: [c for c, _ in cols] for t, cols in child_columns().items()}
    out[CROSSWALK_TABLE] = identifiers_schema().names
    out["persons"] = [c for c, _ in relation_columns()["persons"]]
    out |= {v: [c for c, _ in relation_columns()[v]] for v in ANALYTICS_VIEWS}
    return out


def test_every_model_and_analytics_column_has_a_doc() -> None:
    missing = [f"{t}.{c}" for t, cols in _model_relations().items() for c in cols if column_doc(t, c) is None]
    assert not missing, f"columns without a doc in pipelines/model_docs.py: {missing}"
    assert not [t for t in _model_relations() if not TABLE_DOCS.get(t)], "tables without a TABLE_DOCS entry"


def test_no_doc_describes_a_column_that_does_not_exist() -> None:
    relations = _model_relations()
    stale = [
        f"{t}.{c}" for t, cols in COLUMN_DOCS.items() if t in relations for c in cols if c not in relations[t]
    ]
    assert not stale, f"docs of columns no table has: {stale}"


def test_warehouse_readme_column_tables_are_generated_and_fresh() -> None:
    text = README.read_text(encoding="utf-8")
    assert render(text) == text, "warehouse/README.md is stale: run python -m pipelines.docs_readme"
    for view in ANALYTICS_VIEWS:
        assert f"### analytics.{view}" in text


@pytest.mark.parametrize("file_name", ["w.duckdb", "redox.duckdb"])
def test_comments_on_every_column_written_once(tmp_path: Path, file_name: str) -> None:
    with duckdb.connect(str(tmp_path / file_name)) as con:
        ensure_model_tables(con)
        ms = model_schema(con)
        undescribed = con.execute(
            "SELECT schema_name || '.' || table_name || '.' || column_name FROM duckdb_columns() "
            "WHERE comment IS NULL AND ((schema_name = ? AND table_name IN (SELECT unnest(?))) "
            "OR schema_name = 'analytics')",
            [ms, [*ENTITY_COLUMNS, CROSSWALK_TABLE, "persons"]],
        ).fetchall()
        described = con.execute(
            "SELECT count(*) FROM duckdb_columns() WHERE schema_name IN (?, 'analytics') AND comment IS NOT NULL",
            [ms],
        ).fetchall()[0][0]
        assert described > 200
        assert not undescribed, f"columns without a COMMENT: {undescribed}"
        comment = con.execute(
            "SELECT comment FROM duckdb_columns() WHERE schema_name = ? AND table_name = 'results' "
            "AND column_name = 'abnormal_flag'",
            [ms],
        ).fetchall()[0][0]
        assert (
            "FHIR: Observation.interpretation" in comment and "Data Model: Results[].AbnormalFlag" in comment
        )
        table_comment = con.execute(
            "SELECT comment FROM duckdb_views() WHERE schema_name = 'analytics' AND view_name = 'care_gaps'"
        ).fetchall()[0][0]
        assert table_comment.startswith(TABLE_DOCS["care_gaps"])
        for view in ANALYTICS_VIEWS:  # the views bind in either layout (schema redox, or main)
            assert con.execute(f"select count(*) from analytics.{view}").fetchall() == [(0,)]
        # Idempotent and cheap: a second publish writes no comment and recreates no view.
        assert describe_schema(con, ms) == 0
        assert ensure_analytics_views(con, ms) == []


def test_outbox_tables_are_documented_column_by_column(tmp_path: Path) -> None:
    """outbox.appointments shares a name with the model's appointments: its columns carry their
    own docs (pipelines/model_docs.py OUTBOX_DOCS), and every column of a table named like a model
    entity, in any schema but raw, has a comment."""
    from pipelines.model_docs import OUTBOX_DOCS

    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        ensure_model_tables(con)
        outbox = {
            t: [
                c
                for (c,) in con.execute(
                    f"select column_name from duckdb_columns() where schema_name = 'outbox' and table_name = '{t}'"
                ).fetchall()
            ]
            for t in ("orders", "appointments")
        }
        assert {t: sorted(cols) for t, cols in outbox.items()} == {
            t: sorted(d) for t, d in OUTBOX_DOCS.items()
        }
        missing = con.execute(
            "select schema_name || '.' || table_name || '.' || column_name from duckdb_columns() "
            "where table_name in ('patients','encounters','results','medications','appointments','documents','orders') "
            "and schema_name <> 'raw' and comment is null"
        ).fetchall()
        assert not missing
        comment = con.execute(
            "select comment from duckdb_columns() where schema_name = 'outbox' and table_name = 'appointments' "
            "and column_name = 'status'"
        ).fetchall()[0][0]
        assert comment.startswith("pending -> sending")
