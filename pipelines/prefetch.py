"""Read an iterator one step ahead on a worker thread, so fetching the next page overlaps
landing and normalizing the current one."""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order while a worker fetches up to ``depth`` ahead. An error in
    the worker is raised here, at the item where it happened; closing this generator
    stops the worker after its current item."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, not swallowed
            buffer.put((_DONE, exc))

    # The worker runs in a copy of the caller's context, so context-scoped settings (audit
    # attribution, for one) apply to what it fetches.
    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(work,), name="read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)
