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

from pipelines.batches import PageRouter
from pipelines.datamodel.normalize_fields import as_ts
from pipelines.datamodel.pages import payload_rows
from pipelines.landing import PageContext, RawLanding
from pipelines.normalize_common import NormalizationError
from pipelines.pages import PageRows
from pipelines.resource_hints import staged_resource_hints
from pipelines.sync_context import SyncWindow
from pipelines.vocabulary import ENTITIES, staged_table_name

EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
PATIENT_BATCH = 10  # patients per Notes/Media query; halved when a response may be capped
WORKERS = 8


class _Emitter:
    """Sends queries, lands each answer with the context a replay needs, and routes the
    answer's rows through the shared page router (``pipelines.datamodel.pages``)."""

    def __init__(
        self, client: Any, landing: RawLanding, connection_id: str, entities: Iterable[str], main: str
    ) -> None:
        self.client = client
        self.landing = landing
        self.connection_id = connection_id
        self.entities = {e for e in ENTITIES if e in set(entities)}
        self.router = PageRouter(
            connection_id, "datamodel", landing=landing, main=staged_table_name("datamodel", main)
        )

    def context(self, event_type: str, feeds: Iterable[str], **extra: Any) -> PageContext:
        """The page's context: its event type and the entities this sync takes from it."""
        allowed = tuple(e for e in ENTITIES if e in self.entities and e in set(feeds))
        return PageContext(event_type=event_type, entities=allowed, **extra)

    def query(
        self, entity: str, payload: dict[str, Any], context: PageContext
    ) -> tuple[dict[str, Any], str, bytes]:
        """Send a query (labelled with the entity it fetches) and land the answer with its
        context; -> (parsed body, raw_ref, body as received)."""
        raw, body = self.client.datamodel_raw(payload, entity=entity)
        return body, self.landing.land(self.connection_id, "datamodel", entity, raw, context).raw_ref, raw

    def take(
        self,
        body: Any,
        raw_ref: str,
        entity: str,
        context: PageContext,
        answers: Iterable[tuple[Any, str, PageContext]] = (),
    ) -> PageRows | None:
        return self.router.take_page(body, raw_ref, entity, context, answers)

    def drain(self, final: bool) -> Iterator[Any]:
        yield from self.router.drain(final=final)


def _meta(model: str, event: str) -> dict[str, Any]:
    # No EventDateTime: the response's is then the server's clock, which rows use as their
    # version time — comparable with the records' own last-updated times.
    return {"Meta": {"DataModel": model, "EventType": event}}


def _server_time(body: dict[str, Any]) -> datetime | None:
    return _parse((body.get("Meta") or {}).get("EventDateTime"))


def _dm_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _parse(value: Any) -> datetime | None:
    """A time from a response or from dlt state; one that is not ISO-8601 (a record's
    ``dd/mm/yyyy``) is absent here: the record itself is quarantined by the normalizer."""
    return as_ts(value)


def _walk_window(
    emitter: _Emitter,
    entity: str,
    context: PageContext,
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
        body, raw_ref, _raw = emitter.query(entity, build(cursor), context)
        items = [i for i in items_of(body) if isinstance(i, dict)]
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
            client,
            landing,
            connection_id,
            wanted & {"patients", "encounters", "medications", "documents"},
            "encounters",
        )
        synced_at = None
        discovered: dict[str, dict[str, str]] = {}
        visits = emitter.context("VisitQueryResponse", ("patients", "encounters"))
        for body, raw_ref, _last in _walk_window(
            emitter,
            "encounters",
            visits,
            lambda s: {**_meta("PatientAdmin", "VisitQuery"), "VisitStartDateTime": _dm_time(s)},
            lambda b: [v for p in b.get("Patients") or [] for v in p.get("Visits") or []],
            lambda v: str(v.get("VisitNumber")),
            lambda v: _parse(v.get("VisitDateTime")),
            start_from("visit_start"),
            page_size,
            window.end,
        ):
            synced_at = synced_at or _server_time(body)
            emitter.take(body, raw_ref, "encounters", visits)
            for p in body.get("Patients") or []:
                ident = _mr_identifier(p.get("Identifiers") or []) if isinstance(p, dict) else None
                if ident:
                    discovered[ident["ID"]] = ident
            yield from emitter.drain(final=False)
        # Visits have no last-updated filter: the next run asks from this run's server time
        # (less the lookback), which every visit created since then starts after.
        remember("visit_start", synced_at)
        # Medications have no windowed Data Model query: every patient already known is asked
        # again, so a medication added to a patient without a new visit is still found.
        for id_type, id_value in known_patients:
            discovered.setdefault(id_value, {"ID": id_value, "IDType": id_type})
        yield from _per_patient(emitter, sorted(discovered.values(), key=lambda i: i["ID"]))
        yield from emitter.drain(final=True)

    def _per_patient(emitter: _Emitter, patients: list[dict[str, str]]) -> Iterator[Any]:
        """Medications (Clinical Summary) and documents (Notes/Media) for the patients seen."""
        if "medications" in wanted and not also_fhir:
            summaries = emitter.context("PatientQueryResponse", ("medications",))

            def summary(ident: dict[str, str]) -> tuple[dict[str, Any], str, bytes]:
                return emitter.query(
                    "medications",
                    {**_meta("Clinical Summary", "PatientQuery"), "Patient": {"Identifiers": [ident]}},
                    summaries,
                )

            with ThreadPoolExecutor(WORKERS) as pool:
                for _body, ref, raw in pool.map(summary, patients):
                    emitter.take(raw, ref, "medications", summaries)
                    yield from emitter.drain(final=False)
        if "documents" in wanted and not also_fhir:
            batches = [patients[i : i + PATIENT_BATCH] for i in range(0, len(patients), PATIENT_BATCH)]

            notes = emitter.context("QueryResponse", ("documents", "patients"))

            def notes_and_media(batch: list[dict[str, str]]) -> list[tuple[str, bytes]]:
                out = []
                for model in ("Notes", "Media"):
                    out.extend(_documents_for(emitter, model, batch, page_size, notes))
                return out

            with ThreadPoolExecutor(WORKERS) as pool:
                for results in pool.map(notes_and_media, batches):
                    for ref, raw in results:
                        emitter.take(raw, ref, "documents", notes)
                    yield from emitter.drain(final=False)

    def results() -> Iterator[Any]:
        emitter = _Emitter(client, landing, connection_id, wanted & {"patients", "results"}, "results")
        answers = emitter.context("QueryResponse", ("patients", "results"))
        last = None

        def build(s: datetime) -> dict[str, Any]:
            span: dict[str, Any] = {"StartDateTime": _dm_time(s)}
            if window.end is not None:
                span["EndDateTime"] = _dm_time(window.end)
            return {**_meta("Results", "Query"), "LastUpdated": span}

        for body, raw_ref, last in _walk_window(  # noqa: B007 - last is the cursor after the loop
            emitter,
            "results",
            answers,
            build,
            lambda b: b.get("Orders") or [],
            lambda o: f"{o.get('ID')}|{o.get('LastUpdated')}",
            lambda o: _parse(o.get("LastUpdated")),
            start_from("results_updated"),
            page_size,
        ):
            emitter.take(body, raw_ref, "results", answers)
            yield from emitter.drain(final=False)
        remember("results_updated", last)
        yield from emitter.drain(final=True)

    def appointments() -> Iterator[Any]:
        emitter = _Emitter(
            client, landing, connection_id, wanted & {"patients", "appointments"}, "appointments"
        )
        booked = emitter.context("BookedResponse", ("patients", "appointments"))
        synced_at = None
        far = window.end or (datetime.now(UTC) + timedelta(days=3650))
        for body, raw_ref, _last in _walk_window(
            emitter,
            "appointments",
            booked,
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
            emitter.take(body, raw_ref, "appointments", booked)
            yield from emitter.drain(final=False)
        # Appointments are booked into the future: a max-start cursor would skip a new booking
        # that starts before the latest one already seen, so the cursor is the server time.
        remember("appointment_start", synced_at)
        yield from emitter.drain(final=True)

    def network_documents() -> Iterator[Any]:
        emitter = _Emitter(client, landing, connection_id, wanted & {"patients", "documents"}, "documents")
        search = emitter.context("Response", ("patients",))
        listing = emitter.context("DocumentQueryResponse", ("documents",))

        def one(epi: str) -> list[tuple[bytes, str, str, PageContext, list[tuple[bytes, str, PageContext]]]]:
            """The patient (PatientSearch) and its documents: metadata from DocumentQuery, content
            from one DocumentGet per document, landed with the query's Patient block and the
            DocumentQuery answer it completes. Runs on a worker: returns the landed pages."""
            ident = {"ID": epi, "IDType": "EPI"}
            found, found_ref, found_raw = emitter.query(
                "patients", {**_meta("PatientSearch", "Query"), "Patient": {"Identifiers": [ident]}}, search
            )
            if not isinstance(found, dict) or not (found.get("Patient") or {}).get("Identifiers"):
                return [(found_raw, found_ref, "patients", search, [])]
            span = {"StartDate": _dm_time(window.start or EARLIEST)}
            if window.end:
                span["EndDate"] = _dm_time(window.end)
            docs, docs_ref, docs_raw = emitter.query(
                "documents",
                {
                    **_meta("Clinical Summary", "DocumentQuery"),
                    "Patient": {"Identifiers": [ident]},
                    "Document": span,
                },
                listing,
            )
            answers = []
            getting = PageContext(
                event_type="DocumentGetResponse",
                patient=docs.get("Patient") if isinstance(docs, dict) else None,
                entities=(),
                completes=docs_ref,
            )
            for document_id in _document_ids(docs, connection_id, docs_ref):
                _got, got_ref, got_raw = emitter.query(
                    "documents",
                    {**_meta("Clinical Summary", "DocumentGet"), "Document": {"ID": document_id}},
                    getting,
                )
                answers.append((got_raw, got_ref, getting))
            return [
                (found_raw, found_ref, "patients", search, []),
                (docs_raw, docs_ref, "documents", listing, answers),
            ]

        with ThreadPoolExecutor(WORKERS) as pool:
            for pages in pool.map(one, known_enterprise_ids):
                for raw, ref, entity, context, answers in pages:
                    emitter.take(raw, ref, entity, context, answers)
                yield from emitter.drain(final=False)
        yield from emitter.drain(final=True)

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


def _document_ids(body: Any, connection_id: str, raw_ref: str) -> list[str]:
    """Ids of the documents a DocumentQuery answer lists (none when it cannot be read: the
    router then quarantines the answer)."""
    try:
        page = payload_rows(body, connection_id, raw_ref, "DocumentQueryResponse")
    except NormalizationError:
        return []
    return [str(row["document_id"]) for row in page.rows["documents"]]


def _mr_identifier(identifiers: list[dict[str, Any]]) -> dict[str, str] | None:
    for ident in identifiers:
        if str(ident.get("IDType", "")).upper() in ("MR", "MRN") and ident.get("ID"):
            return {"ID": str(ident["ID"]), "IDType": "MR"}
    first = next((i for i in identifiers if i.get("ID")), None)
    return {"ID": str(first["ID"]), "IDType": str(first.get("IDType"))} if first else None


def _documents_for(
    emitter: _Emitter,
    model: str,
    batch: list[dict[str, str]],
    page_size: int,
    context: PageContext,
) -> list[tuple[str, bytes]]:
    """Notes or Media for a batch of patients; a full response is split and re-asked.
    Returns the landed answers (raw_ref, body as received)."""
    payload = {**_meta(model, "Query"), "Patients": [{"Identifiers": [i]} for i in batch]}
    raw, body = emitter.client.datamodel_raw(payload, entity="documents")
    items = (body.get("Notes" if model == "Notes" else "Media") or []) if isinstance(body, dict) else []
    if len(items) >= page_size and len(batch) > 1:
        half = len(batch) // 2
        return _documents_for(emitter, model, batch[:half], page_size, context) + _documents_for(
            emitter, model, batch[half:], page_size, context
        )
    landed = emitter.landing.land(emitter.connection_id, "datamodel", "documents", raw, context)
    return [(landed.raw_ref, raw)]
