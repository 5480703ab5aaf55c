"""CLI verbs of the extraction layer: ``sync``, ``demo``, ``renormalize``."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
    """The window ``--since``/``--until`` ask for; raises ``ValueError`` with one line."""
    start, end = _parse_instant(since, "--since"), _parse_instant(until, "--until")
    if end is not None and start is None:
        raise ValueError("--until needs --since (a backfill is the window [since, until))")
    return SyncWindow(start, end)


def _print_summary(report: Any, elapsed: float, stream: Any = sys.stdout) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"redox-elt sync {report.run_id[:8]} ({elapsed:.1f} s)")
    table.add_column("connection")
    table.add_column("entity")
    table.add_column("rows staged", justify="right")
    table.add_column("in warehouse", justify="right")
    table.add_column("quarantined", justify="right")
    table.add_column("time (s)", justify="right")
    access = Table(title="requests and patients (the shared budget)")
    for column in (
        "connection",
        "mode",
        "requests",
        "budget left",
        "due",
        "pulled",
        "deferred",
        "new",
        "errors",
    ):
        access.add_column(column, justify="left" if column in ("connection", "mode") else "right")
    for conn in report.connections:
        stats = conn.access
        if stats is not None:
            access.add_row(
                conn.connection_id,
                stats.mode,
                str(stats.requests),
                "-" if stats.budget_left is None else str(stats.budget_left),
                str(stats.due),
                str(stats.pulled),
                str(stats.deferred),
                str(stats.discovered),
                str(sum(stats.errors.values())),
            )
        if conn.error:
            table.add_row(conn.connection_id, "-", "-", "-", "-", f"FAILED: {conn.error}")
            continue
        total_s = sum(conn.seconds.values())
        entities = sorted(set(conn.extracted) | set(conn.published) - {"patient_identifiers"})
        for i, entity in enumerate(entities):
            table.add_row(
                conn.connection_id if i == 0 else "",
                entity,
                str(conn.extracted.get(entity, 0)),
                str(conn.published.get(entity, 0)),
                str(conn.quarantined.get("all", 0)) if i == 0 else "",
                f"{total_s:.1f}" if i == 0 else "",
            )
    console = Console(file=stream)
    console.print(table)
    console.print(access)


@contextlib.contextmanager
def live_progress(stream: Any = sys.stderr) -> Iterator[None]:
    """A progress line per connection and entity while a sync runs (rows extracted so far)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from pipelines.progress import PROGRESS

    PROGRESS.reset()
    console = Console(file=stream)
    tasks: dict[tuple[str, str], Any] = {}
    stop = threading.Event()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed:>9,.0f} rows"),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as progress:

        def refresh() -> None:
            while not stop.wait(0.25):
                for key, n in sorted(PROGRESS.snapshot().items()):
                    if key not in tasks:
                        tasks[key] = progress.add_task(f"{key[0]:<22} {key[1]:<13}", total=None)
                    progress.update(tasks[key], completed=n)

        worker = threading.Thread(target=refresh, daemon=True)
        worker.start()
        try:
            yield
        finally:
            stop.set()
            worker.join()


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
    started = time.monotonic()
    lookback_s = args.lookback_hours * 3600.0
    extract = {"full": args.full, "discover_days": args.discover_days}
    try:
        with live_progress():
            if runner is None:
                report = run_sync(settings, paths, windows, lookback_s=lookback_s, caller="cli", **extract)
            else:
                report = runner(settings, paths, windows, lookback_s=lookback_s, **extract)
    except WarehouseBusy as exc:
        print(f"redox-elt sync: {exc}", file=sys.stderr)
        return 3
    _print_summary(report, time.monotonic() - started)
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    from pipelines.panel_cli import import_sandbox_rosters
    from pipelines.sync import run_sync
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
            with live_progress():
                report = run_sync(settings, paths, caller="demo")
    _print_summary(report, time.monotonic() - started)
    print(f"warehouse: {paths.duckdb}")
    return 0 if report.ok else 1


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
    sync.add_argument("--until", default=None, help="backfill window end (ISO-8601, exclusive)")
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
