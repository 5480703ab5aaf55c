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


@dataclass(frozen=True)
class QuarantineEntry:
    """One record a page-to-rows function could not normalize (pure data, no I/O)."""

    entity: str
    item_id: str  # the record's business id, else its position in the page ("entry[3]")
    reason: str  # PHI-free: names the problem, never a value
    patient_ref_type: str | None = None
    patient_ref_value: str | None = None


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
    key = hashlib.sha256(f"{raw_ref}|{item}|{entry.entity}".encode()).hexdigest()[:32]
    return {
        "quarantine_id": key,
        "connection_id": connection_id,
        "source_surface": surface,
        "entity": entry.entity,
        "raw_ref": raw_ref,
        "item_id": item,
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
    """Mark the connection's unresolved entries whose record has since loaded in good shape
    (a staged row of the same surface and entity, same business id or surface id, ingested
    at or after the entry was first seen). Call after each load; returns entries resolved."""
    if not _has_resolution_column(con):
        return 0
    resolved = 0
    q = f"{STAGING_SCHEMA}.{QUARANTINE_TABLE}"
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
                    JOIN {STAGING_SCHEMA}.{table} s
                      ON s.connection_id = q.connection_id
                     AND ({match})
                     AND s.ingested_at >= q.first_seen_at
                    WHERE q.connection_id = $conn AND q.source_surface = $surface AND q.entity = $entity
                      AND q.resolved_at IS NULL AND q.item_id <> '{NO_ID}')""",
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
