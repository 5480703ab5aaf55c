"""Rows extracted so far, per connection and entity: counted by the batchers (any
thread), shown by the CLI's progress display. Counts only — never row contents."""

from __future__ import annotations

import threading
from collections import defaultdict


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

    def reset(self) -> None:
        with self._lock:
            self._rows.clear()


PROGRESS = SyncProgress()
