"""FHIR Bulk Data export (``Group/{id}/$export``) for connections configured ``bulk_export``.

Redox documents only the kick-off (Beta, REDOX-REFERENCE §12.4); the project follows the FHIR
Bulk Data Access specification for the rest: kick-off with ``Prefer: respond-async`` answers 202
with ``Content-Location`` (the status URL); polling answers 202 + ``X-Progress`` while in progress
(deterministically: the first poll after kick-off always, later polls only while the files are
still being written), then 200 with the manifest; output files are NDJSON, one per resource type,
behind the bearer token; DELETE on the status URL cancels. One Group per connection holds all of
its patients (its id is the connection's ``bulk_group_id``).

Exports are written one at a time on a background (daemon) thread, type by type, streaming each
record's rendered bytes straight to a file in the sandbox's temp directory, so memory stays
bounded whatever the population size. The bytes are those of the search responses (same
renderers), so an NDJSON line equals the resource a per-patient search returns.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from sandbox.config import ConnectionSpec
from sandbox.fhir.render import MEDICATION_KINDS, RESOURCE_ENTITIES, instant, render_resource
from sandbox.fhir.search import SearchError, parse_date
from sandbox.population.records import Record
from sandbox.population.store import Query, RecordStore

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
# The resource types an export holds, in manifest order (Binary is a document's content and
# travels inside the DocumentReference's attachment URL, as in searches).
EXPORT_TYPES = (
    "Patient",
    "Encounter",
    "Observation",
    "MedicationRequest",
    "MedicationStatement",
    "Appointment",
    "DocumentReference",
    "Condition",
    "AllergyIntolerance",
    "Immunization",
    "Procedure",
    "DiagnosticReport",
    "ServiceRequest",
)
KICKOFF_PARAMS = frozenset({"_since", "_type", "_outputFormat"})
# Polls after the first wait this long for a running export before answering 202 again, so a
# small export is ready at the second poll while a large one never holds a request for long.
POLL_WAIT_S = 10.0


class ExportRefused(Exception):
    """A kick-off, poll or download the server refuses; the message names the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ExportRequest:
    """A validated kick-off: which types, from when."""

    types: tuple[str, ...]
    since: datetime | None


@dataclass
class OutputFile:
    resource_type: str
    path: Path
    count: int


@dataclass
class ExportJob:
    job_id: str
    connection_id: str
    client_id: str
    request_url: str
    request: ExportRequest
    transaction_time: datetime
    directory: Path
    created: float = field(default_factory=time.monotonic)
    polls: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # written, failed or cancelled
    outputs: list[OutputFile] = field(default_factory=list)
    types_done: int = 0
    failure: str | None = None

    @property
    def done(self) -> bool:
        return self.finished.is_set()


def parse_kickoff(params: list[tuple[str, str]], conn: ConnectionSpec) -> ExportRequest:
    """The kick-off's query parameters -> an ExportRequest (ExportRefused names the problem)."""
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        if name not in KICKOFF_PARAMS:
            raise ExportRefused(
                400,
                "not-supported",
                f"parameter '{name}' is not supported by this export (use _since, _type)",
            )
        grouped.setdefault(name, []).append(value)
    for fmt in grouped.get("_outputFormat", []):
        if fmt not in OUTPUT_FORMATS:
            raise ExportRefused(
                400, "not-supported", "parameter '_outputFormat': only application/fhir+ndjson"
            )
    entitled = [t for t in EXPORT_TYPES if RESOURCE_ENTITIES[t] in conn.entities]
    types = entitled
    if "_type" in grouped:
        wanted = {t.strip() for v in grouped["_type"] for t in v.split(",") if t.strip()}
        unknown = wanted - set(EXPORT_TYPES)
        if unknown:
            raise ExportRefused(
                400,
                "not-supported",
                f"parameter '_type': {len(unknown)} type(s) not exported; choose from {', '.join(EXPORT_TYPES)}",
            )
        refused = wanted - set(entitled)
        if refused:
            raise ExportRefused(
                403, "forbidden", f"this connection is not entitled to {', '.join(sorted(refused))}"
            )
        types = [t for t in entitled if t in wanted]
    since = None
    if "_since" in grouped:
        if len(grouped["_since"]) > 1:
            raise ExportRefused(400, "invalid", "parameter '_since' may be given once")
        try:
            prefix, start, _, _ = parse_date("_since", grouped["_since"][0])
        except SearchError as exc:
            raise ExportRefused(400, "invalid", exc.message) from None
        if prefix != "eq":
            raise ExportRefused(400, "invalid", "parameter '_since' takes an instant without a prefix")
        since = start
    return ExportRequest(tuple(types), since)


def type_query(conn: ConnectionSpec, rtype: str, since: datetime | None) -> Query:
    """Every record of one type in the connection's Group, updated at or after ``since``."""
    return Query(
        connection_id=conn.id,
        entity=RESOURCE_ENTITIES[rtype],
        updated_ge=since,
        category=MEDICATION_KINDS.get(rtype),
    )


def write_ndjson(
    store: RecordStore,
    query: Query,
    path: Path,
    render: Callable[[Record], bytes],
    cancelled: threading.Event,
    batch: int = 500,
) -> int:
    """Stream the query's records, one rendered resource per line; returns the line count."""
    count = 0
    with path.open("wb") as out:
        offset = 0
        while not cancelled.is_set():
            rows = store.page(query, offset, batch)
            for record in rows:
                out.write(render(record))
                out.write(b"\n")
            count += len(rows)
            offset += len(rows)
            if len(rows) < batch:
                break
    return count


class BulkExports:
    """The export jobs of one sandbox: kick-off, progress, manifest, files, cancellation."""

    def __init__(self, store: RecordStore, max_jobs: int = 16, ttl_s: float = 3600.0) -> None:
        self.store = store
        self._max_jobs = max_jobs
        self._ttl_s = ttl_s
        self._jobs: OrderedDict[str, ExportJob] = OrderedDict()
        self._lock = threading.Lock()
        self._root: tempfile.TemporaryDirectory | None = None
        # One export is written at a time (the others wait their turn), on daemon threads so a
        # long export never holds up the server's shutdown.
        self._one_at_a_time = threading.Semaphore(1)

    def _directory(self) -> Path:
        with self._lock:
            if self._root is None:
                self._root = tempfile.TemporaryDirectory(prefix="sandbox-bulk-")
            return Path(self._root.name)

    def start(
        self, conn: ConnectionSpec, client_id: str, request_url: str, request: ExportRequest
    ) -> ExportJob:
        job_id = secrets.token_urlsafe(18)
        directory = self._directory() / job_id
        directory.mkdir()
        job = ExportJob(
            job_id=job_id,
            connection_id=conn.id,
            client_id=client_id,
            request_url=request_url,
            request=request,
            transaction_time=self.store.now,
            directory=directory,
        )
        with self._lock:
            self._jobs[job_id] = job
            self._evict()
        threading.Thread(
            target=self._generate, args=(job, conn), name=f"sandbox-bulk-export-{conn.id}", daemon=True
        ).start()
        return job

    def _evict(self) -> None:
        """Drop expired jobs, then the oldest beyond the cap (their files too). Holds the lock."""
        now = time.monotonic()
        for job_id in [j for j, job in self._jobs.items() if now - job.created > self._ttl_s]:
            self._drop(job_id)
        while len(self._jobs) > self._max_jobs:
            self._drop(next(iter(self._jobs)))

    def _drop(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is not None:
            job.cancelled.set()
            if job.done:
                shutil.rmtree(job.directory, ignore_errors=True)
            # else: the writer sees ``cancelled`` within one page and removes the directory itself

    def _generate(self, job: ExportJob, conn: ConnectionSpec) -> None:
        def render(record: Record) -> bytes:
            return orjson.dumps(render_resource(record, conn))

        with self._one_at_a_time:
            try:
                self._write_all(job, conn, render)
            except Exception as exc:  # noqa: BLE001 - reported to the client as the export's failure
                job.failure = type(exc).__name__
            finally:
                if job.cancelled.is_set():
                    shutil.rmtree(job.directory, ignore_errors=True)
                job.finished.set()

    def _write_all(self, job: ExportJob, conn: ConnectionSpec, render: Callable[[Record], bytes]) -> None:
        for rtype in job.request.types:
            if job.cancelled.is_set():
                return
            path = job.directory / f"{rtype}.ndjson"
            count = write_ndjson(
                self.store, type_query(conn, rtype, job.request.since), path, render, job.cancelled
            )
            if count:
                job.outputs.append(OutputFile(rtype, path, count))
            else:
                path.unlink(missing_ok=True)
            job.types_done += 1

    def job(self, job_id: str, conn: ConnectionSpec, client_id: str) -> ExportJob:
        """The caller's job (another client's or connection's job does not exist for it)."""
        with self._lock:
            self._evict()
            job = self._jobs.get(job_id)
        if job is None or job.connection_id != conn.id or job.client_id != client_id:
            raise ExportRefused(404, "not-found", "no such export (unknown, expired or cancelled)")
        return job

    def poll(self, job: ExportJob) -> tuple[str, Any]:
        """("progress", text) while in progress, ("failed", message) or ("ready", job)."""
        with self._lock:
            job.polls += 1
            polls = job.polls
        if polls > 1:
            job.finished.wait(POLL_WAIT_S)  # a bounded wait for a running export
        if polls == 1 or not job.done:
            total = max(1, len(job.request.types))
            return "progress", f"in progress: {job.types_done} of {total} resource types written"
        if job.failure is not None:
            return "failed", f"the export failed ({job.failure}); start a new one"
        return "ready", job

    def cancel(self, job: ExportJob) -> None:
        with self._lock:
            self._drop(job.job_id)

    @staticmethod
    def manifest(job: ExportJob, file_url: Callable[[OutputFile], str]) -> dict[str, Any]:
        return {
            "transactionTime": instant(job.transaction_time),
            "request": job.request_url,
            "requiresAccessToken": True,
            "output": [{"type": f.resource_type, "url": file_url(f), "count": f.count} for f in job.outputs],
            "error": [],
        }

    @staticmethod
    def output(job: ExportJob, name: str) -> OutputFile:
        found = next((f for f in job.outputs if f.path.name == name), None)
        if found is None or not job.done:
            raise ExportRefused(404, "not-found", "no such export file")
        return found

    def close(self) -> None:
        with self._lock:
            for job_id in list(self._jobs):
                self._drop(job_id)
        if self._root is not None:
            self._root.cleanup()
