"""Run the sandbox: in the foreground (``redox-elt sandbox serve``) or in a background
thread (tests, ``redox-elt demo``, benchmarks), always on a socket bound up front so
the base URL is known before the first request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from sandbox.app import build_state, create_app
from sandbox.config import SandboxConfig
from sandbox.state import SandboxState

log = logging.getLogger("sandbox")


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class SandboxServer:
    """A running sandbox. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(
        self,
        config: SandboxConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed_from: str | Path | None = None,
        access_log: bool = False,
    ) -> None:
        self._sock = _bind(host, port)
        bound_host, bound_port = self._sock.getsockname()[:2]
        self.url = f"http://{bound_host}:{bound_port}"
        self.state: SandboxState = build_state(config, seed_from=seed_from, base_url=self.url)
        self.app = create_app(self.state)
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(
                self.app,
                log_level="warning",
                access_log=access_log,
                lifespan="on",
                timeout_keep_alive=30,
                limit_concurrency=2048,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> SandboxConfig:
        return self.state.config

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        self._uvicorn.run(sockets=[self._sock])

    def start(self) -> SandboxServer:
        def run() -> None:
            # uvicorn only installs signal handlers in the main thread, so this is safe.
            asyncio.run(self._uvicorn.serve(sockets=[self._sock]))

        self._thread = threading.Thread(target=run, name="redox-sandbox", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("sandbox server failed to start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self.state.webhooks.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
