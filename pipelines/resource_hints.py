"""dlt table hints for the staged (per-surface) tables and the quarantine table."""

from __future__ import annotations

from typing import Any

import dlt
import pyarrow as pa

from pipelines.model import ENTITY_KEY, STR, TS

QUARANTINE_TABLE = "quarantine"


def staged_table_name(surface: str, entity: str) -> str:
    return f"{surface}_{entity}"


def staged_key(entity: str) -> list[str]:
    """Merge key of a staged table: the connection plus the entity's business key
    (patients: the surface's own id, resolved to a patient_key when publishing)."""
    return ["connection_id", "source_id" if entity == "patients" else ENTITY_KEY[entity]]


def staged_resource_hints(surface: str, entity: str) -> dict[str, Any]:
    return {
        "table_name": staged_table_name(surface, entity),
        "write_disposition": "merge",
        "primary_key": staged_key(entity),
        # The same record can arrive twice in one load (window boundaries, a query and an
        # event): keep its most recent version.
        "columns": {"source_updated_at": {"dedup_sort": "desc"}},
        "parallelized": True,
    }


def quarantine_schema() -> pa.Schema:
    return pa.schema(
        [
            ("quarantine_id", STR),
            ("connection_id", STR),
            ("source_surface", STR),
            ("entity", STR),
            ("raw_ref", STR),
            ("item_id", STR),
            ("reason", STR),
            ("first_seen_at", TS),
            ("attempts", pa.int64()),
            ("source_updated_at", TS),
        ]
    )


QUARANTINE_HINTS = dlt.mark.make_hints(
    table_name=QUARANTINE_TABLE,
    write_disposition="merge",
    primary_key=["quarantine_id"],
)
