"""The shared request budget: rolling window, priorities, pauses, and several processes at once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resources.quota import (
    DEFAULT_REQUESTS,
    BudgetError,
    BudgetExhausted,
    RequestBudget,
    budget_file,
)

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def budget(
    tmp_path: Path, requests: int = 100, window_s: float = 300.0, clock: FakeClock | None = None
) -> RequestBudget:
    clock = clock or FakeClock()
    return RequestBudget(
        tmp_path / "b.sqlite", requests=requests, window_s=window_s, clock=clock, sleep=clock.sleep
    )


def test_default_is_ninety_percent_of_the_reported_limit() -> None:
    assert DEFAULT_REQUESTS == 6750


def test_priority_reserves_keep_room_for_higher_priorities(tmp_path: Path) -> None:
    b = budget(tmp_path, requests=100)
    taken = {p: 0 for p in ("discovery", "refresh", "new_patient", "event")}
    for priority in taken:  # lowest first: each spends what its reserve allows, then stops
        while b.try_acquire(priority):
            taken[priority] += 1
    assert taken == {"discovery": 85, "refresh": 5, "new_patient": 5, "event": 5}
    assert b.stats().used == 100 and b.remaining() == 0 and b.remaining("event") == 0
    assert not b.try_acquire("event")


def test_refresh_stops_when_ten_percent_is_left(tmp_path: Path) -> None:
    b = budget(tmp_path, requests=200)
    while b.try_acquire("refresh"):
        pass
    assert b.stats().remaining == 20  # 10% kept for events and new patients
    assert b.remaining("refresh") == 0 and b.remaining("new_patient") == 10
    assert b.try_acquire("event")


def test_window_rolls_and_acquire_waits_exactly_until_a_slot_frees(tmp_path: Path) -> None:
    clock = FakeClock()
    b = budget(tmp_path, requests=3, window_s=10.0, clock=clock)
    start = clock.now
    for step in range(3):
        b.acquire("event")
        clock.now += 1.0 if step < 2 else 0.0
    assert not b.try_acquire("event")
    b.acquire("event")  # the first send (at start) leaves the window at start + 10
    assert clock.now == pytest.approx(start + 10.0, abs=0.01)
    assert b.stats().used == 3


def test_acquire_gives_up_at_its_deadline_with_counts_only(tmp_path: Path) -> None:
    clock = FakeClock()
    b = budget(tmp_path, requests=2, window_s=300.0, clock=clock)
    b.acquire("refresh")
    b.acquire("event")
    with pytest.raises(BudgetExhausted) as caught:
        b.acquire("refresh", deadline_s=5.0)
    assert clock.sleeps == []  # the free slot is 300 s away: no point waiting 5 s
    assert "2 of 2 requests used in the last 300 s" in str(caught.value)


def test_pause_is_shared_and_capped(tmp_path: Path) -> None:
    clock = FakeClock()
    b = budget(tmp_path, clock=clock)
    other = RequestBudget(b.path, requests=100, window_s=300.0, clock=clock, sleep=clock.sleep)
    b.pause(1_000_000)  # a hostile Retry-After
    assert not other.try_acquire("event")
    assert other.stats().paused_s == pytest.approx(300.0)
    other.acquire("event")
    assert clock.sleeps == [pytest.approx(300.0)]


def test_unknown_priority_and_bad_numbers_are_refused(tmp_path: Path) -> None:
    b = budget(tmp_path)
    with pytest.raises(BudgetError, match="unknown priority 'urgent'"):
        b.try_acquire("urgent")
    for requests, window in ((0, 300.0), (10, float("nan")), (10, -1.0)):
        with pytest.raises(BudgetError):
            RequestBudget(tmp_path / "x.sqlite", requests=requests, window_s=window)


def test_files_are_owner_only_and_named_per_host_and_client(tmp_path: Path) -> None:
    path = budget_file(tmp_path / "home", "api.redoxengine.com", "client-1")
    assert path != budget_file(tmp_path / "home", "api.redoxengine.com", "client-2")
    assert path.name.startswith("api.redoxengine.com-")
    b = RequestBudget(path, requests=10)
    b.acquire("event")
    assert path.parent.stat().st_mode & 0o777 == 0o700
    for side in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if side.exists():
            assert side.stat().st_mode & 0o777 == 0o600, side


def test_a_wall_clock_that_goes_back_does_not_block_for_ever(tmp_path: Path) -> None:
    clock = FakeClock()
    b = budget(tmp_path, requests=2, clock=clock)
    b.acquire("event")
    b.acquire("event")
    clock.now -= 3600  # NTP step back by an hour
    assert b.try_acquire("event")


# ---- several processes -----------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from resources.quota import RequestBudget
    path, requests, window, seconds, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    budget = RequestBudget(path, requests=requests, window_s=window)
    print("ready", flush=True)
    sys.stdin.readline()  # start together: the parent says go once every child is ready
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        if mode == "blocking":
            print(repr(budget.acquire("event", deadline_s=max(0.0, stop - time.monotonic()) + 5)), flush=True)
        else:
            print("granted" if budget.try_acquire("event") else "denied", flush=True)
    """
)


def spawn(path: Path, requests: int, window_s: float, seconds: float, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(requests), str(window_s), str(seconds), mode],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def start_together(children: list[subprocess.Popen[str]]) -> None:
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()


def test_two_processes_never_exceed_one_budget_together(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    children = [spawn(path, 2000, 3600.0, 1.5, "try") for _ in range(2)]
    start_together(children)
    outputs = [child.communicate(timeout=60)[0].split() for child in children]
    granted = [out.count("granted") for out in outputs]
    assert sum(granted) == 2000  # together exactly the budget, never more
    assert all(out.count("denied") for out in outputs)  # both kept asking once it was spent
    assert RequestBudget(path, requests=2000, window_s=3600.0).stats().used == 2000


def test_two_blocking_processes_respect_a_rolling_window(tmp_path: Path) -> None:
    path = tmp_path / "rolling.sqlite"
    limit, window = 15, 1.0
    children = [spawn(path, limit, window, 2.5, "blocking") for _ in range(2)]
    start_together(children)
    per_child = [[float(x) for x in child.communicate(timeout=60)[0].split()] for child in children]
    assert all(per_child), "both processes sent"
    sends = sorted(t for times in per_child for t in times)
    assert len(sends) >= 2 * limit  # the window rolled at least once
    for i, start in enumerate(sends):  # any window of `window` seconds holds at most `limit` sends
        inside = [t for t in sends[i:] if t < start + window]
        assert len(inside) <= limit


def test_state_survives_a_process_kill(tmp_path: Path) -> None:
    path = tmp_path / "killed.sqlite"
    child = spawn(path, 100_000, 3600.0, 60.0, "blocking")
    start_together([child])
    assert child.stdout is not None
    seen = 0
    while seen < 200:  # wait on a condition: the child has recorded 200 sends
        if child.stdout.readline():
            seen += 1
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    seen += len(child.stdout.read().split())  # sends printed before the kill but not yet read
    with sqlite3.connect(path) as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    survivor = RequestBudget(path, requests=100_000, window_s=3600.0)
    used = survivor.stats().used
    assert seen <= used <= seen + 1  # every printed send is recorded; at most one was not printed yet
    survivor.acquire("event")
    assert survivor.stats().used == used + 1


# ---- the CLI verb -------------------------------------------------------------------------------


def _run_cli(*argv: str) -> int:
    import argparse

    from resources.cli import register

    parser = argparse.ArgumentParser(prog="redox-elt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_quota_verb_reports_the_shared_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from resources.settings import settings_from_dict, write_settings

    doc = {
        "token_url": "http://127.0.0.1:9/v2/auth/token",
        "auth": {"client_id": "c-1"},
        "quota": {"requests": 40, "window_s": 60},
        "connections": [
            {"id": "a", "surfaces": ["fhir"], "fhir_base_url": "http://127.0.0.1:9/fhir/R4/a/Development"},
            {"id": "b", "surfaces": ["fhir"], "fhir_base_url": "http://127.0.0.1:9/fhir/R4/b/Development"},
        ],
    }
    path = write_settings(settings_from_dict(doc, source_path=tmp_path / "c.yaml"), tmp_path / "c.yaml")
    assert _run_cli("quota", "--config", str(path), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "127.0.0.1:9": {
            "requests": 40,
            "window_s": 60.0,
            "used": 0,
            "remaining": 40,
            "paused_s": 0.0,
            "connections": ["a", "b"],
        }
    }
    assert _run_cli("quota", "--config", str(tmp_path / "missing.yaml")) == 2
    assert (
        _run_cli(
            "audit",
            "load",
            "--file",
            str(tmp_path / "nope.jsonl"),
            "--warehouse",
            str(tmp_path / "w" / "x.duckdb"),
        )
        == 2
    )
    assert not (tmp_path / "w").exists()
    assert "does not exist" in capsys.readouterr().err


def test_sandbox_onboarding_sets_ninety_percent_of_the_sandbox_limit() -> None:
    from resources.onboarding import _quota_entry

    per_connection = {
        "connections": [
            {"rate_limit": {"requests": 7500, "window_s": 300}},
            {"rate_limit": {"requests": 100, "window_s": 60}},
        ]
    }
    assert _quota_entry(per_connection) == {"requests": 90, "window_s": 60.0}
    assert _quota_entry({"quota": {"requests": 7500, "window_s": 300}, **per_connection}) == {
        "requests": 6750,
        "window_s": 300.0,
    }
    assert _quota_entry({"connections": []}) == {"requests": 6750, "window_s": 300.0}
    lifted = _quota_entry({"quota": {"requests": 10**12, "window_s": 300}})
    assert lifted["requests"] == 100_000_000  # clamped into the config's range
