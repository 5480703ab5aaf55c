"""``redox-elt report``: one static, self-contained HTML page for people who would rather
look than read: the status table, then rows per connection over time (``ops.sync_runs``),
API latency and errors (``audit.api_calls``), open quarantine by reason (``raw.quarantine``)
and freshness (``ops.sync_runs``, ``ops.patient_panel``).

The page carries its styles and charts inline (``pipelines.svg``): no script, no font, no
request to anywhere, so it opens from disk, from an e-mail or on a machine with no network.
Like ``redox-elt status`` it shows counts, times and vocabulary values only (connection ids,
quarantine reasons written without payload values); never an identifier, name or clinical
value.
"""

from __future__ import annotations

import os
from collections import defaultdict
from datetime import UTC, datetime
from html import escape
from pathlib import Path

import duckdb

from pipelines.quarantine import unresolved_quarantine_counts
from pipelines.status import WarehouseStatus, _ago
from pipelines.svg import bar_chart, line_chart
from pipelines.vocabulary import QUARANTINE_TABLE, STAGING_SCHEMA
from pipelines.warehouse import table_exists

REPORT_FILE = "index.html"
# API calls are grouped into about this many time buckets (whole minutes, hours or days).
API_BUCKETS = 48
QUARANTINE_REASONS_SHOWN = 15

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:760px;
color:#222;line-height:1.4}
h1{font-size:1.4em;margin-bottom:0}h2{font-size:1.1em;margin-top:2em;border-bottom:1px solid #ddd}
p.note{color:#555;font-size:.9em;margin-top:.2em}
table{border-collapse:collapse;font-size:.85em;width:100%}
th,td{padding:3px 6px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}
.chart{max-width:100%;height:auto}.chart .grid{stroke:#eee}.chart .tick{font-size:11px;fill:#555}
.chart .empty{font-size:13px;fill:#888}
.legend{font-size:.85em;margin:4px 0 0 64px}.key{margin-right:14px;white-space:nowrap}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.bad{color:#b00}
"""


def _bucket_seconds(span_s: float) -> int:
    """A whole bucket size (minute, 5 min, 15 min, hour, 6 h, day) giving about API_BUCKETS."""
    for size in (60, 300, 900, 3600, 6 * 3600, 86400):
        if span_s / size <= API_BUCKETS:
            return size
    return 7 * 86400


def rows_over_time(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[datetime, float]]]:
    """Rows in the common model per connection after each successful run."""
    if not table_exists(con, "ops", "sync_runs"):
        return {}
    series: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for cid, at, n in con.execute(
        "SELECT connection_id, finished_at, published_rows FROM ops.sync_runs "
        "WHERE status = 'success' ORDER BY finished_at"
    ).fetchall():
        series[cid].append((at.astimezone(UTC), float(n or 0)))
    return dict(series)


def api_series(
    con: duckdb.DuckDBPyConnection,
) -> tuple[dict[str, list[tuple[datetime, float]]], dict[str, list[tuple[datetime, float]]]]:
    """(latency p50/p95 in ms, calls and errors) per time bucket over the audit trail."""
    if not table_exists(con, "audit", "api_calls"):
        return {}, {}
    lo, hi = con.execute("SELECT min(called_at), max(called_at) FROM audit.api_calls").fetchone()
    if lo is None:
        return {}, {}
    size = _bucket_seconds((hi - lo).total_seconds())
    rows = con.execute(
        f"""SELECT to_timestamp(floor(epoch(called_at) / {size}) * {size}) AS bucket,
                   quantile_cont(duration_ms, 0.5), quantile_cont(duration_ms, 0.95), count(*),
                   count(*) FILTER (WHERE status_code IS NULL OR status_code >= 400)
            FROM audit.api_calls GROUP BY 1 ORDER BY 1"""
    ).fetchall()
    latency: dict[str, list[tuple[datetime, float]]] = {"p50 latency": [], "p95 latency": []}
    volume: dict[str, list[tuple[datetime, float]]] = {"calls": [], "errors (HTTP >= 400 or none)": []}
    for bucket, p50, p95, calls, errors in rows:
        at = bucket.astimezone(UTC)
        latency["p50 latency"].append((at, float(p50 or 0)))
        latency["p95 latency"].append((at, float(p95 or 0)))
        volume["calls"].append((at, float(calls)))
        volume["errors (HTTP >= 400 or none)"].append((at, float(errors)))
    return latency, volume


def quarantine_reasons(con: duckdb.DuckDBPyConnection) -> list[tuple[str, float]]:
    """Open quarantine entries per (connection, entity, reason), most first."""
    if not table_exists(con, STAGING_SCHEMA, QUARANTINE_TABLE):
        return []
    from pipelines.quarantine import _open_sql  # the one definition of an open entry

    rows = con.execute(
        f"""SELECT q.connection_id || ' ' || q.entity || ': ' || q.reason, count(*)
            FROM {STAGING_SCHEMA}.{QUARANTINE_TABLE} q WHERE {_open_sql(con)}
            GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {QUARANTINE_REASONS_SHOWN}"""
    ).fetchall()
    return [(label, float(n)) for label, n in rows]


def _status_table(status: WarehouseStatus) -> str:
    now = status.generated_at
    head = (
        "<tr><th>connection</th><th>last sync</th><th>last success</th><th>patients</th>"
        "<th>due now</th><th>rows</th><th>quarantine</th><th>API calls 24 h</th><th>errors</th></tr>"
    )
    body = []
    for st in status.connections:
        last = st.last_sync
        state = "never" if last is None else f"{last['status']}, {_ago(last['finished_at'], now)}"
        cls = ' class="bad"' if last is not None and last["status"] != "success" else ""
        body.append(
            f"<tr><td>{escape(st.connection_id)} ({escape(st.kind)})</td><td{cls}>{escape(state)}</td>"
            f"<td>{escape(_ago(st.last_success_at, now))}</td>"
            f"<td>{st.panel.get('patients', 0):,}</td><td>{st.panel.get('due_now', 0):,}</td>"
            f"<td>{sum(st.rows.values()):,}</td><td>{st.quarantine_open:,}</td>"
            f"<td>{st.api_24h.get('calls', 0):,}</td><td>{st.api_24h.get('errors', 0):,}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def freshness_bars(status: WarehouseStatus) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(hours since each connection's last successful sync, days since its panel's oldest
    full pull)."""
    now = status.generated_at
    synced, pulled = [], []
    for st in status.connections:
        if st.last_success_at is not None:
            synced.append((st.connection_id, round((now - st.last_success_at).total_seconds() / 3600, 2)))
        oldest = st.panel.get("oldest_full_pull_at")
        if oldest is not None:
            pulled.append((st.connection_id, round((now - oldest).total_seconds() / 86400, 2)))
    return synced, pulled


def render_report(status: WarehouseStatus) -> str:
    """The page's HTML for ``status`` (read from the same warehouse)."""
    rows: dict[str, list[tuple[datetime, float]]] = {}
    latency: dict[str, list[tuple[datetime, float]]] = {}
    volume: dict[str, list[tuple[datetime, float]]] = {}
    reasons: list[tuple[str, float]] = []
    open_total = 0
    if status.warehouse.is_file():
        with duckdb.connect(str(status.warehouse), read_only=True) as con:
            rows = rows_over_time(con)
            latency, volume = api_series(con)
            reasons = quarantine_reasons(con)
            open_total = sum(unresolved_quarantine_counts(con).values())
    synced, pulled = freshness_bars(status)
    generated = f"{status.generated_at:%Y-%m-%d %H:%M} UTC"
    sections = [
        ("Connections", "Where each connection stands (the same numbers as <code>redox-elt status</code>).",
         _status_table(status)),
        ("Rows per connection over time",
         "Rows of the common model (redox.*) held for each connection after each successful sync.",
         line_chart("rows in the warehouse per connection", rows)),
        ("API latency", "Median and 95th-percentile response time of the calls to Redox, per time bucket "
         "(audit.api_calls).", line_chart("API latency (ms)", latency, " ms")),
        ("API calls and errors", "Calls sent and calls that failed (HTTP status 400 or more, or no answer), "
         "per time bucket.", line_chart("API calls and errors", volume)),
        ("Quarantine reasons", f"{open_total:,} open entries (neither reloaded nor dismissed), by connection, "
         "entity and reason; <code>redox-elt quarantine list</code> shows them.",
         bar_chart("open quarantine entries by reason", reasons)),
        ("Freshness: hours since the last successful sync", "A connection past its schedule's interval "
         "(hourly by default) is falling behind.", bar_chart("hours since the last successful sync", synced, " h")),
        ("Freshness: days since the oldest full pull", "Every panel patient is re-pulled within the "
         "connection's refresh_days; a bar past it means the budget defers pulls.",
         bar_chart("days since the panel's oldest full pull", pulled, " d")),
    ]  # fmt: skip
    body = "".join(f"<h2>{title}</h2><p class=note>{note}</p>{content}" for title, note, content in sections)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>redox-elt report {escape(generated)}</title><style>{STYLE}</style></head><body>"
        f"<h1>redox-elt report</h1><p class=note>Warehouse {escape(str(status.warehouse))}, "
        f"as of {escape(generated)}. Counts and times only: no patient data.</p>"
        f"{body}</body></html>\n"
    )


def write_report(status: WarehouseStatus, out_dir: Path) -> Path:
    """Write ``index.html`` into ``out_dir`` (created; owner-only like every output) and return it.
    Written to a temporary name first, so a reader never sees half a page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / REPORT_FILE
    tmp = out_dir / f".{REPORT_FILE}.{os.getpid()}.tmp"
    tmp.write_text(render_report(status), encoding="utf-8")
    os.replace(tmp, page)
    return page
