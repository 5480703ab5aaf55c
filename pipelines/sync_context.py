"""What one sync run is asked to fetch: per connection, the live cursor or an explicit
backfill window; and the one rule on the order connections sync in."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

# How far back discovery looks on a live run (``redox-elt sync --discover-days``).
DEFAULT_DISCOVER_DAYS = 30


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


@dataclass(frozen=True)
class ConnectionWindow:
    """One connection's share of a run: the connection and the window it syncs."""

    connection_id: str
    window: SyncWindow = SyncWindow()

    @property
    def days(self) -> int:
        """Whole days a backfill window covers (backfill windows only)."""
        if self.window.start is None or self.window.end is None:
            raise ValueError("a live window has no day count")
        return (self.window.end - self.window.start) // timedelta(days=1)


NETWORK_KIND = "network"
T = TypeVar("T")


def networks_last(items: Iterable[T], kind: Callable[[T], str | None]) -> list[T]:
    """``items`` with clinical-network connections moved after the others (order otherwise
    kept): a network is asked about the enterprise ids the EHR connections loaded, so it
    must sync after them in a run, and be scheduled after them."""
    return sorted(items, key=lambda item: kind(item) == NETWORK_KIND)
