"""The audit trail: one tamper-evident record per outbound API call.

Records are appended to a JSONL file as the calls happen (so a killed sync keeps what it did)
and loaded into the warehouse table ``audit.api_calls``. Each record carries ``prev_hash`` (the
previous record's ``hash``) and ``hash`` = sha256 over a canonical serialisation of all its
other fields, so editing, removing or reordering any record breaks the chain from that record
on. ``verify_audit`` recomputes the chain from the warehouse table in ``seq`` order.

Records hold operations, never data: the path *template* (``/fhir/R4/{slug}/{env}/Patient/_search``),
never query values, ids or bodies. Several processes may append to one file: each append
takes an exclusive ``flock`` and continues the chain from the file's last complete record.
"""

from __future__ import annotations

import contextvars
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS_HASH = "0" * 64
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# Every field that the hash covers, in the order they appear in the file and the table.
HASHED_FIELDS = (
    "seq",
    "called_at",
    "connection_id",
    "surface",
    "operation",
    "method",
    "path_template",
    "status_code",
    "duration_ms",
    "record_count",
    "attempt",
    "error",
    "run_id",
    "caller",
    "prev_hash",
)
FIELDS = HASHED_FIELDS + ("hash",)
TABLE = "audit.api_calls"
_DDL = f"""
create schema if not exists audit;
create table if not exists {TABLE} (
    seq bigint not null,
    called_at timestamptz not null,
    connection_id varchar,
    surface varchar,
    operation varchar,
    method varchar,
    path_template varchar,
    status_code integer,
    duration_ms double,
    record_count bigint,
    attempt integer,
    error varchar,
    run_id varchar,
    caller varchar,
    prev_hash varchar not null,
    hash varchar not null
);
"""
_FSYNC_INTERVAL_S = 1.0
_TAIL_CHUNK = 64 * 1024


class AuditError(Exception):
    """The audit trail cannot be written, read or loaded; the message names the file and record."""


# Who is calling (a Dagster run, a CLI sync, a test): set around a unit of work.
_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("redox_audit_run_id", default=None)
_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("redox_audit_caller", default=None)


@contextmanager
def audit_context(*, run_id: str | None = None, caller: str | None = None) -> Iterator[None]:
    """Attribute the calls made inside the block to ``run_id`` / ``caller`` (e.g. a job or asset)."""
    tokens = []
    if run_id is not None:
        tokens.append((_run_id, _run_id.set(run_id)))
    if caller is not None:
        tokens.append((_caller, _caller.set(caller)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def canonical_bytes(record: dict[str, Any]) -> bytes:
    """The bytes the hash is computed over: the hashed fields as compact, key-sorted JSON."""
    return json.dumps(
        {f: record.get(f) for f in HASHED_FIELDS}, sort_keys=True, separators=(",", ":")
    ).encode("utf-8")


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(record)).hexdigest()


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


@dataclass(frozen=True)
class CallRecord:
    """What the client knows about one finished outbound call."""

    connection_id: str | None
    surface: str  # "fhir" | "datamodel" | "auth"
    operation: str  # e.g. "search Patient", "Results.Query", "token"
    method: str
    path_template: str
    status_code: int | None  # None when no response arrived (connect error, timeout)
    duration_ms: float
    called_at: datetime
    record_count: int | None = None
    attempt: int = 1
    error: str | None = None  # exception class or failure kind, never a message with data


class AuditLog:
    """Appends hash-chained records to a JSONL file; safe across threads and processes."""

    def __init__(
        self, path: str | os.PathLike[str], *, run_id: str | None = None, caller: str | None = None
    ) -> None:
        self.path = Path(path).expanduser()
        self.run_id = run_id
        self.caller = caller
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._known_size = -1
        self._last_seq = 0
        self._last_hash = GENESIS_HASH
        self._last_fsync = time.monotonic()
        self.records_written = 0

    def __repr__(self) -> str:
        return f"AuditLog(path={str(self.path)!r})"

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def _sync_tail(self, fd: int, size: int) -> None:
        """Find the last complete record (dropping a half-written line left by a killed writer)."""
        end = size
        data = b""
        while end > 0:
            start = max(0, end - _TAIL_CHUNK)
            data = os.pread(fd, end - start, start) + data
            end = start
            if data.count(b"\n") >= 2 or (end == 0):
                break
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1  # 0 when the file holds a single partial line
            os.ftruncate(fd, end + keep)
            data = data[:keep]
        lines = data.splitlines()
        if not lines:
            self._last_seq, self._last_hash = 0, GENESIS_HASH
        else:
            try:
                last = json.loads(lines[-1])
                self._last_seq, self._last_hash = int(last["seq"]), str(last["hash"])
            except (ValueError, KeyError, TypeError):
                raise AuditError(
                    f"audit file {self.path}: the last record is unreadable; the chain cannot be continued "
                    "(inspect the file; it may have been edited)"
                ) from None
        self._known_size = os.fstat(fd).st_size

    def record(self, call: CallRecord) -> dict[str, Any]:
        """Append one record for ``call`` and return it (with seq, prev_hash and hash)."""
        with self._lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size != self._known_size:
                    self._sync_tail(fd, size)
                entry: dict[str, Any] = {
                    "seq": self._last_seq + 1,
                    "called_at": format_time(call.called_at),
                    "connection_id": call.connection_id,
                    "surface": call.surface,
                    "operation": call.operation,
                    "method": call.method,
                    "path_template": call.path_template,
                    "status_code": call.status_code,
                    "duration_ms": float(round(call.duration_ms, 3)),
                    "record_count": call.record_count,
                    "attempt": call.attempt,
                    "error": call.error,
                    "run_id": _run_id.get() or self.run_id,
                    "caller": _caller.get() or self.caller,
                    "prev_hash": self._last_hash,
                }
                entry["hash"] = record_hash(entry)
                line = (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8")
                written = os.write(fd, line)
                if written != len(line):
                    raise AuditError(f"audit file {self.path}: short write ({written} of {len(line)} bytes)")
                self._known_size = size + len(line) if self._known_size == size else os.fstat(fd).st_size
                self._last_seq, self._last_hash = entry["seq"], entry["hash"]
                self.records_written += 1
                now = time.monotonic()
                if now - self._last_fsync >= _FSYNC_INTERVAL_S:
                    os.fsync(fd)
                    self._last_fsync = now
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return entry

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = None
                    self._known_size = -1


# ---- the warehouse side ----------------------------------------------------------------------


def read_audit_file(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """Complete records of a JSONL audit file and how many lines were unreadable.

    A trailing line without its newline (a writer killed mid-line) is not a record and is
    ignored; unreadable complete lines are counted, and the chain check will point at the
    record after them.
    """
    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    records, bad = [], 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if (
                not isinstance(record, dict)
                or not isinstance(record.get("seq"), int)
                or not record.get("hash")
            ):
                raise ValueError
        except ValueError:
            bad += 1
            continue
        records.append(record)
    return records, bad


@dataclass(frozen=True)
class LoadResult:
    inserted: int
    already_present: int
    unreadable_lines: int


def _connect(warehouse: Any, *, read_only: bool = False) -> tuple[Any, bool]:
    """A DuckDB connection for a path or an existing connection; -> (connection, we_opened_it)."""
    import duckdb

    if isinstance(warehouse, str | os.PathLike):
        Path(warehouse).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return duckdb.connect(str(Path(warehouse).expanduser()), read_only=read_only), True
    return warehouse, False


def load_audit_into_duckdb(jsonl_path: str | os.PathLike[str], warehouse: Any) -> LoadResult:
    """Append the file's records that ``audit.api_calls`` does not hold yet (idempotent).

    ``warehouse`` is a DuckDB file path or an open DuckDB connection. Loading the same file
    again inserts nothing. A file whose records disagree with the table at the same ``seq``
    belongs to another chain and is refused rather than mixed in.
    """
    import pyarrow as pa

    path = Path(jsonl_path).expanduser()
    records, bad = read_audit_file(path) if path.exists() else ([], 0)
    con, opened = _connect(warehouse)
    try:
        con.execute(_DDL)
        # fetchall, not fetchone: DuckDB 2.0 keeps a half-read result open on the connection.
        (row,) = con.execute(f"select max(seq) from {TABLE}").fetchall()
        max_seq = int(row[0]) if row[0] is not None else 0
        if max_seq and records:
            file_hash = next((r["hash"] for r in records if r["seq"] == max_seq), None)
            if file_hash is not None:
                table_hash = con.execute(
                    f"select hash from {TABLE} where seq = ? limit 1", [max_seq]
                ).fetchall()[0][0]
                if table_hash != file_hash:
                    raise AuditError(
                        f"audit file {path} does not continue the chain in {TABLE} (record seq {max_seq} differs); "
                        "each warehouse must be fed from one audit file"
                    )
        new = [r for r in records if r["seq"] > max_seq]
        if new:
            columns: dict[str, Any] = {}
            for name in FIELDS:
                values = [r.get(name) for r in new]
                if name == "called_at":
                    columns[name] = pa.array(
                        [datetime.strptime(v, TIME_FORMAT).replace(tzinfo=UTC) for v in values],
                        pa.timestamp("us", tz="UTC"),
                    )
                elif name in ("seq", "record_count"):
                    columns[name] = pa.array(values, pa.int64())
                elif name in ("status_code", "attempt"):
                    columns[name] = pa.array(values, pa.int32())
                elif name == "duration_ms":
                    columns[name] = pa.array(values, pa.float64())
                else:
                    columns[name] = pa.array(values, pa.string())
            batch = pa.table(columns)
            con.register("_audit_batch", batch)
            try:
                con.execute(
                    f"insert into {TABLE} ({', '.join(FIELDS)}) select {', '.join(FIELDS)} from _audit_batch"
                )
            finally:
                con.unregister("_audit_batch")
        return LoadResult(inserted=len(new), already_present=len(records) - len(new), unreadable_lines=bad)
    finally:
        if opened:
            con.close()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    first_bad_seq: int | None
    reason: str
    records: int

    def __iter__(self) -> Iterator[Any]:  # (ok, first_bad_seq, reason) unpacking
        return iter((self.ok, self.first_bad_seq, self.reason))


_SELECT = (
    f"select {', '.join('strftime(called_at at time zone ' + repr('UTC') + ', ' + repr(TIME_FORMAT) + ')' if f == 'called_at' else f for f in FIELDS)} "
    f"from {TABLE} order by seq, rowid"
)


def verify_audit(warehouse: Any) -> VerifyResult:
    """Recompute the hash chain of ``audit.api_calls`` in seq order.

    Returns ``(ok, first_bad_seq, reason)`` (a VerifyResult, which also unpacks that way).
    """
    import duckdb

    if isinstance(warehouse, str | os.PathLike):
        path = Path(warehouse).expanduser()
        if not path.exists():
            return VerifyResult(False, None, f"no warehouse at {path}", 0)
        try:
            con, opened = duckdb.connect(str(path), read_only=True), True
        except duckdb.Error as exc:
            return VerifyResult(
                False, None, f"cannot open {path} ({type(exc).__name__}: {str(exc)[:200]})", 0
            )
    else:
        con, opened = warehouse, False
    try:
        try:
            cursor = con.execute(_SELECT)
        except Exception as exc:  # duckdb.CatalogException and friends: no table to verify
            return VerifyResult(False, None, f"{TABLE} cannot be read ({type(exc).__name__})", 0)
        expected_seq, prev_hash, count = 1, GENESIS_HASH, 0
        while True:
            rows = cursor.fetchmany(10_000)
            if not rows:
                break
            for row in rows:
                record = dict(zip(FIELDS, row, strict=True))
                count += 1
                seq = record["seq"]
                if seq != expected_seq:
                    if seq < expected_seq:
                        return VerifyResult(False, seq, f"record seq {seq} appears more than once", count)
                    missing = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
                    return VerifyResult(False, seq, f"records {missing} are missing before seq {seq}", count)
                if record["prev_hash"] != prev_hash:
                    return VerifyResult(
                        False,
                        seq,
                        f"record seq {seq}: prev_hash does not match record {seq - 1} (chain broken)",
                        count,
                    )
                if record_hash(record) != record["hash"]:
                    return VerifyResult(
                        False, seq, f"record seq {seq}: hash mismatch (the record was modified)", count
                    )
                expected_seq, prev_hash = seq + 1, record["hash"]
        if count == 0:
            return VerifyResult(True, None, f"{TABLE} is empty", 0)
        return VerifyResult(True, None, f"{count} records verified (seq 1..{expected_seq - 1})", count)
    finally:
        if opened:
            con.close()
