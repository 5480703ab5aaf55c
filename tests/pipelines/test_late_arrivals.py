"""A record that becomes visible late, with a last-updated time just before the live
cursor, is picked up by the lookback — and only within it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import dlt
import duckdb
import orjson
import pytest

from pipelines.fhir import fhir_source
from pipelines.landing import RawLanding

T0 = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)


def encounter(n: int, updated: datetime) -> dict:
    return {
        "resourceType": "Encounter",
        "id": f"enc-{n}",
        "meta": {"lastUpdated": updated.strftime("%Y-%m-%dT%H:%M:%SZ")},
        "identifier": [{"system": "urn:redox:test:VN", "value": f"V{n}"}],
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-09-01T10:00:00Z"},
    }


class LateArrivalServer:
    """Honours ``_lastUpdated=geX`` like a FHIR server; records can appear after a sync."""

    def __init__(self) -> None:
        self.encounters = [encounter(1, T0), encounter(2, T0 + timedelta(hours=2))]

    def fhir_search_pages(self, resource_type: str, params: dict, *, entity: str | None = None):
        entries = []
        if resource_type == "Encounter":
            bounds = params.get("_lastUpdated") or []
            since = next((b[2:] for b in bounds if b.startswith("ge")), "1900-01-01T00:00:00Z")
            floor = datetime.fromisoformat(since.replace("Z", "+00:00"))
            entries = [
                {"resource": e}
                for e in self.encounters
                if datetime.fromisoformat(e["meta"]["lastUpdated"].replace("Z", "+00:00")) >= floor
            ]
        yield orjson.dumps(
            {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
        )


def run(server: LateArrivalServer, tmp_path: Path, lookback_s: float) -> set[str]:
    pipeline = dlt.pipeline(
        f"late_{int(lookback_s)}",
        destination=dlt.destinations.duckdb(str(tmp_path / f"w{int(lookback_s)}.duckdb")),
        dataset_name="raw",
        pipelines_dir=str(tmp_path / ".dlt"),
    )
    source = fhir_source(
        server, RawLanding(tmp_path / "landing"), "c1", entities=("encounters",), lookback_s=lookback_s
    )
    pipeline.run(source)
    with duckdb.connect(str(tmp_path / f"w{int(lookback_s)}.duckdb"), read_only=True) as con:
        return {r[0] for r in con.execute("select encounter_id from raw.fhir_encounters").fetchall()}


@pytest.mark.parametrize(
    ("lookback_s", "late_by", "picked_up"), [(3600, 30, True), (3600, 90, False), (0, 30, False)]
)
def test_late_arrival_inside_the_lookback_is_picked_up(
    tmp_path: Path, lookback_s: float, late_by: int, picked_up: bool
) -> None:
    server = LateArrivalServer()
    assert run(server, tmp_path, lookback_s) == {"V1", "V2"}
    # A record updated before the cursor (V2's time) shows up only now.
    server.encounters.append(encounter(3, T0 + timedelta(hours=2) - timedelta(minutes=late_by)))
    assert ("V3" in run(server, tmp_path, lookback_s)) is picked_up
