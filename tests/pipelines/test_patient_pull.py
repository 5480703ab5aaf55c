"""Per-patient pulls and discovery end to end: a real sandbox, the real client, the pull
resources run through a dlt pipeline into a temporary DuckDB, published, and compared with the
sandbox's truth for the roster patients. Also: a failed patient stays due, the cursor moves only
over what loaded, and the ``_revinclude`` path where the sandbox offers it."""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dlt
import duckdb
import httpx
import pytest

from pipelines import panel as P
from pipelines.access import extract_connection
from pipelines.landing import RawLanding
from pipelines.model import ENTITIES
from pipelines.publish import publish_connection
from pipelines.sync_context import pipeline_name
from pipelines.warehouse import WarehousePaths
from resources.client import RedoxClient
from resources.onboarding import connect_sandbox
from resources.settings import Settings, load_settings
from sandbox.population.store import Query
from sandbox.server import SandboxServer

EHR = ("northwind-fhir", "lakeside-dm", "riverbend-both")


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    saved = {k: os.environ.get(k) for k in ("REDOX_ELT_HOME", "REDOX_ELT_MASTER_KEY")}
    os.environ["REDOX_ELT_HOME"] = str(tmp_path / "home")
    os.environ["REDOX_ELT_MASTER_KEY"] = "panel-test-master-key"
    yield tmp_path / "home"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def connect(server: SandboxServer, home: Path) -> Settings:
    settings = load_settings(connect_sandbox(server.url, home / "connections.yaml"))
    conns = tuple(dataclasses.replace(c, max_rps=200.0) for c in settings.connections)
    return dataclasses.replace(settings, connections=conns)


def write_roster(server: SandboxServer, settings: Settings, conn_id: str, path: Path) -> int:
    """The roster an organization holds: every MRN of the connection, as a user writes it."""
    slug = settings.connection(conn_id).destination_slug
    mrns = sorted(p.mrn for p in server.state.store.iter(Query(conn_id, "patients")))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["system", "value"])
        for mrn in mrns:
            w.writerow([f"urn:redox:{slug}:MR", mrn])
    return len(mrns)


def sync_one(settings: Settings, conn_id: str, paths: WarehousePaths, **kw: Any) -> Any:
    """What the runner does per connection: extract, load, record in the panel, publish."""
    conn = settings.connection(conn_id)
    landing = RawLanding(paths.landing_root)
    with RedoxClient(settings, conn, caller="test") as client:
        extract = extract_connection(client, conn, landing, paths, **kw)
        pipeline = dlt.pipeline(
            pipeline_name=pipeline_name(conn.id),
            destination=dlt.destinations.duckdb(str(paths.duckdb)),
            dataset_name="raw",
            pipelines_dir=str(paths.dlt_dir),
        )
        pipeline.run(extract.sources)
        extract.finish(paths)
    with duckdb.connect(str(paths.duckdb)) as con:
        publish_connection(con, conn.id)
    return extract


def truth(server: SandboxServer) -> dict:
    return httpx.get(f"{server.url}/_sandbox/truth", params={"persons": "false"}, timeout=60).json()


def published_counts(paths: WarehousePaths, conn_id: str) -> dict[str, int]:
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        return {
            e: con.execute(f"select count(*) from redox.{e} where connection_id = ?", [conn_id]).fetchone()[0]
            for e in ENTITIES
        }


def panel_stats(paths: WarehousePaths, conn_id: str) -> dict[str, Any]:
    with duckdb.connect(str(paths.duckdb)) as con:
        return P.panel_stats(con, [conn_id])[conn_id]


@pytest.fixture
def world(sandbox_factory: Callable[..., SandboxServer], home: Path, tmp_path: Path) -> dict[str, Any]:
    server = sandbox_factory()
    settings = connect(server, home)
    paths = WarehousePaths.at(tmp_path / "wh" / "redox.duckdb")
    return {"server": server, "settings": settings, "paths": paths, "tmp": tmp_path}


def test_roster_pulls_equal_truth_for_every_ehr_connection(world: dict[str, Any]) -> None:
    server, settings, paths = world["server"], world["settings"], world["paths"]
    want = truth(server)["counts"]
    for conn_id in EHR:
        path = world["tmp"] / f"{conn_id}.csv"
        n = write_roster(server, settings, conn_id, path)
        with duckdb.connect(str(paths.duckdb)) as con:
            assert P.add_roster(con, conn_id, path).added == n
        extract = sync_one(settings, conn_id, paths, discover_days=30)
        got = published_counts(paths, conn_id)
        assert got == {e: want[conn_id].get(e, 0) for e in ENTITIES}, (conn_id, extract.stats.to_dict())
        stats = panel_stats(paths, conn_id)
        assert stats["never_pulled"] == 0 and stats["due"] == 0, (conn_id, stats)
        assert extract.stats.failed == 0 and extract.stats.deferred == 0
        assert extract.stats.requests > 0
    # The sandbox refuses _revinclude here: learned once and remembered, so no later probe.
    with duckdb.connect(str(paths.duckdb)) as con:
        assert P.get_capability(con, "northwind-fhir", "fhir_revinclude") in ("false", "true")

    # Nothing due: a second sync pulls no one and changes nothing.
    before = {c: published_counts(paths, c) for c in EHR}
    extract = sync_one(settings, "northwind-fhir", paths)
    assert extract.stats.due == 0 and extract.stats.pulled == 0
    assert {c: published_counts(paths, c) for c in EHR} == before


def test_discovery_alone_fills_the_panel_with_the_active_patients(world: dict[str, Any]) -> None:
    server, settings, paths = world["server"], world["settings"], world["paths"]
    store = server.state.store
    since = store.now - timedelta(days=30)
    for conn_id in ("northwind-fhir", "lakeside-dm"):
        conn = settings.connection(conn_id)
        extract = sync_one(settings, conn_id, paths, discover_days=30)
        active: set[str] = set()
        for e in store.iter(Query(conn_id, "encounters", date_ge=since)):
            active.add(e.patient.patient_id)
        for a in store.iter(Query(conn_id, "appointments", date_ge=since)):
            active.add(a.patient.patient_id)
        stats = panel_stats(paths, conn_id)
        assert extract.stats.discovered == stats["patients"] > 0
        # Data Model too: the sandbox's visits fulfil bookings and discharges book follow-ups,
        # so Scheduling.Booked and the census see every recently active patient.
        assert stats["patients"] >= len(active), (conn_id, conn.surfaces, stats)
        assert stats["pulled"] == stats["patients"], stats
        assert "found_by" in stats and set(stats["found_by"]) <= set(P.FOUND_BY)


def test_a_failed_patient_stays_due_and_the_sync_goes_on(world: dict[str, Any]) -> None:
    server, settings, paths = world["server"], world["settings"], world["paths"]
    conn_id = "northwind-fhir"
    path = world["tmp"] / "r.csv"
    path.write_text("system,value\nMR,NO-SUCH-MRN\n")
    n = write_roster(server, settings, conn_id, world["tmp"] / "all.csv")
    with duckdb.connect(str(paths.duckdb)) as con:
        P.add_roster(con, conn_id, world["tmp"] / "all.csv")
        P.add_roster(con, conn_id, path)
    extract = sync_one(settings, conn_id, paths, discover_days=1)
    stats = panel_stats(paths, conn_id)
    assert stats["not_found"] == 1 and stats["pulled"] >= n
    assert extract.stats.not_found == 1

    # A kill between extract and load: the outcomes are never applied, so everyone stays due.
    more = world["tmp"] / "more.csv"
    more.write_text("system,value\nMR,ANOTHER-UNKNOWN\n")
    with duckdb.connect(str(paths.duckdb)) as con:
        P.add_roster(con, conn_id, more)
    conn = settings.connection(conn_id)
    with RedoxClient(settings, conn, caller="test") as client:
        ex = extract_connection(client, conn, RawLanding(paths.landing_root), paths)
        assert ex.stats.due == 1
    with duckdb.connect(str(paths.duckdb)) as con:
        assert len(P.select_due(con, conn_id, now=ex.clock.now())) == 1


def _connections_meta(server: SandboxServer) -> dict[str, dict]:
    meta = httpx.get(f"{server.url}/_sandbox/connections", timeout=30).json()
    return {c["id"]: c for c in meta["connections"]}


def test_revinclude_path_pulls_a_patient_in_one_search(world: dict[str, Any]) -> None:
    server, settings, paths = world["server"], world["settings"], world["paths"]
    meta = _connections_meta(server)
    honouring = [cid for cid, c in meta.items() if c.get("revinclude") is True and "fhir" in c["surfaces"]]
    if not any("revinclude" in c for c in meta.values()):
        pytest.skip(
            "this sandbox does not describe _revinclude support (/_sandbox/connections has no 'revinclude')"
        )
    if not honouring:
        pytest.skip("no sandbox connection honours _revinclude")
    conn_id = honouring[0]
    path = world["tmp"] / "r.csv"
    n = write_roster(server, settings, conn_id, path)
    with duckdb.connect(str(paths.duckdb)) as con:
        P.add_roster(con, conn_id, path)
    extract = sync_one(settings, conn_id, paths, discover_days=1)
    want = truth(server)["counts"][conn_id]
    assert published_counts(paths, conn_id) == {e: want.get(e, 0) for e in ENTITIES}
    patient_searches = extract.stats.requests_by_kind.get("search Patient", 0)
    assert patient_searches >= n
    per_type = sum(
        v
        for k, v in extract.stats.requests_by_kind.items()
        if k.startswith("search ") and k != "search Patient"
    )
    assert per_type == 0, extract.stats.requests_by_kind


class SmallBudget:
    """The shared budget's contract (remaining/stats), nearly spent."""

    def __init__(self, left: int) -> None:
        self.left = left

    def remaining(self) -> int:
        return self.left

    def stats(self) -> dict[str, int]:
        return {"remaining": self.left}

    def acquire(self, priority: str, deadline_s: float | None = None) -> None:
        pass  # every request is let through: what is tested is who the pull starts

    def pause(self, seconds: float) -> None:
        pass


def test_patients_that_do_not_fit_the_budget_are_deferred_and_stay_due(world: dict[str, Any]) -> None:
    server, settings, paths = world["server"], world["settings"], world["paths"]
    conn_id = "northwind-fhir"
    n = write_roster(server, settings, conn_id, world["tmp"] / "all.csv")
    with duckdb.connect(str(paths.duckdb)) as con:
        P.add_roster(con, conn_id, world["tmp"] / "all.csv")
        # Known from an earlier sync: this connection honours _revinclude (2 requests a patient).
        P.create_tables(con)
        P.set_capability(con, conn_id, "fhir_revinclude", "true", now=datetime.now(UTC))
    conn = settings.connection(conn_id)
    with RedoxClient(settings, conn, caller="test") as client:
        client.budget = SmallBudget(5)  # two or three patients' worth at 2 requests each (_revinclude)
        extract = extract_connection(client, conn, RawLanding(paths.landing_root), paths, discover_days=1)
        pipeline = dlt.pipeline(
            pipeline_name=pipeline_name(conn.id),
            destination=dlt.destinations.duckdb(str(paths.duckdb)),
            dataset_name="raw",
            pipelines_dir=str(paths.dlt_dir),
        )
        pipeline.run(extract.sources)
        finished = extract.finish(paths)
    # Everyone due (the roster and the patients discovery found by FHIR id) but a few is deferred.
    assert extract.stats.due >= n
    # (this budget never goes down, so what fits depends on how many were in flight: 2 or 3)
    assert extract.stats.pulled in (2, 3)
    assert extract.stats.deferred == extract.stats.due - extract.stats.pulled
    assert extract.stats.budget_left == 5 and extract.stats.budget == {"remaining": 5}
    stats = panel_stats(paths, conn_id)
    # A pulled patient that discovery had also found by its FHIR id is one panel row afterwards
    # (its duplicate, deferred, is merged into it).
    assert stats["pulled"] == extract.stats.pulled
    assert stats["due"] == extract.stats.deferred - finished.get("merged", 0)
