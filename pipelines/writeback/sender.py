"""The exactly-once writer: deliver each open outbox row once, without help from the server.

Redox has no idempotency mechanism and answers writes asynchronously (200 = received). So the
writer never re-sends on its own judgement of a failure:

1. ``sending`` is committed before a request leaves; ``sent`` (or ``failed``) after the answer.
2. The HTTP client is used with a single attempt for writes (its transport retries would re-send
   blindly). A clear refusal (4xx other than 408/429, or a refused entitlement) means nothing was
   committed: the row fails with the reason. Anything else (timeout after the request left, 5xx,
   reset) is *ambiguous*: the row stays ``sending``.
3. A row in ``sending`` — from an ambiguous send in this run, or left by a run killed between send
   and commit — is first looked up at the destination by the id it carries (FHIR ``_search`` by
   ``identifier``; Data Model ``Order.Query`` / ``Scheduling.Booked``). Found: ``sent``. Absent:
   sent again. Lookup failed: left ``sending`` for the next round or run.

One writer at a time per warehouse (``.<name>.writeback.lock``); each outbox update takes the
warehouse's WriterLock for its own short transaction, so a sync can run between them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb

from pipelines.warehouse import WarehouseBusy, WarehousePaths, table_exists
from pipelines.writeback import payloads as P
from pipelines.writeback.outbox import KINDS, Outbox, OutboxRow

log = logging.getLogger(__name__)

AMBIGUOUS_ROUNDS = 4  # in-run lookups of rows whose send went unanswered, before leaving them to the next run


@dataclass
class WritebackReport:
    sent: int = 0
    found_after_unanswered_send: int = 0
    failed: int = 0
    unknown: int = 0  # still ``sending``: outcome not yet established
    acknowledged: int = 0  # ``sent`` rows the EHR accepted (seen at the destination)
    refused: int = 0  # ``sent`` rows the EHR refused: now ``failed`` with its reason
    dry_run: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, key, reason)

    def summary(self) -> str:
        return (
            f"{self.sent} sent, {self.found_after_unanswered_send} found at the destination after an unanswered send, "
            f"{self.failed} failed, {self.unknown} still unknown (re-run to settle), "
            f"{self.acknowledged} acknowledged, {self.refused} refused by the EHR"
        )


@contextlib.contextmanager
def writer_run_lock(paths: WarehousePaths) -> Iterator[None]:
    """One write-back run per warehouse: a second one would take the first's ``sending`` rows
    for killed sends."""
    path = paths.root / f".{paths.duckdb.name}.writeback.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WarehouseBusy(f"another writeback is running on {paths.root} (lock {path.name})") from None
        yield
    finally:
        os.close(fd)


class Destination:
    """The two things the writer asks of a connection: send a request, look a write up.

    ``send`` returns an external id (the acknowledgement's id) or raises; ``find`` returns True
    when the row's write is visible at the destination, False when absent."""

    def __init__(self, settings: Any, conn: Any) -> None:
        from resources.client import RedoxClient
        from resources.retry import RetryPolicy

        self.conn = conn
        # Writes: one attempt. A transport retry of a write that may have committed is a duplicate.
        self.writer = RedoxClient(settings, conn, caller="writeback", retry=RetryPolicy(max_attempts=1))
        self.reader = RedoxClient(settings, conn, caller="writeback")

    def close(self) -> None:
        self.writer.close()
        self.reader.close()

    def send(self, request: P.Request) -> str | None:
        if request.surface == "fhir":
            ack = self.writer.fhir_operation(request.operation, request.body)
            entries = ack.get("entry") if isinstance(ack, dict) else None
            header = entries[0].get("resource") if isinstance(entries, list) and entries else None
            return str(header.get("id")) if isinstance(header, dict) and header.get("id") else None
        _, body = self.writer.datamodel_raw(request.body, priority="event")
        logs = (body.get("Meta") or {}).get("Logs") if isinstance(body, dict) else None
        return (
            str(logs[0].get("ID")) if isinstance(logs, list) and logs and isinstance(logs[0], dict) else None
        )

    def find(self, row: OutboxRow, request: P.Request) -> bool:
        """Is the row's write at the destination (in any state, refused included)?"""
        return self.look(row, request) is not None

    def look(self, row: OutboxRow, request: P.Request) -> Sighting | None:
        """The row's write as the destination shows it, or None when it is not there (yet).
        A refused write stays visible in its refused state (a revoked order, a cancelled
        appointment the row did not ask to cancel): it arrived and must not be sent again."""
        bid = P.business_id(row)
        if request.surface == "fhir":
            if row.kind == "orders":
                found = self.reader.fhir_find_written(
                    "ServiceRequest", f"{P.ORDER_ID_SYSTEM}|{bid}", priority="event"
                )
                for r in found:
                    if _has_identifier(r, P.ORDER_ID_SYSTEM, bid):
                        if r.get("status") in REFUSED_ORDER_STATUSES:
                            return Sighting(True, _last_text(r.get("note")))
                        return Sighting()
                return None
            found = self.reader.fhir_find_written(
                "Appointment", f"{P.VISIT_NUMBER_SYSTEM}|{bid}", priority="event"
            )
            for r in found:
                if _has_identifier(r, P.VISIT_NUMBER_SYSTEM, bid):
                    reason = (
                        r.get("cancelationReason") if isinstance(r.get("cancelationReason"), dict) else {}
                    )
                    return _appointment_sighting(request, r.get("status"), r.get("start"), reason.get("text"))
            return None
        patients = [{"Identifiers": request.body["Patient"]["Identifiers"]}]
        meta = {
            "DataModel": "Order" if row.kind == "orders" else "Scheduling",
            "EventType": "Query" if row.kind == "orders" else "Booked",
        }
        if self.conn.destination_id:
            meta["Destinations"] = [{"ID": self.conn.destination_id}]
        if row.kind == "orders":
            body = self.reader.datamodel(
                {"Meta": meta, "Patients": patients, "OrderIDs": [bid]}, priority="event"
            )
            for o in body.get("Orders") or []:
                if isinstance(o, dict) and str(o.get("ID")) == bid:
                    if str(o.get("Status") or "").lower() in DM_CANCELLED:
                        return Sighting(True, _last_text(o.get("Notes")))
                    return Sighting()
            return None
        query = {
            "Meta": meta,
            "StartDateTime": "2000-01-01T00:00:00.000Z",
            "Visit": {"VisitNumber": bid, "Patients": patients},
        }
        body = self.reader.datamodel(query, priority="event")
        for v in body.get("Visits") or []:
            if isinstance(v, dict) and str(v.get("VisitNumber")) == bid:
                status = "cancelled" if str(v.get("Status") or "").lower() in DM_CANCELLED else "booked"
                reason = v.get("CancelReason") if isinstance(v.get("CancelReason"), str) else None
                return _appointment_sighting(request, status, v.get("VisitDateTime"), reason)
        return None


@dataclass(frozen=True)
class Sighting:
    """A write found at the destination. ``refused``: the EHR refused it (the order is revoked,
    the appointment cancelled without the row asking); ``reason`` is the EHR's text, stored in
    the outbox and never logged."""

    refused: bool = False
    reason: str | None = None


REFUSED_ORDER_STATUSES = frozenset({"revoked", "entered-in-error"})
DM_CANCELLED = frozenset({"canceled", "cancelled", "cancel"})


def _last_text(notes: Any) -> str | None:
    """The last note's text (FHIR ``note[].text`` or Data Model ``Notes[]`` strings)."""
    for note in reversed(notes if isinstance(notes, list) else []):
        text = note.get("text") if isinstance(note, dict) else note
        if isinstance(text, str) and text.strip():
            return text
    return None


def _appointment_sighting(request: P.Request, status: Any, start: Any, reason: Any) -> Sighting | None:
    """How an appointment found at the destination answers this request: applied, refused
    (cancelled though the request did not cancel it), or not (yet) applied (None)."""
    if status == "cancelled" and request.action != "cancel":
        return Sighting(True, reason if isinstance(reason, str) else None)
    return Sighting() if _appointment_applied(request, status, start) else None


def _has_identifier(resource: dict[str, Any], system: str, value: str) -> bool:
    return any(
        isinstance(i, dict) and i.get("system") == system and i.get("value") == value
        for i in resource.get("identifier") or []
    )


def _same_instant(a: Any, b: Any) -> bool:
    try:
        return datetime.fromisoformat(str(a).replace("Z", "+00:00")) == datetime.fromisoformat(
            str(b).replace("Z", "+00:00")
        )
    except ValueError:
        return False


def _appointment_applied(request: P.Request, status: Any, start: Any) -> bool:
    """Does the destination's appointment show this request's effect (created, moved, cancelled)?"""
    if request.action == "cancel":
        return status == "cancelled"
    wanted = (
        request.body["Visit"]["VisitDateTime"] if request.surface == "datamodel" else _focus(request)["start"]
    )
    return status != "cancelled" and _same_instant(start, wanted)


def _focus(request: P.Request) -> dict[str, Any]:
    return request.body["entry"][1]["resource"]


def is_refusal(exc: Exception) -> bool:
    """A definite 'not committed': the request was refused before anything was stored."""
    from resources.client import PartialFailure, RedoxAPIError, ScopeError

    if isinstance(exc, ScopeError):
        return True
    if isinstance(exc, PartialFailure):
        return True  # HTTP 200 with errors: received, and the EHR refused it
    status = exc.status_code if isinstance(exc, RedoxAPIError) else None
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def cancelled_later(con: duckdb.DuckDBPyConnection, row: OutboxRow) -> bool:
    """A cancel row for the same appointment, queued after ``row``, that has left ``pending``."""
    return bool(
        con.execute(
            "SELECT count(*) FROM outbox.appointments WHERE appointment_id = ? AND connection_id = ? "
            "AND action = 'cancel' AND seq > ? AND status IN ('sending', 'sent', 'acknowledged')",
            [P.business_id(row), row.connection_id, row.values["seq"]],
        ).fetchone()[0]
    )


class Deferred(Exception):
    """The row depends on an earlier row of the same run (an appointment's create)."""


class Writer:
    """Deliver the open rows of one warehouse's outboxes."""

    def __init__(
        self,
        settings: Any,
        paths: WarehousePaths,
        *,
        destination_factory: Callable[[Any, Any], Destination] = Destination,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        out: Callable[[str], None] = print,
        acknowledge: bool = True,
    ) -> None:
        self.settings = settings
        self.acknowledge = acknowledge  # after sending, ask about ``sent`` rows (pipelines.writeback.acks)
        self.paths = paths
        self.outbox = Outbox(paths)
        self.destination_factory = destination_factory
        self.now = now
        self.out = out
        self.report = WritebackReport()

    # --- building ------------------------------------------------------------------------------

    def _patient(self, con: duckdb.DuckDBPyConnection, row: OutboxRow) -> P.PatientIds:
        """The patient's identifiers at the row's connection, through the crosswalk (and through
        ``redox.persons`` when the key belongs to another connection)."""
        if not table_exists(con, "redox", "patient_identifiers"):
            raise P.InvalidRow("redox.patient_identifiers does not exist yet; run a sync first")
        patient_key = str(row.values["patient_key"])
        keys = [patient_key]
        if table_exists(con, "redox", "persons"):
            keys += [
                r[0]
                for r in con.execute(
                    "SELECT b.patient_key FROM redox.persons a JOIN redox.persons b USING (person_key) "
                    "WHERE a.patient_key = ? AND b.connection_id = ? AND b.patient_key <> ?",
                    [patient_key, row.connection_id, patient_key],
                ).fetchall()
            ]
        for key in keys:
            rows = con.execute(
                "SELECT id_system, id_value FROM redox.patient_identifiers WHERE connection_id = ? AND patient_key = ? "
                "ORDER BY id_system",
                [row.connection_id, key],
            ).fetchall()
            if rows:
                fhir_id = next((v for s, v in rows if s == "fhir"), None)
                order = {t: i for i, t in enumerate(P.DATAMODEL_ID_TYPES)}
                idents = sorted(((s, v) for s, v in rows if s in order), key=lambda sv: order[sv[0]])
                return P.PatientIds(fhir_id, tuple(idents))
        raise P.InvalidRow(
            "unknown patient: patient_key has no identifiers at this connection in redox.patient_identifiers"
        )

    def _check_target(self, con: duckdb.DuckDBPyConnection, row: OutboxRow, conn: Any) -> None:
        if row.kind not in conn.write_entities:
            raise P.InvalidRow(
                f"connection '{conn.id}' is not entitled to write {row.kind} (its write_entities)"
            )
        action = P.action_of(row)
        if row.kind == "appointments" and action in ("update", "cancel"):
            bid = P.business_id(row)
            created = con.execute(
                "SELECT count(*) FROM outbox.appointments WHERE appointment_id = ? AND connection_id = ? "
                "AND action = 'create' AND status IN ('sent', 'acknowledged')",
                [bid, row.connection_id],
            ).fetchone()[0]
            known = (
                table_exists(con, "redox", "appointments")
                and con.execute(
                    "SELECT count(*) FROM redox.appointments WHERE appointment_id = ? AND connection_id = ?",
                    [bid, row.connection_id],
                ).fetchone()[0]
            )
            if not created and not known:
                waiting = con.execute(
                    "SELECT count(*) FROM outbox.appointments WHERE appointment_id = ? AND connection_id = ? "
                    "AND action = 'create' AND status IN ('pending', 'sending') AND seq < ?",
                    [bid, row.connection_id, row.values["seq"]],
                ).fetchone()[0]
                if waiting:
                    raise Deferred  # its create is still to be delivered; build it after that
                raise P.InvalidRow(
                    f"appointment to {action} does not exist at this connection (no sent create, not in redox.appointments)"
                )

    INHERITED = (
        "start_at",
        "duration_minutes",
        "reason",
        "provider_npi",
        "location_facility",
        "location_department",
    )

    def _inherit(self, con: duckdb.DuckDBPyConnection, row: OutboxRow) -> OutboxRow:
        """A reschedule or cancel row names what changes; the rest (time, length, place, which the
        Data Model requires on every Scheduling event) comes from the appointment's latest sent row."""
        if row.kind != "appointments" or P.action_of(row) == "create":
            return row
        cur = con.execute(
            f"SELECT {', '.join(self.INHERITED)} FROM outbox.appointments WHERE appointment_id = ? AND connection_id = ? "
            "AND status IN ('sent', 'acknowledged') AND seq < ? ORDER BY seq DESC LIMIT 1",
            [P.business_id(row), row.connection_id, row.values["seq"]],
        ).fetchone()
        if cur is None:
            return row
        values = dict(row.values)
        for column, value in zip(self.INHERITED, cur, strict=True):
            if values.get(column) is None:
                values[column] = value
        return dataclasses.replace(row, values=values)

    def build(self, row: OutboxRow, con: duckdb.DuckDBPyConnection) -> P.Request:
        """The validated request for a row; InvalidRow when it cannot be one, Deferred when it
        waits for an earlier row."""
        try:
            conn = self.settings.connection(row.connection_id)
        except Exception:
            raise P.InvalidRow("connection_id is not a connection of the config") from None
        self._check_target(con, row, conn)
        patient = self._patient(con, row)
        row = self._inherit(con, row)
        surface = "fhir" if "fhir" in conn.surfaces else "datamodel"
        if surface == "fhir":
            return P.fhir_request(row, patient, conn.destination_slug, self.now())
        if "datamodel" not in conn.surfaces:
            raise P.InvalidRow(f"connection '{conn.id}' has neither a FHIR nor a Data Model surface")
        return P.datamodel_request(
            row, patient, conn.destination_id, self.now(), self.settings.environment != "Production"
        )

    # --- running -------------------------------------------------------------------------------

    def run(self, *, dry_run: bool = False, connection_id: str | None = None) -> WritebackReport:
        if connection_id is not None:
            self.settings.connection(connection_id)  # unknown: fail fast
        with writer_run_lock(self.paths):
            self.outbox.ensure()
            for kind in KINDS:
                rows = self.outbox.open_rows(kind, connection_id)
                by_conn: dict[str, list[OutboxRow]] = {}
                for row in rows:
                    by_conn.setdefault(row.connection_id, []).append(row)
                for conn_id, conn_rows in by_conn.items():
                    self._run_connection(conn_id, conn_rows, dry_run)
            if self.acknowledge and not dry_run:
                from pipelines.writeback.acks import acknowledge

                self.report.acknowledged = acknowledge(self, connection_id)
        return self.report

    def _run_connection(self, conn_id: str, rows: list[OutboxRow], dry_run: bool) -> None:
        destination: Destination | None = None
        try:
            while rows:
                built, deferred = self._build_batch(rows, dry_run)
                if built and not dry_run:
                    destination = destination or self.destination_factory(
                        self.settings, self.settings.connection(conn_id)
                    )
                    self._deliver(destination, built)
                if len(deferred) == len(rows) or dry_run:
                    break  # what they wait for did not get through: they stay pending for the next run
                rows = deferred
        finally:
            if destination is not None:
                destination.close()

    def _build_batch(
        self, rows: list[OutboxRow], dry_run: bool
    ) -> tuple[list[tuple[OutboxRow, P.Request]], list[OutboxRow]]:
        """Build every row under one lock and connection; fail the invalid ones there."""
        built: list[tuple[OutboxRow, P.Request]] = []
        deferred: list[OutboxRow] = []
        with self.outbox.connect() as con:
            for row in rows:
                try:
                    request = self.build(row, con)
                except Deferred:
                    deferred.append(row)
                    continue
                except P.InvalidRow as exc:
                    self.report.failures.append((row.kind, row.key, str(exc)))
                    if not dry_run:
                        self.outbox.mark_failed(row, str(exc), con=con)
                        self.report.failed += 1
                    continue
                if dry_run:
                    self.report.dry_run.append(
                        {
                            "kind": row.kind,
                            "id": row.key,
                            "connection_id": row.connection_id,
                            **P.describe(request),
                        }
                    )
                    continue
                built.append((row, request))
        return built, deferred

    def _deliver(self, destination: Destination, built: list[tuple[OutboxRow, P.Request]]) -> None:
        """Send in outbox order. A row left ``sending`` by an earlier run is looked up first. Writes
        to one appointment keep their order: after an unsettled one, later ones wait (pending)."""
        unknown: list[tuple[OutboxRow, P.Request]] = []
        blocked: set[str] = set()
        for row, request in built:
            chain = P.business_id(row) if row.kind == "appointments" else None
            if chain is not None and chain in blocked:
                continue  # an earlier write to this appointment is unsettled; it stays pending
            if row.status == "sending":  # a previous run's send went unanswered or was killed
                settled = self._settle(destination, row, request)
            else:
                settled = self._send(destination, row, request)
            if not settled:
                unknown.append((row, request))
                if chain is not None:
                    blocked.add(chain)
        for _ in range(AMBIGUOUS_ROUNDS):
            if not unknown:
                break
            unknown = [(r, q) for r, q in unknown if not self._settle(destination, r, q)]
        self.report.unknown += len(unknown)

    def _send(self, destination: Destination, row: OutboxRow, request: P.Request) -> bool:
        """Send once. True: settled (sent or failed). False: outcome unknown, row left ``sending``."""
        if not self.outbox.mark_sending(row, request.surface):
            return True  # another actor moved it; nothing to do
        row = OutboxRow(row.kind, row.key, row.connection_id, "sending", row.attempts + 1, row.values)
        try:
            external_id = destination.send(request)
        except Exception as exc:  # noqa: BLE001 - classified below; messages are PHI-free
            if is_refusal(exc):
                self.outbox.mark_failed(row, f"{request.operation} refused: {str(exc)[:300]}")
                self.report.failed += 1
                self.report.failures.append((row.kind, row.key, str(exc)[:300]))
                return True
            self.outbox.note_unknown(
                row,
                f"{request.operation}: no clear answer ({type(exc).__name__}); will look it up before re-sending",
            )
            return False
        self.outbox.mark_sent(row, external_id)
        self.report.sent += 1
        return True

    def _settle(self, destination: Destination, row: OutboxRow, request: P.Request) -> bool:
        """A row whose send may have committed: look first, send only if absent."""
        try:
            seen = destination.look(row, request)
        except Exception as exc:  # noqa: BLE001 - lookups are reads: try again next round/run
            self.outbox.note_unknown(
                row, f"lookup at the destination failed ({type(exc).__name__}); will retry"
            )
            return False
        if seen is not None and seen.refused and not self._cancelled_by_us(row):
            # It arrived, and the EHR refused it: never sent again.
            self.outbox.mark_refused(
                row.kind, row.key, seen.reason, "refused: seen at the destination", expect=("sending",)
            )
            self.report.found_after_unanswered_send += 1
            self.report.refused += 1
            return True
        if seen is not None:
            self.outbox.mark_sent(row, None, "found at the destination after an unanswered send")
            self.report.found_after_unanswered_send += 1
            return True
        return self._send(destination, row, request)

    def _cancelled_by_us(self, row: OutboxRow) -> bool:
        """Was the appointment cancelled by a later cancel row of ours (so a cancelled
        appointment is not the EHR refusing this row)?"""
        if row.kind != "appointments" or P.action_of(row) == "cancel":
            return False
        with self.outbox.connect() as con:
            return cancelled_later(con, row)


def run_writeback(
    settings: Any,
    warehouse: str | os.PathLike[str] | None,
    *,
    dry_run: bool = False,
    connection_id: str | None = None,
    out: Callable[[str], None] = print,
) -> WritebackReport:
    """Deliver every open outbox row of the warehouse (the CLI verb and the Dagster job call this)."""
    paths = WarehousePaths.at(warehouse)
    return Writer(settings, paths, out=out).run(dry_run=dry_run, connection_id=connection_id)
