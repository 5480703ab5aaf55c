"""The destination Redox pushes to: an ASGI app (Starlette, served by uvicorn).

Redox's destination protocol (REDOX-REFERENCE §4, §12.9):

- Verification handshake: a POST whose body is ``{"verification-token", "challenge"}`` or a
  GET with ``?challenge=…&verification-token=…`` (the token may also come as a header). The
  answer is the bare challenge (it satisfies both the old "only the challenge" and the newer
  "challenge anywhere in the body" rule).
- Every delivery carries the ``verification-token`` header, compared in constant time.
  Missing → 401, wrong → 403, and nothing is stored. These are the only error answers a
  delivery can get besides 413 (above Redox's documented 40 MB, which Redox never sends) and
  503 (the inbox could not commit: not stored, so Redox must retry).
- Everything else authenticated is stored first and answered 200 only after the commit
  (``pipelines.inbox.store``): malformed JSON, unknown data models and queries included,
  marked for quarantine. Redox pauses the destination's whole queue on any status >= 400, so
  one bad message must never stop the feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from pipelines.inbox.envelope import Envelope, classify, parse_body, verification_request
from pipelines.inbox.store import Delivery, GroupCommitWriter, InboxError, received_now

log = logging.getLogger("redox_elt.webhook")

MAX_BODY_BYTES = 40 * 1024 * 1024  # REDOX-REFERENCE §6: 40 MB for API traffic
# An unauthenticated POST can only be the verification handshake: read at most this much.
MAX_HANDSHAKE_BYTES = 64 * 1024
TOKEN_HEADER = "verification-token"

ConnectionResolver = Callable[[Envelope], "str | None"]


class BodyTooLarge(Exception):
    pass


def _token_matches(given: str | None, expected: bytes) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed ``limit`` (declared or counted)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BodyTooLarge
        except ValueError:
            pass
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _challenge(challenge: str) -> Response:
    return PlainTextResponse(challenge)


def _refused(status: int, why: str) -> Response:
    return JSONResponse({"error": why}, status_code=status)


def create_app(
    inbox: Path,
    token: str,
    resolve_connection: ConnectionResolver | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Starlette:
    """The receiver over the inbox file ``inbox``; ``token`` is the verification token."""
    if not token:
        raise ValueError("the webhook verification token is empty")
    expected = token.encode("utf-8", "surrogateescape")
    holder: dict[str, GroupCommitWriter] = {}

    async def verify_get(request: Request) -> Response:
        challenge = request.query_params.get("challenge")
        if challenge is None:
            # Liveness for operators and load balancers; says nothing about the inbox.
            return JSONResponse({"status": "ok"})
        given = request.query_params.get(TOKEN_HEADER) or request.headers.get(TOKEN_HEADER)
        if given is None:
            return _refused(401, "verification-token is missing")
        if not _token_matches(given, expected):
            return _refused(403, "verification-token does not match")
        return _challenge(challenge)

    async def deliver(request: Request) -> Response:
        given = request.headers.get(TOKEN_HEADER)
        if given is not None and not _token_matches(given, expected):
            return _refused(403, "verification-token does not match")
        limit = max_body_bytes if given is not None else MAX_HANDSHAKE_BYTES
        try:
            body = await _read_body(request, limit)
        except BodyTooLarge:
            if given is None:
                return _refused(401, "verification-token is missing")
            return _refused(413, f"body larger than {max_body_bytes} bytes")
        try:
            payload, parsed = parse_body(body), True
        except ValueError:
            payload, parsed = None, False
        handshake = verification_request(payload)
        if handshake is not None:
            hs_token, challenge = handshake
            if not _token_matches(hs_token, expected):
                return _refused(403, "verification-token does not match")
            return _challenge(challenge)
        if given is None:
            return _refused(401, "verification-token is missing")
        envelope = classify(body, payload, parsed=parsed) if parsed else classify(body)
        connection_id = resolve_connection(envelope) if resolve_connection else None
        delivery = Delivery(envelope, body, connection_id, received_now())
        try:
            await asyncio.wrap_future(holder["writer"].submit(delivery))
        except InboxError as exc:
            log.error("%s; answering 503 so Redox retries", exc)
            return _refused(503, "the inbox could not store the message; retry")
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        holder["writer"] = GroupCommitWriter(inbox)
        try:
            yield
        finally:
            await asyncio.to_thread(holder["writer"].close)

    return Starlette(
        routes=[Route("/", verify_get, methods=["GET"]), Route("/", deliver, methods=["POST"])],
        lifespan=lifespan,
    )


def settings_resolver(settings: object) -> ConnectionResolver:
    """Which configured connection a message came from: a Data Model event by its
    ``Meta.Destinations[].ID`` (the connection's destination id), a FHIR notification by its
    ``MessageHeader.source.endpoint`` (under the connection's FHIR base URL); either by the
    source name when the id does not match."""
    connections = getattr(settings, "connections", ())
    by_destination = {c.destination_id: c.id for c in connections if getattr(c, "destination_id", None)}
    by_name = {c.name: c.id for c in connections if getattr(c, "name", None)}
    bases = [(c.fhir_base_url.rstrip("/"), c.id) for c in connections if getattr(c, "fhir_base_url", None)]

    def resolve(envelope: Envelope) -> str | None:
        ref = envelope.source_ref
        if ref:
            if ref in by_destination:
                return by_destination[ref]
            for base, conn_id in bases:
                if ref.rstrip("/") == base or ref.startswith(base + "/"):
                    return conn_id
        if envelope.source_name and envelope.source_name in by_name:
            return by_name[envelope.source_name]
        if len(connections) == 1:
            return connections[0].id
        return None

    return resolve
