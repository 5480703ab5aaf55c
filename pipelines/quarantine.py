"""``raw.quarantine``: records that could not be normalized, one row per record.

A bad record never costs its page: the page-to-rows functions return the good rows and
one ``QuarantineEntry`` per bad record (an entry that is not an object, an unknown
resource type, a record without its id, an unparseable date ...), and the rest loads.
Each row says what a later sync needs to fetch the record again (connection, surface,
entity, the record's business id, the patient reference when known) and why it failed,
in words that never quote the payload (no PHI).

An entry is *resolved* when a later load brings the same record (same business id) in
good shape: ``resolve_quarantine`` marks it after each load, and the quarantine-rate
check counts only unresolved entries (``unresolved_quarantine_counts``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dlt
import duckdb
import pyarrow as pa

from pipelines.model import ENTITY_KEY, STR, TS
from pipelines.vocabulary import ENTITIES, QUARANTINE_TABLE, STAGING_SCHEMA, SURFACES, staged_table_name
from pipelines.warehouse import table_columns, table_exists

NO_ID = "-"
# What ``item_id`` holds: the record's id (business id or surface id), its position in the
# page when it has no usable id, or nothing (a whole page could not be read).
ITEM_ID, ITEM_POSITION, ITEM_PAGE = "id", "position", "page"


@dataclass(frozen=True)
class QuarantineEntry:
    """One record a page-to-rows function could not normalize (pure data, no I/O)."""

    entity: str
    item_id: str  # the record's business id, else its position in the page ("entry[3]")
    reason: str  # PHI-free: names the problem, never a value
    patient_ref_type: str | None = None
    patient_ref_value: str | None = None
    item_kind: str = ITEM_ID


def quarantine_schema() -> pa.Schema:
    return pa.schema(
        [
            ("quarantine_id", STR),
            ("connection_id", STR),
            ("source_surface", STR),
            ("entity", STR),
            ("raw_ref", STR),
            ("item_id", STR),
            ("item_kind", STR),
            ("reason", STR),
            ("patient_ref_type", STR),
            ("patient_ref_value", STR),
            ("first_seen_at", TS),
            ("attempts", pa.int64()),
            ("source_updated_at", TS),
            ("resolved_at", TS),
        ]
    )


QUARANTINE_HINTS = dlt.mark.make_hints(
    table_name=QUARANTINE_TABLE,
    write_disposition="merge",
    primary_key=["quarantine_id"],
)


def quarantine_row(
    entry: QuarantineEntry, connection_id: str, surface: str, raw_ref: str, seen_at: datetime
) -> dict[str, Any]:
    """The ``raw.quarantine`` row of one entry; its id is stable for (page, record, entity),
    so replaying the page (renormalize, a retried load) never duplicates it."""
    item = entry.item_id if entry.item_id not in (None, "") else NO_ID
    kind = ITEM_PAGE if item == NO_ID else entry.item_kind
    key = hashlib.sha256(f"{raw_ref}|{item}|{entry.entity}".encode()).hexdigest()[:32]
    return {
        "quarantine_id": key,
        "connection_id": connection_id,
        "source_surface": surface,
        "entity": entry.entity,
        "raw_ref": raw_ref,
        "item_id": item,
        "item_kind": kind,
        "reason": entry.reason,
        "patient_ref_type": entry.patient_ref_type,
        "patient_ref_value": entry.patient_ref_value,
        "first_seen_at": seen_at,
        "attempts": 1,
        "source_updated_at": None,
        "resolved_at": None,
    }


def _has_resolution_column(con: duckdb.DuckDBPyConnection) -> bool:
    return table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE) and "resolved_at" in table_columns(
        con, STAGING_SCHEMA, QUARANTINE_TABLE
    )


def resolve_quarantine(con: duckdb.DuckDBPyConnection, connection_id: str) -> int:
    """Mark the connection's unresolved entries whose record has since loaded in good shape.

    * An entry with the record's id is resolved by a staged row of the same surface and
      entity with that id (business id or surface id; for a Data Model order, its order
      id) ingested at or after the entry was first seen.
    * An entry known only by its position (the record had no usable id) is resolved when a
      later load (ingested after it) brings that patient's records of the entity from a
      page on which nothing of that patient and entity was quarantined: the patient's
      records were fetched again and all of them read.
    * A whole unreadable page (no record known) is never resolved here; dismiss it.

    Called by ``publish_connection`` after each load; returns the entries resolved."""
    if not _has_resolution_column(con):
        return 0
    q = f"{STAGING_SCHEMA}.{QUARANTINE_TABLE}"
    has_kind = "item_kind" in table_columns(con, STAGING_SCHEMA, QUARANTINE_TABLE)
    by_id = f"coalesce(q.item_kind, '{ITEM_ID}') = '{ITEM_ID}'" if has_kind else "true"
    by_position = f"q.item_kind = '{ITEM_POSITION}'" if has_kind else "false"
    resolved = 0
    for surface in SURFACES:
        for entity in ENTITIES:
            table = staged_table_name(surface, entity)
            if not table_exists(con, STAGING_SCHEMA, table):
                continue
            keys = [ENTITY_KEY[entity] if entity != "patients" else "source_id", "source_id"]
            if entity == "results":
                keys.append("order_id")  # a Data Model order quarantined as a whole
            match = " OR ".join(f's."{k}" = q.item_id' for k in dict.fromkeys(keys))
            n = con.execute(
                f"""UPDATE {q} SET resolved_at = now() WHERE quarantine_id IN (
                    SELECT q.quarantine_id FROM {q} q
                    WHERE q.connection_id = $conn AND q.source_surface = $surface AND q.entity = $entity
                      AND q.resolved_at IS NULL AND q.item_id <> '{NO_ID}'
                      AND (
                        ({by_id} AND EXISTS (
                            SELECT 1 FROM {STAGING_SCHEMA}.{table} s
                            WHERE s.connection_id = q.connection_id AND ({match})
                              AND s.ingested_at >= q.first_seen_at))
                        OR ({by_position} AND q.patient_ref_value IS NOT NULL AND EXISTS (
                            SELECT 1 FROM {STAGING_SCHEMA}.{table} s
                            WHERE s.connection_id = q.connection_id
                              AND s.patient_ref_type = q.patient_ref_type
                              AND s.patient_ref_value = q.patient_ref_value
                              AND s.ingested_at > q.first_seen_at
                              AND NOT EXISTS (
                                SELECT 1 FROM {q} q2
                                WHERE q2.connection_id = q.connection_id AND q2.raw_ref = s.raw_ref
                                  AND q2.entity = q.entity
                                  AND q2.patient_ref_value IS NOT DISTINCT FROM q.patient_ref_value)))
                      ))""",
                {"conn": connection_id, "surface": surface, "entity": entity},
            ).fetchone()
            resolved += int(n[0]) if n else 0
    return resolved


def unresolved_quarantine_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Unresolved quarantine entries per connection (what the quarantine-rate check counts)."""
    if not table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE):
        return {}
    where = " WHERE resolved_at IS NULL" if _has_resolution_column(con) else ""
    rows = con.execute(
        f"SELECT connection_id, count(*) FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE}{where} GROUP BY 1"
    ).fetchall()
    return {cid: int(n) for cid, n in rows}


def unresolved_entries(con: duckdb.DuckDBPyConnection, connection_id: str) -> list[dict[str, Any]]:
    """What a sync should fetch again for one connection: surface, entity, business id and
    patient reference of every unresolved entry (PHI: for the pipeline's use, never to print)."""
    if not _has_resolution_column(con):
        return []
    cols = ("source_surface", "entity", "item_id", "patient_ref_type", "patient_ref_value", "raw_ref")
    rows = con.execute(
        f"SELECT {', '.join(cols)} FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} "
        "WHERE connection_id = ? AND resolved_at IS NULL ORDER BY first_seen_at, quarantine_id",
        [connection_id],
    ).fetchall()
    return [dict(zip(cols, r, strict=True)) for r in rows]
