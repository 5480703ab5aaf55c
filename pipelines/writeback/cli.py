"""``redox-elt writeback --config FILE --warehouse PATH [--dry-run] [--connection ID]``.

Output is PHI-free: counts, outbox ids, operation names and reasons built from column names.
"""

from __future__ import annotations

import argparse
import json
import sys


def _writeback(args: argparse.Namespace) -> int:
    from pipelines.warehouse import WarehouseBusy
    from pipelines.writeback.sender import run_writeback
    from resources.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
        report = run_writeback(settings, args.warehouse, dry_run=args.dry_run, connection_id=args.connection)
    except (ConfigError, WarehouseBusy, OSError) as exc:
        print(f"redox-elt writeback: {exc}", file=sys.stderr)
        return 2
    for kind, key, reason in report.failures:
        print(f"{'would fail' if args.dry_run else 'failed'}: {kind} {key}: {reason}")
    if args.dry_run:
        for item in report.dry_run:
            print(json.dumps(item, sort_keys=True))
        print(
            f"dry run: {len(report.dry_run)} would be sent, {len(report.failures)} invalid; nothing was sent"
        )
        return 0
    print(report.summary())
    return 0 if report.unknown == 0 else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "writeback",
        help="send the pending rows of outbox.orders / outbox.appointments to their connections, exactly once",
    )
    p.add_argument("--config", default=None, help="connection config file (YAML)")
    p.add_argument("--warehouse", default=None, help="the DuckDB warehouse holding the outbox tables")
    p.add_argument(
        "--dry-run", action="store_true", help="validate and print what would be sent (no PHI); send nothing"
    )
    p.add_argument("--connection", default=None, help="only rows for this connection id")
    p.set_defaults(func=_writeback)
