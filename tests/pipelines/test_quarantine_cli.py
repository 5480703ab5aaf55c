"""``redox-elt quarantine list | retry | dismiss`` over a real quarantine (a dlt load of a
page with bad entries): PHI-free output, a person's dismissal stops the entry counting and
being fetched (also when the record comes back bad later), retry undoes it, and the
quarantine-rate check counts only open entries."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import dlt
import duckdb
import orjson
import pytest

from assets.check_queries import quarantine_rates
from pipelines.batches import PageRouter
from pipelines.landing import RawLanding
from pipelines.quarantine import patients_to_refetch, unresolved_entries, unresolved_quarantine_counts
from pipelines.resource_hints import staged_resource_hints

CONN = "test-conn"
MRN = "MRN90210777"  # a patient identifier: never printed
SECRET_ID = "ObsSecretQ42"  # a record id: never printed either
NAME = "Zebediah"
LOINC = {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]}


def observation(oid: str | None, *, patient: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": {"lastUpdated": "2026-10-01T10:00:00Z"},
        "status": "final",
        "code": LOINC,
        "subject": patient or {"identifier": {"system": "urn:redox:test:MR", "value": MRN}, "display": NAME},
        "identifier": [{"system": "urn:redox:test:ResultID", "value": f"ord-{oid}"}],
        "valueQuantity": {"value": 5.2, "unit": "mmol/L", "code": "mmol/L"},
    }
    if oid is not None:
        resource["id"] = oid
    resource.update(changes)
    return resource


def bundle(*, fixed: bool = False) -> dict[str, Any]:
    late = "2026-10-01T10:00:00Z" if fixed else "31/12/2020 10:00"
    entries: list[Any] = [
        {"resource": observation("good1")},
        {"resource": observation(SECRET_ID, meta={"lastUpdated": late})},  # id known: resolvable
        {"resource": observation("other", patient={"reference": "Patient/p-77"}, meta={"lastUpdated": late})},
    ]
    if not fixed:
        entries.append(7)  # not an object: a page position
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries}


def load(tmp_path: Path, body: dict[str, Any]) -> Path:
    wh = tmp_path / "w.duckdb"
    pipeline = dlt.pipeline(
        "quarantine_cli",
        destination=dlt.destinations.duckdb(str(wh)),
        dataset_name="raw",
        pipelines_dir=str(tmp_path / ".dlt"),
    )
    landing = RawLanding(tmp_path / "landing")
    ref = landing.land(CONN, "fhir", "results", orjson.dumps(body)).raw_ref
    router = PageRouter(CONN, "fhir", landing=landing, main="fhir_results")

    def pages() -> Any:
        # The one page-to-rows path the live pulls and renormalize use.
        router.take_page(body, ref, "results")
        yield from router.drain(final=True)

    pipeline.run(dlt.resource(pages, name="fhir_results", **staged_resource_hints("fhir", "results")))
    return wh


def cli(*argv: str) -> int:
    from redox_elt.cli import main

    handler, umask = signal.getsignal(signal.SIGTERM), os.umask(0o077)
    try:
        return main(list(argv))
    finally:  # main() sets the process's SIGTERM handler and umask: give pytest its own back
        signal.signal(signal.SIGTERM, handler)
        os.umask(umask)


def listed(capsys: pytest.CaptureFixture[str], wh: Path, *extra: str) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert cli("quarantine", "list", "--warehouse", str(wh), "--json", *extra) == 0
    out = capsys.readouterr().out
    for secret in (MRN, SECRET_ID, NAME, "p-77"):
        assert secret not in out
    return json.loads(out)


def test_list_shows_entries_without_phi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wh = load(tmp_path, bundle())
    records = listed(capsys, wh)
    assert len(records) == 3
    assert {r["item_kind"] for r in records} == {"id", "position"}
    assert all(
        r["state"] == "open" and r["connection_id"] == CONN and r["entity"] == "results" for r in records
    )
    by_kind = {r["item_kind"]: r for r in records if r["item_key"] != "entry[3]"}
    assert by_kind["id"]["item_key"].startswith("id:")  # a pseudonym, not the id
    assert any(r["item_key"] == "entry[3]" for r in records)  # our own position words are shown
    # The patient key is the panel's pseudonym: stable, 16 hex characters.
    keys = {r["patient_key"] for r in records if r["patient_key"]}
    assert len(keys) == 2 and all(len(k) == 16 for k in keys)
    # The table form too.
    assert cli("quarantine", "list", "--warehouse", str(wh)) == 0
    table = capsys.readouterr().out
    assert "results" in table and MRN not in table and SECRET_ID not in table and "p-77" not in table


def test_dismiss_stops_counting_and_fetching_and_retry_undoes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wh = load(tmp_path, bundle())
    with duckdb.connect(str(wh)) as con:
        assert sorted(patients_to_refetch(con, CONN)) == [("MR", MRN), ("fhir", "p-77")]
        assert unresolved_quarantine_counts(con) == {CONN: 3}
        assert not quarantine_rates(con, 0.10).passed  # 3 open of 4 rows
        # A run judges the connections it synced: another connection's quarantine is shown,
        # never a reason to fail this one.
        other = quarantine_rates(con, 0.10, judged={"some-other-connection"})
        assert other.passed and other.by_connection[CONN] > 0.10
        assert not quarantine_rates(con, 0.10, judged={CONN}).passed
    records = listed(capsys, wh)
    mrn_entry = next(
        r for r in records if r["item_kind"] == "id" and r["patient_key"] and "p-77" not in r["reason"]
    )
    others = [r["number"] for r in records]
    capsys.readouterr()
    assert (
        cli(
            "quarantine",
            "dismiss",
            "--warehouse",
            str(wh),
            "--id",
            *map(str, others),
            "--reason",
            "known bad",
        )
        == 0
    )
    assert "dismissed" in capsys.readouterr().out
    with duckdb.connect(str(wh)) as con:
        assert unresolved_quarantine_counts(con) == {}
        assert patients_to_refetch(con, CONN) == []
        assert unresolved_entries(con, CONN) == []
        assert quarantine_rates(con, 0.10).passed  # a stale quarantine no longer fails the check
    assert listed(capsys, wh) == []
    closed = listed(capsys, wh, "--all")
    assert {r["state"] for r in closed} == {"dismissed"} and closed[0]["dismissed_reason"] == "known bad"

    # The same bad record comes back on a later pull: it stays dismissed (not fetched forever).
    load(tmp_path, bundle())
    with duckdb.connect(str(wh)) as con:
        assert patients_to_refetch(con, CONN) == []
    assert [r["attempts"] for r in listed(capsys, wh, "--all") if r["item_kind"] == "id"] == [2, 2]

    # retry undoes the dismissal of the entry named: its patient is due again.
    assert cli("quarantine", "retry", "--warehouse", str(wh), "--id", str(mrn_entry["number"])) == 0
    with duckdb.connect(str(wh)) as con:
        assert patients_to_refetch(con, CONN) in ([("MR", MRN)], [("fhir", "p-77")])
    # Open now: the record retried, and the new page's bad entry (a position on another page
    # is another record; without a patient it is never fetched again, so a person dismisses it).
    open_now = listed(capsys, wh)
    assert sorted(r["item_kind"] for r in open_now) == ["id", "position"]
    assert any(mrn_entry["number"] in r["numbers"] for r in open_now)


def test_a_later_good_load_resolves_and_the_check_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wh = load(tmp_path, bundle())
    load(tmp_path, bundle(fixed=True))
    with duckdb.connect(str(wh)) as con:
        from pipelines.quarantine import resolve_quarantine

        resolve_quarantine(con, CONN)
        # The two id entries loaded; the page position (no patient) stays until dismissed.
        assert unresolved_quarantine_counts(con) == {CONN: 1}
        assert patients_to_refetch(con, CONN) == []
    states = {r["item_kind"]: r["state"] for r in listed(capsys, wh, "--all")}
    assert states == {"id": "resolved", "position": "open"}


@pytest.mark.parametrize(
    "argv, words",
    [
        (["quarantine", "dismiss", "--id", "999"], "no quarantine entry 999"),
        (["quarantine", "dismiss", "--id", "0"], "entry numbers start at 1"),
        (["quarantine", "dismiss", "--id", "x"], "not an entry number"),
        (["quarantine", "list", "--connection", "../../x"], "is not a connection id"),
        (["quarantine", "dismiss", "--id", "1", "--reason", "a\nb"], "one line"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    wh = load(tmp_path, bundle())
    capsys.readouterr()
    assert cli(*argv, "--warehouse", str(wh)) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_missing_warehouse_is_one_line_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "redox.duckdb"
    assert cli("quarantine", "list", "--warehouse", str(missing)) == 2
    assert "no warehouse at" in capsys.readouterr().err
    assert not missing.parent.exists()
