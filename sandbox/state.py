"""Everything one running sandbox holds, shared by its route modules.

Route modules (``sandbox.auth``, ``sandbox.fhir.routes``, ``sandbox.datamodel.routes``,
``sandbox.control``) each expose ``routes(state) -> list[BaseRoute]``; ``sandbox.app``
composes them. Nothing here is Redox-shaped; it is the sandbox's own plumbing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sandbox.config import ConnectionSpec, SandboxConfig

ACCEPTED, REJECTED = "accepted", "rejected"

if TYPE_CHECKING:
    from sandbox.auth import AuthServer
    from sandbox.faults import Faults
    from sandbox.population.store import RecordStore
    from sandbox.webhooks import WebhookSender


@dataclass
class WriteRecord:
    kind: str  # "orders" | "appointments"
    order_id: str  # order id, or the appointment's visit number
    connection_id: str
    surface: str  # "fhir" | "datamodel"
    idempotency_key: str | None
    event: str  # e.g. "Order-New", "Scheduling-Cancel"
    payload: dict[str, Any]
    received_at: str
    duplicate: bool  # informational: this (connection, id, event) was received before
    outcome: str = ACCEPTED  # the EHR's verdict: "accepted" | "rejected" (pushed back later)
    reason: str | None = None  # the EHR's reason for a rejection

    def to_json(self) -> dict[str, Any]:
        d = {
            "order_id": self.order_id,
            "connection_id": self.connection_id,
            "surface": self.surface,
            "idempotency_key": self.idempotency_key,
            "event": self.event,
            "payload": self.payload,
            "received_at": self.received_at,
            "duplicate": self.duplicate,
            "outcome": self.outcome,
            "reason": self.reason,
        }
        if self.kind == "appointments":
            d["appointment_id"] = self.order_id
        return d


@dataclass
class WriteLog:
    """Every write-back received, duplicates included, as Redox and the EHR would keep them.

    Redox has no idempotency mechanism, so nothing here de-duplicates: a client that sends the
    same order twice has placed it twice. ``duplicate`` only marks the repeat for tests.

    Each write also carries the EHR's verdict (``outcome``, ``reason``), decided when it is
    received and reported back asynchronously (``sandbox.write_acks``): a write the EHR refused
    leaves the order revoked / the appointment cancelled, and every later write to the same
    order or appointment is refused with the same reason (there is nothing left to change). A
    cancel of something the EHR holds is always accepted; any other write is refused when the
    ``write_reject_rate`` fault says so (``refusal``).
    """

    writes: list[WriteRecord] = field(default_factory=list)
    _seen: set[tuple[str, str, str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(
        self,
        kind: str,
        order_id: str,
        connection_id: str,
        surface: str,
        idempotency_key: str | None,
        event: str,
        payload: dict[str, Any],
        fingerprint: str,
        refusal: str | None = None,
    ) -> WriteRecord:
        """Store one received write. ``idempotency_key`` (a header Redox ignores) and
        ``fingerprint`` are kept for inspection only; neither suppresses anything. ``refusal``
        is the fault's reason to refuse it (``Faults.write_refusal``), if any."""
        del fingerprint  # the content hash does not make two writes one
        with self._lock:
            key = (connection_id, kind, order_id, event)
            duplicate = key in self._seen
            self._seen.add(key)
            reason = next(
                (
                    w.reason or ""
                    for w in reversed(self.writes)
                    if w.outcome == REJECTED
                    and (w.connection_id, w.kind, w.order_id) == (connection_id, kind, order_id)
                ),
                None,
            )
            if reason is None and not event.endswith("-Cancel"):
                reason = refusal
            w = WriteRecord(
                kind=kind,
                order_id=order_id,
                connection_id=connection_id,
                surface=surface,
                idempotency_key=idempotency_key,
                event=event,
                payload=payload,
                received_at=datetime.now(UTC).isoformat(),
                duplicate=duplicate,
                outcome=ACCEPTED if reason is None else REJECTED,
                reason=reason,
            )
            self.writes.append(w)
            return w

    def history(self, connection_id: str, kind: str, business_id: str) -> list[WriteRecord]:
        """Every write to one order / appointment of a connection, oldest first."""
        with self._lock:
            return [
                w
                for w in self.writes
                if (w.connection_id, w.kind, w.order_id) == (connection_id, kind, business_id)
            ]

    def to_json(self) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            out: dict[str, list[dict[str, Any]]] = {"orders": [], "appointments": []}
            for w in self.writes:
                out[w.kind].append(w.to_json())
            return out


@dataclass
class SandboxState:
    config: SandboxConfig
    store: RecordStore
    auth: AuthServer
    faults: Faults
    webhooks: WebhookSender
    writes: WriteLog = field(default_factory=WriteLog)
    base_url: str = ""  # e.g. http://127.0.0.1:8123, set once the server is bound

    def connection_by_slug(self, slug: str) -> ConnectionSpec | None:
        return next((c for c in self.config.connections if c.slug == slug), None)

    def connection_by_destination(self, destination_id: str) -> ConnectionSpec | None:
        return next((c for c in self.config.connections if c.destination_id == destination_id), None)

    def fhir_base_url(self, conn: ConnectionSpec) -> str:
        return f"{self.base_url}/fhir/R4/{conn.slug}/{self.config.environment}"
