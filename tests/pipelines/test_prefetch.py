"""read_ahead keeps order, surfaces errors where they happen, and stops when closed."""

from __future__ import annotations

import threading

import pytest

from pipelines.prefetch import read_ahead


def test_items_arrive_in_order() -> None:
    assert list(read_ahead(iter(range(100)), depth=3)) == list(range(100))


def test_an_error_is_raised_after_the_items_before_it() -> None:
    def pages():
        yield 1
        yield 2
        raise RuntimeError("page 3 failed")

    got = []
    with pytest.raises(RuntimeError, match="page 3 failed"):
        for item in read_ahead(pages()):
            got.append(item)
    assert got == [1, 2]


def test_the_next_item_is_fetched_while_the_current_one_is_processed() -> None:
    second_fetched = threading.Event()

    def pages():
        yield 0
        second_fetched.set()
        yield 1

    it = read_ahead(pages())
    assert next(it) == 0
    # Still "processing" item 0: the worker must already have fetched item 1.
    assert second_fetched.wait(timeout=5)
    assert list(it) == [1]


def test_closing_early_stops_the_worker() -> None:
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = {t.ident for t in threading.enumerate()}
    gen = read_ahead(endless(), depth=2)
    assert next(gen) == 0
    workers = [t for t in threading.enumerate() if t.ident not in before]
    assert workers, "read_ahead started no worker"
    gen.close()
    for worker in workers:
        worker.join(timeout=5)  # the condition: the worker has ended
        assert not worker.is_alive(), "the read-ahead worker kept running after close()"
    count = len(produced)
    assert count <= 1 + 2 + 1  # the item in hand, the queue's depth, one blocked put
    assert len(produced) == count  # a dead worker produces nothing more
