"""Quarantine is per record: a bad entry of a page is quarantined with its reason and
what a later sync needs to fetch it again, the rest of the page loads, and a later load
of the same record in good shape resolves the entry."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dlt
import duckdb
import orjson
import pytest

from pipelines.batches import PageRouter
from pipelines.datamodel.pages import payload_rows
from pipelines.fhir.pages import bundle_rows
from pipelines.landing import PageContext, RawLanding, UnsafePath, safe_path
from pipelines.publish import publish_connection
from pipelines.quarantine import (
    open_entries_on_pages,
    resolve_quarantine,
    resolve_unattributed,
    unresolved_entries,
    unresolved_quarantine_counts,
)
from tests.pipelines.page_source import fhir_pages_source

CONN = "test-conn"
LOINC = {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]}
PATIENT_NAME = "Zebediah"  # a value that must never reach a reason


def observation(oid: str | None, **changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": {"lastUpdated": "2026-10-01T10:00:00Z"},
        "status": "final",
        "code": LOINC,
        "subject": {"reference": "Patient/p1", "display": PATIENT_NAME},
        "identifier": [{"system": "urn:redox:test:ResultID", "value": f"ord1-{oid}"}],
        "valueQuantity": {"value": 5.2, "unit": "mmol/L", "code": "mmol/L"},
    }
    if oid is not None:
        resource["id"] = oid
    resource.update(changes)
    return resource


def quarantine_rows(router: PageRouter) -> list[dict[str, Any]]:
    """The quarantine rows a router drains (items wrapped with dlt hints carry ``.data``)."""
    tables = [getattr(item, "data", item) for item in router.drain(final=True)]
    return [r for t in tables if "reason" in t.column_names for r in t.to_pylist()]


def bad_bundle() -> dict[str, Any]:
    entries: list[Any] = [
        {"resource": observation("a")},
        1,
        "x",
        None,
        {"resource": {"resourceType": "Basic", "id": "b1", "code": {"text": PATIENT_NAME}}},
        {
            "resource": observation(
                None, identifier=[{"system": "urn:redox:test:ResultID", "value": "ord1-c"}]
            )
        },
        {"resource": observation("late", meta={"lastUpdated": "31/12/2020 10:00"})},
        {"resource": observation("b")},
        {"resource": observation(None, identifier=[])},
    ]
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries}


def test_bundle_rows_quarantines_each_bad_entry_and_keeps_the_rest() -> None:
    page = bundle_rows(bad_bundle(), CONN, "ref-1", "results")
    assert [r["result_id"] for r in page.rows["results"]] == ["ord1-a", "ord1-b"]
    got = {(q.entity, q.item_id): q for q in page.quarantined}
    # Named by the record's id where it has one (the resource id, else its business id),
    # so a later good copy resolves the entry; by position otherwise.
    assert {k: q.item_kind for k, q in got.items()} == {
        ("results", "entry[1]"): "position",
        ("results", "entry[2]"): "position",
        ("results", "entry[3]"): "position",
        ("results", "entry[4]"): "position",  # an unknown type: its entity, so its id, is unknown
        ("results", "ord1-c"): "id",
        ("results", "late"): "id",
        ("results", "entry[8]"): "position",
    }
    assert "not an object" in got[("results", "entry[1]")].reason
    assert "resourceType is not one the pipeline reads" in got[("results", "entry[4]")].reason
    assert "has no id" in got[("results", "ord1-c")].reason
    assert got[("results", "entry[8]")].patient_ref_value == "p1"
    assert "ISO-8601" in got[("results", "late")].reason
    # What a later sync needs to fetch the record again: its patient.
    assert (got[("results", "late")].patient_ref_type, got[("results", "late")].patient_ref_value) == (
        "fhir",
        "p1",
    )
    assert all(PATIENT_NAME not in q.reason and "Basic" not in q.reason for q in page.quarantined)


def test_a_body_that_is_not_a_bundle_fails_the_page_only() -> None:
    router = PageRouter(CONN, "fhir")
    assert router.take_page(b"{not json", "ref-x", "results") is None
    assert router.take_page(orjson.dumps([1, 2]), "ref-y", "results") is None
    rows = quarantine_rows(router)
    assert [r["raw_ref"] for r in rows] == ["ref-x", "ref-y"]
    assert [r["item_id"] for r in rows] == ["-", "-"]


class Pages:
    """Serves the given Observation Bundles, one per sync."""

    def __init__(self, bundle: dict[str, Any]) -> None:
        self.bundle = bundle

    def fhir_search_pages(self, resource_type: str, params: dict, *, entity: str | None = None):
        body = self.bundle if resource_type == "Observation" else {"resourceType": "Bundle", "entry": []}
        yield orjson.dumps(body)


def run(tmp_path: Path, bundle: dict[str, Any]) -> None:
    pipeline = dlt.pipeline(
        "quarantine_records",
        destination=dlt.destinations.duckdb(str(tmp_path / "w.duckdb")),
        dataset_name="raw",
        pipelines_dir=str(tmp_path / ".dlt"),
    )
    pipeline.run(
        fhir_pages_source(Pages(bundle), RawLanding(tmp_path / "landing"), CONN, entities=("results",))
    )


def test_a_later_good_load_resolves_the_entry_and_the_check_counts_only_unresolved(tmp_path: Path) -> None:
    run(tmp_path, bad_bundle())
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        loaded = sorted(r[0] for r in con.execute("select result_id from raw.fhir_results").fetchall())
        assert loaded == ["ord1-a", "ord1-b"]
        cols = {r[0] for r in con.execute("describe raw.quarantine").fetchall()}
        assert {"patient_ref_type", "patient_ref_value", "resolved_at", "raw_ref", "item_id"} <= cols
        assert resolve_quarantine(con, CONN) == 0
        assert unresolved_quarantine_counts(con) == {CONN: 7}
    # The server recovers: the record that had a bad date comes back well-formed.
    fixed = copy.deepcopy(bad_bundle())
    fixed["entry"] = [{"resource": observation("late")}]
    run(tmp_path, fixed)
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        publish_connection(con, CONN)  # every load is followed by a publish, which resolves
        # "late" by its id; the positional entries (entry[8] names p1; the others sit on a page
        # whose every record names p1, so they are p1's too) because p1's results were fetched
        # again and all of them read. "ord1-c" waits for its own id.
        left = {e["item_id"] for e in unresolved_entries(con, CONN)}
        assert left == {"ord1-c"}
        assert unresolved_quarantine_counts(con) == {CONN: 1}
        assert resolve_quarantine(con, CONN) == 0  # idempotent


def visit_query(visits: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "Meta": {
            "DataModel": "PatientAdmin",
            "EventType": "VisitQueryResponse",
            "EventDateTime": "2026-10-01T10:00:00Z",
        },
        "Patients": [
            {
                "Identifiers": [{"ID": "MRN1", "IDType": "MR"}],
                "Demographics": {"FirstName": PATIENT_NAME, "LastName": "Q"},
                "Visits": visits,
            }
        ],
    }


def test_datamodel_visits_are_quarantined_one_by_one() -> None:
    visits = [
        {"VisitNumber": "V1", "VisitDateTime": "2026-09-01T10:00:00Z"},
        {"VisitNumber": "", "VisitDateTime": "2026-09-02T10:00:00Z"},
        {"VisitNumber": "V3", "VisitDateTime": "31/12/2020"},
        {"VisitNumber": "V4", "VisitDateTime": "2026-09-04T10:00:00Z"},
    ]
    page = payload_rows(visit_query(visits), CONN, "ref-v", "VisitQueryResponse")
    assert [r["encounter_id"] for r in page.rows["encounters"]] == ["V1", "V4"]
    assert len(page.rows["patients"]) == 1
    got = {q.item_id: q for q in page.quarantined}
    assert set(got) == {"Patients[0].Visits[1]", "V3"}
    assert all(q.entity == "encounters" for q in page.quarantined)
    assert (got["V3"].patient_ref_type, got["V3"].patient_ref_value) == ("MR", "MRN1")
    assert "VisitDateTime is not an ISO-8601 time" in got["V3"].reason
    assert all(PATIENT_NAME not in q.reason and "MRN1" not in q.reason for q in page.quarantined)


def test_datamodel_result_order_without_id_is_quarantined_and_the_other_orders_load() -> None:
    def order(oid: str | None) -> dict[str, Any]:
        o: dict[str, Any] = {
            "Status": "Final",
            "LastUpdated": "2026-09-01T10:00:00Z",
            "Patient": {"Identifiers": [{"ID": "MRN1", "IDType": "MR"}]},
            "Results": [{"Code": "2345-7", "Codeset": "LOINC", "Value": "5.2", "ValueType": "Numeric"}],
        }
        if oid is not None:
            o["ID"] = oid
        return o

    payload = {
        "Meta": {
            "DataModel": "Results",
            "EventType": "QueryResponse",
            "EventDateTime": "2026-10-01T10:00:00Z",
        },
        "Orders": [order("O1"), order(None), order("O3"), 1, "x", None],
    }
    page = payload_rows(payload, CONN, "ref-r", "QueryResponse")
    assert sorted({r["order_id"] for r in page.rows["results"]}) == ["O1", "O3"]
    assert [(q.entity, q.item_id, q.item_kind) for q in page.quarantined] == [
        ("results", "Orders[1]", "position"),
        ("results", "Orders[3]", "position"),
        ("results", "Orders[4]", "position"),
        ("results", "Orders[5]", "position"),
    ]
    assert page.quarantined[0].patient_ref_value == "MRN1"


def test_unreadable_datamodel_payload_reaches_the_quarantine_table() -> None:
    """No silent loss: a payload that fails normalization as a whole is quarantined (network
    answers included) instead of disappearing."""
    router = PageRouter(CONN, "datamodel")
    assert router.take_page({"Patient": {}}, "ref-d", "documents") is None
    rows = quarantine_rows(router)
    assert [(r["entity"], r["reason"]) for r in rows] == [
        ("documents", "page unreadable: payload has no Meta.DataModel")
    ]


@pytest.mark.parametrize("bad", ["../../escape", "..", "a/b", "", ".hidden", "x" * 65, "a\x00b"])
def test_landing_refuses_a_connection_id_that_is_not_a_plain_name(tmp_path: Path, bad: str) -> None:
    landing = RawLanding(tmp_path / "landing")
    with pytest.raises(UnsafePath) as caught:
        landing.land(bad, "fhir", "results", b"{}")
    assert "\n" not in str(caught.value) and bad not in str(caught.value) or bad == ""
    assert not any(tmp_path.rglob("*.json.gz"))


def test_landing_refuses_unknown_surface_and_entity(tmp_path: Path) -> None:
    landing = RawLanding(tmp_path / "landing")
    with pytest.raises(UnsafePath):
        landing.land("ok-conn", "../fhir", "results", b"{}")
    with pytest.raises(UnsafePath):
        landing.land("ok-conn", "fhir", "../../results", b"{}")


def test_safe_path_never_leaves_its_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert safe_path(root, "a", "b.json") == (root / "a" / "b.json").resolve()
    for segments in (("..", "x"), ("/etc", "passwd"), ("a", "..", "..", "x")):
        with pytest.raises(UnsafePath):
            safe_path(root, *segments)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePath):
        safe_path(root, "link", "x")
    with pytest.raises(UnsafePath):
        RawLanding(root).read("../outside.json.gz")
    with pytest.raises(UnsafePath):
        RawLanding(root).document_path("../../etc")


def test_landed_files_and_folders_are_owner_only(tmp_path: Path) -> None:
    import stat

    landing = RawLanding(tmp_path / "landing")
    page = landing.land("ok-conn", "datamodel", "documents", b"{}", PageContext(event_type="QueryResponse"))
    digest = landing.store_document(b"content")
    landing.index_content("ok-conn", "https://example.test/doc", digest)
    created = [p for p in (tmp_path / "landing").rglob("*")] + [tmp_path / "landing"]
    assert any(p.name.endswith(".context.json") for p in created)
    for path in created:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.relative_to(tmp_path)} is {oct(mode)}"
    assert landing.context(page.raw_ref).event_type == "QueryResponse"


def test_an_entry_without_id_stays_unresolved_while_the_patient_still_has_a_bad_record(
    tmp_path: Path,
) -> None:
    first = {"resourceType": "Bundle", "entry": [{"resource": observation(None, identifier=[])}]}
    run(tmp_path, first)
    # The patient's records come again, one still without any id: nothing proves the record loaded.
    still_bad = {
        "resourceType": "Bundle",
        "entry": [{"resource": observation("a")}, {"resource": observation(None, identifier=[])}],
    }
    run(tmp_path, still_bad)
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        publish_connection(con, CONN)
        assert unresolved_quarantine_counts(con) == {CONN: 2}
    run(tmp_path, {"resourceType": "Bundle", "entry": [{"resource": observation("a")}]})
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        publish_connection(con, CONN)
        assert unresolved_quarantine_counts(con) == {}


def test_pages_landed_under_the_old_raw_folder_are_still_read(tmp_path: Path) -> None:
    import gzip

    landing = RawLanding(tmp_path / "landing")
    new = landing.land("ok-conn", "fhir", "results", b'{"resourceType": "Bundle"}')
    old = tmp_path / "landing" / "raw" / "connection=ok-conn" / "surface=fhir" / "entity=results"
    old.mkdir(parents=True)
    (old / "20200101T000000000000Z-1-000001.json.gz").write_bytes(
        gzip.compress(b'{"resourceType": "Bundle"}')
    )
    refs = [p.raw_ref for p in landing.pages("ok-conn")]
    assert refs == [
        "raw/connection=ok-conn/surface=fhir/entity=results/20200101T000000000000Z-1-000001.json.gz",
        new.raw_ref,
    ]
    assert new.raw_ref.startswith("responses/")
    assert landing.read(refs[0]) == b'{"resourceType": "Bundle"}'


def test_a_listing_entry_no_patient_can_claim_is_resolved_by_a_later_clean_discovery(tmp_path: Path) -> None:
    """A discovery listing (several patients on one page): a record without any readable field
    names no patient. Its page counts as dirty (the window is asked again); a later clean
    discovery resolves it, and leaves entries that name a patient to those patients' pulls."""
    other = observation("z", subject={"reference": "Patient/p2"})
    listing = {"resourceType": "Bundle", "entry": [{"resource": observation("a")}, 1, {"resource": other}]}
    run(tmp_path, listing)
    run(tmp_path, {"resourceType": "Bundle", "entry": [{"resource": observation(None, identifier=[])}]})
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        rows = con.execute(
            "SELECT raw_ref, patient_ref_value IS NULL FROM raw.quarantine ORDER BY first_seen_at"
        ).fetchall()
        assert [anonymous for _, anonymous in rows] == [True, False]
        listing_ref = rows[0][0]
        assert open_entries_on_pages(con, CONN, [listing_ref]) == 1
        assert open_entries_on_pages(con, CONN, ["responses/elsewhere.json.gz"]) == 0
        # A discovery that started before the entry was seen proves nothing about it.
        assert resolve_unattributed(con, CONN, "fhir", datetime(2000, 1, 1, tzinfo=UTC)) == 0
        assert resolve_unattributed(con, CONN, "datamodel", datetime.now(UTC)) == 0
        assert resolve_unattributed(con, CONN, "fhir", datetime.now(UTC)) == 1
        assert unresolved_quarantine_counts(con) == {CONN: 1}  # the patient's own entry stays
