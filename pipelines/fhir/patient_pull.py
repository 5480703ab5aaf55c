"""One patient's records through Redox's FHIR API, with the documented parameters only.

Where the connection honours ``_revinclude`` on Patient search, one ``Patient/_search`` with
``identifier=system|value`` (or ``_id``) and ``_revinclude=*`` returns the patient and every
resource that points at it. Where it does not (a 400 OperationOutcome naming ``_revinclude``,
learned once per connection and remembered in ``ops.connection_capabilities``), the patient is
found by identifier and each entitled type is searched with the documented parameter:
``patient.identifier=<MR system>|<MR>`` for AllergyIntolerance, Condition and Immunization
(Redox's task guides require it), ``patient=<logical id>`` for the others.

Documents: ``DocumentReference`` with ``_elements`` first (no ``content``), then the full
resources by ``_id`` only for documents that are new or changed since they were staged, and
content bytes only for attachments the landing's content index does not hold.

Every response is landed as received; the pages go back to the resource thread for
normalizing. A partial failure (OperationOutcome issues inside a 200 Bundle, or a client
error) fails the whole patient: it stays due and nothing of it is staged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from pipelines.fhir.settings import ENTITY_RESOURCE_TYPES
from pipelines.landing import RawLanding
from pipelines.normalize_common import parse_ts
from pipelines.panel import FHIR_ID_SYSTEM, DuePatient, fhir_identifier_token
from pipelines.pull_pages import (
    CallCounter,
    PulledPage,
    fhir_search_patient,
    land_page,
    page_context,
    with_priority,
)

# How each type's search names the patient (REDOX-REFERENCE §3.3, §12.1): Redox's task guides
# require ``patient.identifier`` for allergies, problems (diagnoses) and immunizations
# (vaccinations); the other types list ``patient`` (Procedure, MedicationRequest and
# MedicationStatement must send it). A patient without an MR identifier is searched by
# ``patient`` everywhere (also documented for the three).
BY_PATIENT_IDENTIFIER = frozenset({"AllergyIntolerance", "Condition", "Immunization"})
DOCUMENT_ELEMENTS = "subject,masterIdentifier,date,type,context,status,category,identifier"
ID_CHUNK = 50  # documents per ``_id=a,b,c`` search
MR_SYSTEM_SUFFIX = ":MR"


class PartialFailure(RuntimeError):
    """A 200 Bundle carried error issues: the EHR failed, this is not "no data"."""

    def __init__(self, operation: str, codes: tuple[str, ...]) -> None:
        super().__init__(f"{operation}: Bundle carries {len(codes)} error issue(s) ({', '.join(codes[:3])})")
        self.codes = codes
        self.status_code = 200


class Unsupported(RuntimeError):
    """The server refused a parameter we can do without (``_revinclude``, ``_elements``)."""


def bundle_errors(bundle: dict[str, Any]) -> tuple[str, ...]:
    """Codes of error/fatal OperationOutcome issues inside a Bundle (entry or outcome)."""
    codes: list[str] = []
    outcomes = [e.get("resource") for e in bundle.get("entry") or [] if isinstance(e, dict)]
    if isinstance(bundle.get("issues"), list):  # Redox's "Issues[]" spelling
        outcomes.append({"resourceType": "OperationOutcome", "issue": bundle["issues"]})
    for res in outcomes:
        if isinstance(res, dict) and res.get("resourceType") == "OperationOutcome":
            for issue in res.get("issue") or []:
                if isinstance(issue, dict) and issue.get("severity") in ("error", "fatal"):
                    codes.append(f"{issue.get('severity')}:{issue.get('code', '?')}")
    return tuple(codes)


def refused_parameter(exc: BaseException, name: str) -> bool:
    """A 400 whose OperationOutcome names ``name`` (the parameter is not honoured here)."""
    if getattr(exc, "status_code", None) != 400:
        return False
    texts = tuple(getattr(exc, "details", ()) or ()) + tuple(getattr(exc, "codes", ()) or ())
    return any(name in str(t) for t in texts) or name in str(exc)


@dataclass
class FhirPatientResult:
    pages: list[PulledPage] = field(default_factory=list)
    fhir_id: str | None = None
    mrn: str | None = None
    mr_token: str | None = None  # system|value of the patient's MR identifier
    not_found: bool = False
    revinclude: bool | None = None  # learned on this pull (None: not probed)
    elements: bool | None = None


@dataclass
class FhirPullContext:
    """What a FHIR pull needs besides the patient; shared by the worker threads."""

    client: Any
    landing: RawLanding
    connection_id: str
    destination_slug: str | None
    entities: tuple[str, ...]
    page_size: int
    counter: CallCounter
    revinclude: bool | None  # None: not known yet (probe)
    elements: bool | None
    known_documents: dict[str, datetime | None]  # staged document source ids -> source_updated_at


def _search(
    ctx: FhirPullContext,
    resource_type: str,
    params: list[tuple[str, str]],
    entity: str,
    priority: str,
    *,
    rows: bool = True,
) -> list[PulledPage]:
    """Every page of a search, landed with its context. Raises on a partial failure.
    ``rows`` False: a listing (``_elements``) whose pages no sync takes rows from."""
    out = []
    kw = with_priority(ctx.client, "fhir_search_pages", priority)
    context = page_context(ctx.entities if rows else (), pulled_for=fhir_search_patient(params))
    for raw in ctx.client.fhir_search_pages(resource_type, params, entity=entity, **kw):
        ctx.counter.add(f"search {resource_type}")
        bundle = orjson.loads(raw)
        codes = bundle_errors(bundle)
        if codes:
            raise PartialFailure(f"search {resource_type}", codes)
        out.append(land_page(ctx.landing, ctx.connection_id, "fhir", entity, raw, context, bundle))
    return out


def _patient_params(patient: DuePatient, ctx: FhirPullContext) -> list[tuple[str, str]]:
    """The patient by the identifier it joined the panel with (exact, and immune to a logical id
    learned from a damaged answer); by ``_id`` only for a row known solely by its FHIR id."""
    if patient.id_system == FHIR_ID_SYSTEM:
        return [("_id", patient.id_value)]
    return [("identifier", fhir_identifier_token(patient.id_system, patient.id_value, ctx.destination_slug))]


def _resources(pages: list[PulledPage], rtype: str) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for page in pages
        for e in page.body.get("entry") or []
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == rtype
    ]


def _mr_identifier(patient: dict[str, Any]) -> dict[str, Any] | None:
    for ident in patient.get("identifier") or []:
        if (
            isinstance(ident, dict)
            and str(ident.get("system", "")).endswith(MR_SYSTEM_SUFFIX)
            and ident.get("value")
        ):
            return ident
    return None


def _mrn_of(patient: dict[str, Any]) -> str | None:
    ident = _mr_identifier(patient)
    return str(ident["value"]) if ident else None


def _mr_token_of(patient: dict[str, Any]) -> str | None:
    ident = _mr_identifier(patient)
    return f"{ident['system']}|{ident['value']}" if ident else None


def type_search_params(rtype: str, result: FhirPatientResult, page_size: int) -> list[tuple[str, str]]:
    """The parameters of one type's per-patient search (see BY_PATIENT_IDENTIFIER)."""
    if rtype in BY_PATIENT_IDENTIFIER and result.mr_token:
        by = ("patient.identifier", result.mr_token)
    else:
        by = ("patient", str(result.fhir_id))
    return [by, ("_count", str(page_size))]


def pull_patient(patient: DuePatient, ctx: FhirPullContext) -> FhirPatientResult:
    """Fetch and land one patient's records; raises on any failure (the caller counts it)."""
    result = FhirPatientResult()
    priority = patient.priority
    base = _patient_params(patient, ctx)
    found: list[PulledPage] | None = None
    if ctx.revinclude is not False:
        try:
            found = _search(
                ctx,
                "Patient",
                [*base, ("_revinclude", "*"), ("_count", str(ctx.page_size))],
                "patients",
                priority,
            )
            result.revinclude = True
        except Exception as exc:
            if not refused_parameter(exc, "_revinclude"):
                raise
            result.revinclude = False
            ctx.revinclude = False
    if found is None:
        found = _search(ctx, "Patient", base, "patients", priority)
    patients = _resources(found, "Patient")
    if not patients:
        result.not_found = True
        result.pages = list(found)
        return result
    # Identifier searches match exactly (REDOX-REFERENCE §3.3): one patient, or the first of a merge.
    logical_id = patients[0].get("id")
    if not isinstance(logical_id, str) or not logical_id:
        # A damaged answer (its record is quarantined): nothing to search the patient's records
        # by, and nothing to remember — the pull fails and the patient stays due.
        raise PartialFailure("search Patient", ("patient-without-id",))
    result.fhir_id = logical_id
    result.mrn = _mrn_of(patients[0])
    result.mr_token = _mr_token_of(patients[0])
    result.pages.extend(found)
    if result.revinclude:
        return result
    for entity in ctx.entities:
        if entity in ("patients", "documents"):
            continue
        for rtype in ENTITY_RESOURCE_TYPES[entity]:
            result.pages.extend(
                _search(ctx, rtype, type_search_params(rtype, result, ctx.page_size), entity, priority)
            )
    if "documents" in ctx.entities:
        result.pages.extend(_documents(ctx, result, priority))
    return result


def _documents(ctx: FhirPullContext, result: FhirPatientResult, priority: str) -> list[PulledPage]:
    """Metadata without content first; full resources only for new or changed documents."""
    assert result.fhir_id is not None
    by_patient = [("patient", result.fhir_id), ("_count", str(ctx.page_size))]
    if ctx.elements is not False:
        try:
            listing = _search(
                ctx,
                "DocumentReference",
                [*by_patient, ("_elements", DOCUMENT_ELEMENTS)],
                "documents",
                priority,
                rows=False,
            )
            result.elements = True
        except Exception as exc:
            if not refused_parameter(exc, "_elements"):
                raise
            result.elements = False
            ctx.elements = False
            listing = None
        if listing is not None:
            wanted = [
                str(d["id"])
                for d in _resources(listing, "DocumentReference")
                if d.get("id") and _changed(d, ctx.known_documents)
            ]
            pages: list[PulledPage] = []
            for i in range(0, len(wanted), ID_CHUNK):
                chunk = wanted[i : i + ID_CHUNK]
                full = _search(
                    ctx,
                    "DocumentReference",
                    [("_id", ",".join(chunk)), ("_count", str(len(chunk)))],
                    "documents",
                    priority,
                )
                pages.extend(full)
            return pages
    return _search(ctx, "DocumentReference", by_patient, "documents", priority)


def _changed(doc: dict[str, Any], known: dict[str, datetime | None]) -> bool:
    """New, or updated after the staged version (unknown update time: fetch to be safe)."""
    doc_id = str(doc.get("id"))
    if doc_id not in known:
        return True
    updated = parse_ts((doc.get("meta") or {}).get("lastUpdated"))
    staged = known[doc_id]
    return updated is None or staged is None or updated > staged


PullFn = Callable[[DuePatient, FhirPullContext], FhirPatientResult]
