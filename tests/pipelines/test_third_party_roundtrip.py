"""Outside data, end to end: FHIR R4 files nobody here wrote (Synthea bundles, HL7 examples;
tests/fixtures/third-party-fhir) → ``sandbox --seed-from`` → both surfaces → the warehouse.
Per entity, the warehouse holds exactly the resources of the mapped types in the files."""

from __future__ import annotations

from pathlib import Path

import duckdb
import httpx
import pytest

from pipelines.model import ENTITIES
from pipelines.publish import model_schema
from pipelines.sync import run_sync
from pipelines.warehouse import WarehousePaths
from resources.onboarding import connect_sandbox
from resources.settings import load_settings
from sandbox.server import SandboxServer
from tests.conftest import import_rosters, sandbox_config
from tests.pipelines.test_sync_e2e import fast
from tests.sandbox.test_clinical_coverage import FIXTURE, file_counts

SEEDED = "seeded"


def test_outside_fhir_files_round_trip_into_the_warehouse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDOX_ELT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REDOX_ELT_MASTER_KEY", "third-party-master-key")
    expected = dict(file_counts(FIXTURE))
    with SandboxServer(sandbox_config(), seed_from=FIXTURE) as server:
        settings = fast(load_settings(connect_sandbox(server.url, tmp_path / "connections.yaml")))
        seeded = next(c for c in settings.connections if c.id == SEEDED)
        assert set(seeded.surfaces) == {"fhir", "datamodel"}, "the seeded connection speaks both surfaces"
        paths = WarehousePaths.at(tmp_path / "wh" / "redox.duckdb")
        import_rosters(server.url, settings, paths.duckdb, tmp_path / "rosters")
        report = run_sync(settings, paths, connection_ids=[SEEDED])
        assert report.ok, report.failures
        truth = httpx.get(f"{server.url}/_sandbox/truth", params={"persons": "false"}, timeout=60).json()
    served = {e: n for e, n in truth["counts"][SEEDED].items() if n}
    assert served == expected, "the sandbox serves exactly what the files hold"
    with duckdb.connect(str(paths.duckdb), read_only=True) as con:
        ms = model_schema(con)
        loaded = {
            e: n
            for e in ENTITIES
            if (
                n := con.execute(
                    f"SELECT count(*) FROM {ms}.{e} WHERE connection_id = ?", [SEEDED]
                ).fetchone()[0]
            )
        }
        open_quarantine = con.execute(
            "SELECT count(*) FROM raw.quarantine WHERE connection_id = ? AND resolved_at IS NULL", [SEEDED]
        ).fetchone()[0]
    assert loaded == expected, "the warehouse holds exactly what the files hold, per entity"
    assert open_quarantine == 0
