"""This process's SQLite writers take turns in the order they came (nanobot.writer_queue)."""

from __future__ import annotations

import threading
import time

import pytest

from nanobot.exceptions import DatabaseError
from nanobot.writer_queue import WriterQueue

WAIT = 10.0


def _until(condition: object, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


def test_a_waiting_writer_goes_before_the_holder_comes_back() -> None:
    """The holder lets go and asks again at once (the worker's next transaction of a burst):
    the writer that was waiting (the lease renewal) has its turn first."""
    queue = WriterQueue()
    order: list[str] = []

    def waiter() -> None:
        with queue.turn(WAIT):
            order.append("waiter")

    with queue.turn(WAIT):
        thread = threading.Thread(target=waiter)
        thread.start()
        _until(lambda: queue.waiting() == 1)
    with queue.turn(WAIT):
        order.append("holder again")
    thread.join(WAIT)
    assert order == ["waiter", "holder again"]


def test_the_holder_may_take_its_turn_again_inside_it() -> None:
    queue = WriterQueue()
    with queue.turn(WAIT), queue.turn(0.0):
        assert queue.waiting() == 0
    with queue.turn(0.0):  # free again after the outer block
        pass


def test_a_wait_past_its_timeout_fails_and_leaves_the_queue_as_it_was() -> None:
    queue = WriterQueue()
    held = threading.Event()
    done = threading.Event()

    def holder() -> None:
        with queue.turn(WAIT):
            held.set()
            done.wait(WAIT)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(WAIT)
    with pytest.raises(DatabaseError, match="database is locked"), queue.turn(0.05):
        pass
    assert queue.waiting() == 0
    done.set()
    thread.join(WAIT)
    with queue.turn(0.0):  # nobody holds it, nobody waits: at once
        pass
