"""Every analytics view equals an independent computation from the sandbox's own records.

One sandbox, one sync into one warehouse for the whole module. The expected values are
computed in Python from the population the sandbox serves (``server.state.store``: the truth
behind both surfaces), never by re-running the views' SQL; records are matched to warehouse
rows by their business ids and persons by enterprise id."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest
from dagster import AssetKey

from pipelines.analytics.views import A1C_LOINC, DIABETES_ICD10_PREFIXES, INPATIENT_CLASSES
from pipelines.sync import run_sync
from pipelines.warehouse import WarehousePaths
from resources.onboarding import connect_sandbox
from resources.settings import load_settings
from sandbox.population.store import Query
from sandbox.server import SandboxServer
from tests.conftest import import_rosters, sandbox_config

EHR = ("northwind-fhir", "lakeside-dm", "riverbend-both")
DEAD = {"cancelled", "entered-in-error"}
HAPPENED = {"arrived", "in-progress", "finished"}


@dataclasses.dataclass
class Synced:
    server: SandboxServer
    paths: WarehousePaths
    records: dict[str, list[Any]]  # entity -> records of every EHR connection
    person: dict[tuple[str, str], str]  # (connection, FHIR patient id) -> person_key


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synced]:
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("REDOX_ELT_HOME", "REDOX_ELT_MASTER_KEY")}
    os.environ["REDOX_ELT_HOME"] = str(home)
    os.environ["REDOX_ELT_MASTER_KEY"] = "analytics-master-key"
    server = SandboxServer(sandbox_config(patients=120, seed=13)).start()
    try:
        settings = load_settings(connect_sandbox(server.url, home / "connections.yaml"))
        settings = dataclasses.replace(
            settings, connections=tuple(dataclasses.replace(c, max_rps=200.0) for c in settings.connections)
        )
        paths = WarehousePaths.at(tmp_path_factory.mktemp("wh") / "w.duckdb")
        import_rosters(server.url, settings, paths.duckdb, paths.duckdb.parent / "rosters")
        report = run_sync(settings, paths, connection_ids=list(EHR))
        assert report.ok, [c.error for c in report.connections]
        store = server.state.store
        records = {
            e: [r for c in EHR for r in store.iter(Query(c, e))]
            for e in ("patients", "encounters", "results", "medications", "appointments")
        }
        records["problems"] = _problems(store)
        person = {(p.connection_id, p.id): f"ep_{p.enterprise_id}" for p in records["patients"]}
        yield Synced(server, paths, records, person)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _problems(store: Any) -> list[Any] | None:
    """The sandbox's problem-list records, or None while the sandbox serves no problems."""
    from sandbox.population.records import ENTITIES as SANDBOX_ENTITIES

    if "problems" not in SANDBOX_ENTITIES:
        return None
    return [r for c in EHR for r in store.iter(Query(c, "problems"))]


def _active_problems(s: Synced) -> list[Any]:
    return [p for p in s.records["problems"] or [] if p.status in ("active", "recurrence", "relapse")]


def rows(synced: Synced, sql: str) -> list[dict[str, Any]]:
    with duckdb.connect(str(synced.paths.duckdb), read_only=True) as con:
        cur = con.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def person_of(s: Synced, record: Any) -> str:
    return s.person[(record.connection_id, record.patient.patient_id)]


def utc(t: datetime | None) -> datetime | None:
    return t.astimezone(UTC) if t is not None else None


def test_patient_summary_one_row_per_person(synced: Synced) -> None:
    s = synced
    want: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "connections": set(),
            "families": set(),
            "births": set(),
            "enc": [],
            "meds": set(),
            "n_meds": 0,
            "problems": set(),
        }
    )
    for p in s.records["patients"]:
        w = want[f"ep_{p.enterprise_id}"]
        w["connections"].add(p.connection_id)
        w["families"].add(p.family_name)
        w["births"].add(p.birth_date)
    for e in s.records["encounters"]:
        if e.status in HAPPENED:
            want[person_of(s, e)]["enc"].append(utc(e.start_at))
    for m in s.records["medications"]:
        if m.status == "active":
            want[person_of(s, m)]["meds"].add(m.code.display)
            want[person_of(s, m)]["n_meds"] += 1
    for pr in _active_problems(s):
        want[person_of(s, pr)]["problems"].add(pr.code.display)
    got = {r["person_key"]: r for r in rows(s, "select * from analytics.patient_summary")}
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert set(g["connection_ids"]) == w["connections"] and g["n_connections"] == len(w["connections"]), (
            key
        )
        assert g["family_name"] in w["families"] and g["birth_date"] in w["births"], key
        assert g["n_encounters"] == len(w["enc"]), key
        assert utc(g["last_encounter_at"]) == (max(w["enc"]) if w["enc"] else None), key
        assert set(g["active_medications"]) == w["meds"] and g["n_active_medications"] == w["n_meds"], key
        if s.records["problems"] is None:  # the model has no problem list yet
            assert g["active_problems"] is None, key
        else:
            assert set(g["active_problems"] or []) == w["problems"], key
    assert any(len(w["connections"]) > 1 for w in want.values()), "no person spans connections"


def test_encounter_timeline_orders_each_persons_encounters_with_their_length_of_stay(synced: Synced) -> None:
    # Every connection's end times: the Data Model's come from the Clinical Summary encounters.
    s = synced
    live = [e for e in s.records["encounters"] if e.status not in DEAD]
    by_person: dict[str, list[Any]] = defaultdict(list)
    for e in live:
        by_person[person_of(s, e)].append(e)
    want = {}
    for key, encs in by_person.items():
        encs.sort(key=lambda e: (utc(e.start_at), e.connection_id, e.visit_number))
        for n, e in enumerate(encs, 1):
            los = (e.end_at - e.start_at).total_seconds() / 3600 if e.end_at else None
            want[(e.connection_id, e.visit_number)] = (key, n, utc(e.start_at), e.status, los)
    got = {
        (r["connection_id"], r["encounter_id"]): (
            r["person_key"],
            r["encounter_number"],
            utc(r["start_at"]),
            r["status"],
            r["length_of_stay_hours"],
        )
        for r in rows(s, "select * from analytics.encounter_timeline")
    }
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g[:4] == w[:4], k
        assert (g[4] is None) == (w[4] is None) and (w[4] is None or abs(g[4] - w[4]) < 1e-6), k


def _result_order(r: Any) -> tuple:
    issued = utc(r.issued_at)
    # effective desc, issued desc (nulls last), then connection and result id ascending
    return (
        -utc(r.effective_at).timestamp(),
        -(issued.timestamp() if issued else float("-inf")),
        r.connection_id,
        r.result_id,
    )


def test_latest_results_per_person_and_code(synced: Synced) -> None:
    s = synced
    groups: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    for r in s.records["results"]:
        if r.status not in DEAD:
            groups[(person_of(s, r), r.code.system, r.code.code)].append(r)
    want = {}
    for k, rs in groups.items():
        rs.sort(key=_result_order)
        prev = rs[1].value_numeric if len(rs) > 1 else None
        want[k] = (rs[0].connection_id, rs[0].result_id, len(rs), rs[0].value_numeric, prev)
    got = {
        (r["person_key"], r["code_system"], r["code"]): (
            r["connection_id"],
            r["result_id"],
            r["n_results"],
            r["value_numeric"],
            r["previous_value_numeric"],
        )
        for r in rows(s, "select * from analytics.latest_results")
    }
    assert got == want


def _range_position(r: Any) -> str | None:
    if r.value_numeric is None or (r.reference_low is None and r.reference_high is None):
        return None
    if r.reference_low is not None and r.value_numeric < r.reference_low:
        return "below"
    if r.reference_high is not None and r.value_numeric > r.reference_high:
        return "above"
    return "within"


def test_abnormal_results_by_flag_or_reference_range(synced: Synced) -> None:
    s = synced
    want = {}
    for r in s.records["results"]:
        if r.status in DEAD:
            continue
        pos = _range_position(r)
        if (r.abnormal_flag or "N") != "N" or pos in ("below", "above"):
            want[(r.connection_id, r.result_id)] = (r.abnormal_flag, pos, r.abnormal_flag in ("HH", "LL"))
    got = {
        (r["connection_id"], r["result_id"]): (r["abnormal_flag"], r["range_position"], r["is_critical"])
        for r in rows(s, "select * from analytics.abnormal_results")
    }
    assert want and got == want


def test_active_medications(synced: Synced) -> None:
    s = synced
    # Matched on (connection, person, RxNorm code, start): a Data Model Clinical Summary carries no
    # order id, so there the model names a medication by a digest (documented in warehouse/README).
    want = Counter(
        (m.connection_id, person_of(s, m), m.code.code, utc(m.start_at))
        for m in s.records["medications"]
        if m.status == "active"
    )
    got = Counter(
        (r["connection_id"], r["person_key"], r["code"], utc(r["start_at"]))
        for r in rows(s, "select * from analytics.active_medications")
    )
    assert want and got == want


def test_appointment_throughput_per_connection_and_day(synced: Synced) -> None:
    s = synced
    want: dict[tuple, Counter] = defaultdict(Counter)
    for a in s.records["appointments"]:
        if a.status == "entered-in-error":
            continue
        c = want[(a.connection_id, utc(a.start_at).date())]
        c["appointments"] += 1
        c[
            {"proposed": "booked", "pending": "booked", "fulfilled": "completed", "noshow": "no_show"}.get(
                a.status, a.status
            )
        ] += 1
    got = {
        (r["connection_id"], r["day"]): r for r in rows(s, "select * from analytics.appointment_throughput")
    }
    assert set(got) == set(want)
    for k, c in want.items():
        for col in ("appointments", "booked", "arrived", "completed", "cancelled", "no_show"):
            assert got[k][col] == c[col], (k, col)
        seen = c["completed"] + c["no_show"]
        assert got[k]["no_show_rate"] == (c["no_show"] / seen if seen else None), k
    assert sum(c["completed"] for c in want.values()) and sum(c["cancelled"] for c in want.values())


def test_adt_census_admissions_discharges_in_house_and_length_of_stay(synced: Synced) -> None:
    s = synced
    stays = [
        (e.connection_id, e.class_code, utc(e.start_at), utc(e.end_at) if e.status == "finished" else None)
        for e in s.records["encounters"]
        if e.class_code in INPATIENT_CLASSES and e.status in HAPPENED
    ]
    adm: Counter = Counter((c, k, st.date()) for c, k, st, _ in stays)
    dis: dict[tuple, list[float]] = defaultdict(list)
    for c, k, st, en in stays:
        if en is not None:
            dis[(c, k, en.date())].append((en - st).total_seconds() / 3600)
    got = {
        (r["connection_id"], r["class"], r["day"]): r for r in rows(s, "select * from analytics.adt_census")
    }
    assert {k for k, g in got.items() if g["admissions"]} == set(adm)
    days = set(adm) | set(dis)
    assert {k for k in got if k[0] in EHR} == days
    for key in days:
        c, k, day = key
        g = got[key]
        in_house = sum(
            1
            for cc, kk, st, en in stays
            if (cc, kk) == (c, k) and st.date() <= day and (en is None or en.date() > day)
        )
        assert (g["admissions"], g["discharges"], g["in_house_end_of_day"]) == (
            adm[key],
            len(dis[key]),
            in_house,
        ), key
        assert g["transfers"] == 0  # transfers come from webhook ADT events; this warehouse was only pulled
        if dis[key]:
            assert abs(g["mean_length_of_stay_hours"] - sum(dis[key]) / len(dis[key])) < 1e-6, key
            assert abs(g["max_length_of_stay_hours"] - max(dis[key])) < 1e-6, key


def test_care_gaps_diabetics_without_a_recent_a1c(synced: Synced) -> None:
    # Every connection's encounter reasons: the Data Model's codes come from the Clinical Summary.
    s = synced
    got = rows(s, "select * from analytics.care_gaps")
    as_of = utc(got[0]["as_of"]) if got else datetime.now(UTC)
    cutoff = as_of.replace(year=as_of.year - 1)
    diabetic = {
        person_of(s, e)
        for e in s.records["encounters"]
        if e.status in HAPPENED and e.reason is not None and e.reason.code.startswith(DIABETES_ICD10_PREFIXES)
    }
    # The problem list, where the model has one, is kept by both surfaces.
    diabetic |= {
        person_of(s, pr) for pr in _active_problems(s) if pr.code.code.startswith(DIABETES_ICD10_PREFIXES)
    }
    last_a1c: dict[str, datetime] = {}
    for r in s.records["results"]:
        if r.code.code in A1C_LOINC and r.status not in DEAD:
            key = person_of(s, r)
            last_a1c[key] = max(last_a1c.get(key, utc(r.effective_at)), utc(r.effective_at))
    want = {p for p in diabetic if p not in last_a1c or last_a1c[p] < cutoff}
    assert diabetic, "the population has no diabetic person: the test would prove nothing"
    assert {r["person_key"] for r in got} == want
    for r in got:
        assert r["gap"] == "hba1c_overdue" and r["order_procedure_code"] == "4548-4"
        assert utc(r["last_a1c_at"]) == last_a1c.get(r["person_key"])
        assert r["connection_id"] in EHR and r["patient_key"].startswith("pk_")


def test_the_readme_example_queries_run_and_the_care_gap_insert_is_idempotent(synced: Synced) -> None:
    readme = (Path(__file__).resolve().parents[2] / "warehouse" / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Analytics views", 1)[1]
    queries = [block.split("```", 1)[0] for block in section.split("```sql\n")[1:]]
    assert len(queries) >= 3, "warehouse/README.md's analytics section shows no example queries"
    with duckdb.connect(str(synced.paths.duckdb)) as con:
        for sql in queries:
            if sql.lstrip().lower().startswith("select"):
                assert con.execute(sql).fetchall(), sql
        inserts = [q for q in queries if q.lstrip().lower().startswith("insert")]
        assert inserts
        gaps = con.execute(
            "select count(*) from analytics.care_gaps where connection_id is not null"
        ).fetchall()[0][0]
        before = con.execute("select count(*) from outbox.orders").fetchall()[0][0]
        for _ in range(2):  # a second run queues nothing more
            for sql in inserts:
                con.execute(sql)
        after = con.execute("select count(*) from outbox.orders").fetchall()[0][0]
        assert after - before == gaps


def _tiny_warehouse(con: duckdb.DuckDBPyConnection) -> None:
    """Two persons with hand-written rows: enough to check the optional inputs."""
    from pipelines.publish import ensure_model_tables

    ensure_model_tables(con)
    con.execute(
        "insert into redox.patients (connection_id, patient_key, enterprise_id, family_name, birth_date, source_updated_at) "
        "values ('c1', 'pk_a', 'E1', 'A', DATE '1950-01-01', TIMESTAMPTZ '2026-01-01 00:00:00+00'), "
        "('c1', 'pk_b', 'E2', 'B', DATE '1960-01-01', TIMESTAMPTZ '2026-01-01 00:00:00+00')"
    )
    con.execute(
        "insert into redox.encounters (connection_id, patient_key, encounter_id, status, class, start_at, end_at) values "
        "('c1', 'pk_a', 'v1', 'finished', 'IMP', TIMESTAMPTZ '2026-03-01 10:00:00+00', TIMESTAMPTZ '2026-03-04 10:00:00+00'), "
        "('c1', 'pk_b', 'v2', 'in-progress', 'IMP', TIMESTAMPTZ '2026-03-02 10:00:00+00', NULL)"
    )


def test_adt_census_counts_webhook_transfers_and_patient_summary_reads_a_problem_list(tmp_path: Path) -> None:
    """The optional inputs: ADT Transfer events (ops.events) and a problems table, once present,
    feed adt_census.transfers, patient_summary.active_problems and the care-gap evidence."""
    from pipelines.analytics import ensure_analytics_views

    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        _tiny_warehouse(con)
        assert con.execute("select sum(transfers) from analytics.adt_census").fetchall() == [(0,)]
        con.execute(
            "create schema if not exists ops; create table ops.events (message_key varchar, connection_id varchar, "
            "family varchar, data_model varchar, event_type varchar, event_at timestamptz, visit_number varchar, "
            "patient_id_system varchar, patient_id_value varchar, received_at timestamptz, processed_at timestamptz)"
        )
        con.execute(
            "insert into ops.events values "
            "('m1', 'c1', 'datamodel', 'PatientAdmin', 'Transfer', TIMESTAMPTZ '2026-03-03 08:00:00+00', 'v1', 'MR', 'x', now(), now()), "
            "('m2', 'c1', 'datamodel', 'PatientAdmin', 'Transfer', TIMESTAMPTZ '2026-03-03 09:00:00+00', 'v2', 'MR', 'y', now(), now()), "
            "('m3', 'c1', 'datamodel', 'PatientAdmin', 'Discharge', TIMESTAMPTZ '2026-03-04 10:00:00+00', 'v1', 'MR', 'x', now(), now())"
        )
        # The model's own problems table where it has one (issue 12: clinical status in `status`).
        con.execute(
            "create table if not exists redox.problems (connection_id varchar, patient_key varchar, "
            "problem_id varchar, code varchar, display varchar, clinical_status varchar)"
        )
        columns = {r[0] for r in con.execute("describe redox.problems").fetchall()}
        status = "clinical_status" if "clinical_status" in columns else "status"
        con.execute(
            f"insert into redox.problems (connection_id, patient_key, problem_id, code, display, {status}) values "
            "('c1', 'pk_a', 'p1', 'E11.9', 'Type 2 diabetes', 'active'), "
            "('c1', 'pk_a', 'p2', 'J45.909', 'Asthma', 'resolved'), ('c1', 'pk_b', 'p3', 'I10', 'Hypertension', 'active')"
        )
        assert "adt_census" in ensure_analytics_views(con, "redox")  # rebuilt with the events
        census = {
            r[0]: r[1:]
            for r in con.execute(
                "select day, admissions, discharges, transfers, in_house_end_of_day from analytics.adt_census order by day"
            ).fetchall()
        }
        assert census == {
            date(2026, 3, 1): (1, 0, 0, 1),
            date(2026, 3, 2): (1, 0, 0, 2),
            date(2026, 3, 3): (0, 0, 2, 2),
            date(2026, 3, 4): (0, 1, 0, 1),
        }
        problems = dict(
            con.execute("select person_key, active_problems from analytics.patient_summary").fetchall()
        )
        assert problems == {"ep_E1": ["Type 2 diabetes"], "ep_E2": ["Hypertension"]}
        gaps = con.execute("select person_key, evidence from analytics.care_gaps").fetchall()
        assert gaps == [("ep_E1", ["problem_list"])]


def test_dagster_materializes_every_view_with_row_counts_and_column_lineage(tmp_path: Path) -> None:
    from dagster import DagsterInstance, materialize

    from assets.analytics import ANALYTICS_KEYS, analytics_views
    from assets.resources import WarehouseResource

    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        _tiny_warehouse(con)
    result = materialize(
        [analytics_views],
        resources={"warehouse": WarehouseResource(path=str(tmp_path / "w.duckdb"))},
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    events = {e.asset_key: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert set(events) == set(ANALYTICS_KEYS)
    summary = events[AssetKey(["analytics", "patient_summary"])]
    assert summary["dagster/row_count"].value == 2
    lineage = summary["dagster/column_lineage"].value
    deps = {
        d.asset_key.to_user_string() + "." + d.column_name
        for d in lineage.deps_by_column["last_encounter_at"]
    }
    assert deps == {"redox/encounters.start_at"}
    assert events[AssetKey(["analytics", "adt_census"])]["dagster/row_count"].value == 3
