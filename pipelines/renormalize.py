"""Rebuild the staged and published tables from the landing zone alone (zero API calls).

Every landed page is self-describing (a FHIR Bundle, or a Data Model payload with its
``Meta``) and carries a context sidecar with what the body alone cannot say (the event
type, the Patient block of a DocumentGet's query, the entities the live sync took from
it, the DocumentQuery answer a DocumentGet answer completes; see ``pipelines.landing``).
Pages are replayed in fetch order through the same page-to-rows functions and the same
``PageRouter`` the live sources use, so every ``raw.<surface>_<entity>`` table of a
connection — whichever folder its rows were landed under — is rebuilt exactly as the
live sync built it. Document contents come from the content-addressed store and its
URL index, never from the API.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import dlt
import duckdb

from pipelines.batches import PageRouter
from pipelines.landing import LandedPage, PageContext, RawLanding
from pipelines.publish import publish_connection
from pipelines.resource_hints import staged_resource_hints
from pipelines.sync_context import pipeline_name
from pipelines.vocabulary import ENTITIES, QUARANTINE_TABLE, STAGING_SCHEMA, staged_table_name
from pipelines.warehouse import WarehousePaths, WriterLock, table_columns, table_exists

# The replay resource of a surface is named after this entity's table; the rest are variants.
REPLAY_MAIN = "patients"
# What a replay must not reset on quarantine rows it writes again (the merge replaces rows).
KEPT_QUARANTINE_COLUMNS = ("first_seen_at", "attempts", "resolved_at")


def _replay(
    landing: RawLanding,
    connection_id: str,
    surface: str,
    pages: list[LandedPage],
    content_index: dict[tuple[str, str], str],
) -> Iterator[Any]:
    router = PageRouter(
        connection_id,
        surface,
        landing=landing,
        content_index=content_index,
        main=staged_table_name(surface, REPLAY_MAIN),
    )
    contexts = {p.raw_ref: _context(landing, p.raw_ref) for p in pages}
    # DocumentGet answers are read with the DocumentQuery answer they complete.
    answers_of: dict[str, list[LandedPage]] = defaultdict(list)
    for page in pages:
        completes = contexts[page.raw_ref].completes
        if completes is not None:
            answers_of[completes].append(page)
    for page in pages:
        context = contexts[page.raw_ref]
        if context.completes is not None:
            continue
        body = _body(landing, router, page)
        if body is None:
            continue
        answers = []
        for answer in answers_of.get(page.raw_ref, ()):
            answer_body = _body(landing, router, answer)
            if answer_body is not None:
                answers.append((answer_body, answer.raw_ref, contexts[answer.raw_ref]))
        router.take_page(body, page.raw_ref, page.entity, context, answers)
        yield from router.drain(final=False)
    yield from router.drain(final=True)


def _context(landing: RawLanding, raw_ref: str) -> PageContext:
    try:
        return landing.context(raw_ref)
    except (OSError, ValueError):
        return PageContext()  # an unreadable sidecar: read the page as its body says


def _body(landing: RawLanding, router: PageRouter, page: LandedPage) -> bytes | None:
    try:
        return landing.read(page.raw_ref)
    except (OSError, EOFError, ValueError) as exc:
        router.quarantine_page(page.raw_ref, page.entity, f"landed page unreadable: {type(exc).__name__}")
        return None


def _kept_quarantine(con: duckdb.DuckDBPyConnection, connection_id: str) -> list[tuple]:
    if not table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE):
        return []
    present = set(table_columns(con, STAGING_SCHEMA, QUARANTINE_TABLE))
    cols = [c for c in KEPT_QUARANTINE_COLUMNS if c in present]
    if not cols:
        return []
    return con.execute(
        f"SELECT quarantine_id, {', '.join(cols)} FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} "
        "WHERE connection_id = ?",
        [connection_id],
    ).fetchall()


def _restore_quarantine(con: duckdb.DuckDBPyConnection, kept: list[tuple]) -> None:
    """Entries written again by the replay keep when they were first seen, their attempts
    and their resolution."""
    if not kept:
        return
    present = set(table_columns(con, STAGING_SCHEMA, QUARANTINE_TABLE))
    cols = [c for c in KEPT_QUARANTINE_COLUMNS if c in present]
    sets = ", ".join(f"{c} = ?" for c in cols)
    con.executemany(
        f"UPDATE {STAGING_SCHEMA}.{QUARANTINE_TABLE} SET {sets} WHERE quarantine_id = ?",
        [(*row[1 : 1 + len(cols)], row[0]) for row in kept],
    )


def renormalize(
    paths: WarehousePaths, connection_ids: Sequence[str] | None = None
) -> dict[str, dict[str, int]]:
    """Replay every landed page of the selected connections (all by default) into the
    staged tables, then publish. Returns published row counts per connection."""
    landing = RawLanding(paths.landing_root)
    pages = list(landing.pages())
    content_index = landing.content_index()
    connections = sorted(
        {p.connection_id for p in pages if not connection_ids or p.connection_id in connection_ids}
    )
    published: dict[str, dict[str, int]] = {}
    with WriterLock(paths):
        for connection_id in connections:
            own = [p for p in pages if p.connection_id == connection_id]
            surfaces = sorted({p.surface for p in own})
            resources = [
                dlt.resource(
                    _replay(
                        landing,
                        connection_id,
                        surface,
                        [p for p in own if p.surface == surface],
                        content_index,
                    ),
                    name=f"{surface}_replay",
                    **staged_resource_hints(surface, REPLAY_MAIN),
                )
                for surface in surfaces
            ]
            pipeline = dlt.pipeline(
                pipeline_name=pipeline_name(connection_id) + "_renormalize",
                destination=dlt.destinations.duckdb(str(paths.duckdb)),
                dataset_name=STAGING_SCHEMA,
                pipelines_dir=str(paths.dlt_dir),
            )
            # Replace this connection's staged rows: delete, then merge the replayed pages.
            with duckdb.connect(str(paths.duckdb)) as con:
                kept = _kept_quarantine(con, connection_id)
                for surface in surfaces:
                    for entity in ENTITIES:
                        table = staged_table_name(surface, entity)
                        if table_exists(con, STAGING_SCHEMA, table):
                            con.execute(
                                f"DELETE FROM {STAGING_SCHEMA}.{table} WHERE connection_id = ?",
                                [connection_id],
                            )
            pipeline.run(resources)
            with duckdb.connect(str(paths.duckdb)) as con:
                # Before publishing, which resolves entries whose record has loaded since.
                _restore_quarantine(con, kept)
                published[connection_id] = publish_connection(con, connection_id)
    return published
