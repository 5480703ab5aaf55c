"""What every column of the common model means, and where each surface keeps it.

The single source of column documentation: DuckDB ``COMMENT``s on the warehouse tables,
Dagster ``dagster/column_schema`` metadata and the column tables in ``warehouse/README.md``
are all generated from this mapping, so the three never disagree. A column of
``pipelines/model.py`` without an entry here is a defect (a test checks it).

Shape: ``COLUMN_DOCS[table][column] = ColumnDoc(description, fhir_path, datamodel_field)``;
``fhir_path`` / ``datamodel_field`` are ``""`` where a surface does not carry the column.
"""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa

from pipelines.analytics.views import VIEW_QUESTIONS


class ColumnDoc(NamedTuple):
    description: str
    fhir_path: str = ""
    datamodel_field: str = ""


# Lineage columns lead every table of the common model (pipelines/model.py LINEAGE).
LINEAGE_DOCS: dict[str, ColumnDoc] = {
    "connection_id": ColumnDoc("The Redox connection (one EHR or network) the row came from."),
    "patient_key": ColumnDoc(
        "The patient inside the connection, resolved through redox.patient_identifiers."
    ),
    "source_surface": ColumnDoc("Which Redox API the row was seen through: fhir, datamodel or both."),
    "source_id": ColumnDoc(
        "The record's id on the surface it was first seen through.", "Resource.id", "record id"
    ),
    "source_updated_at": ColumnDoc(
        "The source's own last-updated or clinical time of this version (never the query time).",
        "Resource.meta.lastUpdated",
        "Meta.EventDateTime / record timestamp",
    ),
    "ingested_at": ColumnDoc("When this pipeline staged the row (UTC)."),
    "raw_ref": ColumnDoc("The landing file under responses/ holding the payload the row came from."),
}

_PATIENTS: dict[str, ColumnDoc] = {
    "mrn": ColumnDoc(
        "Local medical record number in this connection.",
        "Patient.identifier[system=urn:redox:<slug>:MR].value",
        "Patient.Identifiers[IDType=MR or MRN].ID",
    ),
    "enterprise_id": ColumnDoc(
        "Enterprise id shared by every connection that knows the person (links redox.persons).",
        "Patient.identifier[system=urn:redox:enterprise:EPI].value",
        "Patient.Identifiers[IDType=EPI].ID",
    ),
    "ehr_id": ColumnDoc(
        "The EHR's internal patient id.",
        "Patient.identifier[system=…:EHRID].value",
        "Patient.Identifiers[IDType=EHRID].ID",
    ),
    "nist_id": ColumnDoc(
        "NIST patient id (only some connections carry one).",
        "Patient.identifier[system=…:NIST].value",
        "Patient.Identifiers[IDType=NIST].ID",
    ),
    "family_name": ColumnDoc("Family (last) name.", "Patient.name[official].family", "Demographics.LastName"),
    "given_names": ColumnDoc(
        "Given names, space-separated.",
        "Patient.name[official].given joined by spaces",
        "Demographics.FirstName + ' ' + Demographics.MiddleName",
    ),
    "birth_date": ColumnDoc("Date of birth.", "Patient.birthDate", "Demographics.DOB"),
    "sex": ColumnDoc(
        "Administrative sex: male, female, other, unknown.",
        "Patient.gender",
        "Demographics.Sex lowercased (anything else -> unknown)",
    ),
    "deceased_at": ColumnDoc(
        "Time of death, when known.", "Patient.deceasedDateTime", "Demographics.DeathDateTime"
    ),
    "race": ColumnDoc(
        "Race (text).", "US Core race extension text / ombCategory display", "Demographics.Race"
    ),
    "ethnicity": ColumnDoc(
        "Ethnicity: 'Hispanic or Latino' / 'Not Hispanic or Latino'.",
        "US Core ethnicity extension",
        "Demographics.IsHispanic (true/false), else Demographics.Ethnicity",
    ),
    "language": ColumnDoc(
        "Preferred language (BCP-47).",
        "Patient.communication[0].language.coding[0].code",
        "Demographics.Language",
    ),
    "address_line": ColumnDoc(
        "Street address.", "Patient.address[0].line joined", "Demographics.Address.StreetAddress"
    ),
    "city": ColumnDoc("City.", "Patient.address[0].city", "Demographics.Address.City"),
    "state": ColumnDoc("State (two-letter code).", "Patient.address[0].state", "Demographics.Address.State"),
    "postal_code": ColumnDoc("ZIP code.", "Patient.address[0].postalCode", "Demographics.Address.ZIP"),
    "phone": ColumnDoc(
        "Phone number (E.164).",
        "Patient.telecom[system=phone, use=home] (else the first phone)",
        "Demographics.PhoneNumber.Home, else .Mobile",
    ),
    "email": ColumnDoc(
        "Email address.", "Patient.telecom[system=email].value", "Demographics.EmailAddresses[0]"
    ),
    "is_test": ColumnDoc("A Redox test patient.", "Patient.meta.tag TEST", "Meta.Test"),
    "active": ColumnDoc(
        "Whether the record is in active use.", "Patient.active", "always true (no inactive flag)"
    ),
}

_ENCOUNTERS: dict[str, ColumnDoc] = {
    "encounter_id": ColumnDoc(
        "The visit number (business key, both surfaces).",
        "Encounter.identifier[system=…:VN].value",
        "Visit.VisitNumber (Clinical Summary: Encounters[].Identifiers[IDType=VN].ID)",
    ),
    "status": ColumnDoc(
        "planned, arrived, in-progress, finished, cancelled, entered-in-error.",
        "Encounter.status",
        "the PatientAdmin event (PreAdmit -> planned, Arrival/Registration/Transfer -> in-progress, "
        "Discharge -> finished, Cancel -> cancelled); queries: Visit.Status",
    ),
    "class": ColumnDoc(
        "v3 ActCode: AMB, IMP, EMER, OBSENC, VR, HH.",
        "Encounter.class.code",
        "Visit.PatientClass (Inpatient -> IMP, Outpatient -> AMB, Emergency -> EMER, Observation -> OBSENC, "
        "Virtual -> VR, Home Health -> HH)",
    ),
    "type_code": ColumnDoc(
        "Visit type code (CPT / SNOMED).", "Encounter.type[0].coding[0].code", "Visit.Type (coded)"
    ),
    "type_system": ColumnDoc(
        "Visit type code system (URI).", "Encounter.type[0].coding[0].system", "Visit.Type codeset"
    ),
    "type_display": ColumnDoc(
        "Visit type, display text.", "Encounter.type[0].coding[0].display", "Visit.Type"
    ),
    "start_at": ColumnDoc("Start of the visit (admission).", "Encounter.period.start", "Visit.VisitDateTime"),
    "end_at": ColumnDoc("End of the visit (discharge).", "Encounter.period.end", "Visit.DischargeDateTime"),
    "location": ColumnDoc("Facility.", "Encounter.serviceProvider.display", "Visit.Location.Facility"),
    "department": ColumnDoc(
        "Department (unit).", "Encounter.location[0].location.display", "Visit.Location.Department"
    ),
    "attending_npi": ColumnDoc(
        "Attending provider NPI.",
        "Encounter.participant[type=ATND].individual.identifier.value",
        "Visit.AttendingProvider.NPI (or .ID when IDType is NPI)",
    ),
    "reason_code": ColumnDoc(
        "Reason for the visit (ICD-10 code).",
        "Encounter.reasonCode[0].coding[0].code",
        "Visit.Diagnoses[0].Code",
    ),
    "reason_system": ColumnDoc(
        "Reason code system (URI).", "Encounter.reasonCode[0].coding[0].system", "Visit.Diagnoses[0].Codeset"
    ),
    "reason_display": ColumnDoc(
        "Reason for the visit, text.",
        "Encounter.reasonCode[0].coding[0].display",
        "Visit.Diagnoses[0].Name, else Visit.Reason",
    ),
    "discharge_disposition": ColumnDoc(
        "Where the patient went at discharge.",
        "Encounter.hospitalization.dischargeDisposition",
        "Visit.DischargeStatus.Description (else .Code)",
    ),
}

_RESULTS: dict[str, ColumnDoc] = {
    "result_id": ColumnDoc(
        "Result business key: '<order id>-<LOINC>' (flowsheet / summary entries: a digest).",
        "Observation.identifier[system=…:ResultID].value",
        "<Orders[].ID>-<Results[].Code>",
    ),
    "encounter_id": ColumnDoc(
        "The visit number the result belongs to.",
        "Observation.encounter.identifier.value",
        "Visit.VisitNumber",
    ),
    "order_id": ColumnDoc(
        "Accession / order number.",
        "Observation.basedOn[0].identifier.value",
        "Orders[].ID (else ApplicationOrderID)",
    ),
    "category": ColumnDoc(
        "laboratory or vital-signs.",
        "Observation.category[0].coding[0].code",
        "vital-signs when Orders[].Procedure.Code is a LOINC vital-signs panel (and Flowsheet), else laboratory",
    ),
    "code": ColumnDoc("What was measured (LOINC code).", "Observation.code.coding[0].code", "Results[].Code"),
    "code_system": ColumnDoc(
        "Code system (URI).", "Observation.code.coding[0].system", "Results[].Codeset -> URI"
    ),
    "display": ColumnDoc(
        "What was measured, text.", "Observation.code.coding[0].display", "Results[].Description"
    ),
    "value_numeric": ColumnDoc(
        "Numeric value.", "Observation.valueQuantity.value", "Results[].Value when ValueType is numeric"
    ),
    "value_text": ColumnDoc(
        "The value as text (also for numeric values).",
        "Observation.valueString / valueCodeableConcept / the number as text",
        "Results[].Value",
    ),
    "unit": ColumnDoc("Unit (UCUM).", "Observation.valueQuantity.code", "Results[].Units"),
    "reference_low": ColumnDoc(
        "Low end of the reference range.",
        "Observation.referenceRange[0].low.value",
        "Results[].ReferenceRange.Low",
    ),
    "reference_high": ColumnDoc(
        "High end of the reference range.",
        "Observation.referenceRange[0].high.value",
        "Results[].ReferenceRange.High",
    ),
    "reference_text": ColumnDoc(
        "Reference range as text.", "Observation.referenceRange[0].text", "Results[].ReferenceRange.Text"
    ),
    "abnormal_flag": ColumnDoc(
        "Interpretation: H, L, HH, LL, A, N.",
        "Observation.interpretation[0].coding[0].code",
        "Results[].AbnormalFlag (High -> H, Low -> L, Critical High -> HH, Critical Low -> LL, Abnormal -> A, Normal -> N)",
    ),
    "status": ColumnDoc(
        "final, preliminary, corrected, cancelled, entered-in-error.",
        "Observation.status",
        "Results[].Status, else Orders[].ResultsStatus",
    ),
    "effective_at": ColumnDoc(
        "Clinically relevant time (collection).",
        "Observation.effectiveDateTime",
        "Orders[].CollectionDateTime, else Results[].CompletionDateTime",
    ),
    "issued_at": ColumnDoc(
        "When the result was released.",
        "Observation.issued",
        "Results[].CompletionDateTime, else Orders[].CompletionDateTime",
    ),
    "performer": ColumnDoc(
        "Who performed it (NPI or name).",
        "Observation.performer[0] NPI or display",
        "Results[].Performer NPI / ID, else Producer.Name",
    ),
}

_MEDICATIONS: dict[str, ColumnDoc] = {
    "medication_id": ColumnDoc(
        "Medication order number (business key).",
        "MedicationRequest.identifier[system=…:OrderID].value",
        "Order.ID (administrations: <Order.ID>-administration-<StartDate>)",
    ),
    "encounter_id": ColumnDoc(
        "The visit number the order belongs to.",
        "MedicationRequest.encounter.identifier.value / context",
        "Visit.VisitNumber",
    ),
    "kind": ColumnDoc(
        "request, statement or administration.",
        "resource type",
        "Order -> request; Administrations -> administration",
    ),
    "status": ColumnDoc(
        "active, completed, stopped, on-hold, cancelled, entered-in-error.",
        "MedicationRequest.status / MedicationStatement.status",
        "the event: Cancel -> cancelled; New / Update -> active, or completed once EndDate has passed",
    ),
    "intent": ColumnDoc(
        "Request intent ('order'); null for statements.", "MedicationRequest.intent", "order for Order events"
    ),
    "code": ColumnDoc(
        "The medication (RxNorm code).", "medicationCodeableConcept.coding[0].code", "Medication.Product.Code"
    ),
    "code_system": ColumnDoc(
        "Code system (URI).",
        "medicationCodeableConcept.coding[0].system",
        "Medication.Product.CodeSystemName -> URI",
    ),
    "display": ColumnDoc(
        "The medication, text.", "medicationCodeableConcept.coding[0].display", "Medication.Product.Name"
    ),
    "dose_quantity": ColumnDoc(
        "Dose per administration.",
        "dosageInstruction[0].doseAndRate[0].doseQuantity.value",
        "Medication.Dose.Quantity",
    ),
    "dose_unit": ColumnDoc(
        "Dose unit.", "dosageInstruction[0].doseAndRate[0].doseQuantity.unit", "Medication.Dose.Units"
    ),
    "route": ColumnDoc(
        "Route (e.g. Oral).", "dosageInstruction[0].route display", "Medication.Route.Name (else .Code)"
    ),
    "frequency": ColumnDoc(
        "How often, as 'every 8 h'.",
        "dosageInstruction[0].timing.repeat",
        "Medication.Frequency {Period, Unit}",
    ),
    "start_at": ColumnDoc("Start.", "authoredOn / effectivePeriod.start", "Medication.StartDate"),
    "end_at": ColumnDoc(
        "End.", "dispenseRequest.validityPeriod.end / effectivePeriod.end", "Medication.EndDate"
    ),
    "prescriber_npi": ColumnDoc("Prescriber NPI.", "requester.identifier.value", "Order.Provider NPI"),
}

_APPOINTMENTS: dict[str, ColumnDoc] = {
    "appointment_id": ColumnDoc(
        "Scheduling visit number (business key).",
        "Appointment.identifier[system=…:VN].value",
        "Visit.VisitNumber",
    ),
    "status": ColumnDoc(
        "proposed, pending, booked, arrived, fulfilled, cancelled, noshow, entered-in-error.",
        "Appointment.status",
        "the event: Cancel -> cancelled, NoShow -> noshow; else Visit.Status (Scheduled -> booked, Completed -> fulfilled)",
    ),
    "start_at": ColumnDoc("Appointment start.", "Appointment.start", "Visit.VisitDateTime"),
    "end_at": ColumnDoc(
        "Appointment end.", "Appointment.end", "Visit.VisitDateTime + Visit.Duration minutes"
    ),
    "duration_minutes": ColumnDoc("Length in minutes.", "Appointment.minutesDuration", "Visit.Duration"),
    "type_code": ColumnDoc(
        "Appointment type code.",
        "Appointment.appointmentType.coding[0].code",
        "AppointmentInfo[Description=Visit.Type].Code",
    ),
    "type_display": ColumnDoc(
        "Appointment type, text.", "Appointment.appointmentType.coding[0].display", "Visit.Type"
    ),
    "reason": ColumnDoc("Reason, free text.", "Appointment.reasonCode[0].text / description", "Visit.Reason"),
    "provider_npi": ColumnDoc(
        "Provider NPI.",
        "Appointment.participant[Practitioner].actor.identifier.value",
        "Visit.VisitProvider, else Visit.AttendingProvider NPI",
    ),
    "location": ColumnDoc(
        "Facility.", "Appointment.participant[Location].actor.display", "Visit.Location.Facility"
    ),
    "department": ColumnDoc("Department.", "", "Visit.Location.Department"),
    "cancel_reason": ColumnDoc(
        "Why it was cancelled.", "Appointment.cancelationReason", "Visit.CancelReason"
    ),
    "rescheduled_from": ColumnDoc(
        "The visit number this appointment replaced.", "extension rescheduled-from", "Visit.OldVisitNumber"
    ),
}

_DOCUMENTS: dict[str, ColumnDoc] = {
    "document_id": ColumnDoc(
        "Document id (business key).",
        "DocumentReference.identifier[system=…:DocumentID].value",
        "Note.DocumentID / Documents[].ID",
    ),
    "encounter_id": ColumnDoc(
        "The visit number.", "DocumentReference.context.encounter[0].identifier.value", "Visit.VisitNumber"
    ),
    "kind": ColumnDoc(
        "note or cda.",
        "content[0].attachment.contentType / category",
        "cda when the content is XML, else note",
    ),
    "type_code": ColumnDoc(
        "Document type (LOINC).",
        "DocumentReference.type.coding[0].code",
        "Note.DocumentType / Documents[].Type.Code",
    ),
    "type_system": ColumnDoc(
        "Type code system (URI).",
        "DocumentReference.type.coding[0].system",
        "Documents[].Type.Codeset -> URI",
    ),
    "title": ColumnDoc(
        "Title.", "content[0].attachment.title / description", "Note.DocumentDescription, else FileName"
    ),
    "status": ColumnDoc(
        "current, superseded, entered-in-error.",
        "DocumentReference.status",
        "Note.Status, else the event (Replace, Delete)",
    ),
    "authored_at": ColumnDoc(
        "When it was written.", "DocumentReference.date", "Note.ServiceDateTime, else DocumentationDateTime"
    ),
    "author": ColumnDoc("Author NPI or name.", "DocumentReference.author[0]", "Note.Provider NPI / ID"),
    "content_type": ColumnDoc(
        "MIME type of the content.", "content[0].attachment.contentType", "Note.ContentType / FileType"
    ),
    "content_sha256": ColumnDoc(
        "sha256 of the content (stored content-addressed in the landing).",
        "sha256 of the Binary at attachment.url",
        "sha256 of the decoded FileContents",
    ),
    "content_bytes": ColumnDoc(
        "Size of the content in bytes.", "size of that Binary", "length of the decoded FileContents"
    ),
}

_PATIENT_IDENTIFIERS: dict[str, ColumnDoc] = {
    "connection_id": ColumnDoc("The Redox connection the identifier belongs to."),
    "id_system": ColumnDoc(
        "Identifier type: fhir (logical id), MR, EHRID, NIST, EPI.",
        "Patient.id / identifier.system",
        "Patient.Identifiers[].IDType",
    ),
    "id_value": ColumnDoc("The identifier.", "Patient.id / identifier.value", "Patient.Identifiers[].ID"),
    "patient_key": ColumnDoc("The patient the identifier resolves to."),
    "id_type": ColumnDoc("The identifier type as published (same as id_system)."),
    "source_surface": ColumnDoc("Which surface showed it: fhir, datamodel or both."),
    "first_seen_at": ColumnDoc("When a sync first staged it (UTC)."),
    "last_seen_at": ColumnDoc("When a sync last staged it (UTC)."),
}

_PERSONS: dict[str, ColumnDoc] = {
    "person_key": ColumnDoc(
        "One person across connections: 'ep_' + enterprise id, else '<connection>:<patient_key>'."
    ),
    "connection_id": ColumnDoc("A connection that knows the person."),
    "patient_key": ColumnDoc("The person's patient key in that connection."),
    "enterprise_id": ColumnDoc(
        "Enterprise id that links the connections.",
        "Patient.identifier[…:EPI]",
        "Patient.Identifiers[IDType=EPI]",
    ),
}

# Columns the analytics views share.
_PERSON: dict[str, ColumnDoc] = {
    "person_key": ColumnDoc(
        "One person across connections: 'ep_' + enterprise id, else '<connection>:<patient_key>' (redox.persons)."
    ),
}
_RECORD: dict[str, ColumnDoc] = {
    **_PERSON,
    "connection_id": LINEAGE_DOCS["connection_id"],
    "patient_key": LINEAGE_DOCS["patient_key"],
}
_DEMOGRAPHICS: list[tuple[str, str]] = [
    (c, _PATIENTS[c].description)
    for c in (
        "family_name",
        "given_names",
        "birth_date",
        "sex",
        "deceased_at",
        "race",
        "ethnicity",
        "language",
        "address_line",
        "city",
        "state",
        "postal_code",
        "phone",
        "email",
    )
]
_RESULT: dict[str, ColumnDoc] = {
    c: _RESULTS[c]
    for c in (
        "result_id",
        "category",
        "code_system",
        "code",
        "display",
        "value_numeric",
        "value_text",
        "unit",
        "reference_low",
        "reference_high",
        "abnormal_flag",
        "status",
        "effective_at",
    )
}

COLUMN_DOCS: dict[str, dict[str, ColumnDoc]] = {
    # --- the original six entities and the crosswalk (issue 13 fills these) ---
    "patients": _PATIENTS,
    "encounters": _ENCOUNTERS,
    "results": _RESULTS,
    "medications": _MEDICATIONS,
    "appointments": _APPOINTMENTS,
    "documents": _DOCUMENTS,
    "patient_identifiers": _PATIENT_IDENTIFIERS,
    "persons": _PERSONS,
    "quarantine": {
        "quarantine_id": ColumnDoc(
            "Stable id of (page, record, entity): replaying a page never duplicates an entry."
        ),
        "entity": ColumnDoc("What the record would have become (a common-model entity)."),
        "raw_ref": ColumnDoc("The landed page that holds the record."),
        "item_id": ColumnDoc(
            "The record's id (FHIR logical id, else its business identifier), else its position in the page; '-' for a whole page."
        ),
        "item_kind": ColumnDoc("What item_id holds: id, position or page."),
        "reason": ColumnDoc("Why the record could not be normalized, without PHI."),
        "patient_ref_type": ColumnDoc(
            "How the record names its patient (fhir, MR, ...), when it could be told."
        ),
        "patient_ref_value": ColumnDoc("That identifier: what a later sync asks again."),
        "first_seen_at": ColumnDoc("When the record was first quarantined."),
        "attempts": ColumnDoc("How many loads quarantined it."),
        "resolved_at": ColumnDoc("When a later load brought the record in good shape (null: still open)."),
    },
    # --- analytics views (pipelines/analytics; the question each answers is in TABLE_DOCS) ---
    "patient_summary": {
        **_PERSON,
        "enterprise_id": ColumnDoc("Enterprise id that links the person's connections (null when none)."),
        **{
            c: ColumnDoc(f"{d} From the person's most recently updated patient row.")
            for c, d in _DEMOGRAPHICS
        },
        "connection_ids": ColumnDoc("Every connection that knows the person (sorted list)."),
        "n_connections": ColumnDoc("How many connections know the person."),
        "patient_keys": ColumnDoc("The person's patient keys, one per connection (sorted list)."),
        "last_encounter_at": ColumnDoc(
            "Start of the person's latest encounter that happened (arrived, in-progress, finished)."
        ),
        "last_encounter_class": ColumnDoc("Class of that encounter (AMB, IMP, EMER, ...)."),
        "last_encounter_type": ColumnDoc("Type of that encounter, text."),
        "last_encounter_connection_id": ColumnDoc("The connection that saw that encounter."),
        "n_encounters": ColumnDoc("Encounters that happened, across connections."),
        "active_medications": ColumnDoc("Names of the medications whose status is active (sorted list)."),
        "n_active_medications": ColumnDoc("Medication records whose status is active."),
        "active_problems": ColumnDoc(
            "Active problems (clinical status active, recurrence or relapse), sorted; null while the model has no problems table."
        ),
        "n_active_problems": ColumnDoc("How many distinct active problems; null without a problems table."),
    },
    "encounter_timeline": {
        **_RECORD,
        **{
            c: _ENCOUNTERS[c]
            for c in (
                "encounter_id",
                "status",
                "class",
                "type_code",
                "type_display",
                "reason_code",
                "reason_display",
                "location",
                "department",
                "attending_npi",
                "start_at",
                "end_at",
                "discharge_disposition",
            )
        },
        "length_of_stay_hours": ColumnDoc("end_at - start_at in hours (null while the encounter is open)."),
        "encounter_number": ColumnDoc(
            "1 for the person's first encounter, then 2, 3, ... by start time across connections."
        ),
        "days_since_previous_encounter": ColumnDoc(
            "Days from the start of the person's previous encounter to this one's start."
        ),
    },
    "latest_results": {
        **_RECORD,
        **_RESULT,
        "previous_value_numeric": ColumnDoc(
            "The numeric value of the result before it (same person and code)."
        ),
        "previous_effective_at": ColumnDoc("When the result before it was taken."),
        "n_results": ColumnDoc("How many results the person has for this code."),
    },
    "abnormal_results": {
        **_RECORD,
        **_RESULT,
        "encounter_id": _RESULTS["encounter_id"],
        "reference_text": _RESULTS["reference_text"],
        "range_position": ColumnDoc(
            "Where the numeric value falls against the reference range: below, within, above; null without both."
        ),
        "is_critical": ColumnDoc("The source flagged it critical (HH or LL)."),
        "flag_agrees_with_range": ColumnDoc(
            "Whether the source's flag (N vs H/L/HH/LL) agrees with range_position; null when either is missing or the flag is A."
        ),
    },
    "active_medications": {
        **_RECORD,
        **{
            c: _MEDICATIONS[c]
            for c in (
                "medication_id",
                "encounter_id",
                "kind",
                "status",
                "code_system",
                "code",
                "display",
                "dose_quantity",
                "dose_unit",
                "route",
                "frequency",
                "start_at",
                "end_at",
                "prescriber_npi",
            )
        },
    },
    "appointment_throughput": {
        "connection_id": LINEAGE_DOCS["connection_id"],
        "day": ColumnDoc("The UTC day of the appointments' start."),
        "appointments": ColumnDoc("Appointments that day (every status but entered-in-error)."),
        "booked": ColumnDoc("Still booked: status proposed, pending or booked."),
        "arrived": ColumnDoc("Patient arrived (status arrived)."),
        "completed": ColumnDoc("Completed (status fulfilled)."),
        "cancelled": ColumnDoc("Cancelled."),
        "no_show": ColumnDoc("No-shows (status noshow)."),
        "no_show_rate": ColumnDoc("no_show / (completed + no_show); null when both are 0."),
    },
    "adt_census": {
        "connection_id": LINEAGE_DOCS["connection_id"],
        "day": ColumnDoc("The UTC day."),
        "class": ColumnDoc("Encounter class: IMP (inpatient), EMER (emergency), OBSENC (observation)."),
        "admissions": ColumnDoc("Stays that started that day (encounters that happened)."),
        "discharges": ColumnDoc("Stays that ended that day (status finished)."),
        "transfers": ColumnDoc(
            "PatientAdmin Transfer events of the class's stays received by webhook that day (ops.events); "
            "0 when only pulls fed the warehouse."
        ),
        "in_house_end_of_day": ColumnDoc("Stays started on or before the day and not discharged by its end."),
        "mean_length_of_stay_hours": ColumnDoc("Mean length of stay of the day's discharges, in hours."),
        "max_length_of_stay_hours": ColumnDoc("Longest stay among the day's discharges, in hours."),
    },
    "care_gaps": {
        **_PERSON,
        "gap": ColumnDoc("Which gap: hba1c_overdue."),
        "gap_description": ColumnDoc("The gap in words."),
        "evidence": ColumnDoc(
            "Why the person counts as diabetic: encounter_reason (an ICD-10 E10/E11/E13 visit reason) and/or problem_list."
        ),
        "connection_id": ColumnDoc(
            "Where to send the order: the connection of the person's latest encounter."
        ),
        "patient_key": ColumnDoc("The person's patient key in that connection (outbox.orders.patient_key)."),
        "last_a1c_at": ColumnDoc("When the person's latest hemoglobin A1c was taken (null: never)."),
        "last_a1c_value": ColumnDoc("Its value (%)."),
        "as_of": ColumnDoc("The time the gap was evaluated (the query's current time)."),
        "order_procedure_code": ColumnDoc(
            "The order that closes the gap: LOINC 4548-4 (outbox.orders.procedure_code)."
        ),
        "order_procedure_codeset": ColumnDoc("Its code set: LOINC (outbox.orders.procedure_codeset)."),
        "order_procedure_description": ColumnDoc("Its description (outbox.orders.procedure_description)."),
    },
    # --- clinical record tables (issue 12) ---
    "problems": {
        "problem_id": ColumnDoc(
            "The problem's business id: the ProblemID identifier, else the Condition id; a Clinical Summary entry's derived id (digest of patient, code, onset) unless paired with the FHIR record.",
            "Condition.identifier[ProblemID] | Condition.id",
            "derived: Problems[] patient + Code + StartDate",
        ),
        "encounter_id": ColumnDoc(
            "The visit number of the encounter the problem was noted in.",
            "Condition.encounter.identifier.value",
            "",
        ),
        "category": ColumnDoc(
            "Problem-list item, encounter diagnosis or health concern (the source's category).",
            "Condition.category[0].coding[0].code",
            "Problems[].Category.Name",
        ),
        "code": ColumnDoc(
            "The problem's code (ICD-10-CM or SNOMED CT, as the source codes it first).",
            "Condition.code.coding[0].code",
            "Problems[].Code",
        ),
        "code_system": ColumnDoc(
            "The code's system as a FHIR URI (OIDs and Redox names translated where known).",
            "Condition.code.coding[0].system",
            "Problems[].CodeSystem / CodeSystemName",
        ),
        "display": ColumnDoc(
            "The code's display text.", "Condition.code.coding[0].display", "Problems[].Name"
        ),
        "status": ColumnDoc(
            "Clinical status, normalized to FHIR condition-clinical (active, recurrence, relapse, inactive, remission, resolved).",
            "Condition.clinicalStatus.coding[0].code",
            "Problems[].Status (SNOMED code or name)",
        ),
        "status_source": ColumnDoc(
            "The clinical status exactly as the source gave it.",
            "Condition.clinicalStatus.coding[0].code",
            "Problems[].Status.Name",
        ),
        "verification_status": ColumnDoc(
            "FHIR verification status (confirmed, entered-in-error, ...).",
            "Condition.verificationStatus.coding[0].code",
            "",
        ),
        "severity": ColumnDoc("The problem's severity (display).", "Condition.severity", ""),
        "health_status": ColumnDoc(
            "The patient's health status with respect to the problem (CCD).",
            "",
            "Problems[].HealthStatus.Name",
        ),
        "onset_at": ColumnDoc(
            "When the problem began (UTC).",
            "Condition.onsetDateTime | onsetPeriod.start",
            "Problems[].StartDate",
        ),
        "abated_at": ColumnDoc(
            "When the problem resolved (UTC).",
            "Condition.abatementDateTime | abatementPeriod.start",
            "Problems[].EndDate",
        ),
        "recorded_at": ColumnDoc("When the problem was recorded.", "Condition.recordedDate", ""),
        "recorder": ColumnDoc(
            "Who recorded it: NPI, else the display (contained/bundled Practitioner resolved).",
            "Condition.recorder | asserter",
            "",
        ),
        "note": ColumnDoc("Free-text comments.", "Condition.note[].text", "Problems[].Comment / Comments[]"),
    },
    "allergies": {
        "allergy_id": ColumnDoc(
            "The allergy's business id: the AllergyID identifier, else the AllergyIntolerance id; a Clinical Summary entry's derived id unless paired with the FHIR record.",
            "AllergyIntolerance.identifier[AllergyID] | AllergyIntolerance.id",
            "derived: Allergies[] patient + Substance.Code",
        ),
        "category": ColumnDoc(
            "medication, food, environment or biologic (comma-separated when several).",
            "AllergyIntolerance.category[]",
            "Allergies[].Type (SNOMED allergy type)",
        ),
        "allergy_type": ColumnDoc("allergy or intolerance.", "AllergyIntolerance.type", "Allergies[].Type"),
        "substance_code": ColumnDoc(
            "The substance's code (RxNorm for drugs, SNOMED CT otherwise).",
            "AllergyIntolerance.code.coding[0].code",
            "Allergies[].Substance.Code",
        ),
        "substance_system": ColumnDoc(
            "The substance code's system (FHIR URI).",
            "AllergyIntolerance.code.coding[0].system",
            "Allergies[].Substance.CodeSystem / CodeSystemName",
        ),
        "substance_display": ColumnDoc(
            "The substance's name.", "AllergyIntolerance.code.coding[0].display", "Allergies[].Substance.Name"
        ),
        "status": ColumnDoc(
            "Clinical status normalized to active, inactive or resolved.",
            "AllergyIntolerance.clinicalStatus.coding[0].code",
            "Allergies[].Status",
        ),
        "status_source": ColumnDoc(
            "The clinical status as the source gave it.",
            "AllergyIntolerance.clinicalStatus.coding[0].code",
            "Allergies[].Status.Name",
        ),
        "verification_status": ColumnDoc(
            "FHIR verification status (confirmed, refuted, entered-in-error).",
            "AllergyIntolerance.verificationStatus.coding[0].code",
            "Allergies[].IsNegativeIndicator (true: refuted)",
        ),
        "criticality": ColumnDoc(
            "Normalized criticality: low, high or unable-to-assess.",
            "AllergyIntolerance.criticality",
            "Allergies[].Criticality (CRITL/CRITH/CRITU)",
        ),
        "criticality_source": ColumnDoc(
            "The criticality as the source gave it.",
            "AllergyIntolerance.criticality",
            "Allergies[].Criticality.Name",
        ),
        "severity": ColumnDoc(
            "Reaction severity normalized to mild, moderate or severe.",
            "AllergyIntolerance.reaction[].severity",
            "Allergies[].Severity / Reaction[].Severity",
        ),
        "reaction_code": ColumnDoc(
            "The first reaction's code.",
            "AllergyIntolerance.reaction[0].manifestation[0].coding[0].code",
            "Allergies[].Reaction[0].Code",
        ),
        "reaction_system": ColumnDoc(
            "The first reaction's code system.",
            "AllergyIntolerance.reaction[0].manifestation[0].coding[0].system",
            "Allergies[].Reaction[0].CodeSystem",
        ),
        "reaction_display": ColumnDoc(
            "The first reaction's display.",
            "AllergyIntolerance.reaction[0].manifestation[0].coding[0].display",
            "Allergies[].Reaction[0].Name",
        ),
        "reactions": ColumnDoc(
            "Every reaction's display, '; '-separated (none is lost when there are several).",
            "AllergyIntolerance.reaction[].manifestation[]",
            "Allergies[].Reaction[]",
        ),
        "onset_at": ColumnDoc(
            "When the allergy began.", "AllergyIntolerance.onsetDateTime", "Allergies[].StartDate"
        ),
        "ended_at": ColumnDoc("When the allergy ended.", "", "Allergies[].EndDate"),
        "recorded_at": ColumnDoc("When it was recorded.", "AllergyIntolerance.recordedDate", ""),
        "note": ColumnDoc("Free-text comments.", "AllergyIntolerance.note[].text", "Allergies[].Comment"),
    },
    "immunizations": {
        "immunization_id": ColumnDoc(
            "The immunization's business id: the ImmunizationID identifier, else the Immunization id; a Vaccination order id; a Clinical Summary entry's derived id unless paired with the FHIR record.",
            "Immunization.identifier[ImmunizationID] | Immunization.id",
            "Vaccinations[].Order.ID | derived: Immunizations[] patient + Product.Code + DateTime",
        ),
        "encounter_id": ColumnDoc(
            "The visit number of the encounter it was given in.",
            "Immunization.encounter.identifier.value",
            "Visit.VisitNumber (Vaccination)",
        ),
        "status": ColumnDoc(
            "Normalized status: completed, not-done or entered-in-error.",
            "Immunization.status",
            "Immunizations[].Status (absent: completed)",
        ),
        "status_source": ColumnDoc(
            "The status as the source gave it.", "Immunization.status", "Immunizations[].Status"
        ),
        "vaccine_code": ColumnDoc(
            "The vaccine's code (CVX).",
            "Immunization.vaccineCode.coding[0].code",
            "Immunizations[].Product.Code",
        ),
        "vaccine_system": ColumnDoc(
            "The vaccine code's system (http://hl7.org/fhir/sid/cvx for CVX).",
            "Immunization.vaccineCode.coding[0].system",
            "Immunizations[].Product.CodeSystem / CodeSystemName",
        ),
        "vaccine_display": ColumnDoc(
            "The vaccine's name.",
            "Immunization.vaccineCode.coding[0].display",
            "Immunizations[].Product.Name",
        ),
        "occurred_at": ColumnDoc(
            "When it was given (UTC).", "Immunization.occurrenceDateTime", "Immunizations[].DateTime"
        ),
        "lot_number": ColumnDoc(
            "The vaccine lot.", "Immunization.lotNumber", "Immunizations[].Product.LotNumber"
        ),
        "manufacturer": ColumnDoc(
            "The manufacturer's name.",
            "Immunization.manufacturer.display (or the referenced Organization's name)",
            "Immunizations[].Product.Manufacturer",
        ),
        "route_code": ColumnDoc(
            "The route's code.", "Immunization.route.coding[0].code", "Immunizations[].Route.Code"
        ),
        "route_system": ColumnDoc(
            "The route code's system.",
            "Immunization.route.coding[0].system",
            "Immunizations[].Route.CodeSystem",
        ),
        "route_display": ColumnDoc(
            "The route's display.", "Immunization.route.coding[0].display", "Immunizations[].Route.Name"
        ),
        "site": ColumnDoc("The body site (display, else code).", "Immunization.site", "Vaccinations[].Site"),
        "dose_quantity": ColumnDoc(
            "The dose given.", "Immunization.doseQuantity.value", "Immunizations[].Dose.Quantity"
        ),
        "dose_unit": ColumnDoc(
            "The dose's unit (UCUM code where given).",
            "Immunization.doseQuantity.code | unit",
            "Immunizations[].Dose.Units",
        ),
        "performer": ColumnDoc(
            "Who gave it: NPI, else display.", "Immunization.performer[0].actor", "Vaccinations[].Provider"
        ),
        "not_given_reason": ColumnDoc(
            "Why it was not given.",
            "Immunization.statusReason",
            "Immunizations[].ReasonNotGiven / Vaccinations[].RefusalReason",
        ),
    },
    "procedures": {
        "procedure_id": ColumnDoc(
            "The procedure's business id: the ProcedureID identifier, else the Procedure id; a Clinical Summary entry's derived id unless paired with the FHIR record.",
            "Procedure.identifier[ProcedureID] | Procedure.id",
            "derived: Procedures.* patient + Code + DateTime",
        ),
        "encounter_id": ColumnDoc(
            "The visit number of the encounter.", "Procedure.encounter.identifier.value", ""
        ),
        "category": ColumnDoc(
            "The procedure's category; for a Clinical Summary entry the CCD sub-list (procedure, observation, act).",
            "Procedure.category",
            "Procedures.{Procedures,Observations,Services}",
        ),
        "code": ColumnDoc(
            "The procedure's code (CPT or SNOMED CT).",
            "Procedure.code.coding[0].code",
            "Procedures.Procedures[].Code",
        ),
        "code_system": ColumnDoc(
            "The code's system (FHIR URI).",
            "Procedure.code.coding[0].system",
            "Procedures.Procedures[].CodeSystem / CodeSystemName",
        ),
        "display": ColumnDoc(
            "The code's display.", "Procedure.code.coding[0].display", "Procedures.Procedures[].Name"
        ),
        "status": ColumnDoc(
            "Normalized to FHIR event status (completed, in-progress, not-done, stopped, entered-in-error ...).",
            "Procedure.status",
            "Procedures.Procedures[].Status",
        ),
        "status_source": ColumnDoc(
            "The status as the source gave it.", "Procedure.status", "Procedures.Procedures[].Status"
        ),
        "performed_at": ColumnDoc(
            "When it was performed (start).",
            "Procedure.performedDateTime | performedPeriod.start",
            "Procedures.Procedures[].DateTime",
        ),
        "performed_end_at": ColumnDoc("When it ended.", "Procedure.performedPeriod.end", ""),
        "body_site_code": ColumnDoc(
            "The body site's code.",
            "Procedure.bodySite[0].coding[0].code",
            "Procedures.Procedures[].TargetSite.Code",
        ),
        "body_site_system": ColumnDoc(
            "The body site code's system.",
            "Procedure.bodySite[0].coding[0].system",
            "Procedures.Procedures[].TargetSite.CodeSystem",
        ),
        "body_site_display": ColumnDoc(
            "The body site's display.",
            "Procedure.bodySite[0].coding[0].display",
            "Procedures.Procedures[].TargetSite.Name",
        ),
        "performer": ColumnDoc("Who performed it: NPI, else display.", "Procedure.performer[0].actor", ""),
        "reason_code": ColumnDoc("Why it was done: code.", "Procedure.reasonCode[0].coding[0].code", ""),
        "reason_system": ColumnDoc(
            "The reason code's system.", "Procedure.reasonCode[0].coding[0].system", ""
        ),
        "reason_display": ColumnDoc("The reason's display.", "Procedure.reasonCode[0].coding[0].display", ""),
        "note": ColumnDoc(
            "Free-text comments.", "Procedure.note[].text", "Procedures.Procedures[].Comments[]"
        ),
    },
    "diagnostic_reports": {
        "report_id": ColumnDoc(
            "The report's business id: its lab order id (OrderID identifier or basedOn order), else the DiagnosticReport id; a Clinical Summary panel's derived id unless paired.",
            "DiagnosticReport.identifier[OrderID] | basedOn[0].identifier.value | DiagnosticReport.id",
            "Results Orders[].ID | derived: Clinical Summary Results[] panel",
        ),
        "encounter_id": ColumnDoc(
            "The visit number of the encounter.",
            "DiagnosticReport.encounter.identifier.value",
            "Visit.VisitNumber",
        ),
        "order_id": ColumnDoc(
            "The order the report fulfils.", "DiagnosticReport.basedOn[0].identifier.value", "Orders[].ID"
        ),
        "category": ColumnDoc(
            "The report's category (v2-0074, e.g. LAB).",
            "DiagnosticReport.category[0].coding[0].code",
            "LAB for laboratory orders",
        ),
        "code": ColumnDoc(
            "The panel's code (LOINC).",
            "DiagnosticReport.code.coding[0].code",
            "Orders[].Procedure.Code | Results[].Code",
        ),
        "code_system": ColumnDoc(
            "The panel code's system.",
            "DiagnosticReport.code.coding[0].system",
            "Orders[].Procedure.Codeset | Results[].CodeSystem",
        ),
        "display": ColumnDoc(
            "The panel's display.",
            "DiagnosticReport.code.coding[0].display",
            "Orders[].Procedure.Description | Results[].Name",
        ),
        "status": ColumnDoc(
            "Normalized to FHIR diagnostic-report status (registered, partial, preliminary, final, corrected, amended, cancelled, entered-in-error).",
            "DiagnosticReport.status",
            "Orders[].ResultsStatus | Results[].Status",
        ),
        "status_source": ColumnDoc(
            "The status as the source gave it.",
            "DiagnosticReport.status",
            "Orders[].ResultsStatus | Results[].Status",
        ),
        "effective_at": ColumnDoc(
            "The clinically relevant time (specimen collection).",
            "DiagnosticReport.effectiveDateTime | effectivePeriod.start",
            "Orders[].CollectionDateTime",
        ),
        "issued_at": ColumnDoc(
            "When the report was released.", "DiagnosticReport.issued", "Orders[].CompletionDateTime"
        ),
        "performer": ColumnDoc(
            "The responsible provider or lab: NPI, else display.",
            "DiagnosticReport.performer[0]",
            "Orders[].Provider.NPI | Results[].Producer.Name",
        ),
        "conclusion": ColumnDoc("The report's conclusion text.", "DiagnosticReport.conclusion", ""),
        "result_count": ColumnDoc(
            "How many results the report groups (rows of redox.diagnostic_report_results).",
            "count(DiagnosticReport.result[])",
            "count(Orders[].Results[])",
        ),
    },
    "orders": {
        "order_id": ColumnDoc(
            "The order's business id: the placer order number (OrderID identifier), else the ServiceRequest id; a plan-of-care entry's derived id.",
            "ServiceRequest.identifier[OrderID] | ServiceRequest.id",
            "Order.ID | Orders[].ID | derived: PlanOfCare.*",
        ),
        "encounter_id": ColumnDoc(
            "The visit number of the encounter.",
            "ServiceRequest.encounter.identifier.value",
            "Visit.VisitNumber",
        ),
        "category": ColumnDoc(
            "The order's category; for a plan-of-care entry its sub-list (order, procedure, service, encounter, supply).",
            "ServiceRequest.category[0]",
            "PlanOfCare.{Orders,Procedures,Services,Encounters,Supplies}",
        ),
        "code": ColumnDoc(
            "What is ordered: code (LOINC panel, CPT ...).",
            "ServiceRequest.code.coding[0].code",
            "Order.Procedure.Code",
        ),
        "code_system": ColumnDoc(
            "The code's system.", "ServiceRequest.code.coding[0].system", "Order.Procedure.Codeset"
        ),
        "display": ColumnDoc(
            "The code's display.", "ServiceRequest.code.coding[0].display", "Order.Procedure.Description"
        ),
        "status": ColumnDoc(
            "Normalized to FHIR request status (active, on-hold, revoked, completed, entered-in-error).",
            "ServiceRequest.status",
            "Order.Status / the event (Cancel: revoked)",
        ),
        "status_source": ColumnDoc(
            "The status as the source gave it (or the Order event).",
            "ServiceRequest.status",
            "Order.Status | EventType",
        ),
        "intent": ColumnDoc(
            "FHIR request intent (order, plan, proposal ...); a plan-of-care entry's mood.",
            "ServiceRequest.intent",
            "order | PlanOfCare[].Status mood",
        ),
        "priority": ColumnDoc("routine, urgent, asap or stat.", "ServiceRequest.priority", "Order.Priority"),
        "ordered_at": ColumnDoc(
            "When the order was placed.", "ServiceRequest.authoredOn", "Order.TransactionDateTime"
        ),
        "occurrence_at": ColumnDoc(
            "When the service is to happen (collection time for labs).",
            "ServiceRequest.occurrenceDateTime | occurrencePeriod.start",
            "Order.CollectionDateTime | PlanOfCare[].DateTime",
        ),
        "requester_npi": ColumnDoc(
            "The ordering provider's NPI.",
            "ServiceRequest.requester (identifier or referenced Practitioner)",
            "Order.Provider.NPI",
        ),
        "performer": ColumnDoc(
            "Who is to perform it: NPI, else display.",
            "ServiceRequest.performer[0]",
            "Order.OrderingFacility.Name",
        ),
        "reason_code": ColumnDoc(
            "Why it was ordered: code (ICD-10).",
            "ServiceRequest.reasonCode[0].coding[0].code",
            "Order.Diagnoses[0].Code",
        ),
        "reason_system": ColumnDoc(
            "The reason code's system.",
            "ServiceRequest.reasonCode[0].coding[0].system",
            "Order.Diagnoses[0].Codeset",
        ),
        "reason_display": ColumnDoc(
            "The reason's display.",
            "ServiceRequest.reasonCode[0].coding[0].display",
            "Order.Diagnoses[0].Name",
        ),
        "note": ColumnDoc("Free-text notes.", "ServiceRequest.note[].text", "Order.Notes[] / Comments"),
    },
    "result_components": {
        "connection_id": ColumnDoc("The Redox connection."),
        "patient_key": ColumnDoc("The patient (as in redox.results)."),
        "result_id": ColumnDoc(
            "The result (redox.results.result_id) the component belongs to.",
            "Observation",
            "Results[] (systolic + diastolic folded into 85354-9)",
        ),
        "position": ColumnDoc("The component's position in the Observation (0-based)."),
        "code": ColumnDoc(
            "The component's code (e.g. 8480-6 systolic).",
            "Observation.component[].code.coding[0].code",
            "Results[].Code",
        ),
        "code_system": ColumnDoc(
            "The component code's system.",
            "Observation.component[].code.coding[0].system",
            "Results[].Codeset",
        ),
        "display": ColumnDoc(
            "The component's display.",
            "Observation.component[].code.coding[0].display",
            "Results[].Description",
        ),
        "value_numeric": ColumnDoc(
            "The numeric value.", "Observation.component[].valueQuantity.value", "Results[].Value"
        ),
        "value_text": ColumnDoc("The value as text.", "Observation.component[].value[x]", "Results[].Value"),
        "value_code": ColumnDoc(
            "A coded value's code.", "Observation.component[].valueCodeableConcept.coding[0].code", ""
        ),
        "value_code_system": ColumnDoc(
            "A coded value's system.", "Observation.component[].valueCodeableConcept.coding[0].system", ""
        ),
        "unit": ColumnDoc(
            "The unit (UCUM code where given).",
            "Observation.component[].valueQuantity.code | unit",
            "Results[].Units",
        ),
        "unit_system": ColumnDoc(
            "The unit's system (http://unitsofmeasure.org for UCUM).",
            "Observation.component[].valueQuantity.system",
            "",
        ),
        "reference_low": ColumnDoc(
            "Reference range low.",
            "Observation.component[].referenceRange[0].low.value",
            "Results[].ReferenceRange.Low",
        ),
        "reference_high": ColumnDoc(
            "Reference range high.",
            "Observation.component[].referenceRange[0].high.value",
            "Results[].ReferenceRange.High",
        ),
        "reference_text": ColumnDoc(
            "Reference range text.",
            "Observation.component[].referenceRange[0].text",
            "Results[].ReferenceRange.Text",
        ),
        "abnormal_flag": ColumnDoc(
            "H, L, HH, LL, A or N.", "Observation.component[].interpretation", "Results[].AbnormalFlag"
        ),
    },
    "diagnostic_report_results": {
        "connection_id": ColumnDoc("The Redox connection."),
        "patient_key": ColumnDoc("The patient (as in redox.diagnostic_reports)."),
        "report_id": ColumnDoc(
            "The report (redox.diagnostic_reports.report_id).", "DiagnosticReport", "Orders[].ID"
        ),
        "position": ColumnDoc("The result's position in the report (0-based)."),
        "result_id": ColumnDoc(
            "The grouped result (redox.results.result_id); a FHIR Observation reference resolved to its result id.",
            "DiagnosticReport.result[].reference",
            "Orders[].Results[] (<order id>-<code>)",
        ),
    },
}


# Columns issue 12 added to ``results`` (the old table's other columns are documented above).
COLUMN_DOCS.setdefault("results", {}).update(
    {
        "report_id": ColumnDoc(
            "The diagnostic report grouping this result.",
            "(DiagnosticReport.result[] pointing here)",
            "Orders[].ID | Clinical Summary Results[] panel",
        ),
        "value_code": ColumnDoc(
            "A coded value's code.",
            "Observation.valueCodeableConcept.coding[0].code",
            "Results[].CodedValue.Code",
        ),
        "value_code_system": ColumnDoc(
            "A coded value's system.",
            "Observation.valueCodeableConcept.coding[0].system",
            "Results[].CodedValue.CodeSystem",
        ),
        "unit_system": ColumnDoc(
            "The unit's system (http://unitsofmeasure.org for UCUM).", "Observation.valueQuantity.system", ""
        ),
        "status_source": ColumnDoc(
            "The status as the source gave it.", "Observation.status", "Results[].Status"
        ),
        "component_count": ColumnDoc(
            "How many components the Observation has (rows of redox.result_components); blood pressure: 2.",
            "count(Observation.component[])",
            "systolic + diastolic folded",
        ),
    }
)

# Columns only the staged tables ``raw.<surface>_<entity>`` carry (pipelines/model.py
# STAGED_ONLY_COLUMNS and VERSION_KEY): publish reads them, redox.<entity> does not show them.
STAGED_ONLY_DOCS: dict[str, ColumnDoc] = {
    "match_key": ColumnDoc(
        "Digest of the record's code and clinical day (results: instant); pairs a Data Model record "
        "without a shared id with the FHIR record of the same patient.",
        "code.coding[0].code + onset/effective/occurrence/performed time",
        "Code + StartDate/DateTime",
    ),
    "components": ColumnDoc(
        "The result's components as a JSON array (exploded into redox.result_components).",
        "Observation.component[]",
        "systolic + diastolic folded",
    ),
    "result_refs": ColumnDoc(
        "The results a report groups, as a JSON array (exploded into redox.diagnostic_report_results).",
        "DiagnosticReport.result[].reference",
        "Orders[].Results[] / Results[].Observations[]",
    ),
    "version_key": ColumnDoc(
        "Version order of a staged row: complete before reference-only (a patient block without "
        "demographics), then source time, then the landed page's name (fetch time); the "
        "staged tables keep the highest per key."
    ),
}

# What each table is (its DuckDB table comment); analytics views name the question they answer.
TABLE_DOCS: dict[str, str] = {
    # --- the original six entities, the crosswalk and the analytics views (issue 13) ---
    "patients": "The common model's patients: one row per (connection_id, patient_key), both surfaces reconciled (FHIR Patient; Data Model Patient blocks).",
    "encounters": "Encounters (visits): one row per (connection_id, encounter_id) (FHIR Encounter; Data Model PatientAdmin Visit, Clinical Summary Encounters).",
    "results": "Lab results and vital signs: one row per (connection_id, result_id) (FHIR Observation; Data Model Results, Flowsheet, Clinical Summary).",
    "medications": "Medication orders, statements and administrations: one row per (connection_id, medication_id) (FHIR MedicationRequest / MedicationStatement; Data Model Medications).",
    "appointments": "Appointments: one row per (connection_id, appointment_id) (FHIR Appointment; Data Model Scheduling).",
    "documents": "Clinical documents (metadata; content is stored content-addressed in the landing): one row per (connection_id, document_id) (FHIR DocumentReference; Data Model Notes, Media, Clinical Summary documents).",
    "patient_identifiers": "The identity crosswalk: every identifier seen (FHIR id, MR, EHRID, NIST, EPI) -> patient_key, keyed by (connection_id, id_system, id_value).",
    "persons": "Persons across connections: patient keys linked on the shared enterprise id.",
    "quarantine": "Records that could not be normalized, one row per record: reason and raw_ref only, never the payload.",
    **VIEW_QUESTIONS,
    # --- clinical record tables (issue 12) ---
    "problems": "Problems (the problem list and encounter diagnoses): FHIR Condition; Data Model Clinical Summary Problems.",
    "allergies": "Allergies and intolerances: FHIR AllergyIntolerance; Data Model Clinical Summary Allergies.",
    "immunizations": "Immunizations: FHIR Immunization; Data Model Clinical Summary Immunizations, Vaccination.",
    "procedures": "Procedures: FHIR Procedure; Data Model Clinical Summary Procedures.",
    "diagnostic_reports": "Diagnostic reports grouping results: FHIR DiagnosticReport; Data Model Results orders, summary lab panels.",
    "orders": "Inbound orders: FHIR ServiceRequest; Data Model Order events and queries, summary PlanOfCare requests.",
    "result_components": "Components of a result (e.g. systolic and diastolic of a blood pressure), one row per component.",
    "diagnostic_report_results": "The results each diagnostic report groups, one row per (report, position).",
}


def column_doc(table: str, column: str) -> ColumnDoc | None:
    """The doc of ``table.column``: the table's own entry, else the lineage column's."""
    own = COLUMN_DOCS.get(table, {}).get(column)
    if own is not None:
        return own
    return LINEAGE_DOCS.get(column) if table in COLUMN_DOCS else None


def type_name(t: pa.DataType | str) -> str:
    """The short display name of a column type, for Arrow types and DuckDB type strings alike:
    the README's column tables and the Dagster column schemas show the same names."""
    if isinstance(t, str):
        s = t.lower()
        if s.endswith("[]"):
            return f"list of {type_name(s[:-2])}"
        return {
            "varchar": "string",
            "bigint": "int",
            "integer": "int",
            "hugeint": "int",
            "boolean": "bool",
            "timestamp with time zone": "timestamp",
            "date": "date",
            "double": "double",
        }.get(s, s)
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_floating(t):
        return "double"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_boolean(t):
        return "bool"
    return "string" if pa.types.is_string(t) else str(t)


def column_comment(doc: ColumnDoc) -> str:
    """The DuckDB comment of a column: what it is, then where each surface keeps it."""
    parts = [doc.description]
    if doc.fhir_path:
        parts.append(f"FHIR: {doc.fhir_path}.")
    if doc.datamodel_field:
        parts.append(f"Data Model: {doc.datamodel_field}.")
    return " ".join(parts)


# The write-back outboxes (schema outbox; pipelines/writeback/outbox.py): users fill the business
# columns, the pipeline owns status and the columns after it.
_OUTBOX_PIPELINE: dict[str, ColumnDoc] = {
    "seq": ColumnDoc("Insertion order; rows are sent in it (pipeline)."),
    "status": ColumnDoc(
        "pending -> sending (committed before the request leaves) -> sent -> acknowledged | failed (before sending: an invalid or refused request; after: the EHR refused the write) (pipeline)."
    ),
    "attempts": ColumnDoc("Requests sent for the row (pipeline)."),
    "last_error": ColumnDoc(
        "Why it failed, or why its outcome is still unknown; never PHI, except 'refused by the EHR: <reason>', whose reason is the EHR's own text (kept here, never logged) (pipeline)."
    ),
    "surface": ColumnDoc("fhir or datamodel: the surface the write went through (pipeline)."),
    "external_id": ColumnDoc(
        "The acknowledgement's id: FHIR response MessageHeader id, Data Model Meta.Logs[0].ID (pipeline)."
    ),
    "created_at": ColumnDoc("When the row was inserted (UTC)."),
    "updated_at": ColumnDoc("When the pipeline last changed the row (UTC)."),
    "sent_at": ColumnDoc("When the request left (UTC)."),
    "acknowledged_at": ColumnDoc("When the EHR's outcome arrived (UTC; refusals too)."),
    "acknowledgement": ColumnDoc(
        "What settled it after sending: the pushed event or notification, or the lookup that saw it (pipeline)."
    ),
}
OUTBOX_DOCS: dict[str, dict[str, ColumnDoc]] = {
    "orders": {
        "order_id": ColumnDoc(
            "Your stable id of the order (key), sent as Order.ID / ServiceRequest.identifier."
        ),
        "connection_id": ColumnDoc("The connection to send it to."),
        "patient_key": ColumnDoc(
            "The patient (redox.patients.patient_key; a key of another connection resolves through redox.persons)."
        ),
        "procedure_code": ColumnDoc("What is ordered: the procedure code."),
        "procedure_codeset": ColumnDoc("Its code set: LOINC, CPT, SNOMED, HCPCS or a URI."),
        "procedure_description": ColumnDoc("The procedure in words."),
        "priority": ColumnDoc(
            "Routine, Stat, ASAP, Urgent (Preoperative / Timing Critical on the Data Model only)."
        ),
        "ordered_at": ColumnDoc("When it was ordered (UTC)."),
        "provider_npi": ColumnDoc("The ordering provider's NPI."),
        "notes": ColumnDoc("Notes sent with the order."),
        **_OUTBOX_PIPELINE,
    },
    "appointments": {
        "request_id": ColumnDoc("Your id of this write (key; one per create, update or cancel)."),
        "appointment_id": ColumnDoc(
            "The appointment's visit number, sent as Visit.VisitNumber / Appointment.identifier."
        ),
        "action": ColumnDoc("create (default), update (reschedule) or cancel."),
        "connection_id": ColumnDoc("The connection to send it to."),
        "patient_key": ColumnDoc("The patient (redox.patients.patient_key)."),
        "start_at": ColumnDoc("Appointment start (UTC)."),
        "duration_minutes": ColumnDoc("Length in minutes (default 30)."),
        "reason": ColumnDoc("Reason for the visit."),
        "provider_npi": ColumnDoc("The provider's NPI."),
        "location_facility": ColumnDoc("Facility."),
        "location_department": ColumnDoc("Department (the Data Model requires it)."),
        "notes": ColumnDoc("Notes sent with the appointment."),
        **_OUTBOX_PIPELINE,
    },
}
OUTBOX_TABLE_DOCS: dict[str, str] = {
    "orders": "Write-back outbox: orders to send to the EHR, one row per logical write (redox-elt writeback sends them).",
    "appointments": "Write-back outbox: appointments to create, reschedule or cancel in the EHR, one row per write.",
}
