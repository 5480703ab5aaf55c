"""Shared fixtures: a real sandbox server on a free loopback port, per test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "ERROR")

from sandbox.config import SandboxConfig  # noqa: E402
from sandbox.server import SandboxServer  # noqa: E402

TEST_PATIENTS = 200
TEST_SEED = 7


def sandbox_config(**overrides: Any) -> SandboxConfig:
    """A small, fast population with a time-scaled webhook ladder."""
    base = SandboxConfig(
        seed=TEST_SEED, patients=TEST_PATIENTS, webhook_time_scale=0.001, webhook_timeout_s=5.0
    )
    return replace(base, **overrides).validate()


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
