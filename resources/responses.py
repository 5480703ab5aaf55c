"""What one Redox answer means: the response classifier and PHI-free summaries of server errors.

``classify`` turns one attempt (HTTP status, parsed body, transport error) into a verdict the
retry policy acts on:

* ``ok``: 2xx with a readable body and no failure inside it;
* ``retry``: worth sending again (connect errors, timeouts, broken or unparseable bodies,
  429, 502/503/504, 500 on reads), with the reason and the server's ``Retry-After``;
* ``reauth``: 401, the token is dropped and the call made once more with a new one;
* ``partial``: HTTP 200 but the EHR behind Redox failed (REDOX-REFERENCE §12, "Partial
  failures"): a Data Model ``Meta.Errors`` entry, or a FHIR OperationOutcome issue of severity
  ``error``/``fatal`` inside the answer. Never "no data": the client raises ``PartialFailure``;
* ``fatal``: anything else (400, 403, 404, 500 on writes, ...).

Server text may echo what was sent (a patient's name or MRN), even in fields that should hold
codes. ``safe_codes`` therefore keeps only values from known vocabularies (FHIR IssueSeverity
and IssueType, Redox's ``Meta.Errors`` Type/Module values) and replaces anything else by its
length, so messages built from them are safe to log; the raw text goes to ``details`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx

# FHIR R4 IssueSeverity and IssueType (http://hl7.org/fhir/R4/valueset-issue-type.html).
FHIR_ISSUE_SEVERITIES = frozenset({"fatal", "error", "warning", "information"})
FHIR_ISSUE_TYPES = frozenset(
    {
        "invalid",
        "structure",
        "required",
        "value",
        "invariant",
        "security",
        "login",
        "unknown",
        "expired",
        "forbidden",
        "suppressed",
        "processing",
        "not-supported",
        "duplicate",
        "multiple-matches",
        "not-found",
        "deleted",
        "too-long",
        "code-invalid",
        "extension",
        "too-costly",
        "business-rule",
        "conflict",
        "transient",
        "lock-error",
        "no-store",
        "exception",
        "timeout",
        "incomplete",
        "throttled",
        "informational",
    }
)
# Redox Data Model ``Meta.Errors[].Type`` / ``Module`` values seen in Redox's docs and examples.
DATAMODEL_ERROR_TYPES = frozenset(
    {"request", "query", "message", "response", "destination", "transmission", "validation", "error"}
)
DATAMODEL_ERROR_MODULES = frozenset(
    {"Send", "DataModels", "Gateway", "Query", "Transmission", "Destination", "Request", "Validation"}
)
FAILED_SEVERITIES = frozenset({"error", "fatal"})
RETRIABLE_STATUSES = frozenset({502, 503, 504})
# A body over the size limit would be just as large the next time: asking again wastes quota.
UNRETRIABLE_TRANSPORT_ERRORS = frozenset({"BodyTooLarge"})

OK, RETRY, REAUTH, PARTIAL, FATAL = "ok", "retry", "reauth", "partial", "fatal"


def as_list(value: Any) -> list[Any]:
    """A JSON array field as a list: a lone object counts as one item, anything else as none."""
    if isinstance(value, list):
        return value
    return [value] if isinstance(value, dict) else []


def safe_value(value: Any, vocabulary: frozenset[str]) -> str:
    """``value`` when it is a known vocabulary word, else ``<unrecognized, N chars>``."""
    if value is None:
        return "?"
    text = str(value)
    return text if text in vocabulary else f"<unrecognized, {len(text)} chars>"


@dataclass(frozen=True)
class ServerErrors:
    """What a body says went wrong: PHI-free codes, raw diagnostics, and whether it is a failure."""

    codes: tuple[str, ...] = ()  # known vocabulary only: safe for messages and logs
    details: tuple[str, ...] = ()  # the server's free text: may echo PHI, never put in messages
    failed: bool = False  # at least one Meta.Errors entry or error/fatal issue


def _outcome_issues(outcome: dict[str, Any], codes: list[str], texts: list[str]) -> bool:
    failed = False
    for issue in as_list(outcome.get("issue")):
        if not isinstance(issue, dict):
            continue
        severity = issue.get("severity") if isinstance(issue.get("severity"), str) else None
        codes.append(
            f"{safe_value(severity, FHIR_ISSUE_SEVERITIES)}:{safe_value(issue.get('code'), FHIR_ISSUE_TYPES)}"
        )
        if severity in FAILED_SEVERITIES or severity not in FHIR_ISSUE_SEVERITIES:
            failed = True  # an unknown severity is not a reassurance
        for key in ("diagnostics", "details"):
            if issue.get(key):
                texts.append(str(issue[key]))
    return failed


def _bundle_outcomes(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """OperationOutcomes inside a Bundle: as entries (search mode ``outcome``) or batch responses."""
    found: list[dict[str, Any]] = []
    for entry in as_list(bundle.get("entry")):
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome":
            found.append(resource)
        response = entry.get("response")
        outcome = response.get("outcome") if isinstance(response, dict) else None
        if isinstance(outcome, dict) and outcome.get("resourceType") == "OperationOutcome":
            found.append(outcome)
    return found


def server_errors(body: Any) -> ServerErrors:
    """The failures a body reports (FHIR OperationOutcome, inside a Bundle or alone; Data Model Meta.Errors)."""
    if not isinstance(body, dict):
        return ServerErrors()
    codes: list[str] = []
    texts: list[str] = []
    failed = False
    if body.get("resourceType") == "OperationOutcome":
        failed = _outcome_issues(body, codes, texts)
    elif body.get("resourceType") == "Bundle":
        for outcome in _bundle_outcomes(body):
            failed = _outcome_issues(outcome, codes, texts) or failed
    meta = body.get("Meta")
    if isinstance(meta, dict):
        errors = meta.get("Errors")
        for error in errors if isinstance(errors, list) else ([errors] if errors else []):
            failed = True
            if isinstance(error, dict):
                codes.append(
                    f"{safe_value(error.get('Type'), DATAMODEL_ERROR_TYPES)}/"
                    f"{safe_value(error.get('Module'), DATAMODEL_ERROR_MODULES)}"
                )
                for key in ("Text", "Details"):
                    if error.get(key):
                        texts.append(str(error[key]))
            else:
                codes.append(f"<unrecognized, {len(str(error))} chars>")
    return ServerErrors(tuple(codes), tuple(texts), failed)


def retry_after_s(response: httpx.Response | None) -> float | None:
    """``Retry-After`` in seconds when it is a finite non-negative number (HTTP-dates are ignored)."""
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def limit_hint(response: httpx.Response | None) -> float | None:
    """``X-RateLimit-Limit`` when it is a finite positive number."""
    try:
        value = float(response.headers["X-RateLimit-Limit"]) if response is not None else None
    except (KeyError, ValueError):
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


@dataclass(frozen=True)
class Verdict:
    kind: str  # OK | RETRY | REAUTH | PARTIAL | FATAL
    reason: str  # PHI-free: "HTTP 503", "ReadTimeout", "MalformedBody", "Meta.Errors (2)"
    retry_after_s: float | None = None
    rate_limited: bool = False
    errors: ServerErrors = ServerErrors()


def classify(
    *,
    status: int | None,
    body: Any,
    transport_error: str | None,
    write: bool,
    response: httpx.Response | None,
) -> Verdict:
    """The verdict on one attempt. ``body`` is the parsed JSON (None when not parsed or not JSON)."""
    if transport_error in UNRETRIABLE_TRANSPORT_ERRORS:
        return Verdict(FATAL, transport_error)
    if transport_error is not None:
        # Connect errors never reached the server; for the rest, reads are safe and writes carry
        # an idempotency key, so the retry is the same write.
        return Verdict(RETRY, transport_error)
    assert status is not None
    if 200 <= status < 300:
        errors = server_errors(body)
        if errors.failed:
            return Verdict(
                PARTIAL, f"HTTP {status} with {len(errors.codes) or 1} error(s) in the body", errors=errors
            )
        return Verdict(OK, f"HTTP {status}")
    if status == 401:
        return Verdict(REAUTH, "HTTP 401", errors=server_errors(body))
    if status == 429:
        return Verdict(RETRY, "HTTP 429", retry_after_s=retry_after_s(response), rate_limited=True)
    if status in RETRIABLE_STATUSES or (status == 500 and not write):
        return Verdict(
            RETRY, f"HTTP {status}", retry_after_s=retry_after_s(response), errors=server_errors(body)
        )
    return Verdict(FATAL, f"HTTP {status}", errors=server_errors(body))
