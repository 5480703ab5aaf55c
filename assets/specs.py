"""Asset keys and specs, by layer.

* ``raw``: one asset per staged ``raw.<surface>_<entity>`` table, plus ``raw.quarantine``.
  The per-patient pull resources write them (a page feeds every table whose rows it
  holds, as dlt table variants), so each table has its own spec under its own key.
* ``normalized``: the common model ``redox.<entity>`` and the crosswalk
  ``redox.patient_identifiers``.
* ``analytics``: views across connections (``redox.persons``) and the analytics views
  (``analytics.<view>``, pipelines/analytics).

Every spec carries its column schema (``dagster/column_schema``) from the one documentation
source, pipelines/model_docs.py (assets/column_metadata.py).
"""

from __future__ import annotations

from dagster import AssetKey, AssetSpec, TableSchema

from assets.column_metadata import (
    COLUMN_SCHEMA,
    crosswalk_table_schema,
    normalized_table_schema,
    quarantine_table_schema,
    relation_schema,
    staged_table_schema,
)
from pipelines.model import CHILD_KEY, ENTITIES, ENTITY_KEY
from pipelines.publish import SURFACES
from pipelines.sync_runs import CROSSWALK_TABLE
from pipelines.vocabulary import CHILD_TABLES

OWNERS = ["team:data-platform"]
RAW_GROUP, NORMALIZED_GROUP, ANALYTICS_GROUP = "raw", "normalized", "analytics"
CROSSWALK = CROSSWALK_TABLE

QUARANTINE_KEY = AssetKey(["raw", "quarantine"])
CROSSWALK_KEY = AssetKey(["redox", CROSSWALK])
PERSONS_KEY = AssetKey(["analytics", "persons"])
COLUMN_LINEAGE = "dagster/column_lineage"


def schema_metadata(schema: TableSchema) -> dict[str, TableSchema]:
    return {COLUMN_SCHEMA: schema}


_SURFACE_TITLE = {"fhir": "FHIR R4", "datamodel": "Data Model"}


def raw_key(surface: str, entity: str) -> AssetKey:
    return AssetKey(["raw", surface, entity])


def normalized_key(entity: str) -> AssetKey:
    return AssetKey(["redox", entity])


PANEL_KEY = AssetKey(["ops", "patient_panel"])


def panel_spec() -> AssetSpec:
    """Who is pulled: the patient panel, upstream of every staged table. The sync run
    maintains it first (roster rows resolved, discovery, events, due marks; a backfill window
    makes the patients with activity in it due), then pulls the due patients."""
    return AssetSpec(
        key=PANEL_KEY,
        group_name=RAW_GROUP,
        owners=OWNERS,
        kinds={"duckdb"},
        metadata=schema_metadata(relation_schema("patient_panel")),
        description=(
            "The patient panel (ops.patient_panel): one row per connection and patient, how it was "
            "found (roster, discovery windows, census, events, bulk, network match) and when it is due. "
            "Metadata: counts only."
        ),
    )


def raw_spec(surface: str, entity: str) -> AssetSpec:
    """The asset of one staged table ``raw.<surface>_<entity>`` (written by the dlt pull
    resources; a page feeds every table whose rows it holds, as dlt table variants)."""
    return AssetSpec(
        key=raw_key(surface, entity),
        deps=[PANEL_KEY],
        group_name=RAW_GROUP,
        owners=OWNERS,
        kinds={"dlt", "duckdb"},
        metadata=schema_metadata(staged_table_schema(entity)),
        description=(
            f"Staged {_SURFACE_TITLE[surface]} {entity} rows, one per record per connection "
            f"(table raw.{surface}_{entity}, merged on connection_id + business key)."
        ),
    )


def raw_specs() -> list[AssetSpec]:
    """One spec per (surface, entity), plus the quarantine."""
    specs = [raw_spec(surface, entity) for surface in SURFACES for entity in ENTITIES]
    specs.append(
        AssetSpec(
            key=QUARANTINE_KEY,
            group_name=RAW_GROUP,
            owners=OWNERS,
            kinds={"dlt", "duckdb"},
            metadata=schema_metadata(quarantine_table_schema()),
            description="Payloads that could not be normalized: reason and raw_ref only, never the payload.",
        )
    )
    return specs


def normalized_specs() -> list[AssetSpec]:
    specs = [
        AssetSpec(
            key=CROSSWALK_KEY,
            group_name=NORMALIZED_GROUP,
            owners=OWNERS,
            kinds={"duckdb", "sql"},
            deps=[raw_key(s, "patients") for s in SURFACES],
            metadata=schema_metadata(crosswalk_table_schema()),
            description=(
                "The identity crosswalk: every identifier seen (FHIR id, MR, EHRID, NIST, EPI) -> patient_key, "
                "keyed by (connection_id, id_system, id_value)."
            ),
        )
    ]
    for entity in ENTITIES:
        deps = [raw_key(s, entity) for s in SURFACES]
        if entity != "patients":
            deps.append(CROSSWALK_KEY)
        specs.append(
            AssetSpec(
                key=normalized_key(entity),
                group_name=NORMALIZED_GROUP,
                owners=OWNERS,
                kinds={"duckdb", "sql"},
                deps=deps,
                metadata=schema_metadata(normalized_table_schema(entity)),
                description=(
                    f"The common model's {entity}: one row per (connection_id, "
                    f"{'patient_key' if entity == 'patients' else ENTITY_KEY[entity]}), both surfaces reconciled."
                ),
            )
        )
    for child, parent in CHILD_TABLES.items():
        specs.append(
            AssetSpec(
                key=normalized_key(child),
                group_name=NORMALIZED_GROUP,
                owners=OWNERS,
                kinds={"duckdb", "sql"},
                deps=[normalized_key(parent)],
                description=(
                    f"Child table of redox.{parent}: one row per ({', '.join(CHILD_KEY[child])}), "
                    f"rebuilt with its parent's rows on every publish."
                ),
            )
        )
    return specs


RAW_KEYS = [raw_key(s, e) for s in SURFACES for e in ENTITIES]
NORMALIZED_KEYS = [normalized_key(e) for e in (*ENTITIES, *CHILD_TABLES)]
