"""The connections config file: what ``redox-elt sandbox connect`` writes and ``redox-elt sync`` reads.

One YAML file describes one Redox organization: its token endpoints, how this client
authenticates (OAuth client id + the vault entry holding the signing keys, and/or a legacy
API key whose secret lives in the vault), its connections and where the audit trail goes.
Secrets are never in the file, only the names of vault entries.

Example::

    organization: Redox ELT Sandbox Org
    environment: Development
    token_url: http://127.0.0.1:8400/v2/auth/token
    legacy_auth_url: http://127.0.0.1:8400/auth
    auth:
      client_id: 5b1f...            # OAuth API key (preferred)
      key_ring: signing-keys        # vault entry with the private signing keys
      legacy_api_key: 0c7e...       # optional, Data Model only (deprecated by Redox)
      legacy_secret_ref: legacy-secret   # vault entry with the legacy secret
    connections:
      - id: northwind-fhir
        name: Northwind Health (FHIR)
        kind: ehr
        surfaces: [fhir]
        entities: [patients, encounters]
        write_entities: [orders]
        fhir_base_url: http://127.0.0.1:8400/fhir/R4/northwind-health/Development
        timeout_s: 30
        max_rps: 23.75
    audit:
      path: audit/api_calls.jsonl   # relative paths are relative to this file
    quota:                          # one request budget per Redox host + client, all connections
      requests: 6750                # default: 90% of the 7,500 Redox's 429 reports
      window_s: 300

Connection ids become folder and file names, so they must match ``CONNECTION_ID_RULE``
(lower-case letters, digits, ``-`` and ``_``, starting with a letter or digit, at most 63).
Numbers must be finite and inside the range the error names; header values and URLs may not
carry control characters or spaces.

Every error is a ``ConfigError`` naming the field, e.g.
``ConfigError: connection 'x': surface 'fhir' needs 'fhir_base_url'``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

CONFIG_ENV = "REDOX_ELT_CONFIG"
HOME_ENV = "REDOX_ELT_HOME"

SURFACES = ("fhir", "datamodel")
CONNECTION_KINDS = ("ehr", "network")
# The entities of the common model (shared/MODEL.md) and the ones that can be written back.
ENTITIES = (
    "patients",
    "encounters",
    "results",
    "medications",
    "appointments",
    "documents",
    "problems",
    "allergies",
    "immunizations",
    "procedures",
    "diagnostic_reports",
    "orders",
)
WRITE_ENTITIES = ("orders", "appointments")

DEFAULT_KEY_RING = "signing-keys"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_AUDIT_PATH = "audit/api_calls.jsonl"
# The request budget (resources/quota.py): 90% of the 7,500 per 5 minutes Redox's 429 reports.
DEFAULT_QUOTA_REQUESTS = 6750
DEFAULT_QUOTA_WINDOW_S = 300.0

CONNECTION_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
CONNECTION_ID_RULE = "1-63 of a-z 0-9 - _, starting with a letter or digit (it names folders and files)"
# Allowed ranges of the numeric fields: (low, high), both inclusive.
TIMEOUT_RANGE_S = (0.1, 600.0)
MAX_RPS_RANGE = (0.01, 10_000.0)
PAGE_SIZE_RANGE = (1, 10_000)
DEFAULT_REFRESH_DAYS = 7
REFRESH_DAYS_RANGE = (1, 3650)
QUOTA_REQUESTS_RANGE = (1, 100_000_000)
QUOTA_WINDOW_RANGE_S = (1.0, 86_400.0)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Field names that would put a secret into the file in the clear. They are refused with a
# pointer to the vault instead of being silently ignored.
_CLEARTEXT_SECRET_FIELDS = {
    "secret",
    "legacy_secret",
    "api_secret",
    "client_secret",
    "private_key",
    "password",
    "access_token",
    "token",
}


class ConfigError(ValueError):
    """A connections config value is missing or wrong; the message names the field."""


def redox_home() -> Path:
    """Where the vault, key file and default audit trail live: ``$REDOX_ELT_HOME`` or ``~/.redox-elt``."""
    configured = os.environ.get(HOME_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".redox-elt"


@dataclass(frozen=True)
class AuthSettings:
    client_id: str | None = None
    key_ring: str = DEFAULT_KEY_RING
    legacy_api_key: str | None = None
    legacy_secret_ref: str | None = None

    @property
    def has_oauth(self) -> bool:
        return bool(self.client_id)

    @property
    def has_legacy(self) -> bool:
        return bool(self.legacy_api_key and self.legacy_secret_ref)


@dataclass(frozen=True)
class ConnectionSettings:
    id: str
    name: str
    kind: str = "ehr"
    surfaces: tuple[str, ...] = ()
    entities: tuple[str, ...] = ()
    write_entities: tuple[str, ...] = ()
    fhir_base_url: str | None = None
    datamodel_url: str | None = None
    destination_id: str | None = None
    destination_slug: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_rps: float | None = None
    page_size: int | None = None
    # The patient panel's rolling re-pull period (days): catches corrections no event announces.
    refresh_days: int = DEFAULT_REFRESH_DAYS
    # Entitled to FHIR bulk export (``Group/{id}/$export``): the first sync backfills from it.
    bulk_export: bool = False
    # The Group exported; default: the connection's destination slug (one Group per connection).
    bulk_group_id: str | None = None


@dataclass(frozen=True)
class AuditSettings:
    path: Path


@dataclass(frozen=True)
class QuotaSettings:
    """The shared request budget: ``requests`` per rolling ``window_s`` per Redox host and client."""

    requests: int = DEFAULT_QUOTA_REQUESTS
    window_s: float = DEFAULT_QUOTA_WINDOW_S


@dataclass(frozen=True)
class Settings:
    organization: str
    environment: str
    token_url: str | None
    legacy_auth_url: str | None
    auth: AuthSettings
    connections: tuple[ConnectionSettings, ...]
    audit: AuditSettings
    source_path: Path | None = None
    quota: QuotaSettings = field(default_factory=QuotaSettings)

    def connection(self, connection_id: str) -> ConnectionSettings:
        for conn in self.connections:
            if conn.id == connection_id:
                return conn
        known = ", ".join(c.id for c in self.connections)
        raise ConfigError(f"connections: no connection {str(connection_id)[:64]!r} (known: {known})")

    def to_dict(self) -> dict[str, Any]:
        """The file form: plain YAML-able values, audit path relative to the file when possible."""
        audit_path: Path | str = self.audit.path
        if self.source_path is not None:
            with contextlib.suppress(ValueError):
                audit_path = self.audit.path.relative_to(self.source_path.parent.resolve())
        auth: dict[str, Any] = {"client_id": self.auth.client_id, "key_ring": self.auth.key_ring}
        if self.auth.legacy_api_key:
            auth["legacy_api_key"] = self.auth.legacy_api_key
            auth["legacy_secret_ref"] = self.auth.legacy_secret_ref
        return {
            "organization": self.organization,
            "environment": self.environment,
            "token_url": self.token_url,
            "legacy_auth_url": self.legacy_auth_url,
            "auth": auth,
            "connections": [_connection_to_dict(c) for c in self.connections],
            "audit": {"path": str(audit_path)},
            "quota": {"requests": self.quota.requests, "window_s": self.quota.window_s},
        }


def _connection_to_dict(conn: ConnectionSettings) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": conn.id,
        "name": conn.name,
        "kind": conn.kind,
        "surfaces": list(conn.surfaces),
        "entities": list(conn.entities),
        "write_entities": list(conn.write_entities),
        "fhir_base_url": conn.fhir_base_url,
        "datamodel_url": conn.datamodel_url,
        "destination_id": conn.destination_id,
        "headers": dict(conn.headers),
        "timeout_s": conn.timeout_s,
    }
    if conn.destination_slug:
        out["destination_slug"] = conn.destination_slug
    if conn.max_rps is not None:
        out["max_rps"] = conn.max_rps
    if conn.page_size is not None:
        out["page_size"] = conn.page_size
    out["refresh_days"] = conn.refresh_days
    if conn.bulk_export:
        out["bulk_export"] = True
    if conn.bulk_group_id:
        out["bulk_group_id"] = conn.bulk_group_id
    return out


# ---- parsing -------------------------------------------------------------------------------


def _check_known(raw: dict[str, Any], known: set[str], where: str) -> None:
    for key in raw:
        if key in _CLEARTEXT_SECRET_FIELDS:
            raise ConfigError(
                f"{where}: '{key}' would store a secret in the clear; put it in the vault "
                f"(redox-elt vault set NAME VALUE) and reference the entry name instead"
            )
        if key not in known:
            raise ConfigError(f"{where}: unknown field '{key}' (known: {', '.join(sorted(known))})")


def _text(raw: dict[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        if required:
            raise ConfigError(f"{where}: '{key}' is required")
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return str(value)


def _url(raw: dict[str, Any], key: str, where: str) -> str | None:
    value = _text(raw, key, where)
    if value is None:
        return None
    if _CONTROL.search(value) or any(c.isspace() for c in value):
        raise ConfigError(
            f"{where}: '{key}' must be an http(s) URL without spaces or control characters "
            f"({len(value)} chars given)"
        )
    try:
        parsed = urlparse(value)
        parsed.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        raise ConfigError(f"{where}: '{key}' is not a valid URL (check the host and port)") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{where}: '{key}' must be an http(s) URL, got {value[:80]!r}")
    if parsed.username is not None or parsed.password is not None:
        raise ConfigError(f"{where}: '{key}' must not carry user:password@; credentials belong in the vault")
    return value.rstrip("/")


def _names(raw: dict[str, Any], key: str, allowed: tuple[str, ...], where: str) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: '{key}' must be a list of names")
    for name in value:
        if name not in allowed:
            raise ConfigError(f"{where}: {key}: unknown value '{name}' (allowed: {', '.join(allowed)})")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: '{key}' lists a value twice")
    return tuple(value)


def _number(
    raw: dict[str, Any], key: str, where: str, default: float | None, bounds: tuple[float, float]
) -> float | None:
    """A finite number inside ``bounds`` (inclusive); NaN, infinities and strings are refused."""
    value = raw.get(key)
    if value is None:
        return default
    low, high = bounds
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ConfigError(f"{where}: '{key}' must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _whole(
    raw: dict[str, Any], key: str, where: str, default: int | None, bounds: tuple[int, int]
) -> int | None:
    value = raw.get(key)
    if value is None:
        return default
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: '{key}' must be a whole number from {low} to {high}, got {value!r}")
    return value


def _flag(raw: dict[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false, got {type(value).__name__}")
    return value


def _headers(raw: dict[str, Any], where: str) -> dict[str, str]:
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError(f"{where}: 'headers' must map header names to string values")
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: header name {name[:40]!r} is not a valid HTTP header name (letters, digits, -)"
            )
        if _CONTROL.search(value):
            raise ConfigError(
                f"{where}: header '{name}' value contains CR, LF or another control character; remove it"
            )
    if any(k.lower() == "authorization" for k in headers):
        raise ConfigError(
            f"{where}: 'headers' must not carry Authorization; tokens come from the vault-backed auth"
        )
    return dict(headers)


def _connection_id(raw: dict[str, Any], index: int) -> str:
    conn_id = _text(raw, "id", f"connections[{index}]", required=True)
    assert conn_id is not None
    if not CONNECTION_ID_PATTERN.fullmatch(conn_id):
        shown = conn_id if len(conn_id) <= 40 and not _CONTROL.search(conn_id) else f"<{len(conn_id)} chars>"
        raise ConfigError(f"connections[{index}]: id {shown!r} is not a plain name: use {CONNECTION_ID_RULE}")
    return conn_id


def parse_quota(raw: Any) -> QuotaSettings:
    """The top-level ``quota`` mapping: ``requests`` per ``window_s`` (defaults: 6,750 per 300 s)."""
    if raw is None:
        return QuotaSettings()
    if not isinstance(raw, dict):
        raise ConfigError("quota: must be a mapping with 'requests' and 'window_s'")
    _check_known(raw, {"requests", "window_s"}, "quota")
    return QuotaSettings(
        requests=_whole(raw, "requests", "quota", DEFAULT_QUOTA_REQUESTS, QUOTA_REQUESTS_RANGE)
        or DEFAULT_QUOTA_REQUESTS,
        window_s=_number(raw, "window_s", "quota", DEFAULT_QUOTA_WINDOW_S, QUOTA_WINDOW_RANGE_S)
        or DEFAULT_QUOTA_WINDOW_S,
    )


def _parse_auth(raw: Any, token_url: str | None, legacy_auth_url: str | None) -> AuthSettings:
    where = "auth"
    if not isinstance(raw, dict):
        raise ConfigError(
            "auth: required: a mapping with client_id/key_ring and/or legacy_api_key/legacy_secret_ref"
        )
    _check_known(raw, {"client_id", "key_ring", "legacy_api_key", "legacy_secret_ref"}, where)
    auth = AuthSettings(
        client_id=_text(raw, "client_id", where),
        key_ring=_text(raw, "key_ring", where) or DEFAULT_KEY_RING,
        legacy_api_key=_text(raw, "legacy_api_key", where),
        legacy_secret_ref=_text(raw, "legacy_secret_ref", where),
    )
    if bool(auth.legacy_api_key) != bool(auth.legacy_secret_ref):
        missing = "legacy_secret_ref" if auth.legacy_api_key else "legacy_api_key"
        raise ConfigError(
            f"auth: legacy keys need both 'legacy_api_key' and 'legacy_secret_ref' ('{missing}' is missing)"
        )
    if not auth.has_oauth and not auth.has_legacy:
        raise ConfigError(
            "auth: set 'client_id' (OAuth, preferred) or 'legacy_api_key' + 'legacy_secret_ref'"
        )
    if auth.has_oauth and not token_url:
        raise ConfigError(
            "token_url: required when auth.client_id is set (e.g. https://api.redoxengine.com/v2/auth/token)"
        )
    if auth.has_legacy and not legacy_auth_url:
        raise ConfigError(
            "legacy_auth_url: required when auth.legacy_api_key is set (e.g. https://api.redoxengine.com/auth)"
        )
    return auth


_CONNECTION_FIELDS = {
    "id",
    "name",
    "kind",
    "surfaces",
    "entities",
    "write_entities",
    "fhir_base_url",
    "datamodel_url",
    "destination_id",
    "destination_slug",
    "headers",
    "timeout_s",
    "max_rps",
    "page_size",
    "refresh_days",
    "bulk_export",
    "bulk_group_id",
}


def _parse_connection(raw: Any, index: int, auth: AuthSettings) -> ConnectionSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"connections[{index}]: must be a mapping")
    conn_id = _connection_id(raw, index)
    where = f"connection '{conn_id}'"
    _check_known(raw, _CONNECTION_FIELDS, where)
    kind = _text(raw, "kind", where) or "ehr"
    if kind not in CONNECTION_KINDS:
        raise ConfigError(f"{where}: 'kind' must be one of {', '.join(CONNECTION_KINDS)}, got {kind!r}")
    surfaces = _names(raw, "surfaces", SURFACES, where)
    if not surfaces:
        raise ConfigError(f"{where}: 'surfaces' must list at least one of {', '.join(SURFACES)}")
    headers = _headers(raw, where)
    page_size = _whole(raw, "page_size", where, None, PAGE_SIZE_RANGE)
    conn = ConnectionSettings(
        id=conn_id,
        name=_text(raw, "name", where) or conn_id,
        kind=kind,
        surfaces=surfaces,
        entities=_names(raw, "entities", ENTITIES, where),
        write_entities=_names(raw, "write_entities", WRITE_ENTITIES, where),
        fhir_base_url=_url(raw, "fhir_base_url", where),
        datamodel_url=_url(raw, "datamodel_url", where),
        destination_id=_text(raw, "destination_id", where),
        destination_slug=_text(raw, "destination_slug", where),
        headers=headers,
        timeout_s=_number(raw, "timeout_s", where, DEFAULT_TIMEOUT_S, TIMEOUT_RANGE_S) or DEFAULT_TIMEOUT_S,
        max_rps=_number(raw, "max_rps", where, None, MAX_RPS_RANGE),
        page_size=page_size,
        refresh_days=_whole(raw, "refresh_days", where, DEFAULT_REFRESH_DAYS, REFRESH_DAYS_RANGE)
        or DEFAULT_REFRESH_DAYS,
        bulk_export=_flag(raw, "bulk_export", where),
        bulk_group_id=_text(raw, "bulk_group_id", where),
    )
    if conn.bulk_export and "fhir" not in surfaces:
        raise ConfigError(f"{where}: 'bulk_export' needs the 'fhir' surface (bulk export is FHIR's)")
    env_hint = f"REDOX_{conn_id.upper().replace('-', '_')}"
    if "fhir" in surfaces:
        if not conn.fhir_base_url:
            raise ConfigError(
                f"{where}: surface 'fhir' needs 'fhir_base_url' (set it in the config or {env_hint}_FHIR_BASE_URL)"
            )
        if not auth.has_oauth:
            raise ConfigError(
                f"{where}: surface 'fhir' needs OAuth (auth.client_id + auth.key_ring); "
                "legacy API keys only work for the Data Model API"
            )
    if "datamodel" in surfaces:
        if not conn.datamodel_url:
            raise ConfigError(
                f"{where}: surface 'datamodel' needs 'datamodel_url' (set it in the config or {env_hint}_DATAMODEL_URL)"
            )
        if not conn.destination_id:
            raise ConfigError(
                f"{where}: surface 'datamodel' needs 'destination_id' (the Meta.Destinations[].ID)"
            )
    return conn


def _env_overrides(raw_conn: dict[str, Any]) -> dict[str, Any]:
    """``REDOX_<CONNECTION_ID>_FHIR_BASE_URL`` / ``_DATAMODEL_URL`` override the file per connection."""
    conn_id = raw_conn.get("id")
    if not isinstance(conn_id, str):
        return raw_conn
    prefix = f"REDOX_{conn_id.upper().replace('-', '_')}_"
    merged = dict(raw_conn)
    for key in ("fhir_base_url", "datamodel_url"):
        value = os.environ.get(prefix + key.upper())
        if value:
            merged[key] = value
    return merged


def settings_from_dict(raw: Any, *, source_path: Path | None = None) -> Settings:
    """Validate a parsed config document; relative audit paths resolve against ``source_path``'s folder."""
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a mapping at the top level")
    _check_known(
        raw,
        {
            "organization",
            "environment",
            "token_url",
            "legacy_auth_url",
            "auth",
            "connections",
            "audit",
            "quota",
        },
        "config",
    )
    quota = parse_quota(raw.get("quota"))
    token_url = _url(raw, "token_url", "config")
    legacy_auth_url = _url(raw, "legacy_auth_url", "config")
    auth = _parse_auth(raw.get("auth"), token_url, legacy_auth_url)
    raw_connections = raw.get("connections")
    if not isinstance(raw_connections, list) or not raw_connections:
        raise ConfigError("connections: required: a non-empty list")
    connections = tuple(
        _parse_connection(_env_overrides(c) if isinstance(c, dict) else c, i, auth)
        for i, c in enumerate(raw_connections)
    )
    ids = [c.id for c in connections]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate:
        raise ConfigError(f"connections: id '{duplicate}' appears more than once")
    audit_raw = raw.get("audit") or {}
    if not isinstance(audit_raw, dict):
        raise ConfigError("audit: must be a mapping with 'path'")
    _check_known(audit_raw, {"path"}, "audit")
    audit_path = Path(_text(audit_raw, "path", "audit") or DEFAULT_AUDIT_PATH).expanduser()
    if not audit_path.is_absolute():
        base = source_path.parent.resolve() if source_path is not None else redox_home()
        audit_path = base / audit_path
    return Settings(
        organization=_text(raw, "organization", "config") or "",
        environment=_text(raw, "environment", "config") or "",
        token_url=token_url,
        legacy_auth_url=legacy_auth_url,
        auth=auth,
        connections=connections,
        audit=AuditSettings(path=audit_path),
        source_path=source_path.resolve() if source_path is not None else None,
        quota=quota,
    )


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: ``path``, else ``$REDOX_ELT_CONFIG``."""
    chosen = os.environ.get(CONFIG_ENV) if path is None else str(path)
    if not chosen:
        raise ConfigError(f"no config file given: pass --config FILE or set {CONFIG_ENV}")
    return Path(chosen).expanduser()


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read and validate the connections config (``path`` or ``$REDOX_ELT_CONFIG``)."""
    file = config_path(path)
    shown = str(file) if str(file).isprintable() else repr(str(file))  # one line, whatever the name
    try:
        if "\x00" in str(file):
            raise FileNotFoundError
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {shown} does not exist (create one with `redox-elt sandbox connect`)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {shown} cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {shown} is not UTF-8 text (a YAML connections file is)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {shown} is not valid YAML{at}") from None
    return settings_from_dict(raw, source_path=file)


def atomic_write_text(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` so readers see the old file or the new one, never half of either.

    Owner-only by default: config and state files name hosts, client ids and vault entries.
    A folder this creates is 0700.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: fsync the folder entry (not possible on every platform)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_settings(settings: Settings, path: str | os.PathLike[str]) -> Path:
    """Validate ``settings`` round-trip and write them as YAML atomically; returns the path."""
    target = Path(path).expanduser()
    document = settings.to_dict()
    if settings.source_path is None or settings.source_path != target.resolve():
        audit = settings.audit.path
        try:
            document["audit"]["path"] = str(audit.relative_to(target.parent.resolve()))
        except ValueError:
            document["audit"]["path"] = str(audit)
    settings_from_dict(document, source_path=target)  # never write a file that would not load
    header = "# redox-elt connections config. Secrets live in the vault; only entry names appear here.\n"
    atomic_write_text(target, header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False))
    return target
