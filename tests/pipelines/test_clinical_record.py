"""The clinical record (issue 12) without a server: both surfaces' normalizers for problems,
allergies, immunizations, procedures, diagnostic reports, orders and result components, the
real Redox Clinical Summary examples, and publish's field-by-field reconciliation."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from pipelines.datamodel.normalize import normalize_datamodel
from pipelines.fhir.pages import bundle_rows
from pipelines.model import ROW_EXTRAS, rows_to_table, staged_schema
from pipelines.publish import publish_connection
from pipelines.vocabulary import STAGING_SCHEMA, staged_table_name

EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "redox-examples" / "datamodel"
# Every Clinical Summary example carrying a summary document (PatientQueryResponse,
# PatientPush, VisitPush with sections); the one VisitPush example without sections is a
# scheduling-shaped payload and fills appointments instead.
SUMMARY_EXAMPLES = sorted(
    p
    for p in (EXAMPLES / "clinicalsummary").rglob("*.json")
    if "Header" in json.loads(p.read_bytes().decode("utf-8-sig"))
)
NEW_TABLES = ("problems", "allergies", "immunizations", "procedures", "diagnostic_reports", "orders")
CONN = "riverbend-both"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _summary(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes().decode("utf-8-sig"))


def test_there_are_clinical_summary_examples() -> None:
    assert len(SUMMARY_EXAMPLES) >= 8


@pytest.mark.parametrize("path", SUMMARY_EXAMPLES, ids=lambda p: p.name)
def test_every_clinical_summary_example_fills_the_new_tables(path: Path) -> None:
    out = normalize_datamodel(_summary(path), "lakeside-dm", "responses/x.json")
    payload = _summary(path)
    for table in NEW_TABLES:
        assert out.rows[table], f"{path.name}: no {table} rows"
        schema = staged_schema(table)
        rows_to_table([{k: v for k, v in r.items() if k not in ROW_EXTRAS} for r in out.rows[table]], schema)
    assert len(out.rows["problems"]) == len(payload["Problems"])
    assert len(out.rows["allergies"]) == len(payload["Allergies"])
    assert len(out.rows["immunizations"]) == len(payload["Immunizations"])
    procedures = payload["Procedures"]
    assert len(out.rows["procedures"]) == sum(
        len(procedures.get(k) or []) for k in ("Procedures", "Observations", "Services")
    )
    # Every lab panel of Results[] is a report grouping the panel's results.
    reports = out.rows["diagnostic_reports"]
    grouped = {rid for r in reports for rid in json.loads(r["result_refs"])}
    lab_results = {r["result_id"] for r in out.rows["results"] if r["category"] == "laboratory"}
    assert grouped == lab_results and {r["report_id"] for r in out.rows["results"] if r["report_id"]} == {
        r["report_id"] for r in reports
    }
    # Nothing the model has a table for is reported skipped.
    assert not set(out.skipped) & {"Problems", "Allergies", "Immunizations", "Procedures", "PlanOfCare"}


def test_clinical_summary_values_keep_codes_statuses_and_units() -> None:
    out = normalize_datamodel(
        _summary(
            EXAMPLES / "clinicalsummary/patient_query_response/clinicalsummary-patientqueryresponse.json"
        ),
        "lakeside-dm",
    )
    problems = {p["display"]: p for p in out.rows["problems"]}
    assert (problems["Pneumonia"]["code"], problems["Pneumonia"]["code_system"]) == (
        "233604007",
        "http://snomed.info/sct",
    )
    assert (problems["Pneumonia"]["status"], problems["Pneumonia"]["status_source"]) == (
        "resolved",
        "Resolved",
    )
    assert problems["Asthma"]["status"] == "active" and problems["Asthma"]["abated_at"] is not None
    allergies = {a["substance_display"]: a for a in out.rows["allergies"]}
    penicillin = allergies["Penicillin G benzathine"]
    assert penicillin["substance_system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"
    assert (penicillin["criticality"], penicillin["criticality_source"]) == ("high", "High criticality")
    assert penicillin["reactions"] == "Rash; Hives" and penicillin["severity"] == "moderate"
    assert (penicillin["status"], penicillin["category"]) == ("inactive", "medication")
    shots = {i["vaccine_code"]: i for i in out.rows["immunizations"]}
    assert (
        shots["88"]["vaccine_system"] == "http://hl7.org/fhir/sid/cvx"
        and shots["88"]["status"] == "completed"
    )
    assert (shots["88"]["dose_quantity"], shots["88"]["dose_unit"]) == (50.0, "mcg")
    xray = next(p for p in out.rows["procedures"] if p["display"] == "Chest X-Ray")
    assert xray["performed_at"] == datetime(2012, 8, 7, tzinfo=UTC)  # the compact CCD date 20120807
    assert xray["body_site_display"] == "Entire chest wall (body structure)" and xray["status"] == "completed"
    orders = {o["category"]: o for o in out.rows["orders"]}
    assert orders["order"]["code"] == "624-7" and orders["order"]["intent"] == "order"
    assert orders["order"]["status_source"] == "Request"
    assert orders["service"]["intent"] == "plan"


def test_query_response_rows_carry_the_records_own_time_not_the_response_time() -> None:
    payload = _summary(
        EXAMPLES / "clinicalsummary/patient_query_response/clinicalsummary-patientqueryresponse.json"
    )
    answered = datetime.fromisoformat(payload["Meta"]["EventDateTime"].replace("Z", "+00:00"))
    out = normalize_datamodel(payload, "lakeside-dm")
    for table in ("encounters", "results", "problems", "immunizations", "patients"):
        for row in out.rows[table]:
            assert row["source_updated_at"] != answered, table
    assert out.rows["patients"][0]["is_test"] is None  # Meta.Test marks the message, not the person


# ---- FHIR ------------------------------------------------------------------------------


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": f"https://x/{resource['resourceType']}/{resource['id']}", "resource": resource}


def _fhir_bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [_entry(r) for r in resources]}


SUBJECT = {"reference": "Patient/p1"}
META = {"lastUpdated": "2026-11-01T12:00:00Z"}


def _clinical_resources() -> list[dict[str, Any]]:
    def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
        return {"coding": [{"system": system, "code": code, "display": display}]}

    return [
        {
            "resourceType": "Condition",
            "id": "c1",
            "meta": META,
            "identifier": [{"system": "urn:redox:rb:ProblemID", "value": "PRB1"}],
            "clinicalStatus": coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
            "code": coding("http://hl7.org/fhir/sid/icd-10-cm", "J45.909", "Asthma"),
            "subject": SUBJECT,
            "onsetDateTime": "2007-10-17",
            "recorder": {"reference": "#rec"},
            "contained": [
                {
                    "resourceType": "Practitioner",
                    "id": "rec",
                    "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1112223334"}],
                }
            ],
        },
        {
            "resourceType": "AllergyIntolerance",
            "id": "a1",
            "meta": META,
            "patient": SUBJECT,
            "clinicalStatus": coding("x", "active"),
            "criticality": "high",
            "category": ["medication"],
            "type": "allergy",
            "code": coding("http://www.nlm.nih.gov/research/umls/rxnorm", "7982", "Penicillin"),
            "reaction": [
                {
                    "manifestation": [coding("http://snomed.info/sct", "247472004", "Hives")],
                    "severity": "moderate",
                }
            ],
        },
        {
            "resourceType": "Immunization",
            "id": "i1",
            "meta": META,
            "patient": SUBJECT,
            "status": "completed",
            "vaccineCode": coding("http://hl7.org/fhir/sid/cvx", "88", "Influenza"),
            "occurrenceDateTime": "2012-05-10T04:00:00Z",
            "doseQuantity": {"value": 0.5, "unit": "mL", "system": "http://unitsofmeasure.org", "code": "mL"},
        },
        {
            "resourceType": "Procedure",
            "id": "pr1",
            "meta": META,
            "subject": SUBJECT,
            "status": "completed",
            "code": coding("http://snomed.info/sct", "168731009", "Chest X-Ray"),
            "performedPeriod": {"start": "2012-08-07T10:00:00Z", "end": "2012-08-07T10:30:00Z"},
        },
        {
            "resourceType": "DiagnosticReport",
            "id": "dr1",
            "meta": META,
            "subject": SUBJECT,
            "status": "final",
            "identifier": [{"system": "urn:redox:rb:OrderID", "value": "ORD1"}],
            "code": coding("http://loinc.org", "24331-1", "Lipid panel"),
            "result": [{"reference": "Observation/o1"}],
            "performer": [{"reference": "Organization/lab"}],
        },
        {"resourceType": "Organization", "id": "lab", "name": "Redox Lab"},
        {
            "resourceType": "ServiceRequest",
            "id": "sr1",
            "meta": META,
            "subject": SUBJECT,
            "status": "active",
            "intent": "order",
            "priority": "stat",
            "identifier": [{"system": "urn:redox:rb:OrderID", "value": "ORD1"}],
            "code": coding("http://loinc.org", "24331-1", "Lipid panel"),
            "authoredOn": "2026-10-30T09:00:00Z",
        },
        {
            "resourceType": "Observation",
            "id": "o1",
            "meta": META,
            "subject": SUBJECT,
            "status": "final",
            "category": [coding("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")],
            "code": coding("http://loinc.org", "85354-9", "Blood pressure panel"),
            "effectiveDateTime": "2026-10-30T09:00:00Z",
            "component": [
                {
                    "code": coding("http://loinc.org", "8480-6"),
                    "valueQuantity": {"value": 120, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
                },
                {
                    "code": coding("http://loinc.org", "8462-4"),
                    "valueQuantity": {"value": 80, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
                },
            ],
        },
        {
            "resourceType": "Observation",
            "id": "o2",
            "meta": META,
            "subject": SUBJECT,
            "status": "final",
            "category": [
                coding("http://terminology.hl7.org/CodeSystem/observation-category", "social-history")
            ],
            "code": coding("http://loinc.org", "72166-2", "Tobacco smoking status"),
            "valueCodeableConcept": coding("http://snomed.info/sct", "266919005", "Never smoker"),
        },
        {
            "resourceType": "Appointment",
            "id": "ap1",
            "meta": META,
            "status": "booked",
            "contained": [{"resourceType": "Location", "id": "loc", "name": "Main Clinic"}],
            "participant": [
                {"actor": SUBJECT},
                {"actor": {"reference": "#loc"}},
                {"actor": {"reference": "Practitioner/doc"}},
            ],
        },
        {
            "resourceType": "Practitioner",
            "id": "doc",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "9998887776"}],
        },
    ]


def test_fhir_clinical_types_become_rows_with_codes_statuses_and_resolved_references() -> None:
    page = bundle_rows(_fhir_bundle(*_clinical_resources()), CONN, "responses/p.json", "patients")
    assert not page.quarantined  # Organization / Practitioner entries are reference targets, not errors
    problem = page.rows["problems"][0]
    assert (problem["problem_id"], problem["code"], problem["status"]) == ("PRB1", "J45.909", "active")
    assert problem["recorder"] == "1112223334"  # contained Practitioner
    allergy = page.rows["allergies"][0]
    assert (allergy["criticality"], allergy["severity"], allergy["reactions"]) == (
        "high",
        "moderate",
        "Hives",
    )
    shot = page.rows["immunizations"][0]
    assert (shot["vaccine_code"], shot["dose_unit"], shot["dose_quantity"]) == ("88", "mL", 0.5)
    procedure = page.rows["procedures"][0]
    assert procedure["performed_end_at"] - procedure["performed_at"] == timedelta(minutes=30)
    report = page.rows["diagnostic_reports"][0]
    assert (report["report_id"], report["performer"], report["result_count"]) == ("ORD1", "Redox Lab", 1)
    order = page.rows["orders"][0]
    assert (order["order_id"], order["priority"], order["intent"]) == ("ORD1", "stat", "order")
    bp, smoking = page.rows["results"]
    assert bp["value_numeric"] is None and bp["component_count"] == 2
    components = json.loads(bp["components"])
    assert [(c["code"], c["value_numeric"], c["unit"], c["unit_system"]) for c in components] == [
        ("8480-6", 120.0, "mm[Hg]", "http://unitsofmeasure.org"),
        ("8462-4", 80.0, "mm[Hg]", "http://unitsofmeasure.org"),
    ]
    assert (smoking["category"], smoking["value_code"], smoking["value_text"]) == (
        "social-history",
        "266919005",
        "Never smoker",
    )
    appointment = page.rows["appointments"][0]
    assert (appointment["location"], appointment["provider_npi"]) == ("Main Clinic", "9998887776")


# ---- publish: one row per record, merged field by field ------------------------------------


def _stage(con: duckdb.DuckDBPyConnection, surface: str, entity: str, rows: list[dict[str, Any]]) -> None:
    staged = rows_to_table(  # noqa: F841 - read by name in the SQL below
        [{**{k: v for k, v in r.items() if k not in ROW_EXTRAS}, "ingested_at": T0} for r in rows],
        staged_schema(entity),
    )
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {STAGING_SCHEMA}")
    con.execute(
        f"CREATE OR REPLACE TABLE {STAGING_SCHEMA}.{staged_table_name(surface, entity)} AS SELECT * FROM staged"
    )


def _fhir_patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"lastUpdated": "2026-11-01T12:00:00Z", "tag": [{"code": "HTEST"}]},
        "identifier": [{"system": "urn:redox:rb:MR", "value": "MR1"}],
        "name": [{"family": "Doe", "given": ["Jo"]}],
        "gender": "female",
    }


def _dm_summary() -> dict[str, Any]:
    """A PatientQueryResponse for the same patient and records, as the Data Model shows them."""
    return {
        "Meta": {
            "DataModel": "Clinical Summary",
            "EventType": "PatientQueryResponse",
            "EventDateTime": "2026-11-30T08:00:00Z",
            "Test": True,
        },
        "Header": {
            "Patient": {
                "Identifiers": [{"ID": "MR1", "IDType": "MR"}],
                "Demographics": {
                    "FirstName": "Jo",
                    "LastName": "Doe",
                    "PhoneNumber": {"Home": "+15555550100"},
                },
            }
        },
        "Problems": [
            {
                "Code": "J45.909",
                "CodeSystem": "2.16.840.1.113883.6.90",
                "Name": "Asthma",
                "StartDate": "2007-10-17T00:00:00.000Z",
                "Status": {"Code": "55561003", "Name": "Active"},
                "HealthStatus": {"Name": "Symptom Free"},
                "Comment": "seasonal",
            }
        ],
        "Allergies": [
            {
                "Substance": {"Code": "7982", "CodeSystem": "2.16.840.1.113883.6.88", "Name": "Penicillin"},
                "Status": {"Name": "Active"},
                "EndDate": "2020-01-01",
            }
        ],
        "Immunizations": [
            {
                "DateTime": "2012-05-10T04:00:00.000Z",
                "Product": {
                    "Code": "88",
                    "CodeSystem": "2.16.840.1.113883.12.292",
                    "Name": "Influenza",
                    "LotNumber": "L-7",
                },
            }
        ],
    }


def test_a_record_seen_through_both_surfaces_is_one_row_with_every_field_either_knows(tmp_path: Path) -> None:
    fhir = bundle_rows(
        _fhir_bundle(_fhir_patient(), *_clinical_resources()), CONN, "responses/f.json", "patients"
    )
    dm = normalize_datamodel(_dm_summary(), CONN, "responses/d.json")
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        for entity in ("patients", "problems", "allergies", "immunizations", "results", "diagnostic_reports"):
            _stage(con, "fhir", entity, fhir.rows[entity])
            if dm.rows[entity]:
                _stage(con, "datamodel", entity, dm.rows[entity])
        counts = publish_connection(con, CONN)
        assert counts["patients"] == counts["problems"] == counts["allergies"] == counts["immunizations"] == 1
        patient = con.execute("SELECT source_surface, phone, sex, is_test FROM redox.patients").fetchone()
        # FHIR knows sex and the HTEST tag, the Data Model the phone: the row keeps all three.
        assert patient == ("both", "+15555550100", "female", True)
        problem = con.execute(
            "SELECT problem_id, source_surface, source_id, recorder, health_status, note FROM redox.problems"
        ).fetchone()
        assert problem == ("PRB1", "both", "c1", "1112223334", "Symptom Free", "seasonal")
        allergy = con.execute("SELECT source_surface, criticality, ended_at FROM redox.allergies").fetchone()
        assert allergy[:2] == ("both", "high") and allergy[2] is not None
        shot = con.execute("SELECT source_surface, lot_number, dose_unit FROM redox.immunizations").fetchone()
        assert shot == ("both", "L-7", "mL")
        assert con.execute(
            "SELECT result_id, position, code, value_numeric FROM redox.result_components ORDER BY position"
        ).fetchall() == [("o1", 0, "8480-6", 120.0), ("o1", 1, "8462-4", 80.0)]
        assert con.execute("SELECT report_id, result_id FROM redox.diagnostic_report_results").fetchall() == [
            ("ORD1", "o1")
        ]
        # Re-publishing is idempotent.
        assert publish_connection(con, CONN) == counts


def test_a_newer_surface_wins_a_field_but_never_with_a_null(tmp_path: Path) -> None:
    older = {
        "connection_id": CONN, "source_surface": "fhir", "source_id": "e1", "raw_ref": "r1",
        "source_updated_at": T0, "patient_ref_type": "fhir", "patient_ref_value": "p1",
        "encounter_id": "VN1", "status": "finished", "end_at": T0, "type_code": "AMB", "attending_npi": "1",
    }  # fmt: skip
    newer = {
        "connection_id": CONN, "source_surface": "datamodel", "source_id": "VN1", "raw_ref": "r2",
        "source_updated_at": T0 + timedelta(days=1), "patient_ref_type": "MR", "patient_ref_value": "MR1",
        "encounter_id": "VN1", "status": "cancelled", "end_at": None, "location": "Main",
    }  # fmt: skip
    fhir = bundle_rows(_fhir_bundle(_fhir_patient()), CONN, "responses/f.json", "patients")
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        _stage(con, "fhir", "patients", fhir.rows["patients"])
        _stage(con, "fhir", "encounters", [older])
        _stage(con, "datamodel", "encounters", [newer])
        publish_connection(con, CONN)
        row = con.execute(
            "SELECT source_surface, source_id, status, end_at, type_code, attending_npi, location, patient_key IS NOT NULL "
            "FROM redox.encounters"
        ).fetchone()
    assert row == ("both", "e1", "cancelled", T0, "AMB", "1", "Main", True)


def test_per_type_searches_use_the_documented_patient_parameter() -> None:
    from pipelines.fhir.patient_pull import FhirPatientResult, type_search_params

    known = FhirPatientResult(fhir_id="p1", mr_token="urn:redox:rb:MR|MR1")
    for rtype in ("AllergyIntolerance", "Condition", "Immunization"):
        assert type_search_params(rtype, known, 50)[0] == ("patient.identifier", "urn:redox:rb:MR|MR1")
    for rtype in ("Procedure", "DiagnosticReport", "ServiceRequest", "Observation", "MedicationRequest"):
        assert type_search_params(rtype, known, 50)[0] == ("patient", "p1")
    # Without an MR identifier, `patient` (also documented for the three).
    assert type_search_params("Condition", FhirPatientResult(fhir_id="p1"), 50)[0] == ("patient", "p1")


# ---- pairing outside data (issue 12: a FHIR-native source's records through both surfaces) ----


def _results_query_response(*orders: dict[str, Any]) -> dict[str, Any]:
    return {
        "Meta": {
            "DataModel": "Results",
            "EventType": "QueryResponse",
            "EventDateTime": "2026-11-30T08:00:00Z",
        },
        "Orders": [{"Patient": {"Identifiers": [{"ID": "MR1", "IDType": "MR"}]}, **o} for o in orders],
    }


def _dm_result(code: str, value: str, when: str) -> dict[str, Any]:
    return {"Code": code, "Codeset": "LOINC", "Value": value, "ValueType": "Numeric", "Units": "mm[Hg]",
            "Status": "Final", "CompletionDateTime": when}  # fmt: skip


def _unordered(order_id: str, when: str, *results: dict[str, Any]) -> dict[str, Any]:
    """A Results order that names no procedure: how an Observation no order asked for
    travels in the Data Model (the sandbox's rendering of a lone outside Observation)."""
    return {"ID": order_id, "CollectionDateTime": when, "CompletionDateTime": when, "LastUpdated": when,
            "Status": "Resulted", "ResultsStatus": "Final",
            "Procedure": {"Code": None, "Codeset": None, "Description": None}, "Results": list(results)}  # fmt: skip


def _publish_pair(tmp_path: Path, entity: str, fhir_resources: list[dict[str, Any]], dm_payload: dict) -> Any:
    fhir = bundle_rows(_fhir_bundle(_fhir_patient(), *fhir_resources), CONN, "responses/f.json", "patients")
    dm = normalize_datamodel(dm_payload, CONN, "responses/d.json")
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    _stage(con, "fhir", "patients", fhir.rows["patients"])
    for surface, out in (("fhir", fhir), ("datamodel", dm)):
        for name in (entity, "diagnostic_reports"):
            if out.rows[name]:
                _stage(con, surface, name, out.rows[name])
    publish_connection(con, CONN)
    return con


def test_a_problem_known_only_by_its_text_is_one_row_across_surfaces(tmp_path: Path) -> None:
    condition = {
        "resourceType": "Condition", "id": "c9", "meta": META, "subject": SUBJECT,
        "code": {"text": "Asthma"}, "onsetDateTime": "2026-11-01",
    }  # fmt: skip
    summary = _dm_summary()
    # The same entry, its text spaced and cased as another EHR screen would show it.
    summary["Problems"] = [{"Name": "  asthma ", "StartDate": "2026-11-01T00:00:00.000Z"}]
    summary.pop("Allergies"), summary.pop("Immunizations")
    with _publish_pair(tmp_path, "problems", [condition], summary) as con:
        rows = con.execute("SELECT problem_id, source_surface, code, display FROM redox.problems").fetchall()
    assert rows == [("c9", "both", None, "Asthma")]


def test_a_text_match_key_is_deterministic_and_never_meets_a_code() -> None:
    from pipelines.normalize_common import match_key

    day = datetime(2026, 11, 1, 9, 30, tzinfo=UTC)
    assert match_key(None, day, text="Chest  Pain") == match_key("", day.date(), text="chest pain")
    assert match_key(None, day, text="chest pain") != match_key(None, day, text="back pain")
    assert match_key(None, day, text="chest pain") != match_key("chest pain", day)
    assert match_key(None, day, text="  ") is None and match_key(None, day) is None


def test_a_blood_pressure_panel_pairs_whichever_loinc_code_names_it(tmp_path: Path) -> None:
    # Synthea and many EHRs code the panel 55284-4; the Data Model rebuilds it from its parts.
    when = "2026-11-01T09:30:00Z"
    bp = {
        "resourceType": "Observation", "id": "bp1", "meta": META, "status": "final", "subject": SUBJECT,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "55284-4", "display": "Blood pressure"}]},
        "effectiveDateTime": when,
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": c}]},
             "valueQuantity": {"value": v, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
            for c, v in (("8480-6", 120), ("8462-4", 80))
        ],
    }  # fmt: skip
    dm = _results_query_response(
        _unordered("bp1", when, _dm_result("8480-6", "120", when), _dm_result("8462-4", "80", when))
    )
    with _publish_pair(tmp_path, "results", [bp], dm) as con:
        rows = con.execute(
            "SELECT result_id, source_surface, code, category, component_count FROM redox.results"
        ).fetchall()
        reports = con.execute("SELECT count(*) FROM redox.diagnostic_reports").fetchone()[0]
    assert rows == [("bp1", "both", "55284-4", "vital-signs", 2)]
    assert reports == 0


def test_a_results_order_is_a_report_only_when_it_names_a_laboratory_procedure() -> None:
    when = "2026-11-01T09:30:00Z"
    glucose = {**_dm_result("2339-0", "95", when), "Units": "mg/dL"}
    heart_rate = {**_dm_result("8867-4", "72", when), "Units": "/min"}
    panel = {**_unordered("ORD7", when, glucose), "Procedure": {"Code": "24323-8", "Codeset": "LOINC"}}
    out = normalize_datamodel(
        _results_query_response(
            panel, _unordered("obs1", when, glucose), _unordered("obs2", when, heart_rate)
        ),
        CONN,
        "responses/d.json",
    )
    assert [(r["report_id"], r["order_id"]) for r in out.rows["diagnostic_reports"]] == [("ORD7", "ORD7")]
    by_order = {r["order_id"]: r for r in out.rows["results"]}
    assert by_order["ORD7"]["report_id"] == "ORD7"
    # An order without a procedure holds observations no order asked for: results, no report;
    # its category comes from its results' codes.
    assert (by_order["obs1"]["report_id"], by_order["obs1"]["category"]) == (None, "laboratory")
    assert (by_order["obs2"]["report_id"], by_order["obs2"]["category"]) == (None, "vital-signs")


def test_twin_summary_entries_are_two_rows_with_ids_stable_across_resends() -> None:
    # A Clinical Summary entry has no id: one is derived from (patient, code, time). The same
    # procedure done twice at one time is two entries alike in all three; both must be kept.
    summary = _summary(
        EXAMPLES / "clinicalsummary/patient_query_response/clinicalsummary-patientqueryresponse.json"
    )
    procedures = summary["Procedures"]["Procedures"]
    xray = next(p for p in procedures if p.get("Description") == "Chest X-Ray" or "X-Ray" in str(p))
    procedures.append(json.loads(json.dumps(xray)))

    def ids() -> list[str]:
        out = normalize_datamodel(json.loads(json.dumps(summary)), "lakeside-dm")
        return [p["procedure_id"] for p in out.rows["procedures"] if p["display"] == "Chest X-Ray"]

    first = ids()
    assert len(first) == 2 and len(set(first)) == 2, "twin entries keep one row each"
    assert ids() == first, "a re-sent summary derives the same ids"


def test_a_booking_fhir_sends_without_identifiers_pairs_on_its_start_and_keeps_the_visit_number(
    tmp_path: Path,
) -> None:
    # The FHIR copy lost its identifiers (only its logical id is left); the Data Model copy has
    # the visit number. Same patient, same start: one appointment, keyed by the visit number.
    start = "2026-11-02T09:30:00Z"
    appointment = {
        "resourceType": "Appointment", "id": "a-logical-7", "meta": META, "status": "booked",
        "start": start, "minutesDuration": 30,
        "participant": [{"actor": SUBJECT, "status": "accepted"}],
    }  # fmt: skip
    booking = {
        "Meta": {"DataModel": "Scheduling", "EventType": "New", "EventDateTime": "2026-11-01T12:00:00Z"},
        "Patient": {"Identifiers": [{"ID": "MR1", "IDType": "MR"}]},
        "Visit": {"VisitNumber": "VN-42", "VisitDateTime": start, "Duration": 30, "Status": "Scheduled"},
    }
    with _publish_pair(tmp_path, "appointments", [appointment], booking) as con:
        rows = con.execute("SELECT appointment_id, source_surface FROM redox.appointments").fetchall()
    assert rows == [("VN-42", "both")]
