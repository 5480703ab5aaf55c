"""A dlt source over canned FHIR search pages, through the live pull path's own pieces
(``land_page`` with its context, ``StagedEmitter`` → ``PageRouter.take_page``), for tests
that are about what a page becomes, not about who is pulled."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dlt

from pipelines.access import as_source
from pipelines.landing import RawLanding
from pipelines.pull_pages import StagedEmitter, land_page, page_context
from pipelines.resource_hints import staged_resource_hints
from pipelines.vocabulary import ENTITY_RESOURCE_TYPES


def fhir_pages_source(client: Any, landing: RawLanding, connection_id: str, entities: tuple[str, ...]) -> Any:
    """Every page ``client.fhir_search_pages`` serves for the entities' resource types."""

    def extract() -> Iterator[Any]:
        emitter = StagedEmitter("fhir", connection_id, client=None, landing=landing)
        for entity in entities:
            for resource_type in ENTITY_RESOURCE_TYPES[entity]:
                for raw in client.fhir_search_pages(resource_type, {}, entity=entity):
                    emitter.take(
                        land_page(landing, connection_id, "fhir", entity, raw, page_context(entities))
                    )
                    yield from emitter.drain(final=False)
        yield from emitter.drain(final=True)

    hints = {k: v for k, v in staged_resource_hints("fhir", "patients").items() if k != "parallelized"}
    return as_source("fhir", dlt.resource(extract, name="pages", **hints))
