"""One-call write-back for Python users: ``submit_order(...)`` and ``create_appointment(...)``.

Each inserts one outbox row (the same row SQL users insert, so the same exactly-once path
delivers it), runs the writer for that connection, and waits — up to ``timeout_s`` — for the
EHR's outcome: ``acknowledged`` or ``failed`` with its reason (a row still ``sent`` when the
time is up is returned as it is: delivered, not yet confirmed). Each writer run asks the
destination about rows in ``sent``, so the outcome arrives without a webhook receiver; with one,
the inbox settles the row as soon as the EHR's event is processed. Calling again with the same id never sends twice: the
row already exists, and the call just waits for its outcome.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipelines.warehouse import WarehousePaths
from pipelines.writeback.outbox import Outbox
from pipelines.writeback.sender import Writer

SETTLED = ("acknowledged", "failed")  # the EHR's outcome; ``sent`` only means received


@dataclass(frozen=True)
class Outcome:
    id: str
    status: str  # acknowledged | failed, or sent | pending | sending when the time ran out
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.status in ("sent", "acknowledged")


def _insert(paths: WarehousePaths, table: str, values: dict[str, Any]) -> None:
    outbox = Outbox(paths)
    outbox.ensure()
    columns = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    key = "order_id" if table == "orders" else "request_id"
    with outbox.connect() as con:
        exists = con.execute(
            f"SELECT count(*) FROM outbox.{table} WHERE {key} = ?", [values[key]]
        ).fetchone()[0]
        if not exists:  # the same id again is the same logical write
            con.execute(f"INSERT INTO outbox.{table} ({columns}) VALUES ({marks})", list(values.values()))


def _wait(
    settings: Any, paths: WarehousePaths, kind: str, key: str, connection_id: str, timeout_s: float
) -> Outcome:
    deadline = time.monotonic() + timeout_s
    outbox = Outbox(paths)
    while True:
        Writer(settings, paths, out=lambda _s: None).run(connection_id=connection_id)
        found = outbox.status(kind, key)
        status, reason = found if found else ("pending", None)
        if status in SETTLED or time.monotonic() >= deadline:
            return Outcome(key, status, reason)
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))  # back off between writer runs


def submit_order(
    settings: Any,
    warehouse: str | None,
    *,
    order_id: str,
    connection_id: str,
    patient_key: str,
    procedure_code: str,
    procedure_codeset: str,
    procedure_description: str | None = None,
    priority: str | None = "Routine",
    ordered_at: datetime | None = None,
    provider_npi: str | None = None,
    notes: str | None = None,
    timeout_s: float = 60.0,
) -> Outcome:
    """Queue one order in ``outbox.orders``, deliver it and wait for the EHR's outcome."""
    paths = WarehousePaths.at(warehouse)
    values = {
        "order_id": order_id,
        "connection_id": connection_id,
        "patient_key": patient_key,
        "procedure_code": procedure_code,
        "procedure_codeset": procedure_codeset,
        "procedure_description": procedure_description,
        "priority": priority,
        "ordered_at": ordered_at,
        "provider_npi": provider_npi,
        "notes": notes,
    }
    _insert(paths, "orders", values)
    return _wait(settings, paths, "orders", order_id, connection_id, timeout_s)


def create_appointment(
    settings: Any,
    warehouse: str | None,
    *,
    request_id: str,
    appointment_id: str,
    connection_id: str,
    patient_key: str,
    start_at: datetime | None,
    action: str = "create",
    duration_minutes: int | None = None,
    reason: str | None = None,
    provider_npi: str | None = None,
    location_facility: str | None = None,
    location_department: str | None = None,
    notes: str | None = None,
    timeout_s: float = 60.0,
) -> Outcome:
    """Queue one appointment write (create, or ``action='update'`` / ``'cancel'``), deliver it
    and wait for the EHR's outcome."""
    paths = WarehousePaths.at(warehouse)
    values = {
        "request_id": request_id,
        "appointment_id": appointment_id,
        "action": action,
        "connection_id": connection_id,
        "patient_key": patient_key,
        "start_at": start_at,
        "duration_minutes": duration_minutes,
        "reason": reason,
        "provider_npi": provider_npi,
        "location_facility": location_facility,
        "location_department": location_department,
        "notes": notes,
    }
    _insert(paths, "appointments", values)
    return _wait(settings, paths, "appointments", request_id, connection_id, timeout_s)
