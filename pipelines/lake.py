"""The Parquet lake: the published common model mirrored as hive-partitioned Parquet,
``lake/redox/<entity>/connection=<id>/data_0.parquet``, readable by DuckDB with
``read_parquet('lake/redox/results/*/*.parquet', hive_partitioning = true)``.

The staged tables stay in the DuckDB file (dlt merges there; merge on plain Parquet
would fall back to append), and each export rewrites whole connection partitions, so
re-running never duplicates a row.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb

from pipelines.landing import DIR_MODE, FILE_MODE, UnsafePath, private_dirs, safe_path
from pipelines.publish import model_schema
from pipelines.vocabulary import (
    CHILD_TABLES,
    CROSSWALK_TABLE,
    ENTITIES,
    MODEL_SCHEMA,
    QUARANTINE_TABLE,
    STAGING_SCHEMA,
    is_plain_connection_id,
)
from pipelines.warehouse import WarehousePaths

LAKE_TABLES = tuple(f"{MODEL_SCHEMA}.{t}" for t in (*ENTITIES, *CHILD_TABLES, CROSSWALK_TABLE)) + (
    f"{STAGING_SCHEMA}.{QUARANTINE_TABLE}",
)


def _physical(con: duckdb.DuckDBPyConnection, table: str) -> str:
    schema, name = table.split(".")
    return f"{model_schema(con)}.{name}" if schema == MODEL_SCHEMA else table


def export_lake(paths: WarehousePaths, tables: tuple[str, ...] = LAKE_TABLES) -> dict[str, int]:
    """Rewrite every table's partitions from ``redox.*``. Returns rows written per table."""
    written: dict[str, int] = {}
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        existing = {
            f"{s}.{t}"
            for s, t in con.execute(
                "SELECT table_schema, table_name FROM information_schema.tables"
            ).fetchall()
        }
        for table in tables:
            if _physical(con, table) not in existing:
                continue
            schema, name = table.split(".")
            target = safe_path(paths.lake_root, schema, name)
            tmp = target.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            private_dirs(tmp)
            source = _physical(con, table)
            _check_partition_values(con, source)
            n = con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]
            if n:
                con.execute(
                    f"COPY (SELECT *, connection_id AS connection FROM {source}) TO '{tmp}' "
                    "(FORMAT parquet, PARTITION_BY (connection), COMPRESSION zstd)"
                )
            _owner_only(tmp)
            _swap(tmp, target)
            written[table] = n
    return written


def _check_partition_values(con: duckdb.DuckDBPyConnection, source: str) -> None:
    """Connection ids become folder names (``connection=<id>``): refuse one that is not a plain name."""
    for (cid,) in con.execute(f"SELECT DISTINCT connection_id FROM {source}").fetchall():
        if not is_plain_connection_id(cid):
            raise UnsafePath(f"a connection id in {source} is not a plain name; it cannot be a lake folder")


def _owner_only(folder: Path) -> None:
    """The lake holds PHI: its folders and files are the owner's only."""
    os.chmod(folder, DIR_MODE)
    for path in folder.rglob("*"):
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def _swap(new: Path, target: Path) -> None:
    """Replace ``target`` with ``new``: readers see the old or the new table, never a mix."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
