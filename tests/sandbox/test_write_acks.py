"""The EHR's verdict on write-backs: the ``write_reject_rate`` fault, the write log's outcome
rules, and the outcome messages pushed in each family (Data Model events strict-valid)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from sandbox.app import build_state
from sandbox.datamodel.conform import strict_check
from sandbox.faults import WRITE_REJECT_REASONS, Faults
from sandbox.state import SandboxState, WriteLog
from sandbox.write_acks import outcome_payloads
from tests.conftest import sandbox_config


@pytest.fixture(scope="module")
def state() -> Iterator[SandboxState]:
    built = build_state(sandbox_config(patients=12, seed=3), base_url="http://127.0.0.1:1")
    yield built
    built.webhooks.close()


def test_write_reject_rate_is_a_deterministic_share_with_documented_reasons() -> None:
    config = sandbox_config(patients=12)
    faults = Faults(config, seed=5)
    assert faults.write_refusal("lakeside-dm", "orders", "o-1") is None  # off by default
    faults.set({"write_reject_rate": 0.3})
    ids = [f"o-{i}" for i in range(2000)]
    verdicts = [faults.write_refusal("lakeside-dm", "orders", i) for i in ids]
    assert verdicts == [
        faults.write_refusal("lakeside-dm", "orders", i) for i in ids
    ]  # same write, same verdict
    again = Faults(config, seed=5)  # a new sandbox with the same seed: the same writes refused
    again.set({"write_reject_rate": 0.3})
    assert [again.write_refusal("lakeside-dm", "orders", i) for i in ids] == verdicts
    refused = [v for v in verdicts if v is not None]
    assert 0.25 < len(refused) / len(ids) < 0.35
    assert set(refused) == set(WRITE_REJECT_REASONS["orders"])
    visits = {faults.write_refusal("lakeside-dm", "appointments", f"v-{i}") for i in range(200)}
    assert visits - {None} <= set(WRITE_REJECT_REASONS["appointments"])
    faults.set({"connection": "northwind-fhir", "write_reject_rate": 0})
    assert all(faults.write_refusal("northwind-fhir", "orders", i) is None for i in ids)


def _record(
    log: WriteLog, event: str, refusal: str | None, business_id: str = "V-1"
) -> tuple[str, str | None]:
    kind = "orders" if event.startswith("Order") else "appointments"
    w = log.record(kind, business_id, "lakeside-dm", "datamodel", None, event, {}, "", refusal=refusal)
    return w.outcome, w.reason


def test_a_refusal_sticks_to_its_object_and_a_cancel_is_honoured() -> None:
    log = WriteLog()
    assert _record(log, "Scheduling-New", None) == ("accepted", None)
    assert _record(log, "Scheduling-Cancel", "slot no longer available") == ("accepted", None)
    assert _record(log, "Scheduling-New", "slot no longer available", "V-2") == (
        "rejected",
        "slot no longer available",
    )
    # Nothing left to change: every later write to V-2 is refused with the same reason.
    assert _record(log, "Scheduling-Reschedule", None, "V-2") == ("rejected", "slot no longer available")
    assert _record(log, "Scheduling-Cancel", None, "V-2") == ("rejected", "slot no longer available")
    assert [w["outcome"] for w in log.to_json()["appointments"]] == ["accepted"] * 2 + ["rejected"] * 3
    assert {"outcome", "reason", "appointment_id", "payload"} <= set(log.to_json()["appointments"][0])


def _dm_write(kind: str, event: str, mrn: str) -> dict[str, Any]:
    body: dict[str, Any] = {"Patient": {"Identifiers": [{"ID": mrn, "IDType": "MR"}]}}
    if kind == "orders":
        body["Order"] = {
            "ID": "O-1",
            "TransactionDateTime": "2026-11-20T15:00:00.000Z",
            "Status": "New",
            "Procedure": {"Code": "4548-4", "Codeset": "LOINC", "Description": "Hemoglobin A1c"},
        }
    else:
        body["Visit"] = {"VisitNumber": "V-1"}
        if event != "Scheduling-Cancel":
            body["Visit"].update(
                VisitDateTime="2026-11-20T15:00:00.000Z", Duration=30, Location={"Department": "Clinic 3"}
            )
    return body


def _fhir_write(kind: str, event: str, patient_id: str, mrn: str) -> dict[str, Any]:
    patient = {
        "resourceType": "Patient",
        "id": patient_id,
        "identifier": [{"system": "urn:redox:riverbend-both:MR", "value": mrn}],
    }
    if kind == "orders":
        focus: dict[str, Any] = {
            "resourceType": "ServiceRequest",
            "identifier": [{"system": "urn:redox-elt:outbox:OrderID", "value": "O-1"}],
            "status": "active",
            "intent": "order",
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "Hemoglobin A1c"}]
            },
            "subject": {"reference": f"Patient/{patient_id}"},
        }
    else:
        focus = {
            "resourceType": "Appointment",
            "identifier": [{"system": "urn:redox-elt:outbox:VN", "value": "V-1"}],
            "status": "cancelled" if event == "Scheduling-Cancel" else "booked",
            "start": "2026-12-03T09:00:00Z",
            "end": "2026-12-03T09:30:00Z",
            "minutesDuration": 30,
            "participant": [{"actor": {"reference": f"Patient/{patient_id}"}, "status": "accepted"}],
        }
    return {
        "resourceType": "Bundle",
        "type": "message",
        "entry": [
            {"resource": {"resourceType": "MessageHeader", "source": {"endpoint": "urn:x"}}},
            {"fullUrl": "urn:uuid:focus", "resource": focus},
            {"fullUrl": "urn:uuid:patient", "resource": patient},
        ],
    }


def _a_patient(state: SandboxState, conn_id: str) -> Any:
    person = next(
        p for p in state.store.persons() if any(r["connection_id"] == conn_id for r in p["records"])
    )
    record = next(r for r in person["records"] if r["connection_id"] == conn_id)
    return state.store.get(conn_id, "patients", record["patient_id"])


CASES = [
    ("orders", "Order-New"),
    ("appointments", "Scheduling-New"),
    ("appointments", "Scheduling-Reschedule"),
    ("appointments", "Scheduling-Cancel"),
]


@pytest.mark.parametrize(("kind", "event"), CASES)
@pytest.mark.parametrize("refusal", [None, "the EHR's reason"])
@pytest.mark.parametrize("surface", ["datamodel", "fhir"])
def test_outcomes_are_pushed_in_each_family_and_carry_the_verdict(
    state: SandboxState, kind: str, event: str, refusal: str | None, surface: str
) -> None:
    """Whichever surface the write came through, the Data Model event passes the strict
    ``redox`` oracle and the FHIR notification ``fhir.resources``; both name our id, the status
    the EHR gave it and, when refused, the reason."""
    conn_id = "riverbend-both"  # speaks both, so it can push both families
    conn = state.config.connection(conn_id)
    patient = _a_patient(state, conn_id)
    log = WriteLog()
    if surface == "datamodel":
        payload = _dm_write(kind, event, patient.mrn)
    else:
        payload = _fhir_write(kind, event, patient.id, patient.mrn)
    business_id = "O-1" if kind == "orders" else "V-1"
    if event != "Scheduling-New" and kind == "appointments":  # the appointment was booked first
        first = (
            _dm_write(kind, "Scheduling-New", patient.mrn)
            if surface == "datamodel"
            else _fhir_write(kind, "Scheduling-New", patient.id, patient.mrn)
        )
        log.record(kind, business_id, conn_id, surface, None, "Scheduling-New", first, "")
    write = log.record(kind, business_id, conn_id, surface, None, event, payload, "", refusal=refusal)
    state.writes, saved = log, state.writes
    try:
        both = replace(conn, webhook_family="both")
        rendered = outcome_payloads(state, both, write)
    finally:
        state.writes = saved
    dm, fhir = rendered
    refused = write.outcome == "rejected"
    cancelled = refused or event.endswith("Cancel")

    strict_check(dm)
    if kind == "orders":
        assert (dm["Meta"]["DataModel"], dm["Meta"]["EventType"]) == (
            "Order",
            "Cancel" if refused else "Update",
        )
        assert dm["Order"]["ID"] == "O-1"
        assert dm["Order"]["Status"] == ("Canceled" if refused else "Scheduled")
        assert dm["Order"].get("Notes", [])[-1:] == ([refusal] if refused else [])
    else:
        expected = (
            "Cancel" if cancelled else {"Scheduling-New": "New", "Scheduling-Reschedule": "Reschedule"}[event]
        )
        assert (dm["Meta"]["DataModel"], dm["Meta"]["EventType"]) == ("Scheduling", expected)
        assert dm["Visit"]["VisitNumber"] == "V-1" and dm["Visit"]["VisitDateTime"]
        assert dm["Visit"].get("CancelReason") == (refusal if refused else None)
    assert any(i["ID"] == patient.mrn for i in dm["Patient"]["Identifiers"])

    Bundle.model_validate(fhir)
    header, focus = fhir["entry"][0]["resource"], fhir["entry"][1]["resource"]
    assert header["focus"] == [{"reference": fhir["entry"][1]["fullUrl"]}]
    assert any(i["value"] == business_id for i in focus["identifier"])
    if kind == "orders":
        assert header["eventUri"].endswith("ServiceRequestCancelled" if refused else "ServiceRequestUpdated")
        assert focus["status"] == ("revoked" if refused else "active")
        if refused:
            assert focus["note"][-1] == {"text": refusal}
    else:
        assert focus["status"] == ("cancelled" if cancelled else "booked")
        assert header["eventUri"].endswith(
            "SchedulingAppointmentCancelled"
            if cancelled
            else {
                "Scheduling-New": "SchedulingAppointmentBooked",
                "Scheduling-Reschedule": "SchedulingAppointmentUpdated",
            }[event]
        )
        assert focus.get("cancelationReason") == ({"text": refusal} if refused else None)
