"""The sandbox's token server: Redox OAuth (signed JWT assertion) and legacy API keys.

``POST /v2/auth/token`` follows REDOX-REFERENCE §1.1 (SMART Backend Services: client
credentials with an RS384/ES384 signed JWT). Error descriptions are Redox's documented ones;
Redox documents the text but not which failure gets which text, so the sandbox's mapping is:

=====================================================  ======  ===========================================
failure                                                status  ``error_description``
=====================================================  ======  ===========================================
body not form-encoded                                  400     ``x-www-form-urlencoded content-type required``
no / wrong ``grant_type``                              400     ``Missing grant_type parameter`` /
                                                               ``The grant_type parameter should equal 'client_credentials'``
no / wrong ``client_assertion_type``                   400     ``Missing client assertion type`` / ``Invalid client assertion type``
no ``client_assertion``                                400     ``Missing client assertion``
assertion is not a JWT                                 400     ``Invalid client assertion``
no ``kid`` header                                      400     ``JWT header kid property is required``
unknown ``iss`` (client id) or ``kid``                 401     ``Public key not found, check client_id, kid and Redox dashboard settings``
claim or header missing / malformed, ``sub`` != iss,   401     ``Unexpected X claim value``
``jku`` present (no JWKS URL is ever registered),
lifetime over 5 minutes (``exp`` - ``iat`` or ``exp`` - now
> ``max_assertion_lifetime_s`` + ``clock_skew_s``)       401     ``Unexpected exp claim value``
unsupported ``alg``, bad signature, wrong ``aud``,     401     ``""`` (blank, as Redox does for wrong values)
expired ``exp``, ``iat`` outside the window, reused ``jti``
=====================================================  ======  ===========================================

Every error body is ``{"error": "invalid_request", "error_description", "error_uri"}`` (Redox's
example uses ``invalid_request`` even for blank descriptions). The real reason of a blank
failure is logged (no token or key material) so a developer can see what went wrong.

Access tokens are opaque random strings (``secrets.token_urlsafe``), looked up in memory; they
are never JWTs, so clients cannot come to depend on reading them. Legacy keys (§1.2) are
Data Model only: ``check_bearer(..., surface="fhir")`` refuses them.

``aud`` is checked against the token URL the sandbox publishes (its base URL, or the
configured ``public_base_url``, + ``/v2/auth/token``), never against the request's ``Host``.

All state is in memory behind one lock; signature checks run outside it.
"""

from __future__ import annotations

import heapq
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.api_jws import PyJWS
from jwt.exceptions import InvalidSignatureError, PyJWTError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sandbox.config import SandboxConfig
from sandbox.http import REDOX_HEADERS as REDOX_HEADERS  # re-exported for the route modules
from sandbox.http import redox_json, redox_response

log = logging.getLogger(__name__)

TOKEN_PATH = "/v2/auth/token"
LEGACY_AUTHENTICATE_PATH = "/auth/authenticate"
LEGACY_REFRESH_PATH = "/auth/refreshToken"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ERROR_URI = "https://docs.redoxengine.com/permalink/7sEi7MTFssZ1JuHpUYLeYJ"
PUBLIC_KEY_NOT_FOUND = "Public key not found, check client_id, kid and Redox dashboard settings"
# Redox does not document how long a legacy refresh token lives; a month keeps memory bounded.
LEGACY_REFRESH_LIFETIME_S = 30 * 86400.0
# Expired access tokens are remembered this long so check_bearer can say "expired", not "unknown".
EXPIRED_TOKEN_MEMORY_S = 3600.0
_MIN_RSA_BITS = 2048
_CLIENT_NAMESPACE = uuid.UUID("3f0c1f55-6f55-4c8e-9a59-5b1f3d4e0a21")  # stable client ids per name


class InvalidToken(Exception):
    """A bearer token was refused; ``reason`` says why (never contains the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class TokenInfo:
    client_id: str  # OAuth client id, or the legacy apiKey
    kind: str  # "oauth" | "legacy"
    expires_at: float  # epoch seconds
    scope: str | None


class _HasBaseUrl(Protocol):
    """What the token endpoint needs of the sandbox state: its public base URL."""

    base_url: str


class TokenLifetimeSource(Protocol):
    def token_lifetime_s(self) -> float | None: ...


class _AssertionRejected(Exception):
    def __init__(self, status: int, description: str, log_reason: str | None = None) -> None:
        super().__init__(log_reason or description)
        self.status = status
        self.description = description
        self.log_reason = log_reason or description


@dataclass
class _IssuedToken:
    info: TokenInfo
    revoked: bool = False


@dataclass
class _LegacyRefresh:
    api_key: str
    expires_at: float


def _jwk_public_key(jwk: Any, where: str) -> tuple[str, str, Any]:
    """Validate one JWK; return (kid, algorithm, public key). Private JWKs are reduced to public."""
    if not isinstance(jwk, dict):
        raise ValueError(f"{where}: each key must be a JSON object")
    kid, kty = jwk.get("kid"), jwk.get("kty")
    if not isinstance(kid, str) or not kid:
        raise ValueError(f"{where}: 'kid' is required (a non-empty string)")
    if not isinstance(kty, str) or not kty:
        raise ValueError(f"{where} (kid {kid!r}): 'kty' is required")
    declared_alg = jwk.get("alg")
    if kty == "RSA":
        alg = "RS384"
        try:
            key = RSAAlgorithm.from_jwk(jwk)
        except (PyJWTError, ValueError, TypeError) as exc:
            raise ValueError(f"{where} (kid {kid!r}): not a valid RSA JWK ({exc})") from exc
        if isinstance(key, rsa.RSAPrivateKey):
            key = key.public_key()
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"{where} (kid {kid!r}): RSA keys must be at least {_MIN_RSA_BITS} bits")
    elif kty == "EC":
        alg = "ES384"
        if jwk.get("crv") != "P-384":
            raise ValueError(
                f"{where} (kid {kid!r}): EC keys must use curve P-384 (ES384), got {jwk.get('crv')!r}"
            )
        try:
            key = ECAlgorithm.from_jwk(jwk)
        except (PyJWTError, ValueError, TypeError) as exc:
            raise ValueError(f"{where} (kid {kid!r}): not a valid EC JWK ({exc})") from exc
        if isinstance(key, ec.EllipticCurvePrivateKey):
            key = key.public_key()
    else:
        raise ValueError(
            f"{where} (kid {kid!r}): kty {kty!r} is not supported; use RSA (RS384) or EC P-384 (ES384)"
        )
    if declared_alg is not None and declared_alg != alg:
        raise ValueError(
            f"{where} (kid {kid!r}): alg {declared_alg!r} does not fit a {kty} key; expected {alg}"
        )
    return kid, alg, key


def _iso_utc(epoch_s: float) -> str:
    """``2015-03-25T20:52:35.000Z``, the legacy ``expires`` format."""
    moment = datetime.fromtimestamp(epoch_s, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class AuthServer:
    """Registered OAuth clients and legacy keys, and the tokens issued to them."""

    def __init__(
        self,
        config: SandboxConfig,
        faults: TokenLifetimeSource,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._faults = faults
        self._clock = clock
        self._lock = threading.Lock()
        self._jws = PyJWS()
        self._client_keys: dict[str, dict[str, tuple[str, Any]]] = {}  # client id -> kid -> (alg, key)
        self._legacy_secrets: dict[str, str] = {}  # apiKey -> secret
        self._tokens: dict[str, _IssuedToken] = {}
        self._token_expiry: list[tuple[float, str]] = []  # heap of (forget_at, token)
        self._refresh: dict[str, _LegacyRefresh] = {}
        self._refresh_expiry: list[tuple[float, str]] = []
        self._seen_jti: dict[tuple[str, str], float] = {}  # (client id, jti) -> remember until
        self._jti_expiry: list[tuple[float, tuple[str, str]]] = []

    # ---- registration -------------------------------------------------------------------

    def register_client(self, name: str, jwks: dict) -> str:
        """Register (or replace) the public key set of the OAuth client called ``name``.

        The client id is a UUID stable per name, so registering the same name again is how a
        key rotation is recorded: the new set replaces the old one entirely (keep both kids in
        the set for an overlap period).
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError("register_client: name must be a non-empty string")
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
            raise ValueError('JWKS must be an object {"keys": [...]} with at least one key')
        keys: dict[str, tuple[str, Any]] = {}
        for i, jwk in enumerate(jwks["keys"]):
            kid, alg, key = _jwk_public_key(jwk, f"JWKS keys[{i}]")
            if kid in keys:
                raise ValueError(f"JWKS keys[{i}]: duplicate kid {kid!r}")
            keys[kid] = (alg, key)
        client_id = str(uuid.uuid5(_CLIENT_NAMESPACE, name))
        with self._lock:
            self._client_keys[client_id] = keys
        return client_id

    def create_legacy_key(self) -> dict[str, str]:
        """A new legacy source key pair: ``{"apiKey", "secret"}``."""
        api_key, secret = str(uuid.uuid4()), str(uuid.uuid4())
        with self._lock:
            self._legacy_secrets[api_key] = secret
        return {"apiKey": api_key, "secret": secret}

    # ---- tokens ---------------------------------------------------------------------------

    def check_bearer(self, authorization_header: str | None, surface: str) -> TokenInfo:
        """The token behind an ``Authorization`` header, or InvalidToken saying why not."""
        if not authorization_header or not authorization_header.strip():
            raise InvalidToken("missing Authorization header")
        scheme, _, token = authorization_header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise InvalidToken("Authorization header must be 'Bearer <access token>'")
        now = self._clock()
        with self._lock:
            issued = self._tokens.get(token)
            if issued is None:
                raise InvalidToken("unknown access token")
            if issued.revoked:
                raise InvalidToken("access token revoked")
            if issued.info.expires_at <= now:
                raise InvalidToken("access token expired")
            info = replace(issued.info)
        if info.kind == "legacy" and surface == "fhir":
            raise InvalidToken(
                "legacy API key tokens are accepted by the Data Model API only; use an OAuth API key"
            )
        return info

    def client_of(self, authorization_header: str | None) -> str | None:
        """The client (OAuth client id or legacy apiKey) a bearer token was issued to, or None.

        No validity checks: the routes call ``check_bearer`` first; this only names whose
        request it is, e.g. for the per-client quota.
        """
        if not authorization_header:
            return None
        _, _, token = authorization_header.strip().partition(" ")
        with self._lock:
            issued = self._tokens.get(token.strip())
        return issued.info.client_id if issued is not None else None

    def revoke(self, client_id: str | None = None) -> int:
        """Revoke every token of ``client_id`` (OAuth client id or legacy apiKey), or all tokens.

        Legacy refresh tokens of the same key are revoked too. Returns how many access tokens
        were revoked.
        """
        count = 0
        with self._lock:
            for issued in self._tokens.values():
                if not issued.revoked and (client_id is None or issued.info.client_id == client_id):
                    issued.revoked = True
                    count += 1
            for refresh_token in [
                t for t, r in self._refresh.items() if client_id is None or r.api_key == client_id
            ]:
                del self._refresh[refresh_token]
        return count

    def _oauth_lifetime(self) -> float:
        override = self._faults.token_lifetime_s()
        return float(override) if override is not None else float(self._config.token_lifetime_s)

    def _issue(
        self, client_id: str, kind: str, lifetime_s: float, scope: str | None, now: float
    ) -> tuple[str, TokenInfo]:
        """Store a new access token; caller holds the lock. Returns (token, info)."""
        token = secrets.token_urlsafe(32)
        info = TokenInfo(client_id=client_id, kind=kind, expires_at=now + lifetime_s, scope=scope)
        self._tokens[token] = _IssuedToken(info)
        heapq.heappush(self._token_expiry, (info.expires_at + EXPIRED_TOKEN_MEMORY_S, token))
        return token, info

    def _purge(self, now: float) -> None:
        """Forget expired tokens, refresh tokens and replay-cache entries; caller holds the lock."""
        while self._token_expiry and self._token_expiry[0][0] <= now:
            _, token = heapq.heappop(self._token_expiry)
            self._tokens.pop(token, None)
        while self._refresh_expiry and self._refresh_expiry[0][0] <= now:
            _, refresh_token = heapq.heappop(self._refresh_expiry)
            entry = self._refresh.get(refresh_token)
            if entry is not None and entry.expires_at <= now:
                del self._refresh[refresh_token]
        while self._jti_expiry and self._jti_expiry[0][0] <= now:
            _, key = heapq.heappop(self._jti_expiry)
            if self._seen_jti.get(key, now + 1) <= now:
                del self._seen_jti[key]

    # ---- OAuth token endpoint -----------------------------------------------------------

    @staticmethod
    def _expected_audiences(state: _HasBaseUrl | None) -> set[str]:
        """The token URL as the sandbox publishes it (``/_sandbox/connections`` ``token_url``).

        Never derived from the request: a ``Host`` header is the client's to choose, so an
        assertion made for another server must not become valid by sending its name.
        """
        if state is None or not state.base_url:
            return set()
        return {state.base_url.rstrip("/") + TOKEN_PATH}

    def _verify_assertion(
        self, assertion: str, audiences: set[str], now: float
    ) -> tuple[str, dict[str, Any]]:
        """Check one client assertion fully; return (client id, claims) or raise _AssertionRejected."""
        try:
            header = self._jws.get_unverified_header(assertion)
        except PyJWTError as exc:
            raise _AssertionRejected(
                400, "Invalid client assertion", f"assertion is not a JWT ({exc})"
            ) from exc
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _AssertionRejected(400, "JWT header kid property is required")
        alg = header.get("alg")
        if alg not in ("RS384", "ES384"):
            raise _AssertionRejected(401, "", f"unsupported alg {alg!r}")
        if "jku" in header:
            raise _AssertionRejected(
                401, "Unexpected jku claim value", "jku sent but no JWKS URL is registered"
            )
        try:
            unverified = json.loads(
                self._jws.decode_complete(assertion, options={"verify_signature": False})["payload"]
            )
        except (PyJWTError, ValueError) as exc:
            raise _AssertionRejected(
                400, "Invalid client assertion", "assertion payload is not JSON"
            ) from exc
        if not isinstance(unverified, dict):
            raise _AssertionRejected(400, "Invalid client assertion", "assertion payload is not an object")
        client_id = unverified.get("iss")
        with self._lock:
            keys = self._client_keys.get(client_id) if isinstance(client_id, str) else None
            entry = keys.get(kid) if keys else None
        if entry is None:
            raise _AssertionRejected(401, PUBLIC_KEY_NOT_FOUND, "unknown iss or kid")
        key_alg, public_key = entry
        if key_alg != alg:
            raise _AssertionRejected(401, "", f"alg {alg} does not match the registered {key_alg} key")
        try:
            verified = self._jws.decode_complete(assertion, key=public_key, algorithms=[alg])
        except InvalidSignatureError as exc:
            raise _AssertionRejected(401, "", "signature does not verify with the registered key") from exc
        except PyJWTError as exc:
            raise _AssertionRejected(401, "", f"signature check failed ({type(exc).__name__})") from exc
        claims = json.loads(verified["payload"])
        self._check_claims(client_id, claims, audiences, now)
        return client_id, claims

    def _check_claims(self, client_id: str, claims: dict[str, Any], audiences: set[str], now: float) -> None:
        skew = float(self._config.clock_skew_s)
        if claims.get("sub") != client_id:
            raise _AssertionRejected(401, "Unexpected sub claim value", "sub must equal iss (the client id)")
        aud = claims.get("aud")
        if aud is None:
            if self._config.require_aud:
                raise _AssertionRejected(401, "Unexpected aud claim value", "aud is required")
        else:
            aud_values = aud if isinstance(aud, list) else [aud]
            if not any(isinstance(a, str) and a.rstrip("/") in audiences for a in aud_values):
                expected = sorted(audiences)[0] if audiences else "unknown: the server has no base URL"
                raise _AssertionRejected(401, "", f"aud must be the token URL ({expected})")
        exp, iat, jti = claims.get("exp"), claims.get("iat"), claims.get("jti")
        if not _is_number(exp):
            raise _AssertionRejected(401, "Unexpected exp claim value", "exp is required (epoch seconds)")
        if not _is_number(iat):
            raise _AssertionRejected(401, "Unexpected iat claim value", "iat is required (epoch seconds)")
        if not isinstance(jti, str) or not jti:
            raise _AssertionRejected(401, "Unexpected jti claim value", "jti is required (a unique string)")
        if exp + skew <= now:
            raise _AssertionRejected(401, "", "assertion expired (exp is in the past)")
        if iat > now + skew:
            raise _AssertionRejected(401, "", "iat is in the future beyond the allowed clock skew")
        if iat < now - float(self._config.iat_window_s) - skew:
            raise _AssertionRejected(401, "", f"iat is older than {self._config.iat_window_s:g} s")
        max_lifetime = float(self._config.max_assertion_lifetime_s) + skew
        if exp - iat > max_lifetime or exp - now > max_lifetime:
            raise _AssertionRejected(
                401,
                "Unexpected exp claim value",
                f"assertion lifetime exceeds {self._config.max_assertion_lifetime_s:g} s",
            )
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_number(nbf) or nbf > now + skew):
            raise _AssertionRejected(401, "Unexpected nbf claim value", "nbf is in the future")
        # The assertion stays acceptable until both exp and the iat window close; remember its
        # jti exactly that long so the replay cache is bounded by time.
        valid_until = min(exp, iat + float(self._config.iat_window_s)) + skew
        key = (client_id, jti)
        with self._lock:
            self._purge(now)
            if key in self._seen_jti:
                raise _AssertionRejected(401, "", "jti was already used")
            self._seen_jti[key] = valid_until
            heapq.heappush(self._jti_expiry, (valid_until, key))

    async def _token_endpoint(self, request: Request, state: _HasBaseUrl | None) -> Response:
        try:
            form = await self._read_token_form(request)
            assertion = form["client_assertion"]
            now = self._clock()
            client_id, claims = self._verify_assertion(assertion, self._expected_audiences(state), now)
        except _AssertionRejected as rejected:
            log.info("token request refused (%s): %s", rejected.status, rejected.log_reason)
            body = {
                "error": "invalid_request",
                "error_description": rejected.description,
                "error_uri": ERROR_URI,
            }
            return redox_json(body, rejected.status)
        scope = form.get("scope") or (claims.get("scope") if isinstance(claims.get("scope"), str) else None)
        lifetime = self._oauth_lifetime()
        with self._lock:
            self._purge(now)
            token, _ = self._issue(client_id, "oauth", lifetime, scope or None, now)
        expires_in: float = int(lifetime) if float(lifetime).is_integer() else round(lifetime, 3)
        return redox_json(
            {"access_token": token, "token_type": "Bearer", "expires_in": expires_in, "scope": scope or ""}
        )

    @staticmethod
    async def _read_token_form(request: Request) -> dict[str, str]:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/x-www-form-urlencoded":
            raise _AssertionRejected(400, "x-www-form-urlencoded content-type required")
        raw = (await request.body()).decode("utf-8", errors="replace")
        form: dict[str, str] = {}
        for name, value in parse_qsl(raw, keep_blank_values=True):
            form.setdefault(name, value)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _AssertionRejected(400, "Missing grant_type parameter")
        if grant_type != "client_credentials":
            raise _AssertionRejected(400, "The grant_type parameter should equal 'client_credentials'")
        assertion_type = form.get("client_assertion_type")
        if not assertion_type:
            raise _AssertionRejected(400, "Missing client assertion type")
        if assertion_type != CLIENT_ASSERTION_TYPE:
            raise _AssertionRejected(400, "Invalid client assertion type")
        if not form.get("client_assertion"):
            raise _AssertionRejected(400, "Missing client assertion")
        return form

    # ---- legacy endpoints ---------------------------------------------------------------

    def _legacy_tokens(self, api_key: str, now: float) -> dict[str, str]:
        """Issue an access + refresh token pair for a legacy key; caller holds the lock."""
        access_token, info = self._issue(
            api_key, "legacy", float(self._config.legacy_token_lifetime_s), None, now
        )
        refresh_token = str(uuid.uuid4())
        expires_at = now + LEGACY_REFRESH_LIFETIME_S
        self._refresh[refresh_token] = _LegacyRefresh(api_key, expires_at)
        heapq.heappush(self._refresh_expiry, (expires_at, refresh_token))
        return {
            "accessToken": access_token,
            "expires": _iso_utc(info.expires_at),
            "refreshToken": refresh_token,
        }

    @staticmethod
    async def _json_fields(request: Request, *names: str) -> dict[str, str] | None:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return None
        if not isinstance(body, dict) or not all(isinstance(body.get(n), str) and body[n] for n in names):
            return None
        return {n: body[n] for n in names}

    async def _authenticate_endpoint(self, request: Request) -> Response:
        fields = await self._json_fields(request, "apiKey", "secret")
        now = self._clock()
        with self._lock:
            secret = self._legacy_secrets.get(fields["apiKey"]) if fields else None
            if secret is None or not hmac.compare_digest(secret.encode(), fields["secret"].encode()):
                return _legacy_refusal()
            self._purge(now)
            tokens = self._legacy_tokens(fields["apiKey"], now)
        return redox_json(tokens)

    async def _refresh_endpoint(self, request: Request) -> Response:
        fields = await self._json_fields(request, "apiKey", "refreshToken")
        now = self._clock()
        with self._lock:
            entry = self._refresh.get(fields["refreshToken"]) if fields else None
            if entry is None or entry.api_key != fields["apiKey"] or entry.expires_at <= now:
                return _legacy_refusal()
            del self._refresh[fields["refreshToken"]]  # a refresh token is good for one use
            self._purge(now)
            tokens = self._legacy_tokens(fields["apiKey"], now)
        return redox_json(tokens)

    # ---- routes -------------------------------------------------------------------------

    def routes(self, state: _HasBaseUrl | None = None) -> list[BaseRoute]:
        async def token(request: Request) -> Response:
            return await self._token_endpoint(request, state)

        return [
            Route(TOKEN_PATH, token, methods=["POST"]),
            Route(LEGACY_AUTHENTICATE_PATH, self._authenticate_endpoint, methods=["POST"]),
            Route(LEGACY_REFRESH_PATH, self._refresh_endpoint, methods=["POST"]),
        ]


def _legacy_refusal() -> Response:
    # Recorded real response to bad legacy credentials: 401, text/html, "Invalid request" (§1.2).
    return redox_response(b"Invalid request", 401, "text/html; charset=utf-8")


def routes(state: Any) -> list[BaseRoute]:
    """The token endpoints of ``state.auth`` (a ``sandbox.state.SandboxState``)."""
    return state.auth.routes(state)
