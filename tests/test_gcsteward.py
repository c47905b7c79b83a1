"""The garbage-collection steward: long-lived objects frozen at quiet moments, a full collection
of everything once per refreeze period."""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from nanobot.gcsteward import FREEZE_AFTER, GcSteward, release


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def _old_garbage() -> weakref.ref[_Cycle]:
    """A reference cycle that reached generation 2 alive, then became garbage."""
    cycle = _Cycle()
    gc.collect(1)  # survivors of generations 0 and 1 move on to generation 2
    return weakref.ref(cycle)


def _old_alive() -> _Cycle:
    """An object alive in generation 2, due to be frozen."""
    old = _Cycle()
    gc.collect(1)
    _make_due()
    return old


def _make_due() -> None:
    # Each collection of generation 1 counts towards the next freeze.
    for _ in range(FREEZE_AFTER):
        gc.collect(1)


async def test_the_collector_makes_no_full_collection_while_the_steward_runs() -> None:
    """Generation 2's threshold is out of reach while the steward runs, and restored after."""
    before = gc.get_threshold()
    steward = GcSteward(lambda: True)
    steward.start()
    try:
        assert gc.get_threshold()[:2] == before[:2]
        assert gc.get_threshold()[2] > 10**6
        assert steward.running
    finally:
        steward.stop()
    assert gc.get_threshold() == before
    assert not steward.running
    steward.stop()  # idempotent


async def test_a_due_freeze_waits_for_a_quiet_moment() -> None:
    """Not quiet: nothing frozen; quiet: what lived into generation 2 is frozen (no later
    collection scans it), and the next freeze is not due at once."""
    quiet = False
    steward = GcSteward(lambda: quiet, max_wait=3600)
    steward.start()
    try:
        old = _old_alive()
        assert steward.look() is False
        assert any(o is old for o in gc.get_objects(2))
        quiet = True
        assert steward.look() is True
        assert all(o is not old for o in gc.get_objects()), "frozen"
        assert steward.collections == 1
        assert steward.look() is False, "not due again right after a freeze"
    finally:
        steward.stop()


async def test_a_quiet_moment_makes_no_full_collection() -> None:
    """A cycle that became garbage in generation 2 is not scanned at a quiet moment: the freeze
    only makes a young collection (a full one held the loop for tens of ms after a burst)."""
    steward = GcSteward(lambda: True, max_wait=3600)
    steward.start()
    try:
        ref = _old_garbage()
        _make_due()
        assert steward.look() is True
        assert ref() is not None, "kept (frozen) until the refreeze period"
    finally:
        steward.stop()


async def test_survivors_are_frozen_and_garbage_is_never_frozen() -> None:
    """What a quiet collection finds alive is frozen (later collections skip it); what it finds
    unreachable is freed, not frozen."""
    steward = GcSteward(lambda: True)
    alive = _Cycle()
    garbage = _Cycle()
    ref = weakref.ref(garbage)
    del garbage
    steward.collect()
    assert ref() is None
    assert gc.get_freeze_count() > 0
    assert all(o is not alive for o in gc.get_objects()), "frozen: no collection scans it"


async def test_a_service_never_quiet_still_freezes_after_the_longest_wait() -> None:
    """A due freeze that found no quiet moment within max_wait is made anyway."""
    steward = GcSteward(lambda: False, max_wait=0.0)
    steward.start()
    try:
        old = _old_alive()
        assert steward.look() is True
        assert all(o is not old for o in gc.get_objects()), "frozen"
    finally:
        steward.stop()


async def test_everything_is_scanned_again_after_the_refreeze_period() -> None:
    """A frozen object that became garbage is freed by the periodic collection of everything."""
    steward = GcSteward(lambda: True, refreeze=0.0)
    steward.start()
    try:
        kept = [_Cycle()]
        ref = weakref.ref(kept[0])
        steward.collect()  # frozen alive
        kept.clear()
        assert ref() is not None, "frozen: no ordinary collection frees it"
        _make_due()
        assert steward.look() is True
        assert ref() is None
    finally:
        steward.stop()


class _Item:
    __slots__ = ("__weakref__", "payload")

    def __init__(self, i: int) -> None:
        self.payload = {"i": (i, str(i))}


def test_release_empties_lists_and_dicts_and_frees_what_only_they_held() -> None:
    items = [_Item(i) for i in range(1000)]
    table = {(i, "k"): _Item(i) for i in range(1000)}
    small = [_Item(0)]
    kept = items[10]
    refs = [weakref.ref(x) for x in (*items, *table.values(), *small)]
    release(items, table, small)
    assert items == []
    assert table == {}
    assert small == []
    alive = [r() for r in refs if r() is not None]
    assert alive == [kept]  # an item still referenced elsewhere is not freed


def _lengths_seen_while_released(items: Any) -> set[int]:
    """The lengths of ``items`` another thread sees, over and over, while this one releases it."""
    seen: set[int] = set()
    started, done = threading.Event(), threading.Event()

    def observe() -> None:
        started.set()
        while not done.is_set():
            seen.add(len(items))

    observer = threading.Thread(target=observe)
    observer.start()
    assert started.wait(10)
    release(items)
    done.set()
    observer.join(10)
    return seen


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_release_lets_another_thread_run_while_it_frees(kind: str) -> None:
    """Another thread sees the container part-emptied: the freeing is not one uninterruptible
    call (``list.clear()`` would only ever show it full or empty)."""
    count = 50_000
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        seen: set[int] = set()
        for _attempt in range(5):
            items: Any = (
                [_Item(i) for i in range(count)]
                if kind == "list"
                else {i: _Item(i) for i in range(count)}
            )
            seen = _lengths_seen_while_released(items)
            if any(0 < n < count for n in seen):
                return
        pytest.fail(f"the other thread saw only {sorted(seen)} items left")
    finally:
        sys.setswitchinterval(saved)
