"""The audit trail: one hash-chained record per call, loaded into DuckDB idempotently, tamper-evident."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from resources.audit import (
    GENESIS_HASH,
    AuditLog,
    CallRecord,
    audit_context,
    load_audit_into_duckdb,
    read_audit_file,
    record_hash,
    verify_audit,
)


def _call(i: int, status: int | None = 200) -> CallRecord:
    return CallRecord(
        connection_id="northwind-fhir",
        surface="fhir",
        operation="search Patient",
        method="POST",
        path_template="/fhir/R4/{slug}/{env}/Patient/_search",
        status_code=status,
        duration_ms=1.25 + i,
        called_at=datetime(2026, 11, 1, 12, 0, i % 60, 123456, tzinfo=UTC),
        record_count=i,
    )


def _write(path: Path, n: int) -> list[dict]:
    log = AuditLog(path, run_id="run-1", caller="test")
    try:
        return [log.record(_call(i)) for i in range(n)]
    finally:
        log.close()


def test_records_chain_from_genesis(tmp_path: Path) -> None:
    records = _write(tmp_path / "a.jsonl", 3)
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev_hash"] == GENESIS_HASH
    assert records[1]["prev_hash"] == records[0]["hash"] and records[2]["prev_hash"] == records[1]["hash"]
    assert all(record_hash(r) == r["hash"] for r in records)
    assert records[0]["run_id"] == "run-1" and records[0]["caller"] == "test"


def test_audit_context_attributes_calls(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", run_id="default-run")
    with audit_context(run_id="dagster-run-7", caller="asset:patients"):
        inside = log.record(_call(0))
    outside = log.record(_call(1))
    log.close()
    assert (inside["run_id"], inside["caller"]) == ("dagster-run-7", "asset:patients")
    assert (outside["run_id"], outside["caller"]) == ("default-run", None)


def test_load_verify_and_tamper_detection(tmp_path: Path) -> None:
    jsonl, warehouse = tmp_path / "a.jsonl", tmp_path / "w.duckdb"
    _write(jsonl, 5)
    result = load_audit_into_duckdb(jsonl, warehouse)
    assert (result.inserted, result.already_present) == (5, 0)
    assert tuple(verify_audit(warehouse)) == (True, None, "5 records verified (seq 1..5)")
    # What the acceptance check does: edit one row in place.
    con = duckdb.connect(str(warehouse))
    con.execute(
        "update audit.api_calls set status_code = 299 where rowid = (select min(rowid) + 1 from audit.api_calls)"
    )
    con.close()
    ok, bad_seq, reason = verify_audit(warehouse)
    assert not ok and bad_seq == 2 and "hash mismatch" in reason


def test_deleted_and_reordered_records_are_caught(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    _write(jsonl, 6)
    deleted = tmp_path / "deleted.duckdb"
    load_audit_into_duckdb(jsonl, deleted)
    with duckdb.connect(str(deleted)) as con:
        con.execute("delete from audit.api_calls where seq = 3")
    ok, bad_seq, reason = verify_audit(deleted)
    assert not ok and bad_seq == 4 and "missing" in reason

    relinked = tmp_path / "relinked.duckdb"
    load_audit_into_duckdb(jsonl, relinked)
    with duckdb.connect(str(relinked)) as con:  # a forger renumbers to hide the gap
        con.execute("delete from audit.api_calls where seq = 3")
        con.execute("update audit.api_calls set seq = seq - 1 where seq > 3")
    ok, bad_seq, reason = verify_audit(relinked)
    assert not ok and bad_seq == 3 and "prev_hash" in reason


def test_reloading_is_idempotent_and_appends_only_new_records(tmp_path: Path) -> None:
    jsonl, warehouse = tmp_path / "a.jsonl", tmp_path / "w.duckdb"
    _write(jsonl, 3)
    load_audit_into_duckdb(jsonl, warehouse)
    assert load_audit_into_duckdb(jsonl, warehouse).inserted == 0
    _write(jsonl, 2)  # a later sync continues the same chain
    assert load_audit_into_duckdb(jsonl, warehouse).inserted == 2
    with duckdb.connect(str(warehouse)) as con:
        assert con.execute("select count(*), count(distinct seq) from audit.api_calls").fetchone() == (5, 5)
    assert verify_audit(warehouse).ok


def test_killed_writer_partial_line_still_loads_and_the_chain_continues(tmp_path: Path) -> None:
    jsonl, warehouse = tmp_path / "a.jsonl", tmp_path / "w.duckdb"
    _write(jsonl, 3)
    with jsonl.open("ab") as handle:
        handle.write(b'{"seq":4,"called_at":"2026-11-')  # a writer killed mid-line
    assert load_audit_into_duckdb(jsonl, warehouse).inserted == 3
    _write(jsonl, 2)  # the next writer drops the half line and continues from seq 3
    records, unreadable = read_audit_file(jsonl)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5] and unreadable == 0
    load_audit_into_duckdb(jsonl, warehouse)
    assert verify_audit(warehouse).ok


def test_two_writers_on_one_file_share_one_chain(tmp_path: Path) -> None:
    jsonl, warehouse = tmp_path / "a.jsonl", tmp_path / "w.duckdb"
    logs = [AuditLog(jsonl), AuditLog(jsonl)]  # separate descriptors, like two processes

    def hammer(log: AuditLog) -> None:
        for i in range(50):
            log.record(_call(i))

    threads = [threading.Thread(target=hammer, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    load_audit_into_duckdb(jsonl, warehouse)
    result = verify_audit(warehouse)
    assert result.ok and result.records == 100


def test_a_foreign_chain_is_refused(tmp_path: Path) -> None:
    warehouse = tmp_path / "w.duckdb"
    _write(tmp_path / "a.jsonl", 2)
    load_audit_into_duckdb(tmp_path / "a.jsonl", warehouse)
    log = AuditLog(tmp_path / "b.jsonl", run_id="other")
    log.record(_call(30))
    log.record(_call(31))
    log.close()
    from resources.audit import AuditError

    with pytest.raises(AuditError, match="does not continue the chain"):
        load_audit_into_duckdb(tmp_path / "b.jsonl", warehouse)


def test_verify_reports_missing_warehouse(tmp_path: Path) -> None:
    ok, bad_seq, reason = verify_audit(tmp_path / "nope.duckdb")
    assert not ok and bad_seq is None and "no warehouse" in reason


def test_audit_file_is_owner_only(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "new" / "calls.jsonl")
    log.record(
        CallRecord(
            connection_id="c",
            surface="fhir",
            operation="search Patient",
            method="POST",
            path_template="/x",
            status_code=200,
            duration_ms=1.0,
            called_at=datetime.now(UTC),
        )
    )
    log.close()
    assert (tmp_path / "new" / "calls.jsonl").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
