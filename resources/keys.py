"""The signing key ring: the private keys that sign OAuth client assertions, kept in the vault.

Redox accepts RS384 and ES384 assertions and finds the public key by ``kid`` in the JWK Set
registered for the client id (REDOX-REFERENCE §1.1). Rotation without downtime is one client id
with several keys in its JWKS (§1.3): ``rotate`` adds a new key next to the old ones, the JWKS
then publishes both, the token provider starts signing with the new key once the token endpoint
accepts it, and ``retire`` drops the old key when it is no longer needed.

The ``kid`` is the key's RFC 7638 thumbprint, so it is derived from the public key alone. The
private keys never leave the vault entry (kind ``keyring``); only public JWKs are handed out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from resources.settings import DEFAULT_KEY_RING
from resources.vault import Vault

ALGORITHMS = ("RS384", "ES384")
DEFAULT_ALGORITHM = "RS384"
DEFAULT_RSA_BITS = 2048
_RING_VERSION = 1


class KeyRingError(Exception):
    """A key ring operation cannot be done; the message names the key ring or kid."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _public_jwk(private_key: Any, alg: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if alg == "RS384" else ECAlgorithm
    jwk = json.loads(algorithm.to_jwk(private_key.public_key()))
    return {k: v for k, v in jwk.items() if k in ("kty", "n", "e", "crv", "x", "y")}


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256) of a public JWK."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def _new_private_key(alg: str, rsa_bits: int) -> Any:
    if alg == "RS384":
        if rsa_bits < 2048:
            raise KeyRingError("RSA signing keys must be at least 2048 bits")
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    raise KeyRingError(f"unsupported algorithm {alg!r}; Redox accepts {', '.join(ALGORITHMS)}")


@dataclass(frozen=True)
class SigningKey:
    """One private signing key. Its repr shows the kid, never the key material."""

    kid: str
    alg: str
    created_at: str
    seq: int
    private_pem: str = field(repr=False)

    def public_jwk(self) -> dict[str, Any]:
        jwk = _public_jwk(load_private_key(self), self.alg)
        return dict(jwk, kid=self.kid, alg=self.alg, use="sig")

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "alg": self.alg,
            "created_at": self.created_at,
            "seq": self.seq,
            "private_pem": self.private_pem,
        }


_loaded: dict[tuple[str, str], Any] = {}
_loaded_lock = threading.Lock()


def load_private_key(key: SigningKey) -> Any:
    """The cryptography key object for ``key`` (parsed once per process)."""
    cache_key = (key.kid, hashlib.sha256(key.private_pem.encode("ascii")).hexdigest())
    with _loaded_lock:
        loaded = _loaded.get(cache_key)
        if loaded is None:
            loaded = serialization.load_pem_private_key(key.private_pem.encode("ascii"), password=None)
            _loaded[cache_key] = loaded
        return loaded


def _pem(private_key: Any) -> str:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


@dataclass(frozen=True)
class RetiredKey:
    kid: str
    alg: str
    retired_at: str


@dataclass(frozen=True)
class RingState:
    keys: tuple[SigningKey, ...]  # active keys, oldest first
    retired: tuple[RetiredKey, ...]

    @property
    def newest(self) -> SigningKey | None:
        return self.keys[-1] if self.keys else None

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        return {"keys": [k.public_jwk() for k in self.keys]}


def _parse_ring(text: str | None, name: str) -> RingState:
    if text is None:
        return RingState((), ())
    try:
        doc = json.loads(text)
        keys = tuple(
            SigningKey(
                kid=k["kid"],
                alg=k["alg"],
                created_at=k["created_at"],
                seq=int(k["seq"]),
                private_pem=k["private_pem"],
            )
            for k in doc["keys"]
        )
        retired = tuple(RetiredKey(r["kid"], r["alg"], r["retired_at"]) for r in doc.get("retired", []))
    except (ValueError, KeyError, TypeError):
        raise KeyRingError(f"key ring '{name}' in the vault is malformed") from None
    return RingState(tuple(sorted(keys, key=lambda k: k.seq)), retired)


def _dump_ring(state: RingState) -> str:
    return json.dumps(
        {
            "version": _RING_VERSION,
            "keys": [k.to_json() for k in state.keys],
            "retired": [{"kid": r.kid, "alg": r.alg, "retired_at": r.retired_at} for r in state.retired],
        }
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class KeyRing:
    """The signing keys stored in one vault entry (default ``signing-keys``)."""

    def __init__(self, vault: Vault, name: str = DEFAULT_KEY_RING) -> None:
        self.vault = vault
        self.name = name

    def __repr__(self) -> str:
        return f"KeyRing(name={self.name!r}, vault={self.vault!r})"

    def load(self) -> RingState:
        """The current keys (re-read from the vault, so another process's rotation is seen)."""
        text = self.vault.get_optional(self.name)
        if text is not None and self.vault.kind(self.name) != "keyring":
            raise KeyRingError(f"vault entry '{self.name}' is not a key ring")
        return _parse_ring(text, self.name)

    def _change(self, change: Any) -> Any:
        result: dict[str, Any] = {}

        def apply(old: str | None) -> str:
            state = _parse_ring(old, self.name)
            new_state, value = change(state)
            result["value"] = value
            return _dump_ring(new_state)

        self.vault.update(self.name, apply, kind="keyring")
        return result["value"]

    def _add(self, state: RingState, alg: str, rsa_bits: int) -> tuple[RingState, SigningKey]:
        private_key = _new_private_key(alg, rsa_bits)
        kid = thumbprint(_public_jwk(private_key, alg))
        seq = max((k.seq for k in state.keys), default=0) + 1
        key = SigningKey(kid=kid, alg=alg, created_at=_now(), seq=seq, private_pem=_pem(private_key))
        return RingState(state.keys + (key,), state.retired), key

    def generate(
        self, alg: str = DEFAULT_ALGORITHM, *, rsa_bits: int = DEFAULT_RSA_BITS
    ) -> tuple[SigningKey, bool]:
        """Make the ring's first key; when it already has one, return the newest. -> (key, created)."""
        if alg not in ALGORITHMS:
            raise KeyRingError(f"unsupported algorithm {alg!r}; Redox accepts {', '.join(ALGORITHMS)}")

        def change(state: RingState) -> tuple[RingState, tuple[SigningKey, bool]]:
            if state.newest is not None:
                return state, (state.newest, False)
            new_state, key = self._add(state, alg, rsa_bits)
            return new_state, (key, True)

        return self._change(change)

    def rotate(self, alg: str | None = None, *, rsa_bits: int = DEFAULT_RSA_BITS) -> SigningKey:
        """Add a new key next to the existing ones (same algorithm as the newest unless given)."""

        def change(state: RingState) -> tuple[RingState, SigningKey]:
            chosen = alg or (state.newest.alg if state.newest else DEFAULT_ALGORITHM)
            if chosen not in ALGORITHMS:
                raise KeyRingError(f"unsupported algorithm {chosen!r}; Redox accepts {', '.join(ALGORITHMS)}")
            return self._add(state, chosen, rsa_bits)

        return self._change(change)

    def retire(self, kid: str) -> RetiredKey:
        """Destroy the private key ``kid`` and drop it from the JWKS; the last key cannot be retired."""

        def change(state: RingState) -> tuple[RingState, RetiredKey]:
            match = next((k for k in state.keys if k.kid == kid), None)
            if match is None:
                known = ", ".join(k.kid for k in state.keys) or "none"
                raise KeyRingError(f"key ring '{self.name}' has no active key {kid!r} (active: {known})")
            if len(state.keys) == 1:
                raise KeyRingError(
                    f"{kid} is the only key in '{self.name}'; rotate first so signing can move to a new key"
                )
            retired = RetiredKey(kid=match.kid, alg=match.alg, retired_at=_now())
            remaining = tuple(k for k in state.keys if k.kid != kid)
            return RingState(remaining, state.retired + (retired,)), retired

        return self._change(change)

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The public JWK Set of every active key (what Redox / the sandbox is given)."""
        return self.load().jwks()
