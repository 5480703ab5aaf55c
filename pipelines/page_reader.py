"""One landed page (bytes or parsed) → ``PageRows``, for either surface.

The single dispatch the live sources and renormalize share: FHIR pages go through
``bundle_rows``, Data Model pages through ``payload_rows`` with the page's context.
"""

from __future__ import annotations

from typing import Any

import orjson

from pipelines.datamodel.pages import payload_rows
from pipelines.fhir.pages import bundle_rows
from pipelines.landing import PageContext
from pipelines.normalize_common import NormalizationError
from pipelines.pages import PageRows


class PageUnreadable(ValueError):
    """The page as a whole cannot be read; the message is PHI-free."""


def read_page(
    surface: str,
    body: bytes | Any,
    connection_id: str,
    raw_ref: str,
    entity: str,
    context: PageContext | None = None,
) -> PageRows:
    context = context or PageContext()
    try:
        payload = orjson.loads(body) if isinstance(body, bytes | bytearray | memoryview) else body
    except orjson.JSONDecodeError:
        raise PageUnreadable("page is not valid JSON") from None
    try:
        if surface == "fhir":
            return bundle_rows(payload, connection_id, raw_ref, entity)
        return payload_rows(payload, connection_id, raw_ref, context.event_type, context.patient)
    except NormalizationError as exc:
        raise PageUnreadable(str(exc)) from None
