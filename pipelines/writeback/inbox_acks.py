"""Acknowledgements by event: the EHR's pushed outcome of a write-back settles its outbox row.

Redox write-back is asynchronous: a 200 means received, and the EHR's outcome comes back
through the organization's webhook feed (REDOX-REFERENCE "Decisions", §3.5, §12.3). The inbox
processing (``pipelines.inbox.process``) hands every message to ``settle_pushed_outcomes``; a
message about one of our writes — same connection, and the order id / visit number the write
carried — moves the matching outbox row from ``sent`` (or ``sending``: an outcome proves the
write arrived) to ``acknowledged``, or to ``failed`` with the EHR's reason. No lookup is needed.

What counts as an outcome:

- Data Model ``Order`` events carrying ``Order.ID``: ``Order.Cancel`` (or a ``Canceled``
  status) refuses, with the last ``Order.Notes`` entry as the reason; ``New`` / ``Update``
  accept. ``Scheduling`` events carrying ``Visit.VisitNumber``: ``New`` accepts a create,
  ``Reschedule`` / ``Modification`` an update, ``Cancel`` (with ``Visit.CancelReason``) is
  either our own cancel applied or the EHR refusing a create / update.
- FHIR notifications whose ServiceRequest / Appointment carries our identifier
  (``urn:redox-elt:outbox:OrderID`` / ``…:VN``, or the EHR's own ``…:OrderID`` / ``…:VN``
  system): ``ServiceRequest.status`` ``revoked`` refuses (reason: the last ``note``);
  ``Appointment.status`` ``cancelled`` is a cancel (reason: ``cancelationReason.text``); any
  other status accepts (``…Booked`` a create, ``…Updated`` an update).

An appointment's outcome settles the oldest in-flight row of that appointment that it answers:
a cancel settles our own in-flight cancel when there is one (acknowledged), else it refuses the
oldest in-flight create / update. Duplicated or late outcomes find nothing in flight and change
nothing, so re-processing the inbox is idempotent.

An order's outcome is *consumed* here (the common model has no entity for orders the client
placed; the inbox does not load it as clinical data). Appointment outcomes are also loaded by
the inbox like any Scheduling event: the EHR now holds that appointment. The EHR's reason is
stored in ``last_error`` only; logs carry counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from pipelines.inbox.envelope import FAMILY_DATAMODEL, FAMILY_FHIR, message_header, parse_body
from pipelines.warehouse import table_exists
from pipelines.writeback import payloads as P
from pipelines.writeback.outbox import refusal_text

log = logging.getLogger(__name__)

ACCEPTED, REFUSED, CANCEL = "accepted", "refused", "cancel"
_CANCELLED_WORDS = frozenset({"canceled", "cancelled", "cancel"})
_SCHEDULING_ACTIONS = {"New": "create", "Reschedule": "update", "Modification": "update", "Cancel": "cancel"}


@dataclass(frozen=True)
class Outcome:
    """What one pushed message says about one of our writes."""

    kind: str  # "orders" | "appointments"
    business_id: str  # order id / visit number (outbox.orders.order_id / outbox.appointments.appointment_id)
    verdict: str  # ACCEPTED | REFUSED | CANCEL (appointments: our cancel applied, or a refusal)
    action: str | None  # appointments: the write it answers ("create" | "update" | "cancel")
    reason: str | None  # EHR text: stored in the outbox, never logged
    described: str  # how it arrived, vocabulary only (e.g. "Order.Update event")


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):  # VisitNumber is sometimes a number on the wire (REDOX-REFERENCE §2.9)
        return str(value)
    return _text(value)


def _last_note(notes: Any) -> str | None:
    for note in reversed(notes if isinstance(notes, list) else []):
        text = _text(note.get("text") if isinstance(note, dict) else note)
        if text:
            return text
    return None


def _datamodel_outcome(payload: dict[str, Any]) -> Outcome | None:
    meta = _obj(payload.get("Meta"))
    model, event = meta.get("DataModel"), meta.get("EventType")
    described = f"{model}.{event} event"
    if model == "Order":
        order = _obj(payload.get("Order"))
        order_id = _id(order.get("ID"))
        if order_id is None or event not in ("New", "Update", "Cancel"):
            return None
        refused = event == "Cancel" or str(order.get("Status") or "").lower() in _CANCELLED_WORDS
        reason = _last_note(order.get("Notes")) if refused else None
        return Outcome("orders", order_id, REFUSED if refused else ACCEPTED, None, reason, described)
    if model == "Scheduling":
        visit = _obj(payload.get("Visit"))
        number = _id(visit.get("VisitNumber"))
        action = _SCHEDULING_ACTIONS.get(str(event))
        if number is None or action is None:
            return None
        if action == "cancel":
            return Outcome(
                "appointments", number, CANCEL, "cancel", _text(visit.get("CancelReason")), described
            )
        return Outcome("appointments", number, ACCEPTED, action, None, described)
    return None


def _our_id(resource: dict[str, Any], system: str, suffix: str) -> str | None:
    """The business id the resource carries: our outbox system first, else the EHR's own."""
    idents = [_obj(i) for i in resource.get("identifier") or []]
    for wanted in (lambda s: s == system, lambda s: s.endswith(suffix)):
        for ident in idents:
            if wanted(str(ident.get("system") or "")) and _text(ident.get("value")):
                return str(ident["value"])
    return None


def _focus(bundle: dict[str, Any], header: dict[str, Any]) -> dict[str, Any] | None:
    entries = [_obj(e) for e in (bundle.get("entry") or [])[1:]]
    references = {_obj(f).get("reference") for f in header.get("focus") or []}
    for entry in entries:
        if entry.get("fullUrl") in references and isinstance(entry.get("resource"), dict):
            return entry["resource"]
    return next(
        (
            e["resource"]
            for e in entries
            if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") != "Patient"
        ),
        None,
    )


def _fhir_outcome(bundle: dict[str, Any]) -> Outcome | None:
    header = message_header(bundle)
    if header is None:
        return None
    focus = _focus(bundle, header)
    if focus is None:
        return None
    event = str(header.get("eventUri") or "").rsplit("/", 1)[-1] or "unnamed"
    described = f"{event} notification"
    status = focus.get("status")
    if focus.get("resourceType") == "ServiceRequest":
        order_id = _our_id(focus, P.ORDER_ID_SYSTEM, ":OrderID")
        if order_id is None:
            return None
        if status in ("revoked", "entered-in-error"):
            return Outcome("orders", order_id, REFUSED, None, _last_note(focus.get("note")), described)
        return Outcome("orders", order_id, ACCEPTED, None, None, described)
    if focus.get("resourceType") == "Appointment":
        number = _our_id(focus, P.VISIT_NUMBER_SYSTEM, ":VN")
        if number is None:
            return None
        if status == "cancelled":
            reason = _text(_obj(focus.get("cancelationReason")).get("text"))
            return Outcome("appointments", number, CANCEL, "cancel", reason, described)
        if status in ("booked", "pending", "proposed", "arrived", "fulfilled"):
            action = "update" if event.endswith(("Updated", "Rescheduled")) else "create"
            return Outcome("appointments", number, ACCEPTED, action, None, described)
    return None


# Bytes every outcome body holds, per family: a cheap test before parsing (Media events are large).
_MARKERS = {
    FAMILY_DATAMODEL: (b'"Order"', b'"Scheduling"'),
    FAMILY_FHIR: (b'"ServiceRequest"', b'"Appointment"'),
}


def read_outcome(family: str, body: bytes) -> Outcome | None:
    """The write-back outcome a pushed message carries, if it is shaped like one."""
    if not any(marker in body for marker in _MARKERS.get(family, ())):
        return None
    try:
        payload = parse_body(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    if family == FAMILY_DATAMODEL:
        return _datamodel_outcome(payload)
    if family == FAMILY_FHIR and payload.get("resourceType") == "Bundle":
        return _fhir_outcome(payload)
    return None


def _settle_order(con: duckdb.DuckDBPyConnection, connection_id: str, outcome: Outcome) -> str | None:
    if outcome.verdict == ACCEPTED:
        found = con.execute(
            "UPDATE outbox.orders SET status = 'acknowledged', acknowledged_at = now(), updated_at = now(), "
            "acknowledgement = ? WHERE order_id = ? AND connection_id = ? AND status IN ('sending', 'sent') "
            "RETURNING 1",
            [f"acknowledged by the EHR: {outcome.described}", outcome.business_id, connection_id],
        ).fetchall()
        return ACCEPTED if found else None
    found = con.execute(
        "UPDATE outbox.orders SET status = 'failed', last_error = ?, acknowledged_at = now(), updated_at = now(), "
        "acknowledgement = ? WHERE order_id = ? AND connection_id = ? AND status IN ('sending', 'sent') "
        "RETURNING 1",
        [refusal_text(outcome.reason), f"refused: {outcome.described}", outcome.business_id, connection_id],
    ).fetchall()
    return REFUSED if found else None


def _settle_appointment(con: duckdb.DuckDBPyConnection, connection_id: str, outcome: Outcome) -> str | None:
    in_flight = con.execute(
        "SELECT request_id, action FROM outbox.appointments WHERE appointment_id = ? AND connection_id = ? "
        "AND status IN ('sending', 'sent') ORDER BY seq",
        [outcome.business_id, connection_id],
    ).fetchall()
    target, verdict = None, ACCEPTED
    if outcome.verdict == CANCEL:
        target = next((rid for rid, action in in_flight if action == "cancel"), None)
        if target is None:  # we did not ask to cancel it: the EHR refused the create / update
            target = next((rid for rid, action in in_flight if action != "cancel"), None)
            verdict = REFUSED
    else:
        target = next((rid for rid, action in in_flight if action == outcome.action), None)
    if target is None:
        return None
    if verdict == ACCEPTED:
        con.execute(
            "UPDATE outbox.appointments SET status = 'acknowledged', acknowledged_at = now(), updated_at = now(), "
            "acknowledgement = ? WHERE request_id = ?",
            [f"acknowledged by the EHR: {outcome.described}", target],
        )
    else:
        con.execute(
            "UPDATE outbox.appointments SET status = 'failed', last_error = ?, acknowledged_at = now(), "
            "updated_at = now(), acknowledgement = ? WHERE request_id = ?",
            [refusal_text(outcome.reason), f"refused: {outcome.described}", target],
        )
    return verdict


def _ours(con: duckdb.DuckDBPyConnection, connection_id: str, outcome: Outcome) -> bool:
    table, column = ("orders", "order_id") if outcome.kind == "orders" else ("appointments", "appointment_id")
    return bool(
        con.execute(
            f"SELECT count(*) FROM outbox.{table} WHERE {column} = ? AND connection_id = ?",
            [outcome.business_id, connection_id],
        ).fetchone()[0]
    )


def settle_outcomes(
    con: duckdb.DuckDBPyConnection, messages: Sequence[tuple[str | None, str, bytes] | None]
) -> list[bool]:
    """Settle the outbox rows the messages answer. ``messages``: ``(connection_id, family,
    body)`` per message, or None to skip one. Returns, per message, whether it is the outcome
    of one of our orders (consumed: the caller loads nothing for it)."""
    return _settle(con, _read_all(messages), len(messages))


def _read_all(
    messages: Sequence[tuple[str | None, str, bytes] | None],
) -> list[tuple[int, str, Outcome]]:
    out = []
    for i, item in enumerate(messages):
        if item is None or not item[0]:
            continue
        outcome = read_outcome(item[1], bytes(item[2]))
        if outcome is not None:
            out.append((i, item[0], outcome))
    return out


def _settle(con: duckdb.DuckDBPyConnection, outcomes: list[tuple[int, str, Outcome]], n: int) -> list[bool]:
    consumed = [False] * n
    if not outcomes or not table_exists(con, "outbox", "orders"):
        return consumed
    counts = {ACCEPTED: 0, REFUSED: 0}
    for i, connection_id, outcome in outcomes:
        if not _ours(con, connection_id, outcome):
            continue
        settle = _settle_order if outcome.kind == "orders" else _settle_appointment
        verdict = settle(con, connection_id, outcome)
        if verdict is not None:
            counts[verdict] += 1
        consumed[i] = outcome.kind == "orders"
    if counts[ACCEPTED] or counts[REFUSED]:
        log.info(
            "write-back outcomes from the webhook feed: %d acknowledged, %d refused by the EHR",
            counts[ACCEPTED],
            counts[REFUSED],
        )
    return consumed


def settle_pushed_outcomes(
    duckdb_path: Path, messages: Sequence[tuple[str | None, str, bytes] | None]
) -> list[bool]:
    """``settle_outcomes`` on the warehouse at ``duckdb_path``, connecting only when some message
    is shaped like an outcome. The caller holds the warehouse's writer lock."""
    outcomes = _read_all(messages)
    if not outcomes:
        return [False] * len(messages)
    with duckdb.connect(str(duckdb_path)) as con:
        return _settle(con, outcomes, len(messages))
