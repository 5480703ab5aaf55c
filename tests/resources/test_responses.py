"""The response classifier and the retry policy, each on its own (no HTTP, fake clocks)."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from resources.responses import FATAL, OK, PARTIAL, REAUTH, RETRY, classify, safe_value, server_errors
from resources.retry import GiveUp, RetryPolicy

NAME = "Zyxwvutsrq"


def verdict(
    status: int | None, body: Any = None, error: str | None = None, write: bool = False, headers=None
):
    response = httpx.Response(status, headers=headers or {}) if status is not None else None
    return classify(status=status, body=body, transport_error=error, write=write, response=response)


@pytest.mark.parametrize(
    ("status", "body", "error", "write", "kind"),
    [
        (200, {"resourceType": "Bundle", "entry": []}, None, False, OK),
        (200, {"Meta": {"Errors": []}, "Results": []}, None, False, OK),
        (200, {"Meta": {"Errors": [{"Type": "query"}]}}, None, False, PARTIAL),
        (200, {"Meta": {"Errors": "broken"}}, None, False, PARTIAL),
        (200, {"resourceType": "OperationOutcome", "issue": [{"severity": "information"}]}, None, False, OK),
        (200, {"resourceType": "OperationOutcome", "issue": [{"severity": NAME}]}, None, False, PARTIAL),
        (None, None, "ConnectTimeout", True, RETRY),
        (200, None, "MalformedBody", False, RETRY),
        (401, None, None, False, REAUTH),
        (429, None, None, True, RETRY),
        (500, None, None, False, RETRY),
        (500, None, None, True, FATAL),
        (502, None, None, True, RETRY),
        (400, {"resourceType": "OperationOutcome"}, None, False, FATAL),
        (403, None, None, False, FATAL),
        (404, None, None, False, FATAL),
    ],
)
def test_classifier(status: int | None, body: Any, error: str | None, write: bool, kind: str) -> None:
    assert verdict(status, body, error, write).kind == kind


def test_retry_after_and_limit_are_read_safely() -> None:
    assert verdict(429, headers={"Retry-After": "7"}).retry_after_s == 7.0
    assert (
        verdict(429, headers={"Retry-After": "1000000"}).retry_after_s == 1_000_000.0
    )  # capped by the policy
    for bad in ("-1", "nan", "inf", "Wed, 21 Oct 2015 07:28:00 GMT"):
        assert verdict(429, headers={"Retry-After": bad}).retry_after_s is None
    assert verdict(429).rate_limited


def test_codes_keep_only_vocabulary_words() -> None:
    errors = server_errors(
        {
            "resourceType": "Bundle",
            "entry": [
                {
                    "resource": {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "not-found"}],
                    }
                },
                {
                    "resource": {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": f"MRN {NAME}"}],
                    }
                },
            ],
        }
    )
    assert errors.failed and errors.codes == ("error:not-found", "error:<unrecognized, 14 chars>")
    assert safe_value(None, frozenset()) == "?"


def test_backoff_is_full_jitter_and_bounded() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0)
    rng = random.Random(3)
    for failures in range(1, 40):
        assert 0.0 <= policy.backoff(failures, rng) <= min(8.0, 2 ** (failures - 1))


def test_retry_after_is_capped_and_the_deadline_bounds_every_wait() -> None:
    now = [0.0]
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.0, deadline_s=900.0)
    state = policy.start(lambda: now[0])
    state.attempts = 1
    assert state.after_failure(random.Random(1), 1_000_000.0) == 300.0
    now[0] = 700.0
    state.attempts = 2
    with pytest.raises(GiveUp, match="would pass the 900 s deadline"):
        state.after_failure(random.Random(1), 250.0)


def test_attempts_and_rate_limits_run_out() -> None:
    state = RetryPolicy(max_attempts=2, max_rate_limited=2).start(lambda: 0.0)
    state.attempts = 1
    state.after_failure(random.Random(1), None)
    state.attempts = 2
    with pytest.raises(GiveUp, match="2 attempts"):
        state.after_failure(random.Random(1), None)
    state.after_rate_limit()
    with pytest.raises(GiveUp, match="rate limited 2 times"):
        state.after_rate_limit()


@pytest.mark.parametrize("field", ["base_delay_s", "max_delay_s", "retry_after_cap_s", "deadline_s"])
def test_policy_refuses_non_finite_numbers(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**{field: float("nan")})
