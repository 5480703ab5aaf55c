"""Fault injection and rate limiting for the sandbox's API surfaces.

Tests turn faults on with ``POST /_sandbox/faults`` (the control route hands the body to
``Faults.set``); the FHIR and Data Model routes call ``Faults.gate`` after auth and before any
work, the write routes call ``roll(conn, "timeout_after_commit")`` and ``stall`` after committing,
and the webhook sender asks ``rate``. A fault is global unless the body names a
``"connection"``; a connection's own value overrides the global one.

Rate limiting (REDOX-REFERENCE §6) is a rolling window per connection: ``rate_limit`` requests
per ``rate_window_s`` seconds, or, while the ``rate_limit_rps`` fault is set, a rolling
one-second window of that many requests. Only accepted requests are counted, so a client that
keeps retrying into a 429 recovers as soon as the oldest accepted request leaves the window.

Every random decision comes from one ``random.Random(seed)`` behind a lock, so a run with the
same seed and the same request order sees the same faults.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from sandbox.auth import redox_json
from sandbox.config import ConnectionSpec, SandboxConfig

# Faults that are probabilities in [0, 1].
PROBABILITY_FAULTS = (
    "error_rate",
    "timeout_rate",
    "timeout_after_commit_rate",
    "drop_rate",
    "malformed_rate",
    "webhook_duplicate_rate",
    "webhook_reorder",
)
OTHER_FAULTS = ("rate_limit_rps", "latency_ms", "token_lifetime_s", "timeout_s")
FAULT_NAMES = PROBABILITY_FAULTS + OTHER_FAULTS
GLOBAL_ONLY = frozenset({"token_lifetime_s"})  # tokens are not tied to one connection
DEFAULT_TIMEOUT_S = 10.0
INJECTED_ERROR_STATUSES = (500, 502, 503)

log = logging.getLogger(__name__)

_FHIR_JSON = "application/fhir+json; charset=utf-8"
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


def _validate(name: str, value: Any) -> float | int:
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


class Faults:
    """The active faults, the per-connection rate-limit windows and the seeded RNG."""

    def __init__(self, config: SandboxConfig, seed: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._global: dict[str, float | int] = {}
        self._scoped: dict[str, dict[str, float | int]] = {}
        # (connection id, "config" | "rps") -> timestamps of accepted requests, oldest first
        self._windows: dict[tuple[str, str], deque[float]] = {}
        _install_log_filter()

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
        field = self._probability_name(name)
        with self._lock:
            value = self._value(field, connection_id)
        if value is not None:
            return float(value)
        if field == "webhook_duplicate_rate":
            return float(self._config.webhook_duplicate_rate)
        if field == "webhook_reorder":
            return float(self._config.webhook_reorder)
        return 0.0

    def roll(self, connection_id: str, name: str) -> bool:
        """Decide one random event, e.g. ``roll(conn_id, "timeout_after_commit")``."""
        probability = self.rate(name, connection_id)
        if probability <= 0.0:
            return False  # no draw, so unset faults leave the RNG sequence untouched
        with self._lock:
            return self._rng.random() < probability

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

    def mangle(self, connection_id: str, body: bytes) -> bytes:
        """With probability ``malformed_rate``, cut the body short so it is no longer valid JSON."""
        if not self.roll(connection_id, "malformed_rate"):
            return body
        trimmed = body.rstrip()
        if len(trimmed) < 2:
            return b"{"
        with self._lock:
            cut = self._rng.randint(1, len(trimmed) - 1)
        return trimmed[:cut]

    # ---- the gate -----------------------------------------------------------------------

    def _admit(self, conn: ConnectionSpec) -> tuple[int, float] | None:
        """Count one request; None if accepted, else (limit, seconds until a slot frees)."""
        now = self._clock()
        with self._lock:
            rps = self._value("rate_limit_rps", conn.id)
            config_window = self._windows.setdefault((conn.id, "config"), deque())
            _prune(config_window, now - conn.rate_window_s)
            if rps is None:
                limit, window_s, window = conn.rate_limit, float(conn.rate_window_s), config_window
            else:
                limit, window_s = int(rps), 1.0
                window = self._windows.setdefault((conn.id, "rps"), deque())
                _prune(window, now - window_s)
            if len(window) >= limit:
                return limit, window[0] + window_s - now
            window.append(now)
            if window is not config_window:
                config_window.append(now)  # the real limit keeps counting under the fault
            return None

    async def stall(self, conn: ConnectionSpec, request: Request) -> Response:
        """Sleep ``timeout_s`` then answer 504, as Redox does when a request runs too long."""
        await asyncio.sleep(self.timeout_s(conn.id))
        return error_response(request, 504, _MESSAGES[504])

    async def gate(self, conn: ConnectionSpec, request: Request) -> Response | None:
        """Rate-limit, delay and maybe fail one API request; None means go ahead."""
        limited = self._admit(conn)
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
