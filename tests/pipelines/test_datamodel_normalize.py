"""The Data Model normalizer against the 65 real Redox payloads, malformed payloads, and
the sandbox's own Data Model renderer (same canonical record → same row values)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipelines.datamodel.normalize import (
    EMPTY_RESPONSE,
    FAILED_RESPONSE,
    NOT_CLINICAL,
    QUERY_REQUEST,
    ROWS,
    DataModelRows,
    normalize_datamodel,
)
from pipelines.model import ENTITIES, ROW_EXTRAS, rows_to_table, staged_schema
from pipelines.normalize_common import NormalizationError

# Real Redox Dev Tools payloads (MIT, see tests/fixtures/redox-examples/LICENSE-*), vendored
# so the suite is hermetic.
EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "redox-examples" / "datamodel"
EXAMPLE_FILES = sorted(EXAMPLES.rglob("*.json"))
CONN = "northwind-dm"
RAW = "raw/northwind-dm/datamodel/page-0001.json"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"

# Query requests in the corpus: the only payloads that yield no rows.
QUERY_REQUEST_FILES = {
    "clinicalsummary/patient_query/clinicalsummary-patientquery.json",
    "clinicalsummary/patient_query/extra-attr-harley.json",
    "clinicalsummary/patient_query/redox-example-patientquery-barbara.json",
    "clinicalsummary/patient_query/redox-example-patientquery-walter.json",
    "notes/query/notes-query.json",
    "results/query/barbara.json",
    "results/query/query.json",
    "results/query/timothy.json",
    "results/query/walter.json",
    "vaccination/patientQuery/barbara.json",
    "vaccination/patientQuery/timothy.json",
    "vaccination/patientQuery/vaccination-patientquery.json",
}


def load(relative: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / relative).read_bytes().decode("utf-8-sig"))


def run(relative: str, **kwargs: Any) -> DataModelRows:
    return normalize_datamodel(load(relative), CONN, RAW, **kwargs)


def only(result: DataModelRows, entity: str) -> dict[str, Any]:
    rows = result.rows[entity]
    assert len(rows) == 1, f"{entity}: {len(rows)} rows"
    return rows[0]


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def assert_builds(result: DataModelRows) -> None:
    for entity, rows in result.rows.items():
        # Only the documented side channels may ride along; any other key fails the build.
        clean = [{k: v for k, v in row.items() if k not in ROW_EXTRAS} for row in rows]
        table = rows_to_table(clean, staged_schema(entity))
        assert table.num_rows == len(rows)


# ---- the corpus ----------------------------------------------------------------------------


def test_corpus_is_complete() -> None:
    assert len(EXAMPLE_FILES) == 65


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_yields_rows_or_a_documented_outcome(path: Path) -> None:
    relative = str(path.relative_to(EXAMPLES))
    result = normalize_datamodel(json.loads(path.read_bytes().decode("utf-8-sig")), CONN, RAW)
    assert_builds(result)
    if relative in QUERY_REQUEST_FILES:
        assert (result.outcome, result.reason, result.count()) == (NOT_CLINICAL, QUERY_REQUEST, 0)
        return
    assert result.outcome == ROWS and result.reason is None
    assert result.rows["patients"], "every clinical example names its patient"
    for entity in ENTITIES:
        for row in result.rows[entity]:
            assert row["connection_id"] == CONN and row["raw_ref"] == RAW
            assert row["source_surface"] == "datamodel" and row["source_id"]
            assert row["patient_ref_type"] and row["patient_ref_value"]
            assert "ingested_at" not in row
    for row in result.rows["patients"]:
        assert isinstance(row["identifiers"], dict) and row["identifiers"]


def test_results_new_timothy() -> None:
    result = run("results/newResults/timothy.json")
    patient = only(result, "patients")
    assert patient["patient_ref_type"] == "MR" and patient["patient_ref_value"] == "0000000001"
    assert patient["source_id"] == "0000000001" and patient["mrn"] == "0000000001"
    assert patient["identifiers"] == {
        "MR": "0000000001",
        "EHRID": "e167267c-16c9-4fe3-96ae-9cff5703e90a",
        "NIST": "a1d4ee8aba494ca",
    }
    assert (patient["family_name"], patient["given_names"]) == ("Bixby", "Timothy Paul")
    assert patient["birth_date"] == date(2008, 1, 6) and patient["sex"] == "male"
    assert (patient["race"], patient["ethnicity"], patient["language"]) == ("White", None, "en")
    assert (patient["address_line"], patient["city"], patient["state"], patient["postal_code"]) == (
        "4762 Hickory Street",
        "Monroe",
        "WI",
        "53566",
    )
    assert patient["phone"] == "+18088675301" and patient["email"] is None
    # Meta.Test flags the message, not the patient: the Data Model has no per-patient test flag.
    assert patient["is_test"] is None and patient["active"] is True and patient["deceased_at"] is None
    assert patient["source_updated_at"] == ts("2020-11-20T15:32:26.580Z")

    first, second = result.rows["results"]
    assert first["result_id"] == "157968300-TEST0001" and first["order_id"] == "157968300"
    assert first["abnormal_flag"] == "A" and second["abnormal_flag"] == "N"
    assert (first["status"], first["category"], first["code"], first["code_system"]) == (
        "final",
        "laboratory",
        "TEST0001",
        None,
    )
    assert first["display"] == "Cystic Fibrosis" and first["value_text"] == "Positive Result"
    assert first["value_numeric"] is None and first["encounter_id"] is None
    assert first["effective_at"] == ts("2015-05-06T06:00:58.872Z")
    assert first["performer"] == "Redox Lab WI"  # no performer id: the producing lab
    assert (first["patient_ref_type"], first["patient_ref_value"]) == ("MR", "0000000001")


def test_demographic_variants() -> None:
    walter = only(run("results/newResults/walter.json"), "patients")
    assert walter["ethnicity"] == "Hispanic or Latino" and walter["email"] == "wc1945@test.net"
    assert walter["identifiers"]["NIST"] == "ef05d4068ee144f"  # HL7 CX form reduced to its ID
    barbara = only(run("results/newResults/barbara.json"), "patients")
    assert barbara["given_names"] == "Barbara" and barbara["sex"] == "female"


def test_unsolicited_results_use_the_application_order_id() -> None:
    rows = run("results/newUnsolicited/timothy.json").rows["results"]
    assert [r["result_id"] for r in rows] == ["1234-TEST0001", "1234-TEST0004"]


def test_results_query_response_reads_each_orders_patient_and_numeric_visit() -> None:
    result = run("results/queryResponse/timothy.json")
    row = result.rows["results"][0]
    assert row["encounter_id"] == "1234567"  # VisitNumber arrived as a number
    assert (row["patient_ref_type"], row["patient_ref_value"]) == ("MR", "000000001")  # IDType MRN
    patient = only(result, "patients")
    # Identifiers only: a reference row that never outranks one with demographics.
    assert patient["family_name"] is None and patient["source_updated_at"] is None


def test_response_echoing_the_query_event_type_is_read_as_a_response() -> None:
    payload = load("results/queryResponse/timothy.json")
    payload["Meta"]["EventType"] = "Query"
    result = normalize_datamodel(payload, CONN)
    assert result.event == "Results.QueryResponse" and len(result.rows["results"]) == 2


def test_discharge() -> None:
    result = run("patientadmin/discharge/patientadmin-discharge.json")
    enc = only(result, "encounters")
    assert (enc["encounter_id"], enc["status"], enc["class"]) == ("1234", "finished", "IMP")
    assert enc["start_at"] == ts("2021-05-26T19:48:16.182Z") and enc["end_at"] == ts(
        "2021-05-27T19:48:16.182Z"
    )
    assert (enc["location"], enc["department"], enc["attending_npi"]) == (
        "RES General Hospital",
        "3N",
        "4356789876",
    )
    assert enc["discharge_disposition"] == "Discharged to home care or self care (routine discharge)"
    # The patient's diagnosis names something else than the visit reason: the reason stays text.
    assert (enc["reason_code"], enc["reason_display"]) == (None, "Acute post traumatic headache")
    assert enc["source_id"] == "1234" and enc["source_updated_at"] == ts("2021-05-27T19:48:15.553Z")


def test_medications_new() -> None:
    med = only(run("medications/newMedications/redox-example-medications-new_Timothy.json"), "medications")
    assert med["medication_id"] == "234562df-97cf-456e-b41c-8f7443c33c57"
    assert (med["code"], med["code_system"], med["display"]) == ("104894", RXNORM, "Ondansetron 4 Mg Po Tbdp")
    assert (med["kind"], med["status"], med["intent"]) == ("request", "active", "order")
    assert (med["dose_quantity"], med["dose_unit"], med["route"]) == (4.0, "mg", "Oral")
    assert med["frequency"] == "every 8 h" and med["prescriber_npi"] == "4356789876"
    assert med["encounter_id"] == "1234" and med["start_at"] == ts("2021-01-07T16:07:58.265Z")


def test_medication_events_set_status() -> None:
    assert only(run("medications/cancel/medications-cancel.json"), "medications")["status"] == "cancelled"
    assert only(run("medications/update/medications-update.json"), "medications")["status"] == "active"
    payload = load("medications/update/medications-update.json")
    payload["Order"]["Medication"]["EndDate"] = "2020-12-01T00:00:00.000Z"  # ended before the event
    assert only(normalize_datamodel(payload, CONN), "medications")["status"] == "completed"


def test_medication_administration() -> None:
    med = only(run("medications/administration/medications-administration.json"), "medications")
    assert med["medication_id"] == "7f1a20f4-f6d1-43a6-8161-4aef8b5cefee-administration-20201214T173029Z"
    assert (med["kind"], med["status"], med["intent"], med["code"]) == (
        "administration",
        "completed",
        None,
        "104894",
    )
    assert med["prescriber_npi"] == "4356789876"


def test_scheduling_modification() -> None:
    appt = only(run("scheduling/modification/scheduling-modification.json"), "appointments")
    assert (appt["appointment_id"], appt["duration_minutes"], appt["status"]) == ("1234", 30, "booked")
    assert appt["start_at"] == ts("2021-05-27T19:48:16.335Z")
    assert appt["end_at"] == appt["start_at"] + timedelta(minutes=30)
    assert (appt["provider_npi"], appt["location"], appt["department"]) == (
        "4356789876",
        "RES General Hospital",
        "3N",
    )
    assert appt["reason"] == "Check up" and appt["type_code"] is None and appt["rescheduled_from"] is None


def test_scheduling_visit_number_as_number_and_cancel() -> None:
    payload = load("scheduling/modification/scheduling-modification.json")
    payload["Meta"]["EventType"] = "Cancel"
    payload["Visit"].update(VisitNumber=3514, CancelReason="Patient request", Duration="45")
    appt = only(normalize_datamodel(payload, CONN), "appointments")
    assert (appt["appointment_id"], appt["status"], appt["cancel_reason"]) == (
        "3514",
        "cancelled",
        "Patient request",
    )
    assert appt["duration_minutes"] == 45


def test_notes() -> None:
    new = only(run("notes/new_notes/notes-new.json"), "documents")
    assert (new["document_id"], new["status"], new["kind"]) == (
        "b169267c-10c9-4fe3-91ae-9ckf5703e90l",
        "current",
        "note",
    )
    assert new["type_code"] == "Empty File" and new["title"] == "SamplePDF-Order Specific Note"
    assert new["content"] is None and new["content_bytes"] is None  # placeholder, not base64
    assert new["author"] == "4356789876" and new["encounter_id"] == "1234"
    assert only(run("notes/delete/notes-delete.json"), "documents")["status"] == "entered-in-error"
    replaced = only(run("notes/replace/notes-replace.json"), "documents")
    assert (
        replaced["status"] == "current" and replaced["supersedes"] == "93770d83-f1f2-4a4c-a28e-065626a76ba8"
    )


def test_note_query_response_decodes_the_pdf() -> None:
    payload = load("notes/queryresponse/notes-query-response.json")
    doc = only(normalize_datamodel(payload, CONN), "documents")
    pdf = base64.b64decode(payload["Notes"][0]["FileContents"])
    assert doc["content"] == pdf and pdf.startswith(b"%PDF")
    assert (doc["content_type"], doc["content_bytes"]) == ("application/pdf", len(pdf))
    assert doc["content_sha256"] == hashlib.sha256(pdf).hexdigest()


def test_media() -> None:
    doc = only(run("media/new_media/redox-example-media-new-barbara.json"), "documents")
    assert (doc["content_type"], doc["kind"]) == ("application/pdf", "note")
    assert doc["content_bytes"] and doc["authored_at"] == ts("2017-06-22T17:00:00.387Z")
    assert only(run("media/new_media/media-new.json"), "documents")["content_sha256"] is None


def test_clinical_summary() -> None:
    result = run("clinicalsummary/patient_query_response/redox-example-patientqueryresponse-timothy.json")
    patient = only(result, "patients")
    assert patient["mrn"] == "0000000001" and patient["ethnicity"] == "Not Hispanic or Latino"
    enc = only(result, "encounters")  # the CSN is Epic's visit number
    assert (enc["encounter_id"], enc["type_code"], enc["type_system"]) == ("2376492", "99222", CPT)
    assert (enc["reason_display"], enc["location"]) == ("Pneumonia", "Community Health and Hospitals")
    by_display = {r["display"]: r for r in result.rows["results"]}
    assert by_display["HGB"]["value_numeric"] == 10.2 and by_display["HGB"]["code_system"] == LOINC
    assert by_display["PLT"]["abnormal_flag"] == "L" and by_display["PLT"]["performer"] == "Redox Lab WI"
    assert by_display["Color of Sputum"]["value_numeric"] is None
    assert by_display["Color of Sputum"]["value_text"] == "Green"
    vitals = [r for r in result.rows["results"] if r["category"] == "vital-signs"]
    assert len(vitals) == 6 and {v["status"] for v in vitals} == {"final"}
    meds = {m["code"]: m for m in result.rows["medications"]}
    assert meds["104894"]["kind"] == "statement" and meds["104894"]["dose_quantity"] == 4.0
    assert meds["104894"]["frequency"] == "every 8 h" and meds["104894"]["status"] == "active"
    assert meds["573621"]["status"] == "completed"  # ended before the summary was sent
    assert "Allergies" not in result.skipped and "Problems" not in result.skipped
    assert "FamilyHistory" in result.skipped and "Insurances" in result.skipped
    # Derived ids are stable across runs and differ between patients.
    again = run("clinicalsummary/patient_query_response/redox-example-patientqueryresponse-timothy.json")
    assert [r["result_id"] for r in again.rows["results"]] == [r["result_id"] for r in result.rows["results"]]
    other = run("clinicalsummary/patient_query_response/clinicalsummary-patientqueryresponse.json")
    assert not {r["result_id"] for r in other.rows["results"]} & {
        r["result_id"] for r in result.rows["results"]
    }
    assert other.rows["patients"][0]["patient_ref_type"] == "2.16.840.1.113883.4.6"  # first identifier


def test_visit_push_adds_the_documented_visit() -> None:
    result = run("clinicalsummary/visit_push/redox-example-visitpush-timothy.json")
    visit = next(e for e in result.rows["encounters"] if e["encounter_id"] == "30311442")
    assert visit["status"] == "finished" and visit["location"] == "RES General Hospital"
    # Statements, administrations, and the plan of care's planned medication (a request).
    assert {m["kind"] for m in result.rows["medications"]} == {"statement", "administration", "request"}
    assert {m["intent"] for m in result.rows["medications"] if m["kind"] == "request"} == {"plan"}


def test_vaccination_fills_immunizations() -> None:
    result = run("vaccination/newVaccination/timothy.json")
    assert result.outcome == ROWS and result.skipped == ()
    assert [e for e in ENTITIES if result.rows[e]] == ["patients", "immunizations"]
    shot = only(result, "immunizations")
    assert shot["immunization_id"] == "123"  # the vaccination's order id
    assert (shot["vaccine_code"], shot["vaccine_system"]) == ("20", "http://hl7.org/fhir/sid/cvx")
    assert (shot["lot_number"], shot["dose_quantity"], shot["status"]) == ("123456789", 0.5, "completed")
    assert shot["site"] == "Left arm" and shot["performer"] == "4356789876"


def test_non_clinical_outcomes() -> None:
    failed = load("results/queryResponse/timothy.json")
    failed["Meta"]["Errors"] = [{"ID": 1, "Text": "EHR timeout", "Type": "transmission", "Module": "Send"}]
    assert normalize_datamodel(failed, CONN).reason == FAILED_RESPONSE
    no_match = {"Meta": {"DataModel": "PatientSearch", "EventType": "Response"}, "Patient": {}}
    assert normalize_datamodel(no_match, CONN).reason == EMPTY_RESPONSE
    empty = {"Meta": {"DataModel": "Results", "EventType": "QueryResponse"}, "Orders": []}
    assert normalize_datamodel(empty, CONN).reason == EMPTY_RESPONSE
    provider = {"Meta": {"DataModel": "Provider", "EventType": "New"}, "Provider": {"ID": "1"}}
    assert normalize_datamodel(provider, CONN).reason == "Provider is not an entity of the common model"
    slots = {"Meta": {"DataModel": "Scheduling", "EventType": "AvailableSlotsResponse"}, "AvailableSlots": []}
    assert normalize_datamodel(slots, CONN).reason == "available slots are not appointments"
    request = load("results/query/timothy.json")
    assert normalize_datamodel(request, CONN).reason == QUERY_REQUEST


def test_document_get_response_uses_the_queried_patient() -> None:
    cda = b"<ClinicalDocument/>"
    payload = {
        "Meta": {"DataModel": "Clinical Summary", "EventType": "DocumentGetResponse"},
        "Document": {"ID": "doc-1"},
        "FileType": "XML",
        "Data": base64.b64encode(cda).decode(),
    }
    with pytest.raises(NormalizationError):
        normalize_datamodel(payload, CONN)
    queried = {"Identifiers": [{"ID": "0000000001", "IDType": "MR"}]}
    doc = only(normalize_datamodel(payload, CONN, patient=queried), "documents")
    assert (doc["document_id"], doc["kind"], doc["content"]) == ("doc-1", "cda", cda)
    assert doc["patient_ref_value"] == "0000000001"


# ---- malformed payloads --------------------------------------------------------------------


def _phi_values(payload: dict[str, Any]) -> set[str]:
    """Every string / number in the payload outside ``Meta`` (names, ids, codes, values)."""
    out: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str | int | float) and not isinstance(node, bool) and len(str(node)) >= 3:
            out.add(str(node))

    walk({k: v for k, v in payload.items() if k != "Meta"})
    return out


def _break_order_id(p: dict[str, Any]) -> None:
    p["Orders"][0]["ID"] = None


def _break_result_code(p: dict[str, Any]) -> None:
    p["Orders"][0]["Results"][1]["Code"] = ""


def _break_patient(p: dict[str, Any]) -> None:
    p["Patient"]["Identifiers"] = []


def _break_medication_order(p: dict[str, Any]) -> None:
    del p["Order"]["ID"]


def _break_visit_number(p: dict[str, Any]) -> None:
    p["Visit"]["VisitNumber"] = None


def _break_document_id(p: dict[str, Any]) -> None:
    p["Note"]["DocumentID"] = " "


@pytest.mark.parametrize(
    ("relative", "breaks", "names"),
    [
        ("results/newResults/timothy.json", _break_order_id, "Orders[0] has no ID"),
        ("results/newResults/timothy.json", _break_result_code, "Orders[0].Results[1] has no Code"),
        ("results/newResults/timothy.json", _break_patient, "Patient has no Identifiers"),
        ("medications/newMedications/medications-new.json", _break_medication_order, "Order has no ID"),
        (
            "patientadmin/discharge/patientadmin-discharge.json",
            _break_visit_number,
            "Visit has no VisitNumber",
        ),
        (
            "scheduling/modification/scheduling-modification.json",
            _break_visit_number,
            "Visit has no VisitNumber",
        ),
        ("notes/new_notes/notes-new.json", _break_document_id, "Note has no DocumentID"),
    ],
)
def test_malformed_payload_raises_without_phi(relative: str, breaks: Any, names: str) -> None:
    """A payload that cannot be read raises; a bad record inside a readable list of records
    (an order of a Results message) is quarantined on its own. Either way, no PHI."""
    payload = load(relative)
    breaks(payload)
    try:
        result = normalize_datamodel(copy.deepcopy(payload), CONN, RAW)
    except NormalizationError as exc:
        message = str(exc)
    else:
        assert result.quarantined, "the malformed record was neither refused nor quarantined"
        message = " | ".join(q.reason for q in result.quarantined)
    assert names in message
    # A value counts as leaked when it appears as a whole token ("Pat" inside "Patient" does not).
    leaked = {v for v in _phi_values(payload) if re.search(rf"(?<![\w.-]){re.escape(v)}(?![\w.-])", message)}
    assert not leaked


def test_payload_without_data_model_or_not_an_object() -> None:
    with pytest.raises(NormalizationError, match="Meta.DataModel"):
        normalize_datamodel({"Patient": {}}, CONN)
    with pytest.raises(NormalizationError, match="not a JSON object"):
        normalize_datamodel([], CONN)  # type: ignore[arg-type]


def test_tolerates_nulls_strings_for_numbers_and_unknown_keys() -> None:
    payload = load("results/newResults/timothy.json")
    payload["Foo"] = "bar"
    payload["Visit"] = None
    result = payload["Orders"][0]["Results"][0]
    result.update(
        ValueType="Numeric", Value="7.5", Units="mg/dL", ReferenceRange={"Low": "3", "High": 9, "Text": None}
    )
    result["Producer"] = None
    result["Performer"] = {"ID": "1112223334", "IDType": "NPI"}
    row = normalize_datamodel(payload, CONN).rows["results"][0]
    assert (row["value_numeric"], row["value_text"], row["unit"]) == (7.5, "7.5", "mg/dL")
    assert (row["reference_low"], row["reference_high"]) == (3.0, 9.0)
    assert row["performer"] == "1112223334" and row["encounter_id"] is None


# ---- the sandbox's renderer: the same canonical record reads the same ---------------------

# The renderer belongs to the sandbox; without it only these tests are skipped.
from sandbox.config import ConnectionSpec  # noqa: E402
from sandbox.population import records as rec  # noqa: E402

try:
    from sandbox.datamodel import render
except ImportError:  # pragma: no cover - only while the sandbox renderer is absent
    render = None
needs_renderer = pytest.mark.skipif(render is None, reason="sandbox.datamodel.render is not available")

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DM_CONN = ConnectionSpec(
    id=CONN, name="Northwind DM", surfaces=("datamodel",), id_types=("MR", "EHRID", "NIST")
)
DOCTOR = rec.Provider("4356789876", "Pat", "Granite")
WARD = rec.Location("RES General Hospital", "3N", "136", "B", "Inpatient")


def _patient(i: int) -> rec.PatientRecord:
    return rec.PatientRecord(
        connection_id=CONN,
        id=f"pat-{i}",
        last_updated=NOW - timedelta(days=30),
        version=1,
        person_index=i,
        mrn=f"{i:010d}",
        ehr_id=f"ehr-{i}",
        enterprise_id=f"EPI{i:06d}",
        nist_id=f"nist{i:011d}",
        family_name="Bixby",
        given_names=("Timothy", "Paul"),
        birth_date=date(2008, 1, 6),
        sex="male",
        race="White",
        ethnicity="Not Hispanic or Latino" if i % 2 else None,
        language="en",
        address_line="4762 Hickory Street",
        city="Monroe",
        state="WI",
        postal_code="53566",
        county="Green",
        phone_home=None if i % 2 else "+18088675301",
        phone_mobile="+19189368865",
        email="t@example.test",
        ssn=None,
        marital_status=None,
        deceased_at=NOW - timedelta(days=1) if i == 2 else None,
        is_test=False,
    )


def _ref(p: rec.PatientRecord) -> rec.PatientRef:
    return rec.PatientRef(p.id, p.mrn)


def _normalized(change: rec.Change, patient: rec.PatientRecord) -> DataModelRows:
    """Render the change as the sandbox pushes it and normalize its last event."""
    events = render.render_event(change, DM_CONN, patient)
    assert events
    results = [normalize_datamodel(event, CONN, RAW) for event in events]
    for result in results:
        assert_builds(result)
    return results[-1]


@needs_renderer
@pytest.mark.parametrize("i", [1, 2])
def test_rendered_patient_matches_the_record(i: int) -> None:
    p = _patient(i)
    row = only(_normalized(rec.Change("patients", "new", p), p), "patients")
    assert (row["mrn"], row["enterprise_id"], row["family_name"], row["given_names"]) == (
        p.mrn,
        p.enterprise_id,
        p.family_name,
        " ".join(p.given_names),
    )
    assert (row["birth_date"], row["sex"], row["race"], row["ethnicity"], row["language"]) == (
        p.birth_date,
        p.sex,
        p.race,
        p.ethnicity,
        p.language,
    )
    assert (row["address_line"], row["city"], row["state"], row["postal_code"]) == (
        p.address_line,
        p.city,
        p.state,
        p.postal_code,
    )
    assert row["phone"] == (p.phone_home or p.phone_mobile) and row["email"] == p.email
    assert row["deceased_at"] == p.deceased_at and row["source_updated_at"] == p.last_updated
    assert row["identifiers"]["EHRID"] == p.ehr_id and row["identifiers"]["NIST"] == p.nist_id


# The Data Model cannot say "arrived" (Registration/Arrival read in-progress) nor tell a
# cancelled encounter from one entered in error (both are PatientAdmin.Cancel).
DM_ENCOUNTER_STATUS = {"arrived": "in-progress", "entered-in-error": "cancelled"}


@needs_renderer
@pytest.mark.parametrize(
    ("status", "class_code", "kind"),
    [
        ("planned", "AMB", "new"),
        ("in-progress", "IMP", "new"),
        ("finished", "EMER", "new"),
        ("arrived", "AMB", "new"),
        ("cancelled", "IMP", "cancel"),
        ("finished", "VR", "update"),
    ],
)
def test_rendered_encounter_matches_the_record(status: str, class_code: str, kind: str) -> None:
    p = _patient(1)
    start = NOW - timedelta(days=2)
    enc = rec.EncounterRecord(
        connection_id=CONN,
        id="enc-1",
        last_updated=NOW - timedelta(hours=1),
        version=2,
        patient=_ref(p),
        visit_number="V0001",
        account_number="A1",
        status=status,
        class_code=class_code,
        type=rec.Coding(rec.SNOMED, "185349003", "Encounter for check up"),
        start_at=start,
        end_at=start + timedelta(hours=5) if status == "finished" else None,
        location=WARD,
        attending=DOCTOR,
        reason=rec.Coding(rec.ICD10, "N39.0", "Urinary tract infection"),
        discharge_disposition=rec.Coding(rec.SNOMED, "306689006", "Discharge to home")
        if status == "finished"
        else None,
    )
    previous = "in-progress" if kind != "new" else None
    row = only(_normalized(rec.Change("encounters", kind, enc, previous), p), "encounters")
    assert row["status"] == DM_ENCOUNTER_STATUS.get(status, status)
    assert (row["encounter_id"], row["class"], row["start_at"], row["end_at"]) == (
        enc.visit_number,
        class_code,
        enc.start_at,
        enc.end_at,
    )
    assert (row["location"], row["department"], row["attending_npi"]) == (
        WARD.facility,
        WARD.department,
        DOCTOR.npi,
    )
    assert (row["reason_code"], row["reason_system"], row["reason_display"]) == (
        "N39.0",
        rec.ICD10,
        "Urinary tract infection",
    )
    expected_disposition = enc.discharge_disposition.display if enc.discharge_disposition else None
    assert row["discharge_disposition"] == expected_disposition
    assert row["patient_ref_value"] == p.mrn and row["source_updated_at"] == enc.last_updated


@needs_renderer
def test_a_pulled_visit_keeps_what_visit_query_and_the_clinical_summary_each_carry() -> None:
    """Redox's VisitQueryResponse defines no end time and only a free-text reason; the
    Clinical Summary's Encounters carry both but no patient class. Routed as a patient pull
    routes them, the staged version of the visit (the later page's row) holds every field."""
    from pipelines.batches import PageRouter
    from pipelines.landing import PageContext
    from sandbox.datamodel.conform import conform

    p = _patient(1)
    start = NOW - timedelta(days=3)
    enc = rec.EncounterRecord(
        connection_id=CONN,
        id="enc-9",
        last_updated=NOW - timedelta(hours=1),
        version=3,
        patient=_ref(p),
        visit_number="V0009",
        account_number="A9",
        status="finished",
        class_code="IMP",
        type=rec.Coding(rec.SNOMED, "183452005", "Emergency hospital admission"),
        start_at=start,
        end_at=start + timedelta(hours=30),
        location=WARD,
        attending=DOCTOR,
        reason=rec.Coding(rec.ICD10, "E11.9", "Type 2 diabetes mellitus without complications"),
        discharge_disposition=rec.Coding(rec.SNOMED, "306689006", "Discharge to home"),
    )
    ident = {"Identifiers": [{"ID": p.mrn, "IDType": "MR"}]}
    visits = conform(
        {
            "Meta": {"DataModel": "PatientAdmin", "EventType": "VisitQueryResponse"},
            "Patients": [{**ident, "Visits": [render.encounter_visit(enc)]}],
        }
    )
    assert "DischargeDateTime" not in visits["Patients"][0]["Visits"][0]  # not in Redox's schema
    summary = render.clinical_summary(
        {"DataModel": "Clinical Summary", "EventType": "PatientQueryResponse"},
        DM_CONN,
        p,
        now=NOW,
        encounters=[enc],
        results=[],
        medications=[],
    )
    router = PageRouter(CONN, "datamodel")
    for body, ref, event, entities in (
        (visits, "raw/a/page-1", "VisitQueryResponse", ("patients", "encounters")),
        (summary, "raw/a/page-2", "PatientQueryResponse", ("encounters", "problems")),
    ):
        router.take_page(body, ref, "encounters", PageContext(event_type=event, entities=entities))
    staged = [
        r
        for t in (getattr(item, "data", item) for item in router.drain(final=True))
        if "encounter_id" in t.column_names
        for r in t.to_pylist()
    ]
    kept = max(staged, key=lambda r: r["version_key"])  # what staging's dedup keeps
    assert (kept["encounter_id"], kept["status"], kept["class"], kept["department"]) == (
        "V0009",
        "finished",
        "IMP",
        WARD.department,
    )
    assert (kept["start_at"], kept["end_at"], kept["type_code"], kept["attending_npi"]) == (
        enc.start_at,
        enc.end_at,
        "183452005",
        DOCTOR.npi,
    )
    assert (kept["reason_code"], kept["reason_system"], kept["reason_display"]) == (
        "E11.9",
        rec.ICD10,
        enc.reason.display,
    )
    assert kept["discharge_disposition"] == "Discharge to home"


@needs_renderer
@pytest.mark.parametrize(
    ("category", "numeric", "flag", "status", "with_issue"),
    [
        ("laboratory", True, "H", "final", True),
        ("laboratory", False, "A", "corrected", False),
        ("vital-signs", True, "LL", "entered-in-error", True),
        ("laboratory", True, "HH", "cancelled", True),
    ],
)
def test_rendered_result_matches_the_record(
    category: str, numeric: bool, flag: str, status: str, with_issue: bool
) -> None:
    p = _patient(1)
    effective = NOW - timedelta(days=3)
    code = rec.Coding(rec.LOINC, "8480-6" if category == "vital-signs" else "2345-7", "Analyte")
    r = rec.ResultRecord(
        connection_id=CONN,
        id="res-1",
        last_updated=NOW - timedelta(days=2),
        version=1,
        patient=_ref(p),
        visit_number="V0001",
        order_id="ORD0001",
        result_id=f"ORD0001-{code.code}",
        category=category,
        panel=rec.Coding(rec.LOINC, "85353-1" if category == "vital-signs" else "24323-8", "Panel"),
        code=code,
        value_type="Numeric" if numeric else "String",
        value_numeric=92.5 if numeric else None,
        value_text="92.5" if numeric else "Positive Result",
        unit="mg/dL" if numeric else None,
        reference_low=70.0 if numeric else None,
        reference_high=99.0 if numeric else None,
        reference_text=None,
        abnormal_flag=flag,
        status=status,
        effective_at=effective,
        issued_at=effective + timedelta(hours=3) if with_issue else None,
        performer=DOCTOR if with_issue else None,
        producer="Redox Lab WI" if with_issue else None,
    )
    row = only(_normalized(rec.Change("results", "new", r), p), "results")
    expected = {
        "result_id": r.result_id,
        "order_id": r.order_id,
        "encounter_id": r.visit_number,
        "category": category,
        "code": code.code,
        "code_system": rec.LOINC,
        "value_numeric": r.value_numeric,
        "value_text": r.value_text,
        "unit": r.unit,
        "reference_low": r.reference_low,
        "reference_high": r.reference_high,
        "abnormal_flag": flag,
        "status": status,
        "effective_at": effective,
        "issued_at": r.issued_at,
        "performer": DOCTOR.npi if with_issue else None,
    }
    assert {k: row[k] for k in expected} == expected


@needs_renderer
@pytest.mark.parametrize(
    ("kind", "status"), [("new", "active"), ("update", "active"), ("cancel", "cancelled")]
)
def test_rendered_medication_matches_the_record(kind: str, status: str) -> None:
    p = _patient(1)
    m = rec.MedicationRecord(
        connection_id=CONN,
        id="med-1",
        last_updated=NOW,
        version=1,
        patient=_ref(p),
        visit_number="V0001",
        order_id="RX0001",
        kind="request",
        status=status,
        intent="order",
        code=rec.Coding(rec.RXNORM, "104894", "Ondansetron 4 MG Disintegrating Oral Tablet"),
        dose_quantity=2.5,
        dose_unit="mg",
        route=rec.Coding(rec.SNOMED, "26643006", "Oral route"),
        frequency_period=8.0,
        frequency_unit="h",
        start_at=NOW - timedelta(days=1),
        end_at=NOW + timedelta(days=9),
        prescriber=DOCTOR,
    )
    row = only(_normalized(rec.Change("medications", kind, m), p), "medications")
    expected = {
        "medication_id": "RX0001",
        "encounter_id": "V0001",
        "kind": "request",
        "status": status,
        "intent": "order",
        "code": "104894",
        "code_system": rec.RXNORM,
        "display": m.code.display,
        "dose_quantity": 2.5,
        "dose_unit": "mg",
        "route": "Oral route",
        "frequency": "every 8 h",
        "start_at": m.start_at,
        "end_at": m.end_at,
        "prescriber_npi": DOCTOR.npi,
    }
    assert {k: row[k] for k in expected} == expected


@needs_renderer
@pytest.mark.parametrize(
    ("kind", "status", "rescheduled_from"),
    [
        ("new", "booked", None),
        ("new", "booked", "S0000"),
        ("update", "arrived", None),
        ("update", "fulfilled", None),
        ("cancel", "cancelled", None),
        ("update", "noshow", None),
    ],
)
def test_rendered_appointment_matches_the_record(
    kind: str, status: str, rescheduled_from: str | None
) -> None:
    p = _patient(1)
    a = rec.AppointmentRecord(
        connection_id=CONN,
        id="apt-1",
        last_updated=NOW,
        version=1,
        patient=_ref(p),
        visit_number="S0001",
        status=status,
        start_at=NOW + timedelta(days=7),
        duration_minutes=45,
        type=rec.Coding("http://terminology.hl7.org/CodeSystem/v2-0276", "ROUTINE", "Routine appointment"),
        reason="Check up",
        provider=DOCTOR,
        location=rec.Location("RES Clinic", "3S", None, None, "Clinic"),
        cancel_reason="Patient request" if status == "cancelled" else None,
        rescheduled_from=rescheduled_from,
    )
    row = only(_normalized(rec.Change("appointments", kind, a), p), "appointments")
    expected = {
        "appointment_id": "S0001",
        "status": status,
        "start_at": a.start_at,
        "end_at": a.start_at + timedelta(minutes=45),
        "duration_minutes": 45,
        "type_code": "ROUTINE",
        "type_display": "Routine appointment",
        "reason": "Check up",
        "provider_npi": DOCTOR.npi,
        "location": "RES Clinic",
        "department": "3S",
        "cancel_reason": a.cancel_reason,
        "rescheduled_from": rescheduled_from,
    }
    assert {k: row[k] for k in expected} == expected


@needs_renderer
@pytest.mark.parametrize(
    ("doc_kind", "change_kind", "status"),
    [
        ("note", "new", "current"),
        ("note", "update", "superseded"),
        ("note", "cancel", "entered-in-error"),
        ("cda", "new", "current"),
        ("cda", "cancel", "entered-in-error"),
    ],
)
def test_rendered_document_matches_the_record(doc_kind: str, change_kind: str, status: str) -> None:
    p = _patient(1)
    content = (
        b"Seen today. Plan: follow up."
        if doc_kind == "note"
        else b"<ClinicalDocument><id root='x'/></ClinicalDocument>"
    )
    d = rec.DocumentRecord(
        connection_id=CONN,
        id="doc-1",
        last_updated=NOW,
        version=1,
        patient=_ref(p),
        visit_number="V0001",
        document_id="DOC0001",
        kind=doc_kind,
        type=rec.Coding(rec.LOINC, "11506-3", "Progress note"),
        title="Progress note, day 2",
        status=status,
        authored_at=NOW - timedelta(hours=4),
        author=DOCTOR,
        content_type="text/plain" if doc_kind == "note" else "application/xml",
        content=content,
    )
    row = only(_normalized(rec.Change("documents", change_kind, d), p), "documents")
    expected = {
        "document_id": "DOC0001",
        "encounter_id": "V0001",
        "kind": doc_kind,
        "title": d.title,
        "status": status,
        "authored_at": d.authored_at,
        "author": DOCTOR.npi,
        "content_type": d.content_type,
        # Notes / Media carry the document type as the EHR's text (the FHIR row has the LOINC code).
        "type_code": "Progress note",
    }
    assert {k: row[k] for k in expected} == expected
    if change_kind != "cancel":  # Delete events carry no content
        assert row["content"] == content and row["content_sha256"] == hashlib.sha256(content).hexdigest()
