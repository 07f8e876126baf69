"""Trace assembly and the safe-offset bookkeeping, with an explicit clock.

Nodes come from real SDK traces (recorded, encoded, decoded, normalized), so roots, parents and end
times are what the daemon sees; only the arrival order and timing are chosen by the tests.
"""

from __future__ import annotations

import dataclasses
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from otel_traces import encode, make_traces

from cegraph.connectors.otlp.codec import decode_proto
from cegraph.daemon.ingest.assembly import PendingOffsets, TraceAssembler
from cegraph.daemon.ingest.normalize import TextPolicy, normalize
from cegraph.daemon.spans import Node

IDLE, MAX_AGE = 5.0, 60.0
TRACES = make_traces(8, seed=101)


def nodes_of(index: int) -> list[Node]:
    return [normalize(r, TextPolicy()) for r in decode_proto(encode(TRACES[index].spans, "otlp_proto"))]


def root_of(nodes: list[Node]) -> Node:
    [root] = [n for n in nodes if not n.parent_span_id]
    return root


def assembler(max_open: int = 100) -> TraceAssembler:
    return TraceAssembler(idle_timeout_s=IDLE, max_age_s=MAX_AGE, max_open=max_open)


def ref(offset: int, partition: int = 0) -> tuple[str, int, int]:
    return ("spans", partition, offset)


def test_out_of_order_spans_children_before_root():
    nodes = nodes_of(0)
    root = root_of(nodes)
    children = [n for n in nodes if n is not root]
    random.Random(1).shuffle(children)
    a = assembler()
    holds, evicted = a.add([*children, root], ref(0), now=100.0)
    assert (holds, evicted) == (1, [])
    assert a.poll(100.0 + IDLE - 0.01) == []
    [done] = a.poll(100.0 + IDLE)
    assert (done.trace_id, done.complete, done.reason) == (TRACES[0].trace_id, True, "root-ended")
    assert {n.span_id for n in done.nodes} == {n.span_id for n in nodes}
    assert [n.start_ns for n in done.nodes] == sorted(n.start_ns for n in nodes), "in execution order"
    assert done.messages == {ref(0)}
    assert len(a) == 0 and not a.is_open(done.trace_id)


def test_spans_of_one_trace_over_several_messages():
    nodes = nodes_of(1)
    random.Random(2).shuffle(nodes)
    parts = [nodes[:2], nodes[2:4], nodes[4:]]
    a = assembler()
    for offset, (part, now) in enumerate(zip(parts, (0.0, 3.0, 6.0), strict=True)):
        holds, _ = a.add(part, ref(offset), now=now)
        assert holds == 1
        assert a.poll(now) == []
    # The idle clock restarts with every arrival: 5 s after the first message is not enough.
    assert a.poll(6.0 + IDLE - 0.01) == []
    [done] = a.poll(6.0 + IDLE)
    assert len(done.nodes) == len(nodes) == TRACES[1].span_count
    assert done.messages == {ref(0), ref(1), ref(2)}


def test_completion_needs_the_root_ended_and_the_idle_timeout():
    nodes = nodes_of(2)
    root = root_of(nodes)
    children = [n for n in nodes if n is not root]
    a = assembler()
    a.add(children, ref(0), now=0.0)
    assert a.poll(IDLE * 3) == [], "idle, but the root has not been seen"
    a.add([root], ref(1), now=20.0)
    assert a.poll(20.0 + IDLE / 2) == [], "the root ended, but not idle long enough"
    [done] = a.poll(20.0 + IDLE)
    assert done.complete and len(done.nodes) == len(nodes)


def test_an_unended_root_does_not_complete_the_trace():
    nodes = nodes_of(3)
    root = root_of(nodes)
    open_root = dataclasses.replace(root, end_ns=0)
    a = assembler()
    a.add([open_root, *[n for n in nodes if n is not root]], ref(0), now=0.0)
    assert a.poll(IDLE * 2) == []
    a.add([root], ref(1), now=IDLE * 2)  # the ended root arrives (the exporter sends ended spans)
    [done] = a.poll(IDLE * 3)
    assert done.complete


def test_max_age_completes_a_rootless_trace_as_incomplete():
    nodes = [n for n in nodes_of(4) if n.parent_span_id]
    a = assembler()
    a.add(nodes[:1], ref(0), now=0.0)
    for step in range(1, 12):  # keeps arriving, so it is never idle
        a.add(nodes[step % len(nodes) : step % len(nodes) + 1], ref(step), now=step * 5.0)
        assert a.poll(step * 5.0) == []
    [done] = a.poll(MAX_AGE)
    assert (done.complete, done.reason) == (False, "max-age")
    assert {n.span_id for n in done.nodes} == {n.span_id for n in nodes}
    assert len(done.messages) == 12


def test_max_age_completes_a_busy_trace_with_its_root_as_complete():
    nodes = nodes_of(5)
    a = assembler()
    for step in range(13):
        a.add(nodes, ref(step), now=step * 5.0)
    [done] = a.poll(MAX_AGE)
    assert (done.complete, done.reason) == (True, "max-age")


def test_the_age_bookkeeping_stays_proportional_to_the_open_traces():
    """Traces that complete leave the age heap long before `max_age_s` passes (at a few thousand
    traces a second it held every trace of the last minutes), and a long-lived trace among them is
    still completed by its age."""
    busy = [n for n in nodes_of(6) if n.parent_span_id]
    template = nodes_of(7)
    a = assembler(max_open=100_000)
    a.add(busy[:1], ref(0), now=0.0)
    for step in range(1, 5_001):
        now = step * 0.01
        trace_id = f"{step:032x}"
        a.add([dataclasses.replace(n, trace_id=trace_id) for n in template], ref(step), now=now)
        a.add(busy[step % len(busy) : step % len(busy) + 1], ref(step), now=now)  # never idle
        completed = a.poll(now)
        assert all(done.reason == "root-ended" for done in completed)
        assert len(a._by_age) <= 2 * len(a) + 1024
    [done] = [d for d in a.poll(MAX_AGE) if d.trace_id == busy[0].trace_id]
    assert (done.complete, done.reason) == (False, "max-age")


def test_max_open_evicts_the_least_recently_updated_trace():
    first, second, third = nodes_of(0), nodes_of(1), nodes_of(2)
    a = assembler(max_open=2)
    assert a.add(first[:1], ref(0), now=0.0) == (1, [])
    assert a.add(second[:1], ref(1), now=1.0) == (1, [])
    a.add(first[1:2], ref(2), now=2.0)  # the first trace is now the most recently updated
    holds, [evicted] = a.add(third, ref(3), now=3.0)
    assert holds == 1
    assert (evicted.trace_id, evicted.complete, evicted.reason) == (TRACES[1].trace_id, False, "evicted")
    assert [n.span_id for n in evicted.nodes] == [second[0].span_id]
    assert evicted.messages == {ref(1)}
    assert len(a) == 2 and a.is_open(TRACES[0].trace_id) and a.is_open(TRACES[2].trace_id)


def test_holds_count_traces_per_message_once():
    mixed = nodes_of(0) + nodes_of(1) + nodes_of(2)
    random.Random(3).shuffle(mixed)
    a = assembler()
    assert a.add(mixed, ref(0), now=0.0)[0] == 3
    assert a.add(mixed, ref(0), now=0.5)[0] == 0, "the same message again holds nothing new"
    assert a.add(nodes_of(0)[:1], ref(1), now=1.0)[0] == 1
    done = a.poll(1.0 + IDLE)
    assert {d.trace_id for d in done} == {t.trace_id for t in TRACES[:3]}
    assert sum(len(d.nodes) for d in done) == sum(t.span_count for t in TRACES[:3]), "no span twice"


def test_drain_hands_out_everything_open():
    a = assembler()
    a.add(nodes_of(6), ref(0), now=0.0)
    a.add([n for n in nodes_of(7) if n.parent_span_id], ref(1), now=0.0)
    drained = {d.trace_id: d for d in a.drain()}
    assert drained[TRACES[6].trace_id].complete and not drained[TRACES[7].trace_id].complete
    assert len(a) == 0


# ------------------------------------------------------------------------------------ PendingOffsets


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_committable_offsets_never_pass_an_unpersisted_message(data):
    """Random interleavings of consumption (in offset order per partition) and persistence.

    A model keeps, per consumed message, the traces that hold it. The committable offset of each
    partition must equal the smallest offset whose message still has an unpersisted trace (never
    more: that would lose it on a restart; not less: that re-reads for nothing), or the next offset
    past the last consumed message once none does.
    """
    partitions = data.draw(st.integers(1, 3), label="partitions")
    per_partition = [data.draw(st.integers(1, 8), label=f"messages in {p}") for p in range(partitions)]
    base = [data.draw(st.integers(0, 1_000), label=f"first offset of {p}") for p in range(partitions)]
    traces = data.draw(st.integers(1, 6), label="trace ids")
    pending = PendingOffsets()
    consumed = [0] * partitions  # messages consumed per partition
    holders: dict[int, set[tuple[str, int, int]]] = {}  # open trace object -> messages it holds
    unpersisted: dict[tuple[str, int, int], set[int]] = {}  # message -> open trace objects holding it
    open_by_trace: dict[int, int] = {}  # trace id -> its open trace object
    objects = 0

    def check() -> None:
        committable = pending.committable()
        for p in range(partitions):
            if consumed[p] == 0:
                assert ("spans", p) not in committable
                continue
            waiting = [r[2] for r, held in unpersisted.items() if r[1] == p and held]
            expected = min(waiting) if waiting else base[p] + consumed[p]
            assert committable[("spans", p)] == expected

    while True:
        can_consume = [p for p in range(partitions) if consumed[p] < per_partition[p]]
        actions = (["consume"] if can_consume else []) + (["persist"] if holders else [])
        if not actions:
            break
        if data.draw(st.sampled_from(actions)) == "consume":
            p = data.draw(st.sampled_from(can_consume))
            message = ("spans", p, base[p] + consumed[p])
            consumed[p] += 1
            redelivered = data.draw(st.booleans()) and consumed[p] > 1
            touched = data.draw(st.sets(st.integers(0, traces - 1), max_size=traces))
            new_holds = 0
            for trace in touched:
                if trace not in open_by_trace:  # a new (or, after persistence, a re-opened) trace
                    open_by_trace[trace] = objects
                    holders[objects] = set()
                    objects += 1
                obj = open_by_trace[trace]
                if message not in holders[obj]:
                    holders[obj].add(message)
                    unpersisted.setdefault(message, set()).add(obj)
                    new_holds += 1
            pending.consumed(message, new_holds)
            if redelivered:  # the same message handled again: nothing new holds it
                pending.consumed(message, 0)
        else:
            obj = data.draw(st.sampled_from(sorted(holders)))
            messages = holders.pop(obj)
            open_by_trace = {t: o for t, o in open_by_trace.items() if o != obj}
            for message in messages:
                unpersisted[message].discard(obj)
            pending.released(messages)
        check()
    assert pending.committable() == {("spans", p): base[p] + per_partition[p] for p in range(partitions)}


def test_pending_offsets_through_the_assembler():
    """The holds the assembler reports and the messages it hands back make the watermark right."""
    a = assembler()
    pending = PendingOffsets()
    t0, t1 = nodes_of(0), nodes_of(1)
    messages = [(ref(0), t0[:2]), (ref(1), t1), (ref(2), t0[2:])]
    for message, nodes in messages:
        pending.consumed(message, a.add(nodes, message, now=0.0)[0])
    pending.consumed(ref(3), 0)  # e.g. a dead letter: nothing to wait for
    assert pending.committable() == {("spans", 0): 0}
    for done in a.poll(IDLE):
        pending.released(done.messages)
    assert pending.committable() == {("spans", 0): 4}


def test_forgetting_revoked_partitions():
    pending = PendingOffsets()
    pending.consumed(ref(5, partition=0), 1)
    pending.consumed(ref(7, partition=1), 1)
    pending.forget_partitions({("spans", 0)})
    assert pending.committable() == {("spans", 1): 7}
