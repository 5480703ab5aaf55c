# ruff: noqa: F811 - pytest fixtures imported from test_writeback are parameters here
"""Acknowledgements and the one-call library API of write-back, against the sandbox."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from pipelines.warehouse import WarehousePaths
from pipelines.writeback.acks import acknowledge
from pipelines.writeback.api import create_appointment, submit_order
from pipelines.writeback.sender import Writer
from tests.pipelines.test_writeback import (  # noqa: F401, F811 - fixtures
    EHR,
    env,
    insert_orders,
    outbox,
    paths,
    patients_of,
    writes,
)


def test_sent_rows_are_acknowledged_once_visible(env: dict[str, Any], paths: WarehousePaths) -> None:
    rows = [(f"ack-{c}-{i}", c, k) for c in EHR for i, k in enumerate(patients_of(env, c, 2))]
    insert_orders(paths, rows)
    writer = Writer(env["settings"], paths, out=lambda _s: None, acknowledge=False)
    writer.run()
    assert {s for s, _ in outbox(paths).values()} == {"sent"}
    assert acknowledge(writer) == len(rows)
    assert {s for s, _ in outbox(paths).values()} == {"acknowledged"}
    assert acknowledge(writer) == 0  # nothing left to acknowledge; nothing re-sent
    assert len(writes(env)["orders"]) == len(rows)


def test_submit_order_and_create_appointment_in_one_call(env: dict[str, Any], paths: WarehousePaths) -> None:
    key = patients_of(env, "lakeside-dm", 1)[0]
    outcome = submit_order(
        env["settings"],
        str(paths.duckdb),
        order_id="lib-1",
        connection_id="lakeside-dm",
        patient_key=key,
        procedure_code="4548-4",
        procedure_codeset="LOINC",
        procedure_description="Hemoglobin A1c",
        timeout_s=30,
    )
    assert outcome.status == "acknowledged", outcome  # the EHR's outcome, not just "received"
    again = submit_order(
        env["settings"],
        str(paths.duckdb),
        order_id="lib-1",
        connection_id="lakeside-dm",
        patient_key=key,
        procedure_code="4548-4",
        procedure_codeset="LOINC",
        timeout_s=30,
    )
    assert again.ok  # the same id is the same write: not sent twice
    bad = submit_order(
        env["settings"],
        str(paths.duckdb),
        order_id="lib-bad",
        connection_id="lakeside-dm",
        patient_key="nobody",
        procedure_code="4548-4",
        procedure_codeset="LOINC",
        timeout_s=30,
    )
    assert bad.status == "failed" and "unknown patient" in (bad.reason or "")
    appt = create_appointment(
        env["settings"],
        str(paths.duckdb),
        request_id="lib-appt-1",
        appointment_id="VN-LIB-1",
        connection_id="northwind-fhir",
        patient_key=patients_of(env, "northwind-fhir", 1)[0],
        start_at=datetime(2026, 12, 5, 14, 0, tzinfo=UTC),
        reason="Follow-up",
        timeout_s=30,
    )
    assert appt.status == "acknowledged", appt
    w = writes(env)
    assert Counter(x["order_id"] for x in w["orders"]) == {"lib-1": 1}
    assert [(x["appointment_id"], x["surface"]) for x in w["appointments"]] == [("VN-LIB-1", "fhir")]


def test_a_writeback_run_acknowledges_what_it_sent(env: dict[str, Any], paths: WarehousePaths) -> None:
    insert_orders(paths, [("ack-run-1", "riverbend-both", patients_of(env, "riverbend-both", 1)[0])])
    report = Writer(env["settings"], paths, out=lambda _s: None).run()
    assert (report.sent, report.acknowledged) == (1, 1)
    assert outbox(paths)["ack-run-1"][0] == "acknowledged"
