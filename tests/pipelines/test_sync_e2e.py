"""End to end: a real sandbox, the real client and dlt pipeline, a real DuckDB warehouse —
compared with the sandbox's own truth."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import duckdb
import httpx
import pytest

from pipelines.model import ENTITIES, ENTITY_KEY
from pipelines.publish import model_schema
from pipelines.renormalize import renormalize
from pipelines.sync import run_sync
from pipelines.sync_context import SyncWindow
from pipelines.warehouse import WarehousePaths
from resources.onboarding import connect_sandbox
from resources.settings import Settings, load_settings
from sandbox.population.store import Query
from sandbox.server import SandboxServer
from tests.conftest import import_rosters, sandbox_config

EHR = ("northwind-fhir", "lakeside-dm", "riverbend-both")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("REDOX_ELT_HOME", "REDOX_ELT_MASTER_KEY")}
    os.environ["REDOX_ELT_HOME"] = str(home)
    os.environ["REDOX_ELT_MASTER_KEY"] = "e2e-master-key"
    server = SandboxServer(sandbox_config(patients=120, seed=11)).start()
    try:
        cfg = connect_sandbox(server.url, home / "connections.yaml")
        yield {"server": server, "settings": fast(load_settings(cfg)), "home": home, "config": cfg}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fast(settings: Settings) -> Settings:
    """The sandbox takes 7,500 requests per 5 minutes; start the client's pacing there."""
    conns = tuple(dataclasses.replace(c, max_rps=200.0) for c in settings.connections)
    return dataclasses.replace(settings, connections=conns)


def truth(server: SandboxServer) -> dict:
    return httpx.get(f"{server.url}/_sandbox/truth", params={"persons": "false"}, timeout=60).json()


def warehouse_counts(paths: WarehousePaths) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(dict)
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        for e in ENTITIES:
            for conn, n in con.execute(
                f"select connection_id, count(*) from redox.{e} group by 1"
            ).fetchall():
                out[conn][e] = n
    return out


def assert_equals_truth(server: SandboxServer, paths: WarehousePaths, connections=EHR) -> None:
    want = truth(server)["counts"]
    got = warehouse_counts(paths)
    diffs = {
        (c, e): (got.get(c, {}).get(e, 0), n)
        for c in connections
        for e, n in want[c].items()
        if got.get(c, {}).get(e, 0) != n
    }
    assert not diffs, f"warehouse != truth (got, want): {diffs}"


def with_rosters(env: dict, paths: WarehousePaths) -> WarehousePaths:
    """The warehouse with every EHR connection's roster imported (as a user does)."""
    import_rosters(env["server"].url, env["settings"], paths.duckdb, paths.duckdb.parent / "rosters")
    return paths


@pytest.fixture(scope="module")
def synced(env: dict, tmp_path_factory: pytest.TempPathFactory) -> WarehousePaths:
    paths = with_rosters(env, WarehousePaths.at(tmp_path_factory.mktemp("wh") / "redox.duckdb"))
    report = run_sync(env["settings"], paths, connection_ids=list(EHR))
    assert report.ok, [c.error for c in report.connections]
    return paths


def test_full_sync_equals_truth_for_every_ehr_connection(env: dict, synced: WarehousePaths) -> None:
    assert_equals_truth(env["server"], synced)


def test_components_and_report_results_equal_truth(env: dict, synced: WarehousePaths) -> None:
    """Blood-pressure panels keep their components in redox.result_components (neither dropped
    nor multiplied into results rows), on every surface; every report's results are held."""
    served = truth(env["server"])
    if "components" in served:
        want = served["components"]
    else:  # the count from the store itself, until /_sandbox/truth reports components
        store = env["server"].state.store
        want = {
            c: {"result_components": sum(len(r.components) for r in store.iter(Query(c, "results")))}
            for c in EHR
        }
    with duckdb.connect(str(synced.duckdb), read_only=True) as con:
        ms = model_schema(con)
        got = dict(
            con.execute(f"select connection_id, count(*) from {ms}.result_components group by 1").fetchall()
        )
        for conn in EHR:
            assert got.get(conn, 0) == want[conn]["result_components"], conn
        missing = con.execute(
            f"""select count(*) from {ms}.diagnostic_report_results d
                where not exists (select 1 from {ms}.results r
                                  where r.connection_id = d.connection_id and r.result_id = d.result_id)"""
        ).fetchone()[0]
        grouped = con.execute(f"select count(*) from {ms}.diagnostic_report_results").fetchone()[0]
    assert grouped > 0 and missing == 0


def test_no_reconciled_column_is_null_where_a_surface_has_a_value(env: dict, synced: WarehousePaths) -> None:
    """On the connection served through both surfaces, every column of every entity: a
    published row is never null where either surface's staged row of that record has a value."""
    from pipelines.model import published_schema, staged_schema

    conn = "riverbend-both"
    skip = {"connection_id", "patient_key", "source_surface", "source_id"}
    problems: dict[tuple[str, str], int] = {}
    both: dict[str, int] = {}
    with duckdb.connect(str(synced.duckdb), read_only=True) as con:
        ms = model_schema(con)
        for entity in ENTITIES:
            key = "patient_key" if entity == "patients" else ENTITY_KEY[entity]
            both[entity] = con.execute(
                f"select count(*) from {ms}.{entity} where connection_id = ? and source_surface = 'both'",
                [conn],
            ).fetchone()[0]
            has_match = "match_key" in staged_schema(entity).names
            for surface in ("fhir", "datamodel"):
                staged = f"raw.{surface}_{entity}"
                exists = con.execute(
                    "select count(*) from information_schema.tables where table_schema = 'raw' and table_name = ?",
                    [f"{surface}_{entity}"],
                ).fetchone()[0]
                if not exists:
                    continue
                resolved = f"""select s.*, x.patient_key as pk from {staged} s
                    join {ms}.patient_identifiers x on x.connection_id = s.connection_id
                     and x.id_system = s.patient_ref_type and x.id_value = s.patient_ref_value
                    where s.connection_id = '{conn}'"""
                # The published rows a staged row became: same business key; else (a record with
                # no shared id) the rows of the same patient whose staged twin has its match key.
                link = f'p."{key}" = s."{key}"' if entity != "patients" else "p.patient_key = s.pk"
                if has_match:
                    link = f"""({link} or (p.patient_key = s.pk and s.match_key is not null
                        and not exists (select 1 from {ms}.{entity} k where k.connection_id = s.connection_id
                                        and k."{key}" = s."{key}")
                        and exists (select 1 from raw.fhir_{entity} f where f.connection_id = p.connection_id
                                    and f."{key}" = p."{key}" and f.match_key = s.match_key)))"""
                columns = [c for c in published_schema(entity).names if c not in skip]
                per_row = ", ".join(
                    f'any_value(s."{c}") is not null and not bool_or(p."{c}" is not null) as "{c}"'
                    for c in columns
                )
                totals = ", ".join(f'count(*) filter (where "{c}")' for c in columns)
                counts = con.execute(
                    f"""with s as (select *, row_number() over () as sid from ({resolved})),
                    per_row as (select {per_row} from s
                        left join {ms}.{entity} p on p.connection_id = s.connection_id and {link}
                        group by s.sid)
                    select {totals} from per_row"""
                ).fetchone()
                problems.update(
                    {(f"{surface}:{entity}", c): n for c, n in zip(columns, counts, strict=True) if n}
                )
    assert not problems, f"published nulls where a surface had a value: {problems}"
    # The connection really is reconciled across surfaces, the clinical record included.
    for entity in ("patients", "encounters", "results", "appointments", "problems", "allergies",
                   "immunizations", "procedures", "diagnostic_reports", "orders"):  # fmt: skip
        assert both[entity] > 0, entity


def test_primary_keys_are_unique_per_connection(synced: WarehousePaths) -> None:
    with duckdb.connect(str(synced.duckdb), read_only=True) as con:
        for e in ENTITIES:
            key = ENTITY_KEY[e]
            dupes = con.execute(
                f"select count(*) - count(distinct (connection_id, {key})) from redox.{e}"
            ).fetchone()[0]
            assert dupes == 0, e
            nulls = con.execute(f"select count(*) from redox.{e} where {key} is null").fetchone()[0]
            assert nulls == 0, e


def test_every_record_resolves_to_a_patient_in_the_crosswalk(synced: WarehousePaths) -> None:
    with duckdb.connect(str(synced.duckdb), read_only=True) as con:
        for e in ENTITIES:
            orphans = con.execute(f"select count(*) from redox.{e} where patient_key is null").fetchone()[0]
            assert orphans == 0, f"{e}: {orphans} rows without a patient"


def test_both_surfaces_give_one_patient_key_per_true_patient(env: dict, synced: WarehousePaths) -> None:
    store = env["server"].state.store
    patients = list(store.iter(Query("riverbend-both", "patients")))
    with duckdb.connect(str(synced.duckdb), read_only=True) as con:
        ms = model_schema(con)
        xwalk = {
            (s, v): k
            for s, v, k in con.execute(
                f"select id_system, id_value, patient_key from {ms}.patient_identifiers where connection_id = ?",
                ["riverbend-both"],
            ).fetchall()
        }
        surfaces = dict(
            con.execute(
                f"select source_surface, count(*) from {ms}.patients where connection_id = ? group by 1",
                ["riverbend-both"],
            ).fetchall()
        )
    keys = set()
    for p in patients:
        via_fhir, via_dm = xwalk.get(("fhir", p.id)), xwalk.get(("MR", p.mrn))
        assert via_fhir is not None and via_fhir == via_dm
        keys.add(via_fhir)
    assert len(keys) == len(patients)
    assert surfaces.get("both") == len(patients)


def test_near_duplicate_demographics_are_never_linked(env: dict, synced: WarehousePaths) -> None:
    store = env["server"].state.store
    twins = 0
    with duckdb.connect(str(synced.duckdb), read_only=True) as con:
        ms = model_schema(con)
        for conn in EHR:
            by_demo = defaultdict(set)
            for p in store.iter(Query(conn, "patients")):
                by_demo[(p.family_name, p.given_names, p.birth_date)].add(p.enterprise_id)
            rows = con.execute(
                f"select family_name, given_names, birth_date, count(distinct patient_key), count(distinct enterprise_id) "
                f"from {ms}.patients where connection_id = ? group by 1, 2, 3 having count(*) > 1",
                [conn],
            ).fetchall()
            for family, given, born, n_keys, n_people in rows:
                twins += 1
                assert n_keys == n_people == len(by_demo[(family, tuple(given.split()), born)])
    assert twins > 0, "the population should contain near-duplicate demographics"


def test_rerun_changes_nothing(env: dict, synced: WarehousePaths) -> None:
    before = warehouse_counts(synced)
    report = run_sync(env["settings"], synced, connection_ids=list(EHR))
    assert report.ok
    assert warehouse_counts(synced) == before


def test_backfill_window_re_pulls_the_panel_patients_active_in_it(env: dict, synced: WarehousePaths) -> None:
    store = env["server"].state.store
    end = store.now - timedelta(days=30)
    start = end - timedelta(days=60)
    with duckdb.connect(str(synced.duckdb), read_only=True) as con:
        panel = con.execute(
            "select count(*) from ops.patient_panel where connection_id = 'northwind-fhir'"
        ).fetchone()[0]
    report = run_sync(
        env["settings"], synced, connection_ids=["northwind-fhir"], window=SyncWindow(start, end)
    )
    assert report.ok, report.failures
    stats = report.connections[0].access
    # Only patients with activity in the window are due; each is pulled whole.
    assert 0 < stats.due < panel and stats.pulled == stats.due and stats.deferred == 0
    assert_equals_truth(env["server"], synced)


def test_parquet_lake_has_the_same_counts_under_connection_partitions(env: dict, tmp_path: Path) -> None:
    paths = with_rosters(env, WarehousePaths.at(tmp_path / "lake", destination="parquet"))
    report = run_sync(env["settings"], paths, connection_ids=["northwind-fhir"])
    assert report.ok
    want = truth(env["server"])["counts"]["northwind-fhir"]
    for e in ENTITIES:
        folder = paths.lake_root / "redox" / e / "connection=northwind-fhir"
        assert folder.is_dir(), e
        n = duckdb.execute(
            f"select count(*) from read_parquet('{paths.lake_root}/redox/{e}/*/*.parquet', hive_partitioning=true) "
            "where connection = 'northwind-fhir'"
        ).fetchone()[0]
        assert n == want[e], e


def test_renormalize_rebuilds_the_model_from_the_landing_alone(env: dict, synced: WarehousePaths) -> None:
    before = warehouse_counts(synced)
    calls_before = _audit_lines(synced)
    with duckdb.connect(str(synced.duckdb)) as con:
        ms = model_schema(con)
        for e in ENTITIES:
            con.execute(f"delete from {ms}.{e}")
    renormalize(synced, connection_ids=["northwind-fhir", "riverbend-both"])
    after = warehouse_counts(synced)
    for conn in ("northwind-fhir", "riverbend-both"):
        assert after[conn] == before[conn]
    assert _audit_lines(synced) == calls_before, "renormalize must not call the API"


def _audit_lines(paths: WarehousePaths) -> int:
    return len(paths.audit_log.read_text().splitlines()) if paths.audit_log.exists() else 0


def test_audit_has_one_record_per_call_and_the_chain_verifies(synced: WarehousePaths) -> None:
    from resources.audit import verify_audit

    ok, first_bad, reason = verify_audit(synced.duckdb)
    assert ok, (first_bad, reason)
    with duckdb.connect(str(synced.duckdb), read_only=True) as con:
        n = con.execute("select count(*) from audit.api_calls").fetchone()[0]
    assert n == _audit_lines(synced) > 0


def _requests(report, connection_id: str) -> int:
    return next(c for c in report.connections if c.connection_id == connection_id).access.requests


def test_incremental_sync_after_advance_is_cheap_and_full_equals_truth(
    env: dict, synced: WarehousePaths
) -> None:
    server = env["server"]
    full = run_sync(env["settings"], synced, connection_ids=["northwind-fhir"], full=True)
    assert full.ok, full.failures
    httpx.post(f"{server.url}/_sandbox/advance", json={"days": 1, "change_fraction": 0.02}, timeout=60)
    report = run_sync(env["settings"], synced, connection_ids=list(EHR))
    assert report.ok, report.failures
    # An incremental run asks discovery and pulls the patients it shows active: a fraction
    # of what re-pulling everyone costs.
    assert _requests(report, "northwind-fhir") < 0.3 * _requests(full, "northwind-fhir")
    # Corrections to records no event or discovery announces arrive with the rolling
    # refresh; --full re-pulls every panel patient now.
    report = run_sync(env["settings"], synced, connection_ids=list(EHR), full=True)
    assert report.ok, report.failures
    assert_equals_truth(server, synced)
