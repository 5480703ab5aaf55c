"""dlt table hints for the staged (per-surface) tables and the quarantine table."""

from __future__ import annotations

from typing import Any

from pipelines.model import ENTITY_KEY
from pipelines.quarantine import QUARANTINE_HINTS as QUARANTINE_HINTS  # re-exported
from pipelines.quarantine import quarantine_schema as quarantine_schema  # re-exported
from pipelines.vocabulary import QUARANTINE_TABLE as QUARANTINE_TABLE  # re-exported for assets/
from pipelines.vocabulary import staged_table_name as staged_table_name  # re-exported


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
        # event, a replay of two fetches): keep its most recent version — by source time, then
        # by the page fetched last (pipelines.model.version_key).
        "columns": {"version_key": {"dedup_sort": "desc"}},
        "parallelized": True,
    }
