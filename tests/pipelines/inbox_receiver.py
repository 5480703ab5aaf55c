"""The real webhook receiver (``pipelines.inbox.receiver.create_app``) under uvicorn on a free
loopback port, for tests that let the sandbox push to it. Import ``receiver`` into a test
module to use the fixture."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn

from pipelines.inbox.receiver import create_app, settings_resolver
from pipelines.inbox.store import inbox_path
from pipelines.warehouse import WarehousePaths
from resources.settings import Settings


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling interval of a condition wait


@pytest.fixture
def receiver() -> Iterator[Callable[[Settings, WarehousePaths, str], str]]:
    """``start(settings, paths, token) -> url``; every receiver started stops with the test."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(settings: Settings, paths: WarehousePaths, token: str) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        app = create_app(inbox_path(paths), token, settings_resolver(settings))
        server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        wait_until(lambda: server.started, 30, "the receiver to start")
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}/"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)
