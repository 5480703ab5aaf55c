"""How long to keep trying one call: attempts, exponential back-off with jitter, a total deadline.

Kept apart from the HTTP code so each rule is testable with a fake clock:

* failures other than 429 get ``max_attempts`` tries, each waiting a full-jitter exponential
  delay (uniform in ``[0, min(max_delay_s, base_delay_s * 2**(n-1))]``);
* 429s have their own, larger allowance (``max_rate_limited``): the shared throttle and request
  budget are what settle them, not this count;
* a server's ``Retry-After`` is honoured but capped at ``retry_after_cap_s`` (300 s, Redox's
  rolling window: no wait longer than that can be needed, and a hostile value cannot hang a run);
* every call has a total ``deadline_s``: a wait that would end after it is not started; the
  call fails at once with a clear error instead.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

REDOX_WINDOW_S = 300.0  # Redox's rate-limit window (REDOX-REFERENCE §12.6)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6  # failures other than 429
    max_rate_limited: int = 40  # 429s per call
    base_delay_s: float = 0.25
    max_delay_s: float = 20.0
    retry_after_cap_s: float = REDOX_WINDOW_S
    deadline_s: float = 900.0  # a call gives up after this long, whatever the counts

    def __post_init__(self) -> None:
        for name in ("base_delay_s", "max_delay_s", "retry_after_cap_s", "deadline_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"RetryPolicy.{name} must be a finite number >= 0, got {value!r}")
        if self.max_attempts < 1 or self.max_rate_limited < 1:
            raise ValueError("RetryPolicy: max_attempts and max_rate_limited must be >= 1")

    def capped_retry_after(self, retry_after_s: float | None) -> float | None:
        if retry_after_s is None or not math.isfinite(retry_after_s):
            return None
        return min(max(0.0, retry_after_s), self.retry_after_cap_s)

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Full-jitter exponential delay before retry number ``failures`` (1-based)."""
        exponent = min(max(failures - 1, 0), 30)
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2**exponent))

    def start(self, clock: Callable[[], float] = time.monotonic) -> RetryState:
        return RetryState(self, clock, clock() + self.deadline_s)


class GiveUp(Exception):  # noqa: N818 - a control-flow signal, not an error type callers see
    """The policy says stop: ``reason`` is a PHI-free phrase for the error message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class RetryState:
    """The counters of one call in progress."""

    policy: RetryPolicy
    clock: Callable[[], float]
    deadline: float
    attempts: int = 0
    failures: int = 0
    rate_limited: int = 0
    reauthenticated: bool = False
    waits: list[float] = field(default_factory=list)

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.deadline

    def after_rate_limit(self) -> None:
        """A 429: the throttle and budget pace the retry; only the count and deadline are checked here."""
        self.rate_limited += 1
        if self.rate_limited >= self.policy.max_rate_limited:
            raise GiveUp(f"rate limited {self.rate_limited} times")
        if self.expired():
            raise GiveUp(f"deadline of {self.policy.deadline_s:.0f} s passed")

    def after_failure(self, rng: random.Random, retry_after_s: float | None) -> float:
        """The delay before the next try, or GiveUp when the attempts or the deadline are spent."""
        self.failures += 1
        if self.failures >= self.policy.max_attempts:
            raise GiveUp(f"{self.attempts} attempts")
        delay = self.policy.backoff(self.failures, rng)
        capped = self.policy.capped_retry_after(retry_after_s)
        if capped is not None:
            delay = max(delay, capped)
        if delay >= self.remaining_s():
            raise GiveUp(
                f"{self.attempts} attempts; the next wait would pass the {self.policy.deadline_s:.0f} s deadline"
            )
        self.waits.append(delay)
        return delay
