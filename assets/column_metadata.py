"""Column schemas (``dagster/column_schema``) and column lineage (``dagster/column_lineage``)
of the assets, from the same documentation source as the warehouse's COMMENTs
(``pipelines/model_docs.py``).

Types come from the Arrow schemas of ``pipelines/model.py``; the views' and the panel's from
an empty in-memory DuckDB built with the same DDL the warehouse gets (once per process).
"""

from __future__ import annotations

import pyarrow as pa
from dagster import AssetKey, AssetSpec, TableColumn, TableColumnDep, TableColumnLineage, TableSchema

from pipelines.analytics import relation_columns
from pipelines.analytics.views import VIEW_SOURCES
from pipelines.model import PATIENT_REF, identifiers_schema, published_schema, staged_schema
from pipelines.model_docs import column_doc, type_name
from pipelines.vocabulary import CROSSWALK_TABLE, ENTITIES

COLUMN_SCHEMA = "dagster/column_schema"
PATIENT_REF_DOCS = {
    "patient_ref_type": "How the staged row names its patient: fhir (logical id), MR or another identifier type.",
    "patient_ref_value": "That identifier's value; the crosswalk resolves it to patient_key at publish.",
}


def _column(doc_table: str, name: str, column_type: str) -> TableColumn:
    doc = column_doc(doc_table, name)
    description = doc.description if doc else PATIENT_REF_DOCS.get(name)
    return TableColumn(name=name, type=column_type, description=description)


def arrow_table_schema(doc_table: str, schema: pa.Schema) -> TableSchema:
    return TableSchema(columns=[_column(doc_table, f.name, type_name(f.type)) for f in schema])


def staged_table_schema(entity: str) -> TableSchema:
    """``raw.<surface>_<entity>``: the staged columns (dlt adds its _dlt_* columns)."""
    assert {c for c, _ in PATIENT_REF} <= set(PATIENT_REF_DOCS)
    return arrow_table_schema(entity, staged_schema(entity))


def quarantine_table_schema() -> TableSchema:
    from pipelines.quarantine import quarantine_schema

    return arrow_table_schema("quarantine", quarantine_schema())


def normalized_table_schema(entity: str) -> TableSchema:
    return arrow_table_schema(entity, published_schema(entity))


def crosswalk_table_schema() -> TableSchema:
    return arrow_table_schema(CROSSWALK_TABLE, identifiers_schema())


def relation_schema(name: str) -> TableSchema:
    """The column schema of ``persons``, an analytics view, or ``patient_panel``."""
    return TableSchema(columns=[_column(name, c, t) for c, t in relation_columns()[name]])


def normalized_lineage(
    entity: str, staged_keys: list[AssetKey], crosswalk_key: AssetKey
) -> TableColumnLineage:
    """Each column of ``redox.<entity>`` comes from the same column of the staged tables; the
    patient key of a non-patient row from the crosswalk (and from the MRN for patients)."""
    deps: dict[str, list[TableColumnDep]] = {}
    for f in published_schema(entity):
        if f.name == "patient_key":
            if entity == "patients":
                deps[f.name] = [TableColumnDep(asset_key=k, column_name="mrn") for k in staged_keys]
            else:
                deps[f.name] = [
                    TableColumnDep(asset_key=crosswalk_key, column_name="patient_key"),
                    *(
                        TableColumnDep(asset_key=k, column_name=c)
                        for k in staged_keys
                        for c, _ in PATIENT_REF
                    ),
                ]
        else:
            deps[f.name] = [TableColumnDep(asset_key=k, column_name=f.name) for k in staged_keys]
    return TableColumnLineage(deps_by_column=deps)


def view_lineage(view: str, key_of: dict[str, AssetKey]) -> TableColumnLineage:
    """Column lineage of an analytics view (``VIEW_SOURCES``); ``key_of`` maps a model
    table name to its asset key."""
    main, overrides = VIEW_SOURCES[view]
    main_columns = {f.name for f in published_schema(main)} if main in ENTITIES else set()
    deps: dict[str, list[TableColumnDep]] = {}
    for column, _ in relation_columns()[view]:
        sources = overrides.get(column)
        if sources is None:
            sources = [(main, column)] if column in main_columns else []
        picked = [TableColumnDep(asset_key=key_of[t], column_name=c) for t, c in sources if t in key_of]
        if picked:
            deps[column] = picked
    return TableColumnLineage(deps_by_column=deps)


def _schema_for_key(path: list[str]) -> TableSchema | None:
    """The column schema of a ``redox/<table>`` asset from the model's Arrow schemas: an
    entity, the crosswalk, or a child table where the model has them."""
    import pipelines.model as model

    if len(path) != 2 or path[0] != "redox":
        return None
    table = path[1]
    if table in model.ENTITY_COLUMNS:
        return normalized_table_schema(table)
    if table == CROSSWALK_TABLE:
        return crosswalk_table_schema()
    child_columns = getattr(model, "CHILD_COLUMNS", {})
    if table in child_columns:
        return arrow_table_schema(table, pa.schema(child_columns[table]))
    return None


def with_column_schemas(specs: list[AssetSpec]) -> list[AssetSpec]:
    """``specs`` with ``dagster/column_schema`` filled in where a spec lacks it and the model
    knows the table (so a table added to the model gets its schema without a spec edit)."""
    out = []
    for spec in specs:
        schema = None if COLUMN_SCHEMA in (spec.metadata or {}) else _schema_for_key(list(spec.key.path))
        out.append(spec.merge_attributes(metadata={COLUMN_SCHEMA: schema}) if schema is not None else spec)
    return out
