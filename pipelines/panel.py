"""The patient panel: who a connection's pulls are for, how each patient was found, and when
each is due again.

Redox has no "list every patient" query (REDOX-REFERENCE, "Decisions"): a client learns *who*
from a roster it owns, from pushed events, from the few queries that take no patient
(encounters by date, booked appointments by time range, the census), from a bulk export where
the connection is entitled to one, and — for clinical networks — from the enterprise ids other
connections know. ``ops.patient_panel`` holds one row per (connection, identifier) with those
ways in, the activity seen, the last full pull and the next pull due; it is the state of the
per-patient pulls (they carry no dlt cursor), and it moves only over what loaded.

``ops.panel_pending`` holds roster rows given by demographics (given, family, birth date) until
a Patient search or ``PatientSearch.Query`` resolves them to an identifier.

Everything this module prints or returns for display is PHI-free: counts, dates, ``found_by``
and a pseudonymous key (a salted hash, never an MRN or a name).
"""

from __future__ import annotations

import csv
import hashlib
import io
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

FOUND_BY = ("roster", "encounter_window", "booked_window", "census", "event", "bulk", "network_match")
# Why a patient is due, in the order pulls spend the budget (lower first).
REASON_RANK = {"event": 0, "activity": 1, "new_patient": 2, "full": 3, "refresh": 4, "retry": 5}
# The client budget's priority for each reason (resources/client budget contract).
REASON_PRIORITY = {
    "event": "event",
    "activity": "event",
    "new_patient": "new_patient",
    "full": "refresh",
    "refresh": "refresh",
    "retry": "refresh",
}
DEFAULT_REFRESH_DAYS = 7
FHIR_ID_SYSTEM = "fhir"  # a row known only by its FHIR logical id (found through FHIR discovery)

PANEL_DDL = """
CREATE SCHEMA IF NOT EXISTS ops;
CREATE TABLE IF NOT EXISTS ops.patient_panel (
    connection_id VARCHAR NOT NULL,
    id_system VARCHAR NOT NULL,          -- identifier type (MR, EHRID, EPI, ...), 'fhir', or a URI
    id_value VARCHAR NOT NULL,
    fhir_id VARCHAR,                     -- FHIR logical id once resolved
    mrn VARCHAR,                         -- MR once resolved (merges rows found by different ids)
    found_by VARCHAR NOT NULL,           -- the first way in
    found_ways VARCHAR[] NOT NULL,       -- every way seen
    first_seen_at TIMESTAMPTZ NOT NULL,
    first_activity_at TIMESTAMPTZ,
    last_activity_at TIMESTAMPTZ,
    last_change_seen_at TIMESTAMPTZ,     -- latest record update a discovery or event showed
    last_full_pull_at TIMESTAMPTZ,       -- start of the last pull whose rows loaded
    next_pull_due_at TIMESTAMPTZ,
    pull_priority INTEGER,               -- REASON_RANK of pull_reason
    pull_reason VARCHAR,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    last_error VARCHAR,                  -- PHI-free: an error class and codes
    last_attempt_at TIMESTAMPTZ,
    not_found BOOLEAN NOT NULL DEFAULT false,  -- the last pull found no such patient
    PRIMARY KEY (connection_id, id_system, id_value)
);
CREATE TABLE IF NOT EXISTS ops.panel_pending (
    connection_id VARCHAR NOT NULL,
    pending_key VARCHAR NOT NULL,
    given VARCHAR NOT NULL,
    family VARCHAR NOT NULL,
    birth_date DATE NOT NULL,
    added_at TIMESTAMPTZ NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    outcome VARCHAR,                     -- NULL (pending) | resolved | no_match | ambiguous
    PRIMARY KEY (connection_id, pending_key)
);
CREATE TABLE IF NOT EXISTS ops.panel_salt (salt VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS ops.connection_capabilities (
    connection_id VARCHAR NOT NULL,
    capability VARCHAR NOT NULL,         -- fhir_revinclude | fhir_elements | bulk_backfill | discovered
    value VARCHAR NOT NULL,              -- 'true' | 'false' | an ISO instant
    learned_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (connection_id, capability)
);
"""


class RosterError(ValueError):
    """A roster file is not usable; the message names the line and the fix, never a value."""


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(PANEL_DDL)


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC)


# ---- identifiers -------------------------------------------------------------------------------


def canonical_system(system: str) -> str:
    """``urn:redox:<slug>:MR`` -> ``MR`` (the identifier type, the Data Model's IDType); a bare
    type is upper-cased; any other URI is kept as given."""
    system = system.strip()
    if system.lower().startswith("urn:redox:") and system.count(":") >= 3:
        return system.rsplit(":", 1)[1].upper()
    if ":" not in system and "/" not in system:
        return FHIR_ID_SYSTEM if system.lower() == FHIR_ID_SYSTEM else system.upper()
    return system


def fhir_identifier_token(id_system: str, id_value: str, destination_slug: str | None) -> str:
    """The FHIR ``identifier`` search token for a panel identifier."""
    if ":" not in id_system and "/" not in id_system:
        if not destination_slug:
            raise RosterError(f"identifier type {id_system} needs the connection's destination_slug")
        return f"urn:redox:{destination_slug}:{id_system}|{id_value}"
    return f"{id_system}|{id_value}"


def datamodel_id_type(id_system: str) -> str:
    """The Data Model IDType for a panel identifier: the last segment of a URI."""
    return id_system.rsplit(":", 1)[-1].upper() if ":" in id_system else id_system.upper()


def _salt(con: duckdb.DuckDBPyConnection) -> str:
    row = con.execute("SELECT salt FROM ops.panel_salt LIMIT 1").fetchone()
    if row:
        return row[0]
    salt = secrets.token_hex(16)
    con.execute("INSERT INTO ops.panel_salt VALUES (?)", [salt])
    return salt


def pseudonym(salt: str, connection_id: str, id_system: str, id_value: str) -> str:
    """A stable key that names a panel row without revealing its identifier (salted per warehouse)."""
    return hashlib.sha256(f"{salt}|{connection_id}|{id_system}|{id_value}".encode()).hexdigest()[:16]


# ---- ways in -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sighting:
    """One patient seen by a way in. ``changed_at`` is the latest record update seen (a record's
    lastUpdated, or its clinical time where the surface has no update time); a change after the
    last full pull makes the patient due."""

    id_system: str
    id_value: str
    found_by: str
    activity_at: datetime | None = None
    changed_at: datetime | None = None
    fhir_id: str | None = None
    mrn: str | None = None


@dataclass
class RosterImport:
    added: int = 0  # new panel rows
    already: int = 0  # rows already in the panel (now also marked roster)
    pending: int = 0  # demographic rows waiting for resolution
    skipped_blank: int = 0


def read_roster(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str, date]], int]:
    """Parse a roster CSV: header ``system,value`` or ``given,family,birthdate``.
    -> (identifiers, demographics, blank lines skipped)."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise RosterError(
            "roster is empty: expected a header 'system,value' or 'given,family,birthdate'"
        ) from None
    idents: list[tuple[str, str]] = []
    demos: list[tuple[str, str, date]] = []
    blank = 0
    if header[:2] == ["system", "value"]:
        for n, row in enumerate(reader, start=2):
            if not any(c.strip() for c in row):
                blank += 1
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise RosterError(f"roster line {n}: needs a system and a value (columns system,value)")
            idents.append((canonical_system(row[0]), row[1].strip()))
    elif header[:3] == ["given", "family", "birthdate"]:
        for n, row in enumerate(reader, start=2):
            if not any(c.strip() for c in row):
                blank += 1
                continue
            if len(row) < 3 or not all(c.strip() for c in row[:3]):
                raise RosterError(f"roster line {n}: needs given, family and birthdate")
            try:
                born = date.fromisoformat(row[2].strip())
            except ValueError:
                raise RosterError(f"roster line {n}: birthdate must be YYYY-MM-DD") from None
            demos.append((row[0].strip(), row[1].strip(), born))
    else:
        raise RosterError(
            "roster header must be 'system,value' (identifiers) or 'given,family,birthdate' (demographics)"
        )
    return idents, demos, blank


def add_roster(
    con: duckdb.DuckDBPyConnection,
    connection_id: str,
    source: str | Path,
    *,
    now: datetime | None = None,
) -> RosterImport:
    """Import a roster CSV (a path or its text) into the panel of one connection. Idempotent:
    re-importing the same file adds nothing."""
    create_tables(con)
    text = Path(source).read_text(encoding="utf-8") if isinstance(source, Path) else str(source)
    idents, demos, blank = read_roster(text)
    result = RosterImport(skipped_blank=blank)
    at = _now(now)
    for system, value in idents:
        new = record_sighting(con, connection_id, Sighting(system, value, "roster"), now=at)
        if new:
            result.added += 1
        else:
            result.already += 1
    for given, family, born in demos:
        key = hashlib.sha256(f"{given.lower()}|{family.lower()}|{born.isoformat()}".encode()).hexdigest()[:32]
        inserted = con.execute(
            "INSERT INTO ops.panel_pending (connection_id, pending_key, given, family, birth_date, added_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING 1",
            [connection_id, key, given, family, born, at],
        ).fetchall()
        result.pending += len(inserted)
    return result


def _find_row(
    con: duckdb.DuckDBPyConnection, connection_id: str, sighting: Sighting
) -> tuple[str, str] | None:
    """The panel row that is this patient: same identifier, or the same FHIR id / MRN resolved."""
    s = sighting
    row = con.execute(
        """
        SELECT id_system, id_value FROM ops.patient_panel
        WHERE connection_id = ? AND (
            (id_system = ? AND id_value = ?)
            OR (? IS NOT NULL AND fhir_id = ?)
            OR (? = 'fhir' AND fhir_id = ?)
            OR (? IS NOT NULL AND mrn = ?)
            OR (? = 'MR' AND mrn = ?))
        ORDER BY (id_system = 'fhir'), id_system, id_value
        LIMIT 1
        """,
        [
            connection_id,
            s.id_system,
            s.id_value,
            s.fhir_id,
            s.fhir_id,
            s.id_system,
            s.id_value,
            s.mrn,
            s.mrn,
            s.id_system,
            s.id_value,
        ],
    ).fetchone()
    return (row[0], row[1]) if row else None


def record_sighting(
    con: duckdb.DuckDBPyConnection, connection_id: str, sighting: Sighting, *, now: datetime | None = None
) -> bool:
    """Add a patient to the panel or update its row; -> True when the row is new.

    New patients are due now (``new_patient``; ``event`` when an event named them). A known
    patient becomes due when an event names it or a change after its last full pull is seen.
    """
    if sighting.found_by not in FOUND_BY:
        raise ValueError(f"found_by must be one of {', '.join(FOUND_BY)}")
    at = _now(now)
    s = sighting
    existing = _find_row(con, connection_id, s)
    if existing is None:
        reason = "event" if s.found_by == "event" else "new_patient"
        con.execute(
            """
            INSERT INTO ops.patient_panel (connection_id, id_system, id_value, fhir_id, mrn, found_by,
                found_ways, first_seen_at, first_activity_at, last_activity_at, last_change_seen_at,
                next_pull_due_at, pull_priority, pull_reason)
            VALUES (?, ?, ?, ?, ?, ?, [?], ?, ?, ?, ?, ?, ?, ?)
            """,
            [
                connection_id,
                s.id_system,
                s.id_value,
                s.fhir_id or (s.id_value if s.id_system == FHIR_ID_SYSTEM else None),
                s.mrn or (s.id_value if s.id_system == "MR" else None),
                s.found_by,
                s.found_by,
                at,
                s.activity_at,
                s.activity_at,
                s.changed_at,
                at,
                REASON_RANK[reason],
                reason,
            ],
        )
        return True
    system, value = existing
    reason = "event" if s.found_by == "event" else "activity"
    con.execute(
        """
        UPDATE ops.patient_panel SET
            found_ways = list_distinct(list_append(found_ways, ?)),
            fhir_id = coalesce(fhir_id, ?),
            mrn = coalesce(mrn, ?),
            first_activity_at = CASE WHEN ? IS NULL THEN first_activity_at
                ELSE least(coalesce(first_activity_at, ?), ?) END,
            last_activity_at = CASE WHEN ? IS NULL THEN last_activity_at
                ELSE greatest(coalesce(last_activity_at, ?), ?) END,
            last_change_seen_at = CASE WHEN ? IS NULL THEN last_change_seen_at
                ELSE greatest(coalesce(last_change_seen_at, ?), ?) END,
            -- due now when an event names it, or a change after its last full pull shows up
            next_pull_due_at = CASE
                WHEN ? OR (? IS NOT NULL AND last_full_pull_at IS NOT NULL AND ? > last_full_pull_at)
                THEN least(coalesce(next_pull_due_at, ?), ?) ELSE next_pull_due_at END,
            pull_reason = CASE
                WHEN (? OR (? IS NOT NULL AND last_full_pull_at IS NOT NULL AND ? > last_full_pull_at))
                     AND coalesce(pull_priority, 99) > ? THEN ? ELSE pull_reason END,
            pull_priority = CASE
                WHEN (? OR (? IS NOT NULL AND last_full_pull_at IS NOT NULL AND ? > last_full_pull_at))
                THEN least(coalesce(pull_priority, 99), ?) ELSE pull_priority END
        WHERE connection_id = ? AND id_system = ? AND id_value = ?
        """,
        [
            s.found_by,
            s.fhir_id,
            s.mrn,
            s.activity_at,
            s.activity_at,
            s.activity_at,
            s.activity_at,
            s.activity_at,
            s.activity_at,
            s.changed_at,
            s.changed_at,
            s.changed_at,
            s.found_by == "event",
            s.changed_at,
            s.changed_at,
            at,
            at,
            s.found_by == "event",
            s.changed_at,
            s.changed_at,
            REASON_RANK[reason],
            reason,
            s.found_by == "event",
            s.changed_at,
            s.changed_at,
            REASON_RANK[reason],
            connection_id,
            system,
            value,
        ],
    )
    return False


def record_event(
    con: duckdb.DuckDBPyConnection,
    connection_id: str,
    id_system: str,
    id_value: str,
    *,
    event_at: datetime | None = None,
    fhir_id: str | None = None,
    now: datetime | None = None,
) -> bool:
    """A pushed event named this patient (the webhook receiver calls this): due now, first in
    line. ``id_system`` may be a Redox system URI or an identifier type."""
    return record_sighting(
        con,
        connection_id,
        Sighting(
            canonical_system(id_system), id_value, "event", event_at, event_at or _now(now), fhir_id=fhir_id
        ),
        now=now,
    )


def record_sightings(
    con: duckdb.DuckDBPyConnection,
    connection_id: str,
    sightings: Iterable[Sighting],
    *,
    now: datetime | None = None,
) -> int:
    """Record many sightings in one transaction; -> new panel rows."""
    added = 0
    con.execute("BEGIN")
    try:
        for s in sightings:
            added += record_sighting(con, connection_id, s, now=now)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return added


def pending_demographics(
    con: duckdb.DuckDBPyConnection, connection_id: str
) -> list[tuple[str, str, str, date]]:
    """(pending_key, given, family, birth date) of roster rows not yet resolved."""
    return [
        (r[0], r[1], r[2], r[3])
        for r in con.execute(
            "SELECT pending_key, given, family, birth_date FROM ops.panel_pending "
            "WHERE connection_id = ? AND outcome IS NULL ORDER BY added_at, pending_key",
            [connection_id],
        ).fetchall()
    ]


def resolve_pending(
    con: duckdb.DuckDBPyConnection,
    connection_id: str,
    pending_key: str,
    outcome: str,
    sighting: Sighting | None = None,
    *,
    now: datetime | None = None,
) -> None:
    """Settle a demographic roster row: ``resolved`` adds the identifier found as a roster
    patient; ``no_match``/``ambiguous`` keep it out of the panel (shown in the stats)."""
    if outcome == "resolved" and sighting is not None:
        record_sighting(con, connection_id, sighting, now=now)
    con.execute(
        "UPDATE ops.panel_pending SET outcome = ?, attempts = attempts + 1 "
        "WHERE connection_id = ? AND pending_key = ?",
        [outcome, connection_id, pending_key],
    )


# ---- due ---------------------------------------------------------------------------------------


def mark_all_due(
    con: duckdb.DuckDBPyConnection, connection_id: str, *, now: datetime | None = None, reason: str = "full"
) -> int:
    """``--full``: every panel patient is due now (keeping a more urgent reason)."""
    at = _now(now)
    rows = con.execute(
        """
        UPDATE ops.patient_panel SET next_pull_due_at = least(coalesce(next_pull_due_at, ?), ?),
            pull_reason = CASE WHEN coalesce(pull_priority, 99) > ? THEN ? ELSE pull_reason END,
            pull_priority = least(coalesce(pull_priority, 99), ?)
        WHERE connection_id = ? RETURNING 1
        """,
        [at, at, REASON_RANK[reason], reason, REASON_RANK[reason], connection_id],
    ).fetchall()
    return len(rows)


def mark_identifiers_due(
    con: duckdb.DuckDBPyConnection,
    connection_id: str,
    identifiers: list[tuple[str, str]],
    *,
    reason: str = "retry",
    now: datetime | None = None,
) -> int:
    """These patients are due now (their quarantined records are fetched again until they
    load or a person dismisses them). Identifiers in the panel's spelling; a ``fhir`` id also
    matches a row whose FHIR logical id was resolved later. Returns the rows marked."""
    at = _now(now)
    marked = 0
    for id_system, id_value in identifiers:
        rows = con.execute(
            """
            UPDATE ops.patient_panel SET next_pull_due_at = least(coalesce(next_pull_due_at, ?), ?),
                pull_reason = CASE WHEN coalesce(pull_priority, 99) > ? THEN ? ELSE pull_reason END,
                pull_priority = least(coalesce(pull_priority, 99), ?)
            WHERE connection_id = ?
              AND ((id_system = ? AND id_value = ?) OR (? = 'fhir' AND fhir_id = ?) OR (? = 'MR' AND mrn = ?))
            RETURNING 1
            """,
            [at, at, REASON_RANK[reason], reason, REASON_RANK[reason], connection_id,
             id_system, id_value, id_system, id_value, id_system, id_value],
        ).fetchall()  # fmt: skip
        marked += len(rows)
    return marked


def mark_due_in_window(
    con: duckdb.DuckDBPyConnection,
    connection_id: str,
    start: datetime | None,
    end: datetime | None,
    *,
    now: datetime | None = None,
) -> int:
    """A backfill of ``[start, end)``: re-pull the panel patients with activity in it."""
    at = _now(now)
    rows = con.execute(
        """
        UPDATE ops.patient_panel SET next_pull_due_at = least(coalesce(next_pull_due_at, ?), ?),
            pull_reason = CASE WHEN coalesce(pull_priority, 99) > ? THEN 'refresh' ELSE pull_reason END,
            pull_priority = least(coalesce(pull_priority, 99), ?)
        WHERE connection_id = ?
          AND (? IS NULL OR coalesce(last_activity_at, first_seen_at) >= ?)
          AND (? IS NULL OR coalesce(first_activity_at, first_seen_at) < ?)
        RETURNING 1
        """,
        [at, at, REASON_RANK["refresh"], REASON_RANK["refresh"], connection_id, start, start, end, end],
    ).fetchall()
    return len(rows)


@dataclass(frozen=True)
class DuePatient:
    connection_id: str
    id_system: str
    id_value: str
    fhir_id: str | None
    mrn: str | None
    reason: str
    never_pulled: bool
    found_ways: tuple[str, ...] = ()

    @property
    def priority(self) -> str:
        """The client budget's priority for this pull."""
        return REASON_PRIORITY.get(self.reason, "refresh")


def _effective_reason_sql() -> str:
    # A row past its refresh date without a stored reason is a rolling refresh; never pulled is new.
    return """
        CASE WHEN pull_reason IS NOT NULL THEN pull_reason
             WHEN last_full_pull_at IS NULL THEN 'new_patient'
             WHEN consecutive_failures > 0 THEN 'retry'
             ELSE 'refresh' END
    """


def select_due(
    con: duckdb.DuckDBPyConnection,
    connection_id: str,
    *,
    now: datetime | None = None,
    limit: int | None = None,
) -> list[DuePatient]:
    """Patients due now, most urgent first: events (and new activity), new patients, then the
    rolling refresh by how long ago each was pulled."""
    at = _now(now)
    reason = _effective_reason_sql()
    sql = f"""
        SELECT connection_id, id_system, id_value, fhir_id, mrn, {reason} AS reason,
               last_full_pull_at IS NULL, found_ways
        FROM ops.patient_panel
        WHERE connection_id = ? AND {DUE_SQL}
        ORDER BY CASE {reason} {" ".join(f"WHEN '{k}' THEN {v}" for k, v in REASON_RANK.items())} ELSE 9 END,
                 -- identifier rows before rows known only by a FHIR id: pulling the former first
                 -- resolves the latter, which then fold in without a second pull
                 (id_system = 'fhir'), last_full_pull_at NULLS FIRST, next_pull_due_at, id_system, id_value
    """
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [
        DuePatient(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), tuple(r[7] or ()))
        for r in con.execute(sql, [connection_id, at]).fetchall()
    ]


# A row is due when something asked for a pull (a reason is set: an event, new activity, a new
# patient, --full) or its rolling refresh date passed. A reason makes it due whatever the clock
# says, so a roster imported on this machine's clock is due against a server clock behind it.
DUE_SQL = "(pull_reason IS NOT NULL OR (next_pull_due_at IS NOT NULL AND next_pull_due_at <= ?))"


# ---- after the load ----------------------------------------------------------------------------


@dataclass
class PullOutcome:
    """What one patient's pull did; applied to the panel only after its rows loaded."""

    id_system: str
    id_value: str
    started_at: datetime
    ok: bool
    error: str | None = None  # PHI-free (error class, codes)
    fhir_id: str | None = None
    mrn: str | None = None
    not_found: bool = False
    requests: int = 0
    surfaces: set[str] = field(default_factory=set)
    incomplete: bool = False  # good so far, but a surface is still to come: stays due, no failure


def mark_pulled(
    con: duckdb.DuckDBPyConnection,
    connection_id: str,
    outcomes: Sequence[PullOutcome],
    *,
    refresh_days: int = DEFAULT_REFRESH_DAYS,
) -> dict[str, int]:
    """Apply pull outcomes (call only after the pulled rows loaded). A good pull moves
    ``last_full_pull_at`` to the pull's start and schedules the rolling refresh; a failed one
    keeps the patient due and counts the failure. -> counts per outcome."""
    counts = {"pulled": 0, "failed": 0, "not_found": 0, "merged": 0}
    con.execute("BEGIN")
    try:
        for o in outcomes:
            if o.ok and o.incomplete:
                con.execute(
                    "UPDATE ops.patient_panel SET fhir_id = coalesce(?, fhir_id), mrn = coalesce(?, mrn), "
                    "last_attempt_at = ? WHERE connection_id = ? AND id_system = ? AND id_value = ?",
                    [o.fhir_id, o.mrn, o.started_at, connection_id, o.id_system, o.id_value],
                )
                counts["incomplete"] = counts.get("incomplete", 0) + 1
                counts["merged"] += _merge_same_patient(con, connection_id, o)
            elif o.ok:
                due = o.started_at + timedelta(days=refresh_days)
                con.execute(
                    """
                    UPDATE ops.patient_panel SET
                        last_full_pull_at = greatest(coalesce(last_full_pull_at, ?), ?),
                        -- a change seen after this pull started (an event during the run) keeps it due
                        next_pull_due_at = CASE WHEN last_change_seen_at > ? OR
                                (pull_reason = 'event' AND next_pull_due_at > ?) THEN next_pull_due_at ELSE ? END,
                        pull_reason = CASE WHEN last_change_seen_at > ? THEN pull_reason ELSE NULL END,
                        pull_priority = CASE WHEN last_change_seen_at > ? THEN pull_priority ELSE NULL END,
                        consecutive_failures = 0, last_error = NULL, last_attempt_at = ?,
                        not_found = ?, fhir_id = coalesce(?, fhir_id), mrn = coalesce(?, mrn)
                    WHERE connection_id = ? AND id_system = ? AND id_value = ?
                    """,
                    [
                        o.started_at,
                        o.started_at,
                        o.started_at,
                        o.started_at,
                        due,
                        o.started_at,
                        o.started_at,
                        o.started_at,
                        o.not_found,
                        o.fhir_id,
                        o.mrn,
                        connection_id,
                        o.id_system,
                        o.id_value,
                    ],
                )
                counts["not_found" if o.not_found else "pulled"] += 1
                counts["merged"] += _merge_same_patient(con, connection_id, o)
            else:
                con.execute(
                    """
                    UPDATE ops.patient_panel SET consecutive_failures = consecutive_failures + 1,
                        last_error = ?, last_attempt_at = ?
                    WHERE connection_id = ? AND id_system = ? AND id_value = ?
                    """,
                    [(o.error or "error")[:200], o.started_at, connection_id, o.id_system, o.id_value],
                )
                counts["failed"] += 1
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return counts


def _merge_same_patient(con: duckdb.DuckDBPyConnection, connection_id: str, o: PullOutcome) -> int:
    """A patient found by its FHIR id (discovery) and by its MRN (roster, the other surface) is
    one panel row: once a pull resolves both, the FHIR-id row folds into the identifier row."""
    if not (o.fhir_id and o.mrn):
        return 0
    rows = con.execute(
        """
        SELECT id_system, id_value, found_ways, first_seen_at, first_activity_at, last_activity_at,
               last_full_pull_at
        FROM ops.patient_panel
        WHERE connection_id = ? AND (fhir_id = ? OR mrn = ? OR (id_system = 'MR' AND id_value = ?)
                                     OR (id_system = 'fhir' AND id_value = ?))
        ORDER BY (id_system = 'fhir'), id_system, id_value
        """,
        [connection_id, o.fhir_id, o.mrn, o.mrn, o.fhir_id],
    ).fetchall()
    if len(rows) < 2:
        return 0
    keep, drop = rows[0], rows[1:]
    # The pull state (last pull, next due, reason, failures) of the most recently pulled row wins.
    latest = max(rows, key=lambda r: (r[6] is not None, r[6] or datetime.min.replace(tzinfo=UTC)))
    con.execute(
        """
        UPDATE ops.patient_panel AS k SET last_full_pull_at = s.last_full_pull_at,
            next_pull_due_at = s.next_pull_due_at, pull_reason = s.pull_reason,
            pull_priority = s.pull_priority, consecutive_failures = s.consecutive_failures,
            last_error = s.last_error, last_attempt_at = s.last_attempt_at, not_found = s.not_found
        FROM ops.patient_panel AS s
        WHERE s.connection_id = ? AND s.id_system = ? AND s.id_value = ?
          AND k.connection_id = ? AND k.id_system = ? AND k.id_value = ?
        """,
        [connection_id, latest[0], latest[1], connection_id, keep[0], keep[1]],
    )
    ways = sorted({w for r in rows for w in (r[2] or [])})
    firsts = [r[3] for r in rows]
    acts_lo = [r[4] for r in rows if r[4] is not None]
    acts_hi = [r[5] for r in rows if r[5] is not None]
    con.execute(
        """
        UPDATE ops.patient_panel SET found_ways = ?, first_seen_at = ?, fhir_id = ?, mrn = ?,
            first_activity_at = ?, last_activity_at = ?
        WHERE connection_id = ? AND id_system = ? AND id_value = ?
        """,
        [
            ways,
            min(firsts),
            o.fhir_id,
            o.mrn,
            min(acts_lo) if acts_lo else None,
            max(acts_hi) if acts_hi else None,
            connection_id,
            keep[0],
            keep[1],
        ],
    )
    for r in drop:
        con.execute(
            "DELETE FROM ops.patient_panel WHERE connection_id = ? AND id_system = ? AND id_value = ?",
            [connection_id, r[0], r[1]],
        )
    return len(drop)


# ---- capabilities ------------------------------------------------------------------------------


def get_capability(con: duckdb.DuckDBPyConnection, connection_id: str, capability: str) -> str | None:
    row = con.execute(
        "SELECT value FROM ops.connection_capabilities WHERE connection_id = ? AND capability = ?",
        [connection_id, capability],
    ).fetchone()
    return row[0] if row else None


def set_capability(
    con: duckdb.DuckDBPyConnection,
    connection_id: str,
    capability: str,
    value: str,
    *,
    now: datetime | None = None,
) -> None:
    con.execute(
        "INSERT OR REPLACE INTO ops.connection_capabilities VALUES (?, ?, ?, ?)",
        [connection_id, capability, value, _now(now)],
    )


# ---- PHI-free views ----------------------------------------------------------------------------


def panel_stats(
    con: duckdb.DuckDBPyConnection,
    connection_ids: Sequence[str] | None = None,
    *,
    now: datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """Per connection: patients, due, pulled, never pulled, failing, by found_by (first way) and
    by every way seen, oldest and newest pull, pending demographic rows. Counts and dates only."""
    create_tables(con)
    at = _now(now)
    out: dict[str, dict[str, Any]] = {c: _empty_stats() for c in connection_ids or ()}
    for conn_id, patients, due, pulled, never, failing, not_found, oldest, newest in con.execute(
        """
        SELECT p.connection_id, count(*),
               count(*) FILTER (WHERE pull_reason IS NOT NULL OR next_pull_due_at <= ?
                   + to_seconds(coalesce(TRY_CAST(c.value AS DOUBLE), 0))),
               count(*) FILTER (WHERE last_full_pull_at IS NOT NULL),
               count(*) FILTER (WHERE last_full_pull_at IS NULL),
               count(*) FILTER (WHERE consecutive_failures > 0),
               count(*) FILTER (WHERE not_found),
               min(last_full_pull_at), max(last_full_pull_at)
        FROM ops.patient_panel p
        -- "now" on each connection's server clock (learned by the syncs; about zero against Redox)
        LEFT JOIN ops.connection_capabilities c
          ON c.connection_id = p.connection_id AND c.capability = 'server_clock_offset_s'
        GROUP BY 1 ORDER BY 1
        """,
        [at],
    ).fetchall():
        if connection_ids and conn_id not in connection_ids:
            continue
        out[conn_id] = _empty_stats() | {
            "patients": patients,
            "due": due,
            "pulled": pulled,
            "never_pulled": never,
            "failing": failing,
            "not_found": not_found,
            "oldest_pull_at": oldest.isoformat() if oldest else None,
            "newest_pull_at": newest.isoformat() if newest else None,
        }
    for conn_id, way, n in con.execute(
        "SELECT connection_id, found_by, count(*) FROM ops.patient_panel GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall():
        if conn_id in out:
            out[conn_id]["found_by"][way] = n
    for conn_id, way, n in con.execute(
        "SELECT connection_id, w, count(*) FROM (SELECT connection_id, unnest(found_ways) AS w "
        "FROM ops.patient_panel) GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall():
        if conn_id in out:
            out[conn_id]["seen_by"][way] = n
    for conn_id, n in con.execute(
        "SELECT connection_id, count(*) FROM ops.panel_pending WHERE outcome IS NULL GROUP BY 1"
    ).fetchall():
        if conn_id in out:
            out[conn_id]["pending_demographics"] = n
    return out


def _empty_stats() -> dict[str, Any]:
    return {
        "patients": 0,
        "due": 0,
        "pulled": 0,
        "never_pulled": 0,
        "failing": 0,
        "not_found": 0,
        "pending_demographics": 0,
        "oldest_pull_at": None,
        "newest_pull_at": None,
        "found_by": {},
        "seen_by": {},
    }


def panel_list(
    con: duckdb.DuckDBPyConnection,
    connection_id: str,
    *,
    now: datetime | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """One PHI-free line per panel patient: a pseudonymous key, found_by, dates, due, failures."""
    create_tables(con)
    salt = _salt(con)
    at = _now(now)
    sql = """
        SELECT id_system, id_value, found_by, found_ways, first_seen_at, first_activity_at,
               last_activity_at, last_full_pull_at, next_pull_due_at, pull_reason,
               consecutive_failures, not_found
        FROM ops.patient_panel WHERE connection_id = ?
        ORDER BY first_seen_at, id_system, id_value
    """
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    out = []
    for r in con.execute(sql, [connection_id]).fetchall():
        out.append(
            {
                "key": pseudonym(salt, connection_id, r[0], r[1]),
                "id_kind": r[0] if ":" not in r[0] else "uri",  # the identifier's type, never its value
                "found_by": r[2],
                "found_ways": list(r[3] or []),
                "first_seen_at": _iso(r[4]),
                "first_activity_at": _iso(r[5]),
                "last_activity_at": _iso(r[6]),
                "last_full_pull_at": _iso(r[7]),
                "next_pull_due_at": _iso(r[8]),
                "due": bool(r[9] is not None or (r[8] is not None and r[8] <= at)),
                "pull_reason": r[9],
                "consecutive_failures": r[10],
                "not_found": bool(r[11]),
            }
        )
    return out


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None
