"""The common model: one fixed Arrow schema per entity, the single truth of what a row is.

Both surfaces' normalizers produce rows of these schemas; documented column by column
in warehouse/README.md. Every table carries the lineage columns first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from pipelines.vocabulary import ENTITIES

TS = pa.timestamp("us", tz="UTC")
STR = pa.string()
F64 = pa.float64()

LINEAGE: list[tuple[str, pa.DataType]] = [
    ("connection_id", STR),
    ("patient_key", STR),
    ("source_surface", STR),  # fhir | datamodel | both
    ("source_id", STR),  # id on the surface it was first seen through
    ("source_updated_at", TS),  # meta.lastUpdated / event time: the incremental cursor
    ("ingested_at", TS),
    ("raw_ref", STR),  # raw landing file holding the payload
]

# Before publishing, a row names its patient by a reference the crosswalk resolves.
PATIENT_REF: list[tuple[str, pa.DataType]] = [
    ("patient_ref_type", STR),  # "fhir" (logical id) | "MR" | other identifier type
    ("patient_ref_value", STR),
]

ENTITY_COLUMNS: dict[str, list[tuple[str, pa.DataType]]] = {
    "patients": [
        ("mrn", STR),
        ("enterprise_id", STR),
        ("ehr_id", STR),
        ("nist_id", STR),
        ("family_name", STR),
        ("given_names", STR),
        ("birth_date", pa.date32()),
        ("sex", STR),
        ("deceased_at", TS),
        ("race", STR),
        ("ethnicity", STR),
        ("language", STR),
        ("address_line", STR),
        ("city", STR),
        ("state", STR),
        ("postal_code", STR),
        ("phone", STR),
        ("email", STR),
        ("is_test", pa.bool_()),
        ("active", pa.bool_()),
    ],
    "encounters": [
        ("encounter_id", STR),
        ("status", STR),
        ("class", STR),
        ("type_code", STR),
        ("type_system", STR),
        ("type_display", STR),
        ("start_at", TS),
        ("end_at", TS),
        ("location", STR),
        ("department", STR),
        ("attending_npi", STR),
        ("reason_code", STR),
        ("reason_system", STR),
        ("reason_display", STR),
        ("discharge_disposition", STR),
    ],
    "results": [
        ("result_id", STR),
        ("encounter_id", STR),
        ("order_id", STR),
        ("category", STR),
        ("code", STR),
        ("code_system", STR),
        ("display", STR),
        ("value_numeric", F64),
        ("value_text", STR),
        ("unit", STR),
        ("reference_low", F64),
        ("reference_high", F64),
        ("reference_text", STR),
        ("abnormal_flag", STR),
        ("status", STR),
        ("effective_at", TS),
        ("issued_at", TS),
        ("performer", STR),
    ],
    "medications": [
        ("medication_id", STR),
        ("encounter_id", STR),
        ("kind", STR),
        ("status", STR),
        ("intent", STR),
        ("code", STR),
        ("code_system", STR),
        ("display", STR),
        ("dose_quantity", F64),
        ("dose_unit", STR),
        ("route", STR),
        ("frequency", STR),
        ("start_at", TS),
        ("end_at", TS),
        ("prescriber_npi", STR),
    ],
    "appointments": [
        ("appointment_id", STR),
        ("status", STR),
        ("start_at", TS),
        ("end_at", TS),
        ("duration_minutes", pa.int32()),
        ("type_code", STR),
        ("type_display", STR),
        ("reason", STR),
        ("provider_npi", STR),
        ("location", STR),
        ("department", STR),
        ("cancel_reason", STR),
        ("rescheduled_from", STR),
    ],
    "documents": [
        ("document_id", STR),
        ("encounter_id", STR),
        ("kind", STR),
        ("type_code", STR),
        ("type_system", STR),
        ("title", STR),
        ("status", STR),
        ("authored_at", TS),
        ("author", STR),
        ("content_type", STR),
        ("content_sha256", STR),
        ("content_bytes", pa.int64()),
    ],
}

if tuple(ENTITY_COLUMNS) != ENTITIES:
    raise ImportError("pipelines.vocabulary.ENTITIES and pipelines.model.ENTITY_COLUMNS disagree")

# The business key of each entity inside a connection (both surfaces carry it).
ENTITY_KEY: dict[str, str] = {
    "patients": "patient_key",
    "encounters": "encounter_id",
    "results": "result_id",
    "medications": "medication_id",
    "appointments": "appointment_id",
    "documents": "document_id",
}

IDENTIFIER_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("connection_id", STR),
    ("id_system", STR),  # identifier type: fhir, MR, EHRID, NIST, EPI, ...
    ("id_value", STR),
    ("patient_key", STR),
    ("id_type", STR),
    ("source_surface", STR),
    ("first_seen_at", TS),
    ("last_seen_at", TS),
]


def staged_schema(entity: str) -> pa.Schema:
    """Schema of a normalized row before the crosswalk resolves its patient."""
    return pa.schema(LINEAGE + PATIENT_REF + ENTITY_COLUMNS[entity])


def published_schema(entity: str) -> pa.Schema:
    """Schema of ``redox.<entity>`` in the warehouse."""
    return pa.schema(LINEAGE + ENTITY_COLUMNS[entity])


def identifiers_schema() -> pa.Schema:
    return pa.schema(IDENTIFIER_COLUMNS)


# Keys a normalized row may carry besides its staged columns: side channels the loader
# consumes before the row becomes a table row (the crosswalk's identifier map, a patient
# merge's retired identifiers, the document a replacement supersedes, document content or
# its URL). Anything else is a defect.
ROW_EXTRAS: tuple[str, ...] = ("identifiers", "merged_identifiers", "supersedes", "content", "content_url")


class SchemaMismatch(ValueError):
    """A row carries a key its table has no column for (a misspelled or unmapped column)."""


def unknown_keys(row: Mapping[str, Any], schema: pa.Schema) -> list[str]:
    names = set(schema.names)
    return sorted(k for k in row if k not in names)


def rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build an Arrow table with exactly ``schema``; missing keys become nulls, and a key
    the schema lacks is an error (it would otherwise vanish without a trace)."""
    rows = list(rows)
    names = set(schema.names)
    for row in rows:
        if not names.issuperset(row):
            raise SchemaMismatch(
                f"row keys not in the schema: {', '.join(unknown_keys(row, schema))} "
                "(add the column to pipelines/model.py or drop the key in the normalizer)"
            )
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)
