"""The detector is fed from memory: the nodes ingest just appended are handed out once, exactly as the
span log holds them, and a detector fed that way ends where one fed from the log does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from otel_traces import make_traces, to_messages
from pipeline_fixtures import ingest

from cegraph.daemon.carried_spans import CarriedSpans
from cegraph.daemon.detect.detector import FailureDetector
from cegraph.daemon.detect.stage import DetectorStage
from cegraph.daemon.events import EXECUTION_COMPLETED, FAILURE_OBSERVED
from cegraph.daemon.ingest.pipeline import InMessage
from cegraph.daemon.runner import StageRunner
from cegraph.daemon.settings import DetectorSettings
from cegraph.daemon.store import EventStore

sizes = st.lists(st.integers(min_value=0, max_value=30), max_size=40)


@given(sizes=sizes, bound=st.integers(min_value=1, max_value=200))
def test_holds_the_newest_within_its_bound_and_hands_each_out_once(sizes, bound):
    carried = CarriedSpans(max_nodes=bound)
    added = [(seq, [object()] * size) for seq, size in enumerate(sizes)]
    carried.add(added)  # type: ignore[arg-type]
    assert len(carried) <= bound
    found, missing = carried.take(range(len(sizes)))
    assert sorted([*found, *missing]) == list(range(len(sizes)))
    assert all(found[seq] is nodes for seq, nodes in added if seq in found)
    kept = len(found)
    assert set(found) == set(range(len(sizes) - kept, len(sizes)))  # the newest
    assert sum(sizes[len(sizes) - kept :]) <= bound
    if kept < len(sizes):  # the newest of those dropped would not have fitted
        assert sum(sizes[len(sizes) - kept - 1 :]) > bound
    assert len(carried) == 0
    assert carried.take(range(len(sizes))) == ({}, list(range(len(sizes))))


def _messages(traces) -> list[InMessage]:
    return [InMessage("spans", 0, i, m.value) for i, m in enumerate(to_messages(traces))]


def _by_span(nodes) -> list:
    return sorted(nodes, key=lambda node: node.span_id)


def test_the_nodes_handed_out_from_memory_are_those_of_the_span_log(tmp_path):
    path = tmp_path / "s.duckdb"
    store = EventStore(path)
    ingest(store, _messages(make_traces(80, seed=4)))
    seqs = [seq for (seq,) in store.query("SELECT seq FROM events WHERE type = ?", EXECUTION_COMPLETED)]
    assert len(store.carried) > 0
    from_memory = store.execution_nodes(seqs)
    assert len(store.carried) == 0  # taken
    from_log = store.execution_nodes(seqs)  # nothing held now: the span log
    assert set(from_memory) == set(from_log) == set(seqs)
    assert all(_by_span(from_memory[seq]) == _by_span(from_log[seq]) for seq in seqs)
    store.close()


def test_a_detector_fed_from_memory_ends_where_one_fed_from_the_log_does(tmp_path):
    messages = _messages(make_traces(300, seed=9))
    runs = []
    for fed_from_memory in (True, False):
        store = EventStore(tmp_path / f"{fed_from_memory}.duckdb")
        ingest(store, messages)
        if not fed_from_memory:
            store.carried.clear()
        stage = DetectorStage(store, lambda: FailureDetector(DetectorSettings(latency_trait=False)), batch=40)
        StageRunner(store, stage).drain()
        observed = store.query(
            "SELECT key, payload FROM events WHERE type = ? ORDER BY seq", FAILURE_OBSERVED
        )
        runs.append((observed, stage.detector.state()))
        store.close()
    assert runs[0][0]  # some failures, so the comparison means something
    assert runs[0] == runs[1]
