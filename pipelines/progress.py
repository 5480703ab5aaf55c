"""Rows extracted so far, per connection and entity: counted by the batchers (any
thread), shown by the CLI's progress display. Counts only — never row contents.

The display has two forms, chosen by where its stream goes:

* a terminal gets a live table (one line per connection and entity, rows so far), redrawn
  in place and cleared when the sync ends (the summary follows);
* anything else (a pipe, a file, CI) gets plain lines that are never redrawn: one when a
  connection starts and one per connection and entity when it ends, so a log shows
  progress at once instead of nothing for minutes.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class SyncProgress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, connection_id: str, entity: str, n: int = 1) -> None:
        with self._lock:
            self._rows[(connection_id, entity)] += n

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._rows)

    def rows_of(self, connection_id: str) -> dict[str, int]:
        """Rows counted so far for one connection, per entity."""
        with self._lock:
            return {e: n for (c, e), n in self._rows.items() if c == connection_id}

    def reset(self) -> None:
        with self._lock:
            self._rows.clear()


PROGRESS = SyncProgress()

REFRESH_S = 0.25


class SyncDisplay:
    """What the CLI shows while a sync runs. The runners call ``started(connection_id)``
    before a connection and ``finished(report)`` after it (any ``ConnectionReport``-like
    object with ``connection_id``, ``extracted`` and ``error``)."""

    def __init__(self, stream: TextIO, *, live: bool) -> None:
        self.stream = stream
        self.live = live
        self._started: dict[str, float] = {}
        self._progress: Any = None

    def _line(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def started(self, connection_id: str, what: str = "") -> None:
        self._started[connection_id] = time.monotonic()
        if not self.live:
            self._line(f"sync {connection_id}: started{f' ({what})' if what else ''}")

    def finished(self, report: Any) -> None:
        cid = report.connection_id
        seconds = time.monotonic() - self._started.pop(cid, time.monotonic())
        if report.error:
            self._line(f"sync {cid}: FAILED after {seconds:.1f} s (see the summary)")
            return
        if self.live:
            self._line(f"sync {cid}: done in {seconds:.1f} s")
            return
        fetched = {**PROGRESS.rows_of(cid), **{e: n for e, n in report.extracted.items() if n}}
        for entity in sorted(fetched):
            self._line(f"sync {cid}: {entity:<13} {fetched[entity]:>9,} rows fetched")
        self._line(f"sync {cid}: done in {seconds:.1f} s")

    @contextmanager
    def running(self) -> Iterator[SyncDisplay]:
        """Show the live table (terminal only) while the body runs."""
        PROGRESS.reset()
        if not self.live:
            yield self
            return
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(file=self.stream)
        tasks: dict[tuple[str, str], Any] = {}
        stop = threading.Event()
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TextColumn("{task.completed:>9,.0f} rows"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            self._progress = progress

            def refresh() -> None:
                while not stop.wait(REFRESH_S):
                    for key, n in sorted(PROGRESS.snapshot().items()):
                        if key not in tasks:
                            tasks[key] = progress.add_task(f"{key[0][:30]:<30} {key[1]:<13}", total=None)
                        progress.update(tasks[key], completed=n)

            worker = threading.Thread(target=refresh, name="redox-progress", daemon=True)
            worker.start()
            try:
                yield self
            finally:
                stop.set()
                worker.join()
                self._progress = None


def sync_display(stream: TextIO) -> SyncDisplay:
    """The display for ``stream``: live on a terminal, plain lines otherwise."""
    isatty = getattr(stream, "isatty", None)
    return SyncDisplay(stream, live=bool(isatty and isatty()))
