"""What one sync run is asked to fetch: the live cursor, or an explicit backfill window."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class SyncWindow:
    """``[start, end)`` on the records' last-updated time.

    Both unset: a live incremental run from the stored cursor. ``end`` set: a backfill
    over ``[start, end)`` that is stateless, so it never moves the live cursor.
    """

    start: datetime | None = None
    end: datetime | None = None

    def __post_init__(self) -> None:
        if self.start and self.end and self.start >= self.end:
            raise ValueError("sync window: start must be before end")
        if self.start is not None and self.start.tzinfo is None:
            raise ValueError("sync window: start must be timezone-aware (UTC)")
        if self.end is not None and self.end.tzinfo is None:
            raise ValueError("sync window: end must be timezone-aware (UTC)")

    @property
    def is_backfill(self) -> bool:
        return self.end is not None
