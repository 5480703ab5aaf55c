"""The sandbox's FHIR R4 API under ``/fhir/R4/{slug}/{environment}/`` (REDOX-REFERENCE §3).

Every request: bearer token (OAuth only) -> destination slug and environment -> fault gate ->
entitlement. Reads are ``GET {Type}/{id}``; search is ``POST {Type}/_search`` with a form body
only (no PHI in URLs), paged through opaque ``next`` tokens, with the required parameter sets,
``_revinclude`` and ``_elements`` of ``sandbox.fhir.search``; write-backs are ``$``-operations
taking message Bundles; ``Group/{id}/$export`` and its status / file URLs are the bulk export of
``sandbox.fhir.bulk``. Responses are assembled as bytes from cached rendered resources.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from sandbox.auth import REDOX_HEADERS, InvalidToken
from sandbox.config import ConnectionSpec
from sandbox.fhir.bulk import NDJSON, BulkExports, ExportRefused, parse_kickoff
from sandbox.fhir.operations import WRITE_OPERATIONS, WRITTEN_RESOURCE_TYPES
from sandbox.fhir.paging import (
    Page,
    PageRequest,
    PageTokens,
    RevincludeRequest,
    read_page,
    read_revinclude_page,
    start_revinclude,
)
from sandbox.fhir.render import RESOURCE_ENTITIES, RenderCache, instant, render_binary, resource_type
from sandbox.fhir.search import SearchError, parse_search
from sandbox.fhir.writeback import (
    WriteError,
    identifier_matches,
    parse_write,
    response_bundle,
    written_resource,
)
from sandbox.population.records import DocumentRecord, Record
from sandbox.state import SandboxState
from sandbox.write_acks import report_outcome as report_write_outcome

FHIR_JSON = "application/fhir+json; charset=utf-8"
PAGE_TOKEN = "_page_token"
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


class _Refused(Exception):
    """Ends a request early with an OperationOutcome (raised inside handlers, caught once)."""

    def __init__(
        self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.headers = headers or {}


class FhirApi:
    def __init__(self, state: SandboxState) -> None:
        self.state = state
        self.cache = RenderCache()
        self.tokens = PageTokens()
        self.exports = BulkExports(state.store)

    # --- plumbing ------------------------------------------------------------------------------

    def _send(self, conn: ConnectionSpec | None, body: bytes, status: int = 200, **headers: str) -> Response:
        if conn is not None:
            body = self.state.faults.mangle(conn.id, body)
        return Response(body, status_code=status, headers={**REDOX_HEADERS, **headers}, media_type=FHIR_JSON)

    def _refusal(self, conn: ConnectionSpec | None, refused: _Refused) -> Response:
        body = orjson.dumps(operation_outcome(refused.code, refused.diagnostics))
        return self._send(conn, body, refused.status, **refused.headers)

    def base_url(self, request: Request, conn: ConnectionSpec) -> str:
        if self.state.base_url:
            return self.state.fhir_base_url(conn)
        return (
            f"{request.url.scheme}://{request.url.netloc}/fhir/R4/{conn.slug}/{self.state.config.environment}"
        )

    async def _enter(self, request: Request) -> ConnectionSpec | Response:
        """Auth, destination, environment and the fault gate; a Response ends the request."""
        try:
            token = self.state.auth.check_bearer(request.headers.get("authorization"), "fhir")
            request.state.client_id = token.client_id
        except InvalidToken as exc:
            refused = _Refused(
                401, "login", f"authentication failed: {exc.reason}", {"WWW-Authenticate": "Bearer"}
            )
            return self._refusal(None, refused)
        slug = request.path_params["slug"]
        conn = self.state.connection_by_slug(slug)
        if conn is None or "fhir" not in conn.surfaces:
            return self._refusal(None, _Refused(404, "not-found", "no FHIR destination with this slug"))
        if request.path_params["environment"] != self.state.config.environment:
            return self._refusal(
                None,
                _Refused(
                    404,
                    "not-found",
                    f"this organization has no '{request.path_params['environment']}' environment",
                ),
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.state.config.max_payload_bytes:
            limit = self.state.config.max_payload_bytes
            return self._refusal(
                None, _Refused(413, "too-long", f"request body exceeds the {limit}-byte payload limit")
            )
        gated = await self.state.faults.gate(conn, request)
        if gated is not None:
            return gated
        return conn

    @staticmethod
    def _entity(conn: ConnectionSpec, rtype: str) -> str:
        entity = RESOURCE_ENTITIES.get(rtype)
        if entity is None:
            raise _Refused(
                404, "not-supported", f"resource type '{rtype}' is not supported by this destination"
            )
        if entity not in conn.entities:
            raise _Refused(403, "forbidden", f"this connection is not entitled to {rtype} ({entity})")
        return entity

    # --- handlers ------------------------------------------------------------------------------

    async def type_level(self, request: Request) -> Response:
        entered = await self._enter(request)
        if isinstance(entered, Response):
            return entered
        conn = entered
        try:
            rtype = request.path_params["rtype"]
            self._entity(conn, rtype)
            if request.method == "GET" and PAGE_TOKEN in request.query_params:
                return await self._search(request, conn, rtype)
            if request.method == "GET":
                raise _search_must_be_post(rtype)
            raise _Refused(
                405,
                "not-supported",
                f"{request.method} {rtype} is not supported; search with POST {rtype}/_search",
            )
        except _Refused as refused:
            return self._refusal(conn, refused)

    async def search(self, request: Request) -> Response:
        entered = await self._enter(request)
        if isinstance(entered, Response):
            return entered
        conn = entered
        try:
            rtype = request.path_params["rtype"]
            written = await self._written_search(request, conn, rtype)
            if written is not None:
                return written
            self._entity(conn, rtype)
            if rtype == "Binary":
                raise _Refused(405, "not-supported", "Binary cannot be searched; read it by id")
            if request.method not in ("GET", "POST"):
                raise _Refused(405, "not-supported", f"{request.method} is not supported on _search")
            return await self._search(request, conn, rtype)
        except _Refused as refused:
            return self._refusal(conn, refused)

    async def instance(self, request: Request) -> Response:
        entered = await self._enter(request)
        if isinstance(entered, Response):
            return entered
        conn = entered
        try:
            rtype, rid = request.path_params["rtype"], request.path_params["rid"]
            if rid.startswith("$"):
                if request.method != "POST":
                    raise _Refused(405, "not-supported", f"operation {rid} must be invoked with POST")
                return await self._operation(request, conn, rtype, rid)
            entity = self._entity(conn, rtype)
            if request.method != "GET":
                raise _Refused(
                    405,
                    "not-supported",
                    f"{request.method} {rtype}/{{id}} is not supported by this destination",
                )
            return await run_in_threadpool(self._read, request, conn, rtype, entity, rid)
        except _Refused as refused:
            return self._refusal(conn, refused)

    # --- read ----------------------------------------------------------------------------------

    def _read(self, request: Request, conn: ConnectionSpec, rtype: str, entity: str, rid: str) -> Response:
        record = self.state.store.get(conn.id, entity, rid)
        if record is None or (rtype != "Binary" and resource_type(record) != rtype):
            raise _Refused(404, "not-found", f"{rtype}/{{id}}: no such resource")
        headers = {
            "ETag": f'W/"{record.version}"',
            "Last-Modified": format_datetime(record.last_updated.astimezone(UTC), usegmt=True),
        }
        if rtype == "Binary":
            assert isinstance(record, DocumentRecord)
            if "json" not in request.headers.get("accept", "").lower():
                return Response(
                    record.content, media_type=record.content_type, headers={**REDOX_HEADERS, **headers}
                )
            return self._send(conn, orjson.dumps(render_binary(record)), **headers)
        return self._send(conn, self.cache.resource_bytes(record, conn), **headers)

    # --- search --------------------------------------------------------------------------------

    async def _search(self, request: Request, conn: ConnectionSpec, rtype: str) -> Response:
        token = request.query_params.get(PAGE_TOKEN)
        url_params = [k for k in request.query_params if k != PAGE_TOKEN]
        if url_params:
            if request.method == "GET":
                raise _search_must_be_post(rtype)
            raise _Refused(
                400, "invalid", "search parameters belong in the form-encoded POST body, not the URL"
            )
        if request.method == "GET" and token is None:
            raise _search_must_be_post(rtype)
        params = await _body_params(request) if request.method == "POST" else []
        body_tokens = [v for k, v in params if k == PAGE_TOKEN]
        if body_tokens:
            token = body_tokens[-1]
            params = [(k, v) for k, v in params if k != PAGE_TOKEN]
        page_request: PageRequest | RevincludeRequest | None
        if token is not None:
            if params:
                raise _Refused(400, "invalid", "a page token cannot be combined with search parameters")
            page_request = self.tokens.resolve(token)
            if page_request is None or page_request.plan.resource_type != rtype:
                raise _Refused(410, "not-found", "page token unknown or expired; start the search again")
        else:
            policy = self.state.config.search_policy
            try:
                plan = await run_in_threadpool(parse_search, rtype, params, conn, self.state.store, policy)
            except SearchError as exc:
                raise _Refused(exc.status, exc.code, exc.message) from None
            if plan.revinclude:
                page_request = await run_in_threadpool(start_revinclude, self.state.store, plan)
            else:
                page_request = PageRequest(plan, None, None)
        base = self.base_url(request, conn)
        self_url = f"{base}/{rtype}/_search" + (f"?{PAGE_TOKEN}={token}" if token else "")
        body = await run_in_threadpool(self._bundle, conn, rtype, page_request, base, self_url)
        return self._send(conn, body)

    def _bundle(
        self,
        conn: ConnectionSpec,
        rtype: str,
        request: PageRequest | RevincludeRequest,
        base: str,
        self_url: str,
    ) -> bytes:
        entries: list[tuple[Record, str]]
        if isinstance(request, RevincludeRequest):
            rpage = read_revinclude_page(self.state.store, request)
            entries, total, following = rpage.entries, rpage.total, rpage.next
        else:
            page: Page = read_page(self.state.store, request)
            entries, total, following = [(r, "match") for r in page.records], page.total, page.next
        links = [{"relation": "self", "url": self_url}]
        if following is not None:
            links.append(
                {
                    "relation": "next",
                    "url": f"{base}/{rtype}/_search?{PAGE_TOKEN}={self.tokens.issue(following)}",
                }
            )
        elements = request.plan.elements
        parts = [
            b'{"resourceType":"Bundle","id":"',
            str(uuid.uuid4()).encode(),
            b'","meta":{"lastUpdated":',
            orjson.dumps(instant(self.state.store.now)),
            b'},"type":"searchset","total":',
            str(total).encode(),
            b',"link":',
            orjson.dumps(links),
        ]
        if entries:
            encoded = []
            for record, mode in entries:
                resource = self.cache.resource_bytes(record, conn)
                if elements is not None:
                    resource = orjson.dumps(subset_elements(orjson.loads(resource), elements))
                encoded.append(
                    b'{"fullUrl":'
                    + orjson.dumps(f"{base}/{resource_type(record)}/{record.id}")
                    + b',"resource":'
                    + resource
                    + b',"search":{"mode":"'
                    + mode.encode()
                    + b'"}}'
                )
            parts += [b',"entry":[', b",".join(encoded), b"]"]
        parts.append(b"}")
        return b"".join(parts)

    # --- bulk export (FHIR Bulk Data Access; sandbox.fhir.bulk) --------------------------------

    async def _bulk(
        self, request: Request, handler: Callable[[Request, ConnectionSpec], Awaitable[Response]]
    ) -> Response:
        """Enter like any request, then require the connection's bulk entitlement."""
        entered = await self._enter(request)
        if isinstance(entered, Response):
            return entered
        conn = entered
        try:
            if not conn.bulk_export:
                raise _Refused(403, "forbidden", "this connection is not entitled to bulk export ($export)")
            return await handler(request, conn)
        except ExportRefused as refused:
            return self._refusal(conn, _Refused(refused.status, refused.code, refused.message))
        except _Refused as refused:
            return self._refusal(conn, refused)

    def _status_url(self, request: Request, conn: ConnectionSpec, job_id: str) -> str:
        return f"{self.base_url(request, conn)}/$export-poll/{job_id}"

    async def export_kickoff(self, request: Request) -> Response:
        async def handle(request: Request, conn: ConnectionSpec) -> Response:
            if request.path_params["gid"] != conn.bulk_group_id:
                raise _Refused(404, "not-found", "Group/{id}: no such group at this destination")
            if "respond-async" not in request.headers.get("prefer", "").lower():
                raise _Refused(400, "invalid", "bulk export needs the header 'Prefer: respond-async'")
            accept = request.headers.get("accept", "").lower()
            if accept and not any(a in accept for a in ("application/fhir+json", "application/json", "*/*")):
                raise _Refused(
                    400, "not-supported", "bulk export answers with 'Accept: application/fhir+json'"
                )
            export = parse_kickoff(list(request.query_params.multi_items()), conn)
            base = self.base_url(request, conn)
            query = f"?{request.url.query}" if request.url.query else ""
            job = self.exports.start(
                conn, request.state.client_id, f"{base}/Group/{conn.bulk_group_id}/$export{query}", export
            )
            outcome = operation_outcome(
                "informational", "export started; poll Content-Location", "information"
            )
            return self._send(
                conn,
                orjson.dumps(outcome),
                202,
                **{"Content-Location": self._status_url(request, conn, job.job_id)},
            )

        if request.method != "GET":
            return self._refusal(
                None, _Refused(405, "not-supported", "start a bulk export with GET", {"Allow": "GET"})
            )
        return await self._bulk(request, handle)

    async def export_status(self, request: Request) -> Response:
        async def handle(request: Request, conn: ConnectionSpec) -> Response:
            job = self.exports.job(request.path_params["job"], conn, request.state.client_id)
            if request.method == "DELETE":
                self.exports.cancel(job)
                outcome = operation_outcome("informational", "export cancelled", "information")
                return self._send(conn, orjson.dumps(outcome), 202)
            state, value = await run_in_threadpool(self.exports.poll, job)
            if state == "progress":
                return Response(status_code=202, headers={**REDOX_HEADERS, "X-Progress": value})
            if state == "failed":
                raise _Refused(500, "exception", value)
            base = self.base_url(request, conn)
            manifest = self.exports.manifest(job, lambda f: f"{base}/$export-file/{job.job_id}/{f.path.name}")
            return Response(orjson.dumps(manifest), headers=REDOX_HEADERS, media_type="application/json")

        if request.method not in ("GET", "DELETE"):
            return self._refusal(None, _Refused(405, "not-supported", "poll with GET, cancel with DELETE"))
        return await self._bulk(request, handle)

    async def export_file(self, request: Request) -> Response:
        async def handle(request: Request, conn: ConnectionSpec) -> Response:
            job = self.exports.job(request.path_params["job"], conn, request.state.client_id)
            output = self.exports.output(job, request.path_params["name"])
            if self.state.faults.rate("bad_entry_rate", conn.id) > 0:  # fault hook (sandbox.faults)
                body = self.state.faults.damage_ndjson(
                    conn.id, await run_in_threadpool(output.path.read_bytes)
                )
                return Response(body, headers=REDOX_HEADERS, media_type=NDJSON)
            return FileResponse(output.path, media_type=NDJSON, headers=REDOX_HEADERS)

        if request.method != "GET":
            return self._refusal(None, _Refused(405, "not-supported", "download export files with GET"))
        return await self._bulk(request, handle)

    # --- write-back operations -----------------------------------------------------------------

    async def _written_search(self, request: Request, conn: ConnectionSpec, rtype: str) -> Response | None:
        """``POST ServiceRequest|Appointment/_search`` with ``identifier``: the resources written
        back to this connection (latest write per business id), so a client can find a write
        whose answer it never heard. None: not such a search (the ordinary search answers)."""
        write_entity = WRITTEN_RESOURCE_TYPES.get(rtype)
        if write_entity is None or write_entity not in conn.write_entities or request.method != "POST":
            return None
        if PAGE_TOKEN in request.query_params:
            return None
        params = await _body_params(request)
        wanted = [v for k, v in params if k == "identifier"]
        if not wanted or any(k not in ("identifier", "_count") for k, _ in params):
            return None
        latest: dict[str, dict[str, Any]] = {}
        for w in self.state.writes.to_json()[write_entity]:
            if w["connection_id"] != conn.id or w["surface"] != "fhir":
                continue
            resource = written_resource(w["payload"], rtype, w["event"], w["outcome"], w["reason"])
            if resource is not None and any(identifier_matches(resource, v) for v in wanted):
                latest[w["order_id"]] = resource
        if not latest and write_entity in conn.entities:
            return None  # nothing written with that identifier: the EHR's own records may match
        base = self.base_url(request, conn)
        bundle = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": instant(self.state.store.now)},
            "type": "searchset",
            "total": len(latest),
            "link": [{"relation": "self", "url": f"{base}/{rtype}/_search"}],
            "entry": [
                {"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                for r in latest.values()
            ],
        }
        return self._send(conn, orjson.dumps(bundle))

    async def _operation(self, request: Request, conn: ConnectionSpec, rtype: str, name: str) -> Response:
        op = WRITE_OPERATIONS.get((rtype, name))
        if op is None:
            raise _Refused(
                404, "not-supported", f"operation {rtype}/{name} is not supported by this destination"
            )
        if op.write_entity not in conn.write_entities:
            raise _Refused(403, "forbidden", f"this connection is not entitled to write {op.write_entity}")
        raw = await request.body()
        try:
            bundle = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Refused(400, "structure", "the body is not valid JSON") from None
        try:
            parsed = parse_write(op, bundle)
        except WriteError as exc:
            raise _Refused(400, exc.code, exc.message) from None
        # Redox has no idempotency mechanism: every write received is recorded, duplicates included.
        written = self.state.writes.record(
            kind=op.write_entity,
            order_id=parsed.business_id,
            connection_id=conn.id,
            surface="fhir",
            idempotency_key=request.headers.get("Idempotency-Key"),
            event=parsed.event,
            payload=bundle,
            fingerprint=parsed.fingerprint,
            refusal=self.state.faults.write_refusal(conn.id, op.write_entity, parsed.business_id),
        )
        # The EHR's outcome follows asynchronously through the webhook feed (sandbox.write_acks).
        report_write_outcome(self.state, conn, written)
        if self.state.faults.roll(conn.id, "timeout_after_commit"):
            # Stored, but the client never hears: a blind retry would be a duplicate.
            return await self.state.faults.stall(conn, request)
        ack = response_bundle(op, parsed, conn, self.base_url(request, conn))
        return self._send(conn, orjson.dumps(ack))


# `_elements` marks what it returns as incomplete (FHIR R4 search §3.1.1.5.9).
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "Resource encoded in summary mode",
}
_ALWAYS_KEPT = ("resourceType", "id", "meta")


def subset_elements(resource: dict[str, Any], elements: tuple[str, ...]) -> dict[str, Any]:
    """The resource with only the named top-level elements (plus resourceType, id and meta),
    ``meta.tag`` carrying SUBSETTED."""
    out = {k: v for k, v in resource.items() if k in _ALWAYS_KEPT or k in elements}
    meta = dict(out.get("meta") or {})
    tags = [t for t in meta.get("tag") or [] if t.get("code") != "SUBSETTED"]
    meta["tag"] = [*tags, SUBSETTED]
    out["meta"] = meta
    return out


def _search_must_be_post(rtype: str) -> _Refused:
    return _Refused(
        405,
        "not-supported",
        f"search {rtype} with POST {rtype}/_search and a form-encoded body; GET search is not supported (no PHI in URLs)",
        {"Allow": "POST"},
    )


async def _body_params(request: Request) -> list[tuple[str, str]]:
    """Search parameters from a form-encoded body (Redox's way) or a JSON object body."""
    raw = await request.body()
    if not raw.strip():
        return []
    content_type = request.headers.get("content-type", "").lower()
    if "json" in content_type or raw.lstrip()[:1] == b"{":
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Refused(400, "structure", "the search body is not valid JSON") from None
        if not isinstance(data, dict):
            raise _Refused(400, "structure", "a JSON search body must be an object of parameters")
        params: list[tuple[str, str]] = []
        for name, value in data.items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict | list) or item is None:
                    raise _Refused(400, "structure", f"search parameter '{name}' must be a string or number")
                params.append((name, json.dumps(item) if isinstance(item, bool) else str(item)))
        return params
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise _Refused(400, "structure", "the search body is not UTF-8 form data") from None


def routes(state: SandboxState) -> list[BaseRoute]:
    api = FhirApi(state)
    prefix = "/fhir/R4/{slug}/{environment}"
    return [
        Route(prefix + "/Group/{gid}/$export", api.export_kickoff, methods=_METHODS),
        Route(prefix + "/$export-poll/{job}", api.export_status, methods=_METHODS),
        Route(prefix + "/$export-file/{job}/{name}", api.export_file, methods=_METHODS),
        Route(prefix + "/{rtype}/_search", api.search, methods=_METHODS),
        Route(prefix + "/{rtype}/{rid}", api.instance, methods=_METHODS),
        Route(prefix + "/{rtype}", api.type_level, methods=_METHODS),
    ]
