"""The stored-key filter: every stored key is a hit (a miss is certain), few others are, and it
stays so past its capacity."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cegraph.daemon import stored_keys
from cegraph.daemon.stored_keys import StoredKeys

hex_ids = st.lists(st.text("0123456789abcdef", min_size=32, max_size=32), max_size=200)


@given(loaded=hex_ids, added=hex_ids)
def test_every_stored_trace_is_a_hit(loaded, added):
    traces = StoredKeys(lambda: [loaded], lambda: len(loaded))
    traces.add(added)
    assert traces.maybe(loaded + added) == loaded + added


def test_new_traces_are_almost_all_misses():
    stored = [f"{i:032x}" for i in range(50_000)]
    traces = StoredKeys(lambda: [stored[:20_000], stored[20_000:]], lambda: len(stored))
    unknown = [f"{i:032x}" for i in range(10**9, 10**9 + 20_000)]
    assert len(traces.maybe(unknown)) < 0.03 * len(unknown)


def test_past_its_capacity_it_reloads_bigger_and_still_knows_every_trace(monkeypatch):
    monkeypatch.setattr(stored_keys, "MIN_CAPACITY", 100)
    store: list[str] = []
    traces = StoredKeys(lambda: [list(store)], lambda: len(store))
    for start in range(0, 1_000, 50):
        batch = [f"{i:032x}" for i in range(start, start + 50)]
        store += batch  # stored, then added, as ingest does
        traces.add(batch)
    assert traces.capacity >= 1_000
    assert traces.maybe(store) == store
    unknown = [f"{i:032x}" for i in range(10**6, 10**6 + 2_000)]
    assert len(traces.maybe(unknown)) < 0.03 * len(unknown)
