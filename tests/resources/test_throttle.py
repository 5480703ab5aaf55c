"""AIMD throttle, simulated against a rolling one-second rate limiter on a fake clock."""

from __future__ import annotations

from collections import deque

import pytest

from resources.throttle import AdaptiveThrottle


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class RollingLimiter:
    """The sandbox's rule: at most ``limit`` accepted requests in any one-second window."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.accepted: deque[float] = deque()

    def admit(self, at: float) -> bool:
        while self.accepted and self.accepted[0] <= at - 1.0:
            self.accepted.popleft()
        if len(self.accepted) >= self.limit:
            return False
        self.accepted.append(at)
        return True


def simulate(
    limit: int,
    seconds: float,
    *,
    initial_rps: float = 5.0,
    latency_s: float = 0.004,
    hint: bool = False,
    raise_limit_at: tuple[float, int] | None = None,
):
    clock = FakeClock()
    throttle = AdaptiveThrottle(initial_rps=initial_rps, clock=clock, sleep=clock.sleep)
    server = RollingLimiter(limit)
    events: list[tuple[float, bool]] = []
    while clock.now < seconds:
        if raise_limit_at and clock.now >= raise_limit_at[0]:
            server.limit = raise_limit_at[1]
        sent_at = throttle.acquire()
        clock.sleep(latency_s)
        if server.admit(sent_at):
            throttle.on_success(sent_at)
            events.append((sent_at, True))
        else:
            throttle.on_rate_limited(sent_at, limit_hint=limit if hint else None)
            events.append((sent_at, False))
    return throttle, events


@pytest.mark.parametrize("limit", [10, 25, 60])
def test_converges_just_under_the_limit_and_stops_getting_429s(limit: int) -> None:
    throttle, events = simulate(limit, 55.0)
    settled = [ok for at, ok in events if at >= 20.0]
    rejected_late = settled.count(False)
    rate = settled.count(True) / 35.0
    assert rejected_late == 0, f"still rejected after settling ({rejected_late})"
    assert 0.75 * limit <= rate <= limit, f"settled at {rate:.1f}/s for a limit of {limit}/s"
    assert throttle.stats().decreases >= 1


def test_probing_is_rare_under_a_fixed_limit() -> None:
    _, events = simulate(20, 600.0)
    late_rejections = [ok for at, ok in events if at >= 20.0].count(False)
    assert late_rejections <= 4  # probes back off: 60 s, 120 s, 240 s ... of quiet between them


def test_probing_finds_a_raised_limit() -> None:
    throttle, events = simulate(10, 240.0, raise_limit_at=(30.0, 40))
    late = [ok for at, ok in events if at >= 200.0].count(True) / 40.0
    assert late > 20.0, f"still at {late:.1f}/s after the limit went from 10 to 40/s"


def test_rate_limit_header_caps_the_ceiling() -> None:
    throttle, events = simulate(25, 20.0, initial_rps=100.0, hint=True)
    assert throttle.stats().ceiling <= 25
    assert [ok for at, ok in events if at >= 10.0].count(False) == 0


def test_429s_for_requests_sent_before_a_decrease_count_once() -> None:
    clock = FakeClock()
    throttle = AdaptiveThrottle(initial_rps=40.0, clock=clock, sleep=clock.sleep)
    in_flight = [throttle.acquire() for _ in range(8)]
    for sent_at in in_flight:
        throttle.on_rate_limited(sent_at)
    stats = throttle.stats()
    assert stats.decreases == 1 and stats.rate_limited == 8
    assert stats.rate == pytest.approx(20.0)


def test_retry_after_pauses_the_connection() -> None:
    clock = FakeClock()
    throttle = AdaptiveThrottle(initial_rps=100.0, clock=clock, sleep=clock.sleep)
    sent_at = throttle.acquire()
    throttle.on_rate_limited(sent_at, retry_after_s=2.0)
    next_send = throttle.acquire()
    assert next_send >= sent_at + 2.0


def test_an_idle_client_does_not_inflate_its_rate() -> None:
    clock = FakeClock()
    throttle = AdaptiveThrottle(initial_rps=10.0, clock=clock, sleep=clock.sleep)
    for _ in range(200):
        sent_at = throttle.acquire()
        throttle.on_success(sent_at)
        clock.sleep(2.0)  # the client is slower than the throttle
    assert throttle.rate == pytest.approx(10.0)
