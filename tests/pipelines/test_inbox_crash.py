"""A receiver SIGKILLed mid-stream, while the sandbox pushes both payload families with 30%
duplicates and reordering: after a restart, the inbox holds exactly the distinct messages
the sandbox delivered, each once (durable before acknowledged, de-duplicated on redelivery)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from tests.pipelines.test_inbox import settings

TOKEN = "crash-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling interval of a condition wait, not a wait in itself


def test_sigkilled_receiver_stores_every_distinct_message_exactly_once(
    sandbox_factory, tmp_path: Path
) -> None:
    exe = str(Path(sys.executable).with_name("redox-elt"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(settings().to_dict()))
    warehouse = tmp_path / "w.duckdb"
    env = dict(os.environ, HOME=str(tmp_path), REDOX_ELT_WEBHOOK_TOKEN=TOKEN)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(
            [
                exe,
                "webhook",
                "serve",
                "--port",
                str(port),
                "--config",
                str(config),
                "--warehouse",
                str(warehouse),
            ],
            env=env,
            cwd=tmp_path,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "receiver exited"
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "the receiver to answer")
        return proc

    def inbox_stats() -> dict[str, int]:
        out = subprocess.run(
            [exe, "webhook", "stats", "--json", "--config", str(config), "--warehouse", str(warehouse)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    server = sandbox_factory(patients=120, webhook_fhir=True)
    receiver = start()
    try:
        r = httpx.post(f"{server.url}/_sandbox/webhooks", json={"url": url, "token": TOKEN}, timeout=30)
        assert r.status_code == 200, r.text
        httpx.post(
            f"{server.url}/_sandbox/faults", json={"webhook_duplicate_rate": 0.3, "webhook_reorder": True}
        )
        # A long stream (several hundred events) and a kill right after the first stored ones, so
        # the receiver dies mid-stream even on an idle machine.
        httpx.post(f"{server.url}/_sandbox/advance", json={"days": 6, "change_fraction": 0.2}, timeout=120)
        wait_until(lambda: inbox_stats()["distinct_messages"] >= 2, 60, "the first deliveries")
        os.killpg(receiver.pid, signal.SIGKILL)
        receiver.wait()
        mid = httpx.get(f"{server.url}/_sandbox/truth", params={"persons": "false"}).json()["webhooks"]
        assert mid["pending"] > 0, "the stream finished before the kill; nothing was tested"
        receiver = start()

        def delivered() -> bool:
            return (
                httpx.get(f"{server.url}/_sandbox/truth", params={"persons": "false"}).json()["webhooks"][
                    "pending"
                ]
                == 0
            )

        wait_until(delivered, 120, "the sandbox to deliver everything")
        truth = httpx.get(f"{server.url}/_sandbox/truth", params={"persons": "false"}).json()["webhooks"]
        got = inbox_stats()
        assert got["distinct_messages"] == truth["distinct_sent"] > 10
        assert got["duplicates_dropped"] > 0
        assert got["quarantined"] == 0
    finally:
        if receiver.poll() is None:
            os.killpg(receiver.pid, signal.SIGTERM)
            receiver.wait(timeout=30)
