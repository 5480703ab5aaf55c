"""Where a sync writes: the DuckDB file (default) and its side folders, with a
single-writer lock so two syncs never write one DuckDB file at once."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

DEFAULT_WAREHOUSE = Path("warehouse") / "redox.duckdb"
log = logging.getLogger(__name__)


def table_exists(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            [schema, table],
        ).fetchone()[0]
    )


def table_columns(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> list[str]:
    return [
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
            "ORDER BY ordinal_position",
            [schema, table],
        ).fetchall()
    ]


class WarehouseBusy(RuntimeError):
    """Another process holds the warehouse's writer lock."""


@dataclass(frozen=True)
class WarehousePaths:
    duckdb: Path  # the DuckDB file (staging + model; the lake mirrors the model tables)
    destination: str = "duckdb"  # "duckdb" | "parquet"

    @property
    def root(self) -> Path:
        return self.duckdb.parent

    @property
    def landing_root(self) -> Path:
        return self.root / f"{self.duckdb.stem}.landing"

    @property
    def lake_root(self) -> Path:
        return self.root / "lake"

    @property
    def dlt_dir(self) -> Path:
        return self.root / f".{self.duckdb.stem}.dlt"

    @property
    def audit_log(self) -> Path:
        return self.root / f"{self.duckdb.stem}.audit.jsonl"

    @property
    def lock_file(self) -> Path:
        return self.root / f".{self.duckdb.name}.lock"

    @classmethod
    def at(cls, path: str | Path | None, destination: str = "duckdb") -> WarehousePaths:
        if destination not in ("duckdb", "parquet"):
            raise ValueError(f"destination must be 'duckdb' or 'parquet', got {destination!r}")
        p = Path(path) if path else DEFAULT_WAREHOUSE
        if p.suffix != ".duckdb":
            p = p / "redox.duckdb"  # a directory: the lake and the staging file live in it
        p.parent.mkdir(parents=True, exist_ok=True)
        return cls(duckdb=p.resolve(), destination=destination)


class WriterLock:
    """An advisory ``flock`` held for a whole sync. A SIGKILLed holder releases it
    with its file descriptor, so a crash never leaves the warehouse locked."""

    def __init__(self, paths: WarehousePaths, wait_s: float = 600.0) -> None:
        self.path = paths.lock_file
        self.wait_s = wait_s
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    # Said once, so two syncs on one warehouse never interleave silently
                    # (the CLI prints warnings as plain "redox-elt: ..." lines).
                    log.warning(
                        "waiting for the writer lock: another sync is writing %s (up to %g s)",
                        self.path.parent,
                        self.wait_s,
                    )
                    told = True
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise WarehouseBusy(
                        f"another sync is writing {self.path.parent} (lock {self.path.name})"
                    ) from None
                time.sleep(0.2)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
