"""The daemon's garbage-collector settings: start-up's objects frozen, young collections rarer, and
cycles made afterwards still collected by the collector's own runs."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from cegraph.daemon import gc_policy


@pytest.fixture
def restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_settle_freezes_what_exists_and_raises_only_the_young_threshold(restored):
    gc.unfreeze()
    _, middle, old = gc.get_threshold()
    kept = _Cycle()
    gc_policy.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (gc_policy.YOUNG_THRESHOLD, middle, old)
    assert kept.me is kept


def test_a_cycle_dropped_after_settle_is_collected_without_asking(restored):
    gc_policy.settle()
    cycle = _Cycle()
    alive = weakref.ref(cycle)
    del cycle
    made = [[] for _ in range(3 * gc_policy.YOUNG_THRESHOLD)]  # allocations that start collections
    assert made and alive() is None
