"""The inbox: every distinct pushed message, stored durably before Redox gets its 200.

Why SQLite and not the DuckDB warehouse: DuckDB allows one writing process per file, and a
sync holds the warehouse's writer lock for minutes. Deliveries must keep flowing while syncs
run (Redox waits for each 200 before sending the next message), so the inbox is its own
SQLite file beside the warehouse (``<stem>.inbox.sqlite``). SQLite in WAL mode lets the
receiver write while ``webhook stats`` and the processing read, and with
``synchronous=FULL`` every commit is fsync'd before it returns: a 200 is only sent after the
commit, so a crash after answering never loses a message, and a crash before answering leads
to a redelivery that meets its own row (a duplicate). The file is owner-only (0600): bodies
hold PHI.

Throughput comes from group commit: the receiver hands each message to one writer thread,
which writes everything queued meanwhile in one transaction (one fsync for the batch) and
then releases every waiting request.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipelines.inbox.envelope import Envelope
from pipelines.warehouse import WarehousePaths

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    dedupe_key TEXT NOT NULL UNIQUE,
    key_kind TEXT NOT NULL,
    family TEXT NOT NULL,
    data_model TEXT,
    event_type TEXT,
    event_at TEXT,
    connection_id TEXT,
    source_name TEXT,
    source_ref TEXT,
    received_at TEXT NOT NULL,
    last_received_at TEXT NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 1,
    body_bytes INTEGER NOT NULL,
    body BLOB NOT NULL,
    quarantine_reason TEXT,
    processed_at TEXT,
    raw_ref TEXT,
    process_attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_pending ON messages (processed_at, seq);
CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at);
"""
BUSY_TIMEOUT_MS = 30_000
# A group commit takes whatever is queued, up to these bounds.
MAX_BATCH_MESSAGES = 1024
MAX_BATCH_BYTES = 64 * 1024 * 1024


class InboxError(RuntimeError):
    """The inbox file cannot be opened or written (one line, no content)."""


def inbox_path(paths: WarehousePaths) -> Path:
    """The inbox file beside the warehouse's DuckDB file."""
    return paths.root / f"{paths.duckdb.stem}.inbox.sqlite"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def connect(path: Path, *, create: bool) -> sqlite3.Connection:
    """Open the inbox (WAL, synchronous=FULL). ``create`` makes it (owner-only) if missing."""
    if not path.exists():
        if not create:
            raise InboxError(f"no webhook inbox at {path} (start `redox-elt webhook serve` first)")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    try:
        con = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = FULL")
        if create:
            con.executescript(SCHEMA)
    except sqlite3.Error as exc:
        raise InboxError(f"webhook inbox {path} cannot be opened ({type(exc).__name__})") from None
    for sidecar in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):
            os.chmod(sidecar, 0o600)
    return con


@dataclass(frozen=True)
class Delivery:
    envelope: Envelope
    body: bytes
    connection_id: str | None
    received_at: str


def store_batch(con: sqlite3.Connection, deliveries: Sequence[Delivery]) -> list[bool]:
    """Insert ``deliveries`` in one transaction; -> per delivery, True when it was a duplicate."""
    duplicate: list[bool] = []
    con.execute("BEGIN IMMEDIATE")
    try:
        for d in deliveries:
            e = d.envelope
            cur = con.execute(
                "INSERT OR IGNORE INTO messages (dedupe_key, key_kind, family, data_model, event_type, "
                "event_at, connection_id, source_name, source_ref, received_at, last_received_at, "
                "body_bytes, body, quarantine_reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    e.dedupe_key,
                    e.key_kind,
                    e.family,
                    e.data_model,
                    e.event_type,
                    e.event_at,
                    d.connection_id,
                    e.source_name,
                    e.source_ref,
                    d.received_at,
                    d.received_at,
                    len(d.body),
                    d.body,
                    e.quarantine_reason,
                ),
            )
            if cur.rowcount == 0:
                con.execute(
                    "UPDATE messages SET deliveries = deliveries + 1, last_received_at = ? WHERE dedupe_key = ?",
                    (d.received_at, e.dedupe_key),
                )
                duplicate.append(True)
            else:
                duplicate.append(False)
        con.execute("COMMIT")  # synchronous=FULL: the WAL is fsync'd before this returns
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        raise
    return duplicate


class GroupCommitWriter:
    """One thread owning the inbox's write connection; ``submit`` returns a future that is
    resolved (True = duplicate) only after the message's transaction has committed."""

    def __init__(self, path: Path) -> None:
        self._con = connect(path, create=True)
        self._queue: queue.SimpleQueue[tuple[Delivery, Future[bool]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inbox-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, delivery: Delivery) -> Future[bool]:
        fut: Future[bool] = Future()
        if self._closed:
            fut.set_exception(InboxError("the inbox writer is shut down"))
            return fut
        self._queue.put((delivery, fut))
        return fut

    def _take_batch(
        self, first: tuple[Delivery, Future[bool]]
    ) -> tuple[list[tuple[Delivery, Future[bool]]], bool]:
        batch, size, stop = [first], len(first[0].body), False
        while len(batch) < MAX_BATCH_MESSAGES and size < MAX_BATCH_BYTES:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
            size += len(item[0].body)
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._take_batch(first)
            try:
                duplicates = store_batch(self._con, [d for d, _ in batch])
            except Exception as exc:  # disk full, I/O error: nothing of the batch is stored
                error = InboxError(f"webhook inbox write failed ({type(exc).__name__})")
                for _, fut in batch:
                    fut.set_exception(error)
            else:
                for (_, fut), dup in zip(batch, duplicates, strict=True):
                    fut.set_result(dup)
            if stop:
                break
        self._con.close()

    def close(self) -> None:
        """Write what is queued, then stop."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()


def stats(con: sqlite3.Connection) -> dict[str, int]:
    row = con.execute(
        "SELECT count(*), coalesce(sum(deliveries - 1), 0), "
        "coalesce(sum(quarantine_reason IS NOT NULL), 0), coalesce(sum(processed_at IS NULL), 0) "
        "FROM messages"
    ).fetchone()
    return {
        "distinct_messages": int(row[0]),
        "duplicates_dropped": int(row[1]),
        "quarantined": int(row[2]),
        "pending_processing": int(row[3]),
    }


@dataclass(frozen=True)
class StoredMessage:
    seq: int
    dedupe_key: str
    family: str
    data_model: str | None
    event_type: str | None
    event_at: str | None
    connection_id: str | None
    source_name: str | None
    source_ref: str | None
    received_at: str
    body: bytes
    quarantine_reason: str | None


_COLUMNS = (
    "seq, dedupe_key, family, data_model, event_type, event_at, connection_id, source_name, "
    "source_ref, received_at, body, quarantine_reason"
)


def pending(con: sqlite3.Connection, limit: int = 500) -> list[StoredMessage]:
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE processed_at IS NULL ORDER BY seq LIMIT ?", (limit,)
    ).fetchall()
    return [StoredMessage(*r) for r in rows]


def received_since(
    con: sqlite3.Connection, since: str, after_seq: int, limit: int = 500
) -> list[StoredMessage]:
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE received_at >= ? AND seq > ? ORDER BY seq LIMIT ?",
        (since, after_seq, limit),
    ).fetchall()
    return [StoredMessage(*r) for r in rows]


def mark_processed(con: sqlite3.Connection, outcomes: Sequence[tuple[int, str | None, str | None]]) -> None:
    """``(seq, connection_id, quarantine_reason)`` per processed message, in one transaction."""
    now = _now()
    con.execute("BEGIN IMMEDIATE")
    try:
        con.executemany(
            "UPDATE messages SET processed_at = ?, process_attempts = process_attempts + 1, "
            "connection_id = coalesce(?, connection_id), quarantine_reason = coalesce(?, quarantine_reason) "
            "WHERE seq = ?",
            [(now, conn, reason, seq) for seq, conn, reason in outcomes],
        )
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def opened(path: Path, *, create: bool = False) -> Iterator[sqlite3.Connection]:
    con = connect(path, create=create)
    try:
        yield con
    finally:
        con.close()


def received_now() -> str:
    return _now()
