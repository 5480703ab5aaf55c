"""FHIR search parameters -> a store ``Query`` plus the filters the Query cannot express.

Redox documents, per resource, parameter sets of which one must be in every search
(REDOX-REFERENCE §3.3, which folds in §12). Under the default ``search_policy: redox`` a search
meeting no set is refused (400, naming the sets): ``_lastUpdated`` is accepted as an extra filter
but never satisfies a set, and ``_count`` alone never does, so there is no way to list a whole
connection — exactly as against Redox. ``search_policy: open`` keeps the sandbox's old permissive
rule (``_lastUpdated`` or a date stands in for any set); it is not Redox and exists for benchmarks.

Result parameters: ``_revinclude`` on Patient (``*``, ``Type:patient``, ``Type:subject``; a
connection that does not honour it refuses it by name) and ``_elements`` on DocumentReference.
Errors raise ``SearchError`` whose message names the parameter but never echoes a value (values
may be PHI).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta

from sandbox.config import ConnectionSpec
from sandbox.fhir import identifiers as ids
from sandbox.fhir.render import MEDICATION_KINDS, RESOURCE_ENTITIES, STATEMENT_STATUS
from sandbox.population.records import PatientRecord, Record
from sandbox.population.store import Query, RecordStore

Predicate = Callable[[Record], bool]

COMMON_PARAMS = frozenset({"_id", "_lastUpdated", "_count"})
POLICIES = ("redox", "open")
PATIENT_SCOPED = frozenset({"identifier", "patient", "patient.identifier", "date", "status"})
SEARCH_PARAMS: dict[str, frozenset[str]] = {
    "Patient": frozenset(
        {
            "identifier",
            "given",
            "family",
            "birthdate",
            "gender",
            "active",
            "address-city",
            "address-state",
            "address-postalcode",
            "phone",
            "email",
        }
    ),
    "Encounter": PATIENT_SCOPED,
    "Observation": PATIENT_SCOPED | {"subject", "effective", "category", "code"},
    "MedicationRequest": PATIENT_SCOPED | {"authoredon", "intent", "code"},
    "MedicationStatement": PATIENT_SCOPED | {"effective", "code"},
    "Appointment": PATIENT_SCOPED,
    "DocumentReference": PATIENT_SCOPED | {"category", "type", "_elements"},
    # The new clinical types: exactly the parameters their Redox pages list (REDOX-REFERENCE §3.3),
    # plus `identifier` (every resource has its business identifier).
    "Condition": frozenset(
        {"patient", "patient.identifier", "subject", "identifier", "category", "clinical-status", "encounter"}
        | {"recorded-date"}
    ),
    "AllergyIntolerance": frozenset({"patient", "patient.identifier", "identifier", "clinical-status"}),
    "Immunization": frozenset({"patient", "patient.identifier", "identifier", "date", "status"}),
    "Procedure": frozenset({"patient", "patient.identifier", "identifier", "date", "status", "code"}),
    "DiagnosticReport": frozenset(
        {"patient", "patient.identifier", "subject", "subject.identifier", "identifier", "date", "issued"}
        | {"status", "code", "category", "context", "context.identifier", "result", "result.identifier"}
    ),
    "ServiceRequest": frozenset(
        {"patient", "patient.identifier", "identifier", "occurrence", "occurrenceDateTime", "authored"}
        | {"status", "code"}
    ),
}
SEARCH_PARAMS["Patient"] = SEARCH_PARAMS["Patient"] | {"_revinclude"}
# Parameters that name the patient a search is about (``subject`` is Observation's own name).
PATIENT_PARAMS = frozenset({"patient", "patient.identifier", "subject", "subject.identifier"})
# Parameters that all mean the resource's clinical date (Query.date_*): an Observation's,
# DiagnosticReport's and Immunization's effective time, a Procedure's start, a ServiceRequest's
# authoredOn.
DATE_ALIASES = frozenset({"date", "effective", "authoredon", "authored"})
# Date parameters on another field than the clinical date: (resource type, param) -> attribute.
DATE_FIELDS: dict[tuple[str, str], str] = {
    ("Condition", "recorded-date"): "recorded_at",
    ("DiagnosticReport", "issued"): "issued_at",
    ("ServiceRequest", "occurrence"): "occurrence_at",
    ("ServiceRequest", "occurrenceDateTime"): "occurrence_at",
}


def _sets(*options: str) -> tuple[frozenset[str], ...]:
    """``"given+family+birthdate"`` -> frozenset({"given", "family", "birthdate"})."""
    return tuple(frozenset(o.split("+")) for o in options)


_PATIENT_OR = ("patient", "patient.identifier", "subject")
_SUBJECT_OR = (*_PATIENT_OR, "subject.identifier")
# One of these sets must be present in every search (REDOX-REFERENCE §3.3). "patient" always also
# means ``patient.identifier`` and, where FHIR names it so, ``subject``. Types the sandbox does not
# serve are listed too so the table reads as the reference does; they answer 404 before this.
REQUIRED: dict[str, tuple[frozenset[str], ...]] = {
    "Patient": _sets("_id", "identifier", "given+family+birthdate"),
    "Encounter": _sets("_id", "date", "status", "identifier", "patient", "patient.identifier"),
    "MedicationRequest": _sets("patient", "patient.identifier", "_id"),
    "MedicationStatement": _sets("patient", "patient.identifier", "_id"),
    "Procedure": _sets("patient", "patient.identifier", "_id"),
    "DocumentReference": _sets("_id", "identifier", "patient", "patient.identifier"),
    "Observation": _sets(*_PATIENT_OR, "_id", "identifier"),
    "Condition": _sets(*_PATIENT_OR, "_id", "identifier"),
    "AllergyIntolerance": _sets("patient", "patient.identifier", "_id", "identifier"),
    "Immunization": _sets("patient", "patient.identifier", "_id", "identifier"),
    "DiagnosticReport": _sets(*_SUBJECT_OR, "_id", "identifier"),
    "Appointment": _sets("patient", "patient.identifier", "date", "identifier", "_id"),
    "ServiceRequest": _sets("patient", "patient.identifier", "identifier", "_id"),
}
# ``search_policy: open`` (not Redox): the sandbox's old table, where ``_lastUpdated`` or any date
# parameter also satisfies the requirement for every type.
OPEN_REQUIRED: dict[str, tuple[frozenset[str], ...]] = {
    "Patient": _sets("_id", "identifier", "given+family+birthdate"),
    "Encounter": _sets("_id", "status", "identifier", "patient", "patient.identifier"),
    "MedicationRequest": _sets("_id", "patient", "patient.identifier"),
    "MedicationStatement": _sets("_id", "patient", "patient.identifier"),
}
# `_revinclude` targets: the resource types that point at a Patient, and the search parameters
# (``patient`` / ``subject``) a client may name them by. ``*`` means every one the connection has.
REVINCLUDE_TYPES = (
    "Encounter",
    "Observation",
    "MedicationRequest",
    "MedicationStatement",
    "Appointment",
    "DocumentReference",
    "Condition",
    "AllergyIntolerance",
    "Immunization",
    "Procedure",
    "DiagnosticReport",
    "ServiceRequest",
)
REVINCLUDE_PARAMS = frozenset({"patient", "subject"})
# Types whose patient reference is `patient` only (FHIR R4 defines no `subject` search for them).
_NO_SUBJECT_PARAM = frozenset({"AllergyIntolerance", "Immunization", "Appointment"})
# DocumentReference's top-level elements (FHIR R4): what `_elements` may name.
DOCUMENT_ELEMENTS = frozenset(
    {
        "id",
        "meta",
        "implicitRules",
        "language",
        "text",
        "contained",
        "extension",
        "modifierExtension",
        "masterIdentifier",
        "identifier",
        "status",
        "docStatus",
        "type",
        "category",
        "subject",
        "date",
        "author",
        "authenticator",
        "custodian",
        "relatesTo",
        "description",
        "securityLabel",
        "content",
        "context",
    }
)
# FHIR status value sets per resource type (what a client may send).
STATUS_VALUES: dict[str, frozenset[str]] = {
    "Encounter": frozenset(
        {
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    "Observation": frozenset(
        {
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    "MedicationRequest": frozenset(
        {"active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft", "unknown"}
    ),
    "MedicationStatement": frozenset(
        {"active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown", "not-taken"}
    ),
    "Appointment": frozenset(
        {
            "proposed",
            "pending",
            "booked",
            "arrived",
            "fulfilled",
            "cancelled",
            "noshow",
            "entered-in-error",
            "checked-in",
            "waitlist",
        }
    ),
    "DocumentReference": frozenset({"current", "superseded", "entered-in-error"}),
    "Immunization": frozenset({"completed", "entered-in-error", "not-done"}),
    "Procedure": frozenset(
        {
            "preparation",
            "in-progress",
            "not-done",
            "on-hold",
            "stopped",
            "completed",
            "entered-in-error",
            "unknown",
        }
    ),
    "DiagnosticReport": frozenset(
        {
            "registered",
            "partial",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "appended",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    "ServiceRequest": frozenset(
        {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
    ),
}
# `clinical-status` codes (condition-clinical, allergyintolerance-clinical).
CLINICAL_STATUS_VALUES: dict[str, frozenset[str]] = {
    "Condition": frozenset({"active", "recurrence", "relapse", "inactive", "remission", "resolved"}),
    "AllergyIntolerance": frozenset({"active", "inactive", "resolved"}),
}
_STATEMENT_STATUS_BACK = {fhir: canonical for canonical, fhir in STATEMENT_STATUS.items()}
_BUSINESS_SYSTEMS: dict[str, Callable[[str], str]] = {
    "Encounter": ids.visit_system,
    "Appointment": ids.visit_system,
    "Observation": ids.result_system,
    "MedicationRequest": ids.order_system,
    "MedicationStatement": ids.order_system,
    "DocumentReference": ids.document_system,
    "Condition": ids.problem_system,
    "AllergyIntolerance": ids.allergy_system,
    "Immunization": ids.immunization_system,
    "Procedure": ids.procedure_system,
    "DiagnosticReport": ids.order_system,
    "ServiceRequest": ids.order_system,
}
_PREFIX = re.compile(r"^(eq|ne|gt|lt|ge|le|sa|eb|ap)(?=\d)")
_DATE_VALUE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


class SearchError(Exception):
    """A search the sandbox refuses (400 unless said); the message names the parameter, never its
    value."""

    def __init__(self, message: str, code: str = "invalid", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


@dataclass(frozen=True)
class SearchPlan:
    """A parsed search: the store query, extra record filters, and the page size.

    ``query is None`` means the search provably matches nothing (e.g. an unknown identifier).
    ``revinclude`` lists the resource types whose records pointing at the matched patients join
    the result (``search.mode: include``); ``elements`` is the `_elements` subset, if any.
    """

    resource_type: str
    query: Query | None
    filters: tuple[Predicate, ...] = field(default=())
    count: int = 100
    revinclude: tuple[str, ...] = ()
    elements: tuple[str, ...] | None = None


# --- value parsing ----------------------------------------------------------------------------


def _split(value: str) -> list[str]:
    return [v for v in (part.strip() for part in value.split(",")) if v]


def _token(value: str) -> tuple[str | None, str]:
    """``system|code`` -> (system, code); ``|code`` -> ("", code); ``code`` -> (None, code)."""
    if "|" in value:
        system, _, code = value.partition("|")
        return system, code
    return None, value


def parse_date(name: str, raw: str) -> tuple[str, datetime, datetime, bool]:
    """(prefix, start, end-exclusive, is_instant) of a FHIR date search value."""
    match = _PREFIX.match(raw)
    prefix = match.group(1) if match else "eq"
    text = raw[len(prefix) :] if match else raw
    if prefix not in ("eq", "gt", "lt", "ge", "le"):
        raise SearchError(f"parameter '{name}': prefix '{prefix}' is not supported (use eq, gt, ge, lt, le)")
    m = _DATE_VALUE.match(text)
    if not m:
        raise SearchError(f"parameter '{name}': expected a FHIR date or dateTime such as 2024-01-31")
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    try:
        if hour is not None:
            value = datetime.fromisoformat(
                f"{year}-{month}-{day}T{hour}:{minute}:{second or '00'}{fraction or ''}"
                + ("+00:00" if zone in (None, "Z") else zone)
            ).astimezone(UTC)
            return prefix, value, value, True
        start = datetime(int(year), int(month or 1), int(day or 1), tzinfo=UTC)
    except ValueError as exc:
        raise SearchError(f"parameter '{name}': not a valid date") from exc
    if day is not None:
        end = start + timedelta(days=1)
    elif month is not None:
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        end = start.replace(year=start.year + 1)
    return prefix, start, end, False


@dataclass
class _Bounds:
    ge: datetime | None = None
    gt: datetime | None = None
    le: datetime | None = None
    lt: datetime | None = None

    def add(self, name: str, raw: str) -> None:
        prefix, start, end, exact = parse_date(name, raw)
        if exact:
            lower = {"eq": ("ge", start), "ge": ("ge", start), "gt": ("gt", start)}.get(prefix)
            upper = {"eq": ("le", start), "le": ("le", start), "lt": ("lt", start)}.get(prefix)
        else:
            lower = {"eq": ("ge", start), "ge": ("ge", start), "gt": ("ge", end)}.get(prefix)
            upper = {"eq": ("lt", end), "le": ("lt", end), "lt": ("lt", start)}.get(prefix)
        if lower:
            current = getattr(self, lower[0])
            setattr(self, lower[0], lower[1] if current is None else max(current, lower[1]))
        if upper:
            current = getattr(self, upper[0])
            setattr(self, upper[0], upper[1] if current is None else min(current, upper[1]))


# --- identifiers ------------------------------------------------------------------------------


def patient_identifiers(record: PatientRecord, conn: ConnectionSpec) -> list[tuple[str, str]]:
    """(system, value) of every identifier the rendered Patient carries."""
    out = []
    for id_type, value in (("MR", record.mrn), ("EHRID", record.ehr_id), ("NIST", record.nist_id)):
        if value and id_type in conn.id_types:
            out.append((ids.patient_system(conn.slug, id_type), value))
    out.append((ids.ENTERPRISE_SYSTEM, record.enterprise_id))
    if record.ssn:
        out.append((ids.SSN_SYSTEM, record.ssn))
    return out


def _patients_by_identifier(store: RecordStore, conn: ConnectionSpec, raw: str) -> set[str]:
    """Patient ids whose rendered identifiers match any of a comma list of identifier tokens."""
    found: set[str] = set()
    for item in _split(raw):
        system, value = _token(item)
        if not value:
            continue
        if system:
            id_type = ids.id_type_of_system(system, conn.slug)
            if id_type is None:
                continue  # another connection's or an unknown system: nothing here carries it
            store_type = ids.SSN_SYSTEM if id_type == "SSN" else id_type
            candidates = store.find_patients(conn.id, identifier=value, id_type=store_type)
        else:
            candidates = store.find_patients(conn.id, identifier=value)
        for patient in candidates:
            for have_system, have_value in patient_identifiers(patient, conn):
                if have_value == value and (not system or have_system == system):
                    found.add(patient.id)
                    break
    return found


def _records_by_identifier(
    store: RecordStore, conn: ConnectionSpec, resource_type: str, raw: str
) -> tuple[set[str] | None, Predicate | None]:
    """Ids of records whose business identifier matches, or a predicate for identifiers the
    store cannot look up (an encounter's account number)."""
    entity = RESOURCE_ENTITIES[resource_type]
    business = _BUSINESS_SYSTEMS[resource_type](conn.slug)
    found: set[str] = set()
    accounts: set[str] = set()
    for item in _split(raw):
        system, value = _token(item)
        if not value:
            continue
        if resource_type == "Encounter" and system == ids.account_system(conn.slug):
            accounts.add(value)
            continue
        if system and system != business:
            continue
        record = store.find_by_business_id(conn.id, entity, value)
        if record is not None:
            found.add(record.id)
    if accounts:
        return found, lambda r: r.id in found or getattr(r, "account_number", None) in accounts
    return found, None


# --- the parser -------------------------------------------------------------------------------


def parse_search(
    resource_type: str,
    params: Sequence[tuple[str, str]],
    conn: ConnectionSpec,
    store: RecordStore,
    policy: str = "redox",
) -> SearchPlan:
    """Turn (name, value) pairs (repeats allowed) into a SearchPlan, or raise SearchError."""
    allowed = SEARCH_PARAMS[resource_type] | COMMON_PARAMS
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        if name not in allowed:
            raise SearchError(
                f"unknown or unsupported search parameter '{name}' for {resource_type}", "not-supported"
            )
        grouped.setdefault(name, []).append(value)
    _check_required(resource_type, grouped, policy)
    revinclude = _revinclude(grouped.pop("_revinclude", []), conn)
    elements = _elements(grouped.pop("_elements")) if "_elements" in grouped else None

    count = conn.page_size
    if "_count" in grouped:
        raw = grouped["_count"][-1]
        if not raw.isdigit():
            raise SearchError("parameter '_count' must be a non-negative integer")
        count = int(raw)
    count = min(count, conn.max_page_size)

    entity = RESOURCE_ENTITIES[resource_type]
    filters: list[Predicate] = []
    empty = False
    id_sets: list[set[str]] = []
    updated, dated = _Bounds(), _Bounds()
    statuses: list[str] | None = None
    category: str | None = MEDICATION_KINDS.get(resource_type)
    patient_id: str | None = None

    for name, values in grouped.items():
        if name == "_id":
            for v in values:
                id_sets.append(set(_split(v)))
        elif name == "_lastUpdated":
            for v in values:
                updated.add(name, v)
        elif (resource_type, name) in DATE_FIELDS:
            filters.extend(_date_filter(name, v, DATE_FIELDS[(resource_type, name)]) for v in values)
        elif name in DATE_ALIASES:
            for v in values:
                dated.add(name, v)
        elif name == "clinical-status":
            wanted_status = _clinical_statuses(resource_type, values)
            statuses = wanted_status if statuses is None else [s for s in statuses if s in wanted_status]
        elif name in ("encounter", "context", "context.identifier"):
            filters.extend(_visit_filter(store, conn, name, v) for v in values)
        elif name in ("result", "result.identifier"):
            filters.extend(_result_filter(store, conn, name, v) for v in values)
        elif name == "identifier":
            for v in values:
                if resource_type == "Patient":
                    id_sets.append(_patients_by_identifier(store, conn, v))
                else:
                    found, predicate = _records_by_identifier(store, conn, resource_type, v)
                    if predicate is None:
                        id_sets.append(found)
                    else:
                        filters.append(predicate)
        elif name in PATIENT_PARAMS:
            for v in values:
                if name in ("patient", "subject"):
                    wanted = {x.removeprefix("Patient/") for x in _split(v)}
                else:
                    wanted = _patients_by_identifier(store, conn, v)
                if len(wanted) == 1 and patient_id is None:
                    patient_id = next(iter(wanted))
                elif not wanted or (patient_id is not None and patient_id not in wanted):
                    empty = True
                else:
                    filters.append(lambda r, w=frozenset(wanted): r.patient.patient_id in w)
        elif name == "status":
            wanted_status = _statuses(resource_type, values)
            statuses = wanted_status if statuses is None else [s for s in statuses if s in wanted_status]
        elif name == "active":
            for v in values:
                if v not in ("true", "false"):
                    raise SearchError("parameter 'active' must be true or false")
            flags = {v == "true" for v in values}
            if len(flags) > 1:
                empty = True
            statuses = ["active" if flags.pop() else "inactive"]
        elif name == "category" and resource_type in _FIXED_CATEGORY:
            # Every Condition served is a problem-list item, every DiagnosticReport a LAB report.
            fixed_system, fixed_code = _FIXED_CATEGORY[resource_type]
            for v in values:
                tokens = [_token(item) for item in _split(v)]
                if not any(
                    code == fixed_code and system in (None, "", fixed_system) for system, code in tokens
                ):
                    empty = True
        elif name == "category":
            # Observation: the five categories; DocumentReference: note | cda (Query.category).
            wanted_categories = set(_CATEGORY_CODES[resource_type])
            for v in values:
                wanted_categories &= _categories(resource_type, v)
            if not wanted_categories:
                empty = True
            elif len(wanted_categories) == 1:
                category = next(iter(wanted_categories))
            else:
                filters.append(lambda r, w=frozenset(wanted_categories): r.category in w)
        elif name in ("code", "type"):
            filters.extend(_coding_filter(v, name) for v in values)
        elif name == "intent":
            filters.extend(lambda r, w=frozenset(_split(v)): (r.intent or "order") in w for v in values)
        elif name == "gender":
            filters.extend(lambda r, w=frozenset(_split(v)): r.sex in w for v in values)
        elif name in ("given", "family", "birthdate", "_count"):
            continue  # resolved together below / already read
        else:
            filters.extend(_patient_filter(name, v) for v in values)

    if any(n in grouped for n in ("given", "family", "birthdate")):
        id_sets.append(_patients_by_name(store, conn, grouped))

    ids_selected: set[str] | None = None
    for s in id_sets:
        ids_selected = s if ids_selected is None else ids_selected & s
    if empty or (ids_selected is not None and not ids_selected) or statuses == []:
        return SearchPlan(resource_type, None, (), count, revinclude, elements)
    query = Query(
        connection_id=conn.id,
        entity=entity,
        ids=tuple(sorted(ids_selected)) if ids_selected is not None else None,
        patient_id=patient_id,
        updated_ge=updated.ge,
        updated_gt=updated.gt,
        updated_le=updated.le,
        updated_lt=updated.lt,
        date_ge=dated.ge,
        date_gt=dated.gt,
        date_le=dated.le,
        date_lt=dated.lt,
        statuses=tuple(statuses) if statuses is not None else None,
        category=category,
    )
    return SearchPlan(resource_type, query, tuple(filters), count, revinclude, elements)


def describe_sets(options: tuple[frozenset[str], ...]) -> str:
    """``_id | identifier | given+family+birthdate`` (each set's names in a fixed order)."""
    order = ("given", "family", "birthdate")
    return " | ".join(
        "+".join(sorted(o, key=lambda n: (order.index(n) if n in order else -1, n))) for o in options
    )


def _check_required(resource_type: str, grouped: dict[str, list[str]], policy: str) -> None:
    """Refuse a search that carries none of its resource's required sets (blank values do not
    count as sent)."""
    if policy not in POLICIES:
        raise ValueError(f"search_policy must be one of {POLICIES}")
    present = {n for n, values in grouped.items() if n != "_count" and any(v.strip() for v in values)}
    if policy == "open":
        if "_lastUpdated" in present or present & DATE_ALIASES:
            return
        options = OPEN_REQUIRED.get(resource_type)
    else:
        options = REQUIRED.get(resource_type)
    if not options or any(option <= present for option in options):
        return
    extra = " (or _lastUpdated / date)" if policy == "open" else "; _lastUpdated and _count never satisfy it"
    raise SearchError(
        f"{resource_type} search requires one of these parameter sets: {describe_sets(options)}{extra}",
        "required",
    )


def _revinclude(values: list[str], conn: ConnectionSpec) -> tuple[str, ...]:
    """The resource types a Patient search's `_revinclude` values ask for, in a fixed order."""
    if not values:
        return ()
    if not conn.revinclude:
        raise SearchError(
            "search parameter '_revinclude' is not supported by this destination; "
            "search each resource type by patient instead",
            "not-supported",
        )
    entitled = [t for t in REVINCLUDE_TYPES if RESOURCE_ENTITIES[t] in conn.entities]
    wanted: set[str] = set()
    for value in values:
        for item in _split(value):
            if item == "*":
                wanted.update(entitled)
                continue
            rtype, _, param = item.partition(":")
            target = param.partition(":")[2]
            names = REVINCLUDE_PARAMS - {"subject"} if rtype in _NO_SUBJECT_PARAM else REVINCLUDE_PARAMS
            if rtype not in REVINCLUDE_TYPES or param.partition(":")[0] not in names:
                raise SearchError(
                    "parameter '_revinclude' takes * or Type:patient / Type:subject with Type one of "
                    + ", ".join(REVINCLUDE_TYPES)
                )
            if target not in ("", "Patient"):
                raise SearchError("parameter '_revinclude': the only target type is Patient")
            if rtype not in entitled:
                raise SearchError(
                    f"this connection is not entitled to {rtype} ({RESOURCE_ENTITIES[rtype]})",
                    "forbidden",
                    403,
                )
            wanted.add(rtype)
    return tuple(t for t in REVINCLUDE_TYPES if t in wanted)


def _elements(values: list[str]) -> tuple[str, ...]:
    """DocumentReference elements named by `_elements` (comma lists, repeats merged)."""
    names = [n for v in values for n in _split(v)]
    if not names:
        raise SearchError("parameter '_elements' needs a comma list of DocumentReference elements")
    unknown = [n for n in names if n not in DOCUMENT_ELEMENTS]
    if unknown:
        raise SearchError(
            f"parameter '_elements': {len(unknown)} name(s) are not DocumentReference elements "
            "(for example subject,masterIdentifier,date,type,context)"
        )
    return tuple(dict.fromkeys(names))


def _statuses(resource_type: str, values: list[str]) -> list[str]:
    known = STATUS_VALUES.get(resource_type)
    if known is None:
        raise SearchError(
            f"unknown or unsupported search parameter 'status' for {resource_type}", "not-supported"
        )
    out: list[str] = []
    for v in values:
        for item in _split(v):
            _, code = _token(item)
            if code not in known:
                raise SearchError(f"parameter 'status': not a {resource_type} status code")
            if resource_type == "MedicationStatement":
                if code in STATEMENT_STATUS:  # FHIR has no such statement status
                    continue
                code = _STATEMENT_STATUS_BACK.get(code, code)
            out.append(code)
    return out


def _coding_filter(raw: str, attribute: str) -> Predicate:
    """``code`` (results, medications) or ``type`` (documents) against a comma list of tokens."""
    wanted = [_token(item) for item in _split(raw)]

    def matches(record: Record) -> bool:
        coded = getattr(record, attribute, None)
        return coded is not None and any(
            coded.code == code and (system in (None, "") or system == coded.system) for system, code in wanted
        )

    return matches


_CATEGORY_CODES: dict[str, tuple[str, ...]] = {
    "Observation": ("laboratory", "vital-signs", "social-history", "survey", "exam"),
    "DocumentReference": ("note", "cda"),
}
_FIXED_CATEGORY: dict[str, tuple[str, str]] = {
    "Condition": (ids.CONDITION_CATEGORY, "problem-list-item"),
    "DiagnosticReport": (ids.DIAGNOSTIC_SERVICE_SECTION, "LAB"),
}


def _categories(resource_type: str, raw: str) -> set[str]:
    """The canonical categories a comma list of category tokens selects."""
    out: set[str] = set()
    for item in _split(raw):
        system, code = _token(item)
        if resource_type == "Observation":
            if system in (None, "", ids.OBSERVATION_CATEGORY) and code in _CATEGORY_CODES[resource_type]:
                out.add(code)
        elif system in (None, "", ids.DOCUMENT_KIND) and code.lower() in ("cda", "note"):
            out.add(code.lower())
        elif system in (None, "", ids.DOCUMENT_CATEGORY) and code == "clinical-note":
            out |= {"cda", "note"}
    return out


def _clinical_statuses(resource_type: str, values: list[str]) -> list[str]:
    known = CLINICAL_STATUS_VALUES[resource_type]
    out: list[str] = []
    for v in values:
        for item in _split(v):
            _, code = _token(item)
            if code not in known:
                raise SearchError(f"parameter 'clinical-status': not a {resource_type} clinical status code")
            out.append(code)
    return out


def _date_filter(name: str, raw: str, attribute: str) -> Predicate:
    """A date parameter on a field other than the clinical date (``recorded-date``, ``issued``,
    ``occurrence``): records without the field never match."""
    bounds = _Bounds()
    bounds.add(name, raw)

    def matches(record: Record) -> bool:
        value = getattr(record, attribute, None)
        if value is None:
            return False
        return (
            (bounds.ge is None or value >= bounds.ge)
            and (bounds.gt is None or value > bounds.gt)
            and (bounds.le is None or value <= bounds.le)
            and (bounds.lt is None or value < bounds.lt)
        )

    return matches


def _visit_filter(store: RecordStore, conn: ConnectionSpec, name: str, raw: str) -> Predicate:
    """``encounter`` / ``context`` (Encounter/<id>) or ``context.identifier`` (visit number token):
    records of those visits."""
    visits: set[str] = set()
    for item in _split(raw):
        if name == "context.identifier":
            system, value = _token(item)
            if value and system in (None, "", ids.visit_system(conn.slug)):
                visits.add(value)
            continue
        encounter = store.get(conn.id, "encounters", item.removeprefix("Encounter/"))
        if encounter is not None:
            visits.add(encounter.visit_number)  # type: ignore[attr-defined]
    return lambda r: getattr(r, "visit_number", None) in visits


def _result_filter(store: RecordStore, conn: ConnectionSpec, name: str, raw: str) -> Predicate:
    """``result`` (Observation/<id>) or ``result.identifier`` (ResultID token): reports that
    group one of those Observations."""
    wanted: set[str] = set()
    for item in _split(raw):
        if name == "result":
            wanted.add(item.removeprefix("Observation/"))
            continue
        system, value = _token(item)
        if value and system in (None, "", ids.result_system(conn.slug)):
            found = store.find_by_business_id(conn.id, "results", value)
            if found is not None:
                wanted.add(found.id)
    return lambda r: bool(wanted.intersection(getattr(r, "result_ids", ())))


def _digits(value: str | None) -> str:
    return "".join(ch for ch in value or "" if ch.isdigit())


def _patient_filter(name: str, raw: str) -> Predicate:
    wanted = raw.strip().lower()
    if name == "phone":
        digits = _digits(raw)
        return lambda r: bool(digits) and digits in (_digits(r.phone_home), _digits(r.phone_mobile))
    attribute = {
        "address-city": "city",
        "address-state": "state",
        "address-postalcode": "postal_code",
        "email": "email",
    }[name]
    return lambda r: (getattr(r, attribute) or "").lower() == wanted


def _patients_by_name(store: RecordStore, conn: ConnectionSpec, grouped: dict[str, list[str]]) -> set[str]:
    birth: str | None = None
    if "birthdate" in grouped:
        raw = grouped["birthdate"][-1]
        text = raw[2:] if raw.startswith("eq") else raw
        try:
            birth = date.fromisoformat(text).isoformat()
        except ValueError as exc:
            raise SearchError("parameter 'birthdate' must be an exact date such as 1990-01-31") from exc
    family = grouped.get("family", [None])[-1]
    given = grouped.get("given", [None])[-1]
    return {p.id for p in store.find_patients(conn.id, family=family, given=given, birth_date=birth)}


def with_updated_floor(query: Query, floor: datetime) -> Query:
    """The query restricted to records updated at or after ``floor`` (keyset paging)."""
    return replace(query, updated_ge=floor if query.updated_ge is None else max(query.updated_ge, floor))
