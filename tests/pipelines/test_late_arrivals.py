"""A record that becomes visible late, dated just before the last discovery, is still seen
by the next discovery when it is inside the lookback — and only within it (outside it, the
rolling refresh is what catches it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from pipelines.access import extract_connection
from pipelines.fhir.settings import fhir_instant
from pipelines.landing import RawLanding

T1 = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)


def encounter(n: int, patient: str, start: datetime) -> dict:
    return {
        "resourceType": "Encounter",
        "id": f"enc-{n}",
        "meta": {"lastUpdated": fhir_instant(start)},
        "identifier": [{"system": "urn:redox:test:VN", "value": f"V{n}"}],
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": fhir_instant(start)},
    }


def _bound(params: list[tuple[str, str]], prefix: str) -> datetime | None:
    for name, value in params:
        if name == "date" and value.startswith(prefix):
            return datetime.fromisoformat(value[2:].replace("Z", "+00:00"))
    return None


class EncounterServer:
    """Answers ``Encounter`` searches by ``date`` (ge/lt) like a FHIR server; records can
    appear after a sync. Every other search (the pulls) answers an empty Bundle."""

    def __init__(self) -> None:
        self.encounters = [encounter(1, "p1", T1 - timedelta(hours=3))]

    def fhir_search_pages(self, resource_type: str, params: Any, *, entity: str | None = None, **_: Any):
        params = list(params.items()) if isinstance(params, dict) else list(params)
        entries = []
        if resource_type == "Encounter" and not any(name == "status" for name, _ in params):
            lo, hi = _bound(params, "ge"), _bound(params, "lt")
            for e in self.encounters:
                start = datetime.fromisoformat(e["period"]["start"].replace("Z", "+00:00"))
                if (lo is None or start >= lo) and (hi is None or start < hi):
                    entries.append({"resource": e})
        yield orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries})


@dataclass
class Conn:
    id: str = "c1"
    kind: str = "ehr"
    surfaces: tuple[str, ...] = ("fhir",)
    entities: tuple[str, ...] = ("patients", "encounters")
    destination_slug: str = "test"
    page_size: int | None = None
    bulk_export: bool = False
    refresh_days: int = 7


def discover(server: EncounterServer, db: Path, landing: RawLanding, now: datetime, lookback_s: float) -> set:
    extract = extract_connection(server, Conn(), landing, db, now=now, lookback_s=lookback_s)
    extract.finish(db)
    with duckdb.connect(str(db), read_only=True) as con:
        return {r[0] for r in con.execute("select id_value from ops.patient_panel").fetchall()}


@pytest.mark.parametrize(
    ("lookback_s", "late_by", "picked_up"), [(3600, 30, True), (3600, 90, False), (0, 30, False)]
)
def test_late_arrival_inside_the_lookback_is_discovered(
    tmp_path: Path, lookback_s: float, late_by: int, picked_up: bool
) -> None:
    server, db, landing = EncounterServer(), tmp_path / "w.duckdb", RawLanding(tmp_path / "landing")
    assert discover(server, db, landing, T1, lookback_s) == {"p1"}
    # An encounter dated before the last discovery becomes visible only now.
    server.encounters.append(encounter(2, "p2", T1 - timedelta(minutes=late_by)))
    found = discover(server, db, landing, T1 + timedelta(days=1), lookback_s)
    assert ("p2" in found) is picked_up
