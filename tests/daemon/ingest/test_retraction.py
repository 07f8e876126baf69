"""Giving up what the consumer group reads again elsewhere (`IngestPipeline.give_up`), on real DuckDB
files without Kafka: two members' pipelines stand for the member that stopped reading a partition and
the partition's next owner, which reads it from the group's offset (`cut`) on.

Payloads are real SDK traces (tests/fixtures/otel_traces.py); a fake clock drives completion.
"""

from __future__ import annotations

from collections import Counter

import orjson
import pytest
from otel_traces import encode
from pipeline_fixtures import (
    IDLE,
    SPANS,
    TRACES,
    Clock,
    Topics,
    assert_landed_exactly_once,
    feed,
    pipeline_on,
    settle,
)

from cegraph.connectors.kafka.source import commit_metadata, handed_over, reread_from
from cegraph.daemon.events import EXECUTIONS_RETRACTED
from cegraph.daemon.ingest.pipeline import InMessage
from cegraph.daemon.store import EventStore


@pytest.fixture
def stores(tmp_path):
    """The stores of two members: the one giving up, and the partitions' next owner."""
    opened = [EventStore(tmp_path / "a.duckdb"), EventStore(tmp_path / "b.duckdb")]
    yield opened
    for store in opened:
        store.close()


def one_per_message(topics: Topics, traces, partitions: int = 2) -> list[InMessage]:
    return [
        topics.message(encode(t.spans, "otlp_proto"), partition=index % partitions)
        for index, t in enumerate(traces)
    ]


def from_cut(messages: list[InMessage], cut: dict[tuple[str, int], int]) -> list[InMessage]:
    """What the group hands the partitions' next owner: each partition from its cut on."""
    return [m for m in messages if m.offset >= cut.get((m.topic, m.partition), 0)]


def with_a_tail(store: EventStore, clock: Clock):
    """A member that committed 10 executions (its store's offsets then are the group's) and stored 6
    more it never committed: its pipeline, the 24 traces' messages, and the group's offsets."""
    messages = one_per_message(Topics(), TRACES[:24])
    member = pipeline_on(store, clock)
    feed(member, clock, messages[:10])
    settle(member, clock)
    cut = store.offsets()
    feed(member, clock, messages[10:16])
    settle(member, clock)
    return member, messages, cut


def executions(store: EventStore) -> Counter[str]:
    return Counter(trace_id for (trace_id,) in store.query("SELECT trace_id FROM executions"))


def retractions(store: EventStore) -> list[dict]:
    rows = store.query("SELECT payload FROM events WHERE type = ? ORDER BY seq", EXECUTIONS_RETRACTED)
    return [orjson.loads(payload) for (payload,) in rows]


def test_the_tail_past_the_commit_leaves_the_store_and_its_next_owner_stores_it_once(stores):
    a, b = stores
    traces, clock = TRACES[:24], Clock()
    _, messages, cut = with_a_tail(a, clock)  # killed now
    assert cut == {(SPANS, 0): 5, (SPANS, 1): 5}
    owner = pipeline_on(b, clock)
    feed(owner, clock, from_cut(messages, cut))
    settle(owner, clock)

    restarted = pipeline_on(a, clock)
    retracted = restarted.give_up(cut, reason="restart")

    tail = {t.trace_id for t in traces[10:16]}
    assert set(retracted) == tail
    assert executions(a) + executions(b) == Counter({t.trace_id: 1 for t in traces}), "once across the stores"
    assert set(executions(a)) == {t.trace_id for t in traces[:10]}, "nothing below the commit retracted"
    assert a.offsets() == cut, "given the partitions back, the member reads the tail again"
    stats = a.stats()
    assert stats["executions"]["total"] == 10 and stats["retracted"] == 6
    assert stats["spans"] == sum(t.span_count for t in traces[:10])
    [nodes] = a.query("SELECT count(*) FROM nodes WHERE trace_id IN (SELECT unnest(?))", sorted(tail))
    assert nodes == (0,), "a retracted execution's spans are not the store's either"
    [event] = retractions(a)
    assert event == {"topic": SPANS, "cut": {"0": 5, "1": 5}, "trace_ids": retracted, "reason": "restart"}
    registry = restarted.metrics.registry
    assert registry.get_sample_value("cegraph_ingest_retracted_executions_total", {"reason": "restart"}) == 6
    assert restarted.give_up(cut, reason="restart") == [], "giving up twice changes nothing"
    assert len(retractions(a)) == 1


def test_what_was_stored_before_the_commit_but_lies_past_it_is_given_up_too(stores):
    """A trace still open holds the committed offset back, so executions stored before the commit can
    lie past it: the next owner reads them whole, so they are given up though nothing is in doubt."""
    a, b = stores
    clock, topics = Clock(), Topics()
    waiting = [s for s in TRACES[30].spans if s.parent is not None]  # no root: open until max age
    messages = [topics.message(encode(waiting, "otlp_proto")), *one_per_message(topics, TRACES[31:35], 1)]
    member = pipeline_on(a, clock)
    member.handle(messages)
    clock.advance(IDLE * 2)
    member.flush()
    cut = a.offsets()
    assert cut == {(SPANS, 0): 0} and a.stats()["executions"]["total"] == 4

    assert set(member.give_up(cut, reason="hand-over")) == {t.trace_id for t in TRACES[31:35]}
    owner = pipeline_on(b, clock)
    feed(owner, clock, from_cut(messages, cut))
    settle(owner, clock)
    assert executions(a) + executions(b) == Counter({t.trace_id: 1 for t in TRACES[30:35]})


def test_an_execution_that_began_below_the_cut_is_kept(stores):
    """Its first spans are read again by nobody, so it stays (the next owner stores the spans it reads
    again, those past the cut, as an execution of its own: the trace in two parts, none lost). The
    offset stored goes back to the cut, never forward."""
    a, b = stores
    clock, topics = Clock(), Topics()
    split = TRACES[36]
    root = [s for s in split.spans if s.parent is None]
    rest = [s for s in split.spans if s.parent is not None]
    waiting = [s for s in TRACES[37].spans if s.parent is not None]
    messages = [
        topics.message(encode(rest, "otlp_proto")),
        topics.message(encode(TRACES[38].spans, "otlp_proto")),
        topics.message(encode(waiting, "otlp_proto")),  # holds the offset at 2
        topics.message(encode(root, "otlp_proto")),
        topics.message(encode(TRACES[39].spans, "otlp_proto"), partition=1),
        topics.message(encode(TRACES[40].spans, "otlp_proto"), partition=1),
    ]
    member = pipeline_on(a, clock)
    member.handle(messages)
    clock.advance(IDLE * 2)
    member.flush()
    assert a.offsets() == {(SPANS, 0): 2, (SPANS, 1): 2}
    cut = {(SPANS, 0): 2, (SPANS, 1): 1, (SPANS, 2): 0}  # partition 2: never read here

    assert member.give_up(cut, reason="hand-over") == [TRACES[40].trace_id]
    assert set(executions(a)) == {split.trace_id, TRACES[38].trace_id, TRACES[39].trace_id}
    assert a.execution(split.trace_id)["span_count"] == split.span_count, "kept whole"
    assert a.offsets() == {(SPANS, 0): 2, (SPANS, 1): 1}
    owner = pipeline_on(b, clock)
    feed(owner, clock, from_cut(messages, cut))
    settle(owner, clock)
    assert b.execution(split.trace_id)["span_count"] == len(root)
    assert set(executions(b)) == {split.trace_id, TRACES[37].trace_id, TRACES[40].trace_id}


@pytest.mark.parametrize("same_pipeline", [True, False], ids=["same-pipeline", "restarted"])
def test_a_member_given_the_partition_back_stores_what_it_gave_up_again_once(stores, same_pipeline):
    """Retracted executions are not "already stored" to the re-delivery check: read again, they are
    stored again, once, with their spans once."""
    a, _ = stores
    traces, clock = TRACES[:24], Clock()
    member, messages, cut = with_a_tail(a, clock)
    assert len(member.give_up(cut, reason="hand-over")) == 6
    if not same_pipeline:
        member = pipeline_on(a, clock)
    feed(member, clock, from_cut(messages, cut))
    settle(member, clock)
    assert_landed_exactly_once(a, traces)
    stats = a.stats()
    assert (stats["executions"]["total"], stats["retracted"], stats["amendments"]) == (24, 6, 0)
    assert stats["spans"] == sum(t.span_count for t in traces)


def test_rebuild_equals_live_across_retractions_of_the_same_execution(stores):
    """An execution given up twice and stored three times, amended in its first and in its last
    incarnation: the projections rebuilt from the log equal the live ones, and the store holds it once
    with its spans once."""
    a, _ = stores
    traces = TRACES[:12]
    late_trace = traces[8]
    late = late_trace.spans[-1]
    clock, topics = Clock(), Topics()
    messages = [topics.message(encode(t.spans, "otlp_proto")) for t in traces[:8]]
    messages.append(topics.message(encode([s for s in late_trace.spans if s is not late], "otlp_proto")))
    messages += [topics.message(encode(t.spans, "otlp_proto")) for t in traces[9:]]
    messages.append(topics.message(encode([late], "otlp_proto")))  # past the idle timeout: an amendment
    member = pipeline_on(a, clock)
    feed(member, clock, messages[:6])
    settle(member, clock)
    cut = a.offsets()
    for incarnation in range(3):
        feed(member, clock, from_cut(messages, cut)[:-1])
        settle(member, clock)
        feed(member, clock, messages[-1:])
        settle(member, clock)
        assert a.execution(late_trace.trace_id)["amendments"] == 1
        if incarnation < 2:
            assert late_trace.trace_id in member.give_up(cut, reason="hand-over")

    assert_landed_exactly_once(a, traces)
    stats = a.stats()
    assert stats["retracted"] == 2 * 6
    live = a.projection_digest()
    assert a.rebuild() == stats["events"]
    assert a.projection_digest() == live
    assert a.stats() == stats


@pytest.mark.parametrize(
    ("known", "committing", "group", "first", "handed", "expected"),
    [
        (40, None, 40, 0, 40, 40),  # its last commit is the group's offset still
        (40, None, 90, 0, 40, 40),  # others read on from there since
        (40, 55, 90, 0, 55, 55),  # killed after a commit took, before its cursor was written
        (40, 55, 90, 0, 40, 40),  # killed before the commit took
        (40, None, 90, 0, 12, 40),  # its commit found last is from an ownership before the last
        (40, None, 90, 0, None, 40),  # without a hand-over passed on: the last commit it knew of
        (40, 55, 55, 0, None, 55),  # ... or the one it was making, when the group holds that much
        (40, 55, 90, 0, None, 55),  # ... even if others moved on (possibly twice, never lost)
        (40, 55, 40, 0, None, 40),  # ... but not when the group holds less
        (40, 55, None, 0, None, 40),
        (55, 40, 55, 0, None, 55),  # a commit noted before an older one: not in doubt
        (None, None, 30, 0, None, 30),  # a store from before: the group's offset now, never less
        (None, None, None, 0, None, None),  # nothing says: nothing is given up
        (0, None, None, 12, None, 12),  # retention deleted the start: nobody reads it again
    ],
)
def test_where_the_group_reads_a_partition_again(known, committing, group, first, handed, expected):
    assert reread_from(known, committing, group, first, handed) == expected


def test_each_commit_passes_on_where_members_handed_the_partition_over():
    """The metadata of the commit a member finds at assignment, and its own commits' metadata after."""
    assert handed_over(None) == {} and handed_over((7, "")) == {} and handed_over((7, "not json")) == {}
    found = handed_over((40, commit_metadata("a", {})))
    assert found == {"a": 40}
    assert handed_over((90, commit_metadata("b", found))) == {"a": 40, "b": 90}
    again = handed_over((120, commit_metadata("a", {"a": 40, "b": 90})))
    assert list(again.items()) == [("b", 90), ("a", 120)], "a member's latest, the most recent last"
    many = {f"m{i}": i for i in range(20)}
    assert list(handed_over((99, commit_metadata("z", many)))) == [f"m{i}" for i in range(13, 20)] + ["z"]
