"""One conformance suite for every (surface, entity) stream: the same assertions run
against the FHIR source and the Data Model source."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from datetime import timedelta

import duckdb
import pytest

from pipelines.landing import RawLanding
from pipelines.model import ENTITIES, ROW_EXTRAS, rows_to_table, staged_schema, unknown_keys
from pipelines.page_reader import read_page
from pipelines.resource_hints import staged_key, staged_table_name
from pipelines.sync import run_sync
from pipelines.sync_context import SyncWindow
from pipelines.warehouse import WarehousePaths
from resources.onboarding import connect_sandbox
from resources.settings import load_settings
from sandbox.population.store import Query
from sandbox.server import SandboxServer
from tests.conftest import import_rosters, sandbox_config

# The connection that speaks only this surface.
SURFACE_CONNECTION = {"fhir": "northwind-fhir", "datamodel": "lakeside-dm"}
STREAMS = [(s, e) for s in SURFACE_CONNECTION for e in ENTITIES]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("REDOX_ELT_HOME", "REDOX_ELT_MASTER_KEY")}
    os.environ.update(REDOX_ELT_HOME=str(home), REDOX_ELT_MASTER_KEY="conformance-key")
    server = SandboxServer(sandbox_config(patients=80, seed=3)).start()
    try:
        settings = load_settings(connect_sandbox(server.url, home / "c.yaml"))
        settings = dataclasses.replace(
            settings, connections=tuple(dataclasses.replace(c, max_rps=200.0) for c in settings.connections)
        )
        paths = WarehousePaths.at(tmp_path_factory.mktemp("wh") / "redox.duckdb")
        import_rosters(server.url, settings, paths.duckdb, tmp_path_factory.mktemp("rosters"))
        ids = list(SURFACE_CONNECTION.values())
        assert run_sync(settings, paths, connection_ids=ids).ok
        before = _staged_counts(paths)
        assert run_sync(settings, paths, connection_ids=ids).ok  # the re-run
        yield {"server": server, "settings": settings, "paths": paths, "before_rerun": before}
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _staged_counts(paths: WarehousePaths) -> dict[str, int]:
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        tables = [
            r[0]
            for r in con.execute(
                "select table_name from information_schema.tables where table_schema = 'raw'"
            ).fetchall()
        ]
        return {
            t: con.execute(f"select count(*) from raw.{t}").fetchone()[0]
            for t in tables
            if not t.startswith("_")
        }


@pytest.mark.parametrize(("surface", "entity"), STREAMS)
def test_staged_schema_is_the_common_model(world: dict, surface: str, entity: str) -> None:
    with duckdb.connect(str(world["paths"].duckdb), read_only=True) as con:
        cols = {
            name: dtype
            for name, dtype in con.execute(
                "select column_name, data_type from information_schema.columns where table_schema='raw' and table_name=?",
                [staged_table_name(surface, entity)],
            ).fetchall()
        }
    want = staged_schema(entity)
    missing = [f.name for f in want if f.name not in cols]
    assert not missing, missing
    extra = [c for c in cols if c not in want.names and not c.startswith("_dlt")]
    assert not extra, f"staged columns the common model does not define: {extra}"
    for f in want:
        if str(f.type).startswith("timestamp"):
            assert cols[f.name].startswith("TIMESTAMP"), (f.name, cols[f.name])
        elif str(f.type) == "double":
            assert cols[f.name] == "DOUBLE", f.name


@pytest.mark.parametrize(("surface", "entity"), STREAMS)
def test_every_record_matches_the_staged_schema(world: dict, surface: str, entity: str) -> None:
    """Record versus schema: every record the page-to-rows functions give for this stream
    (replayed from the landing) has only staged columns or documented side channels, and
    its values fit the column types. A misspelled key fails here instead of vanishing."""
    conn = SURFACE_CONNECTION[surface]
    landing = RawLanding(world["paths"].landing_root)
    records = []
    for page in landing.pages(conn, surface):
        context = landing.context(page.raw_ref)
        rows = read_page(surface, landing.read(page.raw_ref), conn, page.raw_ref, page.entity, context)
        records.extend(rows.rows[entity])
    assert records, f"no {surface} {entity} record in the landing"
    schema = staged_schema(entity)
    strays = {k for r in records for k in unknown_keys(r, schema) if k not in ROW_EXTRAS}
    assert not strays, f"record keys outside the staged schema: {sorted(strays)}"
    table = rows_to_table([{k: v for k, v in r.items() if k not in ROW_EXTRAS} for r in records], schema)
    assert table.num_rows == len(records)
    for column in ("connection_id", "source_surface", "source_id", "raw_ref", "patient_ref_value"):
        assert table.column(column).null_count == 0, f"{column} is null in some {surface} {entity} record"


@pytest.mark.parametrize(("surface", "entity"), STREAMS)
def test_keys_are_unique_per_connection(world: dict, surface: str, entity: str) -> None:
    key = ", ".join(staged_key(entity))
    with duckdb.connect(str(world["paths"].duckdb), read_only=True) as con:
        table = f"raw.{staged_table_name(surface, entity)}"
        n, distinct = con.execute(f"select count(*), count(distinct ({key})) from {table}").fetchone()
    assert n > 0 and n == distinct


@pytest.mark.parametrize(("surface", "entity"), STREAMS)
def test_rerun_loads_zero_new_rows(world: dict, surface: str, entity: str) -> None:
    table = staged_table_name(surface, entity)
    assert _staged_counts(world["paths"])[table] == world["before_rerun"][table]


@pytest.mark.parametrize(("surface", "entity"), STREAMS)
def test_every_source_record_is_staged(world: dict, surface: str, entity: str) -> None:
    conn = SURFACE_CONNECTION[surface]
    want = world["server"].state.store.count(Query(conn, entity))
    with duckdb.connect(str(world["paths"].duckdb), read_only=True) as con:
        got = con.execute(
            f"select count(*) from raw.{staged_table_name(surface, entity)} where connection_id = ?", [conn]
        ).fetchone()[0]
    assert got == want


@pytest.mark.parametrize("connection_id", list(SURFACE_CONNECTION.values()))
def test_backfill_window_re_pulls_the_panel_patients_active_in_it(world: dict, connection_id: str) -> None:
    """A backfill of a window re-pulls, whole, the panel patients with activity in it: some,
    not all; every one pulled; the staged tables merge the same rows (nothing duplicated)."""
    store = world["server"].state.store
    end = store.now - timedelta(days=20)
    start = end - timedelta(days=90)
    before = _staged_counts(world["paths"])
    with duckdb.connect(str(world["paths"].duckdb), read_only=True) as con:
        panel = con.execute(
            "select count(*) from ops.patient_panel where connection_id = ?", [connection_id]
        ).fetchone()[0]
    report = run_sync(
        world["settings"], world["paths"], connection_ids=[connection_id], window=SyncWindow(start, end)
    )
    assert report.ok, report.failures
    stats = report.connections[0].access
    assert 0 < stats.due < panel and stats.pulled == stats.due and stats.deferred == 0
    assert _staged_counts(world["paths"]) == before
