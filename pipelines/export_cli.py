"""``redox-elt export --deidentify --out DIR``: Parquet copies of the analytics views with the
HIPAA Safe Harbor identifiers removed or generalized (rules in ``pipelines/deidentify.py``).

Only de-identified exports exist: the warehouse itself is the identified copy. Usage errors
are one line and exit 2; a warehouse held by a running sync is exit 3."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

LOCK_WAIT_S = 30.0


def register(sub: Any) -> None:
    export = sub.add_parser(
        "export", help="write de-identified Parquet copies of the analytics views (HIPAA Safe Harbor)"
    )
    export.add_argument(
        "--deidentify",
        action="store_true",
        help="required: remove or generalize the Safe Harbor identifiers (the only kind of export)",
    )
    export.add_argument("--out", required=True, help="folder to write <view>.parquet and manifest.json into")
    export.add_argument(
        "--warehouse", default=None, help="DuckDB file or directory (default warehouse/redox.duckdb)"
    )
    export.add_argument(
        "--config",
        default=None,
        help="connections file: export only its connections (default: $REDOX_ELT_CONFIG; none: every connection)",
    )
    export.add_argument("--connection", action="append", help="only this connection (repeatable)")
    export.set_defaults(func=export_command)


def _fail(message: str, code: int = 2) -> int:
    from pipelines.cli import one_line

    print(f"redox-elt export: {one_line(message)}", file=sys.stderr)
    return code


def _out_dir(text: str) -> Path:
    """The folder ``--out`` names, checked but not created (the export creates it once the
    warehouse has been read, so a failed export leaves nothing behind)."""
    import os

    if not text.strip() or "\x00" in text:
        raise ValueError("--out names no folder; pass a folder to write the export into")
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; pass a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot be created in {existing}; pass a folder you can write")
    return out


def _connections(args: argparse.Namespace) -> list[str] | None:
    """The connections to export: --connection (checked against the config), else the config's, else all."""
    from pipelines.vocabulary import is_plain_connection_id
    from resources.settings import load_settings

    for cid in args.connection or []:
        if not is_plain_connection_id(cid):
            raise ValueError(
                f"--connection {cid[:40]!r} is not a connection id (letters, digits, '-' and '_')"
            )
    if not args.config:
        return list(args.connection) if args.connection else None
    settings = load_settings(args.config)
    known = [c.id for c in settings.connections]
    for cid in args.connection or []:
        if cid not in known:
            raise ValueError(f"--connection {cid!r} is not in {args.config} (known: {', '.join(known)})")
    return list(args.connection) if args.connection else known


def export_command(args: argparse.Namespace) -> int:
    from pipelines.deidentify import ExportError, export_deidentified, load_key
    from pipelines.quarantine_cli import QuarantineCliError, warehouse_file
    from pipelines.warehouse import WarehouseBusy, WarehousePaths, WriterLock
    from resources.settings import ConfigError
    from resources.vault import VaultError

    if not args.deidentify:
        return _fail(
            "only de-identified exports are written (the warehouse is the identified copy); pass --deidentify"
        )
    try:
        file = warehouse_file(args.warehouse)
        connections = _connections(args)
        out = _out_dir(args.out)
        key = load_key()  # before anything is written: a bad key is a usage error
        paths = WarehousePaths(duckdb=file.resolve())
        with WriterLock(paths, wait_s=LOCK_WAIT_S):
            report = export_deidentified(paths.duckdb, out, key, connections)
    except WarehouseBusy as exc:
        return _fail(f"{exc}; try again when it ends", 3)
    except (QuarantineCliError, ConfigError, ExportError, VaultError, ValueError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(
            f"cannot write the export ({exc.strerror or type(exc).__name__}); pass --out a folder you can write"
        )
    for view, n in report.rows.items():
        print(f"{view:<24} {n:>8} rows  {out / (view + '.parquet')}")
    if report.suppressed_columns:
        cols = "; ".join(f"{t}: {', '.join(c)}" for t, c in report.suppressed_columns.items())
        print(f"exported as null (no de-identification rule yet): {cols}")
    print(f"de-identified export (HIPAA Safe Harbor) in {out}; rules in manifest.json")
    return 0
