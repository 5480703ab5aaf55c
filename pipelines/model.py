"""The common model: one fixed Arrow schema per entity, the single truth of what a row is.

Both surfaces' normalizers produce rows of these schemas; documented column by column
in pipelines/model_docs.py (the README tables and the warehouse COMMENTs are generated
from it). Every table carries the lineage columns first. Two child tables hang off their
parents rather than multiplying them: ``result_components`` (one row per component of a
blood pressure or panel Observation) and ``diagnostic_report_results`` (the results a
report groups); the normalizers stage them as JSON arrays on the parent row and publish
explodes them, so both surfaces' parent rows reconcile field by field first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipelines.vocabulary import CHILD_TABLES, ENTITIES

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
        ("report_id", STR),
        ("category", STR),
        ("code", STR),
        ("code_system", STR),
        ("display", STR),
        ("value_numeric", F64),
        ("value_text", STR),
        ("value_code", STR),
        ("value_code_system", STR),
        ("unit", STR),
        ("unit_system", STR),
        ("reference_low", F64),
        ("reference_high", F64),
        ("reference_text", STR),
        ("abnormal_flag", STR),
        ("status", STR),
        ("status_source", STR),
        ("effective_at", TS),
        ("issued_at", TS),
        ("performer", STR),
        ("component_count", pa.int32()),
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
    # --- the rest of the clinical record (issue 12) ---
    "problems": [
        ("problem_id", STR),
        ("encounter_id", STR),
        ("category", STR),
        ("code", STR),
        ("code_system", STR),
        ("display", STR),
        ("status", STR),  # normalized: FHIR condition-clinical (active, resolved, inactive, ...)
        ("status_source", STR),  # the source's own value
        ("verification_status", STR),
        ("severity", STR),
        ("health_status", STR),
        ("onset_at", TS),
        ("abated_at", TS),
        ("recorded_at", TS),
        ("recorder", STR),
        ("note", STR),
    ],
    "allergies": [
        ("allergy_id", STR),
        ("category", STR),
        ("allergy_type", STR),
        ("substance_code", STR),
        ("substance_system", STR),
        ("substance_display", STR),
        ("status", STR),  # normalized: active | inactive | resolved
        ("status_source", STR),
        ("verification_status", STR),
        ("criticality", STR),  # low | high | unable-to-assess
        ("criticality_source", STR),
        ("severity", STR),  # mild | moderate | severe
        ("reaction_code", STR),
        ("reaction_system", STR),
        ("reaction_display", STR),
        ("reactions", STR),  # every reaction's display, "; "-separated
        ("onset_at", TS),
        ("ended_at", TS),
        ("recorded_at", TS),
        ("note", STR),
    ],
    "immunizations": [
        ("immunization_id", STR),
        ("encounter_id", STR),
        ("status", STR),  # normalized: completed | not-done | entered-in-error
        ("status_source", STR),
        ("vaccine_code", STR),
        ("vaccine_system", STR),
        ("vaccine_display", STR),
        ("occurred_at", TS),
        ("lot_number", STR),
        ("manufacturer", STR),
        ("route_code", STR),
        ("route_system", STR),
        ("route_display", STR),
        ("site", STR),
        ("dose_quantity", F64),
        ("dose_unit", STR),
        ("performer", STR),
        ("not_given_reason", STR),
    ],
    "procedures": [
        ("procedure_id", STR),
        ("encounter_id", STR),
        ("category", STR),
        ("code", STR),
        ("code_system", STR),
        ("display", STR),
        ("status", STR),  # normalized: FHIR event-status
        ("status_source", STR),
        ("performed_at", TS),
        ("performed_end_at", TS),
        ("body_site_code", STR),
        ("body_site_system", STR),
        ("body_site_display", STR),
        ("performer", STR),
        ("reason_code", STR),
        ("reason_system", STR),
        ("reason_display", STR),
        ("note", STR),
    ],
    "diagnostic_reports": [
        ("report_id", STR),
        ("encounter_id", STR),
        ("order_id", STR),
        ("category", STR),
        ("code", STR),
        ("code_system", STR),
        ("display", STR),
        ("status", STR),  # normalized: FHIR diagnostic-report-status
        ("status_source", STR),
        ("effective_at", TS),
        ("issued_at", TS),
        ("performer", STR),
        ("conclusion", STR),
        ("result_count", pa.int32()),
    ],
    "orders": [
        ("order_id", STR),
        ("encounter_id", STR),
        ("category", STR),
        ("code", STR),
        ("code_system", STR),
        ("display", STR),
        ("status", STR),  # normalized: FHIR request-status
        ("status_source", STR),
        ("intent", STR),
        ("priority", STR),
        ("ordered_at", TS),
        ("occurrence_at", TS),
        ("requester_npi", STR),
        ("performer", STR),
        ("reason_code", STR),
        ("reason_system", STR),
        ("reason_display", STR),
        ("note", STR),
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
    "problems": "problem_id",
    "allergies": "allergy_id",
    "immunizations": "immunization_id",
    "procedures": "procedure_id",
    "diagnostic_reports": "report_id",
    "orders": "order_id",
}

# Staged-only columns: kept in ``raw.<surface>_<entity>`` but not in ``redox.<entity>``.
# ``match_key`` is a digest of what identifies a record that carries no id on one surface
# (a Clinical Summary entry: code system, code, time): publish matches a record without a
# shared business id to the other surface's record of the same patient and match key.
# ``components`` / ``result_refs`` are JSON arrays publish explodes into the child tables.
MATCH_KEY: tuple[str, pa.DataType] = ("match_key", STR)
STAGED_ONLY_COLUMNS: dict[str, list[tuple[str, pa.DataType]]] = {
    "results": [MATCH_KEY, ("components", STR)],
    "problems": [MATCH_KEY],
    "allergies": [MATCH_KEY],
    "immunizations": [MATCH_KEY],
    "procedures": [MATCH_KEY],
    "diagnostic_reports": [MATCH_KEY, ("result_refs", STR)],
    "orders": [MATCH_KEY],
}

# Child tables (pipelines.vocabulary.CHILD_TABLES): keyed by the parent's key and a position.
CHILD_COLUMNS: dict[str, list[tuple[str, pa.DataType]]] = {
    "result_components": [
        ("connection_id", STR),
        ("patient_key", STR),
        ("result_id", STR),
        ("position", pa.int32()),
        ("code", STR),
        ("code_system", STR),
        ("display", STR),
        ("value_numeric", F64),
        ("value_text", STR),
        ("value_code", STR),
        ("value_code_system", STR),
        ("unit", STR),
        ("unit_system", STR),
        ("reference_low", F64),
        ("reference_high", F64),
        ("reference_text", STR),
        ("abnormal_flag", STR),
    ],
    "diagnostic_report_results": [
        ("connection_id", STR),
        ("patient_key", STR),
        ("report_id", STR),
        ("position", pa.int32()),
        ("result_id", STR),
    ],
}
CHILD_KEY: dict[str, tuple[str, ...]] = {
    "result_components": ("connection_id", "result_id", "position"),
    "diagnostic_report_results": ("connection_id", "report_id", "position"),
}
# The fields of one element of a staged ``components`` JSON array.
COMPONENT_FIELDS: tuple[str, ...] = tuple(c for c, _ in CHILD_COLUMNS["result_components"][4:])

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


# Every staged row's version order: its source time, then the landed page it came from (page
# names start with their fetch time). The staged tables de-duplicate on it, so when a record
# arrives twice in one load with the same source time (a Data Model query answered twice: its
# rows carry the record's own time, not the response time) the later fetch wins — in a live
# sync and in a replay of the landing alike.
VERSION_KEY: tuple[str, pa.DataType] = ("version_key", STR)


def version_key(source_updated_at: Any, raw_ref: Any, *, complete: bool = True) -> str:
    """``complete`` False: a row that only names its record (a Data Model patient block with
    identifiers and no demographics) — any complete version outranks it."""
    stamp = (
        source_updated_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%f")
        if isinstance(source_updated_at, datetime)
        else "0" * 21
    )
    page = str(raw_ref).rsplit("/", 1)[-1] if raw_ref else ""
    return f"{int(complete)}|{stamp}|{page}"


def staged_schema(entity: str) -> pa.Schema:
    """Schema of a normalized row before the crosswalk resolves its patient."""
    return pa.schema(
        LINEAGE + PATIENT_REF + ENTITY_COLUMNS[entity] + STAGED_ONLY_COLUMNS.get(entity, []) + [VERSION_KEY]
    )


def child_schema(table: str) -> pa.Schema:
    """Schema of a child table ``redox.<table>`` (result_components, diagnostic_report_results)."""
    return pa.schema(CHILD_COLUMNS[table])


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


if set(CHILD_COLUMNS) != set(CHILD_TABLES):
    raise ImportError("pipelines.vocabulary.CHILD_TABLES and pipelines.model.CHILD_COLUMNS disagree")
