"""Benchmark the extraction pipeline end to end against sandbox populations: under Redox's
real quota (issue 9) and, with the quota lifted, for throughput next to two reference lanes
(issue 4, "Benchmark"). A script, not a test.

    python benchmarks/bench_sync.py --quota real --patients 1000 --out benchmarks/results
    python benchmarks/bench_sync.py --patients 10000 --lanes limit --out benchmarks/results
    python benchmarks/bench_sync.py --profile 2000 --out /tmp/bench-profile   # cProfile a sync

Both modes run ``redox-elt sandbox serve`` in a subprocess, onboard the way ``redox-elt
sandbox connect`` does, and import each synced connection's roster the way ``redox-elt panel
add`` does (``GET /_sandbox/roster`` -> CSV -> the panel): the pipeline finds patients only
through its panel, as against real Redox.

``--quota real`` (results ``quota-real-N.json``, plus ``quota-real-N.runs.jsonl`` written as
each run ends): the strict sandbox (``search_policy: redox``) with its default quota (7,500
requests per rolling 5 minutes per client) and the connections file exactly as ``sandbox
connect`` wrote it (shared budget 6,750 per 300 s, ``max_rps`` 23.75). The full sync is
``run_sync`` repeated as a scheduler would run it: a run defers the patients the budget cannot
cover, the next starts once a fifth of the budget is free, until a run defers nobody. Then
``POST /_sandbox/advance {"days": 1, "change_fraction": 0.01}`` and the incremental the same
way. Reported per phase: requests (the sync's own counters and the audit trail), per panel
patient and connection split into per-patient queries / document contents / discovery, HTTP
statuses (429s), wall time against the quota-bound minimum, the warehouse against
``/_sandbox/truth``.

``--quota lifted`` (the default; results ``open-N.json``): ``search_policy: open`` (not how
Redox behaves: whole types enumerable with ``_lastUpdated``), no quota in the sandbox and the
client's budget and ``max_rps`` raised out of the way.

1. **pipeline lane**: a full sync (``run_sync``, what ``redox-elt sync`` runs, minus the progress
   bar) in a child process that reports its per-connection stage times and its own peak RSS
   (``ru_maxrss``). Rows = the sum of ``redox.<entity>`` rows; the warehouse is compared with
   ``/_sandbox/truth`` for every synced EHR connection. The pipeline still pulls per patient
   (it has no other path), so the open policy changes nothing for it.
2. **incremental**: ``POST /_sandbox/advance {"days": 1, "change_fraction": 0.01}``, a second sync
   into the same warehouse, its time as a share of the full sync, and truth again.
3. **rest_api lane**: dlt's generic ``rest_api`` source on the FHIR-only connection's searches
   (``POST {Type}/_search``, form-encoded, following the Bundle ``next`` links) into its own DuckDB.
4. **limit lane**: the same searches fetched raw with httpx (no parsing), the bytes written to
   files, then DuckDB ``read_json_auto`` over those files into one table per resource type.

Every result records the machine's load average (other work may share the machine). Only
counts and timings are printed, never record content.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's packages, when not installed

os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "ERROR")

FHIR_CONNECTION = "northwind-fhir"
ALL_OF_TIME = "ge1900-01-01T00:00:00Z"


def _model_entities() -> tuple[str, ...]:
    from pipelines.vocabulary import ENTITIES as MODEL_ENTITIES

    return tuple(MODEL_ENTITIES)


def _fhir_types() -> tuple[str, ...]:
    """Every resource type the pipeline reads rows from (pipelines/vocabulary.py): the
    reference lanes enumerate the same types the FHIR connection's pulls return."""
    from pipelines.vocabulary import FHIR_RESOURCE_ENTITIES

    return tuple(FHIR_RESOURCE_ENTITIES)


ENTITIES = _model_entities()
FHIR_TYPES = _fhir_types()
CLIENT_MAX_RPS = 5000.0
LIFTED_CLIENT_BUDGET = 100_000_000  # requests per 300 s: the shared budget out of the way
ALL_OF_TIME = "ge1900-01-01T00:00:00Z"


def redox_elt() -> list[str]:
    script = Path(sys.executable).with_name("redox-elt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "redox_elt.cli"]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``VmHWM``/``VmRSS`` line of /proc/PID/status, in kB (Linux only)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ---- the sandbox subprocess ----------------------------------------------------------------


def sandbox_config_file(directory: Path, *, search_policy: str = "open", lift_quota: bool = True) -> Path:
    """The default connections; ``search_policy`` and the emulated request quota as asked.

    ``--quota lifted`` (the throughput lanes) uses ``search_policy: open`` and no quota: the
    reference lanes enumerate whole resource types with ``_lastUpdated``, which strict Redox
    refuses. ``--quota real`` writes nothing but the defaults: strict search, 7,500 requests
    per rolling 5 minutes per client."""
    from dataclasses import asdict

    from sandbox.config import default_connections

    conns = []
    for spec in default_connections():
        entry = asdict(spec)
        conns.append({k: list(v) if isinstance(v, tuple) else v for k, v in entry.items()})
    document: dict[str, Any] = {"search_policy": search_policy, "connections": conns}
    if lift_quota:
        document["quota_requests"] = None
    path = directory / "sandbox.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


class Sandbox:
    """``redox-elt sandbox serve --port 0`` in a subprocess; its URL is on its first stdout line."""

    def __init__(self, patients: int, seed: int, config: Path) -> None:
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [*redox_elt(), "sandbox", "serve", "--host", "127.0.0.1", "--port", "0"]
            + ["--patients", str(patients), "--seed", str(seed), "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        line = self.process.stdout.readline() if self.process.stdout else ""
        if "listening on " not in line:
            self.stop()
            raise SystemExit(f"the sandbox did not start (exit {self.process.poll()})")
        self.url = line.split("listening on ", 1)[1].split()[0]
        self.truth()  # the population is built lazily by some stores: wait until it answers
        self.ready_s = time.perf_counter() - started

    def truth(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/_sandbox/truth", params={"persons": "false"}, timeout=600)
        response.raise_for_status()
        return response.json()

    def advance(self, days: float, change_fraction: float) -> dict[str, Any]:
        response = httpx.post(
            f"{self.url}/_sandbox/advance",
            json={"days": days, "change_fraction": change_fraction},
            timeout=600,
        )
        response.raise_for_status()
        return response.json()

    def cpu_s(self) -> float:
        """User + system CPU seconds the sandbox process has used so far."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float | None:
        kb = proc_status_kb(self.process.pid, "VmHWM")
        return round(kb / 1024, 1) if kb else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def connect(url: str, directory: Path, *, lift_quota: bool = True) -> Path:
    """Onboard like ``redox-elt sandbox connect``. With ``lift_quota`` the client's shared
    request budget and every connection's ``max_rps`` are raised out of the way; without it
    the file stays exactly as ``sandbox connect`` wrote it (the production defaults)."""
    from resources.onboarding import connect_sandbox

    path = connect_sandbox(url, directory / "connections.yaml", name="redox-elt-bench")
    if lift_quota:
        document = yaml.safe_load(path.read_text())
        for conn in document["connections"]:
            conn["max_rps"] = CLIENT_MAX_RPS
        document["quota"] = {"requests": LIFTED_CLIENT_BUDGET, "window_s": 300}
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def import_rosters(
    url: str, config: Path, warehouse: Path, directory: Path, only: list[str] | None = None
) -> dict[str, int]:
    """Each EHR connection's roster (or those in ``only``) imported as a user imports their
    own: ``GET /_sandbox/roster`` -> CSV -> ``panel add``'s path (what ``redox-elt demo`` does
    through ``import_sandbox_rosters``) -> panel patients per connection."""
    from pipelines.panel_cli import fetch_sandbox_roster, import_roster
    from resources.settings import load_settings

    settings = load_settings(str(config))
    directory.mkdir(parents=True, exist_ok=True)
    warehouse.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for conn in settings.connections:
        if conn.kind != "ehr" or (only is not None and conn.id not in only):
            continue
        roster = directory / f"roster-{conn.id}.csv"
        fetch_sandbox_roster(url, conn.id, roster)
        done = import_roster(warehouse, conn.id, roster, settings=settings)
        out[conn.id] = done.added + done.already
    return out


# ---- child processes: each lane runs alone so its peak RSS is its own -----------------------


def run_child(
    lane: str, params: dict[str, Any], sandbox: Sandbox | None = None, timeout_s: float = 7200
) -> dict[str, Any]:
    """Run ``lane`` in a fresh interpreter; returns its JSON result plus wall time as seen here
    and the CPU seconds the sandbox spent serving it."""
    sandbox_cpu = sandbox.cpu_s() if sandbox else 0.0
    started = time.perf_counter()
    load_before = load_average()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", lane, json.dumps(params)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=os.environ.copy(),
        cwd=str(ROOT),
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        # Exception text can carry library messages; show only the tail of the child's stderr.
        raise SystemExit(f"lane {lane} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 2)
    if sandbox:
        result["sandbox_cpu_s"] = round(sandbox.cpu_s() - sandbox_cpu, 2)
    result["load_before"] = load_before
    result["load_after"] = load_average()
    return result


def peak_rss() -> dict[str, float]:
    """This process's peak RSS and CPU seconds (and those of any children it waited for)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "peak_rss_mb": round(own.ru_maxrss / 1024, 1),
        "children_peak_rss_mb": round(children.ru_maxrss / 1024, 1),
        "cpu_s": round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 2),
    }


class StackSampler:
    """A wall-clock sampling profiler over every thread. cProfile sees only the main thread,
    and dlt runs the sources' generators (fetch, normalize, Binary prefetch) in worker
    threads, so cProfile alone shows the main thread waiting on futures. Each sample counts,
    per busy thread, its innermost frame ("self") and the innermost frame under /work/main
    ("project"); threads parked in threading/queue/futures waits are idle and not counted."""

    IDLE = ("/threading.py", "/queue.py", "/concurrent/futures/", "/selectors.py")

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.samples = 0
        self.busy: dict[str, int] = {}
        self.project: dict[str, int] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()

    @staticmethod
    def _where(frame: Any) -> str:
        code = frame.f_code
        path = code.co_filename.replace(str(ROOT) + "/", "").split("site-packages/")[-1]
        return f"{path}:{code.co_name}"

    def _run(self) -> None:
        me = threading.get_ident()
        root = str(ROOT) + "/"
        while not self._stop:
            time.sleep(self.interval_s)
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me or any(part in frame.f_code.co_filename for part in self.IDLE):
                    continue
                top = self._where(frame)
                self.busy[top] = self.busy.get(top, 0) + 1
                cur = frame
                while cur is not None and not (
                    cur.f_code.co_filename.startswith(root) and "/benchmarks/" not in cur.f_code.co_filename
                ):
                    cur = cur.f_back
                owner = self._where(cur) if cur is not None else "(outside the project)"
                self.project[owner] = self.project.get(owner, 0) + 1

    def report(self, top: int = 40) -> dict[str, Any]:
        def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
            pairs = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
            return [(k, round(v * self.interval_s, 2)) for k, v in pairs]

        return {
            "interval_s": self.interval_s,
            "samples": self.samples,
            "busy_thread_seconds_by_frame": ranked(self.busy),
            "busy_thread_seconds_by_project_function": ranked(self.project),
        }


def api_call_summary(audit_log: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """Per connection and operation kind: calls, summed latency and HTTP statuses, from this
    run's audit records (operation names and path templates only: no identifiers)."""
    out: dict[str, dict[str, Any]] = {}
    with open(audit_log, encoding="utf-8") as lines:
        for line in lines:
            rec = json.loads(line)
            if rec.get("run_id") != run_id:
                continue
            op = rec["operation"]
            if op.startswith("read "):
                op = op.split(" (")[0]
            per = out.setdefault(rec.get("connection_id") or "-", {}).setdefault(
                op, {"calls": 0, "latency_s": 0.0, "surface": rec.get("surface"), "status": {}, "retries": 0}
            )
            per["calls"] += 1
            per["latency_s"] += rec["duration_ms"] / 1000
            status = str(rec.get("status_code"))
            per["status"][status] = per["status"].get(status, 0) + 1
            if (rec.get("attempt") or 1) > 1:
                per["retries"] += 1
    for ops in out.values():
        for per in ops.values():
            per["latency_s"] = round(per["latency_s"], 2)
    return {conn: dict(sorted(ops.items())) for conn, ops in out.items()}


def child_sync(params: dict[str, Any]) -> dict[str, Any]:
    from pipelines.sync import run_sync
    from pipelines.warehouse import WarehousePaths
    from resources.settings import load_settings

    settings = load_settings(params["config"])
    paths = WarehousePaths.at(params["warehouse"])
    started = time.perf_counter()
    profiler = cProfile.Profile() if params.get("profile") else None
    sampler = StackSampler() if params.get("profile") else contextlib.nullcontext()
    with sampler:
        if profiler:
            profiler.enable()
        report = run_sync(settings, paths, connection_ids=params.get("connections"), caller="benchmark")
        if profiler:
            profiler.disable()
            profiler.dump_stats(params["profile"])
    if isinstance(sampler, StackSampler):
        Path(params["profile"] + ".threads.json").write_text(json.dumps(sampler.report(), indent=1))
    seconds = time.perf_counter() - started
    return {
        "run_id": report.run_id,
        "run_sync_s": round(seconds, 2),
        "api_calls": api_call_summary(paths.audit_log, report.run_id),
        "connections": {
            c.connection_id: {
                "seconds": {k: round(v, 2) for k, v in c.seconds.items()},
                "staged": c.extracted,
                "published": {k: v for k, v in c.published.items()},
                "quarantined": sum(c.quarantined.values()),
                "error": c.error,
                "access": c.access.to_dict() if c.access is not None else None,
            }
            for c in report.connections
        },
        **peak_rss(),
    }


def token_provider(config: str) -> Any:
    from resources.client import SHARED
    from resources.settings import load_settings

    settings = load_settings(config)
    return SHARED.oauth(settings, SHARED.vault(None)), settings.connection(FHIR_CONNECTION)


def child_rest_api(params: dict[str, Any]) -> dict[str, Any]:
    import dlt
    from dlt.common.configuration import configspec
    from dlt.sources.helpers.rest_client.auth import AuthConfigBase
    from dlt.sources.helpers.rest_client.paginators import JSONLinkPaginator
    from dlt.sources.rest_api import rest_api_source

    provider, conn = token_provider(params["config"])

    @configspec
    class BenchAuth(AuthConfigBase):
        """A bearer token from the project's token provider (cached, refreshed before its
        5-minute expiry): obtained once per token lifetime, never expired mid-run."""

        def __call__(self, request: Any) -> Any:
            request.headers["Authorization"] = f"Bearer {provider.get_token()}"
            return request

    class FhirNextLinkPaginator(JSONLinkPaginator):
        """The Bundle's ``next`` link, posted without the search form: the link carries
        the page token and FHIR refuses a token combined with search parameters."""

        def update_request(self, request: Any) -> None:
            super().update_request(request)
            request.data = None

    source = rest_api_source(
        {
            "client": {
                "base_url": conn.fhir_base_url.rstrip("/") + "/",
                "auth": BenchAuth(),
                "headers": {"Accept": "application/fhir+json"},
            },
            "resource_defaults": {"write_disposition": "replace"},
            "resources": [
                {
                    "name": rtype.lower(),
                    "endpoint": {
                        "path": f"{rtype}/_search",
                        "method": "POST",
                        "data": {"_count": str(params["page_size"]), "_lastUpdated": ALL_OF_TIME},
                        "data_selector": "entry[*].resource",
                        "paginator": FhirNextLinkPaginator(next_url_path="link[?relation=='next'].url"),
                    },
                }
                for rtype in FHIR_TYPES
            ],
        }
    )
    pipeline = dlt.pipeline(
        pipeline_name="bench_rest_api",
        destination=dlt.destinations.duckdb(params["warehouse"]),
        dataset_name="fhir",
        pipelines_dir=params["pipelines_dir"],
    )
    started = time.perf_counter()
    pipeline.run(source)
    seconds = time.perf_counter() - started
    with duckdb.connect(params["warehouse"], read_only=True) as con:
        rows = {
            rtype: con.execute(f"select count(*) from fhir.{rtype.lower()}").fetchone()[0]
            for rtype in FHIR_TYPES
        }
        child_tables = con.execute(
            "select count(*) from information_schema.tables where table_schema = 'fhir' "
            "and table_name like '%\\_\\_%' escape '\\'"
        ).fetchone()[0]
    return {
        "seconds": round(seconds, 2),
        "rows": rows,
        "child_tables": child_tables,
        **peak_rss(),
    }


def fetch_pages(client: httpx.Client, base: str, rtype: str, page_size: int, out: Path) -> tuple[int, int]:
    """Every page of one search written to ``out`` as received; returns (pages, bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    response = client.post(f"{base}/{rtype}/_search", data={"_count": page_size, "_lastUpdated": ALL_OF_TIME})
    pages = size = 0
    while True:
        response.raise_for_status()
        body = response.content
        (out / f"{pages:06d}.json").write_bytes(body)
        pages += 1
        size += len(body)
        # The next link is found without parsing the page: the limit lane never decodes JSON
        # in Python. The sandbox writes the links before the entries.
        head = body[:4096].decode("utf-8", "replace")
        marker = head.find('"relation":"next","url":"')
        if marker < 0:
            return pages, size
        start = marker + len('"relation":"next","url":"')
        response = client.post(head[start : head.index('"', start)])


def child_limit(params: dict[str, Any]) -> dict[str, Any]:
    provider, conn = token_provider(params["config"])
    base = conn.fhir_base_url.rstrip("/")
    pages_dir = Path(params["pages_dir"])
    fetch: dict[str, Any] = {}
    started = time.perf_counter()
    with httpx.Client(
        timeout=120, auth=_HttpxBearer(provider), headers={"Accept": "application/fhir+json"}
    ) as client:
        for rtype in FHIR_TYPES:
            pages, size = fetch_pages(client, base, rtype, params["page_size"], pages_dir / rtype)
            fetch[rtype] = {"pages": pages, "bytes": size}
    fetch_s = time.perf_counter() - started
    started = time.perf_counter()
    rows = {}
    with duckdb.connect(params["warehouse"]) as con:
        for rtype in FHIR_TYPES:
            pattern = str(pages_dir / rtype / "*.json").replace("'", "''")
            con.execute(
                f"create or replace table {rtype.lower()} as "
                f"select unnest(entry, recursive := false).resource as resource "
                f"from read_json_auto('{pattern}', maximum_object_size = 268435456)"
            )
            rows[rtype] = con.execute(f"select count(*) from {rtype.lower()}").fetchone()[0]
    load_s = time.perf_counter() - started
    return {
        "seconds": round(fetch_s + load_s, 2),
        "fetch_s": round(fetch_s, 2),
        "read_json_s": round(load_s, 2),
        "pages": fetch,
        "rows": rows,
        **peak_rss(),
    }


class _HttpxBearer(httpx.Auth):
    def __init__(self, provider: Any) -> None:
        self.provider = provider

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers["Authorization"] = f"Bearer {self.provider.get_token()}"
        yield request


CHILD_LANES = {"sync": child_sync, "rest_api": child_rest_api, "limit": child_limit}


# ---- the benchmark ---------------------------------------------------------------------------


def warehouse_counts(warehouse: Path) -> dict[str, dict[str, int]]:
    """Rows per connection and entity in the published model (``redox.<entity>``)."""
    from pipelines.publish import model_schema

    out: dict[str, dict[str, int]] = {}
    with duckdb.connect(str(warehouse), read_only=True) as con:
        schema = model_schema(con)
        tables = {
            r[0]
            for r in con.execute(
                "select table_name from information_schema.tables where table_schema = ?", [schema]
            ).fetchall()
        }
        for entity in ENTITIES:
            if entity not in tables:
                continue
            for conn, n in con.execute(
                f"select connection_id, count(*) from {schema}.{entity} group by 1"
            ).fetchall():
                out.setdefault(conn, {})[entity] = n
    return out


def truth_diffs(truth: dict[str, Any], got: dict[str, dict[str, int]], ehr: list[str]) -> dict[str, Any]:
    """(connection.entity) -> [in warehouse, in truth] wherever they differ."""
    return {
        f"{c}.{e}": [got.get(c, {}).get(e, 0), n]
        for c in ehr
        for e, n in truth["counts"][c].items()
        if got.get(c, {}).get(e, 0) != n
    }


def only_connections(ehr: list[str], only: list[str] | None) -> list[str]:
    """The EHR connections to sync: all, or those ``--connections`` names (each must exist)."""
    if not only:
        return ehr
    unknown = sorted(set(only) - set(ehr))
    if unknown:
        raise SystemExit(f"--connections: not an EHR connection of the sandbox: {unknown}")
    return [c for c in ehr if c in only]


def rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else 0.0


def per_100k(seconds: float, rows: int) -> float | None:
    """CPU seconds per 100,000 rows."""
    return round(seconds * 100_000 / rows, 2) if rows else None


def bench_size(
    patients: int, seed: int, workdir: Path, lanes: set[str], only: list[str] | None = None
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "mode": "open",
        "patients": patients,
        "seed": seed,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_at_start": load_average(),
        },
    }
    sandbox = Sandbox(patients, seed, sandbox_config_file(workdir))
    try:
        result["sandbox"] = {"ready_s": round(sandbox.ready_s, 2)}
        config = connect(sandbox.url, workdir)
        with httpx.Client(timeout=30) as http:
            meta = http.get(f"{sandbox.url}/_sandbox/connections").json()
        ehr = only_connections([c["id"] for c in meta["connections"] if c.get("kind", "ehr") == "ehr"], only)
        result["connections_synced"] = ehr
        warehouse = workdir / "wh" / "redox.duckdb"
        started = time.perf_counter()
        result["panel"] = import_rosters(sandbox.url, config, warehouse, workdir / "rosters", ehr)
        result["roster_import_s"] = round(time.perf_counter() - started, 2)
        # The clinical network answers after an emulated 150 ms per call (a remote network, by
        # design): it is latency-bound and timed on its own, after the EHR connections it asks about.
        network = [c["id"] for c in meta["connections"] if c.get("kind") == "network"]
        fhir_conn = next(c for c in meta["connections"] if c["id"] == FHIR_CONNECTION)
        page_size = int(fhir_conn.get("max_page_size") or fhir_conn.get("page_size") or 100)

        print(f"[{patients}] full sync ...", flush=True)
        sync_params = {"config": str(config), "warehouse": str(warehouse), "connections": ehr}
        full = run_child("sync", sync_params, sandbox)
        got = warehouse_counts(warehouse)
        rows = sum(sum(per.values()) for per in got.values())
        truth = sandbox.truth()
        full.update(
            rows_loaded=rows,
            rows_per_connection={c: sum(v.values()) for c, v in got.items()},
            rows_per_s=rate(rows, full["wall_s"]),
            cpu_s_per_100k_rows=per_100k(full["cpu_s"], rows),
            sandbox_cpu_s_per_100k_rows=per_100k(full.get("sandbox_cpu_s", 0.0), rows),
            truth_diffs=truth_diffs(truth, got, ehr),
            ehr_connections=ehr,
        )
        nw = full["connections"].get(FHIR_CONNECTION, {})
        nw_rows = sum(got.get(FHIR_CONNECTION, {}).values())
        nw_s = sum(nw.get("seconds", {}).values())
        full["fhir_connection"] = {
            "rows": nw_rows,
            "seconds": round(nw_s, 2),
            "rows_per_s": rate(nw_rows, nw_s),
        }
        result["full_sync"] = full
        print(
            f"[{patients}] full sync {full['wall_s']} s, {rows} rows, truth diffs {len(full['truth_diffs'])}",
            flush=True,
        )

        if "incremental" in lanes:
            advanced = sandbox.advance(1, 0.01)
            print(f"[{patients}] incremental sync ...", flush=True)
            inc = run_child("sync", sync_params, sandbox)
            got = warehouse_counts(warehouse)
            inc.update(
                advance=advanced,
                rows_loaded=sum(sum(per.values()) for per in got.values()),
                share_of_full=round(inc["wall_s"] / full["wall_s"], 4),
                truth_diffs=truth_diffs(sandbox.truth(), got, ehr),
            )
            result["incremental_sync"] = inc
            print(
                f"[{patients}] incremental {inc['wall_s']} s ({100 * inc['share_of_full']:.1f}% of full)",
                flush=True,
            )

        if "network" in lanes and network:
            print(f"[{patients}] network connection sync ...", flush=True)
            net = run_child("sync", {**sync_params, "connections": network}, sandbox)
            got = warehouse_counts(warehouse)
            net["rows_loaded"] = sum(sum(got.get(c, {}).values()) for c in network)
            net["rows_per_s"] = rate(net["rows_loaded"], net["wall_s"])
            result["network_sync"] = net
            print(f"[{patients}] network {net['wall_s']} s, {net['rows_loaded']} rows", flush=True)

        # The reference lanes read the population as advanced: both see the same records.
        common = {"config": str(config), "page_size": page_size}
        if "rest_api" in lanes:
            print(f"[{patients}] rest_api lane ...", flush=True)
            rest = run_child(
                "rest_api",
                {
                    **common,
                    "warehouse": str(workdir / "rest_api.duckdb"),
                    "pipelines_dir": str(workdir / "rest_api_pipelines"),
                },
                sandbox,
            )
            rest_rows = sum(rest["rows"].values())
            rest.update(rows_total=rest_rows, rows_per_s=rate(rest_rows, rest["seconds"]))
            result["rest_api_lane"] = rest
            print(f"[{patients}] rest_api {rest['seconds']} s, {rest_rows} rows", flush=True)
        if "limit" in lanes:
            print(f"[{patients}] limit lane ...", flush=True)
            limit = run_child(
                "limit",
                {**common, "warehouse": str(workdir / "limit.duckdb"), "pages_dir": str(workdir / "pages")},
                sandbox,
            )
            limit_rows = sum(limit["rows"].values())
            limit.update(
                rows_total=limit_rows,
                rows_per_s=rate(limit_rows, limit["seconds"]),
                cpu_s_per_100k_rows=per_100k(limit["cpu_s"], limit_rows),
                sandbox_cpu_s_per_100k_rows=per_100k(limit.get("sandbox_cpu_s", 0.0), limit_rows),
            )
            result["limit_lane"] = limit
            print(f"[{patients}] limit {limit['seconds']} s, {limit_rows} rows", flush=True)
        result["sandbox"]["peak_rss_mb"] = sandbox.peak_rss_mb()
    finally:
        sandbox.stop()
    result["machine"]["load_at_end"] = load_average()
    result["comparisons"] = comparisons(result)
    return result


# ---- the real quota (issue 9): strict sandbox, documented quota, rosters, per-patient pulls ---


RESUME_FRACTION_DIVISOR = 5  # the next run starts once 1/5 of the budget is free again


# What a request is for, from the sync's own PHI-free counters (AccessStats.requests_by_kind):
# "discover …" kinds are the date-window queries that find who is active (per connection, not
# per patient); "read Binary" is document content; everything else is a per-patient query.
def request_class(kind: str) -> str:
    if kind.startswith("discover "):
        return "discovery"
    if kind == "read Binary":
        return "contents"
    return "patient_queries"


def budget_for(config: Path) -> Any:
    """The client's shared request budget, as the sync's client opens it (same file, same
    size): the benchmark reads how much of it is left between runs."""
    from resources.client import SHARED
    from resources.settings import load_settings

    settings = load_settings(str(config))
    return SHARED.budget(settings, settings.connections[0])


def wait_for_budget(budget: Any, wanted: int, limit_s: float = 400.0) -> float:
    """Block until ``wanted`` requests of the rolling window are free again; -> seconds waited.
    The budget frees as the sends of one window ago age out, so this polls its stats."""
    started = time.perf_counter()
    while budget.stats().remaining < wanted:
        if time.perf_counter() - started > limit_s:
            raise SystemExit(f"the request budget did not free {wanted} requests in {limit_s:.0f} s")
        time.sleep(1.0)
    return time.perf_counter() - started


def sync_until_done(
    label: str,
    sync_params: dict[str, Any],
    sandbox: Sandbox,
    budget: Any,
    max_runs: int,
    journal: Path | None = None,
) -> dict[str, Any]:
    """``redox-elt sync`` as a scheduler runs it under the quota: one run spends what the
    budget allows and defers the rest (they stay due); the next run starts once the window
    has freed most of the budget again. Repeats until a run defers and fails nobody."""
    runs: list[dict[str, Any]] = []
    waits: list[float] = []
    started = time.perf_counter()
    for number in range(1, max_runs + 1):
        run = run_child("sync", sync_params, sandbox)
        deferred = sum((c.get("access") or {}).get("deferred", 0) for c in run["connections"].values())
        failed = sum((c.get("access") or {}).get("failed", 0) for c in run["connections"].values())
        errors = {cid: c["error"] for cid, c in run["connections"].items() if c.get("error")}
        run.update(number=number, deferred=deferred, failed=failed)
        runs.append(run)
        if journal is not None:  # every run's counts survive a crash of what follows
            with open(journal, "a", encoding="utf-8") as out:
                out.write(json.dumps({"phase": label, **run}) + "\n")
        requests = sum((c.get("access") or {}).get("requests", 0) for c in run["connections"].values())
        print(
            f"  {label} run {number}: {run['wall_s']} s, {requests} requests, "
            f"deferred {deferred}, failed {failed}, errors {len(errors)}",
            flush=True,
        )
        if errors:
            raise SystemExit(f"{label}: connection errors {sorted(errors)}")
        if deferred == 0 and failed == 0:
            break
        if requests == 0 and number > 1:
            raise SystemExit(f"{label}: a run with the budget freed sent nothing; {deferred} deferred")
        # A slice of the window back: the sync defers once the budget left will not cover
        # the next patients, and its lowest priority may spend only above a 10% reserve; a
        # run started with 20% free spends at the rate the older sends age out.
        waits.append(wait_for_budget(budget, budget.requests // RESUME_FRACTION_DIVISOR))
    else:
        raise SystemExit(f"{label}: still deferring after {max_runs} runs")
    return {
        "runs": runs,
        "waits_s": [round(w, 1) for w in waits],
        "wall_s": round(time.perf_counter() - started, 2),
    }


def phase_requests(phase: dict[str, Any], panel: dict[str, int], audit_log: Path) -> dict[str, Any]:
    """Requests of a phase (all its runs), per connection: total, per panel patient, by class
    and by kind, and the audit trail's own count with its HTTP statuses (429s included)."""
    per_conn: dict[str, Any] = {}
    for run in phase["runs"]:
        for cid, c in run["connections"].items():
            access = c.get("access") or {}
            out = per_conn.setdefault(
                cid,
                {"requests": 0, "by_class": {}, "by_kind": {}, "pulled": 0, "deferred_last": 0},
            )
            out["requests"] += access.get("requests", 0)
            out["pulled"] += access.get("pulled", 0)
            out["deferred_last"] = access.get("deferred", 0)
            out["revinclude"] = access.get("revinclude")
            out["elements"] = access.get("elements")
            for kind, n in (access.get("requests_by_kind") or {}).items():
                out["by_kind"][kind] = out["by_kind"].get(kind, 0) + n
                cls = request_class(kind)
                out["by_class"][cls] = out["by_class"].get(cls, 0) + n
    run_ids = {run["run_id"] for run in phase["runs"]}
    audit = audit_counts(audit_log, run_ids)
    for cid, out in per_conn.items():
        patients = panel.get(cid) or 0
        out["panel_patients"] = patients
        if patients:
            out["per_patient"] = round(out["requests"] / patients, 3)
            out["per_patient_by_class"] = {k: round(v / patients, 3) for k, v in out["by_class"].items()}
            if out["pulled"]:
                out["per_pulled_patient"] = round(out["requests"] / out["pulled"], 3)
                out["per_pulled_patient_by_class"] = {
                    k: round(v / out["pulled"], 3) for k, v in out["by_class"].items()
                }
        out["audit"] = audit.get(cid, {})
    total = sum(o["requests"] for o in per_conn.values())
    return {
        "requests": total,
        "audit_requests": sum(a.get("api_calls", 0) for a in audit.values()),
        "status_429": sum(a.get("status", {}).get("429", 0) for a in audit.values()),
        "per_connection": per_conn,
    }


def audit_counts(audit_log: Path, run_ids: set[str]) -> dict[str, dict[str, Any]]:
    """Per connection from the audit trail: API calls (token calls apart, as the budget keeps
    them), retries, HTTP statuses and calls per operation."""
    out: dict[str, dict[str, Any]] = {}
    with open(audit_log, encoding="utf-8") as lines:
        for line in lines:
            rec = json.loads(line)
            if rec.get("run_id") not in run_ids:
                continue
            conn = out.setdefault(
                rec.get("connection_id") or "-",
                {"api_calls": 0, "token_calls": 0, "retries": 0, "status": {}, "operations": {}},
            )
            if rec.get("surface") == "auth" or rec.get("operation") == "token":
                conn["token_calls"] += 1
                continue
            conn["api_calls"] += 1
            if (rec.get("attempt") or 1) > 1:
                conn["retries"] += 1
            status = str(rec.get("status_code"))
            conn["status"][status] = conn["status"].get(status, 0) + 1
            op = rec["operation"].split(" (")[0]
            conn["operations"][op] = conn["operations"].get(op, 0) + 1
    return out


def quota_bound(requests: int, budget: int, window_s: float) -> dict[str, float]:
    """The quota-bound minimum wall time of ``requests``: at the budget's average rate
    (``requests ÷ (budget / window)``, the issue's definition), and under the rolling window
    itself, which lets a burst of one budget through at once (``⌈requests / budget⌉ − 1``
    windows)."""
    rate_per_s = budget / window_s
    return {
        "allowed_rate_per_s": round(rate_per_s, 3),
        "at_average_rate_s": round(requests / rate_per_s, 1),
        "rolling_window_floor_s": round(max(0, math.ceil(requests / budget) - 1) * window_s, 1),
    }


def bench_quota(
    patients: int,
    seed: int,
    workdir: Path,
    max_runs: int,
    only: list[str] | None = None,
    journal: Path | None = None,
) -> dict[str, Any]:
    """Strict sandbox, the documented quota on both sides, rosters imported: the full sync
    (as many runs as the budget needs), then a 1% change and the incremental sync. ``only``
    limits the sync to some EHR connections (every roster is imported all the same)."""
    result: dict[str, Any] = {
        "mode": "quota-real",
        "patients": patients,
        "seed": seed,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_at_start": load_average(),
        },
    }
    sandbox = Sandbox(patients, seed, sandbox_config_file(workdir, search_policy="redox", lift_quota=False))
    try:
        result["sandbox"] = {"ready_s": round(sandbox.ready_s, 2)}
        config = connect(sandbox.url, workdir, lift_quota=False)
        document = yaml.safe_load(config.read_text())
        with httpx.Client(timeout=30) as http:
            meta = http.get(f"{sandbox.url}/_sandbox/connections").json()
        ehr = only_connections([c["id"] for c in meta["connections"] if c.get("kind", "ehr") == "ehr"], only)
        result["connections_synced"] = ehr
        result["sandbox"]["quota"] = meta.get("quota")
        result["sandbox"]["search_policy"] = "redox"
        result["client"] = {
            "quota": document.get("quota"),
            "max_rps": {c["id"]: c.get("max_rps") for c in document["connections"]},
            "refresh_days": {c["id"]: c.get("refresh_days") for c in document["connections"]},
        }
        budget = budget_for(config)
        warehouse = workdir / "wh" / "redox.duckdb"
        started = time.perf_counter()
        panel = import_rosters(sandbox.url, config, warehouse, workdir / "rosters", ehr)
        result["panel"] = panel
        result["roster_import_s"] = round(time.perf_counter() - started, 2)
        print(f"[{patients}] rosters {panel}", flush=True)
        sync_params = {"config": str(config), "warehouse": str(warehouse), "connections": ehr}
        audit_log = _audit_log_of(warehouse)

        def measure(label: str, phase: dict[str, Any]) -> dict[str, Any]:
            got = warehouse_counts(warehouse)
            served = sandbox.truth()
            requests = phase_requests(phase, panel, audit_log)
            clients = served.get("quota") or {}
            out = {
                "wall_s": phase["wall_s"],
                "sync_runs": len(phase["runs"]),
                "budget_waits_s": phase["waits_s"],
                "run_wall_s": [r["wall_s"] for r in phase["runs"]],
                "cpu_s": round(sum(r["cpu_s"] for r in phase["runs"]), 2),
                "sandbox_cpu_s": round(sum(r.get("sandbox_cpu_s", 0.0) for r in phase["runs"]), 2),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in phase["runs"]),
                **requests,
                "sandbox_quota": clients,
                "quota_bound": quota_bound(requests["requests"], budget.requests, budget.window_s),
                "rows_loaded": sum(sum(v.values()) for v in got.values()),
                "truth_diffs": truth_diffs(served, got, ehr),
                "runs": phase["runs"],
            }
            qb = out["quota_bound"]["at_average_rate_s"]
            out["wall_vs_quota_bound"] = round(out["wall_s"] / qb, 3) if qb else None
            print(
                f"[{patients}] {label}: {out['wall_s']} s over {out['sync_runs']} run(s), "
                f"{out['requests']} requests ({out['audit_requests']} in the audit trail), "
                f"429s {out['status_429']}, quota-bound {qb} s, truth diffs {len(out['truth_diffs'])}",
                flush=True,
            )
            return out

        print(f"[{patients}] full sync under the quota ...", flush=True)
        result["full_sync"] = measure(
            "full", sync_until_done("full", sync_params, sandbox, budget, max_runs, journal)
        )
        # The incremental starts with most of the window free, as a scheduled run would.
        result["wait_before_incremental_s"] = round(wait_for_budget(budget, budget.requests // 2), 1)
        result["advance"] = sandbox.advance(1, 0.01)
        print(f"[{patients}] incremental sync under the quota ...", flush=True)
        inc = measure(
            "incremental", sync_until_done("incremental", sync_params, sandbox, budget, max_runs, journal)
        )
        inc["requests_share_of_full"] = round(inc["requests"] / result["full_sync"]["requests"], 4)
        result["incremental_sync"] = inc
        result["sandbox"]["peak_rss_mb"] = sandbox.peak_rss_mb()
    finally:
        sandbox.stop()
    result["machine"]["load_at_end"] = load_average()
    return result


def _audit_log_of(warehouse: Path) -> Path:
    from pipelines.warehouse import WarehousePaths

    return WarehousePaths.at(warehouse).audit_log


def comparisons(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    full = result.get("full_sync") or {}
    nw = (full.get("fhir_connection") or {}).get("rows_per_s")
    if "rest_api_lane" in result and nw:
        out["fhir_connection_vs_rest_api"] = round(nw / result["rest_api_lane"]["rows_per_s"], 2)
    if "limit_lane" in result and nw:
        out["limit_vs_fhir_connection"] = round(result["limit_lane"]["rows_per_s"] / nw, 2)
    return out


def profile_sync(patients: int, seed: int, workdir: Path, out: Path) -> Path:
    """cProfile one in-process full sync (sandbox in its own process) and write the top functions."""
    sandbox = Sandbox(patients, seed, sandbox_config_file(workdir))
    try:
        config = connect(sandbox.url, workdir)
        with httpx.Client(timeout=30) as http:
            meta = http.get(f"{sandbox.url}/_sandbox/connections").json()
        ehr = [c["id"] for c in meta["connections"] if c.get("kind", "ehr") == "ehr"]
        import_rosters(sandbox.url, config, workdir / "wh" / "redox.duckdb", workdir / "rosters")
        stats_file = workdir / "sync.prof"
        params = {
            "config": str(config),
            "warehouse": str(workdir / "wh" / "redox.duckdb"),
            "connections": ehr,
            "profile": str(stats_file),
        }
        result = run_child("sync", params, sandbox)
    finally:
        sandbox.stop()
    text = io.StringIO()
    text.write(json.dumps(result, indent=1) + "\n")
    threads = json.loads(Path(str(stats_file) + ".threads.json").read_text())
    text.write("\n== all threads, sampled (busy thread-seconds) ==\n")
    for title, key in (
        ("innermost frame", "busy_thread_seconds_by_frame"),
        ("innermost project function", "busy_thread_seconds_by_project_function"),
    ):
        text.write(f"-- by {title}\n")
        for where, seconds in threads[key]:
            text.write(f"{seconds:9.2f}  {where}\n")
    text.write("\n== main thread, cProfile ==\n")
    stats = pstats.Stats(str(stats_file), stream=text)
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(40)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"profile-sync-{patients}.txt"
    target.write_text(text.getvalue())
    shutil.copy(stats_file, out / f"profile-sync-{patients}.prof")
    return target


@contextlib.contextmanager
def isolated_home() -> Iterator[Path]:
    """A throwaway vault and key ring, so the benchmark never touches the user's own."""
    saved = {k: os.environ.get(k) for k in ("REDOX_ELT_HOME", "REDOX_ELT_MASTER_KEY")}
    with tempfile.TemporaryDirectory(prefix="redox-bench-") as tmp:
        os.environ["REDOX_ELT_HOME"] = str(Path(tmp) / "home")
        os.environ["REDOX_ELT_MASTER_KEY"] = "benchmark-only-master-key"
        try:
            yield Path(tmp)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[10_000])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--lanes",
        nargs="+",
        default=["incremental", "rest_api", "limit", "network"],
        choices=["incremental", "rest_api", "limit", "network"],
        help="what to run besides the full sync (default: all)",
    )
    parser.add_argument(
        "--quota",
        choices=["lifted", "real"],
        default="lifted",
        help="lifted: search_policy open, no quota on either side, throughput lanes "
        "(results/open-N.json); real: strict sandbox with the documented quota, full sync "
        "as many runs as the budget needs, then incremental (results/quota-real-N.json)",
    )
    parser.add_argument(
        "--connections",
        nargs="+",
        default=None,
        help="sync (and import the rosters of) only these EHR connections (default: all three)",
    )
    parser.add_argument(
        "--max-runs", type=int, default=60, help="--quota real: most sync runs per phase (default 60)"
    )
    parser.add_argument(
        "--profile", type=int, default=None, metavar="N", help="cProfile a full sync of N patients"
    )
    parser.add_argument("--child", nargs=2, metavar=("LANE", "PARAMS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        lane, params = args.child
        print(json.dumps(CHILD_LANES[lane](json.loads(params))))
        return 0

    # SIGTERM unwinds like Ctrl-C, so the sandbox subprocess and the temp dirs are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with isolated_home() as tmp:
        if args.profile:
            print(f"profile written to {profile_sync(args.profile, args.seed, tmp, out)}")
            return 0
        for patients in args.patients:
            workdir = tmp / f"n{patients}"
            workdir.mkdir()
            if args.quota == "real":
                target = out / f"quota-real-{patients}.json"
                journal = out / f"quota-real-{patients}.runs.jsonl"
                journal.unlink(missing_ok=True)
                result = bench_quota(patients, args.seed, workdir, args.max_runs, args.connections, journal)
            else:
                result = bench_size(patients, args.seed, workdir, set(args.lanes), args.connections)
                target = out / f"open-{patients}.json"
            result["command"] = " ".join(["python", "benchmarks/bench_sync.py", *(argv or sys.argv[1:])])
            target.write_text(json.dumps(result, indent=1) + "\n")
            print(f"[{patients}] written {target}", flush=True)
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
