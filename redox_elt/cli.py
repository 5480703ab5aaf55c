"""The ``redox-elt`` command line. Each verb lives with the code it drives; this module
only parses arguments and dispatches."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from redox_elt.environment import Environment, EnvironmentValueError, harden_process


def check_listen_address(host: str, port: int) -> None:
    """``--host``/``--port`` the sandbox can listen on; raises ``ValueError`` with one line
    naming the problem and the fix (checked before the population is built: seconds)."""
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (0..65535; 0 picks a free one)")
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"cannot open a socket ({exc.strerror or type(exc).__name__})") from None
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except (OSError, OverflowError, UnicodeError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is already in use; stop what listens there or pass another --port"
            ) from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(
            f"cannot listen on {host[:80]!r} port {port} ({reason}); pass a local address such as 127.0.0.1"
        ) from None
    finally:
        probe.close()


SEED_SUFFIXES = (".ndjson", ".ndjson.gz", ".json")


def check_seed_dir(path: str | None) -> None:
    """``--seed-from`` names a folder holding FHIR files (one line naming it otherwise)."""
    if path is None:
        return
    from pathlib import Path

    fix = "pass a folder of FHIR .ndjson or Bundle .json files"
    named = path.strip() and "\x00" not in path
    try:
        folder = Path(path)
        if not named or not folder.is_dir():
            what = "is not a folder" if named and folder.exists() else "does not exist"
            raise ValueError(f"--seed-from {path[:200]!r} {what}; {fix}")
        if not any(p.is_file() and p.name.endswith(SEED_SUFFIXES) for p in folder.rglob("*")):
            raise ValueError(f"--seed-from {path[:200]!r} holds no .ndjson, .ndjson.gz or .json file; {fix}")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"--seed-from {path[:200]!r} cannot be read ({reason}); {fix}") from None


def _sandbox_serve(args: argparse.Namespace) -> int:
    from pipelines.cli import one_line
    from sandbox.config import SandboxConfigError, load_config

    fix = "pass a sandbox config file (YAML or JSON)"
    try:
        if args.config is not None and (not args.config.strip() or "\x00" in args.config):
            raise OSError(errno.ENOENT, "no such file")
        config = load_config(args.config, seed=args.seed, patients=args.patients)
    except SandboxConfigError as exc:
        print(f"redox-elt sandbox: config error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"redox-elt sandbox: config error: --config {str(args.config)[:200]!r} cannot be read "
            f"({exc.strerror or type(exc).__name__}); {fix}",
            file=sys.stderr,
        )
        return 2
    except (ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:  # not UTF-8 / YAML / JSON
        print(
            f"redox-elt sandbox: config error: --config {str(args.config)[:200]!r} is not a valid "
            f"sandbox config ({type(exc).__name__}); {fix}",
            file=sys.stderr,
        )
        return 2
    try:
        check_listen_address(args.host, args.port)
        check_seed_dir(args.seed_from)
    except ValueError as exc:
        print(f"redox-elt sandbox: {one_line(exc)}", file=sys.stderr)
        return 2
    # Imported after the config is read: the server pulls in the Redox models (seconds), and a
    # config error should be reported at once.
    from sandbox.server import SandboxServer

    try:
        server = SandboxServer(config, host=args.host, port=args.port, seed_from=args.seed_from)
    except (OSError, OverflowError, ValueError) as exc:
        # The port was taken between the check and the bind, or the seed folder holds nothing usable.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:200]
        print(f"redox-elt sandbox: cannot start: {reason}", file=sys.stderr)
        return 2
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

    return sync_command(
        args, runner=DagsterSyncRunner(args.environment, build_definitions, verbose=args.verbose)
    )


DEMO_DAGSTER_HOME = ".dagster_home"


def demo_dagster_home(env: Environment, cwd: Path) -> Environment:
    """The instance the demo records into: ``$DAGSTER_HOME`` when set, else ``.dagster_home``
    in the working directory (the README's Dagster section starts ``dagster dev`` on it), with
    the project's ``dagster.yaml`` copied in when it is there and the folder has none."""
    if env.dagster_home:
        return env
    home = cwd / DEMO_DAGSTER_HOME
    home.mkdir(exist_ok=True)
    settings = cwd / "dagster.yaml"
    if settings.is_file() and not (home / "dagster.yaml").exists():
        shutil.copyfile(settings, home / "dagster.yaml")
    return dataclasses.replace(env, dagster_home=str(home.resolve()))


@dataclasses.dataclass
class DemoRunner:
    """The demo's runner: the Dagster job recorded in a persistent instance
    (``demo_dagster_home``, made only once the demo's input is valid), so ``dagster dev`` on
    it shows the demo's runs and materializations."""

    env: Environment
    verbose: bool
    last_log: Path | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from redox_elt.definitions import build_definitions
        from redox_elt.sync_job import DagsterSyncRunner

        try:
            env = demo_dagster_home(self.env, Path.cwd())
        except OSError as exc:  # a read-only working directory: the runs are not kept
            env = self.env
            print(
                f"dagster: runs not kept ({DEMO_DAGSTER_HOME}: {exc.strerror}; set $DAGSTER_HOME)", flush=True
            )
        else:
            os.environ["DAGSTER_HOME"] = str(env.dagster_home)  # DagsterInstance.get() reads it
            print(
                f"dagster: runs recorded in {env.dagster_home} (the DAGSTER_HOME for dagster dev)", flush=True
            )
        inner = DagsterSyncRunner(env, build_definitions, verbose=self.verbose)
        try:
            return inner(*args, **kwargs)
        finally:
            self.last_log = inner.last_log


def _demo_through_dagster(args: argparse.Namespace) -> int:
    """``redox-elt demo`` runs the same Dagster job as ``sync`` (``DemoRunner``)."""
    from pipelines.cli import _demo

    return _demo(args, runner=DemoRunner(args.environment, args.verbose))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _apply_environment(args: argparse.Namespace, env: Environment) -> None:
    """Environment defaults for the options that have them (a flag always wins)."""
    args.environment = env
    if getattr(args, "config", "unset") is None and args.command != "sandbox":
        args.config = env.config_path


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the problem and the fix (exit code 2), not the usage
    block; every subcommand's parser is one too (argparse builds them with this class)."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())  # a value with CR/LF stays on one line
        self.exit(2, f"{self.prog}: {text} (see {self.prog} --help)\n")


def _register_export(sub: Any) -> None:
    """``redox-elt export --deidentify`` (pipelines/export_cli.py)."""
    from pipelines.export_cli import register

    register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="redox-elt", description="ELT for Redox: FHIR + Data Model into SQL.")
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
    from pipelines.quarantine_cli import register as register_quarantine_verbs

    register_webhook_verbs(sub)
    register_quarantine_verbs(sub)
    from pipelines.writeback.cli import register as register_writeback_verb

    register_writeback_verb(sub)
    sub.choices["sync"].set_defaults(func=_sync_through_dagster)
    sub.choices["demo"].set_defaults(func=_demo_through_dagster)
    from pipelines.panel_cli import register as register_panel_verbs

    register_panel_verbs(sub)
    from redox_elt.status_cli import register as register_status_verbs

    register_status_verbs(sub)
    _register_export(sub)
    return parser


def configure_logging(verbose: bool) -> None:
    """``-v``: INFO with times and logger names, for a person debugging. Otherwise warnings
    only, as plain ``redox-elt: message`` lines (a warning is meant for the user)."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format="redox-elt: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    harden_process()
    # SIGTERM ends the command like Ctrl-C (also while it waits for the warehouse).
    signal.signal(signal.SIGTERM, _interrupt)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    configure_logging(args.verbose)
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
