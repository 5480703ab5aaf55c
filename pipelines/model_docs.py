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

COLUMN_DOCS: dict[str, dict[str, ColumnDoc]] = {
    # --- the original six entities and the crosswalk (issue 13 fills these) ---
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
