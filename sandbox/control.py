"""The sandbox control plane under ``/_sandbox/`` — never part of the Redox-shaped API.

Tests, benchmarks and outside checkers use it to register clients and webhooks, read
the population's truth (and, per connection, the roster of MRNs an organization would hold
and how many patients were active since an instant), move simulated time and inject faults. The response shapes
are a contract (see the sandbox issue): keep them exactly.
"""

from __future__ import annotations

import asyncio
import re
import threading
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sandbox.fhir.identifiers import patient_system
from sandbox.population.records import Change
from sandbox.state import SandboxState


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(message: str, status: int = 400) -> Response:
    return _json({"error": message}, status)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    data = orjson.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    return data


def parse_instant(raw: str) -> datetime:
    """An ISO 8601 date or date-time; a naive one is UTC. A ``+hh:mm`` offset sent unescaped in a
    query string arrives as `` hh:mm`` and is read as meant."""
    text = re.sub(r" (\d{2}:?\d{2})$", r"+\1", raw.strip()).replace("Z", "+00:00")
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("expected an ISO 8601 instant such as 2026-10-01T00:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def connections_document(state: SandboxState) -> dict[str, Any]:
    cfg = state.config
    return {
        "organization": cfg.organization,
        "environment": cfg.environment,
        "token_url": f"{state.base_url}/v2/auth/token",
        "legacy_auth_url": f"{state.base_url}/auth",
        "connections": [
            {
                "id": c.id,
                "name": c.name,
                "kind": c.kind,
                "surfaces": list(c.surfaces),
                "entities": list(c.entities),
                "write_entities": list(c.write_entities),
                "fhir_base_url": state.fhir_base_url(c) if "fhir" in c.surfaces else None,
                "datamodel_url": f"{state.base_url}/endpoint" if "datamodel" in c.surfaces else None,
                "destination_id": c.destination_id,
                "destination_slug": c.slug,
                "headers": {},
                "page_size": c.page_size,
                # The client's one quota, shared with every other connection (not per connection).
                "rate_limit": {
                    "requests": cfg.quota_requests,
                    "window_s": cfg.quota_window_s,
                    "scope": "client",
                },
                "revinclude": c.revinclude and "fhir" in c.surfaces,
                "bulk_export": c.bulk_export,
                "bulk_group_id": c.bulk_group_id if c.bulk_export else None,
                "refresh_days": c.refresh_days,
            }
            for c in cfg.connections
        ],
    }


def routes(state: SandboxState) -> list[BaseRoute]:
    advance_lock = threading.Lock()

    def _advance_and_enqueue(days: float, fraction: float) -> list[Change]:
        # Rendering the events of a large advance takes seconds: off the event loop, so the API
        # keeps answering. One advance at a time, so events are queued in the order they happened.
        with advance_lock:
            changes = state.store.advance(days, fraction)
            state.webhooks.enqueue(changes, state.config.connections)
            return changes

    async def connections(request: Request) -> Response:
        return _json(connections_document(state))

    async def clients(request: Request) -> Response:
        try:
            body = await _body(request)
            name, jwks = body.get("name"), body.get("jwks")
            if not isinstance(name, str) or not name:
                return _error("'name' is required")
            if not isinstance(jwks, dict):
                return _error("'jwks' must be a JWK Set object {\"keys\": [...]}")
            client_id = state.auth.register_client(name, jwks)
        except ValueError as exc:
            return _error(str(exc))
        return _json({"client_id": client_id})

    async def legacy_keys(request: Request) -> Response:
        return _json(state.auth.create_legacy_key())

    async def webhooks(request: Request) -> Response:
        try:
            body = await _body(request)
        except ValueError as exc:
            return _error(str(exc))
        url, token = body.get("url"), body.get("token")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return _error("'url' must be an http(s) URL")
        if not isinstance(token, str) or not token:
            return _error("'token' (the verification token) is required")
        # The handshake does blocking I/O against the receiver: keep it off the event loop.
        result = await asyncio.to_thread(state.webhooks.register, url, token)
        status = 200 if result.get("verified", True) else 400
        return _json(result, status)

    async def truth(request: Request) -> Response:
        want_persons = request.query_params.get("persons", "true").lower() not in ("0", "false", "no")
        active_since: datetime | None = None
        if "active_since" in request.query_params:
            try:
                active_since = parse_instant(request.query_params["active_since"])
            except ValueError as exc:
                return _error(f"active_since: {exc}")

        def compute() -> dict[str, Any]:
            out: dict[str, Any] = {
                "now": state.store.now.isoformat(),
                "counts": state.store.counts(),
                "live": state.store.counts(live_only=True),
                # Observation.component entries served (blood pressure panels: two each).
                "components": {
                    cid: {"result_components": n} for cid, n in state.store.component_counts().items()
                },
                "live_components": {
                    cid: {"result_components": n}
                    for cid, n in state.store.component_counts(live_only=True).items()
                },
                "webhooks": state.webhooks.stats(),
                "quota": state.faults.quota_usage(),
            }
            if want_persons:
                out["persons"] = state.store.persons()
            if active_since is not None:
                out["active_since"] = active_since.isoformat()
                out["active"] = {
                    c.id: state.store.active_patients(c.id, active_since)
                    for c in state.config.connections
                    if c.kind == "ehr"
                }
            return out

        return _json(await asyncio.to_thread(compute))

    async def roster(request: Request) -> Response:
        connection_id = request.query_params.get("connection", "")
        if not connection_id:
            return _error("'connection' (a connection id) is required")
        try:
            conn = state.config.connection(connection_id)
        except KeyError:
            return _error("no such connection; GET /_sandbox/connections lists them", 404)
        system = patient_system(conn.slug, "MR")
        mrns = await asyncio.to_thread(state.store.roster, conn.id)
        return _json({"connection": conn.id, "patients": [{"system": system, "value": v} for v in mrns]})

    async def writes(request: Request) -> Response:
        return _json(state.writes.to_json())

    async def advance(request: Request) -> Response:
        try:
            body = await _body(request)
            days = float(body.get("days", 1))
            fraction = float(body.get("change_fraction", 0.01))
        except (ValueError, TypeError) as exc:
            return _error(f"advance: {exc}")
        if days <= 0 or days > 3650:
            return _error("advance: 'days' must be in (0, 3650]")
        if not 0 <= fraction <= 1:
            return _error("advance: 'change_fraction' must be in [0, 1]")
        changes = await asyncio.to_thread(_advance_and_enqueue, days, fraction)
        summary: dict[str, dict[str, int]] = {}
        for ch in changes:
            per = summary.setdefault(ch.record.connection_id, {})
            key = f"{ch.entity}.{ch.kind}"
            per[key] = per.get(key, 0) + 1
        return _json({"now": state.store.now.isoformat(), "changes": len(changes), "by_connection": summary})

    async def faults(request: Request) -> Response:
        try:
            body = await _body(request)
            revoke = bool(body.pop("revoke_tokens", False))
            # {"revoke_tokens": true} alone revokes; it must not clear the faults as {} would.
            snapshot = state.faults.set(body) if (body or not revoke) else state.faults.snapshot()
        except ValueError as exc:
            return _error(str(exc))
        if revoke:
            state.auth.revoke(None)
        return _json(snapshot)

    async def get_faults(request: Request) -> Response:
        return _json(state.faults.snapshot())

    return [
        Route("/_sandbox/connections", connections, methods=["GET"]),
        Route("/_sandbox/clients", clients, methods=["POST"]),
        Route("/_sandbox/legacy-keys", legacy_keys, methods=["POST"]),
        Route("/_sandbox/webhooks", webhooks, methods=["POST"]),
        Route("/_sandbox/truth", truth, methods=["GET"]),
        Route("/_sandbox/roster", roster, methods=["GET"]),
        Route("/_sandbox/writes", writes, methods=["GET"]),
        Route("/_sandbox/advance", advance, methods=["POST"]),
        Route("/_sandbox/faults", faults, methods=["POST"]),
        Route("/_sandbox/faults", get_faults, methods=["GET"]),
    ]
