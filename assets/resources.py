"""Dagster resources over the plain-Python settings and warehouse.

Which Redox the code location talks to is a choice made once, in
``redox_elt/definitions.py``, between two implementations of ``RedoxResource`` (the
pattern of Dagster's example projects: one interface, a resource per backend):

* ``ConnectionsFileResource``: a connections file (real Redox or a running sandbox).
* ``EmbeddedSandboxResource``: the first run step that needs the API starts the sandbox
  in a background thread and registers with it, exactly like ``redox-elt demo`` —
  lazily, so loading the code location (``dagster dev``) never pays for it. It is
  deterministic from its seed, so every run process serves the same population.

Nothing here reads the environment: the code location's edge does, and passes values in.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from pipelines.warehouse import DEFAULT_WAREHOUSE, WarehousePaths
from resources.settings import Settings, load_settings

log = logging.getLogger(__name__)

# The client name the embedded sandbox registers; re-registering replaces its JWKS.
EMBEDDED_CLIENT_NAME = "redox-elt-dagster"


@dataclass(frozen=True)
class ConnectionInfo:
    """What schedules, sensors and checks need to know about a connection, without any secret."""

    id: str
    kind: str  # "ehr" | "network"
    surfaces: tuple[str, ...]


class RedoxResource(ConfigurableResource):
    """The Redox connections a code location serves. Subclasses say where they come from."""

    def connections(self) -> list[ConnectionInfo]:
        """The connections, read without touching the network (schedules and sensors)."""
        raise NotImplementedError

    def settings(self) -> Settings:
        """The loaded settings a run step syncs with."""
        raise NotImplementedError


class ConnectionsFileResource(RedoxResource):
    """A connections file (``redox-elt sandbox connect`` or a hand-written one)."""

    config_path: str = Field(description="The connections file (YAML).")

    def connections(self) -> list[ConnectionInfo]:
        return [ConnectionInfo(c.id, c.kind, tuple(c.surfaces)) for c in self.settings().connections]

    def settings(self) -> Settings:
        return load_settings(self.config_path)


class EmbeddedSandboxResource(RedoxResource):
    """The embedded sandbox, started on first use inside a run step and stopped after it."""

    patients: int = Field(description="Population size.")
    seed: int = Field(description="Population seed.")

    _settings: Settings | None = PrivateAttr(default=None)
    _server: Any = PrivateAttr(default=None)
    _workdir: str | None = PrivateAttr(default=None)

    def connections(self) -> list[ConnectionInfo]:
        # The sandbox's connections are data: listing them starts no server.
        from sandbox.config import load_config

        config = load_config(None)
        return [ConnectionInfo(c.id, c.kind, tuple(c.surfaces)) for c in config.connections]

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = self._start()
        return self._settings

    def _start(self) -> Settings:
        from resources.onboarding import connect_sandbox
        from sandbox.config import load_config
        from sandbox.server import SandboxServer

        config = load_config(None, patients=self.patients, seed=self.seed)
        self._server = SandboxServer(config).start()
        self._workdir = tempfile.mkdtemp(prefix="redox-elt-dagster-")
        log.info("embedded sandbox on %s (%d patients, seed %d)", self._server.url, self.patients, self.seed)
        try:
            path = connect_sandbox(
                self._server.url, Path(self._workdir) / "connections.yaml", name=EMBEDDED_CLIENT_NAME
            )
            return load_settings(path)
        except Exception:
            self.close()
            raise

    @property
    def started(self) -> bool:
        return self._server is not None

    def close(self) -> None:
        """Stop the sandbox, if this resource started one."""
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
    """Where syncs write: a DuckDB file (or a directory holding one), optionally mirrored
    as a Parquet lake."""

    path: str = Field(default=str(DEFAULT_WAREHOUSE), description="DuckDB file or directory.")
    destination: str = Field(default="duckdb", description="'duckdb' or 'parquet' (a lake beside it).")

    def paths(self) -> WarehousePaths:
        return WarehousePaths.at(self.path, self.destination)


class CheckThresholds(ConfigurableResource):
    """What the warehouse checks accept."""

    max_sync_age_hours: float = Field(description="A connection not synced successfully for longer is stale.")
    max_quarantine_rate: float = Field(description="Largest quarantined share of a connection's items.")
