"""In-process materialization of the sync asset against a live sandbox.

A FHIR connection is used for the window-equals-truth comparisons: the FHIR surface
filters on last-updated, which is what the sandbox's ``Query(updated_ge, updated_lt)``
counts. (The Data Model enumerates visits by start time, so its windows are not
last-updated windows; shared/REDOX-REFERENCE.md.)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from assets.partitions import RANGE_END_TAG, RANGE_START_TAG, partition_key
from sandbox.population.store import Query
from sandbox.server import SandboxServer
from tests.orchestration.conftest import (
    ENTITIES,
    instance_with_connections,
    live_cursor,
    model_counts,
    register,
    run_sync_asset,
    sync_resources,
)

FHIR_CONN = "northwind-fhir"


def truth(server: SandboxServer, connection_id: str, start: datetime, end: datetime) -> dict[str, int]:
    store = server.state.store
    return {e: store.count(Query(connection_id, e, updated_ge=start, updated_lt=end)) for e in ENTITIES}


def test_single_partition_equals_truth_for_its_day(small_sandbox: SandboxServer, tmp_path: Path) -> None:
    config = register(small_sandbox, tmp_path, (FHIR_CONN,))
    resources = sync_resources(config, tmp_path / "wh")
    instance = instance_with_connections([FHIR_CONN])
    day = datetime(2026, 10, 20, tzinfo=UTC)

    result = run_sync_asset(resources, instance, partition_key=partition_key(FHIR_CONN, day.date()))

    assert result.success
    warehouse = tmp_path / "wh" / "redox.duckdb"
    expected = truth(small_sandbox, FHIR_CONN, day, day + timedelta(days=1))
    assert sum(expected.values()) > 0, "the chosen day should hold records"
    assert model_counts(warehouse, FHIR_CONN) == expected
    # Row counts reach the asset's metadata (counts only), for exactly that partition.
    events = result.get_asset_materialization_events()
    results_event = next(e for e in events if e.asset_key.path == ["redox", "results"])
    metadata = results_event.materialization.metadata
    assert metadata["rows_by_connection"].value == {FHIR_CONN: expected["results"]}
    assert {e.partition for e in events} == {str(partition_key(FHIR_CONN, day.date()))}
    # A backfill window stores no live cursor.
    state = live_cursor(warehouse, FHIR_CONN)
    assert state is None or _no_cursor(state[1])


def _no_cursor(sources: dict) -> bool:
    """True when no resource holds an incremental cursor value."""
    for source in (sources or {}).values():
        for resource in (source.get("resources") or {}).values():
            if resource.get("incremental"):
                return False
    return True


def test_seven_day_range_via_backfill_tags_equals_truth_and_keeps_the_live_cursor(
    small_sandbox: SandboxServer, tmp_path: Path
) -> None:
    config = register(small_sandbox, tmp_path, (FHIR_CONN,))
    instance = instance_with_connections([FHIR_CONN])
    first, last = datetime(2026, 10, 14, tzinfo=UTC), datetime(2026, 10, 20, tzinfo=UTC)
    tags = {
        RANGE_START_TAG: str(partition_key(FHIR_CONN, first.date())),
        RANGE_END_TAG: str(partition_key(FHIR_CONN, last.date())),
    }

    # A fresh warehouse: after the range run it holds exactly the window's records.
    fresh = sync_resources(config, tmp_path / "fresh")
    result = run_sync_asset(fresh, instance, tags=tags)
    assert result.success
    expected = truth(small_sandbox, FHIR_CONN, first, last + timedelta(days=1))
    assert sum(expected.values()) > sum(
        truth(small_sandbox, FHIR_CONN, last, last + timedelta(days=1)).values()
    )
    assert model_counts(tmp_path / "fresh" / "redox.duckdb", FHIR_CONN) == expected
    partitions = {e.partition for e in result.get_asset_materialization_events()}
    assert partitions == {str(partition_key(FHIR_CONN, (first + timedelta(days=i)).date())) for i in range(7)}

    # A warehouse with a live cursor: the same range run leaves the cursor as it was.
    live = sync_resources(config, tmp_path / "live")
    assert run_sync_asset(
        live, instance, partition_key=partition_key(FHIR_CONN, last.date()), mode="live"
    ).success
    live_file = tmp_path / "live" / "redox.duckdb"
    before = live_cursor(live_file, FHIR_CONN)
    assert before is not None and not _no_cursor(before[1])
    everything = model_counts(live_file, FHIR_CONN)
    assert everything == {e: small_sandbox.state.store.count(Query(FHIR_CONN, e)) for e in ENTITIES}

    assert run_sync_asset(live, instance, tags=tags).success
    assert live_cursor(live_file, FHIR_CONN) == before
    assert model_counts(live_file, FHIR_CONN) == everything  # merged, not duplicated
