"""Acknowledgements by lookup: a ``sent`` outbox row becomes ``acknowledged`` once the write is
visible at the destination, or ``failed`` when it is visible in the state an EHR refusal leaves.

Redox answers writes asynchronously (200 = received, REDOX-REFERENCE §12.2). The EHR's outcome
is pushed as an event / notification (``pipelines.writeback.inbox_acks``, the primary path);
this module is the fallback for a connection whose feed is not registered or lags: the writer
asks the same questions it asks after an unanswered send — FHIR ``_search`` by ``identifier``,
Data Model ``Order.Query`` / ``Scheduling.Booked`` — for rows in ``sent``. A revoked order or an
appointment cancelled without our asking means the EHR refused the write: ``failed`` with the
reason the destination shows (a note / cancel reason; EHR text, stored in ``last_error`` and
never logged). A row whose write is not visible yet stays ``sent`` and is asked about next run.
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
    """Settle ``sent`` rows the destination shows: ``acknowledged`` (returned: how many), or
    ``failed`` when it shows them refused (counted in ``writer.report.refused``)."""
    from pipelines.writeback.sender import cancelled_later

    moved = 0
    for kind in KINDS:
        by_conn: dict[str, list[OutboxRow]] = {}
        for row in _sent_rows(writer, kind, connection_id):
            by_conn.setdefault(row.connection_id, []).append(row)
        for conn_id, rows in by_conn.items():
            built: list[tuple[OutboxRow, P.Request, bool]] = []
            with writer.outbox.connect() as con:
                for row in rows:
                    try:
                        request = writer.build(row, con)
                    except Exception:  # noqa: BLE001 - a row that no longer builds is simply not asked about
                        continue
                    ours = kind == "appointments" and request.action != "cancel" and cancelled_later(con, row)
                    built.append((row, request, ours))
            if not built:
                continue
            destination: Destination = writer.destination_factory(
                writer.settings, writer.settings.connection(conn_id)
            )
            try:
                for row, request, cancelled_by_us in built:
                    try:
                        seen = destination.look(row, request)
                    except Exception:  # noqa: BLE001 - a failed lookup is asked again next run
                        continue
                    if seen is None:
                        continue
                    how = _how(request, kind)
                    if seen.refused and not cancelled_by_us:
                        if writer.outbox.mark_refused(kind, row.key, seen.reason, f"refused: {how}"):
                            writer.report.refused += 1
                    elif writer.outbox.mark_acknowledged(kind, row.key, how):
                        moved += 1
            finally:
                destination.close()
    return moved
