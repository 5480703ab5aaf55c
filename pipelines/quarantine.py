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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
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


_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT"}


def ensure_quarantine_table(con: duckdb.DuckDBPyConnection) -> None:
    """Create an empty ``raw.quarantine`` as dlt would (same columns and types), so queries
    on it work from the first sync on, before anything was ever quarantined. dlt loads into
    an existing table as into its own."""
    if table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE):
        return
    columns = []
    for f in quarantine_schema():
        sql_type = "TIMESTAMP WITH TIME ZONE" if pa.types.is_timestamp(f.type) else _DUCKDB_TYPES[f.type]
        columns.append(f"{f.name} {sql_type}{' NOT NULL' if f.name == 'quarantine_id' else ''}")
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {STAGING_SCHEMA}")
    con.execute(f"CREATE TABLE IF NOT EXISTS {STAGING_SCHEMA}.{QUARANTINE_TABLE} ({', '.join(columns)})")


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
            # The patient an entry names: by the row's own reference, or for a patient found by
            # its MR (an identifier search), by the patient row's MR.
            same_patient = (
                "(s.patient_ref_type = q.patient_ref_type AND s.patient_ref_value = q.patient_ref_value)"
            )
            if entity == "patients":
                same_patient += " OR (q.patient_ref_type = 'MR' AND s.mrn = q.patient_ref_value)"
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
                              AND ({same_patient})
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
    """Open quarantine entries per connection: neither resolved by a later load nor dismissed
    by a person (what the quarantine-rate check counts)."""
    if not table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE):
        return {}
    rows = con.execute(
        f"SELECT q.connection_id, count(*) FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} q "
        f"WHERE {_open_sql(con)} GROUP BY 1"
    ).fetchall()
    return {cid: int(n) for cid, n in rows}


def unresolved_entries(con: duckdb.DuckDBPyConnection, connection_id: str) -> list[dict[str, Any]]:
    """What a sync should fetch again for one connection: surface, entity, business id and
    patient reference of every open entry (not resolved, not dismissed). PHI: for the
    pipeline's use, never to print."""
    if not _has_resolution_column(con):
        return []
    cols = ("source_surface", "entity", "item_id", "patient_ref_type", "patient_ref_value", "raw_ref")
    rows = con.execute(
        f"SELECT {', '.join('q.' + c for c in cols)} FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} q "
        f"WHERE q.connection_id = ? AND {_open_sql(con)} ORDER BY q.first_seen_at, q.quarantine_id",
        [connection_id],
    ).fetchall()
    return [dict(zip(cols, r, strict=True)) for r in rows]


# ---- a person's decisions: retry and dismiss -----------------------------------------------------
#
# Decisions live in ``ops`` beside the dlt-managed ``raw.quarantine``: a merge of a replayed
# page (renormalize, a retried load) rewrites the quarantine row and would erase anything
# stored in it. ``ops.quarantine_numbers`` gives every entry a small stable number for the
# CLI (``--id 12``); numbers are assigned once and never reused.

DISMISSED, RETRY = "dismissed", "retry"
DECISIONS_DDL = """
CREATE SCHEMA IF NOT EXISTS ops;
CREATE TABLE IF NOT EXISTS ops.quarantine_decisions (
    quarantine_id VARCHAR PRIMARY KEY,
    connection_id VARCHAR NOT NULL,
    decision VARCHAR NOT NULL,           -- 'dismissed' | 'retry'
    decided_at TIMESTAMPTZ NOT NULL,
    reason VARCHAR                       -- a person's words (dismiss --reason); never from a server
);
CREATE TABLE IF NOT EXISTS ops.quarantine_numbers (
    n BIGINT PRIMARY KEY,
    quarantine_id VARCHAR NOT NULL UNIQUE
);
"""
MAX_DISMISS_REASON = 200


def create_decision_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(DECISIONS_DDL)


def _decisions_exist(con: duckdb.DuckDBPyConnection) -> bool:
    return table_exists(con, "ops", "quarantine_decisions")


def _record_key_sql(alias: str) -> str:
    """The record a quarantine row is about, across syncs: a record with an id is the same
    record whenever it comes back (same surface, entity and id); one known by its position
    is the same when the patient, entity and reason are; anything else is only itself."""
    a = alias
    return f"""CASE
        WHEN coalesce({a}.item_kind, '{ITEM_ID}') = '{ITEM_ID}' AND {a}.item_id <> '{NO_ID}'
            THEN {a}.source_surface || '|' || {a}.entity || '|id|' || {a}.item_id
        WHEN {a}.item_kind = '{ITEM_POSITION}' AND {a}.patient_ref_value IS NOT NULL
            THEN {a}.source_surface || '|' || {a}.entity || '|pos|' || coalesce({a}.patient_ref_type, '')
                 || '|' || {a}.patient_ref_value || '|' || {a}.reason
        ELSE 'row|' || {a}.quarantine_id END"""


def _dismissed_sql(alias: str) -> str:
    """True when a person dismissed this row's record (the row itself or an earlier row of the
    same record: a dismissed record quarantined again on a later pull stays dismissed)."""
    other = f"{alias}_dismissed"
    return f"""EXISTS (
        SELECT 1 FROM ops.quarantine_decisions d
        JOIN {STAGING_SCHEMA}.{QUARANTINE_TABLE} {other} ON {other}.quarantine_id = d.quarantine_id
        WHERE d.decision = '{DISMISSED}' AND {other}.connection_id = {alias}.connection_id
          AND ({_record_key_sql(other)}) = ({_record_key_sql(alias)}))"""


def _open_sql(con: duckdb.DuckDBPyConnection, alias: str = "q") -> str:
    """The predicate of an open entry: not resolved and not dismissed."""
    parts = []
    if _has_resolution_column(con):
        parts.append(f"{alias}.resolved_at IS NULL")
    if _decisions_exist(con) and _has_item_kind(con):
        parts.append(f"NOT {_dismissed_sql(alias)}")
    return " AND ".join(parts) or "true"


def _has_item_kind(con: duckdb.DuckDBPyConnection) -> bool:
    return "item_kind" in table_columns(con, STAGING_SCHEMA, QUARANTINE_TABLE)


def patients_to_refetch(con: duckdb.DuckDBPyConnection, connection_id: str) -> list[tuple[str, str]]:
    """(identifier type, value) of every patient with an open quarantine entry of this
    connection: the runner makes them due so their records are fetched again at the next
    sync, until each loads (resolved) or a person dismisses it. PHI: for the pipeline only."""
    if not table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE) or not _has_item_kind(con):
        return []
    rows = con.execute(
        f"SELECT DISTINCT q.patient_ref_type, q.patient_ref_value FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} q "
        f"WHERE q.connection_id = ? AND q.patient_ref_value IS NOT NULL AND q.patient_ref_value <> '' "
        f"AND q.patient_ref_type IS NOT NULL AND {_open_sql(con)} ORDER BY 1, 2",
        [connection_id],
    ).fetchall()
    from pipelines.panel import canonical_system

    # In the panel's spelling (``ops.patient_panel.id_system``): "fhir", "MR", "EPI", a URI.
    return sorted({(canonical_system(str(t)), str(v)) for t, v in rows})


def _number_entries(con: duckdb.DuckDBPyConnection) -> None:
    """Give every entry without a number the next ones, oldest first (stable for the CLI)."""
    con.execute(
        f"""INSERT INTO ops.quarantine_numbers
            SELECT coalesce((SELECT max(n) FROM ops.quarantine_numbers), 0)
                   + row_number() OVER (ORDER BY q.first_seen_at, q.quarantine_id), q.quarantine_id
            FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} q
            WHERE q.quarantine_id NOT IN (SELECT quarantine_id FROM ops.quarantine_numbers)"""
    )


@dataclass(frozen=True)
class QuarantineRecord:
    """One quarantined record as the CLI shows it: its rows across syncs folded into one.

    ``item_key`` and ``patient_key`` are pseudonyms (salted hashes), never the id or MRN."""

    number: int  # the record's newest row's number (what --id takes)
    quarantine_id: str
    connection_id: str
    surface: str
    entity: str
    item_kind: str
    item_key: str
    patient_key: str | None
    reason: str
    first_seen_at: datetime | None
    last_seen_at: datetime | None
    attempts: int
    state: str  # open | resolved | dismissed
    resolved_at: datetime | None
    dismissed_at: datetime | None
    dismissed_reason: str | None
    retry_requested_at: datetime | None
    numbers: tuple[int, ...]  # every row of the record

    def as_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k, v in out.items():
            if isinstance(v, datetime):
                out[k] = v.isoformat()
        out["numbers"] = list(self.numbers)
        return out


_SAFE_POSITION = re.compile(r"^(?:[A-Za-z]+\[\d{1,9}\]\.?){1,4}$")


def _item_key(salt: str, connection_id: str, kind: str, item_id: str) -> str:
    """What the CLI shows for a record: a position is ours ("entry[3]"), an id is a pseudonym."""
    if item_id == NO_ID:
        return "page"
    if kind == ITEM_POSITION and _SAFE_POSITION.match(item_id):
        return item_id
    return "id:" + hashlib.sha256(f"{salt}|{connection_id}|record|{item_id}".encode()).hexdigest()[:12]


def safe_reason_text(reason: Any, limit: int = 160) -> str:
    """A stored reason as one printable line (the reasons are ours, but a line is a line)."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(reason or ""))
    return text[:limit]


def quarantine_records(
    con: duckdb.DuckDBPyConnection,
    *,
    connection_ids: Sequence[str] | None = None,
    include_closed: bool = False,
    salt: str | None = None,
) -> list[QuarantineRecord]:
    """The quarantined records (open ones, or every one with ``include_closed``), PHI-free:
    numbers, vocabulary, dates, counts and pseudonymous keys. Numbers new entries (writes)."""
    if not table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE) or not _has_item_kind(con):
        return []
    create_decision_tables(con)
    _number_entries(con)
    if salt is None:
        from pipelines.panel import _salt, create_tables

        create_tables(con)
        salt = _salt(con)
    resolved = "q.resolved_at" if _has_resolution_column(con) else "CAST(NULL AS TIMESTAMPTZ)"
    where = "true"
    params: list[Any] = []
    if connection_ids:
        where = f"q.connection_id IN ({', '.join('?' for _ in connection_ids)})"
        params = list(connection_ids)
    rows = con.execute(
        f"""WITH rows AS (
              SELECT q.*, {resolved} AS resolved, ({_record_key_sql("q")}) AS record_key, nm.n,
                     d.decision, d.decided_at, d.reason AS decision_reason
              FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} q
              JOIN ops.quarantine_numbers nm USING (quarantine_id)
              LEFT JOIN ops.quarantine_decisions d USING (quarantine_id)
              WHERE {where})
            SELECT connection_id, record_key,
                   arg_max(quarantine_id, n), max(n), any_value(source_surface), any_value(entity),
                   arg_max(coalesce(item_kind, '{ITEM_ID}'), n), arg_max(item_id, n),
                   arg_max(patient_ref_type, n), arg_max(patient_ref_value, n), arg_max(reason, n),
                   min(first_seen_at), max(first_seen_at), count(*),
                   -- a record is resolved when its newest row is
                   arg_max(resolved, n),
                   max(decided_at) FILTER (WHERE decision = '{DISMISSED}'),
                   arg_max(decision_reason, decided_at) FILTER (WHERE decision = '{DISMISSED}'),
                   max(decided_at) FILTER (WHERE decision = '{RETRY}'),
                   list(n ORDER BY n)
            FROM rows GROUP BY connection_id, record_key
            ORDER BY connection_id, max(n)""",
        params,
    ).fetchall()
    out = []
    for r in rows:
        (
            cid,
            _key,
            qid,
            number,
            surface,
            entity,
            kind,
            item_id,
            ref_type,
            ref_value,
            reason,
            first,
            last,
            attempts,
            resolved_at,
            dismissed_at,
            dismissed_reason,
            retry_at,
            numbers,
        ) = r
        state = "resolved" if resolved_at is not None else "dismissed" if dismissed_at is not None else "open"
        if state != "open" and not include_closed:
            continue
        out.append(
            QuarantineRecord(
                number=int(number),
                quarantine_id=str(qid),
                connection_id=str(cid),
                surface=str(surface),
                entity=str(entity),
                item_kind=str(kind),
                item_key=_item_key(salt, cid, str(kind), str(item_id)),
                patient_key=_patient_key(salt, cid, ref_type, ref_value),
                reason=safe_reason_text(reason),
                first_seen_at=first,
                last_seen_at=last,
                attempts=int(attempts),
                state=state,
                resolved_at=resolved_at,
                dismissed_at=dismissed_at,
                dismissed_reason=safe_reason_text(dismissed_reason) if dismissed_reason else None,
                retry_requested_at=retry_at,
                numbers=tuple(int(n) for n in numbers),
            )
        )
    return out


def _patient_key(salt: str, connection_id: str, ref_type: str | None, ref_value: str | None) -> str | None:
    """The patient's pseudonym, the same key ``redox-elt panel list`` shows for the patient."""
    if not ref_value:
        return None
    from pipelines.panel import canonical_system, pseudonym

    return pseudonym(salt, connection_id, canonical_system(str(ref_type or "")), str(ref_value))


class QuarantineSelectionError(ValueError):
    """A ``--id`` that names no entry (of the connection asked for)."""


def _rows_of_numbers(
    con: duckdb.DuckDBPyConnection, numbers: Sequence[int], connection_ids: Sequence[str] | None
) -> list[tuple[str, str]]:
    """(quarantine_id, connection_id) of every row of the records the numbers name."""
    create_decision_tables(con)
    _number_entries(con)
    found = con.execute(
        f"""SELECT nm.n, q.quarantine_id, q.connection_id, ({_record_key_sql("q")})
            FROM ops.quarantine_numbers nm JOIN {STAGING_SCHEMA}.{QUARANTINE_TABLE} q USING (quarantine_id)
            WHERE nm.n IN ({", ".join("?" for _ in numbers)})""",
        [int(n) for n in numbers],
    ).fetchall()
    by_number = {int(n): (qid, cid, key) for n, qid, cid, key in found}
    missing = [n for n in numbers if int(n) not in by_number]
    if missing:
        raise QuarantineSelectionError(
            f"no quarantine entry {', '.join(str(n) for n in missing[:10])} "
            "(see the numbers with `redox-elt quarantine list --all`)"
        )
    if connection_ids:
        other = [n for n, (_, cid, _) in by_number.items() if cid not in connection_ids]
        if other:
            raise QuarantineSelectionError(
                f"entry {other[0]} belongs to another connection than {', '.join(connection_ids)}"
            )
    keys = {(cid, key) for _, cid, key in by_number.values()}
    rows = con.execute(
        f"SELECT q.quarantine_id, q.connection_id, q.connection_id || '\x1f' || ({_record_key_sql('q')}) "
        f"FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} q"
    ).fetchall()
    wanted = {f"{cid}\x1f{key}" for cid, key in keys}
    return [(qid, cid) for qid, cid, k in rows if k in wanted]


def dismiss_entries(
    con: duckdb.DuckDBPyConnection,
    numbers: Sequence[int],
    reason: str | None = None,
    *,
    connection_ids: Sequence[str] | None = None,
    now: datetime | None = None,
) -> int:
    """A person's decision that these records will not load: they stop counting as unresolved
    and are no longer fetched (also when the record is quarantined again later). -> rows."""
    if not table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE) or not _has_item_kind(con):
        raise QuarantineSelectionError("this warehouse has no quarantine entries")
    note = safe_reason_text(reason, MAX_DISMISS_REASON) if reason else None
    at = now or datetime.now(UTC)
    rows = _rows_of_numbers(con, numbers, connection_ids)
    for qid, cid in rows:
        con.execute(
            "INSERT OR REPLACE INTO ops.quarantine_decisions VALUES (?, ?, ?, ?, ?)",
            [qid, cid, DISMISSED, at, note],
        )
    return len(rows)


def retry_entries(
    con: duckdb.DuckDBPyConnection,
    numbers: Sequence[int] | None = None,
    *,
    connection_ids: Sequence[str] | None = None,
    now: datetime | None = None,
) -> int:
    """Ask for these records (all of the connections', without numbers) to be fetched again at
    the next sync: a dismissal is undone and the request is recorded. -> records affected."""
    if not table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE) or not _has_item_kind(con):
        if numbers:
            raise QuarantineSelectionError("this warehouse has no quarantine entries")
        return 0
    create_decision_tables(con)
    _number_entries(con)
    at = now or datetime.now(UTC)
    if numbers:
        rows = _rows_of_numbers(con, numbers, connection_ids)
    else:
        where = _open_sql(con)  # open ones: undoing a dismissal takes its number
        params: list[Any] = []
        if connection_ids:
            where += f" AND q.connection_id IN ({', '.join('?' for _ in connection_ids)})"
            params = list(connection_ids)
        rows = [
            (str(a), str(b))
            for a, b in con.execute(
                f"SELECT q.quarantine_id, q.connection_id FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} q WHERE {where}",
                params,
            ).fetchall()
        ]
    for qid, cid in rows:
        con.execute(
            "INSERT OR REPLACE INTO ops.quarantine_decisions VALUES (?, ?, ?, ?, NULL)", [qid, cid, RETRY, at]
        )
    return len(rows)


def open_entries_on_pages(con: duckdb.DuckDBPyConnection, connection_id: str, raw_refs: Sequence[str]) -> int:
    """Unresolved entries quarantined from the landed pages ``raw_refs``."""
    if not raw_refs or not table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE):
        return 0
    row = con.execute(
        f"SELECT count(*) FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} "
        "WHERE connection_id = ? AND resolved_at IS NULL AND list_contains(?, raw_ref)",
        [connection_id, list(raw_refs)],
    ).fetchone()
    return int(row[0]) if row else 0


def resolve_unattributed(
    con: duckdb.DuckDBPyConnection, connection_id: str, surface: str, before: datetime
) -> int:
    """Resolve the entries of multi-patient listings (discovery by date, a bulk export file):
    a record known only by its position, whose patient nobody can name.

    Called when a discovery of the connection and surface that started after them read clean
    (no error, nothing quarantined): every patient the listing shows is then in the panel, and
    a patient's own pull fetches all of their records — the defective one included."""
    if not _has_resolution_column(con):
        return 0
    row = con.execute(
        f"""UPDATE {STAGING_SCHEMA}.{QUARANTINE_TABLE} SET resolved_at = now()
            WHERE connection_id = ? AND source_surface = ? AND resolved_at IS NULL
              AND item_kind = '{ITEM_POSITION}' AND patient_ref_value IS NULL AND first_seen_at < ?""",
        [connection_id, surface, before],
    ).fetchone()
    return int(row[0]) if row else 0


def quarantined_enterprise_ids(con: duckdb.DuckDBPyConnection, connection_id: str) -> frozenset[str]:
    """Enterprise ids of a network connection's patients with an unresolved entry (the entry
    names the patient by the network's MR or by the enterprise id itself)."""
    patients = staged_table_name("datamodel", "patients")
    if not table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE):
        return frozenset()
    q = f"{STAGING_SCHEMA}.{QUARANTINE_TABLE}"
    sql = f"SELECT patient_ref_value FROM {q} WHERE connection_id = $c AND resolved_at IS NULL AND patient_ref_type = 'EPI'"
    if table_exists(con, STAGING_SCHEMA, patients):
        sql += f""" UNION SELECT p.enterprise_id FROM {q} q JOIN {STAGING_SCHEMA}.{patients} p
                   ON p.connection_id = q.connection_id AND q.patient_ref_type = 'MR' AND p.mrn = q.patient_ref_value
                   WHERE q.connection_id = $c AND q.resolved_at IS NULL"""
    return frozenset(v for (v,) in con.execute(sql, {"c": connection_id}).fetchall() if v)
