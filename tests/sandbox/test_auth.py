"""The sandbox token server: OAuth JWT assertions (REDOX-REFERENCE §1.1) and legacy keys (§1.2)."""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.testclient import TestClient

from sandbox.auth import (
    CLIENT_ASSERTION_TYPE,
    ERROR_URI,
    PUBLIC_KEY_NOT_FOUND,
    AuthServer,
    InvalidToken,
    routes,
)
from sandbox.config import SandboxConfig
from sandbox.faults import Faults
from sandbox.state import SandboxState

BASE_URL = "http://127.0.0.1:8999"  # the sandbox's own URL, as its server knows it
TOKEN_URL = BASE_URL + "/v2/auth/token"
DROP = object()  # marks a claim/header to leave out


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> dict:
    return {
        "rsa_a": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa_b": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "forged": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP384R1()),
    }


def rsa_jwk(private_key, kid: str) -> dict:
    return {**RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True), "kid": kid}


def ec_jwk(private_key, kid: str) -> dict:
    return {**ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True), "kid": kid}


class Sandbox:
    def __init__(self, config: SandboxConfig) -> None:
        self.clock = FakeClock()
        self.config = config
        self.faults = Faults(config, seed=7)
        self.auth = AuthServer(config, self.faults, clock=self.clock)
        self.state = SandboxState(
            config=config,
            store=None,
            auth=self.auth,
            faults=self.faults,
            webhooks=None,
            base_url=BASE_URL,
        )
        self.client = TestClient(Starlette(routes=routes(self.state)))

    def assertion(self, private_key, alg: str, kid, client_id: str, headers=None, **claims) -> str:
        now = int(self.clock.now)
        body = {
            "iss": client_id,
            "sub": client_id,
            "aud": TOKEN_URL,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not DROP}
        header = {"kid": kid, **(headers or {})}
        header = {k: v for k, v in header.items() if v is not DROP}
        return jwt.encode(body, private_key, algorithm=alg, headers=header)

    def token_request(self, assertion: str | None, headers: dict | None = None, **form):
        data = {"grant_type": "client_credentials", "client_assertion_type": CLIENT_ASSERTION_TYPE}
        if assertion is not None:
            data["client_assertion"] = assertion
        data.update(form)
        data = {k: v for k, v in data.items() if v is not DROP}
        return self.client.post("/v2/auth/token", data=data, headers=headers)


@pytest.fixture
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig())


@pytest.fixture
def rsa_client(sandbox: Sandbox, keys: dict) -> str:
    return sandbox.auth.register_client("elt-rsa", {"keys": [rsa_jwk(keys["rsa_a"], "rsa-a")]})


def assert_oauth_error(response, status: int, description: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {
        "error": "invalid_request",
        "error_description": description,
        "error_uri": ERROR_URI,
    }


# ---- successful token requests ---------------------------------------------------------------


def test_rs384_assertion_gets_a_bearer_token(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    response = sandbox.token_request(sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == ""
    assert isinstance(body["access_token"], str) and len(body["access_token"]) >= 32
    assert response.headers["cache-control"] == "private, no-cache, no-store, must-revalidate"
    assert response.headers["strict-transport-security"] == "max-age=300"
    assert response.headers["x-frame-options"] == "deny"
    assert response.headers["etag"].startswith('W/"')
    assert response.headers["content-type"] == "application/json; charset=utf-8"

    info = sandbox.auth.check_bearer(f"Bearer {body['access_token']}", "fhir")
    assert info.client_id == rsa_client
    assert info.kind == "oauth"
    assert info.expires_at == pytest.approx(sandbox.clock.now + 300)


def test_es384_assertion_gets_a_token_and_scope_is_echoed(sandbox: Sandbox, keys: dict) -> None:
    client_id = sandbox.auth.register_client("elt-ec", {"keys": [ec_jwk(keys["ec"], "ec-1")]})
    response = sandbox.token_request(
        sandbox.assertion(keys["ec"], "ES384", "ec-1", client_id), scope="fhir:development"
    )
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "fhir:development"
    info = sandbox.auth.check_bearer(f"Bearer {response.json()['access_token']}", "datamodel")
    assert info.scope == "fhir:development"


def test_client_id_is_stable_per_name(sandbox: Sandbox, keys: dict) -> None:
    jwks = {"keys": [rsa_jwk(keys["rsa_a"], "k")]}
    first = sandbox.auth.register_client("same-name", jwks)
    assert sandbox.auth.register_client("same-name", jwks) == first
    assert Sandbox(SandboxConfig()).auth.register_client("same-name", jwks) == first
    assert sandbox.auth.register_client("other-name", jwks) != first
    uuid.UUID(first)


def test_audience_may_be_the_configured_base_url(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    aud = sandbox.state.base_url + "/v2/auth/token"
    response = sandbox.token_request(sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client, aud=aud))
    assert response.status_code == 200, response.text


def test_audience_is_never_taken_from_the_host_header(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    # An assertion made for another server must not become valid by naming that server in Host.
    evil = sandbox.assertion(
        keys["rsa_a"], "RS384", "rsa-a", rsa_client, aud="http://evil.example/v2/auth/token"
    )
    assert_oauth_error(sandbox.token_request(evil, headers={"Host": "evil.example"}), 401, "")
    # Nor is the test client's own Host name (testserver) an accepted audience.
    local = sandbox.assertion(
        keys["rsa_a"], "RS384", "rsa-a", rsa_client, aud="http://testserver/v2/auth/token"
    )
    assert_oauth_error(sandbox.token_request(local), 401, "")


def test_no_audience_is_accepted_without_a_known_base_url(keys: dict) -> None:
    bare = Sandbox(SandboxConfig())
    bare.state.base_url = ""
    client_id = bare.auth.register_client("c", {"keys": [rsa_jwk(keys["rsa_a"], "k1")]})
    assertion = bare.assertion(keys["rsa_a"], "RS384", "k1", client_id, aud="http://testserver/v2/auth/token")
    assert_oauth_error(bare.token_request(assertion), 401, "")


@pytest.mark.parametrize(
    ("iat_offset", "exp_offset", "accepted"),
    [
        (0, 300, True),  # the usual 5 minutes
        (0, 310, True),  # within the 10 s clock skew
        (0, 311, False),  # exp - iat over 5 minutes + skew
        (0, 10 * 365 * 86400, False),  # ten years ahead (the issue-14 attack)
        (-250, 200, False),  # exp - iat = 450 s although exp - now is fine
        (100, 400, False),  # iat beyond the skew in the future
    ],
    ids=["5-min", "skew", "over", "ten-years", "long-past-issued", "future-iat"],
)
def test_assertion_lifetime_over_five_minutes_is_refused(
    sandbox: Sandbox, keys: dict, rsa_client: str, iat_offset: int, exp_offset: int, accepted: bool
) -> None:
    now = int(sandbox.clock.now)
    assertion = sandbox.assertion(
        keys["rsa_a"], "RS384", "rsa-a", rsa_client, iat=now + iat_offset, exp=now + exp_offset
    )
    response = sandbox.token_request(assertion)
    if accepted:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_request"


def test_ten_year_assertion_names_the_exp_claim(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    now = int(sandbox.clock.now)
    assertion = sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client, exp=now + 10 * 365 * 86400)
    assert_oauth_error(sandbox.token_request(assertion), 401, "Unexpected exp claim value")


def test_token_lifetime_fault_sets_expires_in(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    sandbox.faults.set({"token_lifetime_s": 2})
    response = sandbox.token_request(sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client))
    assert response.json()["expires_in"] == 2


# ---- rejected token requests -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "status", "description"),
    [
        ({"aud": "https://api.redoxengine.com/v2/auth/token"}, 401, ""),
        ({"aud": DROP}, 401, "Unexpected aud claim value"),
        ({"exp": lambda now: now - 60}, 401, ""),
        ({"exp": DROP}, 401, "Unexpected exp claim value"),
        ({"iat": lambda now: now - 400}, 401, ""),
        ({"iat": lambda now: now + 60}, 401, ""),
        ({"iat": DROP}, 401, "Unexpected iat claim value"),
        ({"jti": DROP}, 401, "Unexpected jti claim value"),
        ({"sub": "someone-else"}, 401, "Unexpected sub claim value"),
        ({"iss": str(uuid.uuid4())}, 401, PUBLIC_KEY_NOT_FOUND),
    ],
    ids=[
        "wrong-aud",
        "missing-aud-strict",
        "expired-exp",
        "missing-exp",
        "iat-too-old",
        "iat-in-future",
        "missing-iat",
        "missing-jti",
        "iss-not-sub",
        "unknown-iss",
    ],
)
def test_bad_claims_are_refused(
    sandbox: Sandbox, keys: dict, rsa_client: str, claims, status, description
) -> None:
    # Times are relative to the sandbox's clock when the test runs, not when it was collected.
    now = int(sandbox.clock.now)
    claims = {k: v(now) if callable(v) else v for k, v in claims.items()}
    response = sandbox.token_request(sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client, **claims))
    assert_oauth_error(response, status, description)


def test_iat_within_clock_skew_is_accepted(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    now = int(sandbox.clock.now)
    future = sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client, iat=now + 5)
    old = sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client, iat=now - 305, exp=now + 4)
    assert sandbox.token_request(future).status_code == 200
    assert sandbox.token_request(old).status_code == 200


def test_forged_signature_is_refused(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    forged = sandbox.assertion(keys["forged"], "RS384", "rsa-a", rsa_client)
    assert_oauth_error(sandbox.token_request(forged), 401, "")


def test_unsupported_algorithm_is_refused(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    rs256 = sandbox.assertion(keys["rsa_a"], "RS256", "rsa-a", rsa_client)
    assert_oauth_error(sandbox.token_request(rs256), 401, "")
    hs = sandbox.assertion(
        "a-shared-secret-that-is-long-enough-for-hs384-0123456789", "HS384", "rsa-a", rsa_client
    )
    assert_oauth_error(sandbox.token_request(hs), 401, "")


def test_missing_and_unknown_kid_are_refused(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    no_kid = sandbox.assertion(keys["rsa_a"], "RS384", DROP, rsa_client)
    assert_oauth_error(sandbox.token_request(no_kid), 400, "JWT header kid property is required")
    unknown_kid = sandbox.assertion(keys["rsa_a"], "RS384", "not-registered", rsa_client)
    assert_oauth_error(sandbox.token_request(unknown_kid), 401, PUBLIC_KEY_NOT_FOUND)


def test_reused_jti_is_refused(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    assertion = sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client)
    assert sandbox.token_request(assertion).status_code == 200
    assert_oauth_error(sandbox.token_request(assertion), 401, "")


def test_concurrent_replays_of_one_assertion_get_exactly_one_token(
    sandbox: Sandbox, keys: dict, rsa_client: str
) -> None:
    assertion = sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client)
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda _: sandbox.token_request(assertion).status_code, range(8)))
    assert sorted(statuses) == [200] + [401] * 7


def test_missing_aud_is_accepted_when_not_required(keys: dict) -> None:
    lenient = Sandbox(SandboxConfig(require_aud=False))
    client_id = lenient.auth.register_client("tidepool-style", {"keys": [rsa_jwk(keys["rsa_a"], "k1")]})
    no_aud = lenient.assertion(keys["rsa_a"], "RS384", "k1", client_id, aud=DROP)
    assert lenient.token_request(no_aud).status_code == 200
    wrong_aud = lenient.assertion(
        keys["rsa_a"], "RS384", "k1", client_id, aud="https://elsewhere/v2/auth/token"
    )
    assert_oauth_error(lenient.token_request(wrong_aud), 401, "")


def test_jku_header_is_refused_because_no_jwks_url_is_registered(
    sandbox: Sandbox, keys: dict, rsa_client: str
) -> None:
    assertion = sandbox.assertion(
        keys["rsa_a"], "RS384", "rsa-a", rsa_client, headers={"jku": "https://x/jwks"}
    )
    assert_oauth_error(sandbox.token_request(assertion), 401, "Unexpected jku claim value")


def test_token_request_must_be_form_encoded(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    assertion = sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client)
    response = sandbox.client.post(
        "/v2/auth/token",
        json={
            "grant_type": "client_credentials",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion,
        },
    )
    assert_oauth_error(response, 400, "x-www-form-urlencoded content-type required")


@pytest.mark.parametrize(
    ("form", "description"),
    [
        ({"grant_type": DROP}, "Missing grant_type parameter"),
        ({"grant_type": "password"}, "The grant_type parameter should equal 'client_credentials'"),
        ({"client_assertion_type": DROP}, "Missing client assertion type"),
        ({"client_assertion_type": "urn:wrong"}, "Invalid client assertion type"),
        ({"client_assertion": DROP}, "Missing client assertion"),
        ({"client_assertion": "not-a-jwt"}, "Invalid client assertion"),
    ],
)
def test_bad_form_parameters_are_refused(
    sandbox: Sandbox, keys: dict, rsa_client: str, form, description
) -> None:
    assertion = sandbox.assertion(keys["rsa_a"], "RS384", "rsa-a", rsa_client)
    assert_oauth_error(sandbox.token_request(assertion, **form), 400, description)


def test_token_endpoint_only_accepts_post(sandbox: Sandbox) -> None:
    assert sandbox.client.get("/v2/auth/token").status_code == 405


# ---- key registration and rotation -------------------------------------------------------------


def test_key_rotation_replaces_the_key_set(sandbox: Sandbox, keys: dict) -> None:
    auth = sandbox.auth
    client_id = auth.register_client("rotating", {"keys": [rsa_jwk(keys["rsa_a"], "old")]})

    def works(private_key, kid: str) -> bool:
        response = sandbox.token_request(sandbox.assertion(private_key, "RS384", kid, client_id))
        return response.status_code == 200

    assert works(keys["rsa_a"], "old")
    # Overlap: both keys registered under the same client id.
    overlap = {"keys": [rsa_jwk(keys["rsa_a"], "old"), rsa_jwk(keys["rsa_b"], "new")]}
    assert auth.register_client("rotating", overlap) == client_id
    assert works(keys["rsa_a"], "old")
    assert works(keys["rsa_b"], "new")
    # Old key dropped.
    assert auth.register_client("rotating", {"keys": [rsa_jwk(keys["rsa_b"], "new")]}) == client_id
    assert not works(keys["rsa_a"], "old")
    assert works(keys["rsa_b"], "new")
    response = sandbox.token_request(sandbox.assertion(keys["rsa_a"], "RS384", "old", client_id))
    assert_oauth_error(response, 401, PUBLIC_KEY_NOT_FOUND)


def test_a_private_jwk_registers_only_its_public_half(sandbox: Sandbox, keys: dict) -> None:
    private_jwk = {**RSAAlgorithm.to_jwk(keys["rsa_a"], as_dict=True), "kid": "downloaded"}
    client_id = sandbox.auth.register_client("downloaded-key", {"keys": [private_jwk]})
    response = sandbox.token_request(sandbox.assertion(keys["rsa_a"], "RS384", "downloaded", client_id))
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("jwks_factory", "message"),
    [
        (lambda k: {"keys": []}, "at least one key"),
        (lambda k: {"nokeys": 1}, "at least one key"),
        (lambda k: {"keys": [{k2: v for k2, v in rsa_jwk(k["rsa_a"], "x").items() if k2 != "kid"}]}, "'kid'"),
        (lambda k: {"keys": [{k2: v for k2, v in rsa_jwk(k["rsa_a"], "x").items() if k2 != "kty"}]}, "'kty'"),
        (lambda k: {"keys": [{"kid": "s", "kty": "oct", "k": "c2VjcmV0"}]}, "kty 'oct' is not supported"),
        (
            lambda k: {"keys": [ec_jwk(ec.generate_private_key(ec.SECP256R1()), "p256")]},
            "curve P-384",
        ),
        (
            lambda k: {
                "keys": [rsa_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "small")]
            },
            "at least 2048 bits",
        ),
        (lambda k: {"keys": [rsa_jwk(k["rsa_a"], "dup"), rsa_jwk(k["rsa_b"], "dup")]}, "duplicate kid"),
        (lambda k: {"keys": [{**rsa_jwk(k["rsa_a"], "x"), "alg": "ES384"}]}, "does not fit"),
        (lambda k: {"keys": [{"kid": "x", "kty": "RSA", "n": "!!"}]}, "not a valid RSA JWK"),
    ],
    ids=[
        "empty",
        "no-keys-member",
        "no-kid",
        "no-kty",
        "oct",
        "p256",
        "small-rsa",
        "dup-kid",
        "alg-mismatch",
        "junk",
    ],
)
def test_bad_jwks_is_rejected_with_a_clear_message(
    sandbox: Sandbox, keys: dict, jwks_factory, message
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        sandbox.auth.register_client("bad", jwks_factory(keys))


# ---- bearer checks -----------------------------------------------------------------------------


def oauth_token(sandbox: Sandbox, keys: dict, client_id: str, kid: str = "rsa-a", key: str = "rsa_a") -> str:
    response = sandbox.token_request(sandbox.assertion(keys[key], "RS384", kid, client_id))
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Basic dXNlcjpwYXNz", "Bearer <access token>"),
        ("Bearer", "Bearer <access token>"),
        ("Bearer not-issued-by-us", "unknown"),
    ],
)
def test_check_bearer_refuses_missing_malformed_and_unknown(sandbox: Sandbox, header, reason) -> None:
    with pytest.raises(InvalidToken) as caught:
        sandbox.auth.check_bearer(header, "fhir")
    assert reason in caught.value.reason


def test_expired_token_is_refused(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    sandbox.faults.set({"token_lifetime_s": 1})
    token = oauth_token(sandbox, keys, rsa_client)
    assert sandbox.auth.check_bearer(f"Bearer {token}", "fhir").client_id == rsa_client
    sandbox.clock.now += 1.5
    with pytest.raises(InvalidToken, match="expired"):
        sandbox.auth.check_bearer(f"Bearer {token}", "fhir")


def test_revoke_one_client_then_everyone(sandbox: Sandbox, keys: dict, rsa_client: str) -> None:
    other = sandbox.auth.register_client("other", {"keys": [rsa_jwk(keys["rsa_b"], "b")]})
    mine = oauth_token(sandbox, keys, rsa_client)
    theirs = oauth_token(sandbox, keys, other, kid="b", key="rsa_b")
    legacy_key = sandbox.auth.create_legacy_key()
    legacy = sandbox.client.post("/auth/authenticate", json=legacy_key).json()["accessToken"]

    assert sandbox.auth.revoke(rsa_client) == 1
    with pytest.raises(InvalidToken, match="revoked"):
        sandbox.auth.check_bearer(f"Bearer {mine}", "fhir")
    assert sandbox.auth.check_bearer(f"Bearer {theirs}", "fhir").client_id == other

    sandbox.auth.revoke()
    for token in (theirs, legacy):
        with pytest.raises(InvalidToken, match="revoked"):
            sandbox.auth.check_bearer(f"Bearer {token}", "datamodel")
    # A fresh assertion still gets a working token after revocation.
    fresh = oauth_token(sandbox, keys, rsa_client)
    assert sandbox.auth.check_bearer(f"Bearer {fresh}", "fhir").kind == "oauth"


# ---- legacy keys -------------------------------------------------------------------------------


def test_legacy_authenticate_returns_24h_token_for_data_model_only(sandbox: Sandbox) -> None:
    credentials = sandbox.auth.create_legacy_key()
    assert set(credentials) == {"apiKey", "secret"}
    uuid.UUID(credentials["apiKey"])
    uuid.UUID(credentials["secret"])

    response = sandbox.client.post("/auth/authenticate", json=credentials)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "private, no-cache, no-store, must-revalidate"
    body = response.json()
    assert set(body) == {"accessToken", "expires", "refreshToken"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["expires"])
    expires = datetime.strptime(body["expires"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert expires.timestamp() == pytest.approx(sandbox.clock.now + 86400, abs=1)

    info = sandbox.auth.check_bearer(f"Bearer {body['accessToken']}", "datamodel")
    assert (info.kind, info.client_id) == ("legacy", credentials["apiKey"])
    with pytest.raises(InvalidToken, match="Data Model API only"):
        sandbox.auth.check_bearer(f"Bearer {body['accessToken']}", "fhir")


@pytest.mark.parametrize(
    "body",
    [
        {"apiKey": "wrong", "secret": "wrong"},
        "not json",
        {"apiKey": "placeholder"},
    ],
    ids=["unknown-key", "not-json", "no-secret"],
)
def test_legacy_bad_credentials_get_html_invalid_request(sandbox: Sandbox, body) -> None:
    if isinstance(body, str):
        response = sandbox.client.post("/auth/authenticate", content=body)
    else:
        response = sandbox.client.post("/auth/authenticate", json=body)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == "Invalid request"


def test_legacy_wrong_secret_is_refused(sandbox: Sandbox) -> None:
    credentials = sandbox.auth.create_legacy_key()
    response = sandbox.client.post("/auth/authenticate", json={**credentials, "secret": str(uuid.uuid4())})
    assert (response.status_code, response.text) == (401, "Invalid request")


def test_legacy_refresh_issues_new_tokens_and_consumes_the_old_refresh_token(sandbox: Sandbox) -> None:
    credentials = sandbox.auth.create_legacy_key()
    first = sandbox.client.post("/auth/authenticate", json=credentials).json()
    sandbox.clock.now += 60
    refresh = {"apiKey": credentials["apiKey"], "refreshToken": first["refreshToken"]}
    response = sandbox.client.post("/auth/refreshToken", json=refresh)
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["accessToken"] != first["accessToken"]
    assert second["refreshToken"] != first["refreshToken"]
    assert second["expires"] > first["expires"]
    assert sandbox.auth.check_bearer(f"Bearer {second['accessToken']}", "datamodel").kind == "legacy"

    reused = sandbox.client.post("/auth/refreshToken", json=refresh)
    assert (reused.status_code, reused.text) == (401, "Invalid request")
    assert reused.headers["content-type"].startswith("text/html")

    other_key = sandbox.auth.create_legacy_key()["apiKey"]
    stolen = sandbox.client.post(
        "/auth/refreshToken", json={"apiKey": other_key, "refreshToken": second["refreshToken"]}
    )
    assert stolen.status_code == 401
