"""Every identifier system, code system and extension URL the FHIR surface emits or reads.

Kept in one place so the renderer, the search layer, the write-back validator and the
``--seed-from`` loader agree, and so a real destination's systems can be swapped in here.
Redox's systems look like ``urn:redox:<destination-slug>:<type>`` (REDOX-REFERENCE §2.4).
"""

from __future__ import annotations

from functools import partial

from sandbox.population.records import NPI_SYSTEM

# The enterprise (person) id is the same system in every connection so a client can link people.
ENTERPRISE_SYSTEM = "urn:redox:enterprise:EPI"
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
NPI = NPI_SYSTEM

# Local patient identifier types, in the order they are rendered (EPI is always rendered).
PATIENT_ID_TYPES: tuple[str, ...] = ("MR", "EHRID", "NIST")

UCUM = "http://unitsofmeasure.org"
V2_IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
V3_MARITAL_STATUS = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
V3_PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
LOCATION_PHYSICAL_TYPE = "http://terminology.hl7.org/CodeSystem/location-physical-type"
DOCUMENT_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
DOCUMENT_KIND = "urn:redox:document_kind"  # Redox's DocumentReference category (REDOX-REFERENCE §3.3)
DISCHARGE_DISPOSITION = "http://terminology.hl7.org/CodeSystem/discharge-disposition"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
DIAGNOSTIC_SERVICE_SECTION = "http://terminology.hl7.org/CodeSystem/v2-0074"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
BCP47 = "urn:ietf:bcp:47"
CDC_RACE_ETHNICITY = "urn:oid:2.16.840.1.113883.6.238"

US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
# Redox carries the replaced visit number of a rescheduled appointment (REDOX-REFERENCE §3.5).
RESCHEDULED_FROM_EXTENSION = "urn:redox:extension:appointment:oldVisitNumber"

EVENT_TYPE_SYSTEM = "urn:redox:event-type"


def connection_system(slug: str, id_type: str) -> str:
    """``urn:redox:{slug}:{id_type}``: one connection's identifier system for one identifier type
    (the only place that spells the shape; ``id_type_of_system`` reads it back)."""
    return f"urn:redox:{slug}:{id_type}"


def patient_system(slug: str, id_type: str) -> str:
    """``urn:redox:{slug}:MR`` and friends; EPI is connection-independent."""
    if id_type == "EPI":
        return ENTERPRISE_SYSTEM
    return connection_system(slug, id_type)


# The business identifier systems of a connection's records, by record: ``visit_system(slug)``.
visit_system = partial(connection_system, id_type="VN")
account_system = partial(connection_system, id_type="AN")
order_system = partial(connection_system, id_type="OrderID")
result_system = partial(connection_system, id_type="ResultID")
document_system = partial(connection_system, id_type="DocumentID")
problem_system = partial(connection_system, id_type="ProblemID")
allergy_system = partial(connection_system, id_type="AllergyID")
immunization_system = partial(connection_system, id_type="ImmunizationID")
procedure_system = partial(connection_system, id_type="ProcedureID")


def id_type_of_system(system: str, slug: str | None = None) -> str | None:
    """The identifier type a system names (``MR``, ``EHRID``, ``NIST``, ``EPI``, ``SSN``,
    ``VN``, ``AN``, ``OrderID``, ``ResultID``, ``DocumentID``), or None for a foreign system.
    With ``slug`` only this connection's systems count."""
    if system == ENTERPRISE_SYSTEM:
        return "EPI"
    if system == SSN_SYSTEM:
        return "SSN"
    if not system.startswith("urn:redox:"):
        return None
    head, _, suffix = system.rpartition(":")
    if slug is not None and head != f"urn:redox:{slug}":
        return None
    return suffix or None


def patient_reference(patient_id: str) -> str:
    return f"Patient/{patient_id}"
