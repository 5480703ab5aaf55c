"""``redox-elt status`` and ``redox-elt report``: the warehouse's state for a person, as text,
JSON or a static HTML page. The reading and rendering live in ``pipelines.status`` and
``pipelines.report`` (no Dagster); this module adds what only the application knows, the
next tick of each schedule (``assets.automation``), and the shared request budget."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.cli import one_line


def _warehouse_file(warehouse: str | None) -> Path:
    """The DuckDB file ``--warehouse`` names; it must exist (status never creates one)."""
    from pipelines.warehouse import DEFAULT_WAREHOUSE

    target = Path(warehouse) if warehouse else DEFAULT_WAREHOUSE
    file = target if target.suffix == ".duckdb" else target / "redox.duckdb"
    if not file.is_file():
        raise ValueError(f"no warehouse at {file}; run redox-elt sync first or pass --warehouse")
    return file


def _quota(settings: Any) -> dict[str, Any] | None:
    """The shared request budget's use now (the first connection's host and client: every
    connection of one config shares it)."""
    from resources.client import SHARED
    from resources.quota import BudgetError

    if not settings.connections:
        return None
    try:
        return SHARED.budget(settings, settings.connections[0]).stats().as_dict()
    except BudgetError:
        return None


def read_status_for(args: argparse.Namespace) -> Any:
    """The status of the configured connections in ``--warehouse`` (raises ``ValueError``
    or ``ConfigError`` with one line)."""
    from assets.automation import ScheduleSettings, next_scheduled_runs
    from pipelines.status import ScheduledRun, connections_in_warehouse, read_status
    from resources.settings import load_settings

    file = _warehouse_file(args.warehouse)
    # Without a connections file (after `redox-elt demo`): the connections the warehouse holds.
    settings = load_settings(args.config) if args.config is not None else None
    env = args.environment
    now = datetime.now(UTC)
    when = ScheduleSettings(env.sync_cron, env.network_sync_cron, env.reconcile_cron, env.reconcile_days)
    upcoming = {
        kind: [ScheduledRun(name, at) for name, at in runs]
        for kind, runs in next_scheduled_runs(when, now).items()
    }
    if settings is None:
        return read_status(file, connections_in_warehouse(file), next_runs=upcoming, now=now)
    connections = [(c.id, c.kind) for c in settings.connections]
    return read_status(file, connections, next_runs=upcoming, quota=_quota(settings), now=now)


def _out_dir(value: str) -> Path:
    """``--out``: a folder named explicitly (an empty value would write into the working
    directory); created when the report is written."""
    if not value.strip() or "\x00" in value:
        raise ValueError("--out: pass the folder to write index.html into, e.g. --out report/")
    return Path(value)


def _errors() -> tuple[type[BaseException], ...]:
    import duckdb

    from resources.settings import ConfigError

    return (ConfigError, ValueError, OSError, duckdb.Error)


def _status(args: argparse.Namespace) -> int:
    from pipelines.status import print_status, print_status_json

    try:
        status = read_status_for(args)
    except _errors() as exc:
        print(f"redox-elt status: {_describe(exc)}", file=sys.stderr)
        return 2
    (print_status_json if args.json else print_status)(status, sys.stdout)
    return 0


def _report(args: argparse.Namespace) -> int:
    from pipelines.report import write_report

    try:
        out_dir = _out_dir(args.out)
        status = read_status_for(args)
        page = write_report(status, out_dir)
    except _errors() as exc:
        print(f"redox-elt report: {_describe(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {page} (open it in a browser; it needs no network)")
    return 0


def _describe(exc: BaseException) -> str:
    """One line: our own errors as written; DuckDB's (a warehouse held by a writer, not a
    DuckDB file) and the system's with the fix."""
    import duckdb

    if isinstance(exc, duckdb.Error):
        text = str(exc).lower()
        if "lock" in text:
            return "the warehouse is open for writing in another program; retry when it ends"
        return f"the warehouse cannot be read ({type(exc).__name__}); pass another --warehouse"
    if isinstance(exc, OSError) and not isinstance(exc, ValueError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot write{where} ({exc.strerror or type(exc).__name__}); pass a folder you can write"
    return one_line(exc)


def register(sub: Any) -> None:
    status = sub.add_parser(
        "status", help="each connection's last sync, freshness, rows, quarantine and API use"
    )
    status.add_argument(
        "--config",
        default=None,
        help="connections file (default: $REDOX_ELT_CONFIG, else the warehouse's connections)",
    )
    status.add_argument(
        "--warehouse", default=None, help="DuckDB file or directory (default warehouse/redox.duckdb)"
    )
    status.add_argument("--json", action="store_true", help="print JSON (for scripts and monitoring)")
    status.set_defaults(func=_status)

    report = sub.add_parser("report", help="write a static HTML page with plots of the warehouse's state")
    report.add_argument("--out", required=True, help="folder to write index.html into (created)")
    report.add_argument(
        "--config",
        default=None,
        help="connections file (default: $REDOX_ELT_CONFIG, else the warehouse's connections)",
    )
    report.add_argument(
        "--warehouse", default=None, help="DuckDB file or directory (default warehouse/redox.duckdb)"
    )
    report.set_defaults(func=_report)
