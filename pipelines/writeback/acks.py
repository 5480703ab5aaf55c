"""Acknowledgements: a ``sent`` outbox row becomes ``acknowledged`` once the write is visible at
the destination.

Redox answers writes asynchronously (200 = received, REDOX-REFERENCE §12.2); the outcome is
known when the EHR shows the order or appointment. The writer asks the same questions it asks
after an unanswered send — FHIR ``_search`` by ``identifier``, Data Model ``Order.Query`` /
``Scheduling.Booked`` — for rows in ``sent``, and records which one answered. A row whose write
is not visible yet stays ``sent`` and is asked about again at the next run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.writeback import payloads as P
from pipelines.writeback.outbox import KEY_COLUMN, KINDS, OutboxRow

if TYPE_CHECKING:
    from pipelines.writeback.sender import Destination, Writer

MAX_PER_RUN = 500  # lookups per run and kind: acknowledgement never crowds out sending


def _sent_rows(writer: Writer, kind: str, connection_id: str | None) -> list[OutboxRow]:
    key = KEY_COLUMN[kind]
    sql = f"SELECT * FROM outbox.{kind} WHERE status = 'sent'"
    params: list[object] = []
    if connection_id is not None:
        sql += " AND connection_id = ?"
        params.append(connection_id)
    sql += f" ORDER BY seq LIMIT {MAX_PER_RUN}"
    with writer.outbox.connect() as con:
        cur = con.execute(sql, params)
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return [
        OutboxRow(kind, str(r[key]), str(r["connection_id"]), "sent", int(r["attempts"]), r) for r in rows
    ]


def _how(request: P.Request, kind: str) -> str:
    if request.surface == "fhir":
        return f"visible to {'ServiceRequest' if kind == 'orders' else 'Appointment'} search by identifier"
    return f"visible to {'Order.Query' if kind == 'orders' else 'Scheduling.Booked'}"


def acknowledge(writer: Writer, connection_id: str | None = None) -> int:
    """Move ``sent`` rows whose write the destination shows to ``acknowledged``; how many moved."""
    moved = 0
    for kind in KINDS:
        by_conn: dict[str, list[OutboxRow]] = {}
        for row in _sent_rows(writer, kind, connection_id):
            by_conn.setdefault(row.connection_id, []).append(row)
        for conn_id, rows in by_conn.items():
            built: list[tuple[OutboxRow, P.Request]] = []
            with writer.outbox.connect() as con:
                for row in rows:
                    try:
                        built.append((row, writer.build(row, con)))
                    except Exception:  # noqa: BLE001 - a row that no longer builds is simply not asked about
                        continue
            if not built:
                continue
            destination: Destination = writer.destination_factory(
                writer.settings, writer.settings.connection(conn_id)
            )
            try:
                for row, request in built:
                    try:
                        visible = destination.find(row, request)
                    except Exception:  # noqa: BLE001 - a failed lookup is asked again next run
                        continue
                    if visible and writer.outbox.mark_acknowledged(kind, row.key, _how(request, kind)):
                        moved += 1
            finally:
                destination.close()
    return moved
