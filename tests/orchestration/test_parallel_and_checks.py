"""Two connections materialized at once into one DuckDB file, then the asset checks on
that warehouse: clean, and with planted bad rows (a duplicate key, an orphan result)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from assets.check_queries import PATIENT_LINKED
from assets.checks import (
    FRESHNESS_CHECK,
    PARENT_CHECK,
    PK_CHECK,
    QUARANTINE_CHECK,
    RI_CHECK,
    SOURCE_TOTALS_CHECK,
)
from assets.partitions import partition_key
from pipelines.vocabulary import CHILD_TABLES
from sandbox.population.store import Query
from sandbox.server import SandboxServer
from tests.conftest import sandbox_config
from tests.orchestration.conftest import (
    ENTITIES,
    ORCHESTRATION_PATIENTS,
    import_roster,
    instance_with_connections,
    model_counts,
    register,
    run_sync_asset,
    sync_resources,
)
from tests.orchestration.conftest import (
    run_checks as run_all_checks,
)

CONNECTIONS = ("northwind-fhir", "lakeside-dm")
TODAY = datetime.now(UTC).date()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    server = SandboxServer(sandbox_config(patients=ORCHESTRATION_PATIENTS)).start()
    yield server
    server.stop()


def _live(config: Path, warehouse: Path, connection_id: str) -> Any:
    # The instance is created and disposed in the calling thread (its SQLite handles are per thread).
    with instance_with_connections(CONNECTIONS) as instance:
        return run_sync_asset(
            sync_resources(config, warehouse),
            instance,
            partition_key=partition_key(connection_id, TODAY),
            mode="live",
        )


@pytest.fixture(scope="module")
def synced(sandbox: SandboxServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both connections synced in parallel into one warehouse, and one after the other into another."""
    root = tmp_path_factory.mktemp("parallel")
    config = register(sandbox, root, CONNECTIONS)
    for warehouse in ("parallel", "sequential"):
        import_roster(sandbox, config, root / warehouse)
    with ThreadPoolExecutor(len(CONNECTIONS)) as pool:
        parallel = list(pool.map(lambda c: _live(config, root / "parallel", c), CONNECTIONS))
    sequential = [_live(config, root / "sequential", c) for c in CONNECTIONS]
    return {"config": config, "root": root, "parallel": parallel, "sequential": sequential}


def test_two_connections_in_parallel_neither_fail_nor_lose_rows(
    synced: dict[str, Any], sandbox: SandboxServer
) -> None:
    assert all(r.success for r in synced["parallel"]), "a parallel run failed (DuckDB lock?)"
    assert all(r.success for r in synced["sequential"])
    parallel_file = synced["root"] / "parallel" / "redox.duckdb"
    sequential_file = synced["root"] / "sequential" / "redox.duckdb"
    for connection_id in CONNECTIONS:
        counts = model_counts(parallel_file, connection_id)
        assert counts == model_counts(sequential_file, connection_id)
        assert counts["patients"] > 0 and counts["encounters"] > 0
    # The FHIR connection's full sync is the source's whole population.
    store = sandbox.state.store
    assert model_counts(parallel_file, "northwind-fhir") == {
        e: store.count(Query("northwind-fhir", e)) for e in ENTITIES
    }
    with duckdb.connect(str(parallel_file), read_only=True) as con:
        runs = con.execute("SELECT connection_id, mode FROM ops.sync_runs ORDER BY 1").fetchall()
    assert runs == [("lakeside-dm", "live"), ("northwind-fhir", "live")]


def run_checks(config: Path, warehouse: Path) -> dict[tuple[str, str], Any]:
    return run_all_checks(sync_resources(config, warehouse), CONNECTIONS)


def test_checks_pass_on_clean_data(synced: dict[str, Any]) -> None:
    evaluations = run_checks(synced["config"], synced["root"] / "parallel")
    failed = sorted(k for k, e in evaluations.items() if not e.passed)
    assert failed == []
    expected = {(f"redox/{e}", PK_CHECK) for e in (*ENTITIES, *CHILD_TABLES, "patient_identifiers")}
    expected |= {(f"redox/{e}", RI_CHECK) for e in PATIENT_LINKED}
    expected |= {(f"redox/{c}", PARENT_CHECK) for c in CHILD_TABLES}
    expected |= {("raw/quarantine", QUARANTINE_CHECK), ("redox/patient_identifiers", FRESHNESS_CHECK)}
    expected |= {(f"raw/fhir/{e}", SOURCE_TOTALS_CHECK) for e in ENTITIES}
    assert set(evaluations) == expected
    # The strict sandbox, like Redox, counts nothing without a patient: nothing to compare.
    compared = evaluations[("raw/fhir/results", SOURCE_TOTALS_CHECK)].metadata["by_connection"].value
    assert compared == {}


def _copy_with(synced: dict[str, Any], target: Path, *statements: str) -> Path:
    target.mkdir()
    shutil.copy(synced["root"] / "parallel" / "redox.duckdb", target / "redox.duckdb")
    with duckdb.connect(str(target / "redox.duckdb")) as con:
        for statement in statements:
            con.execute(statement)
    return target


def test_a_duplicate_key_fails_its_check_and_blocks_the_checks_downstream(
    synced: dict[str, Any], tmp_path: Path
) -> None:
    bad = _copy_with(
        synced, tmp_path / "dup", "INSERT INTO redox.encounters SELECT * FROM redox.encounters LIMIT 1"
    )
    evaluations = run_checks(synced["config"], bad)
    failed = sorted(k for k, e in evaluations.items() if not e.passed)
    assert failed == [("redox/encounters", PK_CHECK)]
    dup = evaluations[("redox/encounters", PK_CHECK)]
    assert dup.blocking and sum(dup.metadata["by_connection"].value.values()) == 2
    # Blocking: referential integrity is not even evaluated on top of a broken key.
    assert not any(name == RI_CHECK for _, name in evaluations)


def test_an_orphan_result_fails_referential_integrity(synced: dict[str, Any], tmp_path: Path) -> None:
    bad = _copy_with(
        synced,
        tmp_path / "orphan",
        # A result whose patient the crosswalk does not know (its own, unique result id).
        "INSERT INTO redox.results SELECT * REPLACE ('pk_not_in_crosswalk' AS patient_key, "
        "result_id || '-planted' AS result_id) FROM redox.results WHERE connection_id = 'lakeside-dm' LIMIT 1",
    )
    evaluations = run_checks(synced["config"], bad)
    failed = sorted(k for k, e in evaluations.items() if not e.passed)
    assert failed == [("redox/results", RI_CHECK)]
    orphan = evaluations[("redox/results", RI_CHECK)]
    assert orphan.blocking and orphan.metadata["by_connection"].value == {"lakeside-dm": 1}
