"""Dagster resources over the plain-Python settings and warehouse.

Which Redox the code location talks to is configuration, not code: ``REDOX_ELT_CONFIG``
names a connections file (real Redox or a running sandbox). Without it, the first run
step that needs the API starts the embedded sandbox in a background thread and
registers with it, exactly like ``redox-elt demo`` — lazily, so loading the code
location (``dagster dev``) never pays for it. The embedded sandbox is deterministic from
its seed, so every run process serves the same population.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from pipelines.warehouse import DEFAULT_WAREHOUSE, WarehousePaths
from resources.settings import CONFIG_ENV, Settings, load_settings

log = logging.getLogger(__name__)

WAREHOUSE_ENV = "REDOX_ELT_WAREHOUSE"
SANDBOX_PATIENTS_ENV = "REDOX_ELT_SANDBOX_PATIENTS"
DEFAULT_SANDBOX_PATIENTS = 1000
DEFAULT_SANDBOX_SEED = 42
# The client name the embedded sandbox registers; re-registering replaces its JWKS.
EMBEDDED_CLIENT_NAME = "redox-elt-dagster"


@dataclass(frozen=True)
class ConnectionInfo:
    """What schedules and sensors need to know about a connection, without any secret."""

    id: str
    kind: str  # "ehr" | "network"
    surfaces: tuple[str, ...]


def configured_connections(config_path: str | None = None) -> list[ConnectionInfo]:
    """The connections the code location serves, read without touching the network.

    ``config_path`` or ``$REDOX_ELT_CONFIG`` when set; otherwise the embedded sandbox's
    default connections (its config is data, so no server is started to list them).
    """
    chosen = config_path or os.environ.get(CONFIG_ENV)
    if chosen:
        settings = load_settings(chosen)
        return [ConnectionInfo(c.id, c.kind, tuple(c.surfaces)) for c in settings.connections]
    from sandbox.config import load_config

    config = load_config(None)
    return [ConnectionInfo(c.id, c.kind, tuple(c.surfaces)) for c in config.connections]


class RedoxResource(ConfigurableResource):
    """The connections config, or the embedded sandbox when none is configured.

    ``config_path`` empty means ``$REDOX_ELT_CONFIG``; both empty means the embedded
    sandbox (``sandbox_patients`` patients, ``sandbox_seed``).
    """

    config_path: str | None = None
    sandbox_patients: int | None = None
    sandbox_seed: int = DEFAULT_SANDBOX_SEED

    _settings: Settings | None = PrivateAttr(default=None)
    _server: Any = PrivateAttr(default=None)
    _workdir: str | None = PrivateAttr(default=None)

    @property
    def uses_embedded_sandbox(self) -> bool:
        return not (self.config_path or os.environ.get(CONFIG_ENV))

    def settings(self) -> Settings:
        """The loaded settings; starts and registers with the embedded sandbox on first use."""
        if self._settings is None:
            chosen = self.config_path or os.environ.get(CONFIG_ENV)
            self._settings = load_settings(chosen) if chosen else self._start_embedded_sandbox()
        return self._settings

    def _start_embedded_sandbox(self) -> Settings:
        from resources.onboarding import connect_sandbox
        from sandbox.config import load_config
        from sandbox.server import SandboxServer

        patients = self.sandbox_patients or int(
            os.environ.get(SANDBOX_PATIENTS_ENV, DEFAULT_SANDBOX_PATIENTS)
        )
        config = load_config(None, patients=patients, seed=self.sandbox_seed)
        self._server = SandboxServer(config).start()
        self._workdir = tempfile.mkdtemp(prefix="redox-elt-dagster-")
        log.info(
            "embedded sandbox on %s (%d patients, seed %d)", self._server.url, patients, self.sandbox_seed
        )
        try:
            path = connect_sandbox(
                self._server.url, Path(self._workdir) / "connections.yaml", name=EMBEDDED_CLIENT_NAME
            )
            return load_settings(path)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Stop the embedded sandbox, if this resource started one."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._settings = None

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        self.close()


class WarehouseResource(ConfigurableResource):
    """Where syncs write: a DuckDB file (default ``warehouse/redox.duckdb`` under the
    working directory, or ``$REDOX_ELT_WAREHOUSE``), optionally mirrored as a Parquet lake."""

    path: str | None = None
    destination: str = "duckdb"

    def paths(self) -> WarehousePaths:
        chosen = self.path or os.environ.get(WAREHOUSE_ENV) or str(DEFAULT_WAREHOUSE)
        return WarehousePaths.at(chosen, self.destination)


__all__ = [
    "ConnectionInfo",
    "RedoxResource",
    "WarehouseResource",
    "configured_connections",
]
