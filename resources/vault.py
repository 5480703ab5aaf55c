"""The encrypted credential vault: private signing keys, API secrets, webhook verification tokens.

One file, ``vault.json`` in ``redox_home()``, holds every entry sealed together with AES-256-GCM
(entry names are encrypted too). The AES key is derived with scrypt from a master key and a
per-vault random salt. The master key is ``$REDOX_ELT_MASTER_KEY`` when set, otherwise a random
key kept in ``master.key`` beside the vault, created with mode 0600 on first use.

Every write re-encrypts the whole document with a fresh nonce and replaces the file atomically
(temp file + fsync + rename, under an exclusive lock), so a crash mid-write leaves the previous
vault intact. A wrong master key or a modified file fails the GCM tag check: nothing is
decrypted at all, and the error says which key source was expected. No secret value is ever
part of an exception message, a log line or a repr.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from resources.settings import _fsync_dir, redox_home

MASTER_KEY_ENV = "REDOX_ELT_MASTER_KEY"
VAULT_FILE = "vault.json"
KEY_FILE = "master.key"
LOCK_FILE = "vault.lock"
FORMAT = "redox-elt-vault"
VERSION = 1
# scrypt cost: ~50 ms per derivation on a small machine; the derived key is cached per process.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
ENTRY_KINDS = ("secret", "keyring")
_MAX_NAME = 200


class VaultError(Exception):
    """The vault cannot do what was asked; the message says why and never contains a secret."""


class VaultLocked(VaultError):
    """The master key does not open this vault (or the file was modified)."""


class VaultCorrupt(VaultError):
    """The vault file is not a vault this code can read."""


class VaultEntryNotFound(VaultError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "entry not found"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str, path: Path) -> bytes:
    if not isinstance(text, str):
        raise VaultCorrupt(f"vault file {path} is corrupt: '{what}' is missing")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise VaultCorrupt(f"vault file {path} is corrupt: '{what}' is not base64") from None


def check_entry_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise VaultError("vault entry names must be non-empty strings")
    if len(name) > _MAX_NAME or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise VaultError(f"vault entry names must be at most {_MAX_NAME} printable characters")
    return name


@dataclass(frozen=True)
class _MasterKey:
    source: str  # "env" | "file"
    material: bytes

    def __repr__(self) -> str:
        return f"_MasterKey(source={self.source!r})"


@dataclass
class _Snapshot:
    """The decrypted document and the file identity it was read from (to skip re-decrypting)."""

    identity: tuple[int, int, int]
    salt: bytes
    key_source: str
    entries: dict[str, dict[str, Any]]


class Vault:
    """Encrypted name -> secret store. Thread-safe; several processes may share one vault."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *, master_key: str | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else redox_home()
        self.path = self.home / VAULT_FILE
        self._explicit_master = master_key
        self._lock = threading.RLock()
        self._derived: dict[tuple[bytes, bytes], bytes] = {}
        self._snapshot: _Snapshot | None = None

    def __repr__(self) -> str:
        return f"Vault(path={str(self.path)!r})"

    # ---- master key --------------------------------------------------------------------------

    def _master_from_env(self) -> _MasterKey | None:
        value = self._explicit_master if self._explicit_master is not None else os.environ.get(MASTER_KEY_ENV)
        if not value:
            return None
        return _MasterKey("env", value.encode("utf-8"))

    def _master_from_file(self, *, create: bool) -> _MasterKey | None:
        key_path = self.home / KEY_FILE
        if not key_path.exists():
            if not create:
                return None
            self._ensure_home()
            try:
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return self._master_from_file(create=False)
            with os.fdopen(fd, "w") as handle:
                handle.write(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii") + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(self.home)
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise VaultError(
                f"master key file {key_path} is readable by other users (mode {mode:04o}); run: chmod 600 {key_path}"
            )
        material = key_path.read_text().strip().encode("ascii")
        if not material:
            raise VaultError(f"master key file {key_path} is empty; restore it from a backup")
        return _MasterKey("file", material)

    def _master_key(self, *, create: bool) -> _MasterKey:
        env = self._master_from_env()
        if env is not None:
            return env
        from_file = self._master_from_file(create=create)
        if from_file is None:
            raise VaultLocked(
                f"the vault at {self.path} was sealed with {MASTER_KEY_ENV}, which is not set; "
                f"export {MASTER_KEY_ENV} with the value used before"
            )
        return from_file

    def _aes_key(self, master: _MasterKey, salt: bytes) -> bytes:
        cache_key = (master.material, salt)
        key = self._derived.get(cache_key)
        if key is None:
            key = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(master.material)
            self._derived[cache_key] = key
        return key

    # ---- file I/O ----------------------------------------------------------------------------

    def _ensure_home(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def _aad(header: dict[str, Any]) -> bytes:
        return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def _read(self) -> _Snapshot | None:
        """Decrypt the vault file (cached while the file is unchanged); None when there is none yet."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._snapshot = None
            return None
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._snapshot is not None and self._snapshot.identity == identity:
            return self._snapshot
        try:
            document = json.loads(self.path.read_bytes())
        except (ValueError, UnicodeDecodeError):
            raise VaultCorrupt(
                f"vault file {self.path} is corrupt: not JSON; restore it from a backup"
            ) from None
        except OSError as exc:
            raise VaultError(f"vault file {self.path} cannot be read ({exc.strerror})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise VaultCorrupt(f"vault file {self.path} is corrupt: not a redox-elt vault")
        if document.get("version") != VERSION:
            raise VaultCorrupt(
                f"vault file {self.path} has version {document.get('version')!r}; this code reads {VERSION}"
            )
        kdf = document.get("kdf")
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
            raise VaultCorrupt(f"vault file {self.path} is corrupt: unknown key derivation")
        salt = _unb64(kdf.get("salt"), "kdf.salt", self.path)
        nonce = _unb64(document.get("nonce"), "nonce", self.path)
        ciphertext = _unb64(document.get("ciphertext"), "ciphertext", self.path)
        key_source = document.get("key_source")
        if key_source not in ("env", "file") or len(nonce) != 12 or len(salt) < 16:
            raise VaultCorrupt(f"vault file {self.path} is corrupt: bad header")
        if key_source == "env" and self._master_from_env() is None:
            raise VaultLocked(
                f"the vault at {self.path} was sealed with {MASTER_KEY_ENV}, which is not set; "
                f"export {MASTER_KEY_ENV} with the value used before"
            )
        master = self._master_key(create=False)
        header = {k: document[k] for k in ("format", "version", "kdf", "key_source")}
        try:
            plaintext = AESGCM(self._aes_key(master, salt)).decrypt(nonce, ciphertext, self._aad(header))
        except InvalidTag:
            raise VaultLocked(self._wrong_key_message(key_source, master)) from None
        try:
            body = json.loads(plaintext)
            entries = body["entries"]
            if not isinstance(entries, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise VaultCorrupt(
                f"vault file {self.path} is corrupt: the sealed document is malformed"
            ) from None
        self._snapshot = _Snapshot(identity, salt, key_source, entries)
        return self._snapshot

    def _wrong_key_message(self, sealed_with: str, used: _MasterKey) -> str:
        base = f"cannot open the vault at {self.path}: "
        if sealed_with == "env" and used.source == "env":
            return (
                base
                + f"{MASTER_KEY_ENV} does not match the key it was sealed with (or the file was modified)"
            )
        if sealed_with == "file" and used.source == "env":
            return base + (
                f"it was sealed with the key file {self.home / KEY_FILE}, but {MASTER_KEY_ENV} is set; "
                f"unset {MASTER_KEY_ENV} (or the file was modified)"
            )
        return base + f"the key file {self.home / KEY_FILE} does not match (or the vault file was modified)"

    def _write(self, entries: dict[str, dict[str, Any]], previous: _Snapshot | None) -> None:
        master = self._master_key(create=True)
        salt = (
            previous.salt
            if previous is not None and previous.key_source == master.source
            else secrets.token_bytes(16)
        )
        header = {
            "format": FORMAT,
            "version": VERSION,
            "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)},
            "key_source": master.source,
        }
        nonce = secrets.token_bytes(12)
        plaintext = json.dumps({"entries": entries}, sort_keys=True).encode("utf-8")
        ciphertext = AESGCM(self._aes_key(master, salt)).encrypt(nonce, plaintext, self._aad(header))
        document = dict(header, nonce=_b64(nonce), ciphertext=_b64(ciphertext))
        self._ensure_home()
        tmp = self.home / f".{VAULT_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(json.dumps(document, indent=1).encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.home)
        self._snapshot = None

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialize read-modify-write cycles across threads and processes."""
        with self._lock:
            self._ensure_home()
            fd = os.open(self.home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    # ---- public API --------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            snapshot = self._read()
            return sorted(snapshot.entries) if snapshot else []

    def kind(self, name: str) -> str:
        return self._entry(name)["kind"]

    def _entry(self, name: str) -> dict[str, Any]:
        check_entry_name(name)
        with self._lock:
            snapshot = self._read()
            entry = snapshot.entries.get(name) if snapshot else None
        if entry is None:
            raise VaultEntryNotFound(f"no vault entry named '{name}' in {self.path}")
        return entry

    def get(self, name: str) -> str:
        """The secret stored under ``name``; VaultEntryNotFound when there is none."""
        return str(self._entry(name)["value"])

    def get_optional(self, name: str) -> str | None:
        try:
            return self.get(name)
        except VaultEntryNotFound:
            return None

    def set(self, name: str, value: str, *, kind: str = "secret") -> None:
        check_entry_name(name)
        if not isinstance(value, str):
            raise VaultError("vault values must be strings")
        if kind not in ENTRY_KINDS:
            raise VaultError(f"vault entry kind must be one of {ENTRY_KINDS}")
        self.update(name, lambda _old: value, kind=kind)

    def update(
        self, name: str, change: Callable[[str | None], str | None], *, kind: str = "secret"
    ) -> str | None:
        """Atomically replace entry ``name`` with ``change(old_value)`` (None deletes it); returns the new value."""
        check_entry_name(name)
        with self._exclusive():
            self._snapshot = None  # another process may have written since we last looked
            snapshot = self._read()
            entries = dict(snapshot.entries) if snapshot else {}
            old = entries.get(name)
            if old is not None and old.get("kind", "secret") != kind:
                raise VaultError(f"vault entry '{name}' holds a {old.get('kind')}, not a {kind}")
            new_value = change(None if old is None else str(old["value"]))
            if new_value is None:
                if old is None:
                    return None
                del entries[name]
            else:
                entries[name] = {
                    "value": new_value,
                    "kind": kind,
                    "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            self._write(entries, snapshot)
            return new_value

    def delete(self, name: str) -> bool:
        """Remove ``name``; False when there was no such entry."""
        check_entry_name(name)
        with self._exclusive():
            self._snapshot = None
            snapshot = self._read()
            if snapshot is None or name not in snapshot.entries:
                return False
            entries = dict(snapshot.entries)
            del entries[name]
            self._write(entries, snapshot)
            return True
