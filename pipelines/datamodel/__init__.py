"""dlt source for Redox's Data Model API (``POST /endpoint``).

The Data Model has no "list everything" query, so a connection is enumerated through
the windowed queries Redox offers (see ``pipelines/datamodel/queries.py``):

* ``encounters`` — PatientAdmin.VisitQuery from a ``VisitStartDateTime``; the visits'
  Patient blocks give ``patients``.
* ``results`` — Results.Query by ``LastUpdated`` window.
* ``appointments`` — Scheduling.Booked by start-time window.
* ``medications`` and ``documents`` — per patient discovered by the visit query, plus
  every patient an earlier sync found: Clinical Summary PatientQuery (medication
  section) and Notes/Media queries. Neither has a time window, so this is the costly
  part of an incremental Data Model sync until webhook events replace it.
  On a connection that also speaks FHIR, medications and documents come from FHIR
  only: the Clinical Summary carries no medication order ids to reconcile on, and
  asking per patient for documents FHIR already pages in bulk doubles the cost of a
  sync for rows that reconcile into the same ones.
* A clinical-network connection (no visit query) is asked, per enterprise id the
  warehouse already knows, for the patient (PatientSearch) and its documents
  (DocumentQuery + DocumentGet).

A response holding ``page_size`` items may be capped: the window start moves to the
last item's time and items already seen are dropped. Every response body is landed
as received. Cursors live in dlt resource state (stored in the destination); a
backfill window never writes them. The Data Model carries no last-updated time for
visits and documents, so between full syncs their updates arrive through webhooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import dlt
import pyarrow as pa

from pipelines.batches import EntityBatcher
from pipelines.datamodel.normalize import normalize_datamodel
from pipelines.landing import RawLanding
from pipelines.model import ENTITIES
from pipelines.normalize_common import NormalizationError
from pipelines.resource_hints import staged_resource_hints, staged_table_name
from pipelines.sync_context import SyncWindow

EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
PATIENT_BATCH = 10  # patients per Notes/Media query; halved when a response may be capped
WORKERS = 8


class _Emitter:
    """Normalizes landed responses into per-entity batchers and routes their tables."""

    def __init__(self, client: Any, landing: RawLanding, connection_id: str, entities: Iterable[str]) -> None:
        self.client = client
        self.landing = landing
        self.connection_id = connection_id
        self.batchers = {
            e: EntityBatcher(e, connection_id, "datamodel", landing=landing)
            for e in ENTITIES
            if e in set(entities)
        }

    def query(self, entity: str, payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Send a query and land the answer; -> (parsed body, raw_ref)."""
        raw, body = self.client.datamodel_raw(payload, entity=entity)
        return body, self.landing.land(self.connection_id, "datamodel", entity, raw).raw_ref

    def take(
        self,
        body: dict[str, Any],
        raw_ref: str,
        *,
        only: set[str] | None = None,
        event_type: str | None = None,
    ) -> None:
        try:
            out = normalize_datamodel(body, self.connection_id, raw_ref, event_type=event_type)
        except NormalizationError as exc:
            first = next(iter(self.batchers.values()))
            first.quarantine(raw_ref, None, str(exc))
            return
        for entity, rows in out.rows.items():
            if entity in self.batchers and (only is None or entity in only):
                for row in rows:
                    self.batchers[entity].add_row(row)

    def drain(self, main: str, final: bool) -> Iterator[Any]:
        for entity, batcher in self.batchers.items():
            for item in batcher.drain(final=final):
                if entity == main or not isinstance(item, pa.Table):
                    yield item
                else:
                    yield dlt.mark.with_hints(item, _variant_hints(entity), create_table_variant=True)


def _variant_hints(entity: str) -> Any:
    hints = staged_resource_hints("datamodel", entity)
    return dlt.mark.make_hints(
        table_name=staged_table_name("datamodel", entity),
        write_disposition="merge",
        primary_key=hints["primary_key"],
        columns=hints["columns"],
    )


def _meta(model: str, event: str) -> dict[str, Any]:
    # No EventDateTime: the response's is then the server's clock, which rows use as their
    # version time — comparable with the records' own last-updated times.
    return {"Meta": {"DataModel": model, "EventType": event}}


def _server_time(body: dict[str, Any]) -> datetime | None:
    return _parse((body.get("Meta") or {}).get("EventDateTime"))


def _dm_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _walk_window(
    emitter: _Emitter,
    entity: str,
    build: Callable[[datetime], dict[str, Any]],
    items_of: Callable[[dict[str, Any]], list[dict[str, Any]]],
    key_of: Callable[[dict[str, Any]], str],
    time_of: Callable[[dict[str, Any]], datetime | None],
    start: datetime,
    page_size: int,
    end: datetime | None = None,
) -> Iterator[tuple[dict[str, Any], str, datetime]]:
    """Enumerate a window through a capped query: move the start to the last item's time
    and drop the items already seen, until a response is not full. Yields (body, raw_ref,
    latest item time)."""
    seen: set[str] = set()
    cursor = start
    while True:
        body, raw_ref = emitter.query(entity, build(cursor))
        items = items_of(body)
        fresh = [i for i in items if key_of(i) not in seen]
        seen.update(key_of(i) for i in items)
        times = [t for t in (time_of(i) for i in items) if t is not None]
        yield body, raw_ref, max(times) if times else cursor
        full = len(items) >= page_size or bool((body.get("Meta") or {}).get("IsIncomplete"))
        if not full or not fresh or not times:
            return
        nxt = max(times)
        if end is not None and nxt >= end:
            return
        cursor = nxt


@dlt.source(name="datamodel", max_table_nesting=0)
def datamodel_source(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    entities: tuple[str, ...] = ENTITIES,
    window: SyncWindow | None = None,
    lookback_s: float = 3600.0,
    page_size: int = 100,
    also_fhir: bool = False,
    known_enterprise_ids: tuple[str, ...] = (),
    known_patients: tuple[tuple[str, str], ...] = (),
) -> Any:
    """The Data Model surface of one connection."""
    window = window or SyncWindow()
    wanted = set(entities)
    lookback = timedelta(seconds=lookback_s)

    def start_from(state_key: str) -> datetime:
        if window.is_backfill:
            return window.start or EARLIEST
        last = _parse(dlt.current.resource_state().get(state_key))
        return (last - lookback) if last else EARLIEST

    def remember(state_key: str, value: datetime | None) -> None:
        if value is not None and not window.is_backfill:
            state = dlt.current.resource_state()
            old = _parse(state.get(state_key))
            if old is None or value > old:
                state[state_key] = value.isoformat()

    def encounters() -> Iterator[Any]:
        emitter = _Emitter(
            client, landing, connection_id, wanted & {"patients", "encounters", "medications", "documents"}
        )
        synced_at = None
        discovered: dict[str, dict[str, str]] = {}
        for body, raw_ref, _last in _walk_window(
            emitter,
            "encounters",
            lambda s: {**_meta("PatientAdmin", "VisitQuery"), "VisitStartDateTime": _dm_time(s)},
            lambda b: [v for p in b.get("Patients") or [] for v in p.get("Visits") or []],
            lambda v: str(v.get("VisitNumber")),
            lambda v: _parse(v.get("VisitDateTime")),
            start_from("visit_start"),
            page_size,
            window.end,
        ):
            synced_at = synced_at or _server_time(body)
            emitter.take(body, raw_ref, only={"patients", "encounters"}, event_type="VisitQueryResponse")
            for p in body.get("Patients") or []:
                ident = _mr_identifier(p.get("Identifiers") or [])
                if ident:
                    discovered[ident["ID"]] = ident
            yield from emitter.drain("encounters", final=False)
        # Visits have no last-updated filter: the next run asks from this run's server time
        # (less the lookback), which every visit created since then starts after.
        remember("visit_start", synced_at)
        # Medications have no windowed Data Model query: every patient already known is asked
        # again, so a medication added to a patient without a new visit is still found.
        for id_type, id_value in known_patients:
            discovered.setdefault(id_value, {"ID": id_value, "IDType": id_type})
        yield from _per_patient(emitter, sorted(discovered.values(), key=lambda i: i["ID"]))
        yield from emitter.drain("encounters", final=True)

    def _per_patient(emitter: _Emitter, patients: list[dict[str, str]]) -> Iterator[Any]:
        """Medications (Clinical Summary) and documents (Notes/Media) for the patients seen."""
        if "medications" in wanted and not also_fhir:

            def summary(ident: dict[str, str]) -> tuple[dict[str, Any], str]:
                raw, body = client.datamodel_raw(
                    {**_meta("Clinical Summary", "PatientQuery"), "Patient": {"Identifiers": [ident]}},
                    entity="documents",
                )
                return body, landing.land(connection_id, "datamodel", "medications", raw).raw_ref

            with ThreadPoolExecutor(WORKERS) as pool:
                for body, ref in pool.map(summary, patients):
                    emitter.take(body, ref, only={"medications"}, event_type="PatientQueryResponse")
                    yield from emitter.drain("encounters", final=False)
        if "documents" in wanted and not also_fhir:
            batches = [patients[i : i + PATIENT_BATCH] for i in range(0, len(patients), PATIENT_BATCH)]

            def notes_and_media(batch: list[dict[str, str]]) -> list[tuple[dict[str, Any], str]]:
                out = []
                for model in ("Notes", "Media"):
                    out.extend(_documents_for(client, landing, connection_id, model, batch, page_size))
                return out

            with ThreadPoolExecutor(WORKERS) as pool:
                for results in pool.map(notes_and_media, batches):
                    for body, ref in results:
                        emitter.take(body, ref, only={"documents", "patients"}, event_type="QueryResponse")
                    yield from emitter.drain("encounters", final=False)

    def results() -> Iterator[Any]:
        emitter = _Emitter(client, landing, connection_id, wanted & {"patients", "results"})
        last = None

        def build(s: datetime) -> dict[str, Any]:
            span: dict[str, Any] = {"StartDateTime": _dm_time(s)}
            if window.end is not None:
                span["EndDateTime"] = _dm_time(window.end)
            return {**_meta("Results", "Query"), "LastUpdated": span}

        for body, raw_ref, last in _walk_window(  # noqa: B007 - last is the cursor after the loop
            emitter,
            "results",
            build,
            lambda b: b.get("Orders") or [],
            lambda o: f"{o.get('ID')}|{o.get('LastUpdated')}",
            lambda o: _parse(o.get("LastUpdated")),
            start_from("results_updated"),
            page_size,
        ):
            emitter.take(body, raw_ref, event_type="QueryResponse")
            yield from emitter.drain("results", final=False)
        remember("results_updated", last)
        yield from emitter.drain("results", final=True)

    def appointments() -> Iterator[Any]:
        emitter = _Emitter(client, landing, connection_id, wanted & {"patients", "appointments"})
        synced_at = None
        far = window.end or (datetime.now(UTC) + timedelta(days=3650))
        for body, raw_ref, _last in _walk_window(
            emitter,
            "appointments",
            lambda s: {
                **_meta("Scheduling", "Booked"),
                "StartDateTime": _dm_time(s),
                "EndDateTime": _dm_time(far),
            },
            lambda b: b.get("Visits") or [],
            lambda v: str(v.get("VisitNumber")),
            lambda v: _parse(v.get("VisitDateTime")),
            start_from("appointment_start"),
            page_size,
            window.end,
        ):
            synced_at = synced_at or _server_time(body)
            emitter.take(body, raw_ref, event_type="BookedResponse")
            yield from emitter.drain("appointments", final=False)
        # Appointments are booked into the future: a max-start cursor would skip a new booking
        # that starts before the latest one already seen, so the cursor is the server time.
        remember("appointment_start", synced_at)
        yield from emitter.drain("appointments", final=True)

    def network_documents() -> Iterator[Any]:
        emitter = _Emitter(client, landing, connection_id, wanted & {"patients", "documents"})

        def one(epi: str) -> list[tuple[str, dict[str, Any]]]:
            """The patient and its documents (metadata from DocumentQuery, content from DocumentGet)."""
            ident = {"ID": epi, "IDType": "EPI"}
            found = client.datamodel_raw(
                {**_meta("PatientSearch", "Query"), "Patient": {"Identifiers": [ident]}}, entity="patients"
            )
            if not (found[1].get("Patient") or {}).get("Identifiers"):
                return []
            ref = landing.land(connection_id, "datamodel", "patients", found[0]).raw_ref
            rows = [
                ("patients", r) for r in _rows(found[1], connection_id, ref, "Response").get("patients", [])
            ]
            span = {"StartDate": _dm_time(window.start or EARLIEST)}
            if window.end:
                span["EndDate"] = _dm_time(window.end)
            raw, docs = client.datamodel_raw(
                {
                    **_meta("Clinical Summary", "DocumentQuery"),
                    "Patient": {"Identifiers": [ident]},
                    "Document": span,
                },
                entity="documents",
            )
            ref = landing.land(connection_id, "datamodel", "documents", raw).raw_ref
            for row in _rows(docs, connection_id, ref, "DocumentQueryResponse").get("documents", []):
                raw, got = client.datamodel_raw(
                    {**_meta("Clinical Summary", "DocumentGet"), "Document": {"ID": row["document_id"]}},
                    entity="documents",
                )
                got_ref = landing.land(connection_id, "datamodel", "documents", raw).raw_ref
                content = _rows(
                    got, connection_id, got_ref, "DocumentGetResponse", patient=docs.get("Patient")
                )
                for part in content.get("documents", []):
                    if part.get("content") is not None:
                        row["content"] = part["content"]
                rows.append(("documents", row))
            return rows

        with ThreadPoolExecutor(WORKERS) as pool:
            for rows in pool.map(one, known_enterprise_ids):
                for entity, row in rows:
                    if entity in emitter.batchers:
                        emitter.batchers[entity].add_row(row)
                yield from emitter.drain("documents", final=False)
        yield from emitter.drain("documents", final=True)

    resources = []
    if "encounters" in wanted:
        resources.append(
            dlt.resource(encounters, name="encounters", **staged_resource_hints("datamodel", "encounters"))
        )
    elif "documents" in wanted:
        resources.append(
            dlt.resource(
                network_documents, name="documents", **staged_resource_hints("datamodel", "documents")
            )
        )
    if "results" in wanted:
        resources.append(
            dlt.resource(results, name="results", **staged_resource_hints("datamodel", "results"))
        )
    if "appointments" in wanted:
        resources.append(
            dlt.resource(
                appointments, name="appointments", **staged_resource_hints("datamodel", "appointments")
            )
        )
    return resources


def _rows(
    body: dict[str, Any], connection_id: str, raw_ref: str, event_type: str, patient: Any = None
) -> dict[str, list[dict[str, Any]]]:
    try:
        return normalize_datamodel(body, connection_id, raw_ref, event_type=event_type, patient=patient).rows
    except NormalizationError:
        return {}


def _mr_identifier(identifiers: list[dict[str, Any]]) -> dict[str, str] | None:
    for ident in identifiers:
        if str(ident.get("IDType", "")).upper() in ("MR", "MRN") and ident.get("ID"):
            return {"ID": str(ident["ID"]), "IDType": "MR"}
    first = next((i for i in identifiers if i.get("ID")), None)
    return {"ID": str(first["ID"]), "IDType": str(first.get("IDType"))} if first else None


def _documents_for(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    model: str,
    batch: list[dict[str, str]],
    page_size: int,
) -> list[tuple[dict[str, Any], str]]:
    """Notes or Media for a batch of patients; a full response is split and re-asked."""
    raw, body = client.datamodel_raw(
        {**_meta(model, "Query"), "Patients": [{"Identifiers": [i]} for i in batch]}, entity="documents"
    )
    items = body.get("Notes" if model == "Notes" else "Media") or []
    if len(items) >= page_size and len(batch) > 1:
        half = len(batch) // 2
        return _documents_for(
            client, landing, connection_id, model, batch[:half], page_size
        ) + _documents_for(client, landing, connection_id, model, batch[half:], page_size)
    return [(body, landing.land(connection_id, "datamodel", "documents", raw).raw_ref)]
