"""Connection × day partitions, and how a run's partitions become sync windows.

* ``connection`` is dynamic: the ``connection_partitions`` sensor adds a partition for
  every connection in the config, so a new connection needs no code change.
* ``day`` is a UTC daily partition on the records' last-updated time. Materializing
  ``(connection, day)`` syncs the stateless window ``[day, day + 1)``; a range of days
  is one window, so a backfill never moves the live cursor.

History before the first day (``$REDOX_ELT_PARTITIONS_START``, default 2024-11-01): the
first day's partition stands for that day *and everything before it*. Materializing it
syncs ``[1970-01-01, first day + 1)``, so one click in the UI backfills an organization's
older history, and a CLI window that starts earlier (``--since 2020-01-01``) runs with its
exact bounds as run config, labelled with the first partition. One partition per day back
to the oldest record would cost thousands of partitions per connection that the UI
and the daemon evaluate on every tick, for days nobody syncs one at a time.

Backfills: Dagster splits a multi-partition backfill into one run per connection and
contiguous day range, and passes the range as the ``dagster/asset_partition_range_start``
/ ``_end`` run tags. Those tags are read directly, because ``context.partition_key_range``
on multi-partitioned single-run backfills has open bugs (shared/STACK.md). A range whose
ends name different connections (possible from the Python API) falls back to the run's
full partition list, grouped by connection.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta

from dagster import (
    DailyPartitionsDefinition,
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
)

from pipelines.sync_context import ConnectionWindow, SyncWindow

CONNECTION_DIMENSION = "connection"
DAY_DIMENSION = "day"
CONNECTIONS_PARTITIONS_NAME = "redox_connection"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

connection_partitions = DynamicPartitionsDefinition(name=CONNECTIONS_PARTITIONS_NAME)


def sync_partitions_def(start_date: str) -> MultiPartitionsDefinition:
    """(connection, day) partitions whose days begin at ``start_date`` (YYYY-MM-DD)."""
    day_partitions = DailyPartitionsDefinition(
        start_date=start_date,
        timezone="UTC",
        # Today is a partition too: the hourly incremental sync materializes (connection, today).
        end_offset=1,
    )
    return MultiPartitionsDefinition(
        {CONNECTION_DIMENSION: connection_partitions, DAY_DIMENSION: day_partitions}
    )


# Where the first day's partition begins: no record's last-updated time predates Unix time.
HISTORY_START = datetime(1970, 1, 1, tzinfo=UTC)


def first_day(partitions_def: object) -> date | None:
    """The first day of a (connection, day) partitions definition, or None for another kind."""
    if not isinstance(partitions_def, MultiPartitionsDefinition):
        return None
    for dimension in partitions_def.partitions_defs:
        if dimension.name == DAY_DIMENSION and isinstance(
            dimension.partitions_def, DailyPartitionsDefinition
        ):
            return dimension.partitions_def.start.date()
    return None


def partition_key(connection_id: str, day: date | str) -> MultiPartitionKey:
    day_key = day if isinstance(day, str) else day.isoformat()
    return MultiPartitionKey({CONNECTION_DIMENSION: connection_id, DAY_DIMENSION: day_key})


def _day_start(day_key: str) -> datetime:
    return datetime.fromisoformat(day_key).replace(tzinfo=UTC)


def _split(key: str | MultiPartitionKey) -> tuple[str, str]:
    if isinstance(key, MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims[CONNECTION_DIMENSION], dims[DAY_DIMENSION]
    # A multi-partition key's string form joins the dimensions' keys in the order of their
    # sorted names: "connection|day".
    connection_id, sep, day_key = str(key).rpartition("|")
    if not sep or not connection_id:
        raise ValueError(f"not a (connection, day) partition key: {key!r}")
    return connection_id, day_key


def _window_start(day: date, history_day: date | None) -> datetime:
    """A window's start: the day's, or the beginning of history for the first day."""
    return HISTORY_START if history_day is not None and day <= history_day else _day_start(day.isoformat())


def windows_from_keys(
    keys: Iterable[str | MultiPartitionKey], history_day: date | None = None
) -> list[ConnectionWindow]:
    """Group partition keys by connection; each contiguous run of days is one window (one
    that starts on ``history_day``, the first partition, starts at the beginning of history)."""
    days_by_connection: dict[str, set[date]] = defaultdict(set)
    for key in keys:
        connection_id, day_key = _split(key)
        days_by_connection[connection_id].add(date.fromisoformat(day_key))
    windows: list[ConnectionWindow] = []
    for connection_id in sorted(days_by_connection):
        days = sorted(days_by_connection[connection_id])
        first = prev = days[0]
        for day in [*days[1:], None]:
            if day is not None and day == prev + timedelta(days=1):
                prev = day
                continue
            start = _window_start(first, history_day)
            end = _day_start(prev.isoformat()) + timedelta(days=1)
            windows.append(ConnectionWindow(connection_id, SyncWindow(start, end)))
            if day is not None:
                first = prev = day
    return windows


def windows_for_run(
    tags: Mapping[str, str],
    partition_keys: Sequence[str] | None,
    single_key: str | None,
    history_day: date | None = None,
) -> list[ConnectionWindow]:
    """The windows a run covers, from its range tags, else its partition key(s).
    ``history_day``: the first partition day, whose window reaches back to 1970."""
    start, end = tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)
    if start and end:
        start_conn, start_day = _split(start)
        end_conn, end_day = _split(end)
        if start_conn == end_conn:
            if end_day < start_day:
                raise ValueError(f"partition range ends ({end_day}) before it starts ({start_day})")
            window = SyncWindow(
                _window_start(date.fromisoformat(start_day), history_day),
                _day_start(end_day) + timedelta(days=1),
            )
            return [ConnectionWindow(start_conn, window)]
        if not partition_keys:
            raise ValueError("a partition range across connections needs the run's partition keys")
        return windows_from_keys(partition_keys, history_day)
    if single_key is None:
        raise ValueError("a sync run needs a (connection, day) partition or a partition range")
    return windows_from_keys([single_key], history_day)
