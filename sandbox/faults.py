"""Fault injection and the per-client request quota for the sandbox's API surfaces.

Tests turn faults on with ``POST /_sandbox/faults`` (the control route hands the body to
``Faults.set``); the FHIR and Data Model routes call ``Faults.gate`` after auth and before any
work, the write routes call ``roll(conn, "timeout_after_commit")`` and ``stall`` after committing,
and the webhook sender asks ``rate``. A fault is global unless the body names a
``"connection"``; a connection's own value overrides the global one.

**Quota** (REDOX-REFERENCE §12.6): one rolling window per authenticated client (OAuth client
id, or legacy apiKey), shared by every connection and both surfaces: ``quota_requests`` per
``quota_window_s`` (7,500 per 5 minutes by default). Over it: HTTP 429 with
``X-RateLimit-Limit: <limit>`` and no ``Retry-After`` unless the connection sets
``retry_after``. The ``rate_limit_rps`` fault adds a rolling one-second window per connection.
Only accepted requests are counted, so a client that keeps retrying into a 429 recovers as soon
as the oldest accepted request leaves the window. ``quota_usage()`` reports each client's use.

**Response faults**, applied to bodies the routes already rendered (``shape_query`` for Data
Model query answers, ``mangle`` for every response body, ``damage_ndjson`` for bulk files):

- ``partial_failure_rate`` (§12.11): that share of queries answer HTTP 200 while "the EHR
  failed": Data Model ``Meta.Errors[{ID, Text, Type: "query", Module: "Send",
  DestinationStatusCode}]`` with the result lists emptied; FHIR searches a Bundle whose only
  entry is an OperationOutcome (``search.mode: "outcome"``, severity ``error``).
- ``bad_entry_rate``: that share of served records (FHIR resources in searchset Bundles and
  NDJSON lines, Data Model records in query answers) carries one defect from ``DEFECTS``.
  Which records, and which defect, is a hash of the seed and the record's id, so the same
  record is damaged on every read while the fault is set and served whole once it is cleared.
- ``malformed_rate``: the body is cut short (invalid JSON).

**The EHR's verdict on write-backs**: ``write_reject_rate`` makes the EHR refuse that share of
the orders and appointments written back (Redox accepts the write; the refusal comes back later,
asynchronously, see ``sandbox.write_acks``). Which writes, and which reason from
``WRITE_REJECT_REASONS``, is a hash of the seed, the connection, the kind and the business id
(order id / visit number), so the same write is refused on every run with the same seed.

Every other random decision comes from one ``random.Random(seed)`` behind a lock, so a run with
the same seed and the same request order sees the same faults.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from sandbox import damage
from sandbox.config import ConnectionSpec, SandboxConfig
from sandbox.http import FHIR_JSON, redox_json

# Faults that are probabilities in [0, 1].
PROBABILITY_FAULTS = (
    "error_rate",
    "timeout_rate",
    "timeout_after_commit_rate",
    "drop_rate",
    "malformed_rate",
    "webhook_duplicate_rate",
    "webhook_reorder",
    "partial_failure_rate",
    "bad_entry_rate",
    "write_reject_rate",
)
OTHER_FAULTS = ("rate_limit_rps", "latency_ms", "token_lifetime_s", "timeout_s")
FAULT_NAMES = PROBABILITY_FAULTS + OTHER_FAULTS
GLOBAL_ONLY = frozenset({"token_lifetime_s"})  # tokens are not tied to one connection
DEFAULT_TIMEOUT_S = 10.0
INJECTED_ERROR_STATUSES = (500, 502, 503)
# What the EHR says when ``write_reject_rate`` refuses a write (the reason the outcome carries).
WRITE_REJECT_REASONS: dict[str, tuple[str, ...]] = {
    "orders": (
        "unknown ordering provider",
        "procedure not orderable at this facility",
        "patient not registered at the ordering facility",
    ),
    "appointments": (
        "slot no longer available",
        "provider not available at this time",
        "department not accepting appointments",
    ),
}

log = logging.getLogger(__name__)
# Meta.Errors[].ID of injected partial failures (numeric, like Redox's recorded ones).
_error_ids = itertools.count(91_000_001)

_FHIR_JSON = FHIR_JSON
_ISSUE_CODES = {429: "throttled", 500: "exception", 502: "transient", 503: "transient", 504: "timeout"}
_MESSAGES = {
    500: "An unknown error occurred in Redox",
    502: "The request was dropped inside Redox; retry it",
    503: "Redox is temporarily unavailable; retry it",
    504: "The request timed out",
}


class ConnectionDropped(Exception):
    """Raised on purpose after a partial response so the server aborts the connection."""


class _HideDroppedConnections(logging.Filter):
    """Keep uvicorn from printing a traceback for every drop the sandbox injects on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionDropped))


def _install_log_filter() -> None:
    target = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideDroppedConnections) for f in target.filters):
        target.addFilter(_HideDroppedConnections())


class DroppedConnectionResponse(Response):
    """Announces a full body in Content-Length, sends half of it, then aborts.

    The client sees a broken connection (an incomplete body), the way a reset mid-transfer
    looks. Raising is the only way an ASGI app can make the server close the connection.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send(
            {"type": "http.response.body", "body": self.body[: len(self.body) // 2], "more_body": True}
        )
        log.info("drop_rate fault: aborting a response mid-body on purpose")
        raise ConnectionDropped("sandbox fault drop_rate: connection dropped mid-response on purpose")


def is_fhir_request(request: Request) -> bool:
    return request.url.path.startswith("/fhir/")


def error_response(
    request: Request, status: int, text: str, headers: dict[str, str] | None = None
) -> Response:
    """A Redox-style error: OperationOutcome on FHIR paths, ``Meta.Errors`` on Data Model paths."""
    if is_fhir_request(request):
        body: dict[str, Any] = {
            "resourceType": "OperationOutcome",
            "issue": [
                {"severity": "error", "code": _ISSUE_CODES.get(status, "exception"), "diagnostics": text}
            ],
        }
        response = redox_json(body, status, _FHIR_JSON)
    else:
        response = redox_json(
            {"Meta": {"Errors": [{"Text": text, "Type": "request", "Module": "Gateway"}]}}, status
        )
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


# ``{"webhook_reorder": true}`` switches on Redox's "occasional" out-of-order delivery: this
# share of events swaps places with the next one (a number sets the share itself).
WEBHOOK_REORDER_ON = 0.2


def _validate(name: str, value: Any) -> float | int:
    if name == "webhook_reorder" and isinstance(value, bool):
        return WEBHOOK_REORDER_ON if value else 0.0
    number = _number(name, value)
    if name in PROBABILITY_FAULTS:
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"{name} must be a probability between 0 and 1, got {value!r}")
        return number
    if name == "rate_limit_rps":
        if number < 1 or not number.is_integer():
            raise ValueError(
                f"rate_limit_rps must be a whole number of requests per second >= 1, got {value!r}"
            )
        return int(number)
    if name == "token_lifetime_s" and number <= 0:
        raise ValueError(f"token_lifetime_s must be > 0 seconds, got {value!r}")
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


def _prune(window: deque[float], horizon: float) -> None:
    while window and window[0] <= horizon:
        window.popleft()


@dataclass
class _ClientQuota:
    """One client's rolling window: timestamps of accepted requests, oldest first."""

    accepted: deque[float] = field(default_factory=deque)
    total: int = 0
    rejected: int = 0


class Faults:
    """The active faults, the per-client quota, the per-connection rps windows and the RNG."""

    def __init__(self, config: SandboxConfig, seed: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._seed = seed
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._global: dict[str, float | int] = {}
        self._scoped: dict[str, dict[str, float | int]] = {}
        # connection id -> timestamps of requests accepted under the rate_limit_rps fault
        self._rps_windows: dict[str, deque[float]] = {}
        self._quotas: dict[str, _ClientQuota] = {}
        self._client_of: Callable[[str | None], str | None] = lambda header: None
        self._partial_failures = itertools.count(1)
        _install_log_filter()

    def bind_clients(self, client_of: Callable[[str | None], str | None]) -> None:
        """How to name the client behind an ``Authorization`` header (``AuthServer.client_of``)."""
        self._client_of = client_of

    # ---- configuration ------------------------------------------------------------------

    def set(self, body: dict) -> dict:
        """Apply a ``POST /_sandbox/faults`` body; return the new snapshot.

        ``{}`` clears every fault; ``{"connection": id}`` alone clears that connection's. A
        ``null`` value clears one fault. ``revoke_tokens`` is validated but acted on by the
        caller. The whole body is validated before anything changes.
        """
        if not isinstance(body, dict):
            raise ValueError("faults: body must be a JSON object")
        connection = body.get("connection")
        if connection is not None:
            if not isinstance(connection, str):
                raise ValueError(f"connection must be a connection id string, got {connection!r}")
            try:
                self._config.connection(connection)
            except KeyError:
                known = ", ".join(c.id for c in self._config.connections)
                raise ValueError(f"connection: unknown connection '{connection}' (known: {known})") from None
        revoke = body.get("revoke_tokens")
        if revoke is not None and not isinstance(revoke, bool | str):
            raise ValueError("revoke_tokens must be true/false or a client id")
        changes: dict[str, float | int | None] = {}
        for name, value in body.items():
            if name in ("connection", "revoke_tokens"):
                continue
            if name not in FAULT_NAMES:
                raise ValueError(f"unknown fault '{name}' (known: {', '.join(FAULT_NAMES)})")
            if connection is not None and name in GLOBAL_ONLY:
                raise ValueError(f"{name} is global: it cannot be scoped to a connection")
            changes[name] = None if value is None else _validate(name, value)
        with self._lock:
            if not body:
                self._global.clear()
                self._scoped.clear()
            elif not changes and "revoke_tokens" not in body:
                self._scoped.pop(connection, None)
            else:
                target = self._global if connection is None else self._scoped.setdefault(connection, {})
                for name, value in changes.items():
                    if value is None:
                        target.pop(name, None)
                    else:
                        target[name] = value
            return self._snapshot()

    def snapshot(self) -> dict:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict:
        return {
            "global": dict(self._global),
            "connections": {cid: dict(values) for cid, values in self._scoped.items() if values},
        }

    def _value(self, name: str, connection_id: str | None) -> float | int | None:
        """The fault's value for a connection (its own, else global); caller holds the lock."""
        if connection_id is not None:
            scoped = self._scoped.get(connection_id, {})
            if name in scoped:
                return scoped[name]
        return self._global.get(name)

    # ---- queries other modules make -----------------------------------------------------

    @staticmethod
    def _probability_name(name: str) -> str:
        for candidate in (name, f"{name}_rate"):
            if candidate in PROBABILITY_FAULTS:
                return candidate
        raise ValueError(f"unknown probability fault '{name}' (known: {', '.join(PROBABILITY_FAULTS)})")

    def rate(self, name: str, connection_id: str | None = None) -> float:
        """Current probability of ``name`` (e.g. ``webhook_duplicate_rate``, ``timeout_after_commit``)."""
        fault = self._probability_name(name)
        with self._lock:
            value = self._value(fault, connection_id)
        if value is not None:
            return float(value)
        if fault == "webhook_duplicate_rate":
            return float(self._config.webhook_duplicate_rate)
        if fault == "webhook_reorder":
            return float(self._config.webhook_reorder)
        return 0.0

    def roll(self, connection_id: str, name: str) -> bool:
        """Decide one random event, e.g. ``roll(conn_id, "timeout_after_commit")``."""
        probability = self.rate(name, connection_id)
        if probability <= 0.0:
            return False  # no draw, so unset faults leave the RNG sequence untouched
        with self._lock:
            return self._rng.random() < probability

    def write_refusal(self, connection_id: str, kind: str, business_id: str) -> str | None:
        """The EHR's reason for refusing this write under ``write_reject_rate``, else None.
        A hash, not the RNG: the same write gets the same verdict whatever the request order."""
        probability = self.rate("write_reject_rate", connection_id)
        reasons = WRITE_REJECT_REASONS.get(kind)
        if probability <= 0.0 or not reasons:
            return None
        digest = hashlib.sha256(
            f"{self._seed}|write_reject|{connection_id}|{kind}|{business_id}".encode()
        ).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= probability:
            return None
        return reasons[digest[8] % len(reasons)]

    def token_lifetime_s(self) -> float | None:
        with self._lock:
            value = self._global.get("token_lifetime_s")
        return None if value is None else float(value)

    def timeout_s(self, connection_id: str | None = None) -> float:
        """How long a timeout fault stalls before answering 504."""
        with self._lock:
            value = self._value("timeout_s", connection_id)
        return DEFAULT_TIMEOUT_S if value is None else float(value)

    def latency_s(self, conn: ConnectionSpec) -> float:
        with self._lock:
            extra = self._value("latency_ms", conn.id) or 0.0
        return (float(conn.latency_ms) + float(extra)) / 1000.0

    # ---- response faults ----------------------------------------------------------------

    def _partial_failure_status(self, connection_id: str) -> int | None:
        """Roll ``partial_failure_rate``; the destination's HTTP status when it fires."""
        if not self.roll(connection_id, "partial_failure_rate"):
            return None
        return damage.destination_status(self._seed, next(self._partial_failures))

    def shape_query(self, connection_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """A Data Model query answer after ``partial_failure_rate`` and ``bad_entry_rate``."""
        status = self._partial_failure_status(connection_id)
        if status is not None:
            return damage.failed_query_body(body, next(_error_ids), status)
        rate = self.rate("bad_entry_rate", connection_id)
        if rate > 0:
            damage.damage_datamodel_body(body, self._seed, rate)
        return body

    def _shape_fhir(self, connection_id: str, body: bytes) -> bytes:
        """A FHIR searchset Bundle after ``partial_failure_rate`` and ``bad_entry_rate``."""
        rate = self.rate("bad_entry_rate", connection_id)
        if rate <= 0 and self.rate("partial_failure_rate", connection_id) <= 0:
            return body  # nothing to do: skip parsing
        try:
            bundle = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if not (isinstance(bundle, dict) and bundle.get("resourceType") == "Bundle"):
            return body
        if bundle.get("type") != "searchset":
            return body
        status = self._partial_failure_status(connection_id)
        if status is not None:
            return orjson.dumps(damage.failed_search_bundle(bundle, status))
        if rate > 0 and damage.damage_bundle_entries(bundle, self._seed, rate):
            return orjson.dumps(bundle)
        return body

    def damage_ndjson(self, connection_id: str, body: bytes) -> bytes:
        """A bulk-export NDJSON file after ``bad_entry_rate`` (same defects as Bundles)."""
        rate = self.rate("bad_entry_rate", connection_id)
        if rate <= 0:
            return body
        lines = [orjson.loads(line) for line in body.splitlines() if line.strip()]
        if not damage.damage_ndjson_lines(lines, self._seed, rate):
            return body
        return b"".join(orjson.dumps(line) + b"\n" for line in lines)

    def mangle(self, connection_id: str, body: bytes) -> bytes:
        """Every response body on its way out: FHIR searchsets get the partial-failure and
        bad-entry faults; then, with probability ``malformed_rate``, the body is cut short so
        it is no longer valid JSON."""
        body = self._shape_fhir(connection_id, body)
        if not self.roll(connection_id, "malformed_rate"):
            return body
        trimmed = body.rstrip()
        if len(trimmed) < 2:
            return b"{"
        with self._lock:
            cut = self._rng.randint(1, len(trimmed) - 1)
        return trimmed[:cut]

    # ---- the gate -----------------------------------------------------------------------

    def _admit(self, conn: ConnectionSpec, client: str | None) -> tuple[int, float] | None:
        """Count one request; None if accepted, else (limit, seconds until a slot frees).

        ``client`` None means the request was already counted against its client's quota
        (one HTTP request naming several destinations counts once).
        """
        now = self._clock()
        with self._lock:
            rps = self._value("rate_limit_rps", conn.id)
            rps_window = None
            if rps is not None:
                rps_window = self._rps_windows.setdefault(conn.id, deque())
                _prune(rps_window, now - 1.0)
                if len(rps_window) >= int(rps):
                    return int(rps), rps_window[0] + 1.0 - now
            quota = None
            if client is not None:
                quota = self._quotas.setdefault(client, _ClientQuota())
                limit, window_s = self._config.quota_requests, float(self._config.quota_window_s)
                if limit is not None:
                    _prune(quota.accepted, now - window_s)
                    if len(quota.accepted) >= limit:
                        quota.rejected += 1
                        return limit, quota.accepted[0] + window_s - now
                    quota.accepted.append(now)
                quota.total += 1
            if rps_window is not None:
                rps_window.append(now)
            return None

    def quota_usage(self) -> dict[str, dict[str, Any]]:
        """Per client: requests accepted inside the current window, the limit, 429s so far."""
        now = self._clock()
        limit, window_s = self._config.quota_requests, float(self._config.quota_window_s)
        with self._lock:
            out = {}
            for client, quota in sorted(self._quotas.items()):
                _prune(quota.accepted, now - window_s)
                out[client] = {
                    "used": len(quota.accepted) if limit is not None else quota.total,
                    "limit": limit,
                    "window_s": window_s,
                    "rejected": quota.rejected,
                    "total": quota.total,
                }
            return out

    async def stall(self, conn: ConnectionSpec, request: Request) -> Response:
        """Sleep ``timeout_s`` then answer 504, as Redox does when a request runs too long."""
        await asyncio.sleep(self.timeout_s(conn.id))
        return error_response(request, 504, _MESSAGES[504])

    async def gate(self, conn: ConnectionSpec, request: Request) -> Response | None:
        """Quota, delay and maybe fail one API request; None means go ahead."""
        client: str | None = None
        if not getattr(request.state, "quota_counted", False):
            request.state.quota_counted = True
            client = self._client_of(request.headers.get("authorization")) or "anonymous"
        limited = self._admit(conn, client)
        if limited is not None:
            limit, wait_s = limited
            headers = {"X-RateLimit-Limit": str(limit)}
            if conn.retry_after:
                headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
            return error_response(request, 429, f"Rate limit exceeded: {limit} requests per window", headers)
        delay = self.latency_s(conn)
        if delay > 0:
            await asyncio.sleep(delay)
        if self.roll(conn.id, "error_rate"):
            with self._lock:
                status = self._rng.choice(INJECTED_ERROR_STATUSES)
            return error_response(request, status, _MESSAGES[status])
        if self.roll(conn.id, "timeout_rate"):
            return await self.stall(conn, request)
        if self.roll(conn.id, "drop_rate"):
            return self._dropped(request)
        return None

    @staticmethod
    def _dropped(request: Request) -> DroppedConnectionResponse:
        # A plausible body start; the client never receives all of it.
        if is_fhir_request(request):
            entries = ",".join(f'{{"fullUrl":"urn:uuid:{i:08d}","resource":{{}}}}' for i in range(40))
            body = f'{{"resourceType":"Bundle","type":"searchset","entry":[{entries}]}}'.encode()
            return DroppedConnectionResponse(body, 200, media_type=_FHIR_JSON)
        padding = ",".join(f'{{"ID":"{i:08d}"}}' for i in range(60))
        body = f'{{"Meta":{{"DataModel":"","EventType":""}},"Items":[{padding}]}}'.encode()
        return DroppedConnectionResponse(body, 200, media_type="application/json; charset=utf-8")
