"""``redox-elt status``: where each connection stands, read from the warehouse without
touching the API.

Per connection: the last sync and the last successful one (``ops.sync_runs``), the panel's
freshness (``ops.patient_panel``: patients, due now, never pulled, oldest full pull), rows
per entity in the common model, open quarantine entries, API calls and errors over the
last 24 hours (``audit.api_calls``), and the next scheduled run. Plus the shared request
budget (the quota file under the redox home). Counts, times and vocabulary only: no
identifier, name or clinical value can reach the output.

The next scheduled runs come from the orchestration layer (``assets.automation``), passed
in as data: this module never imports Dagster.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import duckdb

from pipelines.model import ENTITIES
from pipelines.publish import model_schema
from pipelines.quarantine import unresolved_quarantine_counts
from pipelines.sync_runs import SYNC_RUNS_TABLE
from pipelines.warehouse import table_exists

API_WINDOW = timedelta(hours=24)
AUDIT_TABLE = "audit.api_calls"


@dataclass(frozen=True)
class ScheduledRun:
    """The next tick of a schedule that syncs a connection (from ``assets.automation``)."""

    schedule: str
    at: datetime


@dataclass
class ConnectionStatus:
    connection_id: str
    kind: str
    last_sync: dict[str, Any] | None = None
    last_success_at: datetime | None = None
    panel: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    quarantine_open: int = 0
    api_24h: dict[str, Any] = field(default_factory=dict)
    next_runs: list[ScheduledRun] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "connection_id": self.connection_id,
            "kind": self.kind,
            "last_sync": _jsonable(self.last_sync),
            "last_success_at": _iso(self.last_success_at),
            "panel": _jsonable(self.panel),
            "rows": dict(self.rows),
            "quarantine_open": self.quarantine_open,
            "api_calls_24h": _jsonable(self.api_24h),
            "next_runs": [{"schedule": r.schedule, "at": _iso(r.at)} for r in self.next_runs],
        }


@dataclass
class WarehouseStatus:
    warehouse: Path
    generated_at: datetime
    connections: list[ConnectionStatus]
    quota: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "warehouse": str(self.warehouse),
            "generated_at": _iso(self.generated_at),
            "quota": self.quota,
            "connections": [c.as_json() for c in self.connections],
        }


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if isinstance(value, datetime) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _last_syncs(con: duckdb.DuckDBPyConnection) -> tuple[dict[str, dict[str, Any]], dict[str, datetime]]:
    if not table_exists(con, "ops", "sync_runs"):
        return {}, {}
    cols = ("mode", "status", "finished_at", "window_start", "window_end", "caller", "error",
            "extracted_rows", "published_rows", "quarantined_rows", "requests", "patients_deferred")  # fmt: skip
    last = {
        r[0]: dict(zip(cols, r[1:], strict=True))
        for r in con.execute(
            f"""SELECT connection_id, {", ".join(cols)} FROM {SYNC_RUNS_TABLE}
                QUALIFY row_number() OVER (PARTITION BY connection_id ORDER BY finished_at DESC) = 1"""
        ).fetchall()
    }
    ok = dict(
        con.execute(
            f"SELECT connection_id, max(finished_at) FROM {SYNC_RUNS_TABLE} WHERE status = 'success' GROUP BY 1"
        ).fetchall()
    )
    return last, ok


def _server_clock_offsets(con: duckdb.DuckDBPyConnection) -> dict[str, timedelta]:
    """Each connection's server clock minus ours, as the last sync measured it: the panel's
    times are the server's (a sandbox runs on a fixed clock)."""
    if not table_exists(con, "ops", "connection_capabilities"):
        return {}
    rows = con.execute(
        "SELECT connection_id, value FROM ops.connection_capabilities WHERE capability = 'server_clock_offset_s'"
    ).fetchall()
    out = {}
    for cid, value in rows:
        try:
            out[cid] = timedelta(seconds=float(value))
        except (TypeError, ValueError):
            continue
    return out


def _panel(con: duckdb.DuckDBPyConnection, now: datetime) -> dict[str, dict[str, Any]]:
    """Per connection: panel size, due now, never pulled, failing, and the oldest / newest
    full pull, the times moved onto our clock (``*_at``) from the server's."""
    if not table_exists(con, "ops", "patient_panel"):
        return {}
    offsets = _server_clock_offsets(con)
    rows = con.execute(
        """SELECT connection_id, count(*),
                  count(*) FILTER (WHERE last_full_pull_at IS NULL AND NOT coalesce(not_found, false)),
                  count(*) FILTER (WHERE consecutive_failures > 0),
                  min(last_full_pull_at), max(last_full_pull_at)
           FROM ops.patient_panel GROUP BY 1"""
    ).fetchall()
    due = {
        cid: int(n)
        for cid, n in con.execute(
            """SELECT p.connection_id, count(*) FROM ops.patient_panel p
               JOIN (SELECT unnest(?::VARCHAR[]) AS cid, unnest(?::DOUBLE[]) AS offset_s) o
                 ON o.cid = p.connection_id
               WHERE NOT coalesce(p.not_found, false)
                 AND p.next_pull_due_at <= ?::TIMESTAMPTZ + to_seconds(o.offset_s)
               GROUP BY 1""",
            [
                [r[0] for r in rows],
                [offsets.get(r[0], timedelta(0)).total_seconds() for r in rows],
                now,
            ],
        ).fetchall()
    }

    def ours(cid: str, moment: datetime | None) -> datetime | None:
        return moment - offsets.get(cid, timedelta(0)) if moment is not None else None

    return {
        r[0]: {
            "patients": int(r[1]),
            "due_now": due.get(r[0], 0),
            "never_pulled": int(r[2]),
            "failing": int(r[3]),
            "oldest_full_pull_at": ours(r[0], r[4]),
            "newest_full_pull_at": ours(r[0], r[5]),
        }
        for r in rows
    }


def _row_counts(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, int]]:
    ms = model_schema(con)
    out: dict[str, dict[str, int]] = {}
    for entity in ENTITIES:
        if not table_exists(con, ms, entity):
            continue
        for cid, n in con.execute(f"SELECT connection_id, count(*) FROM {ms}.{entity} GROUP BY 1").fetchall():
            out.setdefault(cid, {})[entity] = int(n)
    return out


def _api_calls(con: duckdb.DuckDBPyConnection, since: datetime) -> dict[str, dict[str, Any]]:
    if not table_exists(con, "audit", "api_calls"):
        return {}
    rows = con.execute(
        f"""SELECT connection_id, count(*),
                   count(*) FILTER (WHERE status_code IS NULL OR status_code >= 400),
                   count(*) FILTER (WHERE status_code = 429),
                   quantile_cont(duration_ms, 0.5), quantile_cont(duration_ms, 0.95), max(called_at)
            FROM {AUDIT_TABLE} WHERE called_at >= ? GROUP BY 1""",
        [since],
    ).fetchall()
    return {
        r[0]: {
            "calls": int(r[1]),
            "errors": int(r[2]),
            "rate_limited": int(r[3]),
            "p50_ms": round(float(r[4]), 1) if r[4] is not None else None,
            "p95_ms": round(float(r[5]), 1) if r[5] is not None else None,
            "last_call_at": r[6],
        }
        for r in rows
    }


def connections_in_warehouse(warehouse: Path) -> list[tuple[str, str]]:
    """(id, kind) of every connection the warehouse has synced, in the order first synced:
    what ``status`` shows without a connections file (after ``redox-elt demo``). A
    connection whose panel was found by network matching is a ``network``."""
    if not warehouse.is_file():
        return []
    with duckdb.connect(str(warehouse), read_only=True) as con:
        if not table_exists(con, "ops", "sync_runs"):
            return []
        ids = [r[0] for r in con.execute(
            f"SELECT connection_id FROM {SYNC_RUNS_TABLE} GROUP BY 1 ORDER BY min(finished_at)"
        ).fetchall()]  # fmt: skip
        networks: set[str] = set()
        if table_exists(con, "ops", "patient_panel"):
            networks = {r[0] for r in con.execute(
                "SELECT DISTINCT connection_id FROM ops.patient_panel WHERE found_by = 'network_match'"
            ).fetchall()}  # fmt: skip
    return [(cid, "network" if cid in networks else "ehr") for cid in ids]


def read_status(
    warehouse: Path,
    connections: Sequence[tuple[str, str]],
    *,
    next_runs: Mapping[str, Sequence[ScheduledRun]] | None = None,
    quota: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> WarehouseStatus:
    """The status of ``connections`` ((id, kind) pairs, in config order) in ``warehouse``
    (read-only; a warehouse not synced yet gives empty sections). ``next_runs``: the
    schedules' next ticks per connection kind."""
    now = now or datetime.now(UTC)
    statuses = [ConnectionStatus(cid, kind) for cid, kind in connections]
    if warehouse.is_file():
        with duckdb.connect(str(warehouse), read_only=True) as con:
            last, ok = _last_syncs(con)
            panel = _panel(con, now)
            rows = _row_counts(con)
            quarantine = unresolved_quarantine_counts(con)
            api = _api_calls(con, now - API_WINDOW)
        for st in statuses:
            cid = st.connection_id
            st.last_sync = last.get(cid)
            st.last_success_at = ok.get(cid)
            st.panel = panel.get(cid, {})
            st.rows = {e: rows.get(cid, {}).get(e, 0) for e in ENTITIES}
            st.quarantine_open = quarantine.get(cid, 0)
            st.api_24h = api.get(cid, {"calls": 0, "errors": 0, "rate_limited": 0})
    for st in statuses:
        st.next_runs = list((next_runs or {}).get(st.kind, ()))
    return WarehouseStatus(warehouse, now, statuses, quota)


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        return f"in {_span(-seconds)}"
    return f"{_span(seconds)} ago"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def print_status(status: WarehouseStatus, stream: TextIO) -> None:
    """The human form: one block per connection, every line under 80 columns."""
    now = status.generated_at
    out = [f"warehouse {status.warehouse}", f"as of {now:%Y-%m-%d %H:%M} UTC"]
    if status.quota:
        q = status.quota
        out.append(
            f"request budget: {q['used']:,} of {q['requests']:,} used in the last {q['window_s']:g} s "
            f"({q['remaining']:,} left, shared by every connection)"
        )
    for st in status.connections:
        out.append("")
        out.append(f"{st.connection_id} ({st.kind})")
        last = st.last_sync
        if last is None:
            out.append("  last sync     never (run redox-elt sync)")
        else:
            line = f"  last sync     {last['status']}, {_ago(last['finished_at'], now)} ({last['mode']}, {last['caller']})"
            out.append(line)
            if last["status"] != "success":
                out.append(f"  last error    {str(last['error'] or '')[:200]}")
                out.append(f"  last success  {_ago(st.last_success_at, now)}")
        if st.panel:
            p = st.panel
            out.append(
                f"  panel         {p['patients']:,} patients, {p['due_now']:,} due now, "
                f"{p['never_pulled']:,} never pulled, {p['failing']:,} failing"
            )
            out.append(f"  freshness     oldest full pull {_ago(p['oldest_full_pull_at'], now)}")
        if st.rows:
            out.append("  rows          " + ", ".join(f"{e} {n:,}" for e, n in st.rows.items()))
        out.append(f"  quarantine    {st.quarantine_open:,} open (redox-elt quarantine list)")
        if st.api_24h:
            a = st.api_24h
            latency = f", p95 {a['p95_ms']:.0f} ms" if a.get("p95_ms") is not None else ""
            out.append(
                f"  API, 24 h     {a['calls']:,} calls, {a['errors']:,} errors, "
                f"{a['rate_limited']:,} rate-limited{latency}"
            )
        for run in st.next_runs:
            out.append(f"  next run      {run.at:%Y-%m-%d %H:%M} UTC ({run.schedule}, {_ago(run.at, now)})")
    for line in out:
        print(_wrap(line), file=stream)


def _wrap(line: str, width: int = 79) -> str:
    """A status line folded under its value column (14 spaces) when it passes ``width``."""
    import textwrap

    if len(line) <= width:
        return line
    return "\n".join(textwrap.wrap(line, width, subsequent_indent=" " * 16, break_on_hyphens=False))


def print_status_json(status: WarehouseStatus, stream: TextIO) -> None:
    json.dump(status.as_json(), stream, indent=2, sort_keys=False)
    stream.write("\n")
