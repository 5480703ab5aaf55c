"""Shared fixtures: a real sandbox server on a free loopback port, per test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "ERROR")

from sandbox.config import SandboxConfig  # noqa: E402
from sandbox.server import SandboxServer  # noqa: E402

TEST_PATIENTS = 200
TEST_SEED = 7
# Tests not about the quota lift it (``sandbox connect`` copies 90% of it into the client's
# budget), so CI never waits on the 5-minute window; quota tests pass ``quota_requests``.
LIFTED_QUOTA = 1_000_000


def sandbox_config(**overrides: Any) -> SandboxConfig:
    """A small, fast population with a time-scaled webhook ladder and a lifted quota."""
    base = SandboxConfig(
        seed=TEST_SEED,
        patients=TEST_PATIENTS,
        webhook_time_scale=0.001,
        webhook_timeout_s=5.0,
        quota_requests=LIFTED_QUOTA,
    )
    return replace(base, **overrides).validate()


def import_rosters(server_url: str, settings: Any, warehouse: Path, workdir: Path) -> dict[str, int]:
    """Each EHR connection's roster imported the way a user imports their own:
    ``GET /_sandbox/roster`` -> CSV -> ``panel add``. -> patients added per connection."""
    from pipelines.panel_cli import import_sandbox_rosters

    workdir.mkdir(parents=True, exist_ok=True)
    done = import_sandbox_rosters(server_url, settings, warehouse, workdir)
    return {conn_id: r.added + r.already for conn_id, r in done.items()}


@pytest.fixture
def sandbox_factory() -> Iterator[Callable[..., SandboxServer]]:
    """Start sandboxes with config overrides; all are stopped when the test ends."""
    started: list[SandboxServer] = []

    def start(**overrides: Any) -> SandboxServer:
        seed_from = overrides.pop("seed_from", None)
        server = SandboxServer(sandbox_config(**overrides), seed_from=seed_from).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def sandbox_server(sandbox_factory: Callable[..., SandboxServer]) -> SandboxServer:
    """A fresh sandbox (200 patients, seed 7) on 127.0.0.1:<free port>."""
    return sandbox_factory()
