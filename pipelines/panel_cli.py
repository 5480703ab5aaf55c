"""CLI verbs of the patient panel: ``redox-elt panel add | list | stats``, and the sandbox
roster import the demo uses (the same path a user's own roster takes).

Output is PHI-free: counts, dates, ``found_by`` and pseudonymous keys, never an identifier or
a name.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import duckdb
import httpx

from pipelines import panel as P
from pipelines.cli import one_line


def _open(warehouse: str | None) -> tuple[Any, duckdb.DuckDBPyConnection]:
    """An existing warehouse (``list``/``stats`` read one; they never create it)."""
    from pipelines.quarantine_cli import warehouse_file
    from pipelines.warehouse import WarehousePaths

    paths = WarehousePaths(duckdb=warehouse_file(warehouse).resolve())
    con = duckdb.connect(str(paths.duckdb))
    P.create_tables(con)
    return paths, con


def _settings(config: str | None) -> Any:
    from resources.settings import load_settings

    return load_settings(config)


def import_roster(
    warehouse: str | Path | None, connection_id: str, roster: str | Path, *, settings: Any = None
) -> P.RosterImport:
    """``panel add``: import a roster CSV for a connection (checked against the config when
    given). Holds the warehouse's writer lock, so it never races a sync."""
    from pipelines.warehouse import WarehousePaths, WriterLock

    if settings is not None:
        settings.connection(connection_id)  # an unknown connection fails fast
    from pipelines.cli import warehouse_location

    try:
        # Read and parse the roster before anything is created: a bad file changes nothing.
        P.read_roster(Path(roster).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, P.RosterError):
            raise
        raise P.RosterError(
            f"--file {str(roster)[:200]!r} is not a readable UTF-8 roster CSV; pass the roster file"
        ) from None
    paths = WarehousePaths.at(warehouse_location(warehouse))  # a first roster may create it
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        return P.add_roster(con, connection_id, Path(roster))


def _add(args: argparse.Namespace) -> int:
    from resources.settings import ConfigError

    try:
        settings = _settings(args.config)
        result = import_roster(args.warehouse, args.connection, args.file, settings=settings)
    except (ConfigError, KeyError, P.RosterError, OSError, ValueError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"redox-elt panel add: {one_line(text)}", file=sys.stderr)
        return 2
    print(
        f"{args.connection}: {result.added} added, {result.already} already in the panel, "
        f"{result.pending} demographic rows to resolve at the next sync"
        + (f", {result.skipped_blank} blank lines skipped" if result.skipped_blank else "")
    )
    return 0


def _usage_errors(verb: Any) -> Any:
    """``list``/``stats`` with a missing warehouse or a bad config: one line, exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from pipelines.quarantine_cli import QuarantineCliError
        from resources.settings import ConfigError

        try:
            return int(verb(args))
        except (QuarantineCliError, ConfigError, KeyError, OSError, duckdb.Error) as exc:
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"redox-elt panel {args.panel_command}: {one_line(text)}", file=sys.stderr)
            return 2

    return run


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text[:40]!r}") from None
    if not 1 <= n <= 10_000_000:
        raise argparse.ArgumentTypeError(f"must be from 1 to 10,000,000: {text[:40]!r}")
    return n


def _list(args: argparse.Namespace) -> int:
    _, con = _open(args.warehouse)
    with con:
        rows = P.panel_list(con, args.connection, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("key              found_by          first_seen  last_activity last_pull   due  fails")
    for r in rows:
        print(
            f"{r['key']:<16} {r['found_by']:<17} {(r['first_seen_at'] or '-')[:10]:<11} "
            f"{(r['last_activity_at'] or '-')[:10]:<13} {(r['last_full_pull_at'] or '-')[:10]:<11} "
            f"{'yes' if r['due'] else 'no':<4} {r['consecutive_failures']}"
        )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from resources.settings import ConfigError

    ids: list[str] | None = None
    if args.config is not None or args.connection:
        try:
            settings = _settings(args.config)
        except ConfigError as exc:
            print(f"redox-elt panel stats: {one_line(exc)}", file=sys.stderr)
            return 2
        ids = list(args.connection or [c.id for c in settings.connections])
    _, con = _open(args.warehouse)
    with con:
        stats = P.panel_stats(con, ids)
    if args.json:
        print(json.dumps(stats, indent=1, sort_keys=True))
        return 0
    for cid, s in stats.items():
        ways = ", ".join(f"{k}={v}" for k, v in sorted(s["found_by"].items())) or "-"
        print(
            f"{cid}: {s['patients']} patients, {s['due']} due, {s['pulled']} pulled, "
            f"{s['never_pulled']} never pulled, {s['failing']} failing; found by {ways}; "
            f"oldest pull {(s['oldest_pull_at'] or '-')[:19]}"
        )
    return 0


def fetch_sandbox_roster(sandbox_url: str, connection_id: str, out: Path, *, timeout: float = 60.0) -> int:
    """Write the roster the sandbox says an organization holds for a connection
    (``GET /_sandbox/roster?connection=ID``) as the CSV a user would write; -> rows written."""
    response = httpx.get(
        f"{sandbox_url.rstrip('/')}/_sandbox/roster", params={"connection": connection_id}, timeout=timeout
    )
    if response.status_code != 200:
        raise RuntimeError(f"sandbox roster for '{connection_id}': HTTP {response.status_code}")
    patients = response.json().get("patients") or []
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["system", "value"])
        for p in patients:
            writer.writerow([p["system"], p["value"]])
    return len(patients)


def import_sandbox_rosters(
    sandbox_url: str, settings: Any, warehouse: str | Path | None, workdir: Path
) -> dict[str, P.RosterImport]:
    """For each EHR connection: fetch its sandbox roster, write the CSV, import it through
    ``panel add``'s path. The demo (and ``dagster dev`` on the embedded sandbox) call this."""
    results = {}
    for conn in settings.connections:
        if conn.kind != "ehr":
            continue
        path = workdir / f"roster-{conn.id}.csv"
        fetch_sandbox_roster(sandbox_url, conn.id, path)
        results[conn.id] = import_roster(warehouse, conn.id, path, settings=settings)
    return results


def register(sub: Any) -> None:
    panel = sub.add_parser("panel", help="the patient panel: who each connection's pulls are for")
    verbs = panel.add_subparsers(dest="panel_command", required=True)

    add = verbs.add_parser(
        "add", help="import a roster CSV (header system,value or given,family,birthdate); prints counts only"
    )
    add.add_argument("--connection", required=True)
    add.add_argument("--file", required=True, help="roster CSV")
    add.add_argument("--config", default=None, help="connections file (default: $REDOX_ELT_CONFIG)")
    add.add_argument(
        "--warehouse", default=None, help="DuckDB file or directory (default warehouse/redox.duckdb)"
    )
    add.set_defaults(func=_add)

    lst = verbs.add_parser("list", help="panel patients without PHI (pseudonymous key, found_by, dates)")
    lst.add_argument("--connection", required=True)
    lst.add_argument("--config", default=None)
    lst.add_argument("--warehouse", default=None)
    lst.add_argument("--limit", type=_positive_int, default=None)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_usage_errors(_list))

    st = verbs.add_parser("stats", help="per-connection panel counts (patients, due, pulled, ...)")
    st.add_argument("--connection", action="append")
    st.add_argument("--config", default=None)
    st.add_argument("--warehouse", default=None)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_usage_errors(_stats))
