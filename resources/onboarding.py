"""Onboarding against a sandbox: ``redox-elt sandbox connect --url URL --out FILE``.

Does what a new Redox customer does in the dashboard, through the sandbox's control plane:
make (or reuse) a signing key in the vault and register its public JWKS for an OAuth client,
create a legacy API key too (its secret goes into the vault; it keeps the legacy-to-OAuth
migration path testable), read the organization's connections and write the connections
config file. Nothing secret is written to the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import httpx

from resources.keys import KeyRing
from resources.settings import (
    DEFAULT_AUDIT_PATH,
    DEFAULT_KEY_RING,
    DEFAULT_QUOTA_REQUESTS,
    DEFAULT_QUOTA_WINDOW_S,
    QUOTA_REQUESTS_RANGE,
    QUOTA_WINDOW_RANGE_S,
    ConfigError,
    settings_from_dict,
    write_settings,
)
from resources.vault import Vault

log = logging.getLogger(__name__)

# Stay a little under the sandbox's advertised limit so the throttle never has to learn it.
_RATE_HEADROOM = 0.95


class OnboardingError(Exception):
    """The sandbox could not be reached or refused a registration; the message says which step."""


def _call(http: httpx.Client, method: str, url: str, step: str, **kwargs: Any) -> Any:
    try:
        response = http.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise OnboardingError(f"{step}: cannot reach {url} ({type(exc).__name__})") from None
    if response.status_code != 200:
        try:
            reason = response.json().get("error") or response.text
        except ValueError:
            reason = response.text
        raise OnboardingError(f"{step}: {url} answered HTTP {response.status_code}: {str(reason)[:200]}")
    try:
        return response.json()
    except ValueError:
        raise OnboardingError(f"{step}: {url} did not answer JSON") from None


def register_jwks(url: str, name: str, jwks: dict[str, Any], http: httpx.Client | None = None) -> str:
    """Register (or replace, for a rotation) the JWKS of client ``name`` with a sandbox; returns the client id."""
    own = http is None
    http = http or httpx.Client(timeout=30.0)
    try:
        body = _call(
            http,
            "POST",
            f"{url.rstrip('/')}/_sandbox/clients",
            "register the JWKS",
            json={"name": name, "jwks": jwks},
        )
    finally:
        if own:
            http.close()
    client_id = body.get("client_id") if isinstance(body, dict) else None
    if not isinstance(client_id, str) or not client_id:
        raise OnboardingError("register the JWKS: the sandbox answered without a client_id")
    return client_id


def _connection_entry(raw: dict[str, Any]) -> dict[str, Any]:
    entry = {
        key: raw.get(key)
        for key in (
            "id",
            "name",
            "kind",
            "surfaces",
            "entities",
            "write_entities",
            "fhir_base_url",
            "datamodel_url",
            "destination_id",
            "headers",
        )
    }
    entry["headers"] = entry.get("headers") or {}
    if raw.get("destination_slug"):
        entry["destination_slug"] = raw["destination_slug"]
    if isinstance(raw.get("page_size"), int):
        entry["page_size"] = raw["page_size"]
    if isinstance(raw.get("refresh_days"), int) and not isinstance(raw["refresh_days"], bool):
        entry["refresh_days"] = raw["refresh_days"]
    if raw.get("bulk_export") is True:
        entry["bulk_export"] = True
        if raw.get("bulk_group_id"):
            entry["bulk_group_id"] = str(raw["bulk_group_id"])
    limit = raw.get("rate_limit")
    if isinstance(limit, dict) and limit.get("requests") and limit.get("window_s"):
        entry["max_rps"] = round(_RATE_HEADROOM * float(limit["requests"]) / float(limit["window_s"]), 2)
    return entry


def _quota_entry(meta: dict[str, Any]) -> dict[str, Any]:
    """The client's request budget for this sandbox: 90% of its limit, as for real Redox.

    A client-wide ``quota`` in the sandbox's metadata wins; otherwise the smallest
    per-connection ``rate_limit`` (a sandbox that limits each connection on its own allows at
    least that much to the client as a whole).
    """
    limits: list[tuple[float, float]] = []
    quota = meta.get("quota")
    sources = (
        [quota]
        if isinstance(quota, dict)
        else [c.get("rate_limit") for c in meta.get("connections") or [] if isinstance(c, dict)]
    )
    for limit in sources:
        if isinstance(limit, dict):
            requests, window = limit.get("requests"), limit.get("window_s")
            if (
                isinstance(requests, int | float)
                and isinstance(window, int | float)
                and requests > 0
                and window > 0
            ):
                limits.append((float(requests), float(window)))
    if not limits:
        return {"requests": DEFAULT_QUOTA_REQUESTS, "window_s": DEFAULT_QUOTA_WINDOW_S}
    requests, window = min(limits, key=lambda rw: rw[0] / rw[1])
    low_r, high_r = QUOTA_REQUESTS_RANGE
    low_w, high_w = QUOTA_WINDOW_RANGE_S
    return {
        "requests": int(min(max(requests * 0.9, low_r), high_r)),
        "window_s": min(max(window, low_w), high_w),
    }


def connect_sandbox(
    url: str, out: str | os.PathLike[str], *, name: str = "redox-elt", vault: Vault | None = None
) -> Path:
    """Register with the sandbox at ``url`` and write the connections config to ``out``; returns its path."""
    base = url.rstrip("/")
    vault = vault or Vault()
    ring = KeyRing(vault, DEFAULT_KEY_RING)
    key, created = ring.generate()
    log.info("%s signing key %s", "generated" if created else "reusing", key.kid)
    secret_ref = f"{name}-legacy-secret"
    with httpx.Client(timeout=30.0) as http:
        meta = _call(http, "GET", f"{base}/_sandbox/connections", "read the connections")
        client_id = register_jwks(base, name, ring.jwks(), http)
        legacy = _call(http, "POST", f"{base}/_sandbox/legacy-keys", "create a legacy API key")
    if not isinstance(meta, dict) or not isinstance(meta.get("connections"), list):
        raise OnboardingError("read the connections: the sandbox answered without a 'connections' list")
    api_key, secret = legacy.get("apiKey"), legacy.get("secret")
    if not isinstance(api_key, str) or not isinstance(secret, str):
        raise OnboardingError("create a legacy API key: the sandbox answered without apiKey/secret")
    vault.set(secret_ref, secret)
    document = {
        "organization": meta.get("organization") or "",
        "environment": meta.get("environment") or "",
        "token_url": meta.get("token_url"),
        "legacy_auth_url": meta.get("legacy_auth_url"),
        "auth": {
            "client_id": client_id,
            "key_ring": DEFAULT_KEY_RING,
            "legacy_api_key": api_key,
            "legacy_secret_ref": secret_ref,
        },
        "connections": [_connection_entry(c) for c in meta["connections"] if isinstance(c, dict)],
        "audit": {"path": DEFAULT_AUDIT_PATH},
        "quota": _quota_entry(meta),
    }
    target = Path(out).expanduser()
    try:
        settings = settings_from_dict(document, source_path=target)
    except ConfigError as exc:
        raise OnboardingError(f"the sandbox's connections do not make a valid config: {exc}") from None
    return write_settings(settings, target)
