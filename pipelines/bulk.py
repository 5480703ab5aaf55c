"""The initial backfill of a connection entitled to bulk export (``bulk_export: true``).

Redox documents ``GET {base}/Group/{id}/$export`` (Beta, REDOX-REFERENCE §12.4); the flow after
the kick-off follows the FHIR Bulk Data Access specification: ``Prefer: respond-async`` →
``202`` with ``Content-Location`` → poll it (``202`` with ``Retry-After`` / ``X-Progress`` until
``200`` and the manifest) → one NDJSON file per type behind the bearer token. Polling has a
bounded deadline; a kick-off that is refused or times out fails the connection's extract (the
backfill is retried on the next sync).

Each NDJSON file is landed (its lines verbatim, wrapped as a ``collection`` Bundle so the
landing reads like every other FHIR page and ``renormalize`` needs no special case) and every
line goes through the common FHIR normalizers into the staged tables. Once the rows loaded,
every Patient joins the panel as ``bulk`` with ``last_full_pull_at`` = the export's
``transactionTime``, and the connection's ``bulk_backfill`` capability is set: later syncs use
per-patient pulls (and discovery) from there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin, urlparse

import dlt
import orjson

from pipelines import panel as P
from pipelines.fhir.patient_pull import _mrn_of
from pipelines.fhir.settings import ENTITY_RESOURCE_TYPES, fhir_instant
from pipelines.landing import RawLanding
from pipelines.model import ENTITIES
from pipelines.normalize_common import parse_ts
from pipelines.pull_pages import CallCounter, ServerClock, StagedEmitter, land_page, page_context
from pipelines.resource_hints import staged_resource_hints

POLL_DEADLINE_S = 1800.0
POLL_MIN_S = 0.2
POLL_MAX_S = 60.0
LINES_PER_PAGE = 1000  # NDJSON lines per landed page


class BulkExportError(RuntimeError):
    """The export could not be started or finished; the message carries status codes only."""


@dataclass
class BulkRun:
    """State of one connection's export, filled while dlt extracts, recorded after the load."""

    transaction_time: datetime | None = None
    files: int = 0
    lines: int = 0
    patients: list[P.Sighting] = field(default_factory=list)
    completed: bool = False

    def record(self, con: Any, connection_id: str, *, refresh_days: int) -> dict[str, int]:
        """Add every exported Patient to the panel as ``bulk``, pulled as of the export."""
        at = self.transaction_time or datetime.now(UTC)
        P.record_sightings(con, connection_id, self.patients, now=at)
        outcomes = [
            P.PullOutcome(s.id_system, s.id_value, at, ok=True, fhir_id=s.fhir_id, mrn=s.mrn)
            for s in self.patients
        ]
        counts = P.mark_pulled(con, connection_id, outcomes, refresh_days=refresh_days)
        P.set_capability(con, connection_id, "bulk_backfill", at.isoformat(), now=at)
        return {"bulk_patients": counts["pulled"], "bulk_files": self.files}


def group_id(conn: Any) -> str:
    """The Group a connection exports: configured (``bulk_group_id``) or, as the sandbox defines
    one Group per connection, its destination slug."""
    return str(getattr(conn, "bulk_group_id", None) or conn.destination_slug or conn.id)


def _get(
    client: Any, url: str, *, accept: str, prefer_async: bool, operation: str, counter: CallCounter
) -> Any:
    """One GET of the flow through the client (pacing, the shared budget, token, retries, audit)."""
    response = client.fhir_bulk_get(url, kickoff=prefer_async, accept=accept, priority="new_patient")
    counter.add(operation)
    return response


def _retry_after(response: Any) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def run_export(
    client: Any,
    conn: Any,
    *,
    since: datetime | None = None,
    counter: CallCounter,
    deadline_s: float = POLL_DEADLINE_S,
) -> tuple[dict[str, Any], datetime | None]:
    """Kick off and poll an export; -> (manifest, transactionTime)."""
    base = conn.fhir_base_url.rstrip("/")
    types = sorted({t for e in conn.entities if e in ENTITY_RESOURCE_TYPES for t in ENTITY_RESOURCE_TYPES[e]})
    query = f"_type={','.join(types)}" + (f"&_since={fhir_instant(since)}" if since else "")
    kickoff = f"{base}/Group/{group_id(conn)}/$export?{query}"
    response = _get(client, kickoff, accept="application/fhir+json", prefer_async=True,
                    operation="bulk export kick-off", counter=counter)  # fmt: skip
    if response.status_code != 202 or not response.headers.get("Content-Location"):
        raise BulkExportError(f"bulk export kick-off answered HTTP {response.status_code} (expected 202)")
    status_url = urljoin(base + "/", response.headers["Content-Location"])
    if urlparse(status_url).netloc != urlparse(base).netloc:
        raise BulkExportError("bulk export status URL is on another host; not sending the token there")
    deadline = time.monotonic() + deadline_s
    delay = POLL_MIN_S
    while True:
        response = _get(client, status_url, accept="application/json", prefer_async=False,
                        operation="bulk export status", counter=counter)  # fmt: skip
        if response.status_code == 200:
            manifest = orjson.loads(response.content)
            return manifest, parse_ts(manifest.get("transactionTime"))
        if response.status_code != 202:
            raise BulkExportError(f"bulk export status answered HTTP {response.status_code}")
        if time.monotonic() > deadline:
            raise BulkExportError(f"bulk export not complete after {deadline_s:.0f} s; retried next sync")
        wait = _retry_after(response)
        delay = min(POLL_MAX_S, wait if wait is not None else delay * 1.5)
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))


def _ndjson_pages(body: bytes) -> Iterator[bytes]:
    """NDJSON in chunks of ``LINES_PER_PAGE``, each a collection Bundle holding the lines
    verbatim. A line that is not a JSON object is kept as a JSON string, so the page stays
    readable and that entry alone is quarantined (by its position) by the common reader."""
    lines = [line for line in body.splitlines() if line.strip()]
    for i in range(0, len(lines), LINES_PER_PAGE):
        chunk = [_entry_json(line) for line in lines[i : i + LINES_PER_PAGE]]
        yield (
            b'{"resourceType":"Bundle","type":"collection","entry":['
            + b",".join(b'{"resource":' + line + b"}" for line in chunk)
            + b"]}"
        )


def _entry_json(line: bytes) -> bytes:
    try:
        if isinstance(orjson.loads(line), dict):
            return line
    except orjson.JSONDecodeError:
        pass
    return orjson.dumps(line.decode("utf-8", errors="replace"))


def bulk_source(
    client: Any, conn: Any, landing: RawLanding, *, clock: ServerClock, counter: CallCounter
) -> tuple[list[Any], BulkRun]:
    """The dlt source of a bulk backfill and the run state ``finish`` records."""
    from pipelines.access import as_source

    run = BulkRun()

    def extract() -> Iterator[Any]:
        manifest, run.transaction_time = run_export(client, conn, counter=counter)
        if run.transaction_time is not None:
            clock.offset_s = (run.transaction_time - datetime.now(UTC)).total_seconds()
            clock.observed = True
        entities = tuple(e for e in ENTITIES if e in conn.entities)
        context = page_context(entities)
        emitter = StagedEmitter("fhir", conn.id, client=client, landing=landing,
                                known_content=landing.content_index())  # fmt: skip
        base = urlparse(conn.fhir_base_url)
        for item in manifest.get("output") or []:
            url = urljoin(conn.fhir_base_url.rstrip("/") + "/", str(item.get("url") or ""))
            if urlparse(url).netloc != base.netloc:
                raise BulkExportError("bulk export file is on another host; not sending the token there")
            response = _get(client, url, accept="application/fhir+ndjson", prefer_async=False,
                            operation="bulk export file", counter=counter)  # fmt: skip
            if response.status_code != 200:
                raise BulkExportError(f"bulk export file answered HTTP {response.status_code}")
            run.files += 1
            rtype = str(item.get("type") or "")
            entity = P_ENTITY.get(rtype, "patients")
            for bundle in _ndjson_pages(response.content):
                page = land_page(landing, conn.id, "fhir", entity, bundle, context)
                for entry in page.body.get("entry") or []:
                    resource = entry.get("resource")
                    run.lines += 1
                    if not isinstance(resource, dict):
                        continue
                    if resource.get("resourceType") == "Patient" and resource.get("id"):
                        mrn = _mrn_of(resource)
                        system, value = ("MR", mrn) if mrn else (P.FHIR_ID_SYSTEM, str(resource["id"]))
                        run.patients.append(
                            P.Sighting(system, value, "bulk", fhir_id=str(resource["id"]), mrn=mrn)
                        )
                emitter.take(page)
                yield from emitter.drain(final=False)
        yield from emitter.drain(final=True)
        run.completed = True

    hints = {k: v for k, v in staged_resource_hints("fhir", "patients").items() if k != "parallelized"}
    resource = dlt.resource(extract, name="bulk_export", **hints)
    return [as_source("fhir", resource)], run


P_ENTITY = {t: e for e, types in ENTITY_RESOURCE_TYPES.items() for t in types}
