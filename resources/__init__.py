"""The auth core and the Redox HTTP client (no orchestrator imports).

- ``settings``: the connections config file (load / validate / write).
- ``vault``: the encrypted credential vault.
- ``keys``: the signing key ring (generate, rotate, JWKS, retire).
- ``auth``: OAuth (signed JWT assertion) and legacy token providers.
- ``throttle``: adaptive rate control (AIMD), shared per Redox host and client.
- ``quota``: ``RequestBudget``, the rolling request budget shared by connections and processes.
- ``responses``: the response classifier (ok / retry / re-auth / partial failure / fatal).
- ``retry``: ``RetryPolicy``, attempts, back-off with jitter, capped Retry-After, call deadline.
- ``client``: ``RedoxClient``, one connection's FHIR + Data Model client.
- ``audit``: the hash-chained audit trail and its warehouse table.
- ``onboarding``: ``connect_sandbox`` (``redox-elt sandbox connect``).
"""

from resources.audit import AuditLog, audit_context, load_audit_into_duckdb, verify_audit
from resources.auth import LegacyTokenProvider, OAuthTokenProvider, TokenError
from resources.client import (
    BudgetDeferred,
    DataModelError,
    PagingCycleError,
    PartialFailure,
    RedoxAPIError,
    RedoxAuthError,
    RedoxClient,
    RedoxError,
    ScopeError,
)
from resources.keys import KeyRing, KeyRingError
from resources.quota import PRIORITIES, BudgetExhausted, BudgetStats, RequestBudget
from resources.settings import ConfigError, Settings, load_settings, write_settings
from resources.vault import Vault, VaultError

__all__ = [
    "PRIORITIES",
    "AuditLog",
    "BudgetDeferred",
    "BudgetExhausted",
    "BudgetStats",
    "ConfigError",
    "DataModelError",
    "KeyRing",
    "KeyRingError",
    "LegacyTokenProvider",
    "OAuthTokenProvider",
    "PagingCycleError",
    "PartialFailure",
    "RedoxAPIError",
    "RedoxAuthError",
    "RedoxClient",
    "RedoxError",
    "RequestBudget",
    "ScopeError",
    "Settings",
    "TokenError",
    "Vault",
    "VaultError",
    "audit_context",
    "load_audit_into_duckdb",
    "load_settings",
    "verify_audit",
    "write_settings",
]
