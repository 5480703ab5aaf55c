"""A landed FHIR Bundle → rows per entity, one quarantine entry per bad entry (pure).

Shared by the live FHIR source and ``redox-elt renormalize``. Every entry is read on
its own: an entry that is not an object, has no resource, a resource type the pipeline
does not read, no id, or a value its normalizer refuses (an unparseable date, a missing
code ...) is quarantined with its position or id and the reason, and the rest of the
page loads. Only a body that is not a Bundle at all fails the whole page.
"""

from __future__ import annotations

from typing import Any

from pipelines.fhir.normalize import NORMALIZERS, identifier_values, patient_reference
from pipelines.fhir.references import Refs
from pipelines.normalize_common import NormalizationError, safe_reason
from pipelines.pages import PageRows
from pipelines.quarantine import ITEM_ID, ITEM_POSITION, QuarantineEntry
from pipelines.vocabulary import FHIR_RESOURCE_ENTITIES, FHIR_SUPPORTING_TYPES

# Entries a search Bundle may carry that are not records (search.mode "outcome"), and the
# targets of references (``_include``d Locations, Practitioners ...): read, never rows.
INFORMATIONAL_TYPES = frozenset({"OperationOutcome"}) | FHIR_SUPPORTING_TYPES
# The identifier type that carries each entity's business id (the staged key).
BUSINESS_IDENTIFIER = {
    "encounters": "VN",
    "results": "ResultID",
    "medications": "OrderID",
    "appointments": "VN",
    "documents": "DocumentID",
    "orders": "OrderID",
    "diagnostic_reports": "OrderID",
    "problems": "ProblemID",
    "allergies": "AllergyID",
    "immunizations": "ImmunizationID",
    "procedures": "ProcedureID",
}


def bundle_rows(bundle: Any, connection_id: str, raw_ref: str | None, fetched_entity: str) -> PageRows:
    """Normalize every entry of ``bundle``. ``fetched_entity`` is the entity the search
    asked for: the entity an entry is quarantined under when its own type is unknown."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise NormalizationError("page is not a FHIR Bundle")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise NormalizationError("Bundle.entry is not a list")
    out = PageRows()
    refs = Refs(entries)
    for position, entry in enumerate(entries):
        where = f"entry[{position}]"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            what = "is not an object" if not isinstance(entry, dict) else "has no resource object"
            out.quarantined.append(
                QuarantineEntry(fetched_entity, where, f"Bundle {where} {what}", item_kind=ITEM_POSITION)
            )
            continue
        rtype = resource.get("resourceType")
        rtype = rtype if isinstance(rtype, str) else None  # a list or object here is no type at all
        if rtype in INFORMATIONAL_TYPES:
            continue
        rid = resource.get("id") if isinstance(resource.get("id"), str) and resource.get("id") else None
        if rtype not in FHIR_RESOURCE_ENTITIES:
            # Under the entity asked for and by position: which entity the record really is is
            # unknown, so a later good copy resolves it through its patient's next clean page.
            ref_type, ref_value = _patient_of(resource, None)
            reason = f"Bundle {where}: resourceType is not one the pipeline reads"
            out.quarantined.append(_entry(fetched_entity, None, where, reason, ref_type, ref_value))
            continue
        entity = FHIR_RESOURCE_ENTITIES[rtype]
        ref_type, ref_value = _patient_of(resource, rtype)
        if rid is None:
            reason = f"{rtype} {where} has no id"
            business = _business_id(resource, entity)
            out.quarantined.append(_entry(entity, business, where, reason, ref_type, ref_value))
            continue
        try:
            row = NORMALIZERS[rtype][1](resource, connection_id, raw_ref, refs)
        except (NormalizationError, KeyError, TypeError, ValueError, AttributeError) as exc:
            out.quarantined.append(
                QuarantineEntry(entity, rid, f"{rtype}: {safe_reason(exc)}", ref_type, ref_value)
            )
            continue
        out.rows[entity].append(row)
    return out


def attachment_urls(bundle: Any) -> list[str]:
    """Document content URLs of a Bundle's DocumentReferences (fetched ahead of the rows)."""
    urls = []
    for entry in (bundle.get("entry") or []) if isinstance(bundle, dict) else []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != "DocumentReference":
            continue
        for content in resource.get("content") or []:
            url = (content.get("attachment") or {}).get("url") if isinstance(content, dict) else None
            if isinstance(url, str) and url:
                urls.append(url)
    return urls


def _entry(
    entity: str, item_id: str | None, where: str, reason: str, ref_type: str | None, ref_value: str | None
) -> QuarantineEntry:
    """An entry named by the record's id when it has one, else by its position."""
    if item_id:
        return QuarantineEntry(entity, item_id, reason, ref_type, ref_value, ITEM_ID)
    return QuarantineEntry(entity, where, reason, ref_type, ref_value, ITEM_POSITION)


def _business_id(resource: dict[str, Any], entity: str) -> str | None:
    """The entity's business id from the resource's identifiers (the staged key), if any."""
    if entity == "patients":
        return None  # a patient's staged key is its logical id
    try:
        ids = identifier_values(resource)
    except (TypeError, AttributeError):
        return None
    kind = BUSINESS_IDENTIFIER.get(entity)  # the clinical-record types are keyed by logical id
    return ids.get(kind) if kind else None


def _patient_of(resource: dict[str, Any], rtype: str | None) -> tuple[str | None, str | None]:
    """The patient a resource belongs to, for re-fetching it (None when it cannot be told)."""
    try:
        if rtype == "Patient":
            rid = resource.get("id")
            return ("fhir", rid) if isinstance(rid, str) and rid else (None, None)
        ref = patient_reference(resource)
        return ref["patient_ref_type"], ref["patient_ref_value"]
    except (NormalizationError, KeyError, TypeError, ValueError, AttributeError):
        return None, None
