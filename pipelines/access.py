"""Extract one connection the way real Redox allows: discovery, the patient panel, per-patient
pulls, bulk export for entitled connections, and clinical-network matches.

``extract_connection`` is what the sync runner calls per connection. It does the few eager
steps whose answers decide who is pulled (resolving demographic roster rows, discovery,
marking patients due), then returns dlt sources whose
resources do the pulls while dlt extracts, and a ``ConnectionExtract`` whose ``finish`` the
runner calls **after** ``pipeline.run`` loaded the rows: only then do the pulled patients'
``last_full_pull_at`` move (the panel is the state; the resources carry no dlt cursor).

Surfaces. A FHIR-only or Data-Model-only connection pulls everything through its surface. A
connection with both pulls every entitled entity through FHIR and, through the Data Model,
``patients``, ``encounters``, ``results``, ``appointments`` and the clinical record (problems,
allergies, immunizations, procedures, diagnostic reports, orders); publish reconciles each
into one row, ``source_surface = both``, merged field by field (Clinical Summary entries, which
carry no ids, are paired on patient + match key), and the Data Model's MR/visit numbers anchor
the crosswalk;
medications and documents come from FHIR only: the Clinical Summary has no medication order ids
to reconcile on, and Notes/Media for documents FHIR already returns would double their cost
(content included) for rows that reconcile into the same ones. Discovery on such a connection
uses the FHIR queries only (both surfaces would find the same people under two identifiers).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dlt
import duckdb

from pipelines import panel as P
from pipelines.datamodel import network_source
from pipelines.datamodel import patient_pull as dm_pull
from pipelines.discovery import DEFAULT_DISCOVER_DAYS, DEFAULT_HORIZON_DAYS, discover_datamodel, discover_fhir
from pipelines.fhir import patient_pull as fhir_pull
from pipelines.landing import RawLanding
from pipelines.model import ENTITIES
from pipelines.pull_pages import (
    CallCounter,
    PulledPage,
    ServerClock,
    StagedEmitter,
    budget_remaining,
    budget_stats,
    error_code,
)
from pipelines.quarantine import open_entries_on_pages, quarantined_enterprise_ids, resolve_unattributed
from pipelines.resource_hints import staged_resource_hints
from pipelines.sync_context import SyncWindow
from pipelines.warehouse import table_exists

log = logging.getLogger(__name__)

BOTH_SURFACE_DATAMODEL_ENTITIES = (
    "patients",
    "encounters",
    "results",
    "appointments",
    "problems",
    "allergies",
    "immunizations",
    "procedures",
    "diagnostic_reports",
    "orders",
)
DEFAULT_WORKERS = 4
FHIR_PAGE_SIZE = 500
# Requests one patient's pull costs, at least (the budget check before starting a patient).
FHIR_COST_REVINCLUDE = 2
DATAMODEL_COST = 6


@dataclass
class AccessStats:
    """PHI-free counts of one connection's extract (the sync summary and ``ops.sync_runs``)."""

    connection_id: str
    mode: str = "panel"  # panel | bulk | network
    requests: int = 0
    requests_by_kind: dict[str, int] = field(default_factory=dict)
    budget_left: int | None = None
    budget: dict[str, Any] | None = None
    sightings: int = 0
    discovered: int = 0  # patients new to the panel this run
    due: int = 0
    pulled: int = 0
    failed: int = 0
    not_found: int = 0
    deferred: int = 0
    contents_fetched: int = 0
    pending_resolved: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    revinclude: bool | None = None
    elements: bool | None = None

    def error(self, label: str) -> None:
        self.errors[label] = self.errors.get(label, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _db_path(panel: Any) -> Path:
    """The DuckDB file holding the panel: WarehousePaths, a path, or a path string."""
    return Path(getattr(panel, "duckdb", panel))


def _surfaces_for(conn: Any) -> dict[str, tuple[str, ...]]:
    """Entities pulled through each surface (see the module docstring)."""
    entities = tuple(e for e in ENTITIES if e in conn.entities)
    if "fhir" in conn.surfaces and "datamodel" in conn.surfaces:
        return {
            "fhir": entities,
            "datamodel": tuple(e for e in entities if e in BOTH_SURFACE_DATAMODEL_ENTITIES),
        }
    return {s: entities for s in conn.surfaces}


@dataclass
class _SurfaceRun:
    """Outcomes of one surface's pulls, gathered on worker threads, applied after the load."""

    surface: str
    outcomes: dict[tuple[str, str], P.PullOutcome] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ConnectionExtract:
    """The dlt sources of one connection and what to record once they loaded."""

    def __init__(self, conn: Any, db: Path, stats: AccessStats, clock: ServerClock) -> None:
        self.conn = conn
        self.db = db
        self.stats = stats
        self.clock = clock
        self.sources: list[Any] = []
        self.runs: list[_SurfaceRun] = []
        self.network_ids: tuple[str, ...] = ()
        self.discovered_at: datetime | None = None
        # This run's discovery: its surface, landed pages, and when it started.
        self.discovery: tuple[str, list[str], datetime] | None = None
        self.bulk: Any = None  # pipelines.bulk.BulkRun
        self.counter = CallCounter()
        self._client: Any = None

    def _settle_discovery(self, con: duckdb.DuckDBPyConnection) -> None:
        """A record quarantined from a discovery page may be the only sighting of its patient:
        the window is not done (``discovered_at`` stays, the next sync asks it again). A clean
        discovery resolves the position-only entries earlier listings left."""
        if self.discovery is None:
            return
        surface, refs, started = self.discovery
        dirty = open_entries_on_pages(con, self.conn.id, refs)
        if dirty:
            self.discovered_at = None
            self.stats.errors["discovery: records quarantined"] = dirty
        elif not any(k.startswith("discovery: ") for k in self.stats.errors):
            resolve_unattributed(con, self.conn.id, surface, started)

    def finish(self, panel: Any = None) -> dict[str, int]:
        """Record what loaded: call after ``pipeline.run`` returned without error."""
        db = _db_path(panel) if panel is not None else self.db
        counts: dict[str, int] = {}
        with duckdb.connect(str(db)) as con:
            P.create_tables(con)
            now = self.clock.now()
            refresh_days = int(getattr(self.conn, "refresh_days", None) or P.DEFAULT_REFRESH_DAYS)
            outcomes = _merge_outcomes(self.runs)
            if outcomes:
                counts = P.mark_pulled(con, self.conn.id, outcomes, refresh_days=refresh_days)
                self.stats.pulled = counts["pulled"]
                self.stats.not_found = counts["not_found"]
                self.stats.failed = counts["failed"]
            if self.network_ids:
                net = [P.PullOutcome("EPI", epi, now, ok=True) for epi in self.network_ids]
                counts["network_matches"] = P.mark_pulled(con, self.conn.id, net, refresh_days=refresh_days)[
                    "pulled"
                ]
                self.stats.pulled = counts["network_matches"]
            if self.bulk is not None and self.bulk.completed:
                counts.update(self.bulk.record(con, self.conn.id, refresh_days=refresh_days))
            self._settle_discovery(con)
            if self.discovered_at is not None:
                P.set_capability(con, self.conn.id, "discovered_at", self.discovered_at.isoformat(), now=now)
            if self.stats.revinclude is not None:
                P.set_capability(
                    con, self.conn.id, "fhir_revinclude", str(self.stats.revinclude).lower(), now=now
                )
            if self.stats.elements is not None:
                P.set_capability(
                    con, self.conn.id, "fhir_elements", str(self.stats.elements).lower(), now=now
                )
            if self.clock.observed:
                P.set_capability(
                    con, self.conn.id, "server_clock_offset_s", f"{self.clock.offset_s:.3f}", now=now
                )
        # Every request this extract sent: searches and queries, plus document contents fetched.
        self.stats.requests = self.counter.total + self.stats.contents_fetched
        self.stats.requests_by_kind = dict(self.counter.by_kind)
        if self.stats.contents_fetched:
            self.stats.requests_by_kind["read Binary"] = self.stats.contents_fetched
        if self._client is not None:
            self.stats.budget_left = budget_remaining(self._client)
            self.stats.budget = budget_stats(self._client)
        return counts


def _merge_outcomes(runs: list[_SurfaceRun]) -> list[P.PullOutcome]:
    """One outcome per patient across surfaces: good only when every surface's pull was."""
    merged: dict[tuple[str, str], P.PullOutcome] = {}
    for run in runs:
        for key, o in run.outcomes.items():
            have = merged.get(key)
            if have is None:
                merged[key] = P.PullOutcome(
                    o.id_system, o.id_value, o.started_at, o.ok, o.error, o.fhir_id, o.mrn,
                    o.not_found, o.requests, set(o.surfaces), o.incomplete,
                )  # fmt: skip
                continue
            have.ok = have.ok and o.ok
            have.incomplete = have.incomplete or o.incomplete
            have.error = have.error or o.error
            have.fhir_id = have.fhir_id or o.fhir_id
            have.mrn = have.mrn or o.mrn
            have.not_found = have.not_found and o.not_found
            have.started_at = min(have.started_at, o.started_at)
            have.requests += o.requests
            have.surfaces |= o.surfaces
    return list(merged.values())


def _capabilities(con: duckdb.DuckDBPyConnection, connection_id: str) -> dict[str, str]:
    return dict(
        con.execute(
            "SELECT capability, value FROM ops.connection_capabilities WHERE connection_id = ?",
            [connection_id],
        ).fetchall()
    )


def _known_documents(con: duckdb.DuckDBPyConnection, connection_id: str) -> dict[str, datetime | None]:
    """Staged FHIR documents (logical id -> version time): what a refresh need not re-read."""
    if not table_exists(con, "raw", "fhir_documents"):
        return {}
    return dict(
        con.execute(
            "SELECT source_id, max(source_updated_at) FROM raw.fhir_documents "
            "WHERE connection_id = ? AND content_sha256 IS NOT NULL GROUP BY 1",
            [connection_id],
        ).fetchall()
    )


def _flag(value: str | None) -> bool | None:
    return None if value is None else value == "true"


def extract_connection(
    client: Any,
    conn: Any,
    landing: RawLanding,
    panel: Any,
    *,
    window: SyncWindow | None = None,
    full: bool = False,
    discover_days: int = DEFAULT_DISCOVER_DAYS,
    now: datetime | None = None,
    lookback_s: float = 3600.0,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
    workers: int = DEFAULT_WORKERS,
    known_enterprise_ids: tuple[str, ...] = (),
) -> ConnectionExtract:
    """Discovery and panel bookkeeping now; the pulls as dlt sources (see the module docstring).

    ``panel`` is the warehouse (``WarehousePaths``) or the DuckDB path holding ``ops``; no
    connection to it stays open when this returns, so ``pipeline.run`` can write the file.
    """
    window = window or SyncWindow()
    db = _db_path(panel)
    stats = AccessStats(conn.id)
    with duckdb.connect(str(db)) as con:
        P.create_tables(con)
        caps = _capabilities(con, conn.id)
        known_docs = _known_documents(con, conn.id) if "fhir" in conn.surfaces else {}
    clock = ServerClock(float(caps.get("server_clock_offset_s", 0.0)))
    if now is not None:
        clock.offset_s = (now - datetime.now(UTC)).total_seconds()
    out = ConnectionExtract(conn, db, stats, clock)
    out._client = client

    if conn.kind == "network":
        return _network(out, client, conn, landing, window, known_enterprise_ids)

    if getattr(conn, "bulk_export", False) and "fhir" in conn.surfaces and "bulk_backfill" not in caps:
        from pipelines.bulk import bulk_source

        stats.mode = "bulk"
        out.sources, out.bulk = bulk_source(client, conn, landing, clock=clock, counter=out.counter)
        return out

    stats.revinclude = _flag(caps.get("fhir_revinclude"))
    stats.elements = _flag(caps.get("fhir_elements"))
    surfaces = _surfaces_for(conn)
    discovery_pages: dict[str, list[PulledPage]] = {s: [] for s in surfaces}

    # 1. Demographic roster rows become identifiers (new patients, pulled this run).
    _resolve_pending(client, conn, db, clock, stats, out.counter)

    # 2. Discovery over the recent past (or the backfill window).
    with duckdb.connect(str(db)) as con:
        empty = not con.execute(
            "SELECT count(*) FROM ops.patient_panel WHERE connection_id = ?", [conn.id]
        ).fetchone()[0]
    last = caps.get("discovered_at")
    since = datetime.fromisoformat(last) - timedelta(seconds=lookback_s) if last and not empty else None

    def window_of(server_now: datetime) -> tuple[datetime, datetime | None]:
        if window.is_backfill:
            return window.start or server_now - timedelta(days=discover_days), window.end
        start = server_now - timedelta(days=discover_days)
        return (max(start, since) if since else start), None

    discovery = None
    discovery_started = datetime.now(UTC)  # wall time, as quarantine entries are stamped
    if "fhir" in surfaces:
        discovery = discover_fhir(
            client, landing, conn.id, surfaces["fhir"], clock, window_of,
            page_size=max(conn.page_size or 0, FHIR_PAGE_SIZE), horizon_days=horizon_days, counter=out.counter,
        )  # fmt: skip
        discovery_pages["fhir"] = discovery.pages
    elif "datamodel" in surfaces:
        discovery = discover_datamodel(
            client, landing, conn.id, surfaces["datamodel"], clock, window_of,
            page_size=conn.page_size or 100, horizon_days=horizon_days, counter=out.counter,
        )  # fmt: skip
        discovery_pages["datamodel"] = discovery.pages
    run_now = clock.now()
    if discovery is not None:
        out.discovery = (
            "fhir" if "fhir" in surfaces else "datamodel",
            [p.raw_ref for p in discovery.pages],
            discovery_started,
        )
        for label, n in discovery.errors.items():
            stats.errors[f"discovery: {label}"] = n
        if not discovery.errors and not window.is_backfill:
            out.discovered_at = run_now

    # 3. The panel learns what discovery saw; --full / a backfill window make patients due.
    with duckdb.connect(str(db)) as con:
        if discovery is not None and discovery.sightings:
            stats.sightings = len(discovery.sightings)
            stats.discovered = P.record_sightings(con, conn.id, discovery.sightings, now=run_now)
        if full:
            P.mark_all_due(con, conn.id, now=run_now)
        elif window.is_backfill:
            P.mark_due_in_window(con, conn.id, window.start, window.end, now=run_now)
        due = P.select_due(con, conn.id, now=run_now)
    stats.due = len(due)
    known_content = landing.content_index()

    # 4. The pulls, one resource per surface, run while dlt extracts.
    for surface, entities in surfaces.items():
        run = _SurfaceRun(surface)
        out.runs.append(run)
        resource = dlt.resource(
            _pull_generator(
                out, client, conn, landing, surface, entities, due, discovery_pages[surface], run,
                known_docs, known_content, workers,
            ),
            name="patient_pull",
            **{k: v for k, v in staged_resource_hints(surface, "patients").items() if k != "parallelized"},
        )  # fmt: skip
        out.sources.append(as_source(surface, resource))
    return out


def as_source(name: str, *resources: Any) -> Any:
    """A dlt source named like the surface's own source, so its staged tables keep one schema."""

    @dlt.source(name=name, max_table_nesting=0)
    def surface_source() -> Any:
        return list(resources)

    return surface_source()


def _network(
    out: ConnectionExtract,
    client: Any,
    conn: Any,
    landing: RawLanding,
    window: SyncWindow,
    known_enterprise_ids: tuple[str, ...],
) -> ConnectionExtract:
    """A clinical network keeps its behaviour (asked about the enterprise ids other connections
    know); the people asked are recorded in its panel as ``network_match``."""
    out.stats.mode = "network"
    now = out.clock.now()
    with duckdb.connect(str(out.db)) as con:
        out.stats.discovered = P.record_sightings(
            con, conn.id, [P.Sighting("EPI", epi, "network_match") for epi in known_enterprise_ids], now=now
        )
    out.network_ids = tuple(known_enterprise_ids)
    out.stats.due = len(known_enterprise_ids)
    with duckdb.connect(str(out.db)) as con:
        requeued = quarantined_enterprise_ids(con, conn.id)
    out.sources = [
        network_source(
            client,
            landing,
            conn.id,
            entities=tuple(conn.entities),
            window=window,
            known_enterprise_ids=tuple(known_enterprise_ids),
            counter=out.counter,
            full_history_ids=requeued,
        )  # fmt: skip
    ]
    return out


def _resolve_pending(
    client: Any, conn: Any, db: Path, clock: ServerClock, stats: AccessStats, counter: CallCounter
) -> None:
    """Resolve demographic roster rows (given, family, birth date) to an identifier through
    ``Patient/_search`` or ``PatientSearch.Query``; exactly one match adds it to the panel."""
    with duckdb.connect(str(db)) as con:
        pending = P.pending_demographics(con, conn.id)
    if not pending:
        return
    settled: list[tuple[str, str, P.Sighting | None]] = []
    for key, given, family, born in pending:
        try:
            matches = _match_demographics(client, conn, given, family, born.isoformat(), counter)
        except Exception as exc:  # noqa: BLE001 - a failed lookup stays pending for the next sync
            stats.error(f"roster lookup: {error_code(exc)}")
            continue
        if len(matches) == 1:
            settled.append((key, "resolved", matches[0]))
        else:
            settled.append((key, "no_match" if not matches else "ambiguous", None))
    with duckdb.connect(str(db)) as con:
        for key, outcome, sighting in settled:
            P.resolve_pending(con, conn.id, key, outcome, sighting, now=clock.now())
            stats.pending_resolved += outcome == "resolved"


def _match_demographics(
    client: Any, conn: Any, given: str, family: str, born: str, counter: CallCounter
) -> list[P.Sighting]:
    from pipelines.pull_pages import with_priority

    if "fhir" in conn.surfaces:
        found = list(
            client.fhir_search(
                "Patient",
                [("given", given), ("family", family), ("birthdate", born)],
                entity="patients",
                **with_priority(client, "fhir_search", "new_patient"),
            )  # fmt: skip
        )
        counter.add("search Patient (roster)")
        out = []
        for p in found:
            if p.get("resourceType") != "Patient" or not p.get("id"):
                continue
            mrn = fhir_pull._mrn_of(p)
            system, value = ("MR", mrn) if mrn else (P.FHIR_ID_SYSTEM, str(p["id"]))
            out.append(P.Sighting(system, value, "roster", fhir_id=str(p["id"]), mrn=mrn))
        return out
    body = client.datamodel(
        {
            "Meta": {"DataModel": "PatientSearch", "EventType": "Query"},
            "Patient": {"Demographics": {"FirstName": given, "LastName": family, "DOB": born}},
        },
        entity="patients",
        **with_priority(client, "datamodel", "new_patient"),
    )
    counter.add("PatientSearch.Query (roster)")
    blocks = [body.get("Patient") or {}] + list(body.get("PotentialMatches") or [])
    out = []
    for block in blocks:
        ident = next(
            (i for i in block.get("Identifiers") or [] if str(i.get("IDType", "")).upper() in ("MR", "MRN")),
            None,
        )
        if ident and ident.get("ID"):
            out.append(P.Sighting("MR", str(ident["ID"]), "roster", mrn=str(ident["ID"])))
    return out


# ---- the pull resource -------------------------------------------------------------------------


def _pull_generator(
    out: ConnectionExtract,
    client: Any,
    conn: Any,
    landing: RawLanding,
    surface: str,
    entities: tuple[str, ...],
    due: list[P.DuePatient],
    discovery_pages: list[PulledPage],
    run: _SurfaceRun,
    known_docs: dict[str, datetime | None],
    known_content: dict[tuple[str, str], str],
    workers: int,
) -> Callable[[], Iterator[Any]]:
    stats = out.stats

    def generate() -> Iterator[Any]:
        emitter = StagedEmitter(surface, conn.id, client=client, landing=landing, known_content=known_content)
        for page in discovery_pages:
            emitter.take(page)
            yield from emitter.drain(final=False)
        fctx = dctx = None
        if surface == "fhir":
            fctx = fhir_pull.FhirPullContext(
                client, landing, conn.id, conn.destination_slug, entities,
                max(conn.page_size or 0, FHIR_PAGE_SIZE), out.counter,
                stats.revinclude, stats.elements, known_docs,
            )  # fmt: skip
        else:
            dctx = dm_pull.DataModelPullContext(
                client, landing, conn.id, entities, conn.page_size or 100, out.counter
            )

        def cost() -> int:
            if fctx is None:
                return DATAMODEL_COST
            if fctx.revinclude:
                return FHIR_COST_REVINCLUDE
            return 2 + sum(len(fhir_pull.ENTITY_RESOURCE_TYPES[e]) for e in entities if e != "patients")

        resolved: dict[str, str] = {}  # FHIR id -> MR of the patients pulled so far this run

        def pull(patient: P.DuePatient) -> tuple[P.DuePatient, Any, P.PullOutcome]:
            started = out.clock.now()
            outcome = P.PullOutcome(
                patient.id_system, patient.id_value, started, ok=False, surfaces={surface}
            )
            before = out.counter.total
            try:
                if fctx is not None:
                    known = resolved.get(patient.id_value) if patient.id_system == P.FHIR_ID_SYSTEM else None
                    if known is not None:
                        # Already pulled this run under its identifier (roster row): this row
                        # folds into that one after the load, without a second pull.
                        outcome.ok, outcome.fhir_id, outcome.mrn = True, patient.id_value, known
                        outcome.incomplete = True  # not a pull of its own: only the fold
                        return patient, fhir_pull.FhirPatientResult(), outcome
                    result = fhir_pull.pull_patient(patient, fctx)
                    if result.fhir_id and result.mrn:
                        resolved[result.fhir_id] = result.mrn
                    outcome.fhir_id, outcome.mrn = result.fhir_id, result.mrn
                    if result.revinclude is not None:
                        stats.revinclude = result.revinclude
                    if result.elements is not None:
                        stats.elements = result.elements
                else:
                    if patient.id_system == P.FHIR_ID_SYSTEM and not patient.mrn:
                        # Known only by a FHIR id so far: the FHIR pull learns its MR; this
                        # surface follows on the next sync (the patient stays due until then).
                        outcome.ok = outcome.incomplete = True
                        return patient, None, outcome
                    result = dm_pull.pull_patient(patient, dctx)
                    outcome.mrn = result.mrn
                outcome.ok = True
                outcome.not_found = result.not_found
                for page in result.pages[:1]:
                    out.clock.observe(page.body)
                return patient, result, outcome
            except Exception as exc:  # noqa: BLE001 - a patient's failure is counted; the sync goes on
                outcome.error = error_code(exc)
                return patient, None, outcome
            finally:
                outcome.requests = out.counter.total - before

        queue = list(due)
        pending: set[Future] = set()
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix=f"pull-{surface}") as pool:
            while queue or pending:
                # Until the first pull learns whether _revinclude / _elements are honoured, one
                # patient at a time: the probe is then sent once, not once per worker.
                probing = fctx is not None and (
                    fctx.revinclude is None
                    or (fctx.revinclude is False and fctx.elements is None and "documents" in entities)
                )
                in_flight = 1 if probing else workers * 2
                while queue and len(pending) < in_flight:
                    left = budget_remaining(client)
                    if left is not None and left < cost() * (len(pending) + 1):
                        # The budget will not cover this patient: defer it and everyone after
                        # it (they are in priority order and stay due for the next sync).
                        stats.deferred += len(queue)
                        queue.clear()
                        break
                    pending.add(pool.submit(pull, queue.pop(0)))
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    patient, result, outcome = future.result()
                    with run.lock:
                        run.outcomes[(patient.id_system, patient.id_value)] = outcome
                    if outcome.incomplete:
                        continue
                    if not outcome.ok:
                        stats.failed += 1
                        stats.error(f"{surface} pull: {outcome.error}")
                        continue
                    if outcome.not_found:
                        stats.not_found += 1
                    else:
                        stats.pulled += 1
                    for page in result.pages:
                        emitter.take(page)
                    yield from emitter.drain(final=False)
        stats.contents_fetched += emitter.contents_fetched
        yield from emitter.drain(final=True)

    return generate
