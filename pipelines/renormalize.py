"""Rebuild the staged and published tables from the raw landing zone alone.

Every landed page is self-describing (a FHIR Bundle, or a Data Model payload with
its ``Meta``), so normalization can be re-run after a normalizer fix without calling
the API. Pages are replayed in fetch order through the same batcher the live sources
use; the merge keeps the latest version of each record.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import dlt
import duckdb
import orjson

from pipelines.batches import EntityBatcher
from pipelines.datamodel.normalize import normalize_datamodel
from pipelines.fhir.normalize import NORMALIZERS
from pipelines.landing import RawLanding
from pipelines.model import ENTITIES
from pipelines.normalize_common import NormalizationError
from pipelines.publish import publish_connection
from pipelines.resource_hints import staged_resource_hints
from pipelines.sync import pipeline_name
from pipelines.warehouse import WarehousePaths, WriterLock, table_exists


def _replay(landing: RawLanding, connection_id: str, surface: str, entity: str) -> Iterator[Any]:
    batcher = EntityBatcher(
        entity, connection_id, surface, landing=landing, content_index=landing.content_index()
    )
    for page in landing.pages(connection_id, surface, entity):
        try:
            payload = orjson.loads(landing.read(page.raw_ref))
        except (orjson.JSONDecodeError, OSError) as exc:
            batcher.quarantine(page.raw_ref, None, f"landed page unreadable: {type(exc).__name__}")
            continue
        if surface == "fhir":
            for e in payload.get("entry") or []:
                resource = e.get("resource") or {}
                rtype = resource.get("resourceType")
                if rtype in NORMALIZERS and NORMALIZERS[rtype][0] == entity:
                    batcher.add_resource(resource, NORMALIZERS[rtype][1], page.raw_ref, resource_type=rtype)
        else:
            try:
                out = normalize_datamodel(payload, connection_id, page.raw_ref)
            except NormalizationError as exc:
                batcher.quarantine(page.raw_ref, None, str(exc))
                continue
            for row in out.rows.get(entity, []):
                batcher.add_row(row)
        yield from batcher.drain(final=False)
    yield from batcher.drain(final=True)


def renormalize(
    paths: WarehousePaths, connection_ids: Sequence[str] | None = None
) -> dict[str, dict[str, int]]:
    landing = RawLanding(paths.landing_root)
    pages = list(landing.pages())
    connections = sorted(
        {p.connection_id for p in pages if not connection_ids or p.connection_id in connection_ids}
    )
    published: dict[str, dict[str, int]] = {}
    with WriterLock(paths):
        for connection_id in connections:
            surfaces = sorted({p.surface for p in pages if p.connection_id == connection_id})
            resources = []
            for surface in surfaces:
                for entity in ENTITIES:
                    hints = staged_resource_hints(surface, entity)
                    resources.append(
                        dlt.resource(
                            _replay(landing, connection_id, surface, entity),
                            name=f"{surface}_{entity}",
                            **hints,
                        )
                    )
            pipeline = dlt.pipeline(
                pipeline_name=pipeline_name(connection_id) + "_renormalize",
                destination=dlt.destinations.duckdb(str(paths.duckdb)),
                dataset_name="raw",
                pipelines_dir=str(paths.dlt_dir),
            )
            # Replace this connection's staged rows: delete, then merge the replayed pages.
            with duckdb.connect(str(paths.duckdb)) as con:
                for surface in surfaces:
                    for entity in ENTITIES:
                        if table_exists(con, "raw", f"{surface}_{entity}"):
                            con.execute(
                                f"DELETE FROM raw.{surface}_{entity} WHERE connection_id = ?", [connection_id]
                            )
            pipeline.run(resources)
            with duckdb.connect(str(paths.duckdb)) as con:
                published[connection_id] = publish_connection(con, connection_id)
    return published
