"""Compose the sandbox: population, auth, faults, webhooks and the route modules."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from sandbox import control
from sandbox.auth import AuthServer
from sandbox.auth import routes as auth_routes
from sandbox.config import SandboxConfig
from sandbox.datamodel import routes as datamodel_routes
from sandbox.datamodel.render import event_renderer
from sandbox.faults import Faults
from sandbox.fhir import routes as fhir_routes
from sandbox.population.store import RecordStore
from sandbox.state import SandboxState
from sandbox.webhooks import WebhookSender, family_renderer

log = logging.getLogger("sandbox")


def build_store(
    config: SandboxConfig, seed_from: str | Path | None = None
) -> tuple[SandboxConfig, RecordStore]:
    """The synthetic population, or (``seed_from``) one connection served from FHIR files."""
    if seed_from is not None:
        from sandbox.fhir.seed_from import load_seed_dir
        from sandbox.population.static import StaticPopulation

        conn, records = load_seed_dir(Path(seed_from))
        config = replace(config, connections=[conn])
        return config, StaticPopulation([conn], {conn.id: records}, config.clock_start)
    from sandbox.population.synthetic import SyntheticPopulation

    return config, SyntheticPopulation(config)


def build_state(
    config: SandboxConfig, *, seed_from: str | Path | None = None, base_url: str = ""
) -> SandboxState:
    config, store = build_store(config, seed_from)
    base_url = config.public_base_url.rstrip("/") or base_url
    faults = Faults(config, seed=config.seed)
    auth = AuthServer(config, faults)
    faults.bind_clients(auth.client_of)  # the quota is per client, whichever connection is called
    webhooks = WebhookSender(config, _push_renderer(config, store, base_url), faults)
    return SandboxState(
        config=config, store=store, auth=auth, faults=faults, webhooks=webhooks, base_url=base_url
    )


def _push_renderer(config: SandboxConfig, store: RecordStore, base_url: str):
    """What one change becomes on the wire, in each connection's families
    (``sandbox.webhooks.push_families``)."""
    from sandbox.fhir.notifications import render_redox_notification

    def fhir_notification(change, conn):  # type: ignore[no-untyped-def]
        base = f"{base_url}/fhir/R4/{conn.slug}/{config.environment}" if base_url else None
        return render_redox_notification(change, conn, base_url=base, detail=conn.webhook_detail)

    return family_renderer(config, event_renderer(store), fhir_notification)


def create_app(state: SandboxState) -> Starlette:
    route_list = [
        *control.routes(state),
        *auth_routes(state),
        *fhir_routes.routes(state),
        *datamodel_routes.routes(state),
    ]

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"no route for {request.method} {request.url.path}"}, status_code=404)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.webhooks.close()

    app = Starlette(routes=route_list, exception_handlers={404: not_found}, lifespan=lifespan)
    app.state.sandbox = state
    return app
