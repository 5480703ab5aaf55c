"""dlt source of a clinical network connection (Data Model, ``kind: network``).

A network has no panel of its own to enumerate: it is asked, per enterprise id the warehouse
already knows from other connections, for the patient (``PatientSearch.Query``) and its
documents (``Clinical Summary.DocumentQuery`` + one ``DocumentGet`` per document). Every
answer is landed as received with the context a replay needs (the event type, the entities
taken from it, and for a DocumentGet answer the Patient block of its query and the
DocumentQuery answer it completes) and routed through the shared page router, so
``redox-elt renormalize`` rebuilds the same rows. EHR connections are extracted per patient
(``pipelines.access``); this source is the network path only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import dlt

from pipelines.batches import PageRouter
from pipelines.datamodel.pages import payload_rows
from pipelines.landing import PageContext, RawLanding
from pipelines.normalize_common import NormalizationError
from pipelines.pages import PageRows
from pipelines.pull_pages import CallCounter
from pipelines.resource_hints import staged_resource_hints
from pipelines.sync_context import SyncWindow
from pipelines.vocabulary import ENTITIES, staged_table_name

EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
WORKERS = 8


class _Emitter:
    """Sends queries, lands each answer with the context a replay needs, and routes the
    answer's rows through the shared page router (``pipelines.datamodel.pages``)."""

    def __init__(
        self,
        client: Any,
        landing: RawLanding,
        connection_id: str,
        entities: Iterable[str],
        main: str,
        counter: CallCounter | None = None,
    ) -> None:
        self.client = client
        self.landing = landing
        self.connection_id = connection_id
        self.entities = {e for e in ENTITIES if e in set(entities)}
        self.counter = counter or CallCounter()
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
        raw, body = self.client.datamodel_raw(payload, entity=entity, priority="refresh")
        meta = payload["Meta"]
        self.counter.add(f"{meta['DataModel']}.{meta['EventType']}")
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


def _dm_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def network_source(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    *,
    entities: tuple[str, ...] = ENTITIES,
    window: SyncWindow | None = None,
    known_enterprise_ids: tuple[str, ...] = (),
    counter: CallCounter | None = None,
    full_history_ids: frozenset[str] = frozenset(),
) -> Any:
    """The network's patients and documents for ``known_enterprise_ids`` (a dlt source);
    ``full_history_ids`` are asked for their whole history whatever the window (a record of
    theirs sits in quarantine: fetched again until it loads)."""
    window = window or SyncWindow()
    wanted = set(entities)

    def network_documents() -> Iterator[Any]:
        emitter = _Emitter(
            client, landing, connection_id, wanted & {"patients", "documents"}, "documents", counter
        )
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
            start = EARLIEST if epi in full_history_ids else (window.start or EARLIEST)
            span = {"StartDate": _dm_time(start)}
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

    @dlt.source(name="datamodel", max_table_nesting=0)
    def datamodel() -> Any:
        return [
            dlt.resource(
                network_documents, name="documents", **staged_resource_hints("datamodel", "documents")
            )
        ]

    return datamodel()


def _document_ids(body: Any, connection_id: str, raw_ref: str) -> list[str]:
    """Ids of the documents a DocumentQuery answer lists (none when it cannot be read: the
    router then quarantines the answer)."""
    try:
        page = payload_rows(body, connection_id, raw_ref, "DocumentQueryResponse")
    except NormalizationError:
        return []
    return [str(row["document_id"]) for row in page.rows["documents"]]
