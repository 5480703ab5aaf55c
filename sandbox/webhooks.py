"""Redox-style webhook delivery from the sandbox to registered destinations.

Follows REDOX-REFERENCE §4:

- ``register`` runs the verification handshake first (§4.1): a POST with header
  ``application-name: RedoxEngine`` and body ``{"verification-token", "challenge"}``; the
  destination passes if it answers 2xx with the challenge anywhere in the body. If the POST
  fails, the older GET variant (``?challenge=…&verification-token=…``) is tried. A destination
  that passes neither is refused with the reason and never receives data.
- Delivery (§4.2) is per destination: one worker thread, strict FIFO, at-least-once. The next
  event goes out only after a 2xx for the current one; on ≥ 400, a timeout or a connection
  error the feed pauses and the same event is retried on the documented ladder
  (``webhook_backoff_s``, then every ``webhook_steady_s``; both times ``webhook_time_scale``).
  Every push carries ``verification-token`` and ``Content-Type: application/json``.
- ``Meta.Logs[0].ID`` is assigned per destination when the event is queued and stays the same
  across retries and injected duplicates; every attempt gets a fresh ``AttemptID`` (§4.3).
- Realism knobs, from one seeded RNG per destination: ``webhook_duplicate_rate`` re-delivers an
  already delivered event (same Log ID), ``webhook_reorder`` swaps an event with the next one.
  Both come from ``faults.rate`` (a fault override, else the config value).

Events are queued only for destinations registered when ``enqueue`` runs.

Which family a connection's events are pushed in (``push_families``): FHIR notification
Bundles for FHIR-only connections, Data Model events for connections that speak the Data
Model, both for a dual connection when ``webhook_fhir`` is on; ``ConnectionSpec.webhook_family``
overrides it per connection. A FHIR notification carries no ``Meta``: its Log ID lives only in
the sender's bookkeeping and the receiver de-duplicates on the Bundle id, which is the same on
every re-delivery.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson

from sandbox.config import ConnectionSpec, SandboxConfig
from sandbox.population.records import PULL_ONLY_ENTITIES, Change

log = logging.getLogger("sandbox.webhooks")

RenderEvent = Callable[[Change, ConnectionSpec], "dict[str, Any] | list[dict[str, Any]] | None"]


class FaultRates(Protocol):
    def rate(self, name: str, connection_id: str | None = None) -> float: ...


@dataclass
class _Event:
    payload: dict[str, Any]
    log_id: str
    connection_id: str
    duplicate: bool = False  # an injected re-delivery of an event already delivered
    reorder_decided: bool = False


@dataclass
class _Destination:
    id: str
    url: str
    token: str
    verification_method: str
    rng: random.Random
    queue: deque[_Event] = field(default_factory=deque)
    wake: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None


def push_families(config: SandboxConfig, conn: ConnectionSpec) -> tuple[str, ...]:
    """The payload families ``conn``'s events are pushed in: ``fhir`` and/or ``datamodel``."""
    family = conn.webhook_family
    if family == "fhir":
        return ("fhir",)
    if family == "datamodel":
        return ("datamodel",)
    if family == "both":
        return ("datamodel", "fhir")
    if "datamodel" not in conn.surfaces:
        return ("fhir",) if "fhir" in conn.surfaces else ()
    if config.webhook_fhir and "fhir" in conn.surfaces:
        return ("datamodel", "fhir")
    return ("datamodel",)


def family_renderer(
    config: SandboxConfig, datamodel_render: RenderEvent, fhir_render: RenderEvent
) -> RenderEvent:
    """A ``RenderEvent`` that renders each change in its connection's families."""

    def render(change: Change, conn: ConnectionSpec) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for family in push_families(config, conn):
            if family == "fhir" and change.entity in PULL_ONLY_ENTITIES:
                continue  # Redox pushes no FHIR notification for these: clients pull them
            rendered = (datamodel_render if family == "datamodel" else fhir_render)(change, conn)
            out.extend(rendered if isinstance(rendered, list) else [rendered] if rendered else [])
        return out

    return render


def _is_success(status: int) -> bool:
    return 200 <= status < 300


class WebhookSender:
    def __init__(self, config: SandboxConfig, render_event: RenderEvent, faults: FaultRates) -> None:
        self._config = config
        self._render = render_event
        self._faults = faults
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._destinations: dict[str, _Destination] = {}  # by URL
        self._delivered_logs: set[str] = set()
        self._deliveries = 0
        self._client = httpx.Client(timeout=config.webhook_timeout_s, follow_redirects=False)

    # ---- registration ---------------------------------------------------------------------

    def register(self, url: str, token: str) -> dict[str, Any]:
        """Verify ``url`` (POST, then GET) and start delivering to it; the result says why not."""
        if self._stopping.is_set():
            return {"url": url, "verified": False, "reason": "the webhook sender is shut down"}
        post_problem = self._verify_post(url, token)
        method = "POST"
        if post_problem is not None:
            get_problem = self._verify_get(url, token)
            if get_problem is not None:
                reason = f"verification failed: POST {post_problem}; GET {get_problem}"
                log.info("webhook destination refused: %s", reason)
                return {"url": url, "verified": False, "reason": reason}
            method = "GET"
        with self._lock:
            dest = self._destinations.get(url)
            if dest is None:
                dest = _Destination(
                    id=str(uuid.uuid4()),
                    url=url,
                    token=token,
                    verification_method=method,
                    rng=random.Random(f"{self._config.seed}:webhook:{len(self._destinations)}"),
                )
                dest.thread = threading.Thread(
                    target=self._worker, args=(dest,), name="webhook-sender", daemon=True
                )
                self._destinations[url] = dest
                dest.thread.start()
            else:
                with dest.wake:
                    dest.token, dest.verification_method = token, method
        return {"id": dest.id, "url": url, "verified": True, "verification_method": method, "reason": None}

    def _verify_post(self, url: str, token: str) -> str | None:
        challenge = str(uuid.uuid4())
        try:
            resp = self._client.post(
                url,
                content=orjson.dumps({"verification-token": token, "challenge": challenge}),
                headers={"application-name": "RedoxEngine", "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            return f"error code: {type(exc).__name__}"
        return self._challenge_problem(resp, challenge)

    def _verify_get(self, url: str, token: str) -> str | None:
        challenge = str(uuid.uuid4())
        try:
            resp = self._client.get(
                url,
                params={"challenge": challenge, "verification-token": token},
                headers={"application-name": "RedoxEngine", "verification-token": token},
            )
        except httpx.HTTPError as exc:
            return f"error code: {type(exc).__name__}"
        return self._challenge_problem(resp, challenge)

    @staticmethod
    def _challenge_problem(resp: httpx.Response, challenge: str) -> str | None:
        if not _is_success(resp.status_code):
            return f"HTTP response code {resp.status_code}"
        if challenge not in resp.text:
            return "the 2xx response did not contain the challenge"
        return None

    # ---- queueing -------------------------------------------------------------------------

    def enqueue(
        self, changes: Iterable[Change], connections: Iterable[ConnectionSpec] | Mapping[str, ConnectionSpec]
    ) -> int:
        """Render ``changes`` and queue them for every registered destination; returns the
        number of events queued per destination."""
        if self._stopping.is_set():
            return 0
        by_id = dict(connections) if isinstance(connections, Mapping) else {c.id: c for c in connections}
        with self._lock:
            destinations = list(self._destinations.values())
        if not destinations:
            return 0
        rendered: list[tuple[str, dict[str, Any]]] = []
        for change in changes:
            conn = by_id.get(change.record.connection_id)
            if conn is None:
                continue
            out = self._render(change, conn)
            payloads = out if isinstance(out, list) else [out] if out else []
            rendered.extend((conn.id, p) for p in payloads)
        return self.enqueue_payloads(rendered)

    def enqueue_payloads(self, payloads: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Queue already rendered ``(connection_id, payload)`` pairs for every registered
        destination (e.g. write-back outcomes, ``sandbox.write_acks``), after whatever is
        queued; returns the number queued per destination."""
        if self._stopping.is_set():
            return 0
        rendered = list(payloads)
        with self._lock:
            destinations = list(self._destinations.values())
        if not destinations or not rendered:
            return 0
        for dest in destinations:
            events = []
            for connection_id, payload in rendered:
                own = copy.deepcopy(payload)
                events.append(_Event(own, self._assign_log_id(own), connection_id))
            with dest.wake:
                dest.queue.extend(events)
                dest.wake.notify()
        return len(rendered)

    @staticmethod
    def _assign_log_id(payload: dict[str, Any]) -> str:
        """One Log per destination (REDOX-REFERENCE §4.4); its ID never changes afterwards."""
        log_id = str(uuid.uuid4())
        meta = payload.get("Meta")
        if isinstance(meta, dict):
            meta["Logs"] = [{"ID": log_id, "AttemptID": log_id}]
        return log_id

    # ---- delivery -------------------------------------------------------------------------

    def _retry_delay(self, failures: int) -> float:
        ladder = self._config.webhook_backoff_s
        step = ladder[failures - 1] if failures - 1 < len(ladder) else self._config.webhook_steady_s
        return max(0.0, float(step) * float(self._config.webhook_time_scale))

    def _next_event(self, dest: _Destination) -> _Event | None:
        with dest.wake:
            while not dest.queue and not self._stopping.is_set():
                dest.wake.wait()
            if self._stopping.is_set():
                return None
            head = dest.queue[0]
            if not head.reorder_decided and len(dest.queue) > 1:
                head.reorder_decided = True
                if dest.rng.random() < self._faults.rate("webhook_reorder", head.connection_id):
                    dest.queue[0], dest.queue[1] = dest.queue[1], head
                    dest.queue[0].reorder_decided = True
            return dest.queue[0]

    def _attempt(self, dest: _Destination, event: _Event) -> bool:
        meta = event.payload.get("Meta")
        if isinstance(meta, dict):
            meta["Logs"] = [{"ID": event.log_id, "AttemptID": str(uuid.uuid4())}]
        headers = {"verification-token": dest.token, "Content-Type": "application/json"}
        status: int | str
        try:
            resp = self._client.post(dest.url, content=orjson.dumps(event.payload), headers=headers)
            status = resp.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        with self._lock:
            self._deliveries += 1
        if isinstance(status, int) and _is_success(status):
            return True
        log.info("webhook delivery to destination %s failed (%s); the feed is paused", dest.id, status)
        return False

    def _worker(self, dest: _Destination) -> None:
        while True:
            event = self._next_event(dest)
            if event is None:
                return
            failures = 0
            while not self._attempt(dest, event):
                failures += 1
                if self._stopping.wait(self._retry_delay(failures)):
                    return
            with self._lock:
                self._delivered_logs.add(event.log_id)
            with dest.wake:
                dest.queue.popleft()
                rate = self._faults.rate("webhook_duplicate_rate", event.connection_id)
                if not event.duplicate and dest.rng.random() < rate:
                    # At-least-once: the same Log goes out again, as after a lost acknowledgement.
                    dest.queue.appendleft(
                        _Event(
                            event.payload,
                            event.log_id,
                            event.connection_id,
                            duplicate=True,
                            reorder_decided=True,
                        )
                    )

    # ---- reporting and shutdown -----------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            destinations = list(self._destinations.values())
            out = {"distinct_sent": len(self._delivered_logs), "deliveries": self._deliveries}
        pending = 0
        for dest in destinations:
            with dest.wake:
                pending += sum(1 for e in dest.queue if not e.duplicate)
        out["pending"] = pending
        return out

    def destinations(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"id": d.id, "url": d.url, "verification_method": d.verification_method}
                for d in self._destinations.values()
            ]

    def close(self) -> None:
        """Stop every worker (undelivered events are dropped) and release the HTTP client."""
        self._stopping.set()
        with self._lock:
            destinations = list(self._destinations.values())
        for dest in destinations:
            with dest.wake:
                dest.wake.notify_all()
        for dest in destinations:
            if dest.thread is not None and dest.thread is not threading.current_thread():
                dest.thread.join(timeout=self._config.webhook_timeout_s + 5.0)
        self._client.close()
