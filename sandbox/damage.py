"""What the response faults do to a rendered body: partial failures and defective records.

Pure functions over parsed JSON, used by ``sandbox.faults`` (which decides *when*). Kept apart so
the defect list is one readable table and can be tested without a server.

Defects a record can carry under ``bad_entry_rate`` (``DEFECTS``; a record gets one, drawn
among those that apply to it):

=====================  ==========================================================================
``unknown_type``       FHIR only: ``resourceType`` becomes ``"Basic"``, the body is otherwise intact
``missing_id``         FHIR: ``id`` removed; Data Model: the record's id (``ID``, ``VisitNumber``,
                       ``DocumentID``) becomes ``""``
``bad_date``           the first date or datetime (clinical fields before ``meta``) is rewritten
                       ``DD/MM/YYYY``, e.g. ``31/12/2024``
``wrong_type``         the entry itself becomes ``1``, ``"x"`` or ``null``, or a string field (e.g.
                       ``status``) becomes a number
``empty_identifiers``  FHIR ``identifier: []``; Data Model ``Patient.Identifiers: []`` (or the
                       record's own ``Identifiers``)
=====================  ==========================================================================

Records are: FHIR ``Bundle.entry[]`` of ``searchset`` Bundles and NDJSON lines; Data Model items
of the top-level lists of a query answer (``Orders``, ``Visits``, ``Notes``, ``Media``,
``Documents``, ``Patients`` and their ``Visits``, ``PotentialMatches``, ``AvailableSlots``).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable
from typing import Any

DEFECTS = ("unknown_type", "missing_id", "bad_date", "wrong_type", "empty_identifiers")
NON_OBJECTS: tuple[Any, ...] = (1, "x", None)
DATAMODEL_ID_KEYS = ("ID", "VisitNumber", "DocumentID")
DATAMODEL_RECORD_LISTS = (
    "Orders",
    "Visits",
    "Notes",
    "Media",
    "Documents",
    "Patients",
    "PotentialMatches",
    "AvailableSlots",
)
# String fields turned into numbers by ``wrong_type``, most telling first.
_TYPED_FIELDS = ("status", "gender", "birthDate", "Status", "DocumentType", "VisitDateTime", "DateTime")
_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:T|$)")
_ERROR_STATUSES = (500, 502, 503, 504)


# ---- deterministic choice ------------------------------------------------------------------


def _fraction(seed: int, key: str, salt: str) -> float:
    digest = hashlib.sha256(f"{seed}|{salt}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def picked(seed: int, key: str, rate: float) -> bool:
    """Whether the record ``key`` is damaged at ``rate`` (stable per seed and key)."""
    return rate > 0 and _fraction(seed, key, "bad-entry") < rate


def _choice(seed: int, key: str, salt: str, options: tuple[Any, ...] | list[Any]) -> Any:
    return options[int(_fraction(seed, key, salt) * len(options)) % len(options)]


# ---- helpers over JSON values ---------------------------------------------------------------


def _first_date(node: Any, skip: frozenset[str] = frozenset()) -> tuple[Any, Any] | None:
    """(container, key) of the first ISO date string, depth first, skipping ``skip`` keys."""
    if isinstance(node, dict):
        items: list[tuple[Any, Any]] = [(k, v) for k, v in node.items() if k not in skip]
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return None
    for key, value in items:
        if isinstance(value, str) and _ISO_DATE.match(value):
            return node, key
    for _, value in items:
        found = _first_date(value)
        if found is not None:
            return found
    return None


def _day_first(text: str) -> str:
    match = _ISO_DATE.match(text)
    assert match is not None
    year, month, day = match.groups()
    return f"{day}/{month}/{year}"


def _typed_field(record: dict[str, Any], exclude: tuple[str, ...]) -> str | None:
    for name in _TYPED_FIELDS:
        if isinstance(record.get(name), str) and name not in exclude:
            return name
    return next((k for k, v in record.items() if isinstance(v, str) and k not in exclude), None)


# ---- FHIR ----------------------------------------------------------------------------------


def fhir_key(entry: Any) -> str:
    resource = entry.get("resource") if isinstance(entry, dict) else None
    if isinstance(resource, dict) and resource.get("id"):
        return f"{resource.get('resourceType')}/{resource['id']}"
    if isinstance(entry, dict) and entry.get("fullUrl"):
        return str(entry["fullUrl"])
    return repr(entry)


def _fhir_defects(resource: dict[str, Any]) -> list[str]:
    found = ["unknown_type", "wrong_type"]
    if "id" in resource:
        found.append("missing_id")
    if _first_date(resource, frozenset({"meta"})) is not None:
        found.append("bad_date")
    if isinstance(resource.get("identifier"), list) and resource["identifier"]:
        found.append("empty_identifiers")
    return sorted(found, key=DEFECTS.index)


def damage_fhir_resource(seed: int, key: str, resource: dict[str, Any]) -> Any:
    """The resource with one defect; may return a non-object (``wrong_type``)."""
    defect = _choice(seed, key, "defect", _fhir_defects(resource))
    damaged = copy.deepcopy(resource)  # rendered bodies may share nested objects
    if defect == "unknown_type":
        damaged["resourceType"] = "Basic"
    elif defect == "missing_id":
        del damaged["id"]
    elif defect == "bad_date":
        container, field = _first_date(damaged, frozenset({"meta"}))  # type: ignore[misc]
        container[field] = _day_first(container[field])
    elif defect == "empty_identifiers":
        damaged["identifier"] = []
    else:
        field = _typed_field(damaged, ("resourceType", "id"))
        variant = _choice(seed, key, "wrong-type", (*NON_OBJECTS, "number") if field else NON_OBJECTS)
        if variant != "number":
            return variant
        damaged[field] = 1
    return damaged


def damage_bundle_entries(bundle: dict[str, Any], seed: int, rate: float) -> int:
    """Damage the picked entries of a searchset Bundle in place; returns how many."""
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return 0
    count = 0
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or (entry.get("search") or {}).get("mode") == "outcome":
            continue
        key = fhir_key(entry)
        if not picked(seed, key, rate):
            continue
        damaged = damage_fhir_resource(seed, key, resource)
        entries[i] = {**entry, "resource": damaged} if isinstance(damaged, dict) else damaged
        count += 1
    return count


def damage_ndjson_lines(lines: list[Any], seed: int, rate: float) -> int:
    """Damage picked resources of parsed NDJSON lines in place; returns how many."""
    count = 0
    for i, resource in enumerate(lines):
        if not isinstance(resource, dict):
            continue
        key = f"{resource.get('resourceType')}/{resource.get('id')}"
        if picked(seed, key, rate):
            lines[i] = damage_fhir_resource(seed, key, resource)
            count += 1
    return count


def failed_search_bundle(bundle: dict[str, Any], status: int) -> dict[str, Any]:
    """A searchset answering HTTP 200 whose only entry says the EHR failed (§12.11)."""
    links = [
        link for link in bundle.get("link") or [] if isinstance(link, dict) and link.get("relation") == "self"
    ]
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "exception",
                "diagnostics": destination_failure_text(status),
            }
        ],
    }
    failed: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    if bundle.get("id"):
        failed["id"] = bundle["id"]
    if links:
        failed["link"] = links
    failed["entry"] = [{"resource": outcome, "search": {"mode": "outcome"}}]
    return failed


# ---- Data Model ----------------------------------------------------------------------------


def datamodel_key(list_name: str, record: Any) -> str:
    if isinstance(record, dict):
        for name in DATAMODEL_ID_KEYS:
            if record.get(name) not in (None, ""):
                return f"{list_name}/{record[name]}"
        for ident in record.get("Identifiers") or []:
            if isinstance(ident, dict) and ident.get("ID"):
                return f"{list_name}/{ident.get('IDType')}/{ident['ID']}"
    return f"{list_name}/{record!r}"


def _identifier_holder(record: dict[str, Any]) -> dict[str, Any] | None:
    patient = record.get("Patient")
    if isinstance(patient, dict) and isinstance(patient.get("Identifiers"), list) and patient["Identifiers"]:
        return patient
    if isinstance(record.get("Identifiers"), list) and record["Identifiers"]:
        return record
    return None


def _datamodel_defects(record: dict[str, Any]) -> list[str]:
    found = ["wrong_type"]
    if any(record.get(k) not in (None, "") for k in DATAMODEL_ID_KEYS):
        found.append("missing_id")
    if _first_date(record) is not None:
        found.append("bad_date")
    if _identifier_holder(record) is not None:
        found.append("empty_identifiers")
    return sorted(found, key=DEFECTS.index)


def damage_datamodel_record(seed: int, key: str, record: dict[str, Any]) -> Any:
    defect = _choice(seed, key, "defect", _datamodel_defects(record))
    damaged = copy.deepcopy(record)  # rendered bodies may share nested objects
    if defect == "missing_id":
        name = next(k for k in DATAMODEL_ID_KEYS if record.get(k) not in (None, ""))
        damaged[name] = ""
    elif defect == "bad_date":
        container, field = _first_date(damaged)  # type: ignore[misc]
        container[field] = _day_first(container[field])
    elif defect == "empty_identifiers":
        holder = _identifier_holder(damaged)
        if holder is damaged:
            damaged["Identifiers"] = []
        else:
            damaged["Patient"]["Identifiers"] = []
    else:
        field = _typed_field(damaged, DATAMODEL_ID_KEYS)
        variant = _choice(seed, key, "wrong-type", (*NON_OBJECTS, "number") if field else NON_OBJECTS)
        if variant != "number":
            return variant
        damaged[field] = 1
    return damaged


def damage_datamodel_body(body: dict[str, Any], seed: int, rate: float) -> int:
    """Damage picked records of a Data Model query answer in place; returns how many."""
    count = 0

    def walk(records: Any, name: str, nested: Callable[[dict[str, Any]], None] | None = None) -> None:
        nonlocal count
        if not isinstance(records, list):
            return
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                continue
            key = datamodel_key(name, record)
            if picked(seed, key, rate):
                records[i] = damage_datamodel_record(seed, key, record)
                count += 1
            elif nested is not None:
                nested(record)

    def patient_visits(group: dict[str, Any]) -> None:
        if isinstance(group.get("Visits"), list):
            group["Visits"] = list(group["Visits"])
            walk(group["Visits"], "Visits")

    for name in DATAMODEL_RECORD_LISTS:
        if isinstance(body.get(name), list):
            body[name] = list(body[name])
            walk(body[name], name, patient_visits if name == "Patients" else None)
    return count


def failed_query_body(body: dict[str, Any], error_id: int, status: int) -> dict[str, Any]:
    """A Data Model query answer for HTTP 200 after the EHR failed: ``Meta.Errors``, no results."""
    meta = dict(body.get("Meta") or {})
    meta["Errors"] = [
        {
            "ID": error_id,
            "Text": destination_failure_text(status),
            "Type": "query",
            "Module": "Send",
            "DestinationStatusCode": status,
        }
    ]
    failed: dict[str, Any] = {"Meta": meta}
    for key, value in body.items():
        if key == "Meta":
            continue
        failed[key] = [] if isinstance(value, list) else {} if isinstance(value, dict) else None
    return failed


def destination_failure_text(status: int) -> str:
    return f"The destination system returned status code {status}"


def destination_status(seed: int, counter: int) -> int:
    return _choice(seed, str(counter), "partial-status", _ERROR_STATUSES)
