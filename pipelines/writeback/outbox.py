"""The write-back outboxes ``outbox.orders`` and ``outbox.appointments``: their DDL and the
status lifecycle the writer commits around every send.

Users decide in SQL what goes back to the EHR (``insert into outbox.orders (...) select ...``),
naming only business columns; the pipeline owns ``status`` and the columns after it. A row
moves ``pending -> sending -> sent -> acknowledged | failed``: ``failed`` before sending with a
PHI-free reason (the row cannot become a valid payload, or the destination refused the request),
or after it when the EHR refuses the write (its reason, EHR text, is kept in ``last_error`` and
never logged). The EHR's outcome arrives as a pushed event (``pipelines.writeback.inbox_acks``)
or is seen by a lookup (``pipelines.writeback.acks``); an outcome also settles a row still in
``sending`` (it proves the write arrived).
``sending`` is committed *before* the request leaves, so a row found in ``sending`` is exactly
a write whose outcome is unknown: the writer looks for it at the destination before sending
again (``pipelines.writeback.sender``). Every update runs under the warehouse's WriterLock (one
DuckDB writer), in its own short transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb

from pipelines.warehouse import WarehousePaths, WriterLock

STATUSES = ("pending", "sending", "sent", "acknowledged", "failed")
ACTIONS = ("create", "update", "cancel")
KINDS = ("orders", "appointments")

_PIPELINE_COLUMNS = f"""
    seq BIGINT NOT NULL DEFAULT nextval('outbox.row_seq'),
    status VARCHAR NOT NULL DEFAULT 'pending' CHECK (status IN ({", ".join(f"'{s}'" for s in STATUSES)})),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error VARCHAR,
    surface VARCHAR,
    external_id VARCHAR,
    created_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    updated_at TIMESTAMPTZ,
    sent_at TIMESTAMPTZ,
    acknowledged_at TIMESTAMPTZ,
    acknowledgement VARCHAR
"""

ORDERS_DDL = f"""
CREATE TABLE IF NOT EXISTS outbox.orders (
    order_id VARCHAR PRIMARY KEY,
    connection_id VARCHAR NOT NULL,
    patient_key VARCHAR NOT NULL,
    procedure_code VARCHAR,
    procedure_codeset VARCHAR,
    procedure_description VARCHAR,
    priority VARCHAR,
    ordered_at TIMESTAMPTZ,
    provider_npi VARCHAR,
    notes VARCHAR,
    {_PIPELINE_COLUMNS}
)
"""

APPOINTMENTS_DDL = f"""
CREATE TABLE IF NOT EXISTS outbox.appointments (
    request_id VARCHAR PRIMARY KEY,
    appointment_id VARCHAR NOT NULL,
    action VARCHAR NOT NULL DEFAULT 'create' CHECK (action IN ({", ".join(f"'{a}'" for a in ACTIONS)})),
    connection_id VARCHAR NOT NULL,
    patient_key VARCHAR NOT NULL,
    start_at TIMESTAMPTZ,
    duration_minutes INTEGER,
    reason VARCHAR,
    provider_npi VARCHAR,
    location_facility VARCHAR,
    location_department VARCHAR,
    notes VARCHAR,
    {_PIPELINE_COLUMNS}
)
"""

KEY_COLUMN = {"orders": "order_id", "appointments": "request_id"}
REFUSED_PREFIX = "refused by the EHR"


def refusal_text(reason: str | None) -> str:
    """``last_error`` of a write the EHR refused: the prefix, then the EHR's own reason."""
    reason = (reason or "").strip()
    return f"{REFUSED_PREFIX}: {reason}"[:500] if reason else f"{REFUSED_PREFIX} (no reason given)"


def ensure_outbox_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create ``outbox.orders`` and ``outbox.appointments`` when absent (idempotent). The first
    sync calls it, and so does every ``writeback`` run."""
    con.execute("CREATE SCHEMA IF NOT EXISTS outbox")
    con.execute("CREATE SEQUENCE IF NOT EXISTS outbox.row_seq")  # insertion order: sends keep it
    con.execute(ORDERS_DDL)
    con.execute(APPOINTMENTS_DDL)


@dataclass(frozen=True)
class OutboxRow:
    kind: str  # "orders" | "appointments"
    key: str  # order_id, or the appointment request_id
    connection_id: str
    status: str
    attempts: int
    values: dict[str, Any]  # every column of the row


class Outbox:
    """Reads and status changes of one warehouse's outboxes, each a short locked transaction."""

    def __init__(self, paths: WarehousePaths, lock_wait_s: float = 600.0) -> None:
        self.paths = paths
        self.lock_wait_s = lock_wait_s

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The warehouse under its writer lock, for one short transaction (DuckDB admits one
        writing process; holding it only this long lets a sync run between sends)."""
        with WriterLock(self.paths, self.lock_wait_s), duckdb.connect(str(self.paths.duckdb)) as con:
            yield con

    def ensure(self) -> None:
        with self.connect() as con:
            ensure_outbox_tables(con)

    def open_rows(self, kind: str, connection_id: str | None = None) -> list[OutboxRow]:
        """Rows still to do: ``sending`` (outcome unknown) first, then ``pending``, oldest first."""
        key = KEY_COLUMN[kind]
        sql = f"SELECT * FROM outbox.{kind} WHERE status IN ('pending', 'sending')"
        params: list[Any] = []
        if connection_id is not None:
            sql += " AND connection_id = ?"
            params.append(connection_id)
        sql += " ORDER BY status = 'pending', seq"
        with self.connect() as con:
            cur = con.execute(sql, params)
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        return [
            OutboxRow(kind, str(r[key]), str(r["connection_id"]), r["status"], int(r["attempts"]), r)
            for r in rows
        ]

    def _update(
        self,
        row: OutboxRow,
        sets: dict[str, Any],
        *,
        expect: tuple[str, ...],
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> bool:
        """Set columns where the row is still in one of ``expect``; False when it moved meanwhile.
        Committed before returning (its own transaction, or the caller's autocommit connection)."""
        sets = {**sets, "updated_at": datetime.now(UTC)}
        assignments = ", ".join(f"{c} = ?" for c in sets)
        marks = ", ".join("?" for _ in expect)
        sql = (
            f"UPDATE outbox.{row.kind} SET {assignments} WHERE {KEY_COLUMN[row.kind]} = ? "
            f"AND status IN ({marks}) RETURNING 1"
        )
        params = [*sets.values(), row.key, *expect]
        if con is not None:
            return bool(con.execute(sql, params).fetchall())
        with self.connect() as own:
            return bool(own.execute(sql, params).fetchall())

    def mark_sending(self, row: OutboxRow, surface: str) -> bool:
        """Committed before the request leaves: from here on the outcome is unknown until
        ``mark_sent`` / ``mark_failed``."""
        return self._update(
            row,
            {"status": "sending", "attempts": row.attempts + 1, "surface": surface, "last_error": None},
            expect=("pending", "sending"),
        )

    def mark_sent(self, row: OutboxRow, external_id: str | None, note: str | None = None) -> bool:
        return self._update(
            row,
            {"status": "sent", "external_id": external_id, "sent_at": datetime.now(UTC), "last_error": note},
            expect=("pending", "sending"),
        )

    def mark_failed(self, row: OutboxRow, reason: str, con: duckdb.DuckDBPyConnection | None = None) -> bool:
        return self._update(
            row, {"status": "failed", "last_error": reason[:500]}, expect=("pending", "sending"), con=con
        )

    def note_unknown(self, row: OutboxRow, reason: str) -> bool:
        """The send's outcome is unknown: the row stays ``sending`` with why."""
        return self._update(row, {"last_error": reason[:500]}, expect=("sending",))

    def mark_acknowledged(
        self,
        kind: str,
        key: str,
        acknowledgement: str,
        *,
        expect: tuple[str, ...] = ("sent",),
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> bool:
        row = OutboxRow(kind, key, "", "sent", 0, {})
        return self._update(
            row,
            {
                "status": "acknowledged",
                "acknowledged_at": datetime.now(UTC),
                "acknowledgement": acknowledgement,
            },
            expect=expect,
            con=con,
        )

    def mark_refused(
        self,
        kind: str,
        key: str,
        reason: str | None,
        acknowledgement: str,
        *,
        expect: tuple[str, ...] = ("sent",),
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> bool:
        """The EHR refused the delivered write: ``failed`` with its reason (EHR text, stored
        only here; callers never log it)."""
        row = OutboxRow(kind, key, "", "sent", 0, {})
        return self._update(
            row,
            {
                "status": "failed",
                "last_error": refusal_text(reason),
                "acknowledged_at": datetime.now(UTC),
                "acknowledgement": acknowledgement,
            },
            expect=expect,
            con=con,
        )

    def status(self, kind: str, key: str) -> tuple[str, str | None] | None:
        with self.connect() as con:
            found = con.execute(
                f"SELECT status, last_error FROM outbox.{kind} WHERE {KEY_COLUMN[kind]} = ?", [key]
            ).fetchone()
        return (found[0], found[1]) if found else None
