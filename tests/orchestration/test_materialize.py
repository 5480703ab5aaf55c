"""In-process materialization of the sync asset against a live sandbox, on the patient
panel path: a partition (connection x day) is a window whose panel patients with activity
are pulled whole; patients never pulled (a freshly imported roster) are due whatever the
window; a backfill window never moves the live discovery marker.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from assets.partitions import RANGE_END_TAG, RANGE_START_TAG, partition_key
from sandbox.population.store import Query
from sandbox.server import SandboxServer
from tests.orchestration.conftest import (
    ENTITIES,
    discovered_at,
    import_roster,
    instance_with_connections,
    model_counts,
    register,
    run_sync_asset,
    sync_resources,
)

FHIR_CONN = "northwind-fhir"


def truth(server: SandboxServer, connection_id: str) -> dict[str, int]:
    return {e: server.state.store.count(Query(connection_id, e)) for e in ENTITIES}


def test_single_partition_pulls_the_new_roster_and_equals_truth(
    small_sandbox: SandboxServer, tmp_path: Path
) -> None:
    config = register(small_sandbox, tmp_path, (FHIR_CONN,))
    import_roster(small_sandbox, config, tmp_path / "wh")
    resources = sync_resources(config, tmp_path / "wh")
    instance = instance_with_connections([FHIR_CONN])
    day = datetime(2026, 10, 20, tzinfo=UTC)

    result = run_sync_asset(resources, instance, partition_key=partition_key(FHIR_CONN, day.date()))

    assert result.success
    warehouse = tmp_path / "wh" / "redox.duckdb"
    expected = truth(small_sandbox, FHIR_CONN)
    assert model_counts(warehouse, FHIR_CONN) == expected
    # Row counts reach the asset's metadata (counts only), for exactly that partition.
    events = result.get_asset_materialization_events()
    results_event = next(e for e in events if e.asset_key.path == ["redox", "results"])
    metadata = results_event.materialization.metadata
    assert metadata["rows_by_connection"].value == {FHIR_CONN: expected["results"]}
    assert {e.partition for e in events} == {str(partition_key(FHIR_CONN, day.date()))}
    # A backfill window is not a live discovery.
    assert discovered_at(warehouse, FHIR_CONN) is None


def test_seven_day_range_via_backfill_tags_keeps_the_warehouse_and_the_live_marker(
    small_sandbox: SandboxServer, tmp_path: Path
) -> None:
    config = register(small_sandbox, tmp_path, (FHIR_CONN,))
    instance = instance_with_connections([FHIR_CONN])
    first, last = datetime(2026, 10, 14, tzinfo=UTC), datetime(2026, 10, 20, tzinfo=UTC)
    tags = {
        RANGE_START_TAG: str(partition_key(FHIR_CONN, first.date())),
        RANGE_END_TAG: str(partition_key(FHIR_CONN, last.date())),
    }
    import_roster(small_sandbox, config, tmp_path / "live")
    live = sync_resources(config, tmp_path / "live")
    assert run_sync_asset(
        live, instance, partition_key=partition_key(FHIR_CONN, last.date()), mode="live"
    ).success
    live_file = tmp_path / "live" / "redox.duckdb"
    before = discovered_at(live_file, FHIR_CONN)
    assert before is not None
    everything = model_counts(live_file, FHIR_CONN)
    assert everything == truth(small_sandbox, FHIR_CONN)

    result = run_sync_asset(live, instance, tags=tags)
    assert result.success
    partitions = {e.partition for e in result.get_asset_materialization_events()}
    assert len(partitions) == 7
    assert discovered_at(live_file, FHIR_CONN) == before
    assert model_counts(live_file, FHIR_CONN) == everything  # merged, not duplicated
