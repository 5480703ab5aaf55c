"""The write-back job and the webhook-inbox sensor: both load with the code location, the
sensor requests one live sync run per connection with pending inbox messages (and nothing
for an empty inbox), and the job delivers an empty outbox successfully in-process."""

from __future__ import annotations

from pathlib import Path

from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context, partition_loading_context

from assets.automation import SYNC_JOB
from assets.partitions import CONNECTIONS_PARTITIONS_NAME
from assets.resources import EmbeddedSandboxResource, WarehouseResource
from assets.sync_assets import CONNECTION_TAG
from assets.writeback import INBOX_SENSOR, WRITEBACK_JOB
from pipelines.inbox.envelope import Envelope
from pipelines.inbox.store import Delivery, inbox_path, opened, received_now, store_batch
from redox_elt.definitions import build_definitions, defs
from redox_elt.environment import Environment
from sandbox.config import default_connections

CONNECTION = default_connections()[0].id


def _delivery(key: str) -> Delivery:
    envelope = Envelope(
        dedupe_key=f"log:{key}",
        key_kind="log",
        family="datamodel",
        data_model="PatientAdmin",
        event_type="Arrival",
        event_at=None,
        source_name=None,
        source_ref=None,
        quarantine_reason=None,
    )
    return Delivery(envelope=envelope, body=b"{}", connection_id=CONNECTION, received_at=received_now())


def _tick(warehouse: WarehouseResource) -> list[RunRequest | SkipReason]:
    local = build_definitions(Environment(), warehouse=warehouse)
    sensor = local.resolve_sensor_def(INBOX_SENSOR)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME, [CONNECTION])
        resources = {"redox": EmbeddedSandboxResource(patients=20, seed=7), "warehouse": warehouse}
        # The daemon threads its instance into partition-key validation; a test says so itself.
        with (
            build_sensor_context(instance=instance, definitions=local, resources=resources) as context,
            partition_loading_context(dynamic_partitions_store=instance),
        ):
            result = sensor.evaluate_tick(context)
    return [*result.run_requests, *([SkipReason(result.skip_message)] if result.skip_message else [])]


def test_the_code_location_declares_the_job_and_the_sensor() -> None:
    repo = defs.get_repository_def()
    assert repo.has_job(WRITEBACK_JOB)
    sensor = defs.resolve_sensor_def(INBOX_SENSOR)
    assert sensor.job_name == SYNC_JOB
    assert sensor.default_status == defs.resolve_sensor_def("connection_partitions").default_status


def test_the_sensor_requests_one_run_per_connection_with_new_messages(tmp_path: Path) -> None:
    warehouse = WarehouseResource(path=str(tmp_path / "wh"))
    outcome = _tick(warehouse)  # no inbox file at all
    assert not [r for r in outcome if isinstance(r, RunRequest)]
    with opened(inbox_path(warehouse.paths()), create=True):
        pass
    assert not [r for r in _tick(warehouse) if isinstance(r, RunRequest)]  # an empty inbox

    with opened(inbox_path(warehouse.paths())) as con:
        store_batch(con, [_delivery("one")])
    (request,) = _tick(warehouse)
    assert isinstance(request, RunRequest)
    assert request.tags[CONNECTION_TAG] == CONNECTION
    assert request.partition_key.keys_by_dimension["connection"] == CONNECTION
    # The same pending messages keep the run key; a new message changes it.
    (again,) = _tick(warehouse)
    assert again.run_key == request.run_key
    with opened(inbox_path(warehouse.paths())) as con:
        store_batch(con, [_delivery("two")])
    (newer,) = _tick(warehouse)
    assert newer.run_key != request.run_key


def test_the_writeback_job_runs_on_an_empty_outbox(tmp_path: Path) -> None:
    local = build_definitions(
        Environment(),
        redox=EmbeddedSandboxResource(patients=20, seed=7),
        warehouse=WarehouseResource(path=str(tmp_path / "wh")),
    )
    with DagsterInstance.ephemeral() as instance:
        result = local.resolve_job_def(WRITEBACK_JOB).execute_in_process(
            instance=instance, run_config={"ops": {"redox_writeback": {"config": {"dry_run": False}}}}
        )
    assert result.success
