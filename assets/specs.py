"""Asset keys and specs, by layer.

* ``raw``: one asset per staged ``raw.<surface>_<entity>`` table, plus ``raw.quarantine``.
  Their specs come from the dlt sources through a ``dagster-dlt`` translator, so keys,
  kinds and descriptions follow the dlt resources that write them. The Data Model's
  visit query writes several tables at once (dlt table variants: its Patient blocks,
  Clinical Summary medications and Notes/Media documents), so those tables get the
  spec of the resource that writes them, under their own key.
* ``normalized``: the common model ``redox.<entity>`` and the crosswalk
  ``redox.patient_identifiers``.
* ``analytics``: views across connections (``redox.persons``).
"""

from __future__ import annotations

from dagster import AssetKey, AssetSpec
from dagster_dlt import DagsterDltTranslator
from dagster_dlt.translator import DltResourceTranslatorData
from dlt.extract.resource import DltResource

from pipelines.datamodel import datamodel_source
from pipelines.fhir import fhir_source
from pipelines.model import ENTITIES, ENTITY_KEY
from pipelines.publish import SURFACES
from pipelines.sync_runs import CROSSWALK_TABLE

OWNERS = ["team:data-platform"]
RAW_GROUP, NORMALIZED_GROUP, ANALYTICS_GROUP = "raw", "normalized", "analytics"
CROSSWALK = CROSSWALK_TABLE

QUARANTINE_KEY = AssetKey(["raw", "quarantine"])
CROSSWALK_KEY = AssetKey(["redox", CROSSWALK])
PERSONS_KEY = AssetKey(["analytics", "persons"])

_SURFACE_TITLE = {"fhir": "FHIR R4", "datamodel": "Data Model"}


def raw_key(surface: str, entity: str) -> AssetKey:
    return AssetKey(["raw", surface, entity])


def normalized_key(entity: str) -> AssetKey:
    return AssetKey(["redox", entity])


class StagedTableTranslator(DagsterDltTranslator):
    """Maps a dlt resource of our sources to the asset of the staged table it writes."""

    def get_asset_spec(self, data: DltResourceTranslatorData) -> AssetSpec:
        return self.spec_for_table(data.resource, data.resource.name)

    def spec_for_table(self, resource: DltResource, entity: str) -> AssetSpec:
        surface = resource.source_name
        base = super().get_asset_spec(DltResourceTranslatorData(resource=resource, pipeline=None))
        writer = (
            ""
            if resource.name == entity
            else f" (written by the {resource.name} resource as a table variant)"
        )
        return base.replace_attributes(
            key=raw_key(surface, entity),
            deps=[],
            group_name=RAW_GROUP,
            owners=OWNERS,
            kinds={"dlt", "duckdb"},
            description=(
                f"Staged {_SURFACE_TITLE[surface]} {entity} rows, one per record per connection "
                f"(table raw.{surface}_{entity}, merged on connection_id + business key){writer}."
            ),
        )


def raw_specs() -> list[AssetSpec]:
    """One spec per (surface, entity), derived from the dlt sources' resources."""
    translator = StagedTableTranslator()
    # Building a source only declares its resources: no client is called.
    fhir = fhir_source(None, None, "spec")
    ehr_dm = datamodel_source(None, None, "spec")
    network_dm = datamodel_source(None, None, "spec", entities=("patients", "documents"))
    specs = [
        translator.get_asset_spec(DltResourceTranslatorData(resource=r, pipeline=None))
        for r in fhir.resources.values()
    ]
    dm_resources = {**network_dm.resources, **ehr_dm.resources}  # the EHR visit query writes documents too
    for entity in ENTITIES:
        resource = dm_resources.get(entity, ehr_dm.resources["encounters"])
        specs.append(translator.spec_for_table(resource, entity))
    specs.append(
        AssetSpec(
            key=QUARANTINE_KEY,
            group_name=RAW_GROUP,
            owners=OWNERS,
            kinds={"dlt", "duckdb"},
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
                description=(
                    f"The common model's {entity}: one row per (connection_id, "
                    f"{'patient_key' if entity == 'patients' else ENTITY_KEY[entity]}), both surfaces reconciled."
                ),
            )
        )
    return specs


RAW_KEYS = [raw_key(s, e) for s in SURFACES for e in ENTITIES]
NORMALIZED_KEYS = [normalized_key(e) for e in ENTITIES]
