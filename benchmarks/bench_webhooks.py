"""Webhook receiver throughput: durable deliveries per second and acknowledgement latency.

Starts ``redox-elt webhook serve`` in a subprocess over a temporary warehouse, then several
sender processes post Data Model ``Results.New``-shaped events (each with its own
``Meta.Logs[].ID``; a share re-sent as duplicates) with a number of concurrent connections
each, as fast as the receiver acknowledges. Every 200 is a message committed (fsync'd) to the
inbox. Prints deliveries/s, latency percentiles and the inbox's counters at the end.

    python benchmarks/bench_webhooks.py --seconds 15 --senders 2 --concurrency 32

Only 127.0.0.1 traffic; bodies are synthetic and carry no names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

TOKEN = "bench-" + uuid.uuid4().hex
CONFIG = """organization: Bench
environment: Development
token_url: http://127.0.0.1:9/v2/auth/token
auth: {client_id: bench-client, key_ring: signing-keys}
connections:
- id: bench-dm
  name: Bench Clinic
  surfaces: [datamodel]
  datamodel_url: http://127.0.0.1:9/endpoint
  destination_id: 00000000-0000-4000-8000-000000000001
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(log_id: str, n: int) -> bytes:
    payload = {
        "Meta": {
            "DataModel": "Results",
            "EventType": "New",
            "EventDateTime": "2026-11-01T10:00:00.000Z",
            "Test": True,
            "Source": {"ID": "bench-source", "Name": "Bench Clinic"},
            "Destinations": [{"ID": "00000000-0000-4000-8000-000000000001", "Name": "Bench Clinic"}],
            "Logs": [{"ID": log_id, "AttemptID": str(uuid.uuid4())}],
        },
        "Patient": {"Identifiers": [{"ID": f"bench-{n % 5000}", "IDType": "MR"}]},
        "Orders": [
            {"ID": f"order-{n}", "Results": [{"Code": "2345-7", "Value": "95", "ValueType": "Numeric"}]}
        ],
    }
    return json.dumps(payload).encode()


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, data: bytes) -> int:
    """One HTTP/1.1 keep-alive POST on a raw stream (httpx's own overhead would be the
    bottleneck on two shared cores, not the receiver)."""
    writer.write(
        (
            f"POST / HTTP/1.1\r\nHost: {host}\r\nverification-token: {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        + data
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


async def _send(url: str, seconds: float, concurrency: int, dup_rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    hostport = url.split("//", 1)[1].rstrip("/")
    host, port = hostport.rsplit(":", 1)

    async def worker(w: int) -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection(host, int(port))
        n = 0
        last = None
        while time.perf_counter() < deadline:
            n += 1
            if last is not None and rng.random() < dup_rate:
                data = last
            else:
                data = body(f"{seed}-{w}-{n}", n)
                last = data
            t0 = time.perf_counter()
            status = await _post(reader, writer, hostport, data)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                failures += 1
        writer.close()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return {"latencies": latencies, "failures": failures}


def sender(
    url: str, seconds: float, concurrency: int, dup_rate: float, seed: int, out: multiprocessing.Queue
) -> None:
    out.put(asyncio.run(_send(url, seconds, concurrency, dup_rate, seed)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--senders", type=int, default=2, help="sender processes")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent connections per sender")
    ap.add_argument("--duplicate-rate", type=float, default=0.1)
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    (home / "c.yaml").write_text(CONFIG)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, HOME=str(home), REDOX_ELT_WEBHOOK_TOKEN=TOKEN)
    exe = str(Path(sys.executable).with_name("redox-elt"))
    cmd = [
        exe,
        "webhook",
        "serve",
        "--port",
        str(port),
        "--config",
        str(home / "c.yaml"),
        "--warehouse",
        str(home / "w.duckdb"),
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=home, start_new_session=True)
    try:
        for _ in range(200):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise SystemExit("the receiver exited; see its message above") from None
                time.sleep(0.1)
        out: multiprocessing.Queue = multiprocessing.Queue()
        procs = [
            multiprocessing.Process(
                target=sender, args=(url, args.seconds, args.concurrency, args.duplicate_rate, i, out)
            )
            for i in range(args.senders)
        ]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        results = [out.get() for _ in procs]
        elapsed = time.perf_counter() - t0
        for p in procs:
            p.join()
        latencies = sorted(x for r in results for x in r["latencies"])
        failures = sum(r["failures"] for r in results)
        stats = subprocess.run(
            [
                exe,
                "webhook",
                "stats",
                "--json",
                "--config",
                str(home / "c.yaml"),
                "--warehouse",
                str(home / "w.duckdb"),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        q = statistics.quantiles(latencies, n=100)
        print(f"senders {args.senders} x {args.concurrency} connections, {elapsed:.1f} s")
        print(
            f"acknowledged deliveries: {len(latencies)} ({len(latencies) / elapsed:,.0f}/s), non-200: {failures}"
        )
        print(
            f"ack latency ms: p50 {q[49] * 1000:.1f}  p95 {q[94] * 1000:.1f}  p99 {q[98] * 1000:.1f}  max {latencies[-1] * 1000:.1f}"
        )
        print(f"inbox: {stats.strip()}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
