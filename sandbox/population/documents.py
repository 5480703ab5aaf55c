"""Document content: plain-text progress notes and C-CDA-like ClinicalDocument XML.

The content is a pure function of the records passed in, so it is byte-identical for the same
seed. The CDA follows the C-CDA CCD header and section layout (template ids, LOINC section
codes, narrative tables) closely enough to look real to a parser; it is not a validated C-CDA.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime
from xml.sax.saxutils import escape, quoteattr

from sandbox.population import vocab
from sandbox.population.records import (
    Coding,
    EncounterRecord,
    MedicationRecord,
    PatientRecord,
    Provider,
    ResultRecord,
)

_LOINC_OID = "2.16.840.1.113883.6.1"
_GENDER = {"male": "M", "female": "F", "other": "UN", "unknown": "UNK"}


def _ts(dt: datetime) -> str:
    return dt.strftime("%Y%m%d%H%M%S+0000")


def _name(p: Provider) -> str:
    return f"{p.first_name} {p.last_name}, {', '.join(p.credentials)}"


def note_text(
    *,
    patient: PatientRecord,
    title: str,
    authored_at: datetime,
    author: Provider,
    encounter: EncounterRecord | None,
    rng: random.Random,
) -> bytes:
    given = " ".join(patient.given_names)
    lines = [
        title.upper(),
        "",
        f"Patient: {patient.family_name}, {given}    MRN: {patient.mrn}    DOB: {patient.birth_date.isoformat()}",
        f"Date of service: {authored_at.strftime('%Y-%m-%d %H:%M UTC')}",
        f"Author: {_name(author)}",
    ]
    if encounter is not None:
        lines.append(
            f"Visit: {encounter.visit_number} ({encounter.location.facility}, {encounter.location.department})"
        )
    reason = encounter.reason.display if encounter is not None and encounter.reason else "Routine follow-up"
    lines += [
        "",
        f"CHIEF COMPLAINT: {reason}",
        "",
        f"SUBJECTIVE: {rng.choice(vocab.SUBJECTIVE)}",
        "",
        "OBJECTIVE: Vital signs reviewed. Patient is alert and oriented, in no acute distress.",
        "",
        f"ASSESSMENT: {reason}.",
        "",
        f"PLAN: {rng.choice(vocab.PLANS)}",
        "",
        f"Electronically signed by {_name(author)} on {authored_at.strftime('%Y-%m-%d')}.",
        "",
    ]
    return "\n".join(lines).encode()


def _code(tag: str, c: Coding, oid: str = _LOINC_OID) -> str:
    return f"<{tag} code={quoteattr(c.code)} codeSystem={quoteattr(oid)} displayName={quoteattr(c.display)}/>"


def _section(
    template: str, code: str, title: str, header: Sequence[str], rows: Sequence[Sequence[str]]
) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    if rows:
        body = "".join("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in r) + "</tr>" for r in rows)
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    else:
        table = "<paragraph>No information available.</paragraph>"
    return (
        "<component><section>"
        f'<templateId root="{template}"/>'
        f'<code code="{code}" codeSystem="{_LOINC_OID}" codeSystemName="LOINC"/>'
        f"<title>{escape(title)}</title><text>{table}</text>"
        "</section></component>"
    )


def cda_xml(
    *,
    document_id: str,
    doc_type: Coding,
    title: str,
    patient: PatientRecord,
    author: Provider,
    custodian: str,
    authored_at: datetime,
    encounters: Sequence[EncounterRecord],
    medications: Sequence[MedicationRecord],
    results: Sequence[ResultRecord],
) -> bytes:
    given = "".join(f"<given>{escape(g)}</given>" for g in patient.given_names)
    addr = ""
    if patient.address_line:
        addr = (
            f'<addr use="HP"><streetAddressLine>{escape(patient.address_line)}</streetAddressLine>'
            f"<city>{escape(patient.city or '')}</city><state>{escape(patient.state or '')}</state>"
            f"<postalCode>{escape(patient.postal_code or '')}</postalCode><country>US</country></addr>"
        )
    telecom = f'<telecom use="HP" value="tel:{escape(patient.phone_home)}"/>' if patient.phone_home else ""
    enc_rows = [
        (
            e.start_at.strftime("%Y-%m-%d"),
            e.type.display,
            e.class_code,
            e.reason.display if e.reason else "",
            e.location.facility,
        )
        for e in encounters
    ]
    med_rows = [
        (
            m.code.display,
            m.code.code,
            f"{m.dose_quantity:g} {m.dose_unit}" if m.dose_quantity is not None else "",
            m.status,
            m.start_at.strftime("%Y-%m-%d") if m.start_at else "",
        )
        for m in medications
    ]
    lab_rows = [
        (
            r.effective_at.strftime("%Y-%m-%d"),
            r.code.display,
            r.value_text or "",
            r.unit or "",
            r.abnormal_flag or "",
        )
        for r in results
        if r.category == "laboratory"
    ]
    vital_rows = [
        (r.effective_at.strftime("%Y-%m-%d"), r.code.display, r.value_text or "", r.unit or "")
        for r in results
        if r.category == "vital-signs"
    ]
    sections = "".join(
        [
            _section("2.16.840.1.113883.10.20.22.2.22.1", "46240-8", "Encounters",
                     ("Date", "Type", "Class", "Reason", "Location"), enc_rows),
            _section("2.16.840.1.113883.10.20.22.2.1.1", "10160-0", "Medications",
                     ("Medication", "RxNorm", "Dose", "Status", "Start"), med_rows),
            _section("2.16.840.1.113883.10.20.22.2.3.1", "30954-2", "Results",
                     ("Date", "Test", "Value", "Unit", "Flag"), lab_rows),
            _section("2.16.840.1.113883.10.20.22.2.4.1", "8716-3", "Vital Signs",
                     ("Date", "Measurement", "Value", "Unit"), vital_rows),
        ]
    )  # fmt: skip
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        '<realmCode code="US"/>'
        '<typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>'
        '<templateId root="2.16.840.1.113883.10.20.22.1.1" extension="2015-08-01"/>'
        '<templateId root="2.16.840.1.113883.10.20.22.1.2" extension="2015-08-01"/>'
        f"<id root={quoteattr(document_id)}/>"
        f"{_code('code', doc_type)}"
        f"<title>{escape(title)}</title>"
        f'<effectiveTime value="{_ts(authored_at)}"/>'
        '<confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/>'
        '<languageCode code="en-US"/>'
        "<recordTarget><patientRole>"
        f'<id extension={quoteattr(patient.mrn)} root="2.16.840.1.113883.19.5"/>'
        f"{addr}{telecom}"
        f'<patient><name use="L">{given}<family>{escape(patient.family_name)}</family></name>'
        f'<administrativeGenderCode code="{_GENDER.get(patient.sex, "UNK")}" codeSystem="2.16.840.1.113883.5.1"/>'
        f'<birthTime value="{patient.birth_date.strftime("%Y%m%d")}"/></patient>'
        "</patientRole></recordTarget>"
        f'<author><time value="{_ts(authored_at)}"/><assignedAuthor>'
        f'<id extension={quoteattr(author.npi)} root="2.16.840.1.113883.4.6"/>'
        f"<assignedPerson><name><given>{escape(author.first_name)}</given><family>{escape(author.last_name)}</family>"
        f"<suffix>{escape(', '.join(author.credentials))}</suffix></name></assignedPerson>"
        "</assignedAuthor></author>"
        "<custodian><assignedCustodian><representedCustodianOrganization>"
        f"<name>{escape(custodian)}</name>"
        "</representedCustodianOrganization></assignedCustodian></custodian>"
        f"<component><structuredBody>{sections}</structuredBody></component>"
        "</ClinicalDocument>\n"
    )
    return xml.encode()
