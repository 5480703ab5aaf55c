"""De-identified export: Parquet copies of the analytics views with the HIPAA Safe Harbor
identifiers (45 CFR 164.514(b)(2)) removed or generalized.

How: the warehouse is attached read-only to an in-memory DuckDB; the model tables the views
read are copied into it column by column through ``COLUMN_RULES`` (a column without a rule is
nulled, never copied: fail closed); the analytics views are built on the copies with the same
SQL as in the warehouse (``pipelines.analytics``); each view is written to Parquet after a last
pass (birth dates become a birth year and an age, ages over 89 become ``90+``; name, address,
phone and email columns are left out). Nothing de-identified ever touches the warehouse.

The rules, per Safe Harbor identifier:

* Names, street addresses, cities, phone numbers, email addresses: removed.
* ZIP codes: Safe Harbor allows the first three digits only where the 3-digit area holds more
  than 20,000 people per current Census data. This project ships no census table, so it cannot
  show that for any area: every ZIP becomes ``000``. State is kept (Safe Harbor allows it).
* Dates: every date and time tied to a person (visits, results, orders, appointments, death,
  source and ingest times) is shifted by that person's offset: 1 to 182 days earlier or later,
  from a keyed HMAC of the person key, so intervals within a person are exact and one person
  has one offset across connections and tables. Birth dates are not shifted but generalized:
  ``birth_year`` (the real year) and ``age`` in whole years at export; from 90 on, ``age`` is
  ``90+`` and ``birth_year`` null. Aggregates by day (``appointment_throughput``,
  ``adt_census``) are computed from the shifted dates, so their days carry no real date.
* MRNs, enterprise / EHR / NIST ids, patient and person keys, every record id (visit, order,
  result, medication, appointment, document numbers) and provider NPIs: replaced by a keyed hash
  (HMAC-SHA256, ``h_`` + 32 hex), consistent within one key, so joins still work and nobody
  without the key can recompute one from an MRN.
* Free text: document titles and content, appointment reasons and cancel reasons, reference range
  text, landing paths are removed; a result's text value is kept only when the result is numeric
  or the same text occurs for at least ``MIN_PERSONS_FOR_TEXT`` persons (a coded answer such as
  "Negative"), so a unique free-text value never leaves.
* SSN, fax, health plan and account numbers, certificates, vehicles, devices, URLs, IP
  addresses, biometrics and photos: the model carries none of them; a column it gains without a
  rule here is exported as null.

The secret: ``$REDOX_ELT_DEIDENTIFY_KEY`` when set (at least 32 characters), otherwise a random
key created once in the credential vault (entry ``deidentify-hmac-key``); it is never written
to the export, a log or an error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.analytics import ANALYTICS_VIEWS, ensure_analytics_views
from pipelines.publish import persons_view_sql

KEY_ENV = "REDOX_ELT_DEIDENTIFY_KEY"
VAULT_ENTRY = "deidentify-hmac-key"
MIN_KEY_CHARS = 32
MAX_SHIFT_DAYS = 182
MIN_PERSONS_FOR_TEXT = 5
SUPPRESSED_ZIP = "000"
AGE_TOP_CODE = 90

# The model tables the analytics views read (problems when the model has it).
SOURCE_TABLES = ("patients", "encounters", "results", "medications", "appointments", "problems")

KEEP, HASH, SHIFT, DROP, ZIP3, BIRTH, TEXT = "keep", "hash", "shift", "drop", "zip3", "birth", "text"
COLUMN_RULES: dict[str, str] = {
    # organisation and vocabulary: not identifiers of a person
    **dict.fromkeys(
        (
            "connection_id",
            "source_surface",
            "status",
            "class",
            "type_code",
            "type_system",
            "type_display",
            "reason_code",
            "reason_system",
            "reason_display",
            "location",
            "department",
            "discharge_disposition",
            "category",
            "code",
            "code_system",
            "display",
            "value_numeric",
            "unit",
            "reference_low",
            "reference_high",
            "abnormal_flag",
            "kind",
            "intent",
            "dose_quantity",
            "dose_unit",
            "route",
            "frequency",
            "duration_minutes",
            "sex",
            "race",
            "ethnicity",
            "language",
            "state",
            "is_test",
            "active",
            "content_type",
            "clinical_status",
            "verification_status",
            "severity",
            "id_system",
            "id_type",
        ),
        KEEP,
    ),
    # identifiers: a keyed hash keeps joins and hides the value
    **dict.fromkeys(
        (
            "patient_key",
            "mrn",
            "enterprise_id",
            "ehr_id",
            "nist_id",
            "source_id",
            "encounter_id",
            "result_id",
            "order_id",
            "medication_id",
            "appointment_id",
            "document_id",
            "problem_id",
            "rescheduled_from",
            "attending_npi",
            "prescriber_npi",
            "provider_npi",
            "performer",
            "author",
            "recorder",
            "asserter",
            "id_value",
        ),
        HASH,
    ),
    # dates and times of a person's care: shifted by the person's offset
    **dict.fromkeys(
        (
            "start_at",
            "end_at",
            "effective_at",
            "issued_at",
            "authored_at",
            "deceased_at",
            "source_updated_at",
            "ingested_at",
            "onset_at",
            "abatement_at",
            "recorded_at",
            "first_seen_at",
            "last_seen_at",
        ),
        SHIFT,
    ),
    # direct identifiers and free text
    **dict.fromkeys(
        (
            "family_name",
            "given_names",
            "address_line",
            "city",
            "phone",
            "email",
            "raw_ref",
            "title",
            "reason",
            "cancel_reason",
            "reference_text",
            "note",
            "notes",
            "content_sha256",
            "content_bytes",
        ),
        DROP,
    ),
    "postal_code": ZIP3,
    "birth_date": BIRTH,
    "value_text": TEXT,
}
# Columns of the views left out of the export entirely (they are null after the rules anyway).
EXPORT_OMITTED = ("family_name", "given_names", "address_line", "city", "phone", "email")


class ExportError(ValueError):
    """The export cannot run; the message names the problem and the fix (never a value)."""


@dataclass(frozen=True)
class DeidKey:
    secret: bytes = field(repr=False)
    source: str  # "env" | "vault"

    def mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, value: str) -> str:
        return "h_" + self.mac("id", value).hex()[:32]

    def shift_days(self, person_key: str) -> int:
        n = int.from_bytes(self.mac("date-shift", person_key)[:8], "big")
        days = 1 + n % MAX_SHIFT_DAYS
        return days if (n >> 63) & 1 else -days


def load_key(vault: object | None = None) -> DeidKey:
    """The HMAC key: ``$REDOX_ELT_DEIDENTIFY_KEY``, else the vault's (created on first use)."""
    env = os.environ.get(KEY_ENV)
    if env is not None:
        if len(env) < MIN_KEY_CHARS:
            raise ExportError(
                f"${KEY_ENV} is shorter than {MIN_KEY_CHARS} characters; set a long random value "
                f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))') or unset it to use the vault"
            )
        return DeidKey(env.encode(), "env")
    if vault is None:
        from resources.vault import Vault

        vault = Vault()
    value = vault.get_optional(VAULT_ENTRY)  # type: ignore[attr-defined]
    if value is None:  # first export: create it (atomically: a concurrent export keeps the first)
        value = vault.update(VAULT_ENTRY, lambda old: old or secrets.token_urlsafe(32))  # type: ignore[attr-defined]
    return DeidKey(str(value).encode(), "vault")


@dataclass
class ExportReport:
    out_dir: Path
    rows: dict[str, int]
    suppressed_columns: dict[str, list[str]]  # table -> columns nulled for want of a rule
    key_source: str


def _model_schema(con: duckdb.DuckDBPyConnection) -> str:
    found = con.execute(
        "SELECT table_schema FROM information_schema.tables WHERE table_catalog = 'src' "
        "AND table_name = 'patients' AND table_schema IN ('redox', 'main') ORDER BY table_schema = 'redox' DESC"
    ).fetchall()
    if not found:
        raise ExportError("the warehouse holds no common model (redox.patients); run redox-elt sync first")
    return found[0][0]


def _columns(con: duckdb.DuckDBPyConnection, catalog: str, schema: str, table: str) -> list[tuple[str, str]]:
    return con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_catalog = ? "
        "AND table_schema = ? AND table_name = ? ORDER BY ordinal_position",
        [catalog, schema, table],
    ).fetchall()


def _register_udfs(con: duckdb.DuckDBPyConnection, key: DeidKey) -> None:
    def pseudonym(values: pa.Array) -> pa.Array:
        return pa.array([None if v is None else key.pseudonym(v) for v in values.to_pylist()], pa.string())

    def shift(values: pa.Array) -> pa.Array:
        return pa.array([0 if v is None else key.shift_days(v) for v in values.to_pylist()], pa.int32())

    con.create_function("deid_pseudonym", pseudonym, ["VARCHAR"], "VARCHAR", type="arrow", side_effects=False)
    con.create_function("deid_shift_days", shift, ["VARCHAR"], "INTEGER", type="arrow", side_effects=False)


def _expression(column: str, data_type: str, rule: str | None) -> str:
    q = f'x."{column}"'
    typed = f"NULL::{data_type}"
    if rule in (KEEP, BIRTH):  # birth dates are generalized in the last pass
        return q
    if rule == HASH:
        return f"deid_pseudonym({q}::VARCHAR)" if data_type.upper() == "VARCHAR" else typed
    if rule == SHIFT:
        if "TIME" in data_type or "DATE" in data_type:
            return f"({q} + to_days(deid_shift_days(pm.person_key)))::{data_type}"
        return typed
    if rule == ZIP3:
        return f"CASE WHEN {q} IS NOT NULL THEN '{SUPPRESSED_ZIP}' END"
    if rule == TEXT:
        return (
            f"CASE WHEN x.value_numeric IS NOT NULL OR count(DISTINCT pm.person_key) OVER (PARTITION BY {q}) "
            f">= {MIN_PERSONS_FOR_TEXT} THEN {q} END"
        )
    return typed  # DROP, or no rule at all: fail closed


def _copy_table(
    con: duckdb.DuckDBPyConnection, ms: str, table: str, connections: list[str] | None
) -> list[str]:
    """Copy ``src.<ms>.<table>`` into ``redox.<table>`` through the rules; returns the columns
    nulled for want of a rule."""
    cols = _columns(con, "src", ms, table)
    exprs, unruled = [], []
    for name, data_type in cols:
        rule = COLUMN_RULES.get(name)
        if rule is None:
            unruled.append(name)
        exprs.append(f'{_expression(name, data_type, rule)} AS "{name}"')
    where = "WHERE x.connection_id IN (SELECT unnest($conns))" if connections is not None else ""
    con.execute(
        f"""CREATE TABLE redox.{table} AS
        SELECT {", ".join(exprs)}
        FROM src.{ms}.{table} x
        LEFT JOIN person_map pm ON pm.connection_id = x.connection_id AND pm.patient_key = x.patient_key
        {where}""",
        {"conns": connections} if connections is not None else {},
    )
    return unruled


def _copy_events(con: duckdb.DuckDBPyConnection, ms: str, connections: list[str] | None) -> None:
    """ADT events (for adt_census transfers): ids hashed, times shifted by the event's person."""
    where = "WHERE ev.connection_id IN (SELECT unnest($conns))" if connections is not None else ""
    con.execute("CREATE SCHEMA IF NOT EXISTS ops")
    con.execute(
        f"""CREATE TABLE ops.events AS
        WITH ev AS (
            SELECT ev.*, coalesce(pm.person_key, ev.connection_id || ':' || coalesce(ev.patient_id_value, '')) AS pk
            FROM src.ops.events ev
            LEFT JOIN src.{ms}.patient_identifiers x ON x.connection_id = ev.connection_id
                 AND x.id_system = ev.patient_id_system AND x.id_value = ev.patient_id_value
            LEFT JOIN person_map pm ON pm.connection_id = x.connection_id AND pm.patient_key = x.patient_key
            {where})
        SELECT deid_pseudonym(message_key) AS message_key, connection_id, family, data_model, event_type,
               event_at + to_days(deid_shift_days(pk)) AS event_at, deid_pseudonym(visit_number) AS visit_number,
               patient_id_system, deid_pseudonym(patient_id_value) AS patient_id_value,
               received_at + to_days(deid_shift_days(pk)) AS received_at,
               processed_at + to_days(deid_shift_days(pk)) AS processed_at
        FROM ev""",
        {"conns": connections} if connections is not None else {},
    )


def _final_select(con: duckdb.DuckDBPyConnection, view: str, today: str) -> str:
    names = [c for c, _ in _columns(con, "memory", "analytics", view)]
    keep = [f'"{c}"' for c in names if c not in EXPORT_OMITTED and c != "birth_date"]
    if "birth_date" in names:
        age = f"date_part('year', age(DATE '{today}', birth_date))"
        keep += [
            f"CASE WHEN {age} >= {AGE_TOP_CODE} THEN NULL ELSE year(birth_date) END::INTEGER AS birth_year",
            f"CASE WHEN {age} >= {AGE_TOP_CODE} THEN '{AGE_TOP_CODE}+' ELSE ({age})::INTEGER::VARCHAR END AS age",
        ]
    return f"SELECT {', '.join(keep)} FROM analytics.{view}"


def _write_parquet(table: pa.Table, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o600)
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_deidentified(
    warehouse: Path,
    out_dir: Path,
    key: DeidKey,
    connections: Iterable[str] | None = None,
    today: datetime | None = None,
) -> ExportReport:
    """Write ``<view>.parquet`` for every analytics view, de-identified, and ``manifest.json``."""
    if not warehouse.is_file():
        raise ExportError(
            f"--warehouse {warehouse} does not exist; run redox-elt sync first or pass --warehouse"
        )
    conns = sorted(set(connections)) if connections is not None else None
    today_s = (today or datetime.now(UTC)).date().isoformat()
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        try:
            con.execute(f"ATTACH '{_sql_path(warehouse)}' AS src (READ_ONLY)")
        except duckdb.Error as exc:
            raise ExportError(
                f"the warehouse {warehouse} cannot be opened ({type(exc).__name__}); "
                "is a sync writing it, or is it not a redox-elt DuckDB file?"
            ) from None
        ms = _model_schema(con)
        _register_udfs(con, key)
        con.execute("CREATE SCHEMA redox")
        # The person each row belongs to, before any value is hashed: the date-shift key.
        con.execute(
            f"CREATE TEMP TABLE person_map AS SELECT connection_id, patient_key, person_key FROM src.{ms}.persons"
        )
        present = {
            t
            for (t,) in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'src' AND table_schema = ?",
                [ms],
            ).fetchall()
        }
        suppressed: dict[str, list[str]] = {}
        for table in SOURCE_TABLES:
            if table in present:
                unruled = _copy_table(con, ms, table, conns)
                if unruled:
                    suppressed[table] = unruled
        con.execute(persons_view_sql("redox"))
        has_events = bool(
            con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_catalog = 'src' "
                "AND table_schema = 'ops' AND table_name = 'events'"
            ).fetchall()[0][0]
        )
        if has_events:
            _copy_events(con, ms, conns)
        ensure_analytics_views(con, "redox")
        try:
            out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ExportError(
                f"--out {out_dir} cannot be created ({exc.strerror or type(exc).__name__}); pass a folder you can write"
            ) from None
        rows: dict[str, int] = {}
        for view in ANALYTICS_VIEWS:
            table = con.sql(_final_select(con, view, today_s)).to_arrow_table()
            _write_parquet(table, out_dir / f"{view}.parquet")
            rows[view] = table.num_rows
    finally:
        con.close()
    report = ExportReport(out_dir, rows, suppressed, key.source)
    manifest = {
        "format": "redox-elt de-identified export",
        "method": "HIPAA Safe Harbor, 45 CFR 164.514(b)(2); rules in pipelines/deidentify.py",
        "exported_on": today_s,
        "connections": conns or "all",
        "tables": {v: {"file": f"{v}.parquet", "rows": n} for v, n in rows.items()},
        "zip_codes": f"suppressed to {SUPPRESSED_ZIP} (no census table to show a 3-digit area holds > 20,000 people)",
        "dates": f"shifted per person by 1..{MAX_SHIFT_DAYS} days either way (keyed HMAC of the person key)",
        "ages": f"whole years at export; {AGE_TOP_CODE} and over as '{AGE_TOP_CODE}+', birth_year then null",
        "identifiers": "HMAC-SHA256 pseudonyms (h_ + 32 hex), consistent within one key",
        "key_source": key.source,
        "suppressed_columns_without_a_rule": suppressed,
    }
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.chmod(manifest_path, 0o600)
    return report


_SAFE_PATH = re.compile(r"^[^'\x00]*$")


def _sql_path(path: Path) -> str:
    text = str(path)
    if not _SAFE_PATH.match(text):
        raise ExportError("--warehouse: the path cannot contain a quote or a NUL character; rename the file")
    return text
