"""Sandbox settings: the organization, its connections and the knobs tests turn.

Loaded from defaults, optionally overridden by a YAML/JSON file (``--config FILE``)
and by CLI flags. Everything that shapes data is deterministic from ``seed``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from sandbox.population.records import ENTITIES

ENVIRONMENTS = ("Development", "Staging", "Production")
SEARCH_POLICIES = ("redox", "open")
# Connection keys that no longer exist, with what replaced them (a clear config error).
_REMOVED_CONNECTION_FIELDS = {
    "rate_limit": "the quota is per client across all connections: set quota_requests at the top level",
    "rate_window_s": "the quota is per client across all connections: set quota_window_s at the top level",
}
# uuid5 namespace for ids that must look like Redox's (UUIDs) and stay stable per name.
_NAMESPACE = uuid.UUID("7ce6f387-c33c-417d-8682-81e83628cbd9")  # Redox Dev Tools source id


class SandboxConfigError(ValueError):
    """A sandbox config value is wrong; the message names the field."""


@dataclass
class ConnectionSpec:
    id: str  # connection id used everywhere (warehouse partition, /_sandbox contract)
    name: str
    kind: str = "ehr"  # "ehr" | "network"
    surfaces: tuple[str, ...] = ("fhir", "datamodel")
    entities: tuple[str, ...] = ENTITIES
    write_entities: tuple[str, ...] = ("orders", "appointments")
    slug: str = ""  # FHIR destination slug; defaults to id
    destination_id: str = ""  # Data Model Meta.Destinations[].ID; defaults to uuid5(name)
    membership: float = 0.6  # share of persons known to this connection
    id_types: tuple[str, ...] = ("MR", "EHRID")  # patient identifiers this EHR emits (EPI always)
    page_size: int = 100  # default FHIR _count and cap; Data Model query cap before IsIncomplete
    max_page_size: int = 500
    # The request quota is per client across connections (SandboxConfig.quota_*); a connection
    # only decides whether its 429s carry Retry-After (Redox documents none).
    retry_after: bool = False
    latency_ms: float = 0.0  # added to every API response of this connection
    # --- FHIR access shape (issue 9): what this connection honours, and the client's refresh ---
    revinclude: bool = True  # honours `_revinclude` on Patient search (else 400 naming it)
    bulk_export: bool = False  # entitled to `Group/{id}/$export` (FHIR Bulk Data Access)
    refresh_days: int = 7  # client-side rolling re-pull period `sandbox connect` copies out
    # --- pushed events (issue 10) ---
    # Which family this connection's events are pushed in: "auto" = the family of its surface
    # (FHIR notifications for FHIR-only, Data Model events otherwise; both when the global
    # ``webhook_fhir`` is on and the connection speaks both), or "fhir" / "datamodel" / "both".
    webhook_family: str = "auto"
    webhook_detail: str = "detailed"  # FHIR notifications: "detailed" | "lightweight"

    def __post_init__(self) -> None:
        self.surfaces = tuple(self.surfaces)
        self.entities = tuple(self.entities)
        self.write_entities = tuple(self.write_entities)
        self.id_types = tuple(self.id_types)
        self.slug = self.slug or self.id
        self.destination_id = self.destination_id or str(uuid.uuid5(_NAMESPACE, self.name))
        for s in self.surfaces:
            if s not in ("fhir", "datamodel"):
                raise SandboxConfigError(f"connection '{self.id}': surfaces: unknown surface '{s}'")
        for e in self.entities:
            if e not in ENTITIES:
                raise SandboxConfigError(f"connection '{self.id}': entities: unknown entity '{e}'")
        if self.kind not in ("ehr", "network"):
            raise SandboxConfigError(f"connection '{self.id}': kind must be 'ehr' or 'network'")
        if self.webhook_family not in ("auto", "fhir", "datamodel", "both"):
            raise SandboxConfigError(
                f"connection '{self.id}': webhook_family must be auto, fhir, datamodel or both"
            )
        wanted = {"fhir": ("fhir",), "datamodel": ("datamodel",), "both": ("fhir", "datamodel")}
        missing = [s for s in wanted.get(self.webhook_family, ()) if s not in self.surfaces]
        if missing:
            raise SandboxConfigError(
                f"connection '{self.id}': webhook_family '{self.webhook_family}' needs the '{missing[0]}' surface"
            )
        if self.webhook_detail not in ("detailed", "lightweight"):
            raise SandboxConfigError(
                f"connection '{self.id}': webhook_detail must be detailed or lightweight"
            )
        if not 0 < self.membership <= 1:
            raise SandboxConfigError(f"connection '{self.id}': membership must be in (0, 1]")
        if self.bulk_export and "fhir" not in self.surfaces:
            raise SandboxConfigError(f"connection '{self.id}': bulk_export needs the 'fhir' surface")
        if (
            not isinstance(self.refresh_days, int)
            or isinstance(self.refresh_days, bool)
            or self.refresh_days < 1
        ):
            raise SandboxConfigError(f"connection '{self.id}': refresh_days must be an integer >= 1")

    @property
    def bulk_group_id(self) -> str:
        """The one FHIR Group this connection's bulk export covers (all of its patients)."""
        return str(uuid.uuid5(_NAMESPACE, f"group:{self.id}"))


def default_connections() -> list[ConnectionSpec]:
    return [
        ConnectionSpec(
            id="northwind-fhir",
            name="Northwind Health (FHIR)",
            surfaces=("fhir",),
            slug="northwind-health",
            membership=0.55,
            id_types=("MR", "EHRID"),
            page_size=100,
        ),
        ConnectionSpec(
            id="lakeside-dm",
            name="Lakeside Clinic (Data Model)",
            surfaces=("datamodel",),
            slug="lakeside-clinic",
            membership=0.45,
            id_types=("MR", "NIST"),
            page_size=100,
            retry_after=True,
        ),
        ConnectionSpec(
            id="riverbend-both",
            name="Riverbend Medical Center",
            surfaces=("fhir", "datamodel"),
            slug="riverbend-medical",
            membership=0.5,
            id_types=("MR", "EHRID", "NIST"),
            page_size=200,
            # Riverbend's EHR does not honour `_revinclude`: clients must detect it and fall back.
            revinclude=False,
        ),
        ConnectionSpec(
            id="carequality-network",
            name="Carequality Network Onramp",
            kind="network",
            surfaces=("datamodel",),
            entities=("patients", "documents"),
            write_entities=(),
            slug="carequality-onramp",
            membership=0.3,
            id_types=("MR",),
            page_size=50,
            latency_ms=150.0,
        ),
    ]


@dataclass
class SandboxConfig:
    seed: int = 42
    patients: int = 1000
    organization: str = "Redox ELT Sandbox Org"
    environment: str = "Development"
    # The simulated "now" at start; fixed so the same seed gives byte-identical data.
    clock_start: datetime = datetime(2026, 11, 1, tzinfo=UTC)
    history_days: int = 730
    connections: list[ConnectionSpec] = field(default_factory=default_connections)
    token_lifetime_s: float = 300.0  # OAuth access tokens (REDOX-REFERENCE §1.1)
    legacy_token_lifetime_s: float = 86400.0  # legacy tokens (§1.2)
    require_aud: bool = True  # some real clients omit aud; Redox lists it as checked
    iat_window_s: float = 300.0
    clock_skew_s: float = 10.0
    # Webhook delivery (REDOX-REFERENCE §4.2): immediately, +10 s, +10 s, 20, 30, 50, 80, 120, then
    # every couple of minutes. ``webhook_time_scale`` multiplies the ladder (0.01 in tests).
    webhook_backoff_s: tuple[float, ...] = (0.0, 10.0, 10.0, 20.0, 30.0, 50.0, 80.0, 120.0)
    webhook_steady_s: float = 120.0
    webhook_time_scale: float = 1.0
    webhook_timeout_s: float = 30.0
    webhook_duplicate_rate: float = 0.0
    webhook_reorder: float = 0.0
    # Connections that speak both surfaces also push FHIR notifications (webhook_family "auto").
    webhook_fhir: bool = False
    max_payload_bytes: int = 40 * 1024 * 1024  # REDOX-REFERENCE §6 (newer page)
    # --- FHIR search strictness (issue 9) ---
    # "redox": every search must carry one of its resource's required parameter sets
    # (REDOX-REFERENCE §3.3). "open": today's permissive rules where `_lastUpdated` / a date
    # stands in for any set — NOT how Redox behaves; for benchmarks only.
    search_policy: str = "redox"

    # ---- Data Model strictness, quota, faults and token checks (issues 9 and 14) ----------
    # search_policy (above) also governs Data Model queries: "redox" refuses a query without
    # the patient / visit identifier Redox requires (REDOX-REFERENCE §12.5).
    # One request quota per authenticated client (OAuth client id / legacy apiKey), shared by
    # every connection and both surfaces (REDOX-REFERENCE §12.6). None lifts it.
    quota_requests: int | None = 7500
    quota_window_s: float = 300.0
    # Client assertions may live at most this long (exp - iat and exp - now, plus clock_skew_s).
    max_assertion_lifetime_s: float = 300.0
    # The sandbox's public base URL when it sits behind a proxy; "" = the bound address. It is
    # what /_sandbox/connections publishes and what an assertion's aud must name.
    public_base_url: str = ""

    def connection(self, connection_id: str) -> ConnectionSpec:
        for c in self.connections:
            if c.id == connection_id:
                return c
        raise KeyError(connection_id)

    def validate(self) -> SandboxConfig:
        if not 1 <= self.patients <= 5_000_000:
            raise SandboxConfigError(f"patients must be between 1 and 5,000,000, got {self.patients}")
        if self.environment not in ENVIRONMENTS:
            raise SandboxConfigError(f"environment must be one of {ENVIRONMENTS}, got {self.environment!r}")
        ids = [c.id for c in self.connections]
        if len(set(ids)) != len(ids):
            raise SandboxConfigError("connections: ids must be unique")
        if self.search_policy not in SEARCH_POLICIES:
            raise SandboxConfigError(
                f"search_policy must be one of {SEARCH_POLICIES}, got {self.search_policy!r}"
            )
        slugs = [c.slug for c in self.connections]
        if len(set(slugs)) != len(slugs):
            raise SandboxConfigError("connections: slugs must be unique")
        if self.quota_requests is not None and (
            isinstance(self.quota_requests, bool)
            or not isinstance(self.quota_requests, int)
            or self.quota_requests < 1
        ):
            raise SandboxConfigError(
                f"quota_requests must be a whole number >= 1 (or null to lift the quota), got {self.quota_requests!r}"
            )
        for name in ("quota_window_s", "max_assertion_lifetime_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise SandboxConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clock_start"] = self.clock_start.isoformat()
        return d


def load_config(path: str | Path | None = None, **overrides: Any) -> SandboxConfig:
    """Defaults, then the file at ``path`` (YAML or JSON), then non-None ``overrides``."""
    cfg = SandboxConfig()
    if path:
        text = Path(path).read_text()
        raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise SandboxConfigError(f"{path}: expected a mapping at the top level")
        cfg = _apply(cfg, raw, str(path))
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return cfg.validate()


def _apply(cfg: SandboxConfig, raw: dict[str, Any], where: str) -> SandboxConfig:
    known = {f.name for f in fields(SandboxConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise SandboxConfigError(f"{where}: unknown field '{key}'")
        if key == "connections":
            if not isinstance(value, list) or not value:
                raise SandboxConfigError(f"{where}: connections must be a non-empty list")
            conn_fields = {f.name for f in fields(ConnectionSpec)}
            conns = []
            for i, c in enumerate(value):
                removed = sorted(set(c) & set(_REMOVED_CONNECTION_FIELDS))
                if removed:
                    raise SandboxConfigError(
                        f"{where}: connections[{i}]: '{removed[0]}' was removed; "
                        f"{_REMOVED_CONNECTION_FIELDS[removed[0]]}"
                    )
                bad = set(c) - conn_fields
                if bad:
                    raise SandboxConfigError(f"{where}: connections[{i}]: unknown field '{sorted(bad)[0]}'")
                conns.append(ConnectionSpec(**c))
            values[key] = conns
        elif key == "clock_start":
            values[key] = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        elif key == "webhook_backoff_s":
            values[key] = tuple(float(x) for x in value)
        else:
            values[key] = value
    return replace(cfg, **values)
