"""Redox-shaped HTTP responses shared by every sandbox route module.

Kept apart from ``sandbox.auth`` so the modules that only need to answer like Redox (fault
injection, the Data Model and FHIR routes) do not import the token server, and the sandbox's
import graph stays acyclic (``tests/sandbox/test_import_graph.py``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from starlette.responses import Response

# Headers every Redox response carried in recorded traffic (REDOX-REFERENCE §0).
REDOX_HEADERS = {
    "strict-transport-security": "max-age=300",
    "cache-control": "private, no-cache, no-store, must-revalidate",
    "x-frame-options": "deny",
}
JSON = "application/json; charset=utf-8"
FHIR_JSON = "application/fhir+json; charset=utf-8"


def weak_etag(body: bytes) -> str:
    """A weak validator shaped like the ones Redox sends: ``W/"<len hex>-<digest>"``."""
    digest = base64.b64encode(hashlib.sha1(body).digest()).decode()[:27]
    return f'W/"{len(body):x}-{digest}"'


def redox_response(body: bytes, status: int, content_type: str) -> Response:
    """A response with Redox's standard headers and a weak ETag."""
    headers = dict(REDOX_HEADERS)
    headers["etag"] = weak_etag(body)
    return Response(body, status_code=status, headers=headers, media_type=content_type)


def redox_json(payload: Any, status: int = 200, content_type: str = JSON) -> Response:
    return redox_response(json.dumps(payload).encode(), status, content_type)
