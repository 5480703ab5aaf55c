"""A landed Data Model response → rows per entity and per-record quarantine entries (pure).

Shared by the live Data Model source and ``redox-elt renormalize``. ``event_type`` is
the response type the caller knew when it sent the query, ``patient`` the ``Patient``
block of the query a response answers when the response carries none (DocumentGet);
both are landed with the page (``pipelines.landing.PageContext``) so a replay reads the
page exactly as the live sync did.

A payload that cannot be read at all (no ``Meta.DataModel``, a top-level Patient
without identifiers) raises ``NormalizationError``: the caller quarantines the page.
A bad record inside a readable payload is quarantined on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipelines.datamodel.normalize import normalize_datamodel
from pipelines.pages import PageRows


def payload_rows(
    payload: Any,
    connection_id: str,
    raw_ref: str | None,
    event_type: str | None = None,
    patient: dict[str, Any] | None = None,
) -> PageRows:
    out = normalize_datamodel(payload, connection_id, raw_ref, event_type=event_type, patient=patient)
    page = PageRows(quarantined=list(out.quarantined))
    for entity, rows in out.rows.items():
        page.rows[entity] = list(rows)
    return page


def document_contents(page: PageRows) -> dict[str, bytes]:
    """Document id → content of a DocumentGet answer's rows."""
    return {
        str(row["document_id"]): row["content"]
        for row in page.rows.get("documents", ())
        if row.get("content") is not None
    }


def complete_documents(query: PageRows, answers: Iterable[PageRows]) -> PageRows:
    """A DocumentQuery answer's rows (metadata) completed with the content of the
    DocumentGet answers asked for them. The answers' own rows carry no metadata and are
    not loaded; their quarantine entries are kept."""
    for answer in answers:
        contents = document_contents(answer)
        for row in query.rows.get("documents", ()):
            content = contents.get(str(row["document_id"]))
            if content is not None:
                row["content"] = content
        query.quarantined.extend(answer.quarantined)
    return query
