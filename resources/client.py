"""``RedoxClient``: one connection's HTTP client for Redox's FHIR and Data Model surfaces.

One pooled keep-alive ``httpx.Client`` per connection, timeouts on everything, and for every
request, in order: the minimum-necessary check (a call outside the connection's declared
surfaces / entities / write entities is refused before anything is sent), then per attempt:
pacing by the throttle shared per (Redox host, client), a slot in the request budget shared
by every connection and process (``resources/quota.py``, spent by ``priority``), a bearer token
from the shared token provider, the request, one audit record. The answer goes through the
response classifier (``resources/responses.py``) and the retry policy (``resources/retry.py``):

* ok: done;
* partial failure (HTTP 200 with ``Meta.Errors`` or an error OperationOutcome issue):
  ``PartialFailure``, never "no data";
* 401: the token is dropped and the call is retried once with a new one, never more;
* 429: the shared throttle halves its rate, a ``Retry-After`` (capped at 300 s) pauses the
  shared budget, and the call is retried;
* connect errors, timeouts, broken or unparseable bodies, 502/503/504 (and 500 for reads):
  retried with exponential backoff and full jitter, within the call's total deadline;
* anything else: ``RedoxAPIError`` naming the connection, operation and status. Messages hold
  only known vocabulary values, counts and lengths; the server's free text (which may echo
  patient data) is kept in ``.details``.

Writes carry an ``Idempotency-Key`` that is stable per logical write (given by the caller or
derived from the payload), so a retried write is the same write.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urljoin, urlparse

import httpx
import orjson

from resources.audit import AuditLog, CallRecord, audit_context
from resources.auth import LegacyTokenProvider, OAuthTokenProvider, TokenError, TokenProvider, token_audit
from resources.keys import KeyRing
from resources.quota import DEFAULT_PRIORITY, BudgetExhausted, RequestBudget, budget_file, check_priority
from resources.responses import (
    FATAL,
    OK,
    PARTIAL,
    REAUTH,
    Verdict,
    as_list,
    classify,
    limit_hint,
    server_errors,
)
from resources.retry import GiveUp, RetryPolicy, RetryState
from resources.settings import ConnectionSettings, Settings, redox_home
from resources.throttle import AdaptiveThrottle
from resources.vault import Vault, VaultError

__all__ = [
    "DataModelError",
    "PagingCycleError",
    "PartialFailure",
    "RedoxAPIError",
    "RedoxAuthError",
    "RedoxClient",
    "RedoxError",
    "RetryPolicy",
    "ScopeError",
]

log = logging.getLogger(__name__)

# FHIR resource types -> the common-model entity they carry (minimum necessary is per entity).
FHIR_RESOURCE_ENTITIES: dict[str, str] = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Observation": "results",
    "DiagnosticReport": "diagnostic_reports",
    "MedicationRequest": "medications",
    "MedicationStatement": "medications",
    "MedicationAdministration": "medications",
    "Appointment": "appointments",
    "DocumentReference": "documents",
    "Binary": "documents",
    "Condition": "problems",
    "AllergyIntolerance": "allergies",
    "Immunization": "immunizations",
    "Procedure": "procedures",
    "ServiceRequest": "orders",
}
# Directory data with no patient content, readable by any FHIR connection.
FHIR_REFERENCE_TYPES = frozenset({"Practitioner", "PractitionerRole", "Location", "Organization"})
# FHIR write-back operations (REDOX-REFERENCE "Decisions"): resource type -> write entity.
FHIR_WRITE_ENTITIES: dict[str, str] = {"ServiceRequest": "orders", "Appointment": "appointments"}
# Data Model data models -> the entities a query of that model may return.
DATAMODEL_READ_ENTITIES: dict[str, frozenset[str]] = {
    "PatientSearch": frozenset({"patients"}),
    "PatientAdmin": frozenset({"patients", "encounters"}),
    "Clinical Summary": frozenset(
        {
            "patients",
            "encounters",
            "results",
            "medications",
            "documents",
            "problems",
            "allergies",
            "immunizations",
            "procedures",
            "diagnostic_reports",
            "orders",
        }
    ),
    "Results": frozenset({"results", "diagnostic_reports"}),
    "Order": frozenset({"orders"}),
    "Medications": frozenset({"medications"}),
    "Vaccination": frozenset({"immunizations", "medications"}),
    "Scheduling": frozenset({"appointments"}),
    "Notes": frozenset({"documents"}),
    "Media": frozenset({"documents"}),
}
DATAMODEL_WRITE_ENTITIES: dict[str, str] = {"Order": "orders", "Scheduling": "appointments"}
# Data Model event types that ask for data rather than send it (REDOX-REFERENCE §2.5).
_QUERY_EVENTS = frozenset({"Booked", "AvailableSlots", "DocumentGet"})
# Queries a connection entitled to write orders / appointments may send to find its own writes.
_WRITE_LOOKUP_EVENTS = frozenset({"Query", "Booked"})

# Redox caps API traffic at 40 MB (REDOX-REFERENCE §12.6); anything much larger is not an answer.
MAX_BODY_BYTES = 64 * 1024 * 1024

_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_OPERATION = re.compile(r"^([A-Z][A-Za-z]{1,63})/\$([a-z][a-z0-9\-]{0,63})$")
_FHIR_BASE = re.compile(r"^(?P<prefix>.*)/fhir/R4/[^/]+/[^/]+$")


class RedoxError(Exception):
    """Base of the client's errors. Messages never contain PHI, tokens or secrets."""


class ScopeError(RedoxError, PermissionError):
    """Refused before sending: the call is outside the connection's declared scope."""


class RedoxAPIError(RedoxError):
    """Redox answered with a failure (or did not answer) after the retries the call allows.

    ``details`` holds the server's free-text diagnostics, which can echo request values: log
    or show them only where PHI may appear.
    """

    def __init__(
        self,
        message: str,
        *,
        connection_id: str | None,
        operation: str,
        status_code: int | None,
        retryable: bool = False,
        codes: tuple[str, ...] = (),
        details: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.connection_id = connection_id
        self.operation = operation
        self.status_code = status_code
        self.retryable = retryable
        self.codes = codes
        self.details = details


class RedoxAuthError(RedoxAPIError):
    """Still 401 after one re-authentication."""


class DataModelError(RedoxAPIError):
    """A Data Model response carried ``Meta.Errors`` (a failure even with HTTP 200)."""


class PartialFailure(RedoxAPIError):
    """HTTP 200, but the body says the EHR behind Redox failed (REDOX-REFERENCE §12, partial
    failures): Data Model ``Meta.Errors`` or a FHIR OperationOutcome issue of severity
    error/fatal. The call failed; its answer is not "no data". ``retryable`` is True: a later
    call may succeed, so the caller keeps the work for the next run."""


class DataModelPartialFailure(PartialFailure, DataModelError):
    """A Data Model ``Meta.Errors`` answer with HTTP 2xx."""


class PagingCycleError(RedoxAPIError):
    """A search's ``next`` link led back to a page already read: stopped instead of looping."""


class BudgetDeferred(RedoxAPIError):
    """The shared request budget had no slot before the call's deadline; nothing was sent."""


@dataclass
class _Attempt:
    """One request on the wire and what came back."""

    number: int
    sent_at: float  # the throttle's send slot
    started: float  # perf_counter at send
    called_at: datetime
    response: httpx.Response | None = None
    status: int | None = None
    body: Any = None
    error: str | None = None  # transport error class or "MalformedBody"


def _canonical_key(payload: Any) -> str:
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _count_datamodel(body: dict[str, Any]) -> int:
    total = 0
    for key, value in body.items():
        if key == "Meta":
            continue
        if isinstance(value, list):
            total += len(value)
        elif isinstance(value, dict) and value:
            total += 1
    return total


def _form(params: dict[str, Any] | list[tuple[str, Any]] | None) -> dict[str, list[str]]:
    """Search parameters as a form body: a list value (or a repeated pair) repeats the parameter."""
    form: dict[str, list[str]] = {}
    items = params.items() if isinstance(params, dict) else (params or [])
    for name, value in items:
        values = value if isinstance(value, list | tuple) else [value]
        form.setdefault(str(name), []).extend(str(v) for v in values)
    return form


def _bundle_count(bundle: Any) -> int | None:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        return None
    return len(as_list(bundle.get("entry")))


def _next_link(bundle: dict[str, Any]) -> str | None:
    for link in as_list(bundle.get("link")):
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"] or None
    return None


class _PageCycleGuard:
    """Notices a paging loop: a next link seen before, a page repeating earlier entries, or a run
    of empty pages that keep linking onward. Problems are PHI-free (page numbers only: a next
    link can carry search values)."""

    def __init__(self, max_empty_pages: int) -> None:
        self.pages = 0
        self._links: set[str] = set()
        self._entries: dict[str, int] = {}  # digest of a page's entries -> first page number
        self._empty_run = 0
        self._max_empty = max_empty_pages

    def see_page(self, bundle: dict[str, Any]) -> str | None:
        self.pages += 1
        entries = as_list(bundle.get("entry"))
        if not entries:
            self._empty_run += 1
            if self._empty_run > self._max_empty:
                return f"{self._empty_run} empty pages in a row still link to a next page"
            return None
        self._empty_run = 0
        digest = hashlib.sha256(orjson.dumps(entries, option=orjson.OPT_SORT_KEYS)).hexdigest()
        first = self._entries.setdefault(digest, self.pages)
        if first != self.pages:
            return f"page {self.pages} repeats the entries of page {first}"
        return None

    def see_link(self, url: str) -> str | None:
        if url in self._links:
            return f"the next link of page {self.pages} was already followed"
        self._links.add(url)
        return None


def client_host(conn: ConnectionSettings) -> str:
    """The Redox host a connection talks to (``host:port``): one quota per host and client."""
    return urlparse(conn.fhir_base_url or conn.datamodel_url or "").netloc.lower()


def client_identity(settings: Settings) -> str:
    """Who Redox counts requests for: the OAuth client id, else the legacy API key."""
    return settings.auth.client_id or settings.auth.legacy_api_key or ""


class _Shared:
    """Per-process state shared by every RedoxClient: vaults, token providers, throttles, budgets.

    Tokens are cached per (token URL, client id); throttles and request budgets per (Redox
    host, client id), because Redox limits a client across all its connections. The clients a
    sync opens one after another reuse what the earlier ones learned; the budget is also
    shared with other processes through its file.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.vaults: dict[str, Vault] = {}
        self.providers: dict[tuple[str, ...], TokenProvider] = {}
        self.throttles: dict[tuple[str, str, float | None], AdaptiveThrottle] = {}
        self.budgets: dict[tuple[str, int, float], RequestBudget] = {}
        self.legacy_warned: set[str] = set()
        self._token_http: httpx.Client | None = None

    def token_http(self) -> httpx.Client:
        with self.lock:
            if self._token_http is None:
                self._token_http = httpx.Client(
                    timeout=httpx.Timeout(30.0, connect=10.0), headers={"User-Agent": "redox-elt"}
                )
            return self._token_http

    def vault(self, vault: Vault | None) -> Vault:
        if vault is not None:
            return vault
        fresh = Vault()
        with self.lock:
            return self.vaults.setdefault(str(fresh.path), fresh)

    def oauth(self, settings: Settings, vault: Vault) -> OAuthTokenProvider:
        assert settings.token_url and settings.auth.client_id
        key = ("oauth", settings.token_url, settings.auth.client_id, str(vault.path), settings.auth.key_ring)
        http = self.token_http()
        with self.lock:
            provider = self.providers.get(key)
            if provider is None:
                provider = OAuthTokenProvider(
                    settings.token_url, settings.auth.client_id, KeyRing(vault, settings.auth.key_ring), http
                )
                self.providers[key] = provider
            return provider  # type: ignore[return-value]

    def legacy(self, settings: Settings, vault: Vault) -> LegacyTokenProvider:
        auth = settings.auth
        assert settings.legacy_auth_url and auth.legacy_api_key and auth.legacy_secret_ref
        key = ("legacy", settings.legacy_auth_url, auth.legacy_api_key, str(vault.path))
        secret_ref = auth.legacy_secret_ref
        http = self.token_http()
        with self.lock:
            provider = self.providers.get(key)
            if provider is None:
                provider = LegacyTokenProvider(
                    settings.legacy_auth_url, auth.legacy_api_key, lambda: vault.get(secret_ref), http
                )
                self.providers[key] = provider
            return provider  # type: ignore[return-value]

    def throttle(self, settings: Settings, conn: ConnectionSettings) -> AdaptiveThrottle:
        # Connections that set their own max_rps keep their own ceiling; the rest share one.
        key = (client_host(conn), client_identity(settings), conn.max_rps)
        with self.lock:
            throttle = self.throttles.get(key)
            if throttle is None:
                max_rps = conn.max_rps or 200.0
                throttle = AdaptiveThrottle(
                    # Redox's documented average is 7,500-10,000 requests per 5 minutes (25-33/s).
                    initial_rps=min(max_rps, 25.0) if conn.max_rps is None else max_rps,
                    max_rps=max_rps,
                )
                self.throttles[key] = throttle
            return throttle

    def budget(self, settings: Settings, conn: ConnectionSettings, home: Path | None = None) -> RequestBudget:
        path = budget_file(home or redox_home(), client_host(conn), client_identity(settings))
        key = (str(path), settings.quota.requests, settings.quota.window_s)
        with self.lock:
            budget = self.budgets.get(key)
            if budget is None:
                budget = RequestBudget(
                    path, requests=settings.quota.requests, window_s=settings.quota.window_s
                )
                self.budgets[key] = budget
            return budget

    def warn_legacy_once(self, conn_id: str, reason: str) -> None:
        with self.lock:
            if conn_id in self.legacy_warned:
                return
            self.legacy_warned.add(conn_id)
        log.warning(
            "connection %s is still on legacy API keys for the Data Model API (%s). Redox has deprecated them: "
            "register an OAuth key (redox-elt keys generate / jwks) and set auth.client_id",
            conn_id,
            reason,
        )

    def reset(self) -> None:
        """Forget cached tokens and throttles (tests; a changed config in a long-lived process)."""
        with self.lock:
            self.providers.clear()
            self.throttles.clear()
            for budget in self.budgets.values():
                budget.close()
            self.budgets.clear()
            self.vaults.clear()
            self.legacy_warned.clear()


SHARED = _Shared()


class RedoxClient:
    """The Redox API as one connection is entitled to use it. Thread-safe; use as a context manager."""

    def __init__(
        self,
        settings: Settings,
        connection: ConnectionSettings | str,
        *,
        audit: AuditLog | None = None,
        run_id: str | None = None,
        caller: str | None = None,
        vault: Vault | None = None,
        http: httpx.Client | None = None,
        throttle: AdaptiveThrottle | None = None,
        budget: RequestBudget | None = None,
        fhir_tokens: TokenProvider | None = None,
        datamodel_tokens: TokenProvider | None = None,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.conn = settings.connection(connection) if isinstance(connection, str) else connection
        self.audit = audit if audit is not None else AuditLog(settings.audit.path)
        self._owns_audit = audit is None
        self.run_id = run_id
        self.caller = caller
        self.retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self._vault = SHARED.vault(vault) if (fhir_tokens is None or datamodel_tokens is None) else vault
        self.throttle = throttle or SHARED.throttle(settings, self.conn)
        # The request budget shared by every connection of this Redox client and every process
        # on the machine; the pipeline's scheduler reads it to defer work (see resources/quota.py).
        self.budget = budget or SHARED.budget(settings, self.conn)
        self._owns_http = http is None
        self.http = http or httpx.Client(
            timeout=httpx.Timeout(self.conn.timeout_s, connect=min(10.0, self.conn.timeout_s)),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=30.0),
            headers={"User-Agent": "redox-elt"},
        )
        self._tokens: dict[str, TokenProvider] = {}
        self._legacy_fallback: TokenProvider | None = None
        if "fhir" in self.conn.surfaces:
            self._tokens["fhir"] = fhir_tokens or SHARED.oauth(settings, self._vault)  # type: ignore[arg-type]
        if "datamodel" in self.conn.surfaces:
            if datamodel_tokens is not None:
                self._tokens["datamodel"] = datamodel_tokens
            elif settings.auth.has_oauth:
                self._tokens["datamodel"] = SHARED.oauth(settings, self._vault)  # type: ignore[arg-type]
                if settings.auth.has_legacy:
                    self._legacy_fallback = SHARED.legacy(settings, self._vault)  # type: ignore[arg-type]
            else:
                self._tokens["datamodel"] = SHARED.legacy(settings, self._vault)  # type: ignore[arg-type]
                SHARED.warn_legacy_once(self.conn.id, "no OAuth client_id is configured")
        base = urlparse(self.conn.fhir_base_url or "")
        match = _FHIR_BASE.match(base.path)
        self._fhir_template = (
            f"{match.group('prefix')}/fhir/R4/{{slug}}/{{env}}" if match else base.path.rstrip("/")
        )
        self._fhir_origin = (base.scheme, base.netloc)

    def __repr__(self) -> str:
        return f"RedoxClient(connection={self.conn.id!r})"

    def __enter__(self) -> RedoxClient:
        self.check_credentials()
        return self

    def check_credentials(self) -> None:
        """Fail now, not with "0 rows", when this client could not authenticate: the vault does
        not open (a wrong master key), or holds no signing key or secret. Local checks only; a
        connection with nothing to ask (a network without known patients) still fails here,
        so a run that could not authenticate is recorded as failed. Injected token providers
        (tests) without the check are trusted."""
        for surface, provider in self._tokens.items():
            check = getattr(provider, "check_credentials", None)
            if check is None:
                continue
            try:
                check()
            except (TokenError, VaultError):
                fallback = getattr(self._legacy_fallback, "check_credentials", None)
                if fallback is None or surface != "datamodel":
                    raise
                fallback()  # OAuth cannot sign, but the legacy key still authenticates

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self.http.close()
        if self._owns_audit:
            self.audit.close()

    # ---- minimum necessary ------------------------------------------------------------------

    def _refuse(self, what: str) -> ScopeError:
        return ScopeError(
            f"connection '{self.conn.id}' is not entitled to {what}; no request was sent (see its config)"
        )

    def _require_surface(self, surface: str) -> None:
        if surface not in self.conn.surfaces:
            raise self._refuse(f"the {surface} surface (surfaces: {', '.join(self.conn.surfaces)})")

    def _fhir_entity(self, resource_type: str, entity: str | None = None) -> str | None:
        if not _RESOURCE_TYPE.fullmatch(resource_type):
            raise ScopeError(f"'{resource_type[:40]}' is not a FHIR resource type")
        self._require_surface("fhir")
        if resource_type in FHIR_REFERENCE_TYPES:
            return None
        mapped = FHIR_RESOURCE_ENTITIES.get(resource_type)
        if mapped is None:
            raise self._refuse(f"FHIR {resource_type} (no entity of the common model maps to it)")
        if entity is not None and entity != mapped:
            raise self._refuse(f"FHIR {resource_type} as '{entity}' (it carries '{mapped}')")
        if mapped not in self.conn.entities:
            raise self._refuse(
                f"'{mapped}' (FHIR {resource_type}; entities: {', '.join(self.conn.entities) or 'none'})"
            )
        return mapped

    def _check_includes(self, params: dict[str, Any] | list[tuple[str, Any]]) -> None:
        items = params.items() if isinstance(params, dict) else params
        for name, value in items:
            if name.split(":")[0] not in ("_include", "_revinclude"):
                continue
            for item in value if isinstance(value, list | tuple) else [value]:
                parts = str(item).split(":")
                for rtype in (parts[0], parts[2] if len(parts) > 2 else None):
                    if rtype and rtype != "*":
                        self._fhir_entity(rtype)

    # ---- the request loop ----------------------------------------------------------------

    @contextmanager
    def _attribution(self) -> Iterator[None]:
        with audit_context(run_id=self.run_id, caller=self.caller):
            yield

    def _error(
        self,
        cls: type[RedoxAPIError],
        message: str,
        operation: str,
        status: int | None,
        verdict: Verdict | None = None,
        *,
        retryable: bool = False,
    ) -> RedoxAPIError:
        """An API error with PHI-free codes in the message and the server's text in ``details``."""
        codes = verdict.errors.codes if verdict is not None else ()
        return cls(
            f"connection '{self.conn.id}': {operation} {message}"
            + (f" ({', '.join(codes[:5])}{', ...' if len(codes) > 5 else ''})" if codes else ""),
            connection_id=self.conn.id,
            operation=operation,
            status_code=status,
            retryable=retryable,
            codes=codes,
            details=verdict.errors.details if verdict is not None else (),
        )

    def _token(self, surface: str) -> tuple[TokenProvider, str]:
        provider = self._tokens[surface]
        with token_audit(self.audit, self.conn.id):
            try:
                return provider, provider.get_token()
            except TokenError as exc:
                fallback = self._legacy_fallback if surface == "datamodel" else None
                if fallback is None or exc.status_code not in (400, 401):
                    raise
                self._tokens["datamodel"] = fallback
                SHARED.warn_legacy_once(
                    self.conn.id, f"OAuth was refused: HTTP {exc.status_code} {exc.description or ''}".strip()
                )
                return fallback, fallback.get_token()

    def _wait_for_slot(self, priority: str, state: RetryState, operation: str) -> float:
        """Pace (shared throttle), then take a slot of the shared budget; returns the send slot."""
        sent_at = self.throttle.acquire()
        try:
            self.budget.acquire(priority, deadline_s=state.remaining_s())
        except BudgetExhausted as exc:
            raise BudgetDeferred(
                f"connection '{self.conn.id}': {operation} not sent: {exc}",
                connection_id=self.conn.id,
                operation=operation,
                status_code=None,
                retryable=True,
            ) from None
        return sent_at

    def _transmit(
        self,
        number: int,
        sent_at: float,
        method: str,
        url: str,
        headers: dict[str, str],
        parse: bool,
        request: Any,
        remaining_s: float,
    ) -> _Attempt:
        """One request; the body parsed as JSON when asked (2xx) or when it looks like JSON (errors).

        The body is streamed with a total time limit (httpx's timeouts are per read, so a server
        trickling bytes could hold a call for ever) and a size limit (Redox caps API traffic at
        40 MB, REDOX-REFERENCE §12.6).
        """
        attempt = _Attempt(number, sent_at, time.perf_counter(), datetime.now(UTC))
        give_up_at = self._clock() + min(remaining_s, max(4 * self.conn.timeout_s, 60.0))
        try:
            with self.http.stream(method, url, headers=headers, **request) as streamed:
                content = bytearray()
                for chunk in streamed.iter_bytes():
                    content += chunk
                    if len(content) > MAX_BODY_BYTES:
                        attempt.error = "BodyTooLarge"
                        break
                    if self._clock() > give_up_at:
                        attempt.error = "BodyTooSlow"
                        break
            if attempt.error is not None:
                return attempt
            response = httpx.Response(
                streamed.status_code,
                headers=streamed.headers,
                content=bytes(content),
                request=streamed.request,
            )
            attempt.response, attempt.status = response, response.status_code
            if parse and 200 <= response.status_code < 300:
                attempt.body = orjson.loads(response.content)
            elif parse and response.content[:1] in (b"{", b"["):
                try:
                    attempt.body = orjson.loads(response.content)
                except orjson.JSONDecodeError:
                    attempt.body = None
        except httpx.TransportError as exc:  # timeouts included
            attempt.error = type(exc).__name__
        except orjson.JSONDecodeError:
            attempt.error = "MalformedBody"
        return attempt

    def _record(
        self,
        attempt: _Attempt,
        surface: str,
        operation: str,
        method: str,
        template: str,
        count: Callable[[Any], int | None],
    ) -> None:
        ok = attempt.error is None and attempt.status is not None and 200 <= attempt.status < 300
        self.audit.record(
            CallRecord(
                connection_id=self.conn.id,
                surface=surface,
                operation=operation,
                method=method,
                path_template=template,
                status_code=attempt.status,
                duration_ms=(time.perf_counter() - attempt.started) * 1000.0,
                called_at=attempt.called_at,
                record_count=count(attempt.body) if ok else None,
                attempt=attempt.number,
                error=attempt.error,
            )
        )

    def _on_rate_limited(self, attempt: _Attempt, verdict: Verdict) -> None:
        """A 429: slow the shared throttle; a Retry-After (capped) pauses the shared budget."""
        pause = self.retry.capped_retry_after(verdict.retry_after_s)
        self.throttle.on_rate_limited(
            attempt.sent_at, retry_after_s=pause, limit_hint=limit_hint(attempt.response)
        )
        if pause:
            self.budget.pause(pause)

    def _send(
        self,
        *,
        surface: str,
        operation: str,
        method: str,
        url: str,
        template: str,
        write: bool,
        count: Callable[[Any], int | None],
        parse: bool = True,
        idempotency_key: str | None = None,
        accept: str = "application/json",
        content_type: str | None = None,
        priority: str | None = None,
        prefer: str | None = None,
        **request: Any,
    ) -> tuple[httpx.Response, Any]:
        """One logical call with retries; returns (response, parsed body or None)."""
        priority = check_priority(priority or ("event" if write else DEFAULT_PRIORITY))
        state = self.retry.start(self._clock)
        while True:
            state.attempts += 1
            sent_at = self._wait_for_slot(priority, state, operation)
            provider, token = self._token(surface)  # after the wait, so the token is fresh
            headers = {"Accept": accept, **self.conn.headers, "Authorization": f"Bearer {token}"}
            if content_type:
                headers["Content-Type"] = content_type
            if prefer:
                headers["Prefer"] = prefer
            if write and idempotency_key:
                headers["Idempotency-Key"] = idempotency_key  # the same on every retry: the same write
            attempt = self._transmit(
                state.attempts, sent_at, method, url, headers, parse, request, state.remaining_s()
            )
            self._record(attempt, surface, operation, method, template, count)
            verdict = classify(
                status=attempt.status,
                body=attempt.body,
                transport_error=attempt.error,
                write=write,
                response=attempt.response,
            )
            if verdict.kind == OK:
                self.throttle.on_success(sent_at)
                return attempt.response, attempt.body  # type: ignore[return-value]
            if verdict.kind in (PARTIAL, FATAL):
                self._fail(verdict, attempt, surface, operation)
            if verdict.kind == REAUTH:
                self._reauthenticate(state, provider, token, operation)
                continue
            delay = self._retry_delay(verdict, attempt, state, operation)
            if delay:
                self._sleep(delay)

    def _fail(self, verdict: Verdict, attempt: _Attempt, surface: str, operation: str) -> NoReturn:
        """Raise the error of a partial failure (HTTP 200, the EHR failed) or a fatal answer."""
        if verdict.kind == PARTIAL:
            self.throttle.on_success(attempt.sent_at)  # the server answered; the EHR behind it failed
            cls: type[RedoxAPIError] = DataModelPartialFailure if surface == "datamodel" else PartialFailure
            raise self._error(
                cls, "failed: partial failure", operation, attempt.status, verdict, retryable=True
            )
        cls = DataModelError if surface == "datamodel" and verdict.errors.codes else RedoxAPIError
        raise self._error(
            cls,
            f"failed: {verdict.reason}",
            operation,
            attempt.status,
            verdict,
            retryable=attempt.status == 500,
        )

    def _reauthenticate(self, state: RetryState, provider: TokenProvider, token: str, operation: str) -> None:
        """A 401: drop the token and try once more with a new one; a second 401 is final."""
        if state.reauthenticated:
            raise self._error(
                RedoxAuthError,
                "still unauthorized (HTTP 401) after re-authenticating; "
                "check the OAuth key registration and the connection's entitlements",
                operation,
                401,
            )
        state.reauthenticated = True
        provider.invalidate(token)
        log.info("connection %s: %s got 401; re-authenticating once", self.conn.id, operation)

    def _retry_delay(self, verdict: Verdict, attempt: _Attempt, state: RetryState, operation: str) -> float:
        """Seconds to wait before retrying (0 after a 429: the throttle and budget pace that retry)."""
        try:
            if verdict.rate_limited:
                self._on_rate_limited(attempt, verdict)
                state.after_rate_limit()
                return 0.0
            delay = state.after_failure(self._rng, verdict.retry_after_s)
        except GiveUp as stop:
            raise self._error(
                RedoxAPIError,
                f"failed after {stop.reason} (last: {verdict.reason})",
                operation,
                attempt.status,
                retryable=True,
            ) from None
        log.info(
            "connection %s: %s -> %s; retry %d in %.2f s",
            self.conn.id,
            operation,
            verdict.reason,
            state.failures,
            delay,
        )
        return delay

    # ---- FHIR ------------------------------------------------------------------------------

    def _fhir_url(self, path: str) -> str:
        return f"{self.conn.fhir_base_url}/{path}"

    def _same_origin(self, url: str) -> bool:
        parsed = urlparse(url)
        return (parsed.scheme, parsed.netloc) == self._fhir_origin

    def fhir_search_pages(
        self,
        resource_type: str,
        params: dict[str, Any] | list[tuple[str, Any]] | None = None,
        *,
        entity: str | None = None,
        priority: str | None = None,
        follow_next: bool = True,
        max_empty_pages: int = 5,
    ) -> Iterator[bytes]:
        """Every page of a search as the raw Bundle bytes received.

        ``POST {Type}/_search`` with the parameters form-encoded (list values repeat the
        parameter), then, when ``follow_next``, each ``next`` link with POST (GET when the server
        answers 405). Redox documents no paging, so next links are followed when present and
        never required. A next link already followed, a page whose entries repeat an earlier
        page's, or more than ``max_empty_pages`` empty pages in a row that still link onward
        stop the search with ``PagingCycleError`` instead of looping.
        """
        self._fhir_entity(resource_type, entity)
        self._check_includes(params or {})
        template = f"{self._fhir_template}/{resource_type}/_search"
        operation = f"search {resource_type}"
        call = {
            "surface": "fhir",
            "template": template,
            "write": False,
            "count": _bundle_count,
            "accept": "application/fhir+json",
            "priority": priority,
        }
        with self._attribution():
            response, bundle = self._send(
                operation=operation,
                method="POST",
                url=self._fhir_url(f"{resource_type}/_search"),
                data=_form(params),
                **call,
            )
        guard = _PageCycleGuard(max_empty_pages)
        while True:
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise self._error(
                    RedoxAPIError,
                    "answered 200 without a Bundle",
                    operation,
                    response.status_code,
                    Verdict(FATAL, "not a Bundle", errors=server_errors(bundle)),
                )
            problem = guard.see_page(bundle)
            if problem:
                raise self._error(
                    PagingCycleError, f"paging stopped: {problem}", operation, response.status_code
                )
            yield response.content
            next_url = _next_link(bundle) if follow_next else None
            if not next_url:
                return
            next_url = urljoin(self.conn.fhir_base_url + "/", next_url)
            if not self._same_origin(next_url):
                raise self._error(
                    RedoxAPIError,
                    f"page {guard.pages} links to another host; refusing to send the token there",
                    operation,
                    None,
                )
            problem = guard.see_link(next_url)
            if problem:
                raise self._error(
                    PagingCycleError, f"paging stopped: {problem}", operation, response.status_code
                )
            with self._attribution():
                try:
                    response, bundle = self._send(
                        operation=f"{operation} (next page)", method="POST", url=next_url, **call
                    )
                except RedoxAPIError as exc:
                    if exc.status_code != 405:
                        raise
                    response, bundle = self._send(
                        operation=f"{operation} (next page)", method="GET", url=next_url, **call
                    )

    def fhir_search(
        self,
        resource_type: str,
        params: dict[str, Any] | list[tuple[str, Any]] | None = None,
        *,
        entity: str | None = None,
        priority: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every resource of every page of a search (``entry[].resource``)."""
        for page in self.fhir_search_pages(resource_type, params, entity=entity, priority=priority):
            for entry in as_list(orjson.loads(page).get("entry")):
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(resource, dict):
                    yield resource

    def fhir_read(
        self, resource_type: str, resource_id: str, *, priority: str | None = None
    ) -> dict[str, Any]:
        """``GET {Type}/{id}``."""
        self._fhir_entity(resource_type)
        if not _RESOURCE_ID.fullmatch(resource_id or ""):
            raise ScopeError(f"not a FHIR resource id (1-64 of A-Z a-z 0-9 - .) for {resource_type}")
        with self._attribution():
            _, body = self._send(
                surface="fhir",
                operation=f"read {resource_type}",
                method="GET",
                url=self._fhir_url(f"{resource_type}/{resource_id}"),
                template=f"{self._fhir_template}/{resource_type}/{{id}}",
                write=False,
                count=lambda b: 1 if isinstance(b, dict) else None,
                accept="application/fhir+json",
                priority=priority,
            )
        if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
            raise RedoxAPIError(
                f"connection '{self.conn.id}': read {resource_type} answered without a FHIR resource",
                connection_id=self.conn.id,
                operation=f"read {resource_type}",
                status_code=None,
            )
        return body

    def fetch_document_content(self, content_url: str, *, priority: str | None = None) -> bytes:
        """The bytes of a document attachment (``Binary/{id}``, relative to the FHIR base or absolute)."""
        self._fhir_entity("Binary")
        url = urljoin(self.conn.fhir_base_url + "/", content_url)
        if not self._same_origin(url):
            raise ScopeError(
                f"connection '{self.conn.id}': attachment URL is on another host; not sending the token there"
            )
        with self._attribution():
            response, _ = self._send(
                surface="fhir",
                operation="read Binary",
                method="GET",
                url=url,
                template=f"{self._fhir_template}/Binary/{{id}}",
                write=False,
                count=lambda _b: 1,
                parse=False,
                accept="*/*",
                priority=priority,
            )
        return response.content

    def fhir_bulk_get(
        self,
        url: str,
        *,
        kickoff: bool = False,
        accept: str = "application/fhir+json",
        priority: str | None = None,
    ) -> httpx.Response:
        """One GET of the FHIR Bulk Data flow (``Group/{id}/$export`` kick-off with
        ``Prefer: respond-async``, status polls, NDJSON files), paced, budgeted, audited and
        re-authenticated like every call. ``url`` is absolute or relative to the FHIR base and
        must stay on its origin. Returns the response (202 and 200 alike; the body is not parsed)."""
        self._require_surface("fhir")
        full = urljoin(self.conn.fhir_base_url + "/", url)
        if not self._same_origin(full):
            raise ScopeError(
                f"connection '{self.conn.id}': bulk export URL is on another host; not sending the token there"
            )
        kind = "kick-off" if kickoff else ("file" if "ndjson" in accept else "status")
        # Status and file URLs are the server's own: the template names what they are, not the path.
        template = (
            f"{self._fhir_template}/Group/{{id}}/$export"
            if kickoff
            else f"{self._fhir_template}/{{bulk {kind}}}"
        )
        with self._attribution():
            response, _ = self._send(
                surface="fhir",
                operation=f"bulk export {kind}",
                method="GET",
                url=full,
                template=template,
                write=False,
                count=lambda _b: None,
                parse=False,
                accept=accept,
                priority=priority,
                prefer="respond-async" if kickoff else None,
            )
        return response

    def fhir_operation(
        self, path: str, bundle: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """``POST {Type}/${operation}`` with a message Bundle (write-back), e.g. ``ServiceRequest/$servicerequest-create``."""
        match = _OPERATION.fullmatch(path)
        if not match:
            raise ScopeError(
                f"'{path[:60]}' is not a FHIR operation path like 'ServiceRequest/$servicerequest-create'"
            )
        self._require_surface("fhir")
        rtype, op = match.groups()
        write_entity = FHIR_WRITE_ENTITIES.get(rtype)
        if write_entity is None or write_entity not in self.conn.write_entities:
            raise self._refuse(
                f"write {write_entity or rtype} via {path} (write_entities: {', '.join(self.conn.write_entities) or 'none'})"
            )
        key = idempotency_key or _canonical_key({"path": path, "bundle": bundle})
        with self._attribution():
            _, body = self._send(
                surface="fhir",
                operation=f"{rtype} ${op}",
                method="POST",
                url=self._fhir_url(path),
                template=f"{self._fhir_template}/{rtype}/${op}",
                write=True,
                count=lambda _b: 1,
                idempotency_key=key,
                accept="application/fhir+json",
                content=orjson.dumps(bundle),
                content_type="application/fhir+json",
            )
        return body

    def fhir_find_written(
        self, resource_type: str, identifier: str, *, priority: str | None = None
    ) -> list[dict[str, Any]]:
        """``POST {ServiceRequest|Appointment}/_search`` by ``identifier`` (``system|value``): the
        resources this connection wrote back, found again after an unanswered write. Allowed by
        the write entitlement; one page (an identifier names one logical write)."""
        self._require_surface("fhir")
        write_entity = FHIR_WRITE_ENTITIES.get(resource_type)
        if write_entity is None or write_entity not in self.conn.write_entities:
            raise self._refuse(
                f"look up written {resource_type} (write_entities: {', '.join(self.conn.write_entities) or 'none'})"
            )
        with self._attribution():
            _, bundle = self._send(
                surface="fhir",
                operation=f"search {resource_type}",
                method="POST",
                url=self._fhir_url(f"{resource_type}/_search"),
                template=f"{self._fhir_template}/{resource_type}/_search",
                write=False,
                count=_bundle_count,
                accept="application/fhir+json",
                priority=priority,
                data=_form([("identifier", identifier)]),
            )
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise RedoxAPIError(
                f"connection '{self.conn.id}': search {resource_type} answered without a Bundle",
                connection_id=self.conn.id,
                operation=f"search {resource_type}",
                status_code=None,
            )
        return [
            e["resource"]
            for e in as_list(bundle.get("entry"))
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        ]

    # ---- Data Model ------------------------------------------------------------------------

    def _datamodel_scope(self, payload: dict[str, Any], entity: str | None) -> tuple[str, str, bool]:
        self._require_surface("datamodel")
        meta = payload.get("Meta") if isinstance(payload, dict) else None
        if not isinstance(meta, dict) or not meta.get("DataModel") or not meta.get("EventType"):
            raise ScopeError("a Data Model payload needs Meta.DataModel and Meta.EventType")
        data_model, event = str(meta["DataModel"]), str(meta["EventType"])
        is_query = data_model == "PatientSearch" or event.endswith("Query") or event in _QUERY_EVENTS
        if (
            is_query
            and DATAMODEL_WRITE_ENTITIES.get(data_model) in self.conn.write_entities
            and (event in _WRITE_LOOKUP_EVENTS)
        ):
            pass  # a writer looks for its own writes (Order.Query, Scheduling.Booked) before re-sending
        elif is_query:
            allowed = DATAMODEL_READ_ENTITIES.get(data_model)
            if allowed is None:
                raise self._refuse(
                    f"Data Model {data_model} queries (no entity of the common model maps to them)"
                )
            wanted = {entity} if entity is not None else set(allowed)
            if entity is not None and entity not in allowed:
                raise self._refuse(f"'{entity}' through Data Model {data_model}.{event}")
            if not wanted & set(self.conn.entities):
                raise self._refuse(
                    f"Data Model {data_model}.{event} (entities: {', '.join(self.conn.entities) or 'none'})"
                )
        else:
            write_entity = DATAMODEL_WRITE_ENTITIES.get(data_model)
            if write_entity is None or write_entity not in self.conn.write_entities:
                raise self._refuse(
                    f"send Data Model {data_model}.{event} (write_entities: {', '.join(self.conn.write_entities) or 'none'})"
                )
        destinations = meta.get("Destinations")
        if destinations:
            ids = {d.get("ID") for d in destinations if isinstance(d, dict)}
            if ids != {self.conn.destination_id}:
                raise self._refuse("Data Model destinations other than its own destination_id")
        return data_model, event, is_query

    def datamodel_raw(
        self,
        payload: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        entity: str | None = None,
        priority: str | None = None,
    ) -> tuple[bytes, dict[str, Any]]:
        """POST a Data Model payload to the connection's ``/endpoint``; returns (raw body, parsed body).

        ``Meta.Destinations`` is filled with the connection's destination when absent. Any
        ``Meta.Errors`` entry raises DataModelError whatever the HTTP status (with HTTP 2xx,
        ``DataModelPartialFailure``, which is both a DataModelError and a PartialFailure).
        """
        data_model, event, is_query = self._datamodel_scope(payload, entity)
        meta = dict(payload["Meta"])
        if not meta.get("Destinations"):
            meta["Destinations"] = [{"ID": self.conn.destination_id}]
        body_out = dict(payload, Meta=meta)
        operation = f"{data_model}.{event}"
        key = None if is_query else (idempotency_key or _canonical_key(body_out))
        with self._attribution():
            response, body = self._send(
                surface="datamodel",
                operation=operation,
                method="POST",
                url=self.conn.datamodel_url or "",
                template=urlparse(self.conn.datamodel_url or "").path or "/",
                write=not is_query,
                count=lambda b: (_count_datamodel(b) if is_query else 1) if isinstance(b, dict) else None,
                idempotency_key=key,
                content=orjson.dumps(body_out),
                content_type="application/json",
                priority=priority,
            )
        if not isinstance(body, dict):
            raise DataModelError(
                f"connection '{self.conn.id}': {operation} answered without a JSON object",
                connection_id=self.conn.id,
                operation=operation,
                status_code=response.status_code,
            )
        return response.content, body  # a Meta.Errors answer was raised as a partial failure

    def datamodel(
        self,
        payload: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        entity: str | None = None,
        priority: str | None = None,
    ) -> dict[str, Any]:
        """POST a Data Model payload; the parsed response (see ``datamodel_raw``)."""
        return self.datamodel_raw(payload, idempotency_key=idempotency_key, entity=entity, priority=priority)[
            1
        ]


def new_idempotency_key() -> str:
    """A fresh key for a logical write the caller will store and reuse on every retry."""
    return uuid.uuid4().hex
