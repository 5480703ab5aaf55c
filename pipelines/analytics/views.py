"""The analytics views: SQL over the common model that answers the questions users ask first.

Each view is plain DuckDB SQL over ``redox.<entity>`` and ``redox.persons`` (no copies, so a
view is never stale and costs nothing to refresh). A few inputs are optional and change the
SQL when present: ``redox.problems`` (the problem list, when the model carries it) feeds the
active problems of ``patient_summary`` and the diabetes evidence of ``care_gaps``; ``ops.events``
(ADT events received by webhook) feeds the transfers of ``adt_census``. The builders read
which inputs exist, so the views are rebuilt at every publish and pick up a new table then.

Every view leaves out records whose status says they never happened (``cancelled``,
``entered-in-error``), except ``appointment_throughput``, which counts cancellations.
The question each view answers is in ``VIEW_QUESTIONS`` (and in the views' DuckDB comments).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb

DEAD = "('cancelled', 'entered-in-error')"
# An encounter that happened (or is happening): the others are plans or mistakes.
HAPPENED = "('arrived', 'in-progress', 'finished')"
INPATIENT_CLASSES = ("IMP", "EMER", "OBSENC")
# Problem-list clinical statuses that mean the problem is current (FHIR condition-clinical).
ACTIVE_PROBLEM_STATUSES = ("active", "recurrence", "relapse")
DIABETES_ICD10_PREFIXES = ("E10", "E11", "E13")
A1C_LOINC = ("4548-4", "17856-6", "4549-2")
A1C_ORDER = ("4548-4", "LOINC", "Hemoglobin A1c/Hemoglobin.total in Blood")
CARE_GAP_MONTHS = 12

VIEW_QUESTIONS: dict[str, str] = {
    "patient_summary": (
        "Who is this person across every connection? One row per person: demographics, the "
        "connections that know them, their last encounter, active problems and active medications."
    ),
    "encounter_timeline": (
        "What happened to a person, in order? One row per encounter that happened or is planned, "
        "numbered per person, with length of stay and the gap since the previous encounter."
    ),
    "latest_results": (
        "What is a person's latest value of each test? One row per person and code: the most recent "
        "result, the one before it and how many there are."
    ),
    "abnormal_results": (
        "Which results are out of range? One row per result flagged abnormal by the source or "
        "outside its reference range, with where it falls and whether the flag and the range agree."
    ),
    "active_medications": "What is each person taking now? One row per medication whose status is active.",
    "appointment_throughput": (
        "How did scheduling go each day? Per connection and day (UTC, of the appointment start): "
        "appointments booked, arrived, completed, cancelled and no-shows."
    ),
    "adt_census": (
        "How full is the hospital? Per connection, day (UTC) and class (inpatient, emergency, "
        "observation): admissions, discharges, transfers, patients in house at the end of the day, "
        "and the length of stay of the day's discharges."
    ),
    "care_gaps": (
        f"Who is due for care? One row per person and gap; today: diabetic persons without a "
        f"hemoglobin A1c in the last {CARE_GAP_MONTHS} months (the list to turn into write-back orders)."
    ),
}
ANALYTICS_VIEWS: tuple[str, ...] = tuple(VIEW_QUESTIONS)


@dataclass(frozen=True)
class Inputs:
    """Where the model lives and which optional inputs exist."""

    ms: str  # schema of the common model (``redox``, or ``main`` in a file named redox.duckdb)
    problem_columns: tuple[str, ...] = ()  # columns of {ms}.problems; empty when absent
    has_events: bool = False  # ops.events exists


def _persons(ms: str, table: str, alias: str = "t") -> str:
    """Rows of ``table`` with their person_key."""
    return (
        f"SELECT pe.person_key, {alias}.* FROM {ms}.{table} {alias} JOIN {ms}.persons pe "
        f"ON pe.connection_id = {alias}.connection_id AND pe.patient_key = {alias}.patient_key"
    )


def _problem_label_and_filter(cols: tuple[str, ...]) -> tuple[str, str] | None:
    """The label column and the 'is active' predicate of the problem list, read from the
    columns it has; ``None`` when it has no usable label or status."""
    label = next((c for c in ("display", "code_display", "description") if c in cols), None)
    status = next((c for c in ("clinical_status", "status") if c in cols), None)
    if label is None or status is None:
        return None
    active = ", ".join(f"'{s}'" for s in ACTIVE_PROBLEM_STATUSES)
    where = f"lower(pr.{status}) IN ({active})"
    if "verification_status" in cols:
        where += " AND coalesce(lower(pr.verification_status), '') NOT IN ('entered-in-error', 'refuted')"
    return label, where


def patient_summary(i: Inputs) -> str:
    ms = i.ms
    problems = _problem_label_and_filter(i.problem_columns)
    if problems is None:
        problem_cte = "prob AS (SELECT NULL::VARCHAR AS person_key, NULL::VARCHAR[] AS active_problems)"
    else:
        label, where = problems
        problem_cte = (
            f"prob AS (SELECT person_key, list_sort(list(DISTINCT pr.{label})) AS active_problems "
            f"FROM ({_persons(ms, 'problems', 'x')}) pr WHERE {where} AND pr.{label} IS NOT NULL GROUP BY 1)"
        )
    return f"""
WITH pp AS ({_persons(ms, "patients", "p")}),
best AS (
    SELECT * FROM pp
    QUALIFY row_number() OVER (PARTITION BY person_key
                               ORDER BY source_updated_at DESC NULLS LAST, connection_id, patient_key) = 1),
conns AS (
    SELECT person_key, list_sort(list(DISTINCT connection_id)) AS connection_ids,
           list_sort(list(DISTINCT patient_key)) AS patient_keys
    FROM pp GROUP BY 1),
enc AS (SELECT * FROM ({_persons(ms, "encounters", "e")}) WHERE status IN {HAPPENED}),
last_enc AS (
    SELECT person_key, start_at, class, type_display, connection_id, count(*) OVER (PARTITION BY person_key) AS n
    FROM enc
    QUALIFY row_number() OVER (PARTITION BY person_key ORDER BY start_at DESC, connection_id, encounter_id) = 1),
meds AS (
    SELECT person_key, list_sort(list(DISTINCT display) FILTER (WHERE display IS NOT NULL)) AS active_medications,
           count(*) AS n
    FROM ({_persons(ms, "medications", "m")}) WHERE status = 'active' GROUP BY 1),
{problem_cte}
SELECT b.person_key, b.enterprise_id,
       b.family_name, b.given_names, b.birth_date, b.sex, b.deceased_at, b.race, b.ethnicity, b.language,
       b.address_line, b.city, b.state, b.postal_code, b.phone, b.email,
       c.connection_ids, len(c.connection_ids) AS n_connections, c.patient_keys,
       le.start_at AS last_encounter_at, le.class AS last_encounter_class,
       le.type_display AS last_encounter_type, le.connection_id AS last_encounter_connection_id,
       coalesce(le.n, 0) AS n_encounters,
       coalesce(m.active_medications, []::VARCHAR[]) AS active_medications, coalesce(m.n, 0) AS n_active_medications,
       pr.active_problems, len(pr.active_problems) AS n_active_problems
FROM best b
JOIN conns c USING (person_key)
LEFT JOIN last_enc le USING (person_key)
LEFT JOIN meds m USING (person_key)
LEFT JOIN prob pr USING (person_key)"""


def encounter_timeline(i: Inputs) -> str:
    return f"""
WITH e AS (SELECT * FROM ({_persons(i.ms, "encounters", "x")}) WHERE status NOT IN {DEAD})
SELECT person_key, connection_id, patient_key, encounter_id, status, class,
       type_code, type_display, reason_code, reason_display, location, department, attending_npi,
       start_at, end_at,
       CASE WHEN end_at IS NOT NULL THEN (epoch(end_at) - epoch(start_at)) / 3600.0 END AS length_of_stay_hours,
       discharge_disposition,
       row_number() OVER w AS encounter_number,
       (epoch(start_at) - epoch(lag(start_at) OVER w)) / 86400.0 AS days_since_previous_encounter
FROM e
WINDOW w AS (PARTITION BY person_key ORDER BY start_at, connection_id, encounter_id)"""


def latest_results(i: Inputs) -> str:
    return f"""
WITH r AS (
    SELECT *, row_number() OVER (PARTITION BY person_key, code_system, code
                                 ORDER BY effective_at DESC NULLS LAST, issued_at DESC NULLS LAST,
                                          connection_id, result_id) AS recency,
           count(*) OVER (PARTITION BY person_key, code_system, code) AS n_results
    FROM ({_persons(i.ms, "results", "x")}) WHERE status NOT IN {DEAD} AND code IS NOT NULL)
SELECT cur.person_key, cur.connection_id, cur.patient_key, cur.result_id, cur.category,
       cur.code_system, cur.code, cur.display, cur.value_numeric, cur.value_text, cur.unit,
       cur.reference_low, cur.reference_high, cur.abnormal_flag, cur.status, cur.effective_at,
       prev.value_numeric AS previous_value_numeric, prev.effective_at AS previous_effective_at,
       cur.n_results
FROM r cur
LEFT JOIN r prev ON prev.person_key = cur.person_key AND prev.code_system IS NOT DISTINCT FROM cur.code_system
                AND prev.code = cur.code AND prev.recency = 2
WHERE cur.recency = 1"""


def abnormal_results(i: Inputs) -> str:
    return f"""
WITH r AS (
    SELECT *,
           CASE WHEN value_numeric IS NULL OR (reference_low IS NULL AND reference_high IS NULL) THEN NULL
                WHEN value_numeric < reference_low THEN 'below'
                WHEN value_numeric > reference_high THEN 'above'
                ELSE 'within' END AS range_position
    FROM ({_persons(i.ms, "results", "x")}) WHERE status NOT IN {DEAD})
SELECT person_key, connection_id, patient_key, result_id, encounter_id, category,
       code_system, code, display, value_numeric, value_text, unit,
       reference_low, reference_high, reference_text, abnormal_flag, range_position,
       coalesce(abnormal_flag IN ('HH', 'LL'), false) AS is_critical,
       CASE WHEN range_position IS NULL OR abnormal_flag IS NULL OR abnormal_flag = 'A' THEN NULL
            ELSE (abnormal_flag = 'N') = (range_position = 'within') END AS flag_agrees_with_range,
       status, effective_at
FROM r
WHERE coalesce(abnormal_flag, 'N') <> 'N' OR range_position IN ('below', 'above')"""


def active_medications(i: Inputs) -> str:
    return f"""
SELECT person_key, connection_id, patient_key, medication_id, encounter_id, kind, status,
       code_system, code, display, dose_quantity, dose_unit, route, frequency, start_at, end_at, prescriber_npi
FROM ({_persons(i.ms, "medications", "x")})
WHERE status = 'active'"""


def _utc_day(column: str) -> str:
    # TIMESTAMPTZ -> date depends on the session's TimeZone; the day is always the UTC day.
    return f"CAST(timezone('UTC', {column}) AS DATE)"


def appointment_throughput(i: Inputs) -> str:
    return f"""
SELECT connection_id, {_utc_day("start_at")} AS day,
       count(*) AS appointments,
       count(*) FILTER (WHERE status IN ('proposed', 'pending', 'booked')) AS booked,
       count(*) FILTER (WHERE status = 'arrived') AS arrived,
       count(*) FILTER (WHERE status = 'fulfilled') AS completed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE status = 'noshow') AS no_show,
       count(*) FILTER (WHERE status = 'noshow')
         / nullif(count(*) FILTER (WHERE status IN ('fulfilled', 'noshow')), 0) AS no_show_rate
FROM {i.ms}.appointments
WHERE status <> 'entered-in-error' AND start_at IS NOT NULL
GROUP BY ALL"""


def adt_census(i: Inputs) -> str:
    classes = ", ".join(f"'{c}'" for c in INPATIENT_CLASSES)
    if i.has_events:
        transfers = f"""
transfers AS (
    SELECT ev.connection_id, {_utc_day("ev.event_at")} AS day, s.class, count(DISTINCT ev.message_key) AS n
    FROM ops.events ev JOIN stays s ON s.connection_id = ev.connection_id AND s.encounter_id = ev.visit_number
    WHERE ev.event_type = 'Transfer' AND ev.event_at IS NOT NULL GROUP BY ALL)"""
    else:
        transfers = "transfers AS (SELECT NULL::VARCHAR AS connection_id, NULL::DATE AS day, NULL::VARCHAR AS class, 0 AS n)"
    return f"""
WITH stays AS (
    SELECT connection_id, encounter_id, class, start_at, CASE WHEN status = 'finished' THEN end_at END AS end_at
    FROM {i.ms}.encounters
    WHERE class IN ({classes}) AND status IN {HAPPENED} AND start_at IS NOT NULL),
adm AS (SELECT connection_id, {_utc_day("start_at")} AS day, class, count(*) AS n FROM stays GROUP BY ALL),
dis AS (
    SELECT connection_id, {_utc_day("end_at")} AS day, class, count(*) AS n,
           avg((epoch(end_at) - epoch(start_at)) / 3600.0) AS mean_los,
           max((epoch(end_at) - epoch(start_at)) / 3600.0) AS max_los
    FROM stays WHERE end_at IS NOT NULL GROUP BY ALL),
{transfers},
days AS (
    SELECT connection_id, day, class FROM adm UNION SELECT connection_id, day, class FROM dis
    UNION SELECT connection_id, day, class FROM transfers WHERE connection_id IS NOT NULL),
census AS (
    SELECT d.connection_id, d.day, d.class, count(s.encounter_id) AS n
    FROM days d LEFT JOIN stays s
      ON s.connection_id = d.connection_id AND s.class = d.class
     AND {_utc_day("s.start_at")} <= d.day AND (s.end_at IS NULL OR {_utc_day("s.end_at")} > d.day)
    GROUP BY ALL)
SELECT d.connection_id, d.day, d.class,
       coalesce(adm.n, 0) AS admissions, coalesce(dis.n, 0) AS discharges, coalesce(t.n, 0) AS transfers,
       coalesce(c.n, 0) AS in_house_end_of_day,
       dis.mean_los AS mean_length_of_stay_hours, dis.max_los AS max_length_of_stay_hours
FROM days d
LEFT JOIN adm USING (connection_id, day, class)
LEFT JOIN dis USING (connection_id, day, class)
LEFT JOIN transfers t USING (connection_id, day, class)
LEFT JOIN census c USING (connection_id, day, class)"""


def care_gaps(i: Inputs) -> str:
    ms = i.ms
    prefixes = " OR ".join(f"{{col}} LIKE '{p}%'" for p in DIABETES_ICD10_PREFIXES)
    evidence = [
        f"SELECT person_key, 'encounter_reason' AS source FROM ({_persons(ms, 'encounters', 'x')}) "
        f"WHERE status IN {HAPPENED} AND ({prefixes.format(col='reason_code')})"
    ]
    problems = _problem_label_and_filter(i.problem_columns)
    if problems is not None and "code" in i.problem_columns:
        _, where = problems
        evidence.append(
            f"SELECT person_key, 'problem_list' AS source FROM ({_persons(ms, 'problems', 'x')}) pr "
            f"WHERE {where} AND ({prefixes.format(col='pr.code')})"
        )
    a1c = ", ".join(f"'{c}'" for c in A1C_LOINC)
    code, codeset, description = A1C_ORDER
    return f"""
WITH now_ AS (SELECT current_timestamp AS as_of),
diabetic AS (
    SELECT person_key, list_sort(list(DISTINCT source)) AS evidence
    FROM ({" UNION ALL ".join(evidence)}) GROUP BY 1),
a1c AS (
    SELECT person_key, max(effective_at) AS last_at, arg_max(value_numeric, effective_at) AS last_value
    FROM ({_persons(ms, "results", "x")})
    WHERE code IN ({a1c}) AND status NOT IN {DEAD} AND effective_at IS NOT NULL GROUP BY 1),
home AS (
    SELECT person_key, connection_id, patient_key FROM ({_persons(ms, "encounters", "x")})
    WHERE status IN {HAPPENED}
    QUALIFY row_number() OVER (PARTITION BY person_key ORDER BY start_at DESC, connection_id, encounter_id) = 1)
SELECT d.person_key, 'hba1c_overdue' AS gap,
       'diabetic, no hemoglobin A1c in the last {CARE_GAP_MONTHS} months' AS gap_description,
       d.evidence, h.connection_id, h.patient_key,
       a.last_at AS last_a1c_at, a.last_value AS last_a1c_value, now_.as_of,
       '{code}' AS order_procedure_code, '{codeset}' AS order_procedure_codeset,
       '{description}' AS order_procedure_description
FROM diabetic d CROSS JOIN now_
LEFT JOIN a1c a USING (person_key)
LEFT JOIN home h USING (person_key)
WHERE a.last_at IS NULL OR a.last_at < now_.as_of - INTERVAL {CARE_GAP_MONTHS} MONTH"""


BUILDERS: dict[str, Callable[[Inputs], str]] = {
    "patient_summary": patient_summary,
    "encounter_timeline": encounter_timeline,
    "latest_results": latest_results,
    "abnormal_results": abnormal_results,
    "active_medications": active_medications,
    "appointment_throughput": appointment_throughput,
    "adt_census": adt_census,
    "care_gaps": care_gaps,
}
if tuple(BUILDERS) != ANALYTICS_VIEWS:
    raise ImportError("pipelines.analytics.views: BUILDERS and VIEW_QUESTIONS disagree")


def read_inputs(con: duckdb.DuckDBPyConnection, ms: str) -> Inputs:
    """Which optional inputs the current catalog has."""
    rows = con.execute(
        "SELECT table_schema, table_name, column_name FROM information_schema.columns "
        "WHERE table_catalog = current_database() AND ((table_schema = ? AND table_name = 'problems') "
        "OR (table_schema = 'ops' AND table_name = 'events')) ORDER BY ordinal_position",
        [ms],
    ).fetchall()
    problems = tuple(c for s, t, c in rows if t == "problems")
    return Inputs(ms=ms, problem_columns=problems, has_events=any(t == "events" for _, t, _ in rows))


_P = [("persons", "person_key")]
_LOS = [("encounters", "start_at"), ("encounters", "end_at")]
_RANGE = [("results", "value_numeric"), ("results", "reference_low"), ("results", "reference_high")]
# Column lineage of each view: (its main model table, {column: [(table, column), ...]}). A view
# column not named here is the same column of the main table (Dagster's dagster/column_lineage).
VIEW_SOURCES: dict[str, tuple[str, dict[str, list[tuple[str, str]]]]] = {
    "patient_summary": (
        "patients",
        {
            "person_key": _P,
            "connection_ids": [("patients", "connection_id")],
            "n_connections": [("patients", "connection_id")],
            "patient_keys": [("patients", "patient_key")],
            "last_encounter_at": [("encounters", "start_at")],
            "last_encounter_class": [("encounters", "class")],
            "last_encounter_type": [("encounters", "type_display")],
            "last_encounter_connection_id": [("encounters", "connection_id")],
            "n_encounters": [("encounters", "encounter_id"), ("encounters", "status")],
            "active_medications": [("medications", "display"), ("medications", "status")],
            "n_active_medications": [("medications", "status")],
            "active_problems": [],
            "n_active_problems": [],
        },
    ),
    "encounter_timeline": (
        "encounters",
        {
            "person_key": _P,
            "length_of_stay_hours": _LOS,
            "encounter_number": [("encounters", "start_at")],
            "days_since_previous_encounter": [("encounters", "start_at")],
        },
    ),
    "latest_results": (
        "results",
        {
            "person_key": _P,
            "previous_value_numeric": [("results", "value_numeric")],
            "previous_effective_at": [("results", "effective_at")],
            "n_results": [("results", "code")],
        },
    ),
    "abnormal_results": (
        "results",
        {
            "person_key": _P,
            "range_position": _RANGE,
            "is_critical": [("results", "abnormal_flag")],
            "flag_agrees_with_range": [("results", "abnormal_flag"), *_RANGE],
        },
    ),
    "active_medications": ("medications", {"person_key": _P}),
    "appointment_throughput": (
        "appointments",
        {
            "day": [("appointments", "start_at")],
            **{
                c: [("appointments", "status")]
                for c in (
                    "appointments",
                    "booked",
                    "arrived",
                    "completed",
                    "cancelled",
                    "no_show",
                    "no_show_rate",
                )
            },
        },
    ),
    "adt_census": (
        "encounters",
        {
            "day": _LOS,
            "admissions": [("encounters", "start_at")],
            "discharges": [("encounters", "end_at"), ("encounters", "status")],
            "transfers": [],
            "in_house_end_of_day": _LOS,
            "mean_length_of_stay_hours": _LOS,
            "max_length_of_stay_hours": _LOS,
        },
    ),
    "care_gaps": (
        "encounters",
        {
            "person_key": _P,
            "gap": [],
            "gap_description": [],
            "evidence": [("encounters", "reason_code")],
            "last_a1c_at": [("results", "effective_at"), ("results", "code")],
            "last_a1c_value": [("results", "value_numeric"), ("results", "code")],
            "as_of": [],
            "order_procedure_code": [],
            "order_procedure_codeset": [],
            "order_procedure_description": [],
        },
    ),
}
