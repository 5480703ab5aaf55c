"""Turn a page's rows into Arrow batches for dlt, and quarantine what fails.

``PageRouter`` is the one place a ``PageRows`` (``pipelines.pages``) becomes staged
rows: the live sources and ``redox-elt renormalize`` both hand it every page, so a
replay routes rows exactly as the live sync did. Rows of every entity the page feeds
go to their ``raw.<surface>_<entity>`` table (tables other than the resource's own leave
as dlt table variants), per-record quarantine entries to ``raw.quarantine``, and a page
that cannot be read at all becomes one quarantine row; the batch goes on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import dlt
import pyarrow as pa

from pipelines.landing import PageContext, RawLanding
from pipelines.model import ENTITY_KEY, ROW_EXTRAS, SchemaMismatch, rows_to_table, staged_schema, version_key
from pipelines.pages import PageRows
from pipelines.progress import PROGRESS
from pipelines.quarantine import (
    ITEM_ID,
    ITEM_POSITION,
    QUARANTINE_HINTS,
    QuarantineEntry,
    quarantine_row,
    quarantine_schema,
)
from pipelines.resource_hints import staged_resource_hints
from pipelines.vocabulary import ENTITIES, staged_table_name

log = logging.getLogger(__name__)

BATCH_ROWS = 20_000
QUARANTINE_BATCH = 1000
# Entities a surface shows through two queries at once, each query carrying fields the other
# lacks: a Data Model visit comes from PatientAdmin.VisitQuery (patient class, department; no
# end time, free-text reason: Redox's VisitQueryResponse defines no more) and from the Clinical
# Summary's Encounters (end time, coded reason, type, attending, disposition; no class). The
# staged table keeps one row per record, so two rows of one version (same record, same source
# time) are merged here, before staging, rather than one replacing the other whole.
SAME_VERSION_MERGED = frozenset({"encounters"})
# Versions remembered for that merge: a patient's pages are taken together (live) or close
# together in fetch order (replay), so a bounded memory finds the twin.
SAME_VERSION_MEMORY = 50_000


# Demographics a patient row carries when it is more than a reference to its patient.
_DEMOGRAPHICS = ("family_name", "given_names", "birth_date", "sex", "address_line", "phone")


def _complete(entity: str, row: dict[str, Any]) -> bool:
    return entity != "patients" or any(row.get(c) is not None for c in _DEMOGRAPHICS)


class EntityBatcher:
    """Collects one entity's normalized rows and yields Arrow tables for dlt."""

    def __init__(
        self,
        entity: str,
        connection_id: str,
        surface: str,
        *,
        client: Any = None,
        landing: RawLanding | None = None,
        batch_rows: int = BATCH_ROWS,
        content_index: dict[tuple[str, str], str] | None = None,
        ingested_at: datetime | None = None,
    ) -> None:
        self.entity = entity
        self.connection_id = connection_id
        self.surface = surface
        self.client = client
        self.landing = landing
        self.batch_rows = batch_rows
        # (connection, URL) -> content digest stored by an earlier fetch (the landing's index).
        self.content_index = content_index
        self.contents_fetched = 0
        self.prefetched: dict[str, bytes] = {}
        self.schema = staged_schema(entity)
        self.rows: list[dict[str, Any]] = []
        self.ingested_at = ingested_at or datetime.now(UTC)
        self.counts = {"rows": 0}
        # (business key, source time) -> the non-null values of that version seen so far.
        self.versions: OrderedDict[tuple[Any, Any], dict[str, Any]] = OrderedDict()
        # Where a row whose values do not fit the schema goes (the router's quarantine);
        # without one such a row fails the batch.
        self.on_bad_row: Callable[[dict[str, Any], str], None] | None = None

    def add_row(self, row: dict[str, Any]) -> None:
        extras = {key: row.pop(key) for key in ROW_EXTRAS if key in row}
        identifiers = extras.get("identifiers") or {}
        if self.entity == "patients":
            for column, id_type in (
                ("mrn", "MR"),
                ("enterprise_id", "EPI"),
                ("ehr_id", "EHRID"),
                ("nist_id", "NIST"),
            ):
                if row.get(column) is None and identifiers.get(id_type):
                    row[column] = identifiers[id_type]
        content = extras.get("content")
        content_url = extras.get("content_url")
        if self.entity == "documents" and self.landing is not None:
            self._attach_content(row, content, content_url)
        if self.entity in SAME_VERSION_MERGED:
            self._merge_same_version(row)
        row["ingested_at"] = self.ingested_at
        row["version_key"] = version_key(
            row.get("source_updated_at"), row.get("raw_ref"), complete=_complete(self.entity, row)
        )
        self.rows.append(row)
        PROGRESS.add(self.connection_id, self.entity)

    def _merge_same_version(self, row: dict[str, Any]) -> None:
        """Fill ``row``'s nulls from the earlier rows of the same version (see
        ``SAME_VERSION_MERGED``). The row's own values win; it is fetched later, so it is
        also the version staging keeps (``version_key``), now holding every field."""
        key = (row.get(ENTITY_KEY[self.entity]), row.get("source_updated_at"))
        if key[0] is None or key[1] is None:
            return
        known = self.versions.pop(key, {})
        for column, value in known.items():
            if row.get(column) is None:
                row[column] = value
        self.versions[key] = {c: v for c, v in row.items() if v is not None}
        if len(self.versions) > SAME_VERSION_MEMORY:
            self.versions.popitem(last=False)

    def _attach_content(self, row: dict[str, Any], content: bytes | None, content_url: str | None) -> None:
        """Store a document's content by hash and record the hash on the row. Content comes
        with the payload (Data Model), from the landing's index when an earlier fetch stored it
        (a refresh never re-downloads bytes it holds; renormalization never calls the API), or
        from one fetch of the attachment URL (FHIR, live runs only)."""
        if content is None and content_url:
            digest = self.content_index.get((self.connection_id, content_url)) if self.content_index else None
            if digest and self.landing.document_path(digest).exists():
                row["content_sha256"] = digest
                row["content_bytes"] = self.landing.document_path(digest).stat().st_size
                return
            if self.client is None:
                return  # a replay: content not stored stays unset, never fetched
            content = self.prefetched.pop(content_url, None) or self.client.fetch_document_content(
                content_url
            )
            self.contents_fetched += 1
            digest = self.landing.store_document(content)
            self.landing.index_content(self.connection_id, content_url, digest)
            if self.content_index is not None:
                self.content_index[(self.connection_id, content_url)] = digest
            row["content_sha256"] = digest
            row["content_bytes"] = len(content)
            return
        if content is None:
            return
        row["content_sha256"] = self.landing.store_document(content)
        row["content_bytes"] = len(content)

    def prefetch_contents(self, urls: list[str], workers: int = 8) -> None:
        """Fetch a page's document contents concurrently (one request each) before the
        rows are added, leaving out contents the landing already holds; a failed fetch is
        retried inline by ``add_row``."""
        known = self.content_index or {}
        urls = [u for u in dict.fromkeys(urls) if (self.connection_id, u) not in known]
        if self.client is None or not urls:
            return
        with ThreadPoolExecutor(min(workers, len(urls))) as pool:
            futures = {url: pool.submit(self.client.fetch_document_content, url) for url in urls}
        for url, future in futures.items():
            if future.exception() is None:
                self.prefetched[url] = future.result()

    def drain(self, final: bool) -> Iterator[Any]:
        if self.rows and (final or len(self.rows) >= self.batch_rows):
            try:
                table = rows_to_table(self.rows, self.schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                table = self._table_without_bad_rows()
            self.counts["rows"] += table.num_rows
            self.rows = []
            yield table

    def _table_without_bad_rows(self) -> pa.Table:
        """A batch failed to convert: one record carries a value of the wrong type (a server
        sent a number for a code, a list for a date...). Convert row by row, hand each bad row
        to ``on_bad_row`` with the column at fault, and keep the rest of the batch."""
        good = []
        for row in self.rows:
            reason = wrong_typed_column(row, self.schema)
            if reason is None:
                good.append(row)
            elif self.on_bad_row is None:
                raise SchemaMismatch(f"{self.entity}: {reason}")
            else:
                self.on_bad_row(row, reason)
        return rows_to_table(good, self.schema)


def _only_patient(page: PageRows) -> tuple[str, str] | None:
    """The (reference type, value) of the one patient every record of the page names (its
    rows and its quarantined records alike), if there is exactly one."""
    refs = {
        (row.get("patient_ref_type"), row.get("patient_ref_value"))
        for rows in page.rows.values()
        for row in rows
        if row.get("patient_ref_value")
    }
    refs |= {(e.patient_ref_type, e.patient_ref_value) for e in page.quarantined if e.patient_ref_value}
    return next(iter(refs)) if len(refs) == 1 else None


def wrong_typed_column(row: dict[str, Any], schema: pa.Schema) -> str | None:
    """The first column whose value does not fit its Arrow type, as a PHI-free reason
    (the column name and the Python type, never the value); None when the row fits."""
    for f in schema:
        value = row.get(f.name)
        if value is None:
            continue
        try:
            pa.array([value], type=f.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return f"column {f.name}: a {type(value).__name__} value where {f.type} is expected"
    return None


class PageRouter:
    """Routes pages of one connection and surface to staged tables and the quarantine.

    ``main`` is the table the dlt resource is named after; every other table leaves as a
    table variant with its own hints. ``allowed`` (per page) is the entities the page was
    fetched for: rows and quarantine entries of other entities are left out, the same way
    in a live sync and in a replay."""

    def __init__(
        self,
        connection_id: str,
        surface: str,
        *,
        client: Any = None,
        landing: RawLanding | None = None,
        content_index: dict[tuple[str, str], str] | None = None,
        main: str | None = None,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self.connection_id = connection_id
        self.surface = surface
        self.main = main
        self.ingested_at = datetime.now(UTC)
        self.batchers = {
            e: EntityBatcher(
                e,
                connection_id,
                surface,
                client=client,
                landing=landing,
                batch_rows=batch_rows,
                content_index=content_index,
                ingested_at=self.ingested_at,
            )
            for e in ENTITIES
        }
        self.quarantined: list[dict[str, Any]] = []
        self.counts = {"quarantined": 0}
        for entity, batcher in self.batchers.items():
            batcher.on_bad_row = self._bad_row_sink(entity)

    def _bad_row_sink(self, entity: str) -> Callable[[dict[str, Any], str], None]:
        def sink(row: dict[str, Any], reason: str) -> None:
            item = row.get(ENTITY_KEY.get(entity, ""))
            self.quarantine(
                QuarantineEntry(
                    entity,
                    item if isinstance(item, str) and item else "row",
                    reason,
                    patient_ref_type=row.get("patient_ref_type"),
                    patient_ref_value=row.get("patient_ref_value"),
                    item_kind=ITEM_ID if isinstance(item, str) and item else ITEM_POSITION,
                ),
                row.get("raw_ref") or "",
            )

        return sink

    def take(
        self,
        page: PageRows,
        raw_ref: str,
        allowed: Iterable[str] | None = None,
        pulled_for: tuple[str, str] | None = None,
    ) -> None:
        keep = set(ENTITIES if allowed is None else allowed)
        for entity in ENTITIES:
            if entity in keep:
                for row in page.rows.get(entity, ()):
                    self.batchers[entity].add_row(row)
        page_patient = _only_patient(page) or pulled_for
        for entry in page.quarantined:
            if entry.entity in keep:
                if entry.patient_ref_value is None and page_patient is not None:
                    # A per-patient page: its damaged record belongs to the one patient every
                    # other record names, so the next sync knows whom to fetch again.
                    entry = replace(
                        entry, patient_ref_type=page_patient[0], patient_ref_value=page_patient[1]
                    )
                self.quarantine(entry, raw_ref)

    def take_page(
        self,
        body: Any,
        raw_ref: str,
        entity: str,
        context: PageContext | None = None,
        answers: Iterable[tuple[Any, str, PageContext]] = (),
    ) -> PageRows | None:
        """Read one landed page (its body as landed) and route its rows; an unreadable page
        is quarantined under ``entity``, the entity it was fetched for. ``answers``: the
        DocumentGet answers (body, raw_ref, context) completing a DocumentQuery answer."""
        from pipelines.datamodel.pages import complete_documents
        from pipelines.page_reader import PageUnreadable, read_page

        context = context or PageContext()
        try:
            page = read_page(self.surface, body, self.connection_id, raw_ref, entity, context)
        except PageUnreadable as exc:
            self.quarantine_page(raw_ref, entity, f"page unreadable: {exc}")
            return None
        completions = []
        for answer_body, answer_ref, answer_context in answers:
            try:
                completions.append(
                    read_page(
                        self.surface, answer_body, self.connection_id, answer_ref, entity, answer_context
                    )
                )
            except PageUnreadable as exc:
                self.quarantine_page(answer_ref, entity, f"page unreadable: {exc}")
        if completions:
            page = complete_documents(page, completions)
        self.take(page, raw_ref, context.entities, context.pulled_for)
        return page

    def quarantine(self, entry: QuarantineEntry, raw_ref: str) -> None:
        self.quarantined.append(
            quarantine_row(entry, self.connection_id, self.surface, raw_ref, self.ingested_at)
        )
        # The raw_ref and the reason name no patient; the record's ids stay in the table.
        log.warning(
            "quarantined one %s %s record (%s): %s", self.surface, entry.entity, raw_ref, entry.reason
        )

    def quarantine_page(self, raw_ref: str, entity: str, reason: str) -> None:
        self.quarantine(QuarantineEntry(entity, "", reason), raw_ref)

    def prefetch_contents(self, urls: list[str]) -> None:
        self.batchers["documents"].prefetch_contents(urls)

    @property
    def contents_fetched(self) -> int:
        return self.batchers["documents"].contents_fetched

    def drain(self, final: bool) -> Iterator[Any]:
        for entity, batcher in self.batchers.items():
            table_name = staged_table_name(self.surface, entity)
            for item in batcher.drain(final=final):
                if table_name == self.main:
                    yield item
                else:
                    yield dlt.mark.with_hints(
                        item, _variant_hints(self.surface, entity), create_table_variant=True
                    )
        if self.quarantined and (final or len(self.quarantined) >= QUARANTINE_BATCH):
            table = rows_to_table(self.quarantined, quarantine_schema())
            self.counts["quarantined"] += table.num_rows
            self.quarantined = []
            yield dlt.mark.with_hints(table, QUARANTINE_HINTS, create_table_variant=True)


def _variant_hints(surface: str, entity: str) -> Any:
    hints = staged_resource_hints(surface, entity)
    return dlt.mark.make_hints(
        table_name=hints["table_name"],
        write_disposition="merge",
        primary_key=hints["primary_key"],
        columns=hints["columns"],
    )
