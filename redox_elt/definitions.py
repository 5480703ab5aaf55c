"""The Dagster code location (``[tool.dagster] module_name`` in pyproject.toml): it only
composes. Loading it starts nothing: the embedded sandbox, when no ``REDOX_ELT_CONFIG``
is set, starts inside the first run step that needs the API."""

from __future__ import annotations

import os

# Telemetry off before dlt or Dagster initialise (shared/STACK.md).
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "ERROR")

from dagster import Definitions, in_process_executor  # noqa: E402

from assets.automation import SCHEDULES, SENSORS, sync_job  # noqa: E402
from assets.checks import (  # noqa: E402
    connections_fresh,
    fhir_counts_match_source,
    patients_in_crosswalk,
    primary_keys_unique,
    quarantine_rate,
)
from assets.sync_assets import persons, redox_sync  # noqa: E402
from resources.dagster import RedoxResource, WarehouseResource  # noqa: E402


def build_definitions(
    redox: RedoxResource | None = None, warehouse: WarehouseResource | None = None
) -> Definitions:
    """The code location's definitions; tests and the CLI pass their own resources."""
    return Definitions(
        assets=[redox_sync, persons],
        asset_checks=[
            primary_keys_unique,
            patients_in_crosswalk,
            quarantine_rate,
            connections_fresh,
            fhir_counts_match_source,
        ],
        jobs=[sync_job],
        schedules=SCHEDULES,
        sensors=SENSORS,
        resources={"redox": redox or RedoxResource(), "warehouse": warehouse or WarehouseResource()},
        # One process per run: the steps share the DuckDB pool anyway, so per-step processes
        # would only add start-up time (and an embedded sandbox per step). Connections run in
        # parallel as separate runs.
        executor=in_process_executor,
    )


defs = build_definitions()
