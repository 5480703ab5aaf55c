"""``redox-elt vault | keys | audit | quota`` verbs. ``register(subparsers)`` adds them to the main parser.

Every verb returns an exit code; a failure prints one line naming what went wrong (never a
secret, never a traceback) and exits non-zero: 2 for bad input (a config error, a missing
file), 1 for anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from resources.audit import AuditError, load_audit_into_duckdb, verify_audit
from resources.keys import ALGORITHMS, DEFAULT_ALGORITHM, KeyRing, KeyRingError
from resources.onboarding import OnboardingError, connect_sandbox, register_jwks
from resources.quota import BudgetError
from resources.settings import DEFAULT_KEY_RING, ConfigError, load_settings
from resources.vault import Vault, VaultError

_EXPECTED = (VaultError, KeyRingError, ConfigError, AuditError, OnboardingError, BudgetError, OSError)


class InputError(ValueError):
    """A command-line value is wrong (a missing file, ...): exit code 2."""


def _guarded(verb: str, func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (InputError, *_EXPECTED) as exc:
            print(f"redox-elt {verb}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, InputError | ConfigError) else 1

    return run


def _existing(path: str, what: str) -> Path:
    """``path`` when it exists; the verbs that read never create folders for a wrong path."""
    found = Path(path).expanduser()
    if not found.exists():
        raise InputError(f"{what} {found} does not exist")
    return found


# ---- vault ----------------------------------------------------------------------------------


def _vault_set(args: argparse.Namespace) -> int:
    value = sys.stdin.read().rstrip("\n") if args.value == "-" else args.value
    Vault().set(args.name, value)
    print(f"stored '{args.name}'", file=sys.stderr)
    return 0


def _vault_get(args: argparse.Namespace) -> int:
    vault = Vault()
    if vault.kind(args.name) == "keyring":
        print(
            f"redox-elt vault get: '{args.name}' holds private signing keys, which never leave the vault; "
            "use `redox-elt keys jwks` for the public keys",
            file=sys.stderr,
        )
        return 1
    print(vault.get(args.name))
    return 0


def _vault_list(args: argparse.Namespace) -> int:
    vault = Vault()
    for name in vault.names():
        print(f"{name}\t{vault.kind(name)}" if args.long else name)
    return 0


def _vault_delete(args: argparse.Namespace) -> int:
    if not Vault().delete(args.name):
        print(f"redox-elt vault delete: no vault entry named '{args.name}'", file=sys.stderr)
        return 1
    print(f"deleted '{args.name}'", file=sys.stderr)
    return 0


# ---- keys -----------------------------------------------------------------------------------


def _register_if_asked(args: argparse.Namespace, ring: KeyRing) -> None:
    if getattr(args, "register", None):
        client_id = register_jwks(args.register, args.client_name, ring.jwks())
        print(
            f"registered the JWKS ({len(ring.jwks()['keys'])} keys) for client {client_id}", file=sys.stderr
        )


def _keys_generate(args: argparse.Namespace) -> int:
    ring = KeyRing(Vault(), args.ring)
    key, created = ring.generate(args.alg)
    if created:
        print(f"generated {key.alg} signing key {key.kid}", file=sys.stderr)
    else:
        print(
            f"key ring '{args.ring}' already has signing key {key.kid}; use `redox-elt keys rotate` for a new one",
            file=sys.stderr,
        )
    print(key.kid)
    _register_if_asked(args, ring)
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    ring = KeyRing(Vault(), args.ring)
    key = ring.rotate(args.alg)
    active = ring.load().keys
    print(
        f"added {key.alg} signing key {key.kid}; the JWKS now holds {len(active)} keys. Publish it "
        "(`redox-elt keys jwks`); signing switches to the new key once the token endpoint accepts it",
        file=sys.stderr,
    )
    print(key.kid)
    _register_if_asked(args, ring)
    return 0


def _keys_jwks(args: argparse.Namespace) -> int:
    print(json.dumps(KeyRing(Vault(), args.ring).jwks(), indent=2))
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    state = KeyRing(Vault(), args.ring).load()
    newest = state.newest.kid if state.newest else None
    for key in state.keys:
        print(
            f"{key.kid}\t{key.alg}\t{key.created_at}\t{'active, newest' if key.kid == newest else 'active'}"
        )
    for retired in state.retired:
        print(f"{retired.kid}\t{retired.alg}\t{retired.retired_at}\tretired")
    return 0


def _keys_retire(args: argparse.Namespace) -> int:
    ring = KeyRing(Vault(), args.ring)
    retired = ring.retire(args.kid)
    print(
        f"retired {retired.kid}: its private key is destroyed and it is no longer in the JWKS",
        file=sys.stderr,
    )
    _register_if_asked(args, ring)
    return 0


# ---- audit ----------------------------------------------------------------------------------


def _audit_verify(args: argparse.Namespace) -> int:
    result = verify_audit(_existing(args.warehouse, "warehouse"))
    if result.ok:
        print(f"audit chain ok: {result.reason}")
        return 0
    where = f"first bad record: seq {result.first_bad_seq}: " if result.first_bad_seq is not None else ""
    print(f"audit chain BROKEN: {where}{result.reason}", file=sys.stderr)
    return 1


def _audit_load(args: argparse.Namespace) -> int:
    result = load_audit_into_duckdb(_existing(args.file, "audit file"), args.warehouse)
    print(
        f"loaded {result.inserted} audit records ({result.already_present} already present"
        + (f", {result.unreadable_lines} unreadable lines" if result.unreadable_lines else "")
        + ")"
    )
    return 0


# ---- quota ----------------------------------------------------------------------------------


def _quota(args: argparse.Namespace) -> int:
    """The shared request budget of each (Redox host, client) in the config: used and left."""
    from resources.client import SHARED, client_host

    settings = load_settings(args.config)
    report: dict[str, dict[str, object]] = {}
    for conn in settings.connections:
        host = client_host(conn)
        if host in report:
            report[host]["connections"].append(conn.id)  # type: ignore[union-attr]
            continue
        stats = SHARED.budget(settings, conn).stats()
        report[host] = {**stats.as_dict(), "connections": [conn.id]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for host, row in report.items():
            print(
                f"{host}: {row['used']} of {row['requests']} requests used in the last {row['window_s']:g} s, "
                f"{row['remaining']} left" + (f", paused {row['paused_s']} s" if row["paused_s"] else "")
            )
    return 0


def sandbox_connect(args: argparse.Namespace) -> int:
    """``redox-elt sandbox connect`` with clean errors (for the main CLI to dispatch to)."""

    def run(a: argparse.Namespace) -> int:
        path = connect_sandbox(a.url, a.out, name=a.name)
        print(f"wrote connection config {path}")
        return 0

    return _guarded("sandbox connect", run)(args)


# ---- registration -------------------------------------------------------------------------


def _ring_args(parser: argparse.ArgumentParser, *, alg: bool = False, register: bool = False) -> None:
    parser.add_argument(
        "--ring", default=DEFAULT_KEY_RING, help=f"vault entry of the key ring (default {DEFAULT_KEY_RING})"
    )
    if alg:
        parser.add_argument(
            "--alg", choices=ALGORITHMS, default=None, help=f"signing algorithm (default {DEFAULT_ALGORITHM})"
        )
    if register:
        parser.add_argument(
            "--register", metavar="URL", help="also register the resulting JWKS with the sandbox at URL"
        )
        parser.add_argument(
            "--client-name", default="redox-elt", help="client name at the sandbox (default redox-elt)"
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vault``, ``keys``, ``audit`` and ``quota`` to the main ``redox-elt`` parser."""
    vault = subparsers.add_parser("vault", help="the encrypted credential vault")
    vault_sub = vault.add_subparsers(dest="vault_command", required=True)
    p = vault_sub.add_parser("set", help="store a secret (VALUE '-' reads it from stdin)")
    p.add_argument("name")
    p.add_argument("value")
    p.set_defaults(func=_guarded("vault set", _vault_set))
    p = vault_sub.add_parser("get", help="print a secret (the value alone)")
    p.add_argument("name")
    p.set_defaults(func=_guarded("vault get", _vault_get))
    p = vault_sub.add_parser("list", help="list entry names")
    p.add_argument("-l", "--long", action="store_true", help="also show each entry's kind")
    p.set_defaults(func=_guarded("vault list", _vault_list))
    p = vault_sub.add_parser("delete", help="remove an entry")
    p.add_argument("name")
    p.set_defaults(func=_guarded("vault delete", _vault_delete))

    keys = subparsers.add_parser("keys", help="OAuth signing keys (private keys stay in the vault)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("generate", help="create the first signing key (reuses an existing one)")
    _ring_args(p, alg=True, register=True)
    p.set_defaults(func=_guarded("keys generate", lambda a: _keys_generate(_default_alg(a))))
    p = keys_sub.add_parser("rotate", help="add a new signing key next to the current ones")
    _ring_args(p, alg=True, register=True)
    p.set_defaults(func=_guarded("keys rotate", _keys_rotate))
    p = keys_sub.add_parser("jwks", help="print the public JWKS of every active key")
    _ring_args(p)
    p.set_defaults(func=_guarded("keys jwks", _keys_jwks))
    p = keys_sub.add_parser("list", help="list keys (kid, algorithm, created, status)")
    _ring_args(p)
    p.set_defaults(func=_guarded("keys list", _keys_list))
    p = keys_sub.add_parser("retire", help="destroy an old key and drop it from the JWKS")
    p.add_argument("kid")
    _ring_args(p, register=True)
    p.set_defaults(func=_guarded("keys retire", _keys_retire))

    audit = subparsers.add_parser("audit", help="the API call audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    p = audit_sub.add_parser("verify", help="recompute the hash chain of audit.api_calls")
    p.add_argument("--warehouse", required=True, help="DuckDB warehouse file")
    p.set_defaults(func=_guarded("audit verify", _audit_verify))
    p = audit_sub.add_parser("load", help="load an audit JSONL file into audit.api_calls (idempotent)")
    p.add_argument("--file", required=True, help="audit JSONL file")
    p.add_argument("--warehouse", required=True, help="DuckDB warehouse file")
    p.set_defaults(func=_guarded("audit load", _audit_load))

    quota = subparsers.add_parser("quota", help="the request budget shared by every connection and run")
    quota.add_argument("--config", default=None, help="connections config (default $REDOX_ELT_CONFIG)")
    quota.add_argument("--json", action="store_true", help="machine-readable output")
    quota.set_defaults(func=_guarded("quota", _quota))


def _default_alg(args: argparse.Namespace) -> argparse.Namespace:
    if args.alg is None:
        args.alg = DEFAULT_ALGORITHM
    return args
