"""A payload that cannot be normalized is quarantined with its reason; the rest goes on."""

from __future__ import annotations

from pathlib import Path

import dlt
import duckdb
import orjson

from pipelines.landing import RawLanding
from tests.pipelines.page_source import fhir_pages_source


def observation(oid: str, code: dict | None) -> dict:
    resource = {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"lastUpdated": "2026-10-01T10:00:00Z"},
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "identifier": [{"system": "urn:redox:test:ResultID", "value": f"ord1-{oid}"}],
        "valueQuantity": {"value": 5.2, "unit": "mmol/L", "code": "mmol/L"},
    }
    if code is not None:
        resource["code"] = code
    return resource


class OnePageClient:
    """Serves one Observation Bundle: two good resources and one without a code."""

    def fhir_search_pages(self, resource_type: str, params: dict, *, entity: str | None = None):
        if resource_type != "Observation":
            yield orjson.dumps({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})
            return
        loinc = {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]}
        entries = [observation("a", loinc), observation("bad", None), observation("b", loinc)]
        yield orjson.dumps(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": 3,
                "entry": [{"resource": r} for r in entries],
            }
        )


def test_unnormalizable_resource_is_quarantined_and_the_batch_goes_on(tmp_path: Path) -> None:
    landing = RawLanding(tmp_path / "landing")
    pipeline = dlt.pipeline(
        "quarantine_test",
        destination=dlt.destinations.duckdb(str(tmp_path / "w.duckdb")),
        dataset_name="raw",
        pipelines_dir=str(tmp_path / ".dlt"),
    )
    pipeline.run(fhir_pages_source(OnePageClient(), landing, "test-conn", entities=("results",)))
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        loaded = sorted(r[0] for r in con.execute("select result_id from raw.fhir_results").fetchall())
        quarantined = con.execute(
            "select connection_id, entity, item_id, reason, raw_ref from raw.quarantine"
        ).fetchall()
    assert loaded == ["ord1-a", "ord1-b"]
    assert len(quarantined) == 1
    conn, entity, item, reason, raw_ref = quarantined[0]
    assert (conn, entity, item) == ("test-conn", "results", "bad")
    assert "Observation without code" in reason
    # The raw payload is kept, so nothing is lost: the landed page still holds the bad resource.
    page = orjson.loads(landing.read(raw_ref))
    assert any(e["resource"]["id"] == "bad" for e in page["entry"])
