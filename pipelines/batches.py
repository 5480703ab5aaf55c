"""Turn normalized rows into Arrow batches for dlt, and quarantine what fails.

Shared by both surfaces' sources: rows accumulate per entity and leave as Arrow
tables of the staged schema; a payload that cannot be normalized becomes a
quarantine row (reason, raw_ref) routed to the ``quarantine`` table, and the batch
goes on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import dlt

from pipelines.landing import RawLanding
from pipelines.model import rows_to_table, staged_schema
from pipelines.normalize_common import NormalizationError
from pipelines.progress import PROGRESS
from pipelines.resource_hints import QUARANTINE_HINTS, quarantine_schema
from pipelines.sync_context import SyncWindow

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BATCH_ROWS = 20_000


def incremental_for(window: SyncWindow, lookback_s: float) -> Any:
    """The dlt cursor for a resource: stateful for live runs, stateless for backfills."""
    if window.is_backfill:
        return dlt.sources.incremental(
            "source_updated_at",
            initial_value=window.start or EPOCH,
            end_value=window.end,
            on_cursor_value_missing="include",
            primary_key=(),
        )
    return dlt.sources.incremental(
        "source_updated_at",
        initial_value=window.start or EPOCH,
        lag=lookback_s,
        on_cursor_value_missing="include",
        # Boundary rows re-fetched by the ``ge`` window are de-duplicated by the merge key.
        primary_key=(),
    )


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
    ) -> None:
        self.entity = entity
        self.connection_id = connection_id
        self.surface = surface
        self.client = client
        self.landing = landing
        self.batch_rows = batch_rows
        # Renormalization: document content comes from the landing's index, never the API.
        self.content_index = content_index
        self.prefetched: dict[str, bytes] = {}
        self.schema = staged_schema(entity)
        self.rows: list[dict[str, Any]] = []
        self.quarantined: list[dict[str, Any]] = []
        self.ingested_at = datetime.now(UTC)
        self.counts = {"rows": 0, "quarantined": 0}

    def add_resource(
        self,
        payload: dict[str, Any],
        normalize: Callable[..., dict[str, Any]],
        raw_ref: str,
        *,
        resource_type: str,
    ) -> None:
        try:
            row = normalize(payload, self.connection_id, raw_ref)
        except (NormalizationError, KeyError, TypeError, ValueError, AttributeError) as exc:
            self.quarantine(raw_ref, payload.get("id"), f"{resource_type}: {_reason(exc)}")
            return
        self.add_row(row)

    def add_row(self, row: dict[str, Any]) -> None:
        identifiers = row.pop("identifiers", None) or {}
        if self.entity == "patients":
            for column, id_type in (
                ("mrn", "MR"),
                ("enterprise_id", "EPI"),
                ("ehr_id", "EHRID"),
                ("nist_id", "NIST"),
            ):
                if row.get(column) is None and identifiers.get(id_type):
                    row[column] = identifiers[id_type]
        content = row.pop("content", None)
        content_url = row.pop("content_url", None)
        if self.entity == "documents" and self.landing is not None:
            self._attach_content(row, content, content_url)
        row["ingested_at"] = self.ingested_at
        self.rows.append(row)
        PROGRESS.add(self.connection_id, self.entity)

    def _attach_content(self, row: dict[str, Any], content: bytes | None, content_url: str | None) -> None:
        """Store a document's content by hash and record the hash on the row. Content comes
        with the payload (Data Model), from the landing's index (renormalization, never the
        API), or from one fetch of the attachment URL (FHIR)."""
        if content is None and content_url and self.content_index is not None:
            digest = self.content_index.get((self.connection_id, content_url))
            if digest and self.landing.document_path(digest).exists():
                row["content_sha256"] = digest
                row["content_bytes"] = self.landing.document_path(digest).stat().st_size
            return
        from_url = content is None and bool(content_url) and self.client is not None
        if from_url:
            content = self.prefetched.pop(content_url, None) or self.client.fetch_document_content(
                content_url
            )
        if content is None:
            return
        digest = self.landing.store_document(content)
        if from_url:
            self.landing.index_content(self.connection_id, content_url, digest)
        row["content_sha256"] = digest
        row["content_bytes"] = len(content)

    def prefetch_contents(self, urls: list[str], workers: int = 8) -> None:
        """Fetch a page's document contents concurrently (one request each) before the
        rows are added; a failed fetch is retried inline by ``add_row``."""
        if self.client is None or not urls:
            return
        with ThreadPoolExecutor(min(workers, len(urls))) as pool:
            futures = {url: pool.submit(self.client.fetch_document_content, url) for url in urls}
        for url, future in futures.items():
            if future.exception() is None:
                self.prefetched[url] = future.result()

    def quarantine(self, raw_ref: str, item_id: Any, reason: str) -> None:
        item = str(item_id) if item_id not in (None, "") else "-"
        key = hashlib.sha256(f"{raw_ref}|{item}|{self.entity}".encode()).hexdigest()[:32]
        self.quarantined.append(
            {
                "quarantine_id": key,
                "connection_id": self.connection_id,
                "source_surface": self.surface,
                "entity": self.entity,
                "raw_ref": raw_ref,
                "item_id": item,
                "reason": reason,
                "first_seen_at": self.ingested_at,
                "attempts": 1,
                "source_updated_at": None,
            }
        )
        log.warning("quarantined one %s %s payload (%s): %s", self.surface, self.entity, raw_ref, reason)

    def drain(self, final: bool) -> Iterator[Any]:
        if self.rows and (final or len(self.rows) >= self.batch_rows):
            table = rows_to_table(self.rows, self.schema)
            self.counts["rows"] += table.num_rows
            self.rows = []
            yield table
        if self.quarantined and (final or len(self.quarantined) >= 1000):
            table = rows_to_table(self.quarantined, quarantine_schema())
            self.counts["quarantined"] += table.num_rows
            self.quarantined = []
            yield dlt.mark.with_hints(table, QUARANTINE_HINTS, create_table_variant=True)


def _reason(exc: Exception) -> str:
    """An error message safe to store and log: NormalizationError messages are written
    without PHI; anything else is reduced to its type."""
    if isinstance(exc, NormalizationError):
        return str(exc)
    return f"unexpected {type(exc).__name__} while normalizing"
