"""Measure the sandbox as a client sees it: startup time and memory, and serving speed.

    python benchmarks/bench_sandbox.py                       # both parts, default sizes
    python benchmarks/bench_sandbox.py startup --patients 100000
    python benchmarks/bench_sandbox.py serve --patients 10000 --threads 4 --seconds 15

``startup`` runs ``redox-elt sandbox serve`` as a subprocess, times how long until
``/_sandbox/connections`` answers, and reads VmRSS / VmHWM from ``/proc/PID/status`` when
ready, after the first truth and first pages, and after a paging load.

``serve`` starts a sandbox subprocess and drives it from a few concurrent httpx threads for a
fixed time: FHIR ``Observation/_search`` pages (``_count=500``, following ``next`` links) and
Data Model queries (Results.Query windows, VisitQuery windows, PatientSearch by MRN). It prints
requests/s, MB/s and latency percentiles per workload. Only sizes and timings are printed,
never record content. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the sandbox package, when not installed

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def redox_elt() -> list[str]:
    script = Path(sys.executable).with_name("redox-elt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "redox_elt.cli"]


# ---- a sandbox subprocess ------------------------------------------------------------------


class SandboxProcess:
    """``redox-elt sandbox serve --port 0`` in a subprocess; the URL comes from its first line."""

    def __init__(self, patients: int, seed: int, config: Path | None = None) -> None:
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            [*redox_elt(), "sandbox", "serve", "--host", "127.0.0.1", "--port", "0"]
            + ["--patients", str(patients), "--seed", str(seed)]
            + (["--config", str(config)] if config else []),
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
        self.bound_s = time.perf_counter() - self.started_at

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Seconds from launch until ``/_sandbox/connections`` answers 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/_sandbox/connections", timeout=5).status_code == 200:
                    return time.perf_counter() - self.started_at
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise SystemExit("the sandbox exited while starting")
            time.sleep(0.05)
        raise SystemExit(f"the sandbox did not answer within {timeout_s:.0f} s")

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the server process in MB."""
        values = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024  # kB -> MB
        return values["VmRSS"], values["VmHWM"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def unthrottled_config(directory: Path) -> Path:
    """The default connections with Redox's rate limit (7,500 requests / 5 min) lifted, so a
    throughput run measures serving, not 429s."""
    from dataclasses import asdict

    from sandbox.config import default_connections

    connections = []
    for conn in default_connections():
        entry = asdict(conn)
        entry.update(latency_ms=0.0)
        connections.append({k: list(v) if isinstance(v, tuple) else v for k, v in entry.items()})
    path = directory / "bench-sandbox.json"
    path.write_text(json.dumps({"quota_requests": None, "connections": connections}))
    return path


# ---- an independent client ------------------------------------------------------------------


class Client:
    """Registers a key through the control plane and signs its own assertions (pyjwt)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.meta = httpx.get(f"{url}/_sandbox/connections", timeout=30).json()
        self.conns = {c["id"]: c for c in self.meta["connections"]}
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        jwk.update(kid="bench-1", alg="RS384", use="sig")
        r = httpx.post(f"{url}/_sandbox/clients", json={"name": "bench", "jwks": {"keys": [jwk]}}, timeout=30)
        self.client_id = r.json()["client_id"]
        self.token = self._token()

    def _token(self) -> str:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.meta["token_url"],
            "iat": now,
            "exp": now + 240,
            "jti": str(uuid.uuid4()),
        }
        assertion = jwt.encode(claims, self._key, algorithm="RS384", headers={"kid": "bench-1"})
        r = httpx.post(
            self.meta["token_url"],
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
            },
            timeout=30,
        )
        r.raise_for_status()
        return r.json()["access_token"]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def dm_body(self, conn_id: str, data_model: str, event_type: str, **body: Any) -> dict[str, Any]:
        conn = self.conns[conn_id]
        destination = {"ID": conn["destination_id"], "Name": conn["name"]}
        return {
            "Meta": {"DataModel": data_model, "EventType": event_type, "Destinations": [destination]},
            **body,
        }


# ---- load ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int, size: int, seconds: float) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += size
            self.latencies.append(seconds)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status != 200:
                self.errors += 1


def drive(
    threads: int, seconds: float, work: Callable[[httpx.Client, random.Random, Tally], None]
) -> tuple[Tally, float]:
    """Run ``work`` in a loop from ``threads`` threads, each with its own client, for ``seconds``."""
    tally = Tally()
    stop_at = time.monotonic() + seconds

    def loop(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=1)) as http:
            while time.monotonic() < stop_at:
                work(http, rng, tally)

    started = time.perf_counter()
    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return tally, time.perf_counter() - started


def timed_post(http: httpx.Client, tally: Tally, url: str, **kwargs: Any) -> httpx.Response:
    t = time.perf_counter()
    r = http.post(url, **kwargs)
    tally.add(r.status_code, len(r.content), time.perf_counter() - t)
    return r


def report(name: str, tally: Tally, elapsed: float) -> dict[str, Any]:
    lat = sorted(tally.latencies) or [0.0]
    row = {
        "workload": name,
        "requests": tally.requests,
        "errors": tally.errors,
        "statuses": dict(sorted(tally.statuses.items())),
        "req_per_s": round(tally.requests / elapsed, 1),
        "mb_per_s": round(tally.bytes / elapsed / 1e6, 2),
        "avg_kb": round(tally.bytes / max(1, tally.requests) / 1e3, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 1),
        "p95_ms": round(lat[int(0.95 * (len(lat) - 1))] * 1000, 1),
    }
    print(
        f"  {name:<34} {row['req_per_s']:>8.1f} req/s {row['mb_per_s']:>7.2f} MB/s "
        f"avg {row['avg_kb']:>7.1f} kB  p50 {row['p50_ms']:>6.1f} ms  p95 {row['p95_ms']:>6.1f} ms"
        f"  ({tally.requests} requests, {tally.errors} not 200"
        + (f": {dict(sorted(tally.statuses.items()))})" if tally.errors else ")"),
        flush=True,
    )
    return row


def fhir_pages(
    client: Client, conn_id: str, rtype: str, count: int
) -> Callable[[httpx.Client, random.Random, Tally], None]:
    """One full paging of ``rtype`` per call (restarted when the time is up mid-way)."""
    base = client.conns[conn_id]["fhir_base_url"]

    def work(http: httpx.Client, rng: random.Random, tally: Tally) -> None:
        r = timed_post(
            http,
            tally,
            f"{base}/{rtype}/_search",
            data={"_count": str(count), "_lastUpdated": "ge1900-01-01"},
            headers=client.headers,
        )
        for _ in range(3):  # the first pages of a search, as a sync reads them
            nxt = next((link["url"] for link in r.json().get("link", []) if link["relation"] == "next"), None)
            if nxt is None:
                return
            r = timed_post(http, tally, nxt, headers=client.headers)

    return work


def dm_queries(
    client: Client, conn_id: str, kind: str, mrns: list[str]
) -> Callable[[httpx.Client, random.Random, Tally], None]:
    """One Data Model query per call: a Results or VisitQuery window from a random month, or a
    PatientSearch by a random MRN of the connection."""
    url = client.conns[conn_id]["datamodel_url"]
    months = [f"2026-{m:02d}-01" for m in range(1, 11)]

    def work(http: httpx.Client, rng: random.Random, tally: Tally) -> None:
        if kind == "results":
            body = client.dm_body(
                conn_id, "Results", "Query", LastUpdated={"StartDateTime": rng.choice(months)}
            )
        elif kind == "visits":
            body = client.dm_body(
                conn_id, "PatientAdmin", "VisitQuery", VisitStartDateTime=rng.choice(months)
            )
        else:
            ident = [{"ID": rng.choice(mrns), "IDType": "MR"}]
            body = client.dm_body(conn_id, "PatientSearch", "Query", Patient={"Identifiers": ident})
        timed_post(http, tally, url, json=body, headers=client.headers)

    return work


# ---- the two benchmarks ---------------------------------------------------------------------------


def bench_startup(patients: int, seed: int) -> dict[str, Any]:
    print(f"startup: redox-elt sandbox serve --patients {patients:,}", flush=True)
    sandbox = SandboxProcess(patients, seed)
    try:
        ready_s = sandbox.wait_ready()
        rss_ready, hwm_ready = sandbox.memory_mb()
        print(
            f"  socket bound after {sandbox.bound_s:.2f} s; /_sandbox/connections answered after {ready_s:.2f} s"
        )
        print(f"  RSS when ready: {rss_ready:.0f} MB (peak {hwm_ready:.0f} MB)")
        t = time.perf_counter()
        truth = httpx.get(f"{sandbox.url}/_sandbox/truth", timeout=300).json()
        truth_s = time.perf_counter() - t
        rows = sum(sum(c.values()) for c in truth["counts"].values())
        client = Client(sandbox.url)
        for conn in client.conns.values():
            if conn["fhir_base_url"]:
                httpx.post(
                    f"{conn['fhir_base_url']}/Observation/_search",
                    data={"_count": "500", "_lastUpdated": "ge1900-01-01"},
                    headers=client.headers,
                    timeout=120,
                ).raise_for_status()
        rss_touched, hwm_touched = sandbox.memory_mb()
        print(f"  first /_sandbox/truth (with persons): {truth_s:.2f} s; {rows:,} records across connections")
        print(f"  RSS after truth + first pages: {rss_touched:.0f} MB (peak {hwm_touched:.0f} MB)")
        tally, elapsed = drive(2, 10, fhir_pages(client, "riverbend-both", "Observation", 500))
        rss_load, hwm_load = sandbox.memory_mb()
        print(
            f"  RSS after 10 s of Observation paging ({tally.requests} pages): {rss_load:.0f} MB (peak {hwm_load:.0f} MB)"
        )
        return {
            "patients": patients,
            "bound_s": round(sandbox.bound_s, 2),
            "ready_s": round(ready_s, 2),
            "rss_ready_mb": round(rss_ready),
            "truth_s": round(truth_s, 2),
            "records": rows,
            "rss_touched_mb": round(rss_touched),
            "rss_after_load_mb": round(rss_load),
            "peak_rss_mb": round(hwm_load),
        }
    finally:
        sandbox.stop()


def bench_serving(patients: int, seed: int, threads: int, seconds: float) -> list[dict[str, Any]]:
    print(
        f"serving: {patients:,} patients, {threads} client threads, {seconds:.0f} s per workload", flush=True
    )
    with tempfile.TemporaryDirectory() as scratch:
        # The server reads its config before it announces its URL, so the file may go after.
        sandbox = SandboxProcess(patients, seed, unthrottled_config(Path(scratch)))
    try:
        sandbox.wait_ready()
        client = Client(sandbox.url)
        truth = httpx.get(f"{sandbox.url}/_sandbox/truth", timeout=120).json()
        mrns = [
            r["mrn"] for p in truth["persons"] for r in p["records"] if r["connection_id"] == "lakeside-dm"
        ]
        workloads = [
            ("FHIR Observation _count=500", fhir_pages(client, "riverbend-both", "Observation", 500)),
            ("FHIR Patient _count=500", fhir_pages(client, "northwind-fhir", "Patient", 500)),
            ("DM Results.Query (month window)", dm_queries(client, "lakeside-dm", "results", mrns)),
            ("DM VisitQuery (month window)", dm_queries(client, "lakeside-dm", "visits", mrns)),
            ("DM PatientSearch (by MRN)", dm_queries(client, "lakeside-dm", "patients", mrns)),
        ]
        rows = []
        for name, work in workloads:
            drive(1, 1.0, work)  # warm the render cache path and the connection
            tally, elapsed = drive(threads, seconds, work)
            rows.append(report(name, tally, elapsed))
        return rows
    finally:
        sandbox.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", choices=("startup", "serve", "all"), default="all")
    parser.add_argument(
        "--patients", type=int, default=None, help="default: 100,000 for startup, 10,000 for serve"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.part in ("startup", "all"):
        results["startup"] = bench_startup(args.patients or 100_000, args.seed)
    if args.part in ("serve", "all"):
        results["serving"] = bench_serving(args.patients or 10_000, args.seed, args.threads, args.seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
