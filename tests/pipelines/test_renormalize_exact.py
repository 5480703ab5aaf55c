"""``redox-elt renormalize`` rebuilds exactly what the live sync (the patient panel path:
rosters imported, discovery, per-patient pulls, then a ``--full`` re-pull after the sandbox
changed) built, for every connection kind (FHIR-only, Data-Model-only, both surfaces, clinical network), from the
landing alone: every ``raw.*`` and ``redox.*`` table has the same rows (count and a
content hash that leaves out load times and raw_ref, as the acceptance check does), and
the audit trail records no new API call."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest

from pipelines.renormalize import renormalize
from pipelines.sync import run_sync
from pipelines.warehouse import WarehousePaths
from resources.onboarding import connect_sandbox
from resources.settings import load_settings
from sandbox.server import SandboxServer
from tests.conftest import import_rosters, sandbox_config

# Columns that legitimately change between a load and its replay (the acceptance check's list).
VOLATILE = (
    "loaded_at",
    "staged_at",
    "published_at",
    "raw_ref",
    "fetched_at",
    "ingested_at",
    "first_seen_at",
    "last_seen_at",
)


def fingerprint(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, int]]:
    tables = con.execute(
        "select table_schema, table_name from information_schema.tables "
        "where table_type = 'BASE TABLE' and table_schema not in ('ops', 'audit') "
        "and table_name not like '\\_dlt%' escape '\\' and table_schema not like '%staging%'"
    ).fetchall()
    out = {}
    for schema, table in tables:
        cols = [
            r[0]
            for r in con.execute(
                "select column_name from information_schema.columns where table_schema = ? and table_name = ? "
                "and column_name not like '\\_dlt%' escape '\\' order by 1",
                [schema, table],
            ).fetchall()
            if r[0] not in VOLATILE
        ]
        if cols:
            expr = "hash(" + ", ".join(f'"{c}"' for c in cols) + ")"
            out[f"{schema}.{table}"] = con.execute(
                f'select count(*), coalesce(sum({expr} % 1000000007), 0) from "{schema}"."{table}"'
            ).fetchone()
    return out


def audit_rows(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("select count(*) from audit.api_calls").fetchone()[0]


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WarehousePaths, list[str]]]:
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("REDOX_ELT_HOME", "REDOX_ELT_MASTER_KEY")}
    os.environ.update(REDOX_ELT_HOME=str(home), REDOX_ELT_MASTER_KEY="renormalize-key")
    server = SandboxServer(sandbox_config(patients=200, seed=5)).start()
    try:
        settings = load_settings(connect_sandbox(server.url, home / "c.yaml"))
        settings = dataclasses.replace(
            settings, connections=tuple(dataclasses.replace(c, max_rps=200.0) for c in settings.connections)
        )
        paths = WarehousePaths.at(tmp_path_factory.mktemp("wh") / "redox.duckdb")
        # The panel path as a user runs it: rosters imported, a sync, then after the sandbox
        # moved on a --full re-pull (a second version of changed records lands).
        import_rosters(server.url, settings, paths.duckdb, tmp_path_factory.mktemp("rosters"))
        report = run_sync(settings, paths)
        assert report.ok, [c.error for c in report.connections if c.error]
        httpx.post(f"{server.url}/_sandbox/advance", json={"days": 1, "change_fraction": 0.02}, timeout=60)
        report = run_sync(settings, paths, full=True)
        assert report.ok, [c.error for c in report.connections if c.error]
        yield paths, [c.id for c in settings.connections]
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_renormalize_reproduces_every_table_of_all_four_connections(
    synced: tuple[WarehousePaths, list[str]],
) -> None:
    paths, connection_ids = synced
    assert len(connection_ids) == 4
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        before = fingerprint(con)
        calls_before = audit_rows(con)
        kinds = {
            cid for (cid,) in con.execute("select distinct connection_id from redox.patients").fetchall()
        }
    assert kinds == set(connection_ids), "every connection kind must have loaded patients"
    # The tables the issue names: the Data-Model-only connection's staged patients among them.
    for table in (
        "raw.datamodel_patients",
        "raw.datamodel_encounters",
        "raw.datamodel_results",
        "raw.datamodel_medications",
        "raw.datamodel_documents",
        "raw.fhir_documents",
        # In a file named redox.duckdb the model lives in schema main (warehouse/README.md).
        "main.documents",
        "main.patient_identifiers",
    ):
        assert before.get(table, (0, 0))[0] > 0, f"{table} is empty after the sync"
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        # Document contents (FHIR attachments and network DocumentGet answers) are re-attached.
        with_content = dict(
            con.execute(
                "select source_surface, count(*) from raw.datamodel_documents where content_sha256 is not null "
                "group by 1 union all select source_surface, count(*) from raw.fhir_documents "
                "where content_sha256 is not null group by 1"
            ).fetchall()
        )
    assert with_content.get("fhir", 0) > 0 and with_content.get("datamodel", 0) > 0
    # A clean sandbox serves nothing worth quarantining: every record loaded.
    assert before.get("raw.quarantine", (0, 0))[0] == 0, "a clean sync quarantined records"
    audit_lines = paths.audit_log.read_bytes()

    renormalize(paths)

    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        after = fingerprint(con)
        assert audit_rows(con) == calls_before
    assert paths.audit_log.read_bytes() == audit_lines, "renormalize must not call the API"
    changed = {t: (before[t], after.get(t)) for t in before if before[t] != after.get(t)}
    assert not changed, f"renormalize changed tables (rows, hash) before -> after: {changed}"
    assert set(after) == set(before)


@pytest.mark.slow
def test_landing_uses_the_responses_folder_with_context(synced: tuple[WarehousePaths, list[str]]) -> None:
    paths, _ = synced
    root: Path = paths.landing_root
    assert (root / "responses").is_dir()
    assert not (root / "raw").exists(), "the landing folder is no longer named like the raw schema"
    contexts = list((root / "responses").rglob("*.context.json"))
    assert contexts, "Data Model pages carry their context"
    # A DocumentGet answer of the network connection records the query it completes.
    assert any(b'"completes"' in p.read_bytes() for p in contexts)
