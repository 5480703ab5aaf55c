"""HTTP layer of the Data Model surface: ``POST /endpoint`` and ``POST /query`` (same handler).

Order of checks, each failure answered with a ``Meta.Errors`` body that still carries
``Meta.Logs`` (REDOX-REFERENCE §2.3, §6):

1. Bearer token (OAuth or legacy) -> 401.
2. Body size -> 413; JSON object with a ``Meta`` object -> 400.
3. ``Meta.DataModel`` and ``Meta.EventType`` present -> 404 ("missing data model/event type");
   ``Meta.Destinations`` non-empty -> 403 ("missing destination"); a query names exactly one
   destination -> 400.
4. Every destination id known -> 404. Then the fault gate (rate limits, injected errors) per
   connection, and from here on every response body goes through ``faults.mangle``.
5. The connection speaks the Data Model -> 403; the data model / event type is one the
   sandbox answers (``queries.QUERIES``) or accepts (``WRITES``) -> 400; the connection is
   entitled to the entity (``conn.entities`` for queries, ``conn.write_entities`` for
   write-back) -> 403.
6. Queries: the request is parsed tolerantly (unknown fields dropped, like Redox), checked for
   the inputs Redox requires (``search_policy``; 400 naming the missing fields) and answered
   synchronously (see ``queries``); the answer then passes ``faults.shape_query``
   (``partial_failure_rate``: 200 with ``Meta.Errors``; ``bad_entry_rate``). Writes: validated strictly against the ``redox`` schema
   (400 naming each problem), recorded in ``state.writes`` once per destination, then
   answered 200 with the echoed ``Meta`` and one ``Logs[]`` entry per destination (async
   SEND semantics: accepted, not yet delivered).
"""

from __future__ import annotations

import hashlib
import itertools
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError
from redox.factory import redox_object_factory
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sandbox.auth import InvalidToken
from sandbox.config import ConnectionSpec
from sandbox.datamodel.blocks import destination_of, dm_datetime, new_log, next_message_id
from sandbox.datamodel.conform import conform, strict_check
from sandbox.datamodel.queries import QUERIES, QueryAnswer, QueryContext, QueryError, clinical_patient_query
from sandbox.http import redox_response
from sandbox.state import SandboxState
from sandbox.write_acks import report_outcome as report_write_outcome

JSON = "application/json; charset=utf-8"
# Write-back events: (DataModel, EventType) -> (write entity, event name in the write log).
WRITES: dict[tuple[str, str], tuple[str, str]] = {
    ("Order", "New"): ("orders", "Order-New"),
    ("Order", "Update"): ("orders", "Order-Update"),
    ("Order", "Cancel"): ("orders", "Order-Cancel"),
    ("Scheduling", "New"): ("appointments", "Scheduling-New"),
    ("Scheduling", "Reschedule"): ("appointments", "Scheduling-Reschedule"),
    ("Scheduling", "Cancel"): ("appointments", "Scheduling-Cancel"),
}
MAX_REPORTED_PROBLEMS = 20
_error_ids = itertools.count(85_164_995)


class DataModelError(Exception):
    """A refused request: HTTP ``status`` and ``Errors[].Text`` lines."""

    def __init__(self, status: int, *texts: str) -> None:
        super().__init__(texts[0] if texts else "")
        self.status = status
        self.texts = texts


def _echo_meta(
    meta: dict[str, Any], now: datetime, conns: list[ConnectionSpec] | None = None
) -> dict[str, Any]:
    """The request's Meta as Redox echoes it, with fresh Logs and the legacy Message id."""
    out: dict[str, Any] = {}
    for key in ("DataModel", "EventType"):
        if isinstance(meta.get(key), str):
            out[key] = meta[key]
    out["EventDateTime"] = (
        meta["EventDateTime"] if isinstance(meta.get("EventDateTime"), str) else dm_datetime(now)
    )
    out["Test"] = meta["Test"] if isinstance(meta.get("Test"), bool) else True
    source = meta.get("Source")
    if isinstance(source, dict) and all(isinstance(source.get(k), str | None) for k in ("ID", "Name")):
        out["Source"] = {k: source[k] for k in ("ID", "Name") if k in source}
    if conns:
        out["Destinations"] = [destination_of(c) for c in conns]
    elif isinstance(meta.get("Destinations"), list):
        out["Destinations"] = [
            {k: d[k] for k in ("ID", "Name") if isinstance(d.get(k), str)}
            for d in meta["Destinations"]
            if isinstance(d, dict)
        ]
    out["Logs"] = [new_log() for _ in conns or [None]]
    out["Message"] = {"ID": next_message_id()}
    out["FacilityCode"] = meta["FacilityCode"] if isinstance(meta.get("FacilityCode"), str) else None
    return out


def _error_body(
    meta: dict[str, Any], now: datetime, texts: tuple[str, ...], conns: list[ConnectionSpec] | None
) -> bytes:
    echoed = _echo_meta(meta, now, conns)
    echoed["Errors"] = [
        {"ID": next(_error_ids), "Text": text, "Type": "request", "Module": "Send"} for text in texts
    ]
    return orjson.dumps({"Meta": echoed})


def _problems(exc: ValidationError) -> list[str]:
    """Validation problems by field path and kind, never by value (values may be PHI)."""
    lines = []
    for err in exc.errors()[:MAX_REPORTED_PROBLEMS]:
        where = ".".join(str(part) for part in err["loc"]) or "payload"
        lines.append(f"{where}: {err['msg']}")
    return lines


def _fingerprint(payload: dict[str, Any]) -> str:
    """Hash of the business content (everything but Meta), stable across key order."""
    content = {k: v for k, v in payload.items() if k != "Meta"}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


class DataModelEndpoint:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    def _now(self) -> datetime:
        return self.state.store.now

    def _respond(self, payload: dict[str, Any] | bytes, status: int, conns: list[ConnectionSpec]) -> Response:
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        for conn in conns:
            body = self.state.faults.mangle(conn.id, body)
        return redox_response(body, status, JSON)

    async def __call__(self, request: Request) -> Response:
        meta: dict[str, Any] = {}
        conns: list[ConnectionSpec] = []
        try:
            try:
                self.state.auth.check_bearer(request.headers.get("authorization"), "datamodel")
            except InvalidToken as exc:
                raise DataModelError(401, f"Unauthorized: {exc.reason}") from None
            payload, meta = await self._read(request)
            data_model, event_type = self._route_key(meta)
            conns = self._resolve(meta, (data_model, event_type) in QUERIES)
            for conn in conns:
                refused = await self.state.faults.gate(conn, request)
                if refused is not None:
                    return refused
            return await self._dispatch(request, payload, meta, data_model, event_type, conns)
        except (DataModelError, QueryError) as exc:
            texts = exc.texts if isinstance(exc, DataModelError) else (exc.text,)
            return self._respond(_error_body(meta, self._now(), texts, conns or None), exc.status, conns)

    async def _read(self, request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        raw = await request.body()
        if len(raw) > self.state.config.max_payload_bytes:
            raise DataModelError(
                413, f"Payload too large: the limit is {self.state.config.max_payload_bytes} bytes"
            )
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise DataModelError(400, "Request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise DataModelError(400, "Request body must be a JSON object with a Meta object")
        meta = payload.get("Meta")
        if not isinstance(meta, dict):
            raise DataModelError(400, "Meta is required and must be an object")
        return payload, meta

    @staticmethod
    def _route_key(meta: dict[str, Any]) -> tuple[str, str]:
        data_model, event_type = meta.get("DataModel"), meta.get("EventType")
        if (
            not isinstance(data_model, str)
            or not data_model
            or not isinstance(event_type, str)
            or not event_type
        ):
            raise DataModelError(404, "Meta.DataModel and Meta.EventType are required")
        return data_model, event_type

    def _resolve(self, meta: dict[str, Any], is_query: bool) -> list[ConnectionSpec]:
        destinations = meta.get("Destinations")
        if not isinstance(destinations, list) or not destinations:
            raise DataModelError(403, "Meta.Destinations must name at least one destination")
        if is_query and len(destinations) != 1:
            raise DataModelError(400, "A query must name exactly one destination in Meta.Destinations")
        conns: list[ConnectionSpec] = []
        for dest in destinations:
            dest_id = dest.get("ID") if isinstance(dest, dict) else None
            if not isinstance(dest_id, str) or not dest_id:
                raise DataModelError(403, "Every Meta.Destinations entry needs an ID")
            conn = self.state.connection_by_destination(dest_id)
            if conn is None:
                raise DataModelError(404, f"Destination '{dest_id}' was not found in this environment")
            if conn not in conns:
                conns.append(conn)
        return conns

    async def _dispatch(
        self,
        request: Request,
        payload: dict[str, Any],
        meta: dict[str, Any],
        data_model: str,
        event_type: str,
        conns: list[ConnectionSpec],
    ) -> Response:
        for conn in conns:
            if "datamodel" not in conn.surfaces:
                raise DataModelError(
                    403, f"Destination '{conn.destination_id}' does not accept Data Model traffic"
                )
        key = (data_model, event_type)
        if key in QUERIES:
            return await self._query(payload, meta, key, conns[0])
        if key in WRITES:
            return await self._write(request, payload, meta, key, conns)
        raise DataModelError(400, f"{data_model}.{event_type} is not supported by this destination")

    async def _query(
        self, payload: dict[str, Any], meta: dict[str, Any], key: tuple[str, str], conn: ConnectionSpec
    ) -> Response:
        spec = QUERIES[key]
        if spec.entity not in conn.entities and not (
            spec.write_entity is not None and spec.write_entity in conn.write_entities
        ):
            raise DataModelError(403, f"This destination does not share {spec.entity} ({key[0]}.{key[1]})")
        request_copy = dict(payload)
        request_copy["Meta"] = {k: v for k, v in meta.items() if k not in ("Message", "Transmission")}
        try:
            redox_object_factory(request_copy, lenient=True)
        except ValidationError as exc:
            raise DataModelError(400, *_problems(exc)) from None
        ctx = QueryContext(
            self.state.store, conn, payload, policy=self.state.config.search_policy, writes=self.state.writes
        )
        response_meta = _echo_meta(meta, self._now(), [conn])
        response_meta["EventType"] = spec.response_event

        def answer() -> dict[str, Any]:
            if spec.answer is None:
                return clinical_patient_query(ctx, response_meta)
            result: QueryAnswer = spec.answer(ctx)
            response_meta["IsIncomplete"] = result.incomplete
            return conform({"Meta": response_meta, **result.body})

        # Partial failures and defective records are applied to the finished answer, after
        # conform, so they reach the client exactly as a misbehaving EHR would send them.
        body = self.state.faults.shape_query(conn.id, await run_in_threadpool(answer))
        return self._respond(body, 200, [conn])

    async def _write(
        self,
        request: Request,
        payload: dict[str, Any],
        meta: dict[str, Any],
        key: tuple[str, str],
        conns: list[ConnectionSpec],
    ) -> Response:
        entity, event = WRITES[key]
        for conn in conns:
            if entity not in conn.write_entities:
                raise DataModelError(
                    403, f"Destination '{conn.destination_id}' does not accept {entity} write-back"
                )
        try:
            strict_check(payload)
        except ValidationError as exc:
            raise DataModelError(400, *_problems(exc)) from None
        business_id = str(payload["Order"]["ID"] if entity == "orders" else payload["Visit"]["VisitNumber"])
        fingerprint = _fingerprint(payload)
        for conn in conns:
            written = self.state.writes.record(
                entity,
                order_id=business_id,
                connection_id=conn.id,
                surface="datamodel",
                idempotency_key=request.headers.get("Idempotency-Key"),
                event=event,
                payload=payload,
                fingerprint=fingerprint,
                refusal=self.state.faults.write_refusal(conn.id, entity, business_id),
            )
            # The EHR's outcome follows asynchronously through the webhook feed (sandbox.write_acks).
            report_write_outcome(self.state, conn, written)
        for conn in conns:
            # The write is stored; the client may still never hear so (REDOX-REFERENCE §6).
            if self.state.faults.roll(conn.id, "timeout_after_commit"):
                return await self.state.faults.stall(conn, request)
        return self._respond({"Meta": _echo_meta(meta, self._now(), conns)}, 200, conns)


def routes(state: SandboxState) -> list[BaseRoute]:
    endpoint = DataModelEndpoint(state)

    async def handle(request: Request) -> Response:
        return await endpoint(request)

    return [
        Route("/endpoint", handle, methods=["POST"]),
        Route("/query", handle, methods=["POST"]),
    ]
