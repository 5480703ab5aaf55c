"""``redox-elt webhook serve | stats | replay``: run the receiver, read the inbox's counters,
re-process stored messages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

TOKEN_ENV = "REDOX_ELT_WEBHOOK_TOKEN"
TOKEN_VAULT_ENTRY = "webhook-verification-token"


class WebhookConfigError(ValueError):
    pass


def verification_token(environ: Any = None) -> str:
    """The destination's verification token: ``$REDOX_ELT_WEBHOOK_TOKEN``, else the vault
    entry ``webhook-verification-token``; one line naming both when neither is set."""
    environ = os.environ if environ is None else environ
    token = environ.get(TOKEN_ENV)
    if token:
        return token
    from resources.vault import Vault, VaultError

    try:
        token = Vault().get_optional(TOKEN_VAULT_ENTRY)
    except VaultError as exc:
        raise WebhookConfigError(f"the vault cannot be read for the webhook token: {exc}") from None
    if not token:
        raise WebhookConfigError(
            f"no webhook verification token: set {TOKEN_ENV} or store it with "
            f"`redox-elt vault set {TOKEN_VAULT_ENTRY}`"
        )
    return token


def _paths(args: argparse.Namespace) -> Any:
    from pipelines.warehouse import DEFAULT_WAREHOUSE, WarehousePaths

    env = getattr(args, "environment", None)
    warehouse = args.warehouse or (env.warehouse if env is not None else None) or DEFAULT_WAREHOUSE
    return WarehousePaths.at(warehouse)


def _settings(args: argparse.Namespace) -> Any:
    from resources.settings import load_settings

    return load_settings(args.config)


def _fail(message: str) -> int:
    print(f"redox-elt webhook: {message}", file=sys.stderr)
    return 2


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pipelines.inbox.receiver import create_app, settings_resolver
    from pipelines.inbox.store import InboxError, connect, inbox_path
    from resources.settings import ConfigError

    try:
        token = verification_token()
        settings = _settings(args)
        inbox = inbox_path(_paths(args))
        connect(inbox, create=True).close()  # fail fast on an unwritable inbox
    except (WebhookConfigError, ConfigError, InboxError) as exc:
        return _fail(str(exc))
    app = create_app(inbox, token, settings_resolver(settings))
    print(f"redox-elt webhook receiver on http://{args.host}:{args.port}/ (inbox {inbox})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="on")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from pipelines.inbox.store import InboxError, inbox_path, opened, stats

    path = inbox_path(_paths(args))
    try:
        with opened(path) as con:
            counts = stats(con)
    except InboxError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(counts))
    else:
        for name, value in counts.items():
            print(f"{name:>20}  {value}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from pipelines.cli import _parse_instant
    from pipelines.inbox.process import process_inbox
    from pipelines.inbox.store import InboxError
    from pipelines.warehouse import WarehouseBusy, WriterLock
    from resources.settings import ConfigError

    try:
        since = _parse_instant(args.since, "--since")
        settings = _settings(args)
        paths = _paths(args)
        if (
            not Path(paths.duckdb).exists()
            and not (paths.root / f"{paths.duckdb.stem}.inbox.sqlite").exists()
        ):
            return _fail(f"no warehouse or inbox at {paths.root}")
        with WriterLock(paths):
            out = process_inbox(paths, settings, connection_ids=args.connection, since=since)
    except (ValueError, ConfigError, InboxError, WarehouseBusy) as exc:
        return _fail(str(exc))
    print(json.dumps(out))
    return 0


def register(sub: Any) -> None:
    webhook = sub.add_parser("webhook", help="the webhook inbox: receive Redox's pushed events")
    verbs = webhook.add_subparsers(dest="webhook_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help="connections file (default: $REDOX_ELT_CONFIG)")
        p.add_argument(
            "--warehouse", default=None, help="DuckDB file or directory (the inbox lives beside it)"
        )

    serve = verbs.add_parser(
        "serve", help="receive deliveries at / (verification token from the env or vault)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8500)
    common(serve)
    serve.set_defaults(func=_serve)

    st = verbs.add_parser("stats", help="distinct messages, duplicates dropped, quarantined, pending")
    st.add_argument("--json", action="store_true")
    common(st)
    st.set_defaults(func=_stats)

    replay = verbs.add_parser("replay", help="re-process stored messages received since a time (idempotent)")
    replay.add_argument("--since", required=True, help="ISO-8601; messages received at or after it")
    replay.add_argument("--connection", action="append", help="only this connection (repeatable)")
    common(replay)
    replay.set_defaults(func=_replay)
