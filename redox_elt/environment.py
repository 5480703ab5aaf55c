"""The ``REDOX_ELT_*`` environment, read once at the edge (the CLI entry point and the
Dagster code location) and passed down as values: nothing below the edge reads it.

The vault's own defaults (``REDOX_ELT_HOME``, ``REDOX_ELT_MASTER_KEY``) stay with the
vault (``resources/settings.py``, ``resources/vault.py``), which reads them when a vault
is opened, never at import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from resources.settings import CONFIG_ENV

WAREHOUSE_ENV = "REDOX_ELT_WAREHOUSE"
SANDBOX_PATIENTS_ENV = "REDOX_ELT_SANDBOX_PATIENTS"
SANDBOX_SEED_ENV = "REDOX_ELT_SANDBOX_SEED"
PARTITIONS_START_ENV = "REDOX_ELT_PARTITIONS_START"
SYNC_CRON_ENV = "REDOX_ELT_SYNC_CRON"
NETWORK_SYNC_CRON_ENV = "REDOX_ELT_NETWORK_SYNC_CRON"
RECONCILE_CRON_ENV = "REDOX_ELT_RECONCILE_CRON"
RECONCILE_DAYS_ENV = "REDOX_ELT_RECONCILE_DAYS"
MAX_SYNC_AGE_ENV = "REDOX_ELT_MAX_SYNC_AGE_HOURS"
MAX_QUARANTINE_RATE_ENV = "REDOX_ELT_MAX_QUARANTINE_RATE"
POOL_WAIT_ENV = "REDOX_ELT_POOL_WAIT_S"

_KIND_NAMES = {int: "a whole number", float: "a number"}

# Dagster's own: set means "a real deployment" (the instance persists runs and pool slots).
DAGSTER_HOME_ENV = "DAGSTER_HOME"


class EnvironmentValueError(ValueError):
    """A ``REDOX_ELT_*`` value that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class Environment:
    """Every setting the environment can give, with its default."""

    config_path: str | None = None  # a connections file; None: the embedded sandbox
    warehouse: str | None = None  # None: warehouse/redox.duckdb under the working directory
    sandbox_patients: int = 1000
    sandbox_seed: int = 42
    # The first day a backfill can ask for. The embedded sandbox keeps 730 days of history
    # before its fixed clock (2026-11-01); real deployments set their own.
    partitions_start: str = "2024-11-01"
    sync_cron: str = "0 * * * *"
    # Networks half an hour after the EHRs: they are asked about the ids the EHRs loaded.
    network_sync_cron: str = "30 * * * *"
    reconcile_cron: str = "0 4 * * *"
    reconcile_days: int = 3
    max_sync_age_hours: float = 26.0  # the daily reconciliation plus slack
    max_quarantine_rate: float = 0.01
    pool_wait_s: float = 900.0  # how long a CLI sync waits for the warehouse's pool slot
    dagster_home: str | None = None

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Environment:
        """Parse the environment (``os.environ`` by default); a bad value raises one line."""
        env = os.environ if environ is None else environ
        d = cls()

        def text(name: str, default: str | None) -> str | None:
            value = env.get(name, "").strip()
            return value or default

        def number(name: str, default: float, kind: type, low: float, high: float) -> Any:
            raw = text(name, None)
            if raw is None:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise EnvironmentValueError(f"${name}: not {_KIND_NAMES[kind]}: {raw!r}") from None
            if not (isinstance(value, int) or math.isfinite(value)) or not low <= value <= high:
                raise EnvironmentValueError(f"${name}: must be between {low:g} and {high:g}, got {raw!r}")
            return value

        def cron(name: str, default: str) -> str:
            value = text(name, None)
            if value is None:
                return default
            from dagster._utils.schedules import is_valid_cron_string  # only when one is set

            if not is_valid_cron_string(value):
                raise EnvironmentValueError(f"${name}: not a cron expression: {value!r} (e.g. '0 * * * *')")
            return value

        start = text(PARTITIONS_START_ENV, d.partitions_start) or d.partitions_start
        try:
            date.fromisoformat(start)
        except ValueError:
            raise EnvironmentValueError(
                f"${PARTITIONS_START_ENV}: not a YYYY-MM-DD date: {start!r}"
            ) from None
        return cls(
            config_path=text(CONFIG_ENV, None),
            warehouse=text(WAREHOUSE_ENV, None),
            sandbox_patients=number(SANDBOX_PATIENTS_ENV, d.sandbox_patients, int, 1, 10_000_000),
            sandbox_seed=number(SANDBOX_SEED_ENV, d.sandbox_seed, int, 0, 2**31 - 1),
            partitions_start=start,
            sync_cron=cron(SYNC_CRON_ENV, d.sync_cron),
            network_sync_cron=cron(NETWORK_SYNC_CRON_ENV, d.network_sync_cron),
            reconcile_cron=cron(RECONCILE_CRON_ENV, d.reconcile_cron),
            reconcile_days=number(RECONCILE_DAYS_ENV, d.reconcile_days, int, 1, 366),
            max_sync_age_hours=number(MAX_SYNC_AGE_ENV, d.max_sync_age_hours, float, 0.0, 1e6),
            max_quarantine_rate=number(MAX_QUARANTINE_RATE_ENV, d.max_quarantine_rate, float, 0.0, 1.0),
            pool_wait_s=number(POOL_WAIT_ENV, d.pool_wait_s, float, 0.0, 86_400.0),
            dagster_home=text(DAGSTER_HOME_ENV, None),
        )


# Files the project writes hold PHI (warehouse, landing, vault, config): owner-only.
OWNER_ONLY_UMASK = 0o077


def harden_process() -> None:
    """What every entry point does first: owner-only files, no telemetry, quiet dlt."""
    os.umask(OWNER_ONLY_UMASK)
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    # dlt warns on every Arrow batch whose nullability differs from its schema hints; the
    # batches are built from fixed schemas, so keep dlt's log to errors.
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "ERROR")
