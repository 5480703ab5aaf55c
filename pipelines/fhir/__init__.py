"""dlt source for Redox's FHIR R4 surface.

One resource per entity. Each pages ``POST {Type}/_search`` Bundles (following
``next`` links) inside a ``_lastUpdated`` window, lands every page as received and
hands it to the shared page router (``pipelines.fhir.pages.bundle_rows``: every entity
the Bundle holds, bad entries quarantined one by one), which yields Arrow tables. Live runs
keep their cursor in dlt state (in the destination); a backfill passes an explicit
``[start, end)`` window, which dlt treats as stateless, so it never moves the cursor.
No orchestrator imports here.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import dlt
import orjson

from pipelines.batches import PageRouter, incremental_for
from pipelines.fhir.pages import attachment_urls
from pipelines.fhir.settings import fhir_instant
from pipelines.landing import RawLanding
from pipelines.prefetch import read_ahead
from pipelines.resource_hints import staged_resource_hints
from pipelines.sync_context import SyncWindow
from pipelines.vocabulary import ENTITIES, ENTITY_RESOURCE_TYPES, staged_table_name


def _search_params(
    window_start: datetime | None, window_end: datetime | None, page_size: int
) -> dict[str, Any]:
    params: dict[str, Any] = {"_count": str(page_size)}
    bounds = []
    if window_start is not None:
        # ge, not gt: dlt de-duplicates the boundary rows it has already seen (shared/STACK.md).
        bounds.append(f"ge{fhir_instant(window_start)}")
    if window_end is not None:
        bounds.append(f"lt{fhir_instant(window_end)}")
    if not bounds:
        bounds.append("ge1900-01-01T00:00:00Z")
    params["_lastUpdated"] = bounds
    return params


def fetch_entity(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    entity: str,
    window_start: datetime | None,
    window_end: datetime | None,
    page_size: int,
    router: PageRouter,
) -> Iterator[Any]:
    """Page every resource type that feeds ``entity``; land each page and route its rows
    (every entity the Bundle holds) through ``router``; yield Arrow tables."""
    for resource_type in ENTITY_RESOURCE_TYPES[entity]:
        params = _search_params(window_start, window_end, page_size)
        for body in read_ahead(client.fhir_search_pages(resource_type, params, entity=entity)):
            page = landing.land(connection_id, "fhir", entity, body)
            try:
                bundle: Any = orjson.loads(body)
            except orjson.JSONDecodeError:
                bundle = body  # take_page quarantines the page as unreadable
            if entity == "documents":
                router.prefetch_contents(attachment_urls(bundle))
            router.take_page(bundle, page.raw_ref, entity)
            yield from router.drain(final=False)
    yield from router.drain(final=True)


@dlt.source(name="fhir", max_table_nesting=0)
def fhir_source(
    client: Any,
    landing: RawLanding,
    connection_id: str,
    entities: tuple[str, ...] = ENTITIES,
    window: SyncWindow | None = None,
    page_size: int = 200,
    lookback_s: float = 3600.0,
) -> Any:
    """The FHIR surface of one connection: resources ``patients`` … ``documents``."""
    window = window or SyncWindow()

    def make(entity: str) -> Any:
        def extract(
            updated: dlt.sources.incremental[datetime] = incremental_for(window, lookback_s),
        ) -> Iterator[Any]:
            start = window.start if window.is_backfill else updated.start_value
            router = PageRouter(
                connection_id, "fhir", client=client, landing=landing, main=staged_table_name("fhir", entity)
            )
            yield from fetch_entity(
                client, landing, connection_id, entity, start, window.end, page_size, router
            )

        return dlt.resource(extract, name=entity, **staged_resource_hints("fhir", entity))

    return [make(e) for e in entities]
