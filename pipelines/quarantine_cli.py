"""``redox-elt quarantine list | retry | dismiss``: what could not be loaded, and a person's
decision about it.

A quarantined record is fetched again at every sync until it loads (the entry is then
resolved) or a person dismisses it. These verbs show the entries and record the decisions.
Output is PHI-free: numbers, connection, surface, entity, the kind of item, the reason (the
pipeline's own words), dates, counts, and pseudonymous keys in place of record ids and patient
identifiers (the patient key is the one ``redox-elt panel list`` shows).

Exit codes: 0 done, 2 a usage error (one line naming the problem and the fix), 3 a sync is
writing the warehouse (try again when it ends).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from pipelines import quarantine as Q
from pipelines.cli import one_line
from pipelines.vocabulary import is_plain_connection_id

LOCK_WAIT_S = 30.0  # a sync holds the warehouse for its whole run; say so rather than hang


class QuarantineCliError(ValueError):
    """A usage error: one line naming the problem and the fix."""


def warehouse_file(warehouse: str | None) -> Path:
    """The existing DuckDB file ``--warehouse`` names (never created here)."""
    from pipelines.warehouse import DEFAULT_WAREHOUSE

    target = Path(warehouse) if warehouse else DEFAULT_WAREHOUSE
    file = target if target.suffix == ".duckdb" else target / "redox.duckdb"
    try:
        found = "\x00" not in str(file) and file.is_file()
    except OSError:  # a name too long, a path through a file
        found = False
    if not found:
        raise QuarantineCliError(f"no warehouse at {file} (pass --warehouse, or run redox-elt sync first)")
    return file


def check_connections(ids: Sequence[str] | None, config: str | None) -> list[str] | None:
    """``--connection`` values, checked against the config when there is one."""
    if not ids:
        return None
    for cid in ids:
        if not is_plain_connection_id(cid):
            raise QuarantineCliError(
                f"--connection {cid[:40]!r} is not a connection id (letters, digits, '-' and '_')"
            )
    if config:
        from resources.settings import load_settings

        settings = load_settings(config)
        for cid in ids:
            settings.connection(cid)  # KeyError naming the known ids
    return list(ids)


@contextmanager
def open_warehouse(warehouse: str | None) -> Iterator[duckdb.DuckDBPyConnection]:
    """The warehouse, under its writer lock (numbers and decisions are writes; a running sync
    holds the lock, and this waits for it a little, then says so)."""
    from pipelines.warehouse import WarehousePaths, WriterLock

    file = warehouse_file(warehouse)
    paths = WarehousePaths(duckdb=file.resolve())
    with WriterLock(paths, wait_s=LOCK_WAIT_S), duckdb.connect(str(paths.duckdb)) as con:
        yield con


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def print_records(records: Sequence[Q.QuarantineRecord], stream: Any = None) -> None:
    stream = stream or sys.stdout
    if not records:
        print("no quarantine entries", file=stream)
        return
    header = (
        f"{'id':>6}  {'connection':<22} {'surface':<9} {'entity':<12} {'item':<18} {'patient':<16} "
        f"{'first seen':<16} {'tries':>5}  {'state':<9}  reason"
    )
    print(header, file=stream)
    for r in records:
        state = r.state
        if r.state == "open" and r.retry_requested_at is not None:
            state = "retry"
        print(
            f"{r.number:>6}  {r.connection_id[:22]:<22} {r.surface:<9} {r.entity:<12} {r.item_key[:18]:<18} "
            f"{(r.patient_key or '-'):<16} {_when(r.first_seen_at):<16} {r.attempts:>5}  {state:<9}  {r.reason}"
            + (
                f" [dismissed: {r.dismissed_reason}]" if r.state == "dismissed" and r.dismissed_reason else ""
            ),
            file=stream,
        )


def _list(args: argparse.Namespace) -> int:
    ids = check_connections(args.connection, args.config)
    with open_warehouse(args.warehouse) as con:
        records = Q.quarantine_records(con, connection_ids=ids, include_closed=args.all)
    if args.json:
        print(json.dumps([r.as_json() for r in records], indent=1))
    else:
        print_records(records)
    return 0


def _retry(args: argparse.Namespace) -> int:
    ids = check_connections(args.connection, args.config)
    with open_warehouse(args.warehouse) as con:
        n = Q.retry_entries(con, args.id, connection_ids=ids)
    scope = f"entries {', '.join(map(str, args.id))}" if args.id else "open entries"
    print(f"{n} quarantine rows ({scope}) will be fetched again at the next sync")
    return 0


def _dismiss(args: argparse.Namespace) -> int:
    ids = check_connections(args.connection, args.config)
    with open_warehouse(args.warehouse) as con:
        n = Q.dismiss_entries(con, args.id, args.reason, connection_ids=ids)
    print(
        f"{n} quarantine rows dismissed (entries {', '.join(map(str, args.id))}); they are no longer fetched"
    )
    return 0


def _run(func: Any) -> Any:
    """A verb with its usage errors turned into one line and exit code 2 (3: warehouse busy)."""

    def verb(args: argparse.Namespace) -> int:
        from pipelines.warehouse import WarehouseBusy
        from resources.settings import ConfigError

        try:
            return int(func(args))
        except WarehouseBusy as exc:
            print(f"redox-elt quarantine: {exc}; try again when it ends", file=sys.stderr)
            return 3
        except (QuarantineCliError, Q.QuarantineSelectionError, ConfigError, KeyError, OSError) as exc:
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"redox-elt quarantine {args.quarantine_command}: {one_line(text)}", file=sys.stderr)
            return 2
        except duckdb.Error as exc:
            print(
                f"redox-elt quarantine {args.quarantine_command}: the warehouse cannot be read "
                f"({type(exc).__name__}); is it a redox-elt DuckDB file?",
                file=sys.stderr,
            )
            return 2

    return verb


def _entry_number(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an entry number: {text[:40]!r}") from None
    if not 1 <= n <= 2**62:
        raise argparse.ArgumentTypeError(f"entry numbers start at 1: {text[:40]!r}")
    return n


def _dismiss_reason(text: str) -> str:
    if not text.strip() or len(text) > Q.MAX_DISMISS_REASON or not text.isprintable():
        raise argparse.ArgumentTypeError(
            f"a reason is 1..{Q.MAX_DISMISS_REASON} printable characters on one line (and never PHI)"
        )
    return text


def _common(parser: argparse.ArgumentParser, *, many_connections: bool = True) -> None:
    parser.add_argument(
        "--connection",
        action="append",
        help="only this connection (repeatable)" if many_connections else None,
    )
    parser.add_argument(
        "--warehouse", default=None, help="DuckDB file or directory (default warehouse/redox.duckdb)"
    )
    parser.add_argument(
        "--config", default=None, help="connections file, to check --connection (default: $REDOX_ELT_CONFIG)"
    )


def register(sub: Any) -> None:
    quarantine = sub.add_parser(
        "quarantine", help="records that could not be loaded: list them, fetch them again, or dismiss them"
    )
    verbs = quarantine.add_subparsers(dest="quarantine_command", required=True)

    lst = verbs.add_parser("list", help="open entries without PHI (pseudonymous keys, reasons, dates)")
    _common(lst)
    lst.add_argument("--all", action="store_true", help="also resolved and dismissed entries")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_run(_list))

    retry = verbs.add_parser(
        "retry", help="fetch entries again at the next sync (undoes a dismissal of the entries named)"
    )
    _common(retry)
    retry.add_argument("--id", type=_entry_number, nargs="+", default=None, help="entry numbers (see list)")
    retry.set_defaults(func=_run(_retry))

    dismiss = verbs.add_parser(
        "dismiss", help="a person's decision: these records will not load; stop fetching"
    )
    _common(dismiss)
    dismiss.add_argument(
        "--id", type=_entry_number, nargs="+", required=True, help="entry numbers (see list)"
    )
    dismiss.add_argument("--reason", type=_dismiss_reason, default=None, help="why (one line, never PHI)")
    dismiss.set_defaults(func=_run(_dismiss))
