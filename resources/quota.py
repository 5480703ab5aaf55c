"""One request budget per (Redox host, client): shared by every connection and every process.

Redox limits requests per user (IP) across all connections: 10,000 per rolling 5 minutes
documented, 7,500 reported by the 429's ``X-RateLimit-Limit`` (REDOX-REFERENCE §12.6). Pacing
each connection on its own cannot respect that, and neither can two syncs on one machine that
do not know about each other. So every request, whichever connection or process sends it,
first takes a slot in one rolling-window budget kept in a small SQLite file (WAL mode) under
the redox home, ``quota/<host>-<hash>.sqlite``: a table of send times, pruned as they leave
the window. ``BEGIN IMMEDIATE`` serialises the check-and-record across processes; a process
killed at any point leaves the file consistent (SQLite's journal), and its recorded sends keep
counting until they age out, exactly as they do at Redox.

Default budget: 90% of 7,500 per 300 s (``quota: {requests, window_s}`` in connections.yaml).

Priorities, highest first: ``event`` > ``new_patient`` > ``refresh`` > ``discovery``. A
priority may spend only while more than its reserve of the budget is left, so the lower ones
stop early and leave room for the higher ones:

=============  ===========================================
priority       may send while the budget left is more than
=============  ===========================================
event          0% (may spend the whole budget)
new_patient    5%
refresh        10%
discovery      15%
=============  ===========================================

A 429 with ``Retry-After`` pauses the whole budget (every process) until it has passed.
Every API attempt takes a slot (retries included); token requests do not (a few per hour,
well inside the 10% between this budget and Redox's limit).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PRIORITIES = ("event", "new_patient", "refresh", "discovery")
RESERVE_FRACTION = {"event": 0.0, "new_patient": 0.05, "refresh": 0.10, "discovery": 0.15}
DEFAULT_PRIORITY = "refresh"  # reads that name no priority; writes and token calls use "event"
REDOX_REPORTED_LIMIT = 7500
DEFAULT_REQUESTS = int(REDOX_REPORTED_LIMIT * 0.9)
DEFAULT_WINDOW_S = 300.0
MAX_PAUSE_S = 300.0  # a Retry-After never pauses longer than Redox's window

_SCHEMA = """
create table if not exists sends (t real not null);
create index if not exists sends_t on sends (t);
create table if not exists state (k text primary key, v real not null);
"""


class BudgetError(Exception):
    """The request budget cannot be used (bad priority, unreadable file)."""


class BudgetExhausted(BudgetError):
    """No slot frees up before the caller's deadline. The message holds counts only."""


@dataclass(frozen=True)
class BudgetStats:
    requests: int  # the budget per window
    window_s: float
    used: int  # requests sent in the current window (all connections and processes)
    remaining: int  # requests - used
    paused_s: float  # how long a Retry-After pause still lasts (0 when none)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "requests": self.requests,
            "window_s": self.window_s,
            "used": self.used,
            "remaining": self.remaining,
            "paused_s": round(self.paused_s, 3),
        }


def check_priority(priority: str) -> str:
    if priority not in RESERVE_FRACTION:
        raise BudgetError(f"unknown priority {priority!r} (allowed: {', '.join(PRIORITIES)})")
    return priority


def budget_file(home: Path, host: str, client_id: str) -> Path:
    """The budget file of (host, client id) under ``home``: readable host name plus a hash."""
    digest = hashlib.sha256(f"{host.lower()}\n{client_id}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^a-z0-9.-]+", "_", host.lower())[:60] or "host"
    return home / "quota" / f"{readable}-{digest}.sqlite"


class RequestBudget:
    """A rolling-window request budget persisted in SQLite; safe across threads and processes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        requests: int = DEFAULT_REQUESTS,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
            raise BudgetError(f"budget requests must be a whole number >= 1, got {requests!r}")
        if not (isinstance(window_s, int | float) and math.isfinite(window_s) and window_s > 0):
            raise BudgetError(f"budget window_s must be a finite number > 0, got {window_s!r}")
        self.path = Path(path)
        self.requests = requests
        self.window_s = float(window_s)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._db = self._open()

    def __repr__(self) -> str:
        return f"RequestBudget({self.requests} per {self.window_s:g} s, file={self.path.name!r})"

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.execute("pragma journal_mode=wal")
            db.execute("pragma synchronous=normal")
            db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise BudgetError(
                f"request budget file {self.path} cannot be used ({type(exc).__name__})"
            ) from None
        for suffix in ("", "-wal", "-shm"):  # SQLite creates its side files with the umask's mode
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                os.chmod(side, 0o600)
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _connection(self) -> sqlite3.Connection:
        """The SQLite handle of this process: a forked child must not share its parent's."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._db = self._open()
        return self._db

    # ---- the rule ----------------------------------------------------------------------------

    def allowance(self, priority: str) -> int:
        """How many requests of the window ``priority`` may use (the rest is reserved above it)."""
        return max(1, math.floor(self.requests * (1.0 - RESERVE_FRACTION[check_priority(priority)])))

    def _transaction(self, priority: str, take: bool) -> tuple[bool, float, int, float]:
        """(granted, wait_s or send time when granted, used, paused_s); records the send when granted and ``take``."""
        allowance = self.allowance(priority)
        with self._lock:
            db = self._connection()
            try:
                db.execute("begin immediate")
                try:
                    now = self._clock()
                    # Aged-out sends, and sends "in the future" (the wall clock went back), stop counting.
                    db.execute("delete from sends where t <= ? or t > ?", (now - self.window_s, now + 1.0))
                    used = db.execute("select count(*) from sends").fetchone()[0]
                    row = db.execute("select v from state where k = 'paused_until'").fetchone()
                    paused_s = (row[0] if row else 0.0) - now
                    if not 0.0 < paused_s <= MAX_PAUSE_S + 1.0:
                        paused_s = 0.0  # none, over, or left by a wall clock that went back
                    if paused_s <= 0 and used < allowance:
                        if take:
                            db.execute("insert into sends (t) values (?)", (now,))
                            used += 1
                        db.execute("commit")
                        return True, now, used, 0.0  # granted: the second value is the send time
                    wait = paused_s
                    if used >= allowance:
                        oldest = db.execute(
                            "select t from sends order by t limit 1 offset ?", (used - allowance,)
                        ).fetchone()
                        wait = max(wait, (oldest[0] + self.window_s - now) if oldest else 0.0)
                    db.execute("commit")
                    return False, max(wait, 0.001), used, paused_s
                except BaseException:
                    db.execute("rollback")
                    raise
            except sqlite3.Error as exc:
                raise BudgetError(f"request budget file {self.path} failed ({type(exc).__name__})") from None

    # ---- API ---------------------------------------------------------------------------------

    def try_acquire(self, priority: str = DEFAULT_PRIORITY) -> bool:
        """Take a slot now if ``priority`` may spend one; False (nothing recorded) otherwise."""
        return self._transaction(priority, take=True)[0]

    def acquire(self, priority: str = DEFAULT_PRIORITY, *, deadline_s: float | None = None) -> float:
        """Block until ``priority`` may send one request, record it and return its recorded time.

        ``deadline_s`` bounds the wait: when the next free slot comes later than that (or the
        time runs out), ``BudgetExhausted`` is raised instead of waiting.
        """
        give_up_at = None if deadline_s is None else time.monotonic() + max(0.0, deadline_s)
        while True:
            granted, wait, used, paused = self._transaction(priority, take=True)
            if granted:
                return wait
            if give_up_at is not None and time.monotonic() + wait > give_up_at:
                why = (
                    f"paused {paused:.0f} s by a 429"
                    if paused > 0 and used < self.allowance(priority)
                    else f"{used} of {self.requests} requests used in the last {self.window_s:g} s; "
                    f"'{priority}' may use {self.allowance(priority)}"
                )
                raise BudgetExhausted(
                    f"request budget: no slot for '{priority}' within {deadline_s:.0f} s ({why}); "
                    "the work is deferred, not lost"
                )
            self._sleep(wait)

    def remaining(self, priority: str | None = None) -> int:
        """Requests left in the window (for ``priority``: left before its reserve)."""
        _, _, used, _ = self._transaction(priority or "event", take=False)
        limit = self.requests if priority is None else self.allowance(priority)
        return max(0, limit - used)

    def stats(self) -> BudgetStats:
        _, _, used, paused = self._transaction("event", take=False)
        return BudgetStats(self.requests, self.window_s, used, max(0, self.requests - used), paused)

    def pause(self, seconds: float) -> None:
        """Stop every process's sends for ``seconds`` (a 429's Retry-After), at most MAX_PAUSE_S."""
        if not math.isfinite(seconds) or seconds <= 0:
            return
        seconds = min(seconds, MAX_PAUSE_S)
        with self._lock:
            try:
                until = self._clock() + seconds
                self._connection().execute(
                    "insert into state (k, v) values ('paused_until', ?) "
                    "on conflict (k) do update set v = max(v, excluded.v)",
                    (until,),
                )
            except sqlite3.Error as exc:
                raise BudgetError(f"request budget file {self.path} failed ({type(exc).__name__})") from None
