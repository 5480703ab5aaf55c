"""Adaptive client-side throttling (AIMD over a paced token bucket).

Redox limits requests per client (REDOX-REFERENCE §6) and answers 429 with
``X-RateLimit-Limit``, rarely ``Retry-After``. Retrying into a limit wastes the window, so the
client paces its requests; one throttle is shared by every connection of a Redox host and
client in a process (``resources.client``), next to the request budget that also spans
processes (``resources.quota``):

* pacing: requests get send slots ``1/rate`` apart (a token bucket of depth one), so there
  are no bursts the server could count against us;
* before the first 429 the rate grows multiplicatively, but only while the throttle is what
  holds the client back (a latency-bound client does not inflate it);
* on a 429 the rate halves (multiplicative decrease) and the rate at which the server said no
  becomes the *ceiling* estimate (capped by ``X-RateLimit-Limit``: a limit of N per window of
  a second or more can never sustain more than N/s); 429s for requests sent before that
  decrease, or within ``drain_s`` after it (while the server's window still holds the burst
  that caused it), are the same congestion event and do not cut the rate again;
* after a decrease the rate recovers quickly to ``target_fraction`` of the ceiling and holds
  there, so the settled rate sits just under the limit with no further rejections; only after
  ``probe_after_s`` of quiet does it creep above, to find a limit that has been raised. A probe
  that ends in a 429 doubles the quiet period before the next one (up to ``max_probe_after_s``),
  so a fixed limit costs one rejected request every few minutes at most.

``Retry-After``, when present, pauses every request through this throttle until it has passed.
Time and sleep are injectable so the behaviour is unit-testable with a simulated clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ThrottleStats:
    rate: float
    ceiling: float | None
    decreases: int
    rate_limited: int
    successes: int


class AdaptiveThrottle:
    def __init__(
        self,
        *,
        initial_rps: float = 10.0,
        max_rps: float = 200.0,
        min_rps: float = 0.5,
        slow_start_gain: float = 0.25,
        recovery_per_s: float = 0.5,
        probe_per_s: float = 0.02,
        target_fraction: float = 0.9,
        probe_after_s: float = 60.0,
        drain_s: float = 1.0,
        max_probe_after_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0 < min_rps <= max_rps:
            raise ValueError("throttle: need 0 < min_rps <= max_rps")
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self.max_rps = float(max_rps)
        self.min_rps = float(min_rps)
        self._rate = min(max(float(initial_rps), self.min_rps), self.max_rps)
        self._slow_start_gain = slow_start_gain
        self._recovery_per_s = recovery_per_s
        self._probe_per_s = probe_per_s
        self._target_fraction = target_fraction
        self._base_probe_after_s = probe_after_s
        self._probe_after_s = probe_after_s
        self._max_probe_after_s = max_probe_after_s
        self._probing = False
        self._drain_s = drain_s
        self._ceiling: float | None = None
        self._next_slot = float("-inf")
        self._paused_until = float("-inf")
        self._last_decrease_at = float("-inf")
        self._last_wait_at = float("-inf")
        self._decreases = 0
        self._rate_limited = 0
        self._successes = 0

    @property
    def rate(self) -> float:
        return self._rate

    def stats(self) -> ThrottleStats:
        with self._lock:
            return ThrottleStats(
                self._rate, self._ceiling, self._decreases, self._rate_limited, self._successes
            )

    def acquire(self) -> float:
        """Block until this request may be sent; returns its send time (pass it back to on_*)."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next_slot, self._paused_until)
            self._next_slot = slot + 1.0 / self._rate
            if slot > now:
                self._last_wait_at = now
        if slot > now:
            self._sleep(slot - now)
        return slot

    def on_success(self, sent_at: float) -> None:
        with self._lock:
            self._successes += 1
            now = self._clock()
            if now - self._last_wait_at > 1.0:
                return  # the throttle is not what limits this client: no evidence to go faster
            rate = self._rate
            if self._ceiling is None:
                rate += self._slow_start_gain  # per success, so about x(1 + gain) per second
            else:
                target = self._ceiling * self._target_fraction
                if rate < target:
                    rate = min(target, rate + self._recovery_per_s * self._ceiling / rate)
                elif now - self._last_decrease_at >= self._probe_after_s:
                    self._probing = True
                    rate += self._probe_per_s * self._ceiling / rate
                    if rate > self._ceiling * 1.1:
                        # The server takes clearly more than we thought: the limit was raised.
                        self._ceiling = rate
                        self._probe_after_s = self._base_probe_after_s
            self._rate = min(rate, self.max_rps)

    def on_rate_limited(
        self, sent_at: float, *, retry_after_s: float | None = None, limit_hint: float | None = None
    ) -> None:
        """A 429 came back for the request sent at ``sent_at``."""
        with self._lock:
            self._rate_limited += 1
            now = self._clock()
            if retry_after_s is not None and retry_after_s > 0:
                self._paused_until = max(self._paused_until, now + retry_after_s)
            if sent_at <= self._last_decrease_at + self._drain_s:
                return  # part of the congestion already handled: the server's window is draining
            if self._probing:
                self._probe_after_s = min(self._probe_after_s * 2.0, self._max_probe_after_s)
                self._probing = False
            ceiling = self._rate
            if limit_hint is not None and limit_hint > 0:
                ceiling = min(ceiling, float(limit_hint))
            self._ceiling = max(ceiling, self.min_rps)
            self._rate = max(self.min_rps, min(self._rate * 0.5, self._ceiling * self._target_fraction))
            self._last_decrease_at = now
            self._decreases += 1
            # Requests already given slots at the old pace move back to the new one.
            self._next_slot = max(self._next_slot, now + 1.0 / self._rate)
