"""The ``redox-elt`` command line. Each verb lives with the code it drives; this module
only parses arguments and dispatches."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from redox_elt.environment import Environment, EnvironmentValueError, harden_process


def _sandbox_serve(args: argparse.Namespace) -> int:
    from sandbox.config import SandboxConfigError, load_config

    try:
        config = load_config(args.config, seed=args.seed, patients=args.patients)
    except (SandboxConfigError, OSError) as exc:
        print(f"redox-elt sandbox: config error: {exc}", file=sys.stderr)
        return 2
    # Imported after the config is read: the server pulls in the Redox models (seconds), and a
    # config error should be reported at once.
    from sandbox.server import SandboxServer

    server = SandboxServer(config, host=args.host, port=args.port, seed_from=args.seed_from)
    conns = ", ".join(c.id for c in server.config.connections)
    print(
        f"redox sandbox listening on {server.url} ({config.patients} patients, seed {config.seed}; {conns})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.state.webhooks.close()
    return 0


def _sync_through_dagster(args: argparse.Namespace) -> int:
    """``redox-elt sync`` executes the same Dagster job the UI materializes, in-process."""
    from pipelines.cli import sync_command
    from redox_elt.definitions import build_definitions
    from redox_elt.sync_job import DagsterSyncRunner

    return sync_command(args, runner=DagsterSyncRunner(args.environment, build_definitions))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _apply_environment(args: argparse.Namespace, env: Environment) -> None:
    """Environment defaults for the options that have them (a flag always wins)."""
    args.environment = env
    if getattr(args, "config", "unset") is None and args.command != "sandbox":
        args.config = env.config_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redox-elt", description="ELT for Redox: FHIR + Data Model into SQL."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (never PHI)")
    sub = parser.add_subparsers(dest="command", required=True)

    sandbox = sub.add_parser("sandbox", help="the local Redox emulator")
    sandbox_sub = sandbox.add_subparsers(dest="sandbox_command", required=True)
    serve = sandbox_sub.add_parser("serve", help="serve the sandbox over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8400)
    serve.add_argument("--patients", type=int, default=None, help="population size (default 1000)")
    serve.add_argument("--seed", type=int, default=None, help="population seed (default 42)")
    serve.add_argument("--config", default=None, help="sandbox config file (YAML or JSON)")
    serve.add_argument(
        "--seed-from", default=None, help="serve FHIR NDJSON / Bundle files from DIR as one connection"
    )
    serve.set_defaults(func=_sandbox_serve)
    connect = sandbox_sub.add_parser(
        "connect", help="register a signing key with a sandbox and write the config"
    )
    connect.add_argument("--url", required=True, help="sandbox base URL, e.g. http://127.0.0.1:8400")
    connect.add_argument("--out", required=True, help="connection config file to write (YAML)")
    connect.add_argument("--name", default="redox-elt", help="client name registered with the sandbox")
    from resources.cli import sandbox_connect

    connect.set_defaults(func=sandbox_connect)

    from resources.cli import register as register_auth_verbs

    register_auth_verbs(sub)
    from pipelines.cli import register as register_pipeline_verbs

    register_pipeline_verbs(sub)
    from pipelines.inbox.cli import register as register_webhook_verbs

    register_webhook_verbs(sub)
    from pipelines.writeback.cli import register as register_writeback_verb

    register_writeback_verb(sub)
    sub.choices["sync"].set_defaults(func=_sync_through_dagster)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    harden_process()
    # SIGTERM ends the command like Ctrl-C (also while it waits for the warehouse).
    signal.signal(signal.SIGTERM, _interrupt)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        _apply_environment(args, Environment.read())
    except EnvironmentValueError as exc:
        print(f"redox-elt: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
