"""Stored webhook messages → the common model, the patient panel and ``ops.events``.

Called by the sync runner under the warehouse's writer lock (and by ``redox-elt webhook
replay``). Each message is handled like a fetched page, through the project's one
page-to-rows path:

1. It is landed (``pipelines.landing``) under its connection and surface — a Data Model
   event as received (BOM stripped), a detailed FHIR notification as its Bundle without the
   MessageHeader entry — so ``redox-elt renormalize`` rebuilds the same rows from the landing.
2. ``PageRouter.take_page`` reads it (``payload_rows`` / ``bundle_rows``) into the staged
   ``raw.<surface>_<entity>`` tables with a dlt pipeline, then the connection is published.
3. Every patient the message names enters the panel due now (``panel.record_event``). A
   lightweight FHIR notification (references and identifiers only) does only this: the
   refresh pulls the records.
4. Every ADT and scheduling event is a row of ``ops.events`` (event type and time, visit or
   appointment number, patient identifier, received and processed times).

State follows event time, not arrival order (Redox sometimes processes events in parallel):
a staged row's version time (``source_updated_at``) is the event's ``EventDateTime``, rows
older than the staged version of the same record are dropped before loading, and within one
load dlt keeps the latest version. So a late Arrival never reopens a discharged visit and a
late Reschedule never overrides a Cancel.

A message that cannot be processed (unparseable, unknown model, no configured connection, a
page the normalizer refuses) is marked with its reason in the inbox and, when its connection
is known, written to ``raw.quarantine``; the batch goes on. Re-processing is idempotent: a
message keeps its landed page (``raw_ref``), and staged rows merge on their keys.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dlt
import duckdb
import orjson

from pipelines import panel
from pipelines.batches import PageRouter
from pipelines.inbox.envelope import (
    FAMILY_DATAMODEL,
    FAMILY_FHIR,
    Envelope,
    message_header,
    parse_body,
    strip_bom,
)
from pipelines.inbox.receiver import settings_resolver
from pipelines.inbox.store import StoredMessage, connect, inbox_path
from pipelines.landing import RawLanding
from pipelines.page_reader import PageUnreadable, read_page
from pipelines.publish import publish_connection
from pipelines.resource_hints import staged_resource_hints
from pipelines.sync_context import pipeline_name
from pipelines.vocabulary import (
    ENTITIES,
    FHIR_RESOURCE_ENTITIES,
    OPS_SCHEMA,
    STAGING_SCHEMA,
    is_plain_connection_id,
    staged_table_name,
)
from pipelines.warehouse import WarehousePaths, table_exists
from pipelines.writeback.inbox_acks import settle_pushed_outcomes

log = logging.getLogger(__name__)

EVENTS_TABLE = "events"
EVENTS_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {OPS_SCHEMA};
CREATE TABLE IF NOT EXISTS {OPS_SCHEMA}.{EVENTS_TABLE} (
    message_key VARCHAR NOT NULL,
    connection_id VARCHAR NOT NULL,
    family VARCHAR NOT NULL,
    data_model VARCHAR,
    event_type VARCHAR NOT NULL,
    event_at TIMESTAMPTZ,
    visit_number VARCHAR,
    patient_id_system VARCHAR,
    patient_id_value VARCHAR,
    received_at TIMESTAMPTZ NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (connection_id, message_key)
);
"""
# Data models (and FHIR event prefixes) whose events are ADT or scheduling events.
EVENT_MODELS = frozenset({"PatientAdmin", "Scheduling", "SurgicalScheduling", "Surgical Scheduling"})
EVENT_PREFIXES = ("PatientAdmin", "Scheduling", "Appointment", "Encounter")
# The landing folder (entity) of a Data Model event.
DATAMODEL_ENTITY = {
    "PatientAdmin": "encounters",
    "Scheduling": "appointments",
    "Surgical Scheduling": "appointments",
    "Results": "results",
    "Flowsheet": "results",
    "Medications": "medications",
    "Order": "medications",
    "Notes": "documents",
    "Media": "documents",
}
REPLAY_MAIN = "patients"
BATCH = 500


@dataclass
class _Prepared:
    message: StoredMessage
    connection_id: str | None
    surface: str | None
    entity: str
    page: bytes | None  # what is landed and read (None: nothing to load)
    event_at: datetime | None
    patients: list[tuple[str, str]] = field(default_factory=list)  # (system or type, value)
    visit_number: str | None = None
    reason: str | None = None


@dataclass
class ProcessStats:
    processed: int = 0
    quarantined: int = 0
    events: int = 0
    panel_new: int = 0
    stale_rows_dropped: int = 0
    connections: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "quarantined": self.quarantined,
            "events": self.events,
            "panel_new": self.panel_new,
            "stale_rows_dropped": self.stale_rows_dropped,
            "connections": sorted(self.connections),
        }


def _ts(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _envelope(m: StoredMessage) -> Envelope:
    return Envelope(
        m.dedupe_key, "", m.family, m.data_model, m.event_type, m.event_at, m.source_name, m.source_ref,
        m.quarantine_reason,
    )  # fmt: skip


def _datamodel_patients(payload: dict[str, Any]) -> list[tuple[str, str]]:
    patient = payload.get("Patient")
    out = []
    for ident in (patient.get("Identifiers") or []) if isinstance(patient, dict) else []:
        if (
            (
                isinstance(ident, dict)
                and isinstance(ident.get("ID"), str)
                and isinstance(ident.get("IDType"), str)
            )
            and ident["ID"]
            and ident["IDType"]
        ):
            out.append((ident["IDType"], ident["ID"]))
    return out


def _identifier_from_url(url: str) -> tuple[str, str] | None:
    """``…/Patient?identifier=system|value`` or ``value|system`` → (system, value)."""
    from urllib.parse import unquote

    if "/Patient?identifier=" not in url:
        return None
    token = unquote(url.split("?identifier=", 1)[1].split("&", 1)[0])
    if "|" not in token:
        return None
    left, right = token.split("|", 1)
    # A system is a URI (urn:…, http…); whichever side looks like one is the system.
    if ":" in left and ":" not in right:
        return left, right
    if ":" in right and ":" not in left:
        return right, left
    return (left, right) if left.startswith(("urn:", "http")) else (right, left)


def _fhir_patients(bundle: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for entry in bundle.get("entry") or []:
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource") if isinstance(entry.get("resource"), dict) else {}
        if resource.get("resourceType") != "Patient":
            continue
        for ident in resource.get("identifier") or []:
            if isinstance(ident, dict) and ident.get("system") and ident.get("value"):
                out.append((str(ident["system"]), str(ident["value"])))
        from_url = _identifier_from_url(str(entry.get("fullUrl") or ""))
        if from_url and from_url not in out:
            out.append(from_url)
    return out


def _prepare(m: StoredMessage, connection_id: str | None) -> _Prepared:
    event_at = _ts(m.event_at)
    prepared = _Prepared(m, connection_id, None, "patients", None, event_at)
    if m.quarantine_reason:
        prepared.reason = m.quarantine_reason
        return prepared
    if connection_id is None or not is_plain_connection_id(connection_id):
        prepared.reason = "no configured connection matches the message's source"
        return prepared
    try:
        payload = parse_body(m.body)
    except ValueError:
        prepared.reason = "body is not valid JSON"
        return prepared
    if m.family == FAMILY_DATAMODEL:
        prepared.surface = "datamodel"
        prepared.entity = DATAMODEL_ENTITY.get(m.data_model or "", "patients")
        prepared.page = strip_bom(m.body)
        prepared.patients = _datamodel_patients(payload)
        visit = payload.get("Visit") if isinstance(payload.get("Visit"), dict) else {}
        prepared.visit_number = (
            visit.get("VisitNumber") if isinstance(visit.get("VisitNumber"), str) else None
        )
        return prepared
    if m.family == FAMILY_FHIR:
        prepared.surface = "fhir"
        header = message_header(payload) or {}
        prepared.patients = _fhir_patients(payload)
        resources = [
            e
            for e in (payload.get("entry") or [])[1:]
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        ]
        focus = next(
            (
                e["resource"]["resourceType"]
                for e in resources
                if e["resource"].get("resourceType") != "Patient"
            ),
            "Patient",
        )
        prepared.entity = FHIR_RESOURCE_ENTITIES.get(focus, "patients")
        detailed = str(header.get("definition") or "").endswith("Full")
        if detailed:
            page = {"resourceType": "Bundle", "type": "collection", "entry": resources}
            if payload.get("id"):
                page["id"] = payload["id"]
            prepared.page = orjson.dumps(page)
        for e in resources:
            for ident in e["resource"].get("identifier") or [] if focus == "Encounter" else []:
                if isinstance(ident, dict) and str(ident.get("system", "")).endswith(":VN"):
                    prepared.visit_number = ident.get("value")
        return prepared
    prepared.reason = m.quarantine_reason or "neither a Data Model payload nor a FHIR notification"
    return prepared


def _staged_versions(
    con: duckdb.DuckDBPyConnection, connection_id: str, surface: str
) -> dict[tuple[str, str], Any]:
    """(entity, key) → the staged record's version time, for the stale-row check."""
    from pipelines.resource_hints import staged_key

    out: dict[tuple[str, str], Any] = {}
    for entity in ENTITIES:
        table = staged_table_name(surface, entity)
        if not table_exists(con, STAGING_SCHEMA, table):
            continue
        key = staged_key(entity)[1]
        for k, version in con.execute(
            f"SELECT {key}, max(source_updated_at) FROM {STAGING_SCHEMA}.{table} WHERE connection_id = ? GROUP BY 1",
            [connection_id],
        ).fetchall():
            out[(entity, str(k))] = version
    return out


class _LatestOnly:
    """Drops rows older than the staged (or already routed) version of the same record."""

    def __init__(self, versions: dict[tuple[str, str], Any]) -> None:
        self.versions = versions
        self.dropped = 0

    def filter(self, page: Any) -> None:
        from pipelines.resource_hints import staged_key

        for entity in ENTITIES:
            rows = page.rows.get(entity) or []
            key_col = staged_key(entity)[1]
            kept = []
            for row in rows:
                key = (entity, str(row.get(key_col)))
                version, known = row.get("source_updated_at"), self.versions.get(key)
                if known is not None and version is not None and _aware(version) < _aware(known):
                    self.dropped += 1
                    continue
                if version is not None and (known is None or _aware(version) >= _aware(known)):
                    self.versions[key] = version
                kept.append(row)
            page.rows[entity] = kept


def _aware(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return _ts(str(value)) or datetime.min.replace(tzinfo=UTC)


def _route(router: PageRouter, items: list[tuple[_Prepared, str]], latest: _LatestOnly) -> Iterator[Any]:
    for prepared, raw_ref in items:
        if prepared.page is None:  # content the receiver already found unprocessable
            router.quarantine_page(
                raw_ref, prepared.entity, prepared.reason or "unprocessable pushed message"
            )
            continue
        try:
            page = read_page(
                prepared.surface or "", prepared.page or b"", router.connection_id, raw_ref, prepared.entity
            )
        except PageUnreadable as exc:
            router.quarantine_page(raw_ref, prepared.entity, f"pushed message unreadable: {exc}")
            prepared.reason = f"pushed message unreadable: {exc}"
            continue
        latest.filter(page)
        router.take(page, raw_ref)
        yield from router.drain(final=False)
    yield from router.drain(final=True)


def _load(
    paths: WarehousePaths,
    connection_id: str,
    by_surface: dict[str, list[tuple[_Prepared, str]]],
    stats: ProcessStats,
) -> None:
    landing = RawLanding(paths.landing_root)
    with duckdb.connect(str(paths.duckdb)) as con:
        versions = {s: _staged_versions(con, connection_id, s) for s in by_surface}
    resources = []
    filters = []
    for surface, items in by_surface.items():
        # Event-time order inside the load: the latest version of a record wins.
        items.sort(key=lambda it: it[0].event_at or datetime.min.replace(tzinfo=UTC))
        router = PageRouter(
            connection_id, surface, landing=landing, main=staged_table_name(surface, REPLAY_MAIN)
        )
        latest = _LatestOnly(versions[surface])
        filters.append(latest)
        resources.append(
            dlt.resource(
                _route(router, items, latest),
                name=f"{surface}_inbox",
                **staged_resource_hints(surface, REPLAY_MAIN),
            )
        )
    pipeline = dlt.pipeline(
        pipeline_name=pipeline_name(connection_id) + "_inbox",
        destination=dlt.destinations.duckdb(str(paths.duckdb)),
        dataset_name=STAGING_SCHEMA,
        pipelines_dir=str(paths.dlt_dir),
    )
    pipeline.run(resources)
    stats.stale_rows_dropped += sum(f.dropped for f in filters)


# The identifier a patient enters the panel by: the MR (what a pull searches by), else the
# first one named. One per patient: each identifier would otherwise be a panel row of its own.
PANEL_PREFERENCE = ("MR", "EHRID", "EPI")


def _panel_identifier(patients: list[tuple[str, str]]) -> tuple[str, str] | None:
    for wanted in PANEL_PREFERENCE:
        for system, value in patients:
            if panel.canonical_system(system) == wanted:
                return system, value
    return patients[0] if patients else None


def _is_event(p: _Prepared) -> bool:
    m = p.message
    if m.family == FAMILY_DATAMODEL:
        return (m.data_model or "") in EVENT_MODELS
    return bool(m.event_type) and m.event_type.startswith(EVENT_PREFIXES)


def _record(con: duckdb.DuckDBPyConnection, prepared: list[_Prepared], stats: ProcessStats) -> None:
    con.execute(EVENTS_DDL)
    panel.create_tables(con)
    now = datetime.now(UTC)
    for p in prepared:
        if p.connection_id is None or p.reason is not None:
            continue
        chosen = _panel_identifier(p.patients)
        if chosen is not None:
            stats.panel_new += bool(
                panel.record_event(con, p.connection_id, chosen[0], chosen[1], event_at=p.event_at)
            )
        if _is_event(p):
            system, value = chosen or (None, None)
            con.execute(
                f"INSERT OR REPLACE INTO {OPS_SCHEMA}.{EVENTS_TABLE} VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [
                    p.message.dedupe_key,
                    p.connection_id,
                    p.message.family,
                    p.message.data_model,
                    p.message.event_type or "",
                    p.event_at,
                    p.visit_number,
                    system,
                    value,
                    _ts(p.message.received_at),
                    now,
                ],
            )
            stats.events += 1


def _mark(inbox: sqlite3.Connection, prepared: list[_Prepared], refs: dict[int, str]) -> None:
    now = datetime.now(UTC).isoformat()
    inbox.execute("BEGIN IMMEDIATE")
    try:
        inbox.executemany(
            "UPDATE messages SET processed_at = ?, process_attempts = process_attempts + 1, "
            "connection_id = coalesce(?, connection_id), quarantine_reason = ?, "
            "raw_ref = coalesce(?, raw_ref) WHERE seq = ?",
            [(now, p.connection_id, p.reason, refs.get(p.message.seq), p.message.seq) for p in prepared],
        )
        inbox.execute("COMMIT")
    except BaseException:
        inbox.execute("ROLLBACK")
        raise


def _select(
    inbox: sqlite3.Connection, since: datetime | None, after: int, connection_ids: Sequence[str] | None
) -> list[tuple[StoredMessage, str | None]]:
    cols = (
        "seq, dedupe_key, family, data_model, event_type, event_at, connection_id, source_name, "
        "source_ref, received_at, body, quarantine_reason"
    )
    where = "received_at >= ?" if since is not None else "processed_at IS NULL"
    args: list[Any] = [since.astimezone(UTC).isoformat()] if since is not None else []
    rows = inbox.execute(
        f"SELECT {cols}, raw_ref FROM messages WHERE {where} AND seq > ? ORDER BY seq LIMIT ?",
        [*args, after, BATCH],
    ).fetchall()
    return [(StoredMessage(*r[:-1]), r[-1]) for r in rows]


def process_inbox(
    paths: WarehousePaths,
    settings: Any,
    connection_ids: Sequence[str] | None = None,
    *,
    since: datetime | None = None,
) -> dict[str, Any]:
    """Process pending inbox messages (or, with ``since``, every message received since then
    again) of the selected connections. The caller holds the warehouse's writer lock."""
    stats = ProcessStats()
    path = inbox_path(paths)
    if not path.exists():
        return stats.to_json()
    resolve = settings_resolver(settings)
    landing = RawLanding(paths.landing_root)
    inbox = connect(path, create=True)
    try:
        after = 0
        while True:
            batch = _select(inbox, since, after, None)
            if not batch:
                break
            after = batch[-1][0].seq
            prepared: list[_Prepared] = []
            old_refs: dict[int, str | None] = {}
            for message, raw_ref in batch:
                conn_id = message.connection_id or resolve(_envelope(message))
                if connection_ids and conn_id not in connection_ids:
                    continue
                prepared.append(_prepare(message, conn_id))
                old_refs[message.seq] = raw_ref
            # Write-back outcomes settle their outbox rows; an order's has nothing else to load.
            consumed = settle_pushed_outcomes(
                paths.duckdb,
                [
                    (p.connection_id, p.message.family, p.message.body) if p.reason is None else None
                    for p in prepared
                ],
            )
            for p, is_order_outcome in zip(prepared, consumed, strict=True):
                if is_order_outcome:
                    p.page = None
            refs: dict[int, str] = {}
            grouped: dict[str, dict[str, list[tuple[_Prepared, str]]]] = defaultdict(
                lambda: defaultdict(list)
            )
            for p in prepared:
                surface = p.surface or {FAMILY_DATAMODEL: "datamodel", FAMILY_FHIR: "fhir"}.get(
                    p.message.family
                )
                if (
                    p.reason is not None
                    and p.connection_id
                    and is_plain_connection_id(p.connection_id)
                    and surface
                ):
                    # Known connection, unprocessable content: into raw.quarantine with the reason.
                    p.page = None
                    grouped[p.connection_id][surface].append((p, f"inbox/{p.message.seq}"))
                    continue
                if p.reason is None and p.page is not None and p.surface and p.connection_id:
                    ref = old_refs.get(p.message.seq)
                    if not ref or not (paths.landing_root / ref).exists():
                        ref = landing.land(p.connection_id, p.surface, p.entity, p.page).raw_ref
                    refs[p.message.seq] = ref
                    grouped[p.connection_id][p.surface].append((p, ref))
            for connection_id, by_surface in grouped.items():
                _load(paths, connection_id, by_surface, stats)
            touched = {p.connection_id for p in prepared if p.connection_id and p.reason is None}
            with duckdb.connect(str(paths.duckdb)) as con:
                for connection_id in sorted(grouped):
                    publish_connection(con, connection_id)
                _record(con, prepared, stats)
            _mark(inbox, prepared, refs)
            stats.processed += len(prepared)
            stats.quarantined += sum(p.reason is not None for p in prepared)
            stats.connections |= touched
    finally:
        inbox.close()
    return stats.to_json()
