"""The analytics layer in Dagster: one asset per analytics view (``analytics.<view>``,
pipelines/analytics), downstream of the common model.

The views are SQL over the model, so a materialization does not copy data: it makes sure
each view exists with the current definition (publish does too, so a CLI sync leaves them in
place), counts its rows and records the column lineage. They refresh automatically after a
sync once the blocking checks upstream have passed, like ``analytics/persons``.
"""

from collections.abc import Iterator

import duckdb
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from assets.column_metadata import relation_schema, view_lineage
from assets.resources import WarehouseResource
from assets.specs import (
    ANALYTICS_GROUP,
    COLUMN_LINEAGE,
    OWNERS,
    PERSONS_KEY,
    normalized_key,
    schema_metadata,
)
from assets.sync_assets import DUCKDB_POOL
from pipelines.analytics import ANALYTICS_VIEWS, analytics_schema
from pipelines.analytics.views import VIEW_QUESTIONS, VIEW_SOURCES
from pipelines.model import ENTITIES
from pipelines.publish import ensure_model_tables, model_schema
from pipelines.warehouse import WriterLock


def analytics_key(view: str) -> AssetKey:
    return AssetKey(["analytics", view])


ANALYTICS_KEYS = [analytics_key(v) for v in ANALYTICS_VIEWS]
# Model table -> asset, for column lineage.
MODEL_KEYS: dict[str, AssetKey] = {e: normalized_key(e) for e in ENTITIES} | {"persons": PERSONS_KEY}


def _deps(view: str) -> list[AssetKey]:
    main, overrides = VIEW_SOURCES[view]
    tables = {main} | {t for sources in overrides.values() for t, _ in sources}
    return sorted({MODEL_KEYS[t] for t in tables if t in MODEL_KEYS} | {PERSONS_KEY}, key=str)


def analytics_specs() -> list[AssetSpec]:
    return [
        AssetSpec(
            key=analytics_key(view),
            deps=_deps(view),
            group_name=ANALYTICS_GROUP,
            owners=OWNERS,
            kinds={"duckdb", "sql"},
            description=f"{VIEW_QUESTIONS[view]} (view analytics.{view})",
            metadata=schema_metadata(relation_schema(view)),
            # Refreshed after the sync, once the blocking checks upstream have passed.
            automation_condition=AutomationCondition.eager()
            & AutomationCondition.all_deps_blocking_checks_passed(),
            skippable=True,
        )
        for view in ANALYTICS_VIEWS
    ]


@multi_asset(
    name="analytics_views",
    specs=analytics_specs(),
    can_subset=True,
    pool=DUCKDB_POOL,
    description="Create or update the analytics views over the common model and count their rows.",
)
def analytics_views(
    context: AssetExecutionContext, warehouse: WarehouseResource
) -> Iterator[MaterializeResult]:
    paths = warehouse.paths()
    with WriterLock(paths), duckdb.connect(str(paths.duckdb)) as con:
        ensure_model_tables(con)  # creates or updates the views (pipelines/analytics)
        schema = analytics_schema(con)
        ms = model_schema(con)
        counts = {}
        for view in ANALYTICS_VIEWS:
            if analytics_key(view) in context.selected_asset_keys:
                counts[view] = con.execute(f"SELECT count(*) FROM {schema}.{view}").fetchall()[0][0]
    for view, n in counts.items():
        yield MaterializeResult(
            asset_key=analytics_key(view),
            metadata={
                "dagster/row_count": MetadataValue.int(int(n)),
                "view": MetadataValue.text(f"{schema}.{view}"),
                "model_schema": MetadataValue.text(ms),
                COLUMN_LINEAGE: view_lineage(view, MODEL_KEYS),
            },
        )
