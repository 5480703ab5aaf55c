"""The code location loads, declares every asset, check, schedule and sensor, and its
partitions/schedules/sensor behave as documented (no run, no sandbox)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    MultiPartitionsDefinition,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
)

from assets.partitions import (
    CONNECTIONS_PARTITIONS_NAME,
    RANGE_END_TAG,
    RANGE_START_TAG,
    partition_key,
    windows_for_run,
    windows_from_keys,
)
from assets.resources import ConnectionsFileResource, EmbeddedSandboxResource
from assets.sync_assets import CONNECTION_TAG
from pipelines.analytics import ANALYTICS_VIEWS
from pipelines.sync_context import SyncWindow
from redox_elt.definitions import build_definitions, defs
from redox_elt.environment import Environment, EnvironmentValueError
from sandbox.config import default_connections

ENTITIES = (
    "patients",
    "encounters",
    "results",
    "medications",
    "appointments",
    "documents",
    "problems",
    "allergies",
    "immunizations",
    "procedures",
    "diagnostic_reports",
    "orders",
)
CHILD_TABLES = ("result_components", "diagnostic_report_results")
SANDBOX_CONNECTIONS = [c.id for c in default_connections()]


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_every_expected_asset_exists_with_layer_and_partitions() -> None:
    graph = defs.resolve_asset_graph()
    keys = set(graph.get_all_asset_keys())
    raw = {AssetKey(["raw", s, e]) for s in ("fhir", "datamodel") for e in ENTITIES} | {
        AssetKey(["raw", "quarantine"])
    }
    normalized = {AssetKey(["redox", e]) for e in (*ENTITIES, *CHILD_TABLES, "patient_identifiers")}
    panel = AssetKey(["ops", "patient_panel"])
    analytics = {AssetKey(["analytics", v]) for v in ANALYTICS_VIEWS} | {AssetKey(["analytics", "persons"])}
    assert keys == raw | normalized | analytics | {panel}
    # The panel (who is pulled) is upstream of every staged table, on the same partitions.
    assert panel in graph.get(AssetKey(["raw", "fhir", "results"])).parent_keys
    assert isinstance(graph.get(panel).partitions_def, MultiPartitionsDefinition)
    groups = {k: graph.get(k).group_name for k in keys}
    assert {groups[k] for k in raw} == {"raw"}
    assert {groups[k] for k in normalized} == {"normalized"}
    assert {groups[k] for k in analytics} == {"analytics"}
    # Every asset declares its column schema (from pipelines/model_docs.py).
    for key in keys:
        assert graph.get(key).metadata.get("dagster/column_schema") is not None, key
    for key in raw | normalized:
        node = graph.get(key)
        assert isinstance(node.partitions_def, MultiPartitionsDefinition)
        assert {d.name for d in node.partitions_def.partitions_defs} == {"connection", "day"}
        assert node.owners and node.description
        assert "duckdb" in node.kinds
    assert "dlt" in graph.get(AssetKey(["raw", "fhir", "patients"])).kinds
    # The crosswalk sits between the staged patients and the entities resolving through it.
    assert AssetKey(["redox", "patient_identifiers"]) in graph.get(AssetKey(["redox", "results"])).parent_keys
    # Child tables hang off their parents.
    assert AssetKey(["redox", "results"]) in graph.get(AssetKey(["redox", "result_components"])).parent_keys


def test_every_expected_check_schedule_and_sensor_exists() -> None:
    graph = defs.resolve_asset_graph()
    checks = {("/".join(k.asset_key.path), k.name) for k in graph.asset_check_keys}
    expected = {
        (f"redox/{e}", "primary_key_unique") for e in (*ENTITIES, *CHILD_TABLES, "patient_identifiers")
    }
    expected |= {(f"redox/{e}", "patient_in_crosswalk") for e in (*ENTITIES[1:], *CHILD_TABLES)}
    expected |= {(f"redox/{c}", "parent_row_exists") for c in CHILD_TABLES}
    expected |= {
        ("redox/patient_identifiers", "connections_fresh"),
        ("raw/quarantine", "quarantine_rate_under_threshold"),
    }
    expected |= {(f"raw/fhir/{e}", "counts_match_source_totals") for e in ENTITIES}
    assert checks == expected
    blocking = {
        ("/".join(k.asset_key.path), k.name)
        for k in graph.asset_check_keys
        if graph.get_check_spec(k).blocking
    }
    assert blocking == {
        c
        for c in expected
        if c[1]
        in (
            "primary_key_unique",
            "patient_in_crosswalk",
            "parent_row_exists",
            "quarantine_rate_under_threshold",
        )
    }
    repo = defs.get_repository_def()
    assert {s.name for s in repo.schedule_defs} == {
        "incremental_sync_ehr",
        "incremental_sync_network",
        "daily_reconciliation",
    }
    assert all(s.default_status.value == "RUNNING" for s in repo.schedule_defs)
    assert "connection_partitions" in {s.name for s in repo.sensor_defs}
    assert repo.get_job("redox_sync_job").partitions_def is not None


EMBEDDED = EmbeddedSandboxResource(patients=50, seed=42)


def test_loading_the_code_location_starts_no_sandbox() -> None:
    resource = build_definitions(Environment()).resources["redox"]
    assert isinstance(resource, EmbeddedSandboxResource) and not resource.started
    assert [c.id for c in resource.connections()] == SANDBOX_CONNECTIONS
    assert not resource.started


def test_the_environment_is_read_once_and_picks_the_resources(tmp_path) -> None:
    env = Environment.read(
        {
            "REDOX_ELT_CONFIG": str(tmp_path / "connections.yaml"),
            "REDOX_ELT_SYNC_CRON": "*/15 * * * *",
            "REDOX_ELT_RECONCILE_DAYS": "5",
            "REDOX_ELT_PARTITIONS_START": "2025-01-01",
            "REDOX_ELT_MAX_QUARANTINE_RATE": "0.05",
        }
    )
    built = build_definitions(env)
    assert isinstance(built.resources["redox"], ConnectionsFileResource)
    assert built.resources["thresholds"].max_quarantine_rate == 0.05
    assert built.resolve_schedule_def("incremental_sync_ehr").cron_schedule == "*/15 * * * *"
    assert "last 5 whole days" in built.resolve_schedule_def("daily_reconciliation").description
    days = built.resolve_job_def("redox_sync_job").partitions_def.partitions_defs[1].partitions_def
    assert days.start.date().isoformat() == "2025-01-01"
    # Nothing is read from the process environment below the edge: the defaults hold there.
    assert build_definitions(Environment()).resources["thresholds"].max_quarantine_rate == 0.01
    for bad in (
        {"REDOX_ELT_SYNC_CRON": "hourly"},
        {"REDOX_ELT_RECONCILE_DAYS": "three"},
        {"REDOX_ELT_MAX_QUARANTINE_RATE": "nan"},
        {"REDOX_ELT_PARTITIONS_START": "2025-02-30"},
    ):
        with pytest.raises(EnvironmentValueError, match=next(iter(bad))):
            Environment.read(bad)


def test_the_sensor_adds_a_partition_per_configured_connection() -> None:
    sensor = defs.resolve_sensor_def("connection_partitions")
    resources = {"redox": EMBEDDED}
    with DagsterInstance.ephemeral() as instance:
        with build_sensor_context(instance=instance, definitions=defs, resources=resources) as context:
            requests = sensor.evaluate_tick(context).dynamic_partitions_requests
        assert len(requests) == 1 and list(requests[0].partition_keys) == SANDBOX_CONNECTIONS
        instance.add_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME, list(requests[0].partition_keys))
        with build_sensor_context(instance=instance, definitions=defs, resources=resources) as context:
            again = sensor.evaluate_tick(context)
        assert not again.dynamic_partitions_requests and again.skip_message


def test_schedules_request_one_run_per_connection_of_their_group() -> None:
    tick = _utc(2026, 11, 2, 4, 0)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME, SANDBOX_CONNECTIONS)
        with build_schedule_context(
            instance=instance,
            scheduled_execution_time=tick,
            repository_def=defs.get_repository_def(),
            resources={"redox": EMBEDDED},
        ) as context:
            ehr = defs.resolve_schedule_def("incremental_sync_ehr").evaluate_tick(context).run_requests
            network = (
                defs.resolve_schedule_def("incremental_sync_network").evaluate_tick(context).run_requests
            )
            daily = defs.resolve_schedule_def("daily_reconciliation").evaluate_tick(context).run_requests
    assert [r.tags[CONNECTION_TAG] for r in ehr] == ["northwind-fhir", "lakeside-dm", "riverbend-both"]
    assert [r.tags[CONNECTION_TAG] for r in network] == ["carequality-network"]
    assert ehr[0].partition_key == str(partition_key("northwind-fhir", "2026-11-02"))
    assert ehr[0].run_config == {"ops": {"redox_sync": {"config": {"mode": "live"}}}}
    assert len(daily) == 4 and daily[-1].tags[CONNECTION_TAG] == "carequality-network"
    windows = windows_for_run(daily[0].tags, None, None)
    assert windows[0].connection_id == "northwind-fhir"
    assert windows[0].window == SyncWindow(_utc(2026, 10, 30), _utc(2026, 11, 2))


def test_a_range_over_one_connection_is_one_window() -> None:
    tags = {
        RANGE_START_TAG: str(partition_key("lakeside-dm", "2026-10-01")),
        RANGE_END_TAG: str(partition_key("lakeside-dm", "2026-10-07")),
    }
    [window] = windows_for_run(tags, None, None)
    assert window.connection_id == "lakeside-dm" and window.days == 7
    assert window.window.start == _utc(2026, 10, 1) and window.window.end == _utc(2026, 10, 8)


def test_keys_across_connections_group_into_contiguous_windows() -> None:
    keys = [
        partition_key("a", "2026-10-01"),
        partition_key("a", "2026-10-02"),
        partition_key("a", "2026-10-05"),
    ]
    keys += [partition_key("b", "2026-10-02")]
    windows = windows_from_keys(keys)
    assert [(w.connection_id, w.window.start.day, w.days) for w in windows] == [
        ("a", 1, 2),
        ("a", 5, 1),
        ("b", 2, 1),
    ]
    single = windows_for_run({}, None, str(partition_key("b", "2026-10-02")))
    assert single[0].window.end - single[0].window.start == timedelta(days=1)
    with pytest.raises(ValueError, match="ends"):
        windows_for_run(
            {
                RANGE_START_TAG: str(partition_key("a", "2026-10-05")),
                RANGE_END_TAG: str(partition_key("a", "2026-10-01")),
            },
            None,
            None,
        )


def test_a_run_names_its_connections_by_its_partition_tags() -> None:
    from assets.partitions import RANGE_END_TAG, RANGE_START_TAG, run_connections

    assert run_connections({}) is None
    assert run_connections({"dagster/partition": "lakeside-dm|2026-11-30"}) == {"lakeside-dm"}
    assert run_connections({"dagster/partition/connection": "north-fhir"}) == {"north-fhir"}
    ranged = {RANGE_START_TAG: "a-b|2026-11-01", RANGE_END_TAG: "a-b|2026-11-30"}
    assert run_connections(ranged) == {"a-b"}
    assert run_connections({"dagster/partition": "not a key"}) is None


def test_a_failure_counted_in_another_connection_passes_this_run() -> None:
    from assets.check_queries import CheckOutcome, judged_only

    orphans = CheckOutcome(False, {"riverbend-both": 1}, "1 appointments rows have no patient")
    assert judged_only(orphans, {"northwind-fhir"}).passed
    assert judged_only(orphans, {"northwind-fhir"}).by_connection == {"riverbend-both": 1}
    assert not judged_only(orphans, {"riverbend-both"}).passed
    assert not judged_only(orphans, None).passed
    assert not judged_only(CheckOutcome(False, {}, "rows and no crosswalk"), {"x"}).passed
