"""``redox-elt sync`` through the Dagster job, in-process, so a CLI sync is recorded like a
UI one (its runs, materializations and checks appear in the instance's history) and the
asset code is the code the UI runs: the ``redox_sync`` asset, which calls the one runner
``pipelines.sync.run_sync``.

One run per connection (EHRs first, networks last), each on partition (connection, today)
for a live sync, or on the day range covering ``--since``/``--until`` with the exact
bounds passed as run config. With ``DAGSTER_HOME`` set the runs are recorded in that
instance; otherwise an ephemeral instance is used.

A persistent instance also holds the ``duckdb_writer`` pool's slots, which a killed
process never gives back. So each run is tagged with the process that executes it, and
before a run starts (and while it waits for the pool) runs whose process is gone are
marked failed and their slots freed. The wait for the pool is bounded and ends on
SIGTERM/SIGINT (Dagster's in-process executor would otherwise wait forever, ignoring
both).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus, Definitions, LoggerDefinition, RunsFilter, logger
from dagster._utils.interrupts import check_captured_interrupt
from dagster_shared.error import SerializableErrorInfo

from assets.automation import SYNC_JOB
from assets.partitions import CONNECTIONS_PARTITIONS_NAME, RANGE_END_TAG, RANGE_START_TAG, partition_key
from assets.resources import ConnectionsFileResource, WarehouseResource
from assets.sync_assets import (
    CONNECTION_TAG,
    DUCKDB_POOL,
    MODE_LIVE,
    MODE_WINDOW,
    REPORTS_METADATA,
    reports_from_metadata,
)
from pipelines.cli import warehouse_open_error
from pipelines.sync import DEFAULT_LOOKBACK_S, ConnectionReport, SyncReport
from pipelines.sync_context import DEFAULT_DISCOVER_DAYS, ConnectionWindow, SyncWindow, networks_last
from pipelines.warehouse import WarehouseBusy, WarehousePaths
from redox_elt.environment import Environment
from resources.settings import Settings

# Which process executes a CLI run: host, pid and the process's start time (a pid is reused).
PID_TAG, HOST_TAG, PROCESS_START_TAG = "redox/pid", "redox/host", "redox/process_start"
IN_PROGRESS = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
POLL_S = 0.5


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def process_tags() -> dict[str, str]:
    pid = os.getpid()
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), PROCESS_START_TAG: _process_start(pid) or ""}


def _holder_is_dead(tags: dict[str, str]) -> bool:
    """True when the run's tags name a process on this host that no longer runs it."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False  # another host's or Dagster's own run: its own monitoring applies
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = _process_start(pid)
    return bool(tags.get(PROCESS_START_TAG)) and started is not None and started != tags[PROCESS_START_TAG]


def release_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark in-progress CLI runs whose process is gone as failed and free every pool slot
    they hold; also free slots held by runs that already finished. Returns the run ids."""
    released: list[str] = []
    for run in instance.get_runs(RunsFilter(job_name=SYNC_JOB, statuses=IN_PROGRESS)):
        if _holder_is_dead(run.tags):
            instance.report_run_failed(run, "the process running this sync ended without finishing it")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            released.append(run.run_id)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
                released.append(run_id)
    return released


def _pool_is_busy(instance: DagsterInstance) -> bool:
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return False
    info = storage.get_concurrency_info(DUCKDB_POOL)
    if info.limit is None:
        return False
    return len(info.claimed_slots) >= info.limit or info.pending_step_count > 0


def wait_for_pool(instance: DagsterInstance, wait_s: float) -> None:
    """Wait, at most ``wait_s``, until the warehouse's pool has room, releasing dead holders
    on the way; raises ``WarehouseBusy`` when the time is up. SIGTERM/SIGINT end it (the
    CLI turns both into ``KeyboardInterrupt``)."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        release_dead_runs(instance)
        if not _pool_is_busy(instance):
            return
        if not told:
            print(
                f"redox-elt sync: waiting for the {DUCKDB_POOL} pool (another sync holds it; "
                f"up to {wait_s:g} s, Ctrl-C or SIGTERM to stop)",
                file=sys.stderr,
                flush=True,
            )
            told = True
        if time.monotonic() >= deadline:
            raise WarehouseBusy(
                f"the {DUCKDB_POOL} pool stayed busy for {wait_s:g} s (another sync is running; "
                "see the Dagster UI's runs, or raise $REDOX_ELT_POOL_WAIT_S)"
            )
        time.sleep(POLL_S)


@contextmanager
def _watch_blocked_run(instance: DagsterInstance, run_id_box: list[str], wait_s: float) -> Iterator[None]:
    """While Dagster's in-process executor waits for a pool slot it sleeps in a loop that
    neither times out nor acts on SIGTERM/SIGINT (it only records them). This watchdog ends
    that wait: on a recorded signal, or when the step is still unassigned after ``wait_s``,
    it frees the run's claim, marks the run failed and exits the process (143 or 3)."""
    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + wait_s
        while not done.wait(POLL_S):
            if not run_id_box:
                continue
            run_id = run_id_box[0]
            info = instance.event_log_storage.get_concurrency_info(DUCKDB_POOL)
            if run_id not in info.pending_run_ids:
                deadline = time.monotonic() + wait_s  # running (or finished): nothing to guard
                continue
            interrupted = check_captured_interrupt()
            if interrupted or time.monotonic() >= deadline:
                run = instance.get_run_by_id(run_id)
                instance.event_log_storage.free_concurrency_slots_for_run(run_id)
                if run is not None and not run.is_finished:
                    why = "interrupted" if interrupted else f"waited {wait_s:g} s for the {DUCKDB_POOL} pool"
                    instance.report_run_failed(run, f"the CLI sync stopped: {why}")
                print(f"redox-elt sync: stopped while waiting for the {DUCKDB_POOL} pool", flush=True)
                os._exit(128 + signal.SIGTERM if interrupted else 3)

    thread = threading.Thread(target=watch, name="redox-pool-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def run_plan(
    connection_id: str,
    window: SyncWindow,
    lookback_s: float,
    today: datetime,
    first_day: date | None = None,
    *,
    full: bool = False,
    discover_days: int = DEFAULT_DISCOVER_DAYS,
) -> dict[str, Any]:
    """Partition, tags and run config of one connection's CLI run. The exact bounds travel
    as run config; the partition range only labels the run, so it is clamped to the days
    the partitions cover (``first_day`` .. today)."""
    config: dict[str, Any] = {
        "mode": MODE_WINDOW if window.is_backfill else MODE_LIVE,
        "lookback_s": lookback_s,
        "full": full,
        "discover_days": discover_days,
    }
    if window.start is not None:
        config["window_start"] = window.start.isoformat()
    if window.end is not None:
        config["window_end"] = window.end.isoformat()
    tags = {CONNECTION_TAG: connection_id}
    key = None
    if window.is_backfill:
        assert window.end is not None
        first = (window.start or window.end - timedelta(days=1)).astimezone(UTC).date()
        last = (window.end - timedelta(microseconds=1)).astimezone(UTC).date()
        first = min(max(first, first_day or first), today.date())
        last = max(min(last, today.date()), first)
        tags[RANGE_START_TAG] = str(partition_key(connection_id, first))
        tags[RANGE_END_TAG] = str(partition_key(connection_id, last))
    else:
        key = str(partition_key(connection_id, today.date()))
    return {"partition_key": key, "tags": tags, "run_config": {"ops": {"redox_sync": {"config": config}}}}


def _connection_report(
    cw: ConnectionWindow, result: Any, paths: WarehousePaths | None = None
) -> ConnectionReport:
    """The runner's report for the run's connection, read back from the run's events."""
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            user = data.user_failure_data
            reports = reports_from_metadata(user.metadata[REPORTS_METADATA].value) if user else []
            if reports:
                return _with_window(reports[0], cw)
            return ConnectionReport(cw.connection_id, window=cw.window, error=root_cause(data.error, paths))
    for event in result.get_asset_materialization_events():
        metadata = event.materialization.metadata
        if REPORTS_METADATA in metadata:
            reports = reports_from_metadata(metadata[REPORTS_METADATA].value)
            if reports:
                return _with_window(reports[0], cw)
    # No step ran to report: a resource that could not start, a run that failed around the step.
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        if isinstance(error, SerializableErrorInfo):
            return ConnectionReport(cw.connection_id, window=cw.window, error=root_cause(error, paths))
    return ConnectionReport(cw.connection_id, window=cw.window, error="run failed")


# Exceptions whose text is safe and useful to show: classes of ours (written without PHI),
# Dagster's Failure descriptions (ours too), and the operating system's (a path and a reason).
_SHOWN_MODULES = ("pipelines", "resources", "sandbox", "assets", "redox_elt")
_OS_ERRORS = {"OSError", "PermissionError", "FileNotFoundError", "IsADirectoryError", "NotADirectoryError"}


def _chain(error: SerializableErrorInfo | None) -> list[SerializableErrorInfo]:
    chain: list[SerializableErrorInfo] = []
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.cause or error.context
    return chain


def root_cause(error: SerializableErrorInfo | None, paths: WarehousePaths | None = None) -> str:
    """One line for a failed step: the innermost cause, not Dagster's wrapper ("Error occurred
    while executing op ..."). DuckDB's errors opening the warehouse become the warehouse's
    user error with its fix; a library's other errors show their type names only (their text
    can echo payload values)."""
    chain = _chain(error)
    if not chain:
        return "run failed"
    root = chain[-1]
    name = root.cls_name or "Error"
    text = (root.message or "").strip()
    # The message starts "package.module.Class: text" ("Class: text" for a builtin).
    head, sep, rest = text.partition(": ")
    named = sep and head.rsplit(".", 1)[-1] == name
    body = " ".join((rest if named else text).split())
    module = head.rsplit(".", 1)[0] if named and "." in head else ""
    if name in ("IOException", "PermissionException") and paths is not None:
        return warehouse_open_error(paths.duckdb, RuntimeError(body))
    if name == "Failure":
        return body[:400]
    # Only a class of ours carries text written without PHI: a builtin or a library's
    # exception raised in our code (a failed int(), a DuckDB conversion) can quote a value.
    if name in _OS_ERRORS or module.split(".")[0] in _SHOWN_MODULES:
        return f"{name}: {body[:400]}"
    return " <- ".join(e.cls_name or "Error" for e in reversed(chain[1:])) or name


def _with_window(report: ConnectionReport, cw: ConnectionWindow) -> ConnectionReport:
    report.window = cw.window
    return report


ENGINE_LOG_BYTES, ENGINE_LOG_BACKUPS = 10_000_000, 3
ENGINE_LOGGER = "redox_cli"


def engine_log_path(paths: WarehousePaths) -> Path:
    """Where a CLI sync writes Dagster's event log: beside the warehouse it syncs."""
    return paths.root / f"{paths.duckdb.stem}.dagster.log"


def engine_logger(handlers: Sequence[logging.Handler]) -> LoggerDefinition:
    """Dagster's engine log for CLI runs, sent to ``handlers`` (the log file; stderr too
    with ``-v``) instead of the default console logger that floods the terminal. Its lines
    hold run ids, step names and our own log lines (connection ids and counts, no PHI)."""

    @logger(description="redox-elt CLI: the engine log, to the warehouse's log file (stderr too with -v).")
    def redox_cli_logger(init_context: Any) -> logging.Logger:
        engine = logging.Logger("dagster.redox_cli", level=logging.DEBUG)
        for handler in handlers:
            engine.addHandler(handler)
        return engine

    return redox_cli_logger


@contextmanager
def _engine_handlers(paths: WarehousePaths, verbose: bool) -> Iterator[list[logging.Handler]]:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handlers: list[logging.Handler] = []
    file_handler = RotatingFileHandler(
        engine_log_path(paths), maxBytes=ENGINE_LOG_BYTES, backupCount=ENGINE_LOG_BACKUPS, delay=True
    )
    file_handler.setFormatter(fmt)
    handlers.append(file_handler)
    if verbose:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        handlers.append(stream)
    try:
        yield handlers
    finally:
        for handler in handlers:
            handler.close()


@dataclass
class DagsterSyncRunner:
    """The CLI's ``runner``: ``runner(settings, paths, windows, lookback_s=, full=, discover_days=,
    display=)`` → ``SyncReport``.

    ``build_definitions(env, redox, warehouse)`` is the code location's factory, passed in
    by the CLI entry point (only the entry point and Dagster's loader import it). The
    engine's log goes to ``engine_log_path`` (and stderr with ``verbose``); ``last_log``
    names the file after a call."""

    env: Environment
    build_definitions: Callable[..., Definitions]
    verbose: bool = False
    last_log: Path | None = field(default=None, init=False)

    @property
    def first_day(self) -> date:
        return date.fromisoformat(self.env.partitions_start)

    def _instance(self) -> DagsterInstance:
        return DagsterInstance.get() if self.env.dagster_home else DagsterInstance.ephemeral()

    def __call__(
        self,
        settings: Settings,
        paths: WarehousePaths,
        windows: Sequence[ConnectionWindow],
        *,
        lookback_s: float = DEFAULT_LOOKBACK_S,
        full: bool = False,
        discover_days: int = DEFAULT_DISCOVER_DAYS,
        display: Any = None,
    ) -> SyncReport:
        if settings.source_path is None:
            raise ValueError("the CLI sync needs settings read from a connections file")
        defs = self.build_definitions(
            self.env,
            ConnectionsFileResource(config_path=str(settings.source_path)),
            WarehouseResource(path=str(paths.duckdb), destination=paths.destination),
        )
        kinds = {c.id: c.kind for c in settings.connections}
        ordered = networks_last(windows, lambda w: kinds.get(w.connection_id))
        report = SyncReport(run_id="")
        today = datetime.now(UTC)
        self.last_log = engine_log_path(paths)
        with self._instance() as instance, _engine_handlers(paths, self.verbose) as handlers:
            job = defs.resolve_job_def(SYNC_JOB).with_logger_defs({ENGINE_LOGGER: engine_logger(handlers)})
            instance.add_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME, [w.connection_id for w in ordered])
            for cw in ordered:
                plan = run_plan(
                    cw.connection_id, cw.window, lookback_s, today, self.first_day,
                    full=full, discover_days=discover_days,
                )  # fmt: skip
                plan["tags"].update(process_tags())
                plan["run_config"]["loggers"] = {ENGINE_LOGGER: {}}
                wait_for_pool(instance, self.env.pool_wait_s)
                if display is not None:
                    display.started(cw.connection_id, _describe(cw.window))
                started = time.monotonic()
                run_id_box: list[str] = []
                with _watch_blocked_run(instance, run_id_box, self.env.pool_wait_s):
                    result = self._execute(job, instance, plan, run_id_box)
                report.run_id = report.run_id or result.run_id
                conn_report = _connection_report(cw, result, paths)
                conn_report.seconds["total"] = time.monotonic() - started
                report.connections.append(conn_report)
                if display is not None:
                    display.finished(conn_report)
        return report

    @staticmethod
    def _execute(job: Any, instance: DagsterInstance, plan: dict[str, Any], run_id_box: list[str]) -> Any:
        # The run id is made here so the watchdog knows which run to guard.
        from dagster._core.utils import make_new_run_id

        run_id = make_new_run_id()
        run_id_box.append(run_id)
        return job.execute_in_process(instance=instance, raise_on_error=False, run_id=run_id, **plan)


def _describe(window: SyncWindow) -> str:
    if not window.is_backfill:
        return "live, from the cursor"
    start = f"{window.start:%Y-%m-%d %H:%M}" if window.start else "the beginning"
    return f"window {start} .. {window.end:%Y-%m-%d %H:%M} UTC"
