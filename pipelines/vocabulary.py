"""The names every part of the pipeline agrees on, in one place.

Entities, surfaces, schema and table names, the FHIR resource type → entity map and
the landing folder names were once spelled out in several modules and had started to
drift; everything in ``pipelines/`` imports them from here. (``sandbox/`` keeps its own
copy on purpose: the emulator never imports the pipeline.)
"""

from __future__ import annotations

from resources.settings import CONNECTION_ID_PATTERN as _CONFIG_CONNECTION_ID_PATTERN

# The common model's entities, in publish order (patients first: the crosswalk).
ENTITIES: tuple[str, ...] = (
    "patients",
    "encounters",
    "results",
    "medications",
    "appointments",
    "documents",
    # The rest of the clinical record (issue 12).
    "problems",
    "allergies",
    "immunizations",
    "procedures",
    "diagnostic_reports",
    "orders",
)
# Child tables the publish step derives from a staged column of their parent entity: one row
# per component of a result (blood pressure, panels) and per result a report groups.
CHILD_TABLES: dict[str, str] = {
    "result_components": "results",
    "diagnostic_report_results": "diagnostic_reports",
}
# The two Redox surfaces a connection can speak.
SURFACES: tuple[str, ...] = ("fhir", "datamodel")

# Schemas of the warehouse. ``raw`` holds the staged per-surface rows users query as
# ``raw.<surface>_<entity>``; ``redox`` the common model (see warehouse/README.md for the
# DuckDB catalog-name rule that can place it in ``main``).
STAGING_SCHEMA = "raw"
MODEL_SCHEMA = "redox"
OPS_SCHEMA = "ops"
AUDIT_SCHEMA = "audit"

CROSSWALK_TABLE = "patient_identifiers"
QUARANTINE_TABLE = "quarantine"

# FHIR resource types the pipeline reads, and the entity each one feeds.
FHIR_RESOURCE_ENTITIES: dict[str, str] = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Observation": "results",
    "MedicationRequest": "medications",
    "MedicationStatement": "medications",
    "Appointment": "appointments",
    "DocumentReference": "documents",
    "Condition": "problems",
    "AllergyIntolerance": "allergies",
    "Immunization": "immunizations",
    "Procedure": "procedures",
    "DiagnosticReport": "diagnostic_reports",
    "ServiceRequest": "orders",
}
# Resource types a Bundle may carry only as the target of a reference (``_include``, a
# transaction, a notification): read to resolve the references, never rows of their own.
FHIR_SUPPORTING_TYPES: frozenset[str] = frozenset(
    {"Location", "Practitioner", "PractitionerRole", "Organization", "Medication", "Specimen", "Device"}
)
# The inverse: which resource types are searched to fetch an entity.
ENTITY_RESOURCE_TYPES: dict[str, tuple[str, ...]] = {
    entity: tuple(t for t, e in FHIR_RESOURCE_ENTITIES.items() if e == entity) for entity in ENTITIES
}

# The landing zone (next to the DuckDB file): response bodies as received, and document
# contents by hash. ``raw`` was the pages folder's name before it was renamed to keep it
# apart from the ``raw`` schema; renormalize still reads pages landed there.
LANDING_PAGES_DIR = "responses"
LEGACY_LANDING_PAGES_DIR = "raw"
LANDING_DOCUMENTS_DIR = "documents"

# A connection id as it may appear in a path: the rule the config loader enforces
# (resources/settings.py owns it; the landing re-checks every id before building a path).
CONNECTION_ID_PATTERN = _CONFIG_CONNECTION_ID_PATTERN


def staged_table_name(surface: str, entity: str) -> str:
    """``raw.<surface>_<entity>``: the staged rows of one surface and entity."""
    return f"{surface}_{entity}"


def is_plain_connection_id(value: object) -> bool:
    return isinstance(value, str) and bool(CONNECTION_ID_PATTERN.match(value))
