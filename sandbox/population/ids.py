"""Deterministic hashing and reversible identifiers for the synthetic population.

Every identifier the population hands out can be decoded back to the index row it names
(and then re-encoded to check), so looking a record up by id needs no lookup table: that is
what keeps a million-patient population in a few hundred megabytes.

A FHIR logical id is a UUID whose first 64 bits are a per-record hash (so ids look random and
sort like that hash) and whose last 48 bits carry the row number under a per-table mask.
Business ids (visit numbers, order ids, MRNs) are affine bijections of the row number modulo a
power of ten, so they look like the numeric ids EHRs issue.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np

M64 = (1 << 64) - 1
M48 = (1 << 48) - 1
M60 = (1 << 60) - 1
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_VERSION_MASK = ~0xF000 & M64
# Odd multiplier (a bijection modulo 2**48) so consecutive rows get unrelated-looking id tails.
_A48 = 0x5DEECE66D1F5
_A48_INV = pow(_A48, -1, 1 << 48)
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def mix64(x: int) -> int:
    """splitmix64 finalizer: a bijection on 64-bit integers that scatters bits well."""
    x &= M64
    x = ((x ^ (x >> 30)) * _C1) & M64
    x = ((x ^ (x >> 27)) * _C2) & M64
    return x ^ (x >> 31)


def mix64_np(x: np.ndarray) -> np.ndarray:
    """``mix64`` over a uint64 array (numpy arrays wrap on overflow, which is what we want)."""
    x = np.asarray(x).astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(_C1)
    x ^= x >> np.uint64(27)
    x *= np.uint64(_C2)
    x ^= x >> np.uint64(31)
    return x


def salt(*parts: object) -> int:
    """A stable 64-bit value for a tuple of names (unlike ``hash()``, not randomised per process)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def record_key(base: int, person: int, row: int) -> int:
    """The per-record hash: seeds the record's details and forms the high half of its id."""
    return mix64(base + mix64(((row & 0xFFFFFFFF) << 32) | (person & 0xFFFFFFFF)))


def record_key_np(base: int, person: np.ndarray, row: np.ndarray) -> np.ndarray:
    inner = (np.asarray(row).astype(np.uint64) << np.uint64(32)) | np.asarray(person).astype(np.uint64)
    return mix64_np(mix64_np(inner) + np.uint64(base))


def id_high(key: int) -> int:
    """The id's first 64 bits: the key with the UUID version nibble forced to 4."""
    return (key & _VERSION_MASK) | 0x4000


def id_high_np(keys: np.ndarray) -> np.ndarray:
    return (keys & np.uint64(_VERSION_MASK)) | np.uint64(0x4000)


def encode_uuid(key: int, index: int, mask: int) -> str:
    hi = id_high(key)
    variant = 0x8 | (key & 0x3)
    lo = (variant << 60) | (((key >> 2) & 0xFFF) << 48) | (((index * _A48) & M48) ^ (mask & M48))
    h = f"{hi:016x}{lo:016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def decode_uuid_index(value: str, mask: int) -> int | None:
    """The index an ``encode_uuid`` id carries, or None if the value is not shaped like one.
    Callers re-encode to confirm: a well-formed foreign UUID decodes to some index too."""
    h = value.replace("-", "").lower()
    if len(value) != 36 or not _HEX32.match(h):
        return None
    return (((int(h[16:], 16) & M48) ^ (mask & M48)) * _A48_INV) & M48


class DecimalCode:
    """A bijection between row numbers and fixed-width decimal strings behind a prefix."""

    def __init__(self, prefix: str, digits: int, seed_salt: int) -> None:
        self.prefix = prefix
        self.digits = digits
        self.modulus = 10**digits
        a = (seed_salt % self.modulus) | 1
        while math.gcd(a, self.modulus) != 1:
            a += 2
        self._a = a
        self._b = (seed_salt >> 20) % self.modulus
        self._a_inv = pow(a, -1, self.modulus)

    def encode(self, index: int) -> str:
        return f"{self.prefix}{(index * self._a + self._b) % self.modulus:0{self.digits}d}"

    def decode(self, value: str) -> int | None:
        if not value.startswith(self.prefix):
            return None
        body = value[len(self.prefix) :]
        if len(body) != self.digits or not body.isdigit():
            return None
        return ((int(body) - self._b) * self._a_inv) % self.modulus


class HexCode:
    """A bijection between row numbers and 15-hex-digit strings (NIST-style patient ids)."""

    def __init__(self, seed_salt: int) -> None:
        self._a = (seed_salt & M60) | 1
        self._x = mix64(seed_salt) & M60
        self._a_inv = pow(self._a, -1, 1 << 60)

    def encode(self, index: int) -> str:
        return f"{((index * self._a) & M60) ^ self._x:015x}"

    def decode(self, value: str) -> int | None:
        if len(value) != 15:
            return None
        try:
            v = int(value, 16)
        except ValueError:
            return None
        return ((v ^ self._x) * self._a_inv) & M60
