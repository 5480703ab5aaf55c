"""CLI verbs of the extraction layer: ``sync``, ``demo``, ``renormalize``."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipelines.progress import sync_display
from pipelines.sync_context import DEFAULT_DISCOVER_DAYS, SyncWindow

# Records' last-updated times a window can name: nothing predates Unix time, and a bound
# more than a day ahead is a typo (and would overflow day arithmetic near year 9999).
EARLIEST_INSTANT = datetime(1970, 1, 1, tzinfo=UTC)
FUTURE_SLACK = timedelta(days=1)
MAX_DISCOVER_DAYS = 3650


def _parse_instant(value: str | None, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{flag}: not an ISO-8601 date or time: {value!r}") from None
    dt = dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    latest = datetime.now(UTC) + FUTURE_SLACK
    if not EARLIEST_INSTANT <= dt <= latest:
        raise ValueError(f"{flag}: {value!r} is outside {EARLIEST_INSTANT:%Y-%m-%d} .. {latest:%Y-%m-%d}")
    return dt


# A live run re-reads this much before its cursor; more is a backfill (--since/--until), and
# an unbounded value overflows the date arithmetic (1e9 hours is 114,000 years).
MAX_LOOKBACK_HOURS = 24.0 * 30


def one_line(text: object) -> str:
    """An error message as one printable line: a value carrying CR/LF, NUL or other control
    characters (a path, an id) is shown escaped instead of breaking the line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def check_lookback_hours(value: float) -> float:
    """``--lookback-hours``: a finite number of hours from 0 to ``MAX_LOOKBACK_HOURS``."""
    if not math.isfinite(value) or not 0 <= value <= MAX_LOOKBACK_HOURS:
        raise ValueError(
            f"--lookback-hours must be a number from 0 to {MAX_LOOKBACK_HOURS:g}, got {value!r} "
            "(to re-read a longer span, backfill it with --since/--until)"
        )
    return value


def warehouse_location(warehouse: str | Path | None) -> Path:
    """The DuckDB file ``--warehouse`` names, checked before anything is created: its folder
    must exist or be creatable, and be writable; an existing target must be a writable file.
    Raises ``ValueError`` with one line naming the problem and the fix; creates nothing."""
    from pipelines.warehouse import DEFAULT_WAREHOUSE

    target = Path(warehouse) if warehouse else DEFAULT_WAREHOUSE
    if "\x00" in str(target):
        raise ValueError("--warehouse: a path cannot contain a NUL character")
    file = target if target.suffix == ".duckdb" else target / "redox.duckdb"
    fix = "pass --warehouse in a folder you can write"
    if file.exists() and not file.is_file():
        raise ValueError(f"--warehouse: {file} exists and is not a file; {fix}")
    folder = file.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--warehouse: {existing} is not a folder, so {folder} cannot be created; {fix}")
    try:
        # A real write is the only honest test (root passes os.access; a read-only mount does not).
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ValueError(
            f"--warehouse: cannot write in {existing} ({exc.strerror or type(exc).__name__}); {fix}"
        ) from None
    if file.exists():
        try:
            os.close(os.open(file, os.O_RDWR))
        except OSError as exc:
            raise ValueError(
                f"--warehouse: cannot open {file} for writing ({exc.strerror or type(exc).__name__}); {fix}"
            ) from None
    return file


def sync_window(since: str | None, until: str | None) -> SyncWindow:
    """The window ``--since``/``--until`` ask for (``--since`` alone: up to now); raises
    ``ValueError`` with one line."""
    start, end = _parse_instant(since, "--since"), _parse_instant(until, "--until")
    if end is not None and start is None:
        raise ValueError("--until needs --since (a backfill is the window [since, until))")
    if start is not None and end is None:
        # --since alone: a backfill up to now (the live cursor stays where it is).
        end = datetime.now(UTC)
        if start >= end:
            raise ValueError(f"--since {since!r} is in the future; pass a past date or add --until")
    return SyncWindow(start, end)


# What each summary column means, printed under the table (the table is read by people
# who have not read the docs).
SUMMARY_LEGEND = (
    (
        "fetched",
        "records received from Redox in this run, per entity (a record returned by "
        "several queries or in several versions counts each time)",
    ),
    ("in warehouse", "distinct records of the connection now in redox.<entity>, from every run"),
    ("quarantined", "payloads set aside this run (raw.quarantine; redox-elt quarantine list)"),
    ("seconds", "wall time of the connection's run: extract, load and publish"),
)


def _connection_seconds(conn: Any) -> float:
    """The connection's wall time: the runner's measure when it has one, else the steps'."""
    return conn.seconds.get("total") or sum(conn.seconds.values())


def _access_line(conn: Any) -> str | None:
    stats = conn.access
    if stats is None:
        return None
    budget = "" if stats.budget_left is None else f", {stats.budget_left:,} left in the quota"
    errors = sum(stats.errors.values())
    return (
        f"{conn.connection_id} ({stats.mode}): {stats.due:,} patients due, {stats.pulled:,} pulled, "
        f"{stats.deferred:,} deferred, {stats.discovered:,} new; {stats.requests:,} API calls{budget}"
        + (f"; {errors:,} errors" if errors else "")
    )


def _print_summary(report: Any, elapsed: float, stream: Any = None, engine_log: Any = None) -> None:
    """The run's summary, readable at 80 columns: one row per connection (its time and
    quarantine) followed by its entities, a legend for the columns, then each connection's
    patients and API calls in one sentence, and any failure in full on its own line."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    stream = stream or sys.stdout
    console = Console(file=stream, width=None if getattr(stream, "isatty", lambda: False)() else 80)
    table = Table(
        title=f"redox-elt sync {report.run_id[:8]}: {len(report.connections)} connections in {elapsed:.1f} s",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title_justify="left",
    )
    table.add_column("connection / entity", overflow="fold", ratio=1)
    for name in ("fetched", "in warehouse", "quarantined", "seconds"):
        table.add_column(name, justify="right", no_wrap=True)
    failures: list[str] = []
    for conn in report.connections:
        seconds = f"{_connection_seconds(conn):.1f}"
        if conn.error:
            table.add_row(conn.connection_id, "", "", "", seconds)
            table.add_row("  FAILED (see below)", "", "", "", "")
            failures.append(f"{conn.connection_id} failed: {one_line(conn.error)}")
            continue
        table.add_row(conn.connection_id, "", "", f"{sum(conn.quarantined.values()):,}", seconds)
        entities = sorted((set(conn.extracted) | set(conn.published)) - {"patient_identifiers"})
        for entity in entities:
            table.add_row(
                f"  {entity}",
                f"{conn.extracted.get(entity, 0):,}",
                f"{conn.published.get(entity, 0):,}",
                "",
                "",
            )
    console.print(table)
    legend = Table.grid(padding=(0, 1))
    legend.add_column(no_wrap=True)
    legend.add_column(overflow="fold")
    for name, meaning in SUMMARY_LEGEND:
        legend.add_row(f"  {name}", meaning)
    console.print(legend, highlight=False)
    lines = [line for line in (_access_line(c) for c in report.connections) if line]
    if lines:
        console.print("\npatients and API calls (the quota is shared by every connection):", highlight=False)
        for line in lines:
            wrapped = textwrap.wrap(line, 78, initial_indent="  ", subsequent_indent="    ")
            console.print("\n".join(wrapped), highlight=False, markup=False, soft_wrap=True)
    for line in failures:
        wrapped = textwrap.wrap(line, 78, subsequent_indent="  ")
        console.print("\n".join(wrapped), highlight=False, markup=False, soft_wrap=True)
    if engine_log is not None:
        console.print(f"engine log: {engine_log}", highlight=False, markup=False, soft_wrap=True)


def sync_command(args: argparse.Namespace, runner: Any = None) -> int:
    """``redox-elt sync``. ``runner(settings, paths, windows, lookback_s=)`` executes the
    sync and returns a ``SyncReport``; the application wires the Dagster job in
    (``redox_elt.sync_job``) so a CLI sync is recorded like a UI one. Without one,
    ``run_sync`` (what every Dagster asset calls too) runs it directly."""
    from pipelines.sync import connection_windows, run_sync
    from pipelines.warehouse import WarehouseBusy, WarehousePaths
    from resources.settings import ConfigError, load_settings

    try:
        check_lookback_hours(args.lookback_hours)
        if not 1 <= args.discover_days <= MAX_DISCOVER_DAYS:
            raise ValueError(f"--discover-days must be a whole number from 1 to {MAX_DISCOVER_DAYS}")
        settings = load_settings(args.config)
        window = sync_window(args.since, args.until)
        windows = connection_windows(settings, args.connection, window)
        paths = WarehousePaths.at(warehouse_location(args.warehouse), args.destination)
    except (ConfigError, ValueError, KeyError, OSError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"redox-elt sync: {one_line(text)}", file=sys.stderr)
        return 2
    try:
        check_warehouse_free(paths)
    except ValueError as exc:
        print(f"redox-elt sync: {one_line(exc)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    lookback_s = args.lookback_hours * 3600.0
    extract = {"full": args.full, "discover_days": args.discover_days}
    display = sync_display(sys.stdout)
    try:
        with display.running():
            if runner is None:
                report = run_sync(
                    settings, paths, windows, lookback_s=lookback_s, caller="cli",
                    on_connection=display.finished, **extract,
                )  # fmt: skip
            else:
                report = runner(settings, paths, windows, lookback_s=lookback_s, display=display, **extract)
    except WarehouseBusy as exc:
        print(f"redox-elt sync: {one_line(exc)}", file=sys.stderr)
        return 3
    _print_summary(report, time.monotonic() - started, engine_log=getattr(runner, "last_log", None))
    return sync_exit_code(report)


def sync_exit_code(report: Any) -> int:
    """0: every connection synced; 2: every failure is the warehouse's (a user error the
    summary names with its fix); 1: a connection failed otherwise."""
    if report.ok:
        return 0
    return 2 if all(e.startswith(WAREHOUSE_ERROR_PREFIX) for e in report.failures.values()) else 1


# Failures the user fixes (the warehouse cannot be written) start with this; see
# ``redox_elt.sync_job.root_cause``.
WAREHOUSE_ERROR_PREFIX = "the warehouse "


def check_warehouse_free(paths: Any, stream: Any = None) -> None:
    """Before a sync: say so when another sync holds the warehouse's writer lock (this one
    then waits for it), and fail with one line when the DuckDB file cannot be opened for
    writing: another program holds it open, the file system is read-only, or it is not a
    DuckDB file. Raises ``ValueError`` naming the problem and the fix."""
    import fcntl

    import duckdb

    paths.lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"redox-elt sync: waiting for the writer lock: another sync is writing {paths.duckdb} "
                "(this one starts when it ends; Ctrl-C to stop)",
                file=stream or sys.stderr,
                flush=True,
            )
            return
        try:
            with duckdb.connect(str(paths.duckdb)):
                pass
        except duckdb.Error as exc:
            raise ValueError(warehouse_open_error(paths.duckdb, exc)) from None
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def warehouse_open_error(file: Any, exc: BaseException) -> str:
    """One line for a DuckDB file that cannot be opened for writing (no PHI: DuckDB's text is
    read only for the holder's process id)."""
    import re

    text = str(exc)
    if "lock" in text.lower():
        pid = re.search(r"PID (\d+)", text)
        holder = f" (process {pid.group(1)})" if pid else ""
        return (
            f"{WAREHOUSE_ERROR_PREFIX}{file} is open in another program{holder}; close it "
            "(a DuckDB shell, a notebook, a BI tool) or pass another --warehouse"
        )
    if "read-only" in text.lower() or "permission" in text.lower():
        return f"{WAREHOUSE_ERROR_PREFIX}{file} cannot be written (read-only); pass --warehouse in a folder you can write"
    if "not a valid duckdb" in text.lower() or "database file" in text.lower():
        return f"{WAREHOUSE_ERROR_PREFIX}{file} is not a DuckDB database; pass another --warehouse"
    return f"{WAREHOUSE_ERROR_PREFIX}{file} cannot be opened ({type(exc).__name__}); pass another --warehouse"


def _demo(args: argparse.Namespace, runner: Any = None) -> int:
    """``redox-elt demo``: a sandbox in-process, its rosters imported, one sync. With a
    ``runner`` (the application passes the Dagster job's) the sync is recorded in the
    Dagster instance, so the UI shows its materializations (``$DAGSTER_HOME``)."""
    from pipelines.panel_cli import import_sandbox_rosters
    from pipelines.sync import connection_windows, run_sync
    from pipelines.warehouse import WarehousePaths
    from resources.onboarding import connect_sandbox
    from resources.settings import load_settings
    from sandbox.config import SandboxConfigError, load_config
    from sandbox.server import SandboxServer

    try:
        config = load_config(None, patients=args.patients, seed=args.seed)
        paths = WarehousePaths.at(warehouse_location(args.warehouse), args.destination)
    except (SandboxConfigError, ValueError, OSError) as exc:
        print(f"redox-elt demo: {one_line(exc)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with SandboxServer(config) as server:
        print(f"sandbox: {server.url} ({config.patients} patients, seed {config.seed})", flush=True)
        with tempfile.TemporaryDirectory(prefix="redox-elt-demo-") as tmp:
            cfg_path = connect_sandbox(server.url, Path(tmp) / "connections.yaml", name="redox-elt-demo")
            settings = load_settings(cfg_path)
            # Each EHR connection's roster, imported the way a user imports their own (CSV ->
            # panel add); discovery then adds whoever is active but not on it.
            rosters = import_sandbox_rosters(server.url, settings, paths.duckdb, Path(tmp))
            added = sum(r.added for r in rosters.values())
            print(f"rosters: {added} patients imported for {len(rosters)} connections", flush=True)
            display = sync_display(sys.stdout)
            with display.running():
                if runner is None:
                    report = run_sync(settings, paths, caller="demo", on_connection=display.finished)
                else:
                    report = runner(settings, paths, connection_windows(settings), display=display)
    _print_summary(report, time.monotonic() - started, engine_log=getattr(runner, "last_log", None))
    print(f"warehouse: {paths.duckdb}")
    return sync_exit_code(report)


def _renormalize(args: argparse.Namespace) -> int:
    from pipelines.renormalize import renormalize
    from pipelines.warehouse import DEFAULT_WAREHOUSE, WarehousePaths

    target = Path(args.warehouse) if args.warehouse else DEFAULT_WAREHOUSE
    file = target if target.suffix == ".duckdb" else target / "redox.duckdb"
    if not file.is_file():
        # Nothing to rebuild from: say so instead of creating an empty warehouse.
        print(
            f"redox-elt renormalize: no warehouse at {one_line(file)} (run redox-elt sync first)",
            file=sys.stderr,
        )
        return 2
    paths = WarehousePaths.at(file, args.destination)
    counts = renormalize(paths, connection_ids=args.connection)
    for conn, per in counts.items():
        print(f"{conn}: " + ", ".join(f"{e}={n}" for e, n in sorted(per.items())))
    return 0


def register(sub: Any) -> None:
    sync = sub.add_parser("sync", help="extract every connection's data into the warehouse")
    sync.add_argument("--config", default=None, help="connections file (default: $REDOX_ELT_CONFIG)")
    sync.add_argument("--connection", action="append", help="only this connection (repeatable)")
    sync.add_argument("--since", default=None, help="backfill window start (ISO-8601, inclusive)")
    sync.add_argument("--until", default=None, help="backfill window end (ISO-8601, exclusive; default: now)")
    sync.add_argument(
        "--lookback-hours",
        type=float,
        default=1.0,
        help="live runs re-read this much before the cursor, for late-arriving updates (default 1)",
    )
    sync.add_argument(
        "--full",
        action="store_true",
        help="re-pull every panel patient now, whatever the refresh schedule says",
    )
    sync.add_argument(
        "--discover-days",
        type=int,
        default=DEFAULT_DISCOVER_DAYS,
        help=f"discovery looks this many days back (default {DEFAULT_DISCOVER_DAYS})",
    )
    sync.add_argument("--destination", choices=["duckdb", "parquet"], default="duckdb")
    sync.add_argument(
        "--warehouse", default=None, help="DuckDB file or directory (default warehouse/redox.duckdb)"
    )
    sync.set_defaults(func=sync_command)

    demo = sub.add_parser(
        "demo", help="start the sandbox in-process and run a full sync (the README's main job)"
    )
    demo.add_argument("--patients", type=int, default=1000)
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--destination", choices=["duckdb", "parquet"], default="duckdb")
    demo.add_argument("--warehouse", default=None)
    demo.set_defaults(func=_demo)

    renorm = sub.add_parser(
        "renormalize", help="rebuild the normalized tables from the raw landing, without the API"
    )
    renorm.add_argument("--connection", action="append")
    renorm.add_argument("--destination", choices=["duckdb", "parquet"], default="duckdb")
    renorm.add_argument("--warehouse", default=None)
    renorm.set_defaults(func=_renormalize)
