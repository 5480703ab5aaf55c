"""FHIR surface constants: which resource types feed which entity, and time formats."""

from __future__ import annotations

from datetime import UTC, datetime

from pipelines.vocabulary import ENTITY_RESOURCE_TYPES as ENTITY_RESOURCE_TYPES  # re-exported


def fhir_instant(value: datetime) -> str:
    """A FHIR instant in UTC with second precision, e.g. 2026-11-01T00:00:00Z."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
