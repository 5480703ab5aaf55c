"""The signing key ring: generate, rotate (old + new published), JWKS, retire; assertions verify."""

from __future__ import annotations

import jwt
import pytest
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from resources.auth import OAuthTokenProvider
from resources.keys import KeyRing, KeyRingError, thumbprint
from resources.vault import Vault


def test_generate_is_idempotent_and_kid_is_the_thumbprint(vault: Vault) -> None:
    ring = KeyRing(vault)
    first, created = ring.generate()
    again, created_again = ring.generate()
    assert created and not created_again
    assert again.kid == first.kid
    jwk = ring.jwks()["keys"][0]
    assert jwk["kid"] == first.kid == thumbprint(jwk)
    assert jwk["alg"] == "RS384" and jwk["use"] == "sig" and jwk["kty"] == "RSA"


def test_jwks_holds_public_parts_only(key_ring: KeyRing) -> None:
    jwk = key_ring.jwks()["keys"][0]
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
    assert "PRIVATE" not in repr(key_ring.load())


def test_rotate_keeps_old_and_adds_new(key_ring: KeyRing) -> None:
    old = {k["kid"] for k in key_ring.jwks()["keys"]}
    new_key = key_ring.rotate()
    after = {k["kid"] for k in key_ring.jwks()["keys"]}
    assert old < after and new_key.kid in after and len(after) == 2
    assert key_ring.load().newest.kid == new_key.kid


def test_retire_drops_the_key_and_refuses_the_last_one(key_ring: KeyRing) -> None:
    old = key_ring.load().newest
    new_key = key_ring.rotate()
    retired = key_ring.retire(old.kid)
    assert retired.kid == old.kid
    assert [k["kid"] for k in key_ring.jwks()["keys"]] == [new_key.kid]
    assert [r.kid for r in key_ring.load().retired] == [old.kid]
    with pytest.raises(KeyRingError, match="only key"):
        key_ring.retire(new_key.kid)
    with pytest.raises(KeyRingError, match="no active key"):
        key_ring.retire(old.kid)


def test_es384_keys_are_supported(vault: Vault) -> None:
    ring = KeyRing(vault, "ec-ring")
    key, _ = ring.generate("ES384")
    jwk = ring.jwks()["keys"][0]
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-384" and jwk["alg"] == "ES384" and jwk["kid"] == key.kid


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_assertion_claims_and_signature_verify_with_the_published_jwk(vault: Vault, alg: str) -> None:
    ring = KeyRing(vault, f"ring-{alg}")
    key, _ = ring.generate(alg)
    provider = OAuthTokenProvider("https://auth.example/v2/auth/token", "client-1", ring, http=None)  # type: ignore[arg-type]
    token = provider.assertion(key)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": key.kid, "typ": "JWT"}
    algorithm = RSAAlgorithm if alg == "RS384" else ECAlgorithm
    public = algorithm.from_jwk(ring.jwks()["keys"][0])
    claims = jwt.decode(token, public, algorithms=[alg], audience="https://auth.example/v2/auth/token")
    assert claims["iss"] == claims["sub"] == "client-1"
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert (
        claims["jti"]
        != jwt.decode(provider.assertion(key), public, algorithms=[alg], audience=claims["aud"])["jti"]
    )
