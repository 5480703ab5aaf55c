"""What every column of the common model means, and where each surface keeps it.

The single source of column documentation: DuckDB ``COMMENT``s on the warehouse tables,
Dagster ``dagster/column_schema`` metadata and the column tables in ``warehouse/README.md``
are all generated from this mapping, so the three never disagree. A column of
``pipelines/model.py`` without an entry here is a defect (a test checks it).

Shape: ``COLUMN_DOCS[table][column] = ColumnDoc(description, fhir_path, datamodel_field)``;
``fhir_path`` / ``datamodel_field`` are ``""`` where a surface does not carry the column.
"""

from __future__ import annotations

from typing import NamedTuple


class ColumnDoc(NamedTuple):
    description: str
    fhir_path: str = ""
    datamodel_field: str = ""


# Lineage columns lead every table of the common model (pipelines/model.py LINEAGE).
LINEAGE_DOCS: dict[str, ColumnDoc] = {
    "connection_id": ColumnDoc("The Redox connection (one EHR or network) the row came from."),
    "patient_key": ColumnDoc(
        "The patient inside the connection, resolved through redox.patient_identifiers."
    ),
    "source_surface": ColumnDoc("Which Redox API the row was seen through: fhir, datamodel or both."),
    "source_id": ColumnDoc(
        "The record's id on the surface it was first seen through.", "Resource.id", "record id"
    ),
    "source_updated_at": ColumnDoc(
        "The source's own last-updated or clinical time of this version (never the query time).",
        "Resource.meta.lastUpdated",
        "Meta.EventDateTime / record timestamp",
    ),
    "ingested_at": ColumnDoc("When this pipeline staged the row (UTC)."),
    "raw_ref": ColumnDoc("The landing file under responses/ holding the payload the row came from."),
}

COLUMN_DOCS: dict[str, dict[str, ColumnDoc]] = {
    # --- the original six entities and the crosswalk (issue 13 fills these) ---
    # --- clinical record tables (issue 12) ---
}
