"""With ``webhook_fhir`` on, a change in a FHIR-speaking connection is also pushed as a
FHIR message Bundle (REDOX-REFERENCE §3.5), through the same verified, ordered feed."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from fhir.resources.R4B.bundle import Bundle

from sandbox.server import SandboxServer
from tests.sandbox.test_server_e2e import Receiver


def test_fhir_notification_bundles_are_pushed_with_the_verification_token(
    sandbox_factory: Callable[..., SandboxServer],
) -> None:
    server = sandbox_factory(patients=60, webhook_fhir=True)
    receiver = Receiver()
    try:
        token = "fhir-notify-token"
        r = httpx.post(
            f"{server.url}/_sandbox/webhooks", json={"url": receiver.url, "token": token}, timeout=30
        )
        assert r.status_code == 200, r.text
        httpx.post(f"{server.url}/_sandbox/advance", json={"days": 1, "change_fraction": 0.05}, timeout=60)
        receiver.wait_for(20)
        with receiver._lock:
            events = list(receiver.events)
        bundles = []
        for headers, body in events:
            assert headers.get("verification-token") == token
            data = httpx.Response(200, content=body).json()
            if data.get("resourceType") == "Bundle":
                bundles.append(data)
        assert bundles, "no FHIR notification Bundle was pushed"
        for bundle in bundles[:50]:
            Bundle.model_validate(bundle)
            assert bundle["type"] == "message"
            header = bundle["entry"][0]["resource"]
            assert header["resourceType"] == "MessageHeader"
            assert header["eventUri"].startswith("https://fhir.redoxengine.com/EventDefinition/")
            assert header["definition"].endswith("Full")  # detailed by default
        fhir_slugs = {c.slug for c in server.config.connections if "fhir" in c.surfaces}
        assert any(
            any(s in e.get("fullUrl", "") for s in fhir_slugs) for b in bundles for e in b["entry"][1:]
        )
    finally:
        receiver.close()
