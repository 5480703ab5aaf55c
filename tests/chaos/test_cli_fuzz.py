"""Hostile command-line values: every one ends in one line naming the problem, exit code 2.

Each case gives one flag of ``sync``, ``demo``, ``renormalize``, ``sandbox serve``,
``quarantine`` and ``panel`` a bad value (NaN, infinities, huge and negative numbers, empty,
unicode and bidi text, CR/LF, NUL, path traversal, missing / directory / unwritable paths)
with every other flag valid, and runs the CLI's ``main(argv)`` in-process. The case passes
when the exit code is 2, stderr is one line, nothing is printed to stdout, no traceback, and
no file or folder was created. A sync or a server that would start is a failure (the runner
and the server are replaced by tripwires). A few cases run as real subprocesses.

Seeded (``CHAOS_SEED``): the fixed cases plus the same generated values every run.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

SEED = int(os.environ.get("CHAOS_SEED", "20261130"))
GENERATED_PER_FLAG = 30
ROOT = Path(__file__).resolve().parents[2]

NUMBER_WORDS = [
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "",
    " ",
    "abc",
    "1\n2",
    "0x10",
    "∞",
    "--1",
    "1e",
    "½",
]
BAD_DATES = [
    "0001-01-01",
    "9999-12-31",
    "9999-12-31T23:59:59",
    "",
    " ",
    "2020-13-01",
    "2020-02-30",
    "yesterday",
    "1e9",
    "2020-01-01T25:00",
    "2020-01-01\n",
    "2020-01-01T00:00:00+99:00",
    "-2020-01-01",
    "../../",
    "NaN",
    "１９９９-01-01",
    "2020-01-01\r\nX-Injected: 1",
    "1900-01-01",
    "3000-01-01",
]
HOSTILE_TEXT = [
    "../../escape",
    "..",
    "",
    " ",
    "\r\n",
    "a\nb",
    "名前",
    "\u202egnp.exe",
    "x" * 300,
    "-",
    "NORTHWIND-FHIR",
    "northwind-fhir\x00",
    "northwind-fhir ",
    "%2e%2e%2f",
    "$(reboot)",
    "'; DROP TABLE x; --",
]


def _random_text(rng: random.Random) -> str:
    alphabet = "abc/.\\\r\n\t\x00 -_~%$'\"名前\u202e\u200bé" + "".join(
        chr(rng.randrange(0x20, 0x2FFF)) for _ in range(8)
    )
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))


def _random_bad_number(rng: random.Random, low: float, high: float, integer: bool) -> str:
    choice = rng.randrange(5)
    if choice == 0:
        return repr(high + rng.uniform(1, 1e12)) if not integer else str(int(high) + rng.randint(1, 10**12))
    if choice == 1:
        return repr(low - rng.uniform(0.001, 1e9)) if not integer else str(int(low) - rng.randint(1, 10**9))
    if choice == 2:
        return _random_text(rng) + "x"  # never a number
    if choice == 3:
        return rng.choice(["1e400", "-1e400", "9" * rng.randint(30, 400)]) if not integer else "9" * 40
    return rng.choice(NUMBER_WORDS) + rng.choice(["", "x", "\n"]) if integer else rng.choice(NUMBER_WORDS)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A valid config, an existing warehouse, files and folders the cases point at."""
    root = tmp_path_factory.mktemp("chaos-cli")
    cfg = root / "c.yaml"
    conn = {
        "id": "northwind-fhir",
        "kind": "ehr",
        "surfaces": ["fhir"],
        "entities": ["patients"],
        "fhir_base_url": "http://127.0.0.1:9/fhir/R4/northwind/Development",
        "destination_id": "00000000-0000-4000-8000-000000000001",
        "destination_slug": "northwind",
    }
    cfg.write_text(
        yaml.safe_dump(
            {
                "organization": "Chaos",
                "environment": "Development",
                "token_url": "http://127.0.0.1:9/v2/auth/token",
                "auth": {"client_id": "c", "key_ring": "signing-keys"},
                "connections": [conn],
            }
        )
    )
    existing = root / "existing"
    existing.mkdir()
    duckdb.connect(str(existing / "w.duckdb")).close()
    garbage = root / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 4)
    listy = root / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    (root / "d.duckdb").mkdir()
    return {"root": root, "cfg": cfg, "existing": existing / "w.duckdb", "garbage": garbage, "list": listy}


def bad_paths(world: dict[str, Path], rng: random.Random) -> list[str]:
    """Paths that cannot be a config, roster or seed folder: missing, a folder, a device,
    unreadable garbage, traversal, NUL, too long."""
    root = world["root"]
    fixed = [
        str(root / "missing.yaml"),
        str(root),
        "/dev/null/x",
        str(world["garbage"]),
        str(world["list"]),
        "../../../../../../nonexistent/passwd",
        str(root / "a\x00b"),
        str(root / ("x" * 5000)),
        "",
        "\r\n",
    ]
    return fixed + [
        str(root / f"nope-{_random_text(rng)}".replace("/", "_").replace("\x00", "")) for _ in range(4)
    ]


def bad_warehouses(world: dict[str, Path], rng: random.Random) -> list[str]:
    """Warehouses that cannot be created or written."""
    root = world["root"]
    fixed = [
        "/proc/nope/w.duckdb",
        "/proc/self/w.duckdb",
        f"{world['cfg']}/w.duckdb",
        "/dev/null/w.duckdb",
        str(root / "d.duckdb"),
        str(root / "a\x00b" / "w.duckdb"),
        str(root / ("x" * 5000) / "w.duckdb"),
    ]
    return fixed + [
        f"/proc/nope-{rng.randrange(10**9)}/{_random_text(rng).replace('/', '_')}" for _ in range(3)
    ]


def missing_warehouses(world: dict[str, Path], rng: random.Random) -> list[str]:
    """Warehouses a read-only verb must find (and never create)."""
    root = world["root"]
    return [
        str(root / "none" / "w.duckdb"),
        str(root / "none"),
        str(root / "a\x00b"),
        str(world["cfg"]),
        *(str(root / f"none-{rng.randrange(10**9)}" / "w.duckdb") for _ in range(3)),
    ]


def cases(world: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    """(case name, argv): each argv has exactly one bad value and exits 2."""
    rng = random.Random(SEED)
    root = world["root"]
    cfg, fresh = str(world["cfg"]), str(root / "fresh" / "w.duckdb")
    sync = ["sync", "--config", cfg, "--warehouse", fresh]

    def numbers(low: float, high: float, *, integer: bool, extra: list[str]) -> list[str]:
        return (
            extra
            + NUMBER_WORDS
            + [_random_bad_number(rng, low, high, integer) for _ in range(GENERATED_PER_FLAG)]
        )

    for v in numbers(0, 720, integer=False, extra=["-1", "1e9", "1e308", "721", "-0.0001", "1_000_000"]):
        yield "sync --lookback-hours", [*sync, "--lookback-hours", v]
    for v in BAD_DATES + [_random_text(rng) + "!" for _ in range(GENERATED_PER_FLAG)]:
        yield "sync --since", [*sync, "--since", v]
        yield "sync --since ok --until", [*sync, "--since", "2024-01-01", "--until", v]
    for v in ["2024-01-01", "2020-01-01", "1999-12-31"]:
        yield "sync --until alone", [*sync, "--until", v]
    yield "sync --until before --since", [*sync, "--since", "2024-02-01", "--until", "2024-01-01"]
    yield "sync --until equals --since", [*sync, "--since", "2024-02-01", "--until", "2024-02-01"]
    for v in HOSTILE_TEXT + [_random_text(rng) for _ in range(GENERATED_PER_FLAG)]:
        yield "sync --connection", [*sync, "--connection", v]
    for v in bad_paths(world, rng):
        yield "sync --config", ["sync", "--config", v, "--warehouse", fresh]
    for v in bad_warehouses(world, rng):
        yield "sync --warehouse", ["sync", "--config", cfg, "--warehouse", v]
    for v in ["", "postgres", "DUCKDB", "../x", "\n"]:
        yield "sync --destination", [*sync, "--destination", v]

    serve = ["sandbox", "serve", "--port", "0", "--patients", "5"]
    for v in numbers(0, 65535, integer=True, extra=["99999", "65536", "-1", "1e3", "80.5", "0x50"]):
        yield "sandbox serve --port", ["sandbox", "serve", "--patients", "5", "--port", v]
    for v in numbers(1, 5_000_000, integer=True, extra=["0", "-1", "5000001", "1e3"]):
        yield "sandbox serve --patients", ["sandbox", "serve", "--port", "0", "--patients", v]
    for v in ["x", "1.5", "", "nan", "\n", "9e9", _random_text(rng) + "x"]:
        yield "sandbox serve --seed", [*serve, "--seed", v]
    for v in bad_paths(world, rng):
        yield "sandbox serve --seed-from", [*serve, "--seed-from", v]
        yield "sandbox serve --config", [*serve, "--config", v]
    for v in ["bad host", "999.1.1.1", "\n", "名前", "x" * 300, "256.256.256.256", "::ffff:zz", "-1"]:
        yield "sandbox serve --host", [*serve, "--host", v]

    for v in numbers(1, 5_000_000, integer=True, extra=["0", "-1", "5000001"]):
        yield "demo --patients", ["demo", "--warehouse", fresh, "--patients", v]
    for v in bad_warehouses(world, rng):
        yield "demo --warehouse", ["demo", "--patients", "5", "--warehouse", v]

    for v in missing_warehouses(world, rng):
        yield "renormalize --warehouse", ["renormalize", "--warehouse", v]

    existing = str(world["existing"])
    for verb in ("list", "retry"):
        for v in missing_warehouses(world, rng):
            yield f"quarantine {verb} --warehouse", ["quarantine", verb, "--warehouse", v]
        for v in HOSTILE_TEXT[:10] + [_random_text(rng) + "/" for _ in range(4)]:
            yield (
                f"quarantine {verb} --connection",
                ["quarantine", verb, "--warehouse", existing, "--connection", v],
            )
    for v in ["0", "-1", "x", "", "1e3", "9" * 30, "1.5", "\n", "999999"] + [
        _random_text(rng) + "x" for _ in range(6)
    ]:
        yield "quarantine dismiss --id", ["quarantine", "dismiss", "--warehouse", existing, "--id", v]
        yield "quarantine retry --id", ["quarantine", "retry", "--warehouse", existing, "--id", v]
    for v in ["", " ", "\n", "a\r\nb", "x" * 300, "\x00", "\u0007bell"]:
        yield (
            "quarantine dismiss --reason",
            ["quarantine", "dismiss", "--warehouse", existing, "--id", "1", "--reason", v],
        )
    for v in missing_warehouses(world, rng):
        yield "quarantine dismiss --warehouse", ["quarantine", "dismiss", "--warehouse", v, "--id", "1"]

    for v in missing_warehouses(world, rng):
        yield "status --warehouse", ["status", "--warehouse", v]
        yield "report --warehouse", ["report", "--out", str(root / "report"), "--warehouse", v]
    for v in bad_paths(world, rng):
        yield "status --config", ["status", "--config", v, "--warehouse", existing]
    for v in ["", "/proc/nope/report", "/dev/null/report", f"{world['cfg']}/report", str(root / "a\x00b")]:
        yield "report --out", ["report", "--out", v, "--warehouse", existing]

    roster = root / "roster.csv"
    roster.write_text("system,value\nMR,1\n")
    add = ["panel", "add", "--config", cfg, "--connection", "northwind-fhir", "--file", str(roster)]
    for v in bad_paths(world, rng):
        yield "panel add --file", [*add[:-2], "--file", v, "--warehouse", fresh]
        yield (
            "panel add --config",
            [
                "panel",
                "add",
                "--config",
                v,
                "--connection",
                "northwind-fhir",
                "--file",
                str(roster),
                "--warehouse",
                fresh,
            ],
        )
    for v in HOSTILE_TEXT:
        yield (
            "panel add --connection",
            ["panel", "add", "--config", cfg, "--connection", v, "--file", str(roster), "--warehouse", fresh],
        )
    for v in bad_warehouses(world, rng):
        yield "panel add --warehouse", [*add, "--warehouse", v]
    for v in missing_warehouses(world, rng):
        yield "panel list --warehouse", ["panel", "list", "--connection", "northwind-fhir", "--warehouse", v]
        yield "panel stats --warehouse", ["panel", "stats", "--warehouse", v]
    for v in ["0", "-5", "x", "", "nan", "1e3", "99999999999"]:
        yield (
            "panel list --limit",
            ["panel", "list", "--connection", "northwind-fhir", "--warehouse", existing, "--limit", v],
        )
    for v in bad_paths(world, rng):
        yield "panel stats --config", ["panel", "stats", "--warehouse", existing, "--config", v]


class Tripwire(Exception):
    pass


def _trip(*args: Any, **kwargs: Any) -> Any:
    raise Tripwire("validation let a bad value through: a sync or a server would have started")


class TripRunner:
    """Built before the CLI validates (as the real runner is); trips when asked to run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    __call__ = staticmethod(_trip)


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing real may start: the sync runners and the sandbox server are tripwires."""
    import pipelines.sync
    import redox_elt.sync_job
    import sandbox.server

    monkeypatch.setattr(redox_elt.sync_job, "DagsterSyncRunner", TripRunner)
    monkeypatch.setattr(pipelines.sync, "run_sync", _trip)
    monkeypatch.setattr(sandbox.server, "SandboxServer", _trip)
    monkeypatch.delenv("REDOX_ELT_CONFIG", raising=False)


def parser_with_panel() -> Any:
    """The CLI's parser, with the panel verbs registered when the CLI does not yet."""
    from redox_elt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if "panel" not in sub.choices:
        from pipelines.panel_cli import register

        register(sub)
    return parser


def run_main(argv: list[str]) -> int:
    """``redox_elt.cli.main`` (its steps, with the panel verbs) in-process."""
    import logging

    import redox_elt.cli as cli
    from redox_elt.environment import Environment

    handler, umask = signal.getsignal(signal.SIGTERM), os.umask(0o077)
    try:
        parser = parser_with_panel()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2
        logging.getLogger().setLevel(logging.WARNING)
        cli._apply_environment(args, Environment.read())
        return int(args.func(args) or 0)
    finally:
        signal.signal(signal.SIGTERM, handler)
        os.umask(umask)


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_every_hostile_cli_value_is_one_line_exit_2(
    world: dict[str, Path], guarded: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(world["root"])
    all_cases = list(cases(world))
    assert len(all_cases) >= 600
    before = snapshot(world["root"])
    failures = []
    for name, argv in all_cases:
        capsys.readouterr()
        try:
            code = run_main(argv)
        except Tripwire as exc:
            failures.append(f"{name} {argv[-1][:40]!r}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - any escape is a traceback for a user
            failures.append(f"{name} {argv[-1][:40]!r}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        if code != 2 or len(lines) != 1 or out.strip() or "Traceback" in err:
            failures.append(
                f"{name} {argv[-1][:40]!r}: exit {code}, stderr {err[:200]!r}, stdout {out[:80]!r}"
            )
        # The warehouse's own lock file beside an existing warehouse is not a creation.
        created = snapshot(world["root"]) - before - {"roster.csv", "existing/.w.duckdb.lock"}
        if created:
            failures.append(f"{name} {argv[-1][:40]!r}: created {sorted(created)[:3]}")
            before |= created
    assert not failures, f"{len(failures)} of {len(all_cases)} cases:\n" + "\n".join(failures[:25])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["sync", "--lookback-hours", "nan"], "--lookback-hours"),
        (["sandbox", "serve", "--port", "99999"], "is not a TCP port"),
        (["sandbox", "serve", "--port", "0", "--seed-from", "/nonexistent-chaos"], "--seed-from"),
    ],
)
def test_real_subprocesses_end_in_one_line(argv: list[str], words: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "redox_elt.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path), "REDOX_ELT_HOME": str(tmp_path / "h")},
    )
    assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
        done.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_a_busy_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "redox_elt.cli", "sandbox", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert done.returncode == 2 and f"port {port}" in done.stderr and "in use" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
