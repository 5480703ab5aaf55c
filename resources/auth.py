"""Access tokens for Redox: OAuth client credentials with a signed JWT assertion, and legacy keys.

``OAuthTokenProvider`` (REDOX-REFERENCE §1.1) signs a short-lived assertion (``iss`` = ``sub``
= client id, ``aud`` = token URL, ``iat``, ``exp`` <= iat + 300, unique ``jti``, header
``kid``) with the newest key of the key ring and trades it for a 5-minute bearer token. There
is no refresh token: shortly before expiry (with jitter, so many processes do not refresh in
step) a new assertion is signed. Rotation: the key ring may hold several keys; signing moves
to the newest one as soon as the token endpoint accepts it, and while the endpoint still says
"Public key not found" for it, the previous key is used and the new one is retried later.

``LegacyTokenProvider`` (§1.2, Data Model only, deprecated) authenticates with API key +
secret, refreshes with the refresh token, and falls back to authenticating when the refresh is
refused.

Token lifetimes from the server are clamped (``clamp_lifetime``): a negative, zero, NaN or
absurd ``expires_in`` / ``expires`` would otherwise mean a token request per API call (or a
token kept for ever). OAuth tokens count as living 30 s to 5 minutes, legacy ones 30 s to 24 h;
a token that really dies sooner is caught by the 401 -> re-authenticate path.

Both are single-flight: however many threads ask at once, one token request is made and the
others wait for its result. Tokens, secrets and assertions never appear in a repr, a log line
or an exception.
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlparse

import httpx
import jwt

from resources.audit import AuditLog, CallRecord
from resources.keys import KeyRing, SigningKey, load_private_key

log = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_S = 240  # Redox/SMART cap assertions at 5 minutes; stay well inside
# Transient failures of the token endpoint itself are retried a few times before giving up.
TOKEN_ATTEMPTS = 4
_RETRYABLE_TOKEN_STATUSES = {429, 500, 502, 503, 504}
# Sane token lifetimes (seconds): Redox documents 5 minutes for OAuth, 24 hours for legacy.
MIN_TOKEN_LIFETIME_S = 30.0
OAUTH_MAX_LIFETIME_S = 300.0
LEGACY_MAX_LIFETIME_S = 86_400.0


def clamp_lifetime(value: Any, *, maximum: float, minimum: float = MIN_TOKEN_LIFETIME_S) -> float:
    """A server-given lifetime forced into ``[minimum, maximum]``; unreadable or NaN -> ``maximum``."""
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return maximum
    if math.isnan(seconds):
        return maximum
    return min(max(seconds, minimum), maximum)


# Token providers are shared by every connection of a process; the client that triggers a token
# request says which audit trail (and connection) the request belongs to.
_token_audit: contextvars.ContextVar[tuple[AuditLog, str | None] | None] = contextvars.ContextVar(
    "redox_token_audit", default=None
)


@contextmanager
def token_audit(audit: AuditLog | None, connection_id: str | None) -> Iterator[None]:
    """Audit token requests made inside the block to ``audit``, attributed to ``connection_id``."""
    token = _token_audit.set((audit, connection_id) if audit is not None else None)
    try:
        yield
    finally:
        _token_audit.reset(token)


class TokenError(Exception):
    """No access token could be obtained. The message says what the token endpoint answered.

    ``status_code``, ``error`` and ``description`` carry the endpoint's answer (never the
    assertion, the secret or a token).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error: str | None = None,
        description: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error = error
        self.description = description


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    kind: str  # "oauth" | "legacy"
    expires_at: float  # monotonic clock
    refresh_at: float  # monotonic clock: when to get the next one
    kid: str | None = None


class TokenProvider(Protocol):
    kind: str

    def get_token(self) -> str: ...

    def invalidate(self, token: str) -> None: ...


def _path(url: str) -> str:
    return urlparse(url).path or "/"


def _short(text: Any, limit: int = 200) -> str:
    value = "" if text is None else str(text)
    return value if len(value) <= limit else value[:limit] + "..."


class _SingleFlight:
    """Caches one token and makes sure only one thread fetches a new one at a time."""

    kind = "abstract"

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        refresh_margin_s: float = 60.0,
        refresh_margin_fraction: float = 0.1,
        jitter_fraction: float = 0.05,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._margin_s = refresh_margin_s
        self._margin_fraction = refresh_margin_fraction
        self._jitter_fraction = jitter_fraction
        self._cond = threading.Condition()
        self._token: AccessToken | None = None
        self._fetching = False
        self._generation = 0  # bumped by every finished fetch
        self._failure: tuple[int, TokenError] | None = None
        self.token_requests = 0  # outbound token calls, for tests and stats

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r})"

    def _schedule(self, issued_at: float, lifetime_s: float) -> tuple[float, float]:
        """(expires_at, refresh_at): refresh a margin before expiry, minus jitter."""
        lifetime_s = max(float(lifetime_s), 0.001)
        margin = min(self._margin_s, lifetime_s * self._margin_fraction)
        jitter = self._rng.uniform(0.0, min(15.0, lifetime_s * self._jitter_fraction))
        expires_at = issued_at + lifetime_s
        return expires_at, expires_at - margin - jitter

    def get_token(self) -> str:
        """A valid access token, fetching a new one when due (one fetch however many callers)."""
        with self._cond:
            while True:
                now = self._clock()
                token = self._token
                if token is not None and now < token.refresh_at:
                    return token.value
                if not self._fetching:
                    self._fetching = True
                    break
                if token is not None and now < token.expires_at:
                    return token.value  # someone is already refreshing; this one is still good
                generation = self._generation
                while self._fetching and self._generation == generation:
                    self._cond.wait(timeout=1.0)
                if self._failure is not None and self._failure[0] == generation + 1 and self._token is None:
                    raise self._failure[1]
        try:
            new_token = self._fetch()
        except TokenError as exc:
            with self._cond:
                self._fetching = False
                self._generation += 1
                self._failure = (self._generation, exc)
                still_valid = self._token is not None and self._clock() < self._token.expires_at
                if not still_valid:
                    self._token = None
                self._cond.notify_all()
                if still_valid:
                    log.warning(
                        "token refresh failed (%s); the current token is still valid and stays in use", exc
                    )
                    return self._token.value  # type: ignore[union-attr]
            raise
        except BaseException:
            with self._cond:
                self._fetching = False
                self._generation += 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._token = new_token
            self._fetching = False
            self._generation += 1
            self._failure = None
            self._cond.notify_all()
        return new_token.value

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the API said 401): the next get_token fetches a new one."""
        with self._cond:
            if self._token is not None and self._token.value == token:
                self._token = None

    def _fetch(self) -> AccessToken:
        raise NotImplementedError


class _TokenEndpointCaller:
    """Posts to a token endpoint with retries on transient failures and audits every call."""

    def __init__(
        self,
        http: httpx.Client,
        audit: AuditLog | None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._http = http
        self._audit = audit
        self._sleep = sleep
        self._rng = rng or random.Random()

    def post(self, url: str, operation: str, **kwargs: Any) -> httpx.Response:
        last_error: Exception | None = None
        for attempt in range(1, TOKEN_ATTEMPTS + 1):
            started, called_at = time.perf_counter(), datetime.now(UTC)
            status: int | None = None
            error: str | None = None
            try:
                response = self._http.post(url, **kwargs)
                status = response.status_code
                if status not in _RETRYABLE_TOKEN_STATUSES or attempt == TOKEN_ATTEMPTS:
                    return response
                last_error = None
            except httpx.TransportError as exc:
                error = type(exc).__name__
                last_error = exc
            finally:
                target = _token_audit.get()
                audit, connection_id = target if target is not None else (self._audit, None)
                if audit is not None:
                    audit.record(
                        CallRecord(
                            connection_id=connection_id,
                            surface="auth",
                            operation=operation,
                            method="POST",
                            path_template=_path(url),
                            status_code=status,
                            duration_ms=(time.perf_counter() - started) * 1000.0,
                            called_at=called_at,
                            attempt=attempt,
                            error=error,
                        )
                    )
            self._sleep(self._rng.uniform(0.0, min(8.0, 0.25 * 2**attempt)))
        raise TokenError(
            f"token endpoint {url} unreachable after {TOKEN_ATTEMPTS} attempts ({type(last_error).__name__})"
        )


def _oauth_error(response: httpx.Response) -> tuple[str | None, str]:
    try:
        body = response.json()
    except ValueError:
        return None, _short(response.text)
    if not isinstance(body, dict):
        return None, ""
    return _short(body.get("error")), _short(body.get("error_description"))


class OAuthTokenProvider(_SingleFlight):
    """Bearer tokens for one (token_url, client_id), signed by the newest usable key of a key ring."""

    kind = "oauth"

    def __init__(
        self,
        token_url: str,
        client_id: str,
        key_ring: KeyRing,
        http: httpx.Client,
        *,
        audit: AuditLog | None = None,
        scope: str | None = None,
        audience: str | None = None,
        reprobe_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        refresh_margin_s: float = 60.0,
        min_lifetime_s: float = MIN_TOKEN_LIFETIME_S,
    ) -> None:
        super().__init__(clock=clock, rng=rng, refresh_margin_s=refresh_margin_s)
        self.min_lifetime_s = min_lifetime_s  # tests of expiry lower it; production keeps 30 s
        self.token_url = token_url
        self.client_id = client_id
        self.key_ring = key_ring
        self.scope = scope
        self.audience = audience or token_url  # Redox checks aud == the token URL
        self._caller = _TokenEndpointCaller(http, audit, sleep=sleep, rng=self._rng)
        self._wall_clock = wall_clock
        self._reprobe_after_s = reprobe_after_s
        self._confirmed: set[str] = set()  # kids the endpoint accepted
        self._unregistered: dict[str, float] = {}  # kid -> when it was last refused as unknown
        self.signing_kid: str | None = None  # kid of the key that signed the current token

    def __repr__(self) -> str:
        return f"OAuthTokenProvider(token_url={self.token_url!r}, client_id={self.client_id!r})"

    def assertion(self, key: SigningKey) -> str:
        """A fresh client assertion signed by ``key``."""
        now = int(self._wall_clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.audience,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            claims, load_private_key(key), algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"}
        )

    def _candidates(self, keys: tuple[SigningKey, ...]) -> list[SigningKey]:
        """Keys to try, newest first; a key the endpoint recently called unknown goes last until
        ``reprobe_after_s`` has passed (it is still tried when nothing else works)."""
        now = self._clock()
        newest_first = list(reversed(keys))

        def resting(key: SigningKey) -> bool:
            return now - self._unregistered.get(key.kid, float("-inf")) < self._reprobe_after_s

        return [k for k in newest_first if not resting(k)] + [k for k in newest_first if resting(k)]

    def check_credentials(self) -> None:
        """Raise unless this provider could sign an assertion: the vault opens with the master
        key and the key ring holds a key (no request is sent)."""
        if not self.key_ring.load().keys:
            raise TokenError(
                f"key ring '{self.key_ring.name}' has no signing key; run `redox-elt keys generate` and register the JWKS"
            )

    def _request(self, key: SigningKey) -> httpx.Response:
        data = {
            "grant_type": "client_credentials",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.assertion(key),
        }
        if self.scope:
            data["scope"] = self.scope
        self.token_requests += 1
        return self._caller.post(self.token_url, "token", data=data, headers={"Accept": "application/json"})

    def _fetch(self) -> AccessToken:
        keys = self.key_ring.load().keys
        if not keys:
            raise TokenError(
                f"key ring '{self.key_ring.name}' has no signing key; run `redox-elt keys generate` and register the JWKS"
            )
        refusal: TokenError | None = None
        candidates = self._candidates(keys)
        for index, key in enumerate(candidates):
            issued_at = self._clock()
            response = self._request(key)
            if response.status_code == 200:
                return self._accept(key, response, issued_at, fell_back=index > 0)
            error, description = _oauth_error(response)
            refusal = TokenError(
                f"token request for client {self.client_id} refused by {self.token_url}: HTTP {response.status_code} "
                f"{error or 'error'}: {description or '(no description: a claim value such as aud, exp, iat or jti, or the signature, was rejected)'}",
                status_code=response.status_code,
                error=error,
                description=description,
            )
            # 401 is about the key or the assertion ("Public key not found" for a kid that is not
            # registered yet): another key of the ring may still work. 400 is about the request.
            if index + 1 < len(candidates) and response.status_code == 401:
                self._unregistered[key.kid] = self._clock()
                self._confirmed.discard(key.kid)
                log.warning(
                    "signing key %s was refused by the token endpoint (%s); trying key %s instead. If %s is new, "
                    "publish the JWKS (`redox-elt keys jwks`); signing moves to it once it is accepted",
                    key.kid,
                    description or f"HTTP {response.status_code}",
                    candidates[index + 1].kid,
                    key.kid,
                )
                continue
            raise refusal
        raise refusal  # type: ignore[misc]  # every candidate was refused

    def _accept(
        self, key: SigningKey, response: httpx.Response, issued_at: float, *, fell_back: bool
    ) -> AccessToken:
        try:
            body = response.json()
            value = body["access_token"]
            lifetime = clamp_lifetime(
                body.get("expires_in", OAUTH_MAX_LIFETIME_S),
                maximum=OAUTH_MAX_LIFETIME_S,
                minimum=self.min_lifetime_s,
            )
            if not isinstance(value, str) or not value:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise TokenError(
                f"token endpoint {self.token_url} answered 200 without a usable access_token"
            ) from None
        if key.kid not in self._confirmed:
            if self._confirmed or fell_back:
                log.info("signing key %s confirmed by the token endpoint", key.kid)
            self._confirmed.add(key.kid)
        self._unregistered.pop(key.kid, None)
        self.signing_kid = key.kid
        expires_at, refresh_at = self._schedule(issued_at, lifetime)
        return AccessToken(
            value=value, kind="oauth", expires_at=expires_at, refresh_at=refresh_at, kid=key.kid
        )


def _parse_expires(text: Any) -> float:
    """Seconds from now until a legacy ``expires`` ISO instant, clamped (24 h when unreadable)."""
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - datetime.now(UTC)).total_seconds()
    except (ValueError, OverflowError):
        return LEGACY_MAX_LIFETIME_S
    return clamp_lifetime(seconds, maximum=LEGACY_MAX_LIFETIME_S)


class LegacyTokenProvider(_SingleFlight):
    """Legacy API key + secret tokens (Data Model API only; Redox has deprecated them)."""

    kind = "legacy"

    def __init__(
        self,
        auth_url: str,
        api_key: str,
        secret: Callable[[], str],
        http: httpx.Client,
        *,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(clock=clock, rng=rng)
        self.auth_url = auth_url.rstrip("/")
        self.api_key = api_key
        self._secret = secret
        self._caller = _TokenEndpointCaller(http, audit, sleep=sleep, rng=self._rng)
        self._refresh_token: str | None = None

    def __repr__(self) -> str:
        return f"LegacyTokenProvider(auth_url={self.auth_url!r})"

    def check_credentials(self) -> None:
        """Raise unless the secret can be read (the vault opens with the master key)."""
        if not self._secret():
            raise TokenError(
                "the legacy API secret in the vault is empty; store it again with `redox-elt vault set`"
            )

    def _call(self, path: str, body: dict[str, str], operation: str) -> httpx.Response:
        self.token_requests += 1
        return self._caller.post(f"{self.auth_url}{path}", operation, json=body)

    def _fetch(self) -> AccessToken:
        issued_at = self._clock()
        if self._refresh_token is not None:
            response = self._call(
                "/refreshToken",
                {"apiKey": self.api_key, "refreshToken": self._refresh_token},
                "legacy refresh",
            )
            self._refresh_token = None
            if response.status_code == 200:
                return self._accept(response, issued_at)
            log.info("legacy refresh token refused (HTTP %s); authenticating again", response.status_code)
            issued_at = self._clock()
        response = self._call(
            "/authenticate", {"apiKey": self.api_key, "secret": self._secret()}, "legacy authenticate"
        )
        if response.status_code != 200:
            raise TokenError(
                f"legacy authentication at {self.auth_url}/authenticate refused: HTTP {response.status_code} "
                f"{_short(response.text, 80)!r}; check auth.legacy_api_key and the vault entry of the secret",
                status_code=response.status_code,
            )
        return self._accept(response, issued_at)

    def _accept(self, response: httpx.Response, issued_at: float) -> AccessToken:
        try:
            body = response.json()
            value = body["accessToken"]
            if not isinstance(value, str) or not value:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise TokenError(
                f"legacy endpoint {self.auth_url} answered 200 without a usable accessToken"
            ) from None
        refresh = body.get("refreshToken")
        self._refresh_token = refresh if isinstance(refresh, str) and refresh else None
        expires_at, refresh_at = self._schedule(issued_at, _parse_expires(body.get("expires")))
        return AccessToken(value=value, kind="legacy", expires_at=expires_at, refresh_at=refresh_at)
