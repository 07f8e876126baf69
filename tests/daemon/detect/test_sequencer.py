"""The sequencer releases the same batches whatever the arrival order and however often ingest reports."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cegraph.daemon.detect.sequencer import Progress, Sequencer

PARTITIONS = 3


@st.composite
def streams(draw):
    """Inputs spread over partitions, each partition in event-time order (as ingest completes them),
    and one arrival order interleaving the partitions with progress reports at random points."""
    count = draw(st.integers(1, 60))
    inputs = []
    for n in range(count):
        partition = draw(st.integers(0, PARTITIONS - 1))
        workflow = draw(st.sampled_from(["a", "b"]))
        inputs.append((partition, workflow, (draw(st.integers(0, 50)), partition, f"t{n}", "")))
    by_partition = {
        p: sorted((i for i in inputs if i[0] == p), key=lambda i: i[2][0]) for p in range(PARTITIONS)
    }
    order = []
    cursors = dict.fromkeys(range(PARTITIONS), 0)
    while any(cursors[p] < len(by_partition[p]) for p in cursors):
        partition = draw(st.sampled_from([p for p in cursors if cursors[p] < len(by_partition[p])]))
        order.append(("input", by_partition[partition][cursors[partition]]))
        cursors[partition] += 1
        if draw(st.booleans()):
            order.append(("report", partition))
    return inputs, order


def run(order, batch):
    sequencer = Sequencer(batch=batch)
    latest: dict[int, int] = {}
    released = []
    for kind, value in order:
        if kind == "input":
            partition, workflow, key = value
            sequencer.add(workflow, key, key[2])
            latest[partition] = max(latest.get(partition, 0), key[0])
        else:
            sequencer.advance("spans", PARTITIONS, {value: Progress(latest.get(value, 0), False)})
        released += sequencer.ready()
    sequencer.advance("spans", PARTITIONS, {p: Progress(latest.get(p, 0), True) for p in range(PARTITIONS)})
    released += sequencer.ready()
    return released, sequencer


@settings(max_examples=200, deadline=None)
@given(streams(), st.integers(1, 7))
def test_batches_do_not_depend_on_the_arrival_order(stream, batch):
    inputs, order = stream
    released, sequencer = run(order, batch)
    assert sequencer.late == 0 and sequencer.pending() == 0
    for workflow in ("a", "b"):
        canonical = [key[2] for _, w, key in sorted(inputs, key=lambda i: i[2]) if w == workflow]
        expected = [canonical[i : i + batch] for i in range(0, len(canonical), batch)]
        assert [items for w, items in released if w == workflow] == expected


def test_nothing_closes_until_every_partition_has_reported():
    sequencer = Sequencer(batch=1)
    assert sequencer.watermark() == float("-inf")
    sequencer.add("a", (1, 0, "t1", ""), "t1")
    sequencer.advance("spans", 2, {0: Progress(10, False)})
    assert sequencer.ready() == []
    sequencer.advance("spans", 2, {1: Progress(5, False)})
    assert sequencer.ready() == [("a", ["t1"])]


def test_a_caught_up_partition_holds_nothing_back():
    sequencer = Sequencer(batch=1)
    sequencer.add("a", (4, 0, "t1", ""), "t1")
    sequencer.advance("spans", 2, {0: Progress(4, False), 1: Progress(0, True)})
    assert sequencer.ready() == []  # offset 4 of partition 0 may not be stored yet
    sequencer.advance("spans", 2, {0: Progress(5, False)})
    assert sequencer.ready() == [("a", ["t1"])]


def test_a_late_input_is_counted_and_learnt_next():
    sequencer = Sequencer(batch=1)
    sequencer.advance("spans", 1, {0: Progress(10, False)})
    sequencer.add("a", (5, 0, "t2", ""), "t2")
    assert sequencer.ready() == [("a", ["t2"])]
    sequencer.add("a", (3, 0, "t1", ""), "t1")
    assert sequencer.late == 1
    assert sequencer.ready() == [("a", ["t1"])]


def test_a_position_never_moves_back_when_a_new_owner_reports_less():
    sequencer = Sequencer(batch=1)
    sequencer.advance("spans", 1, {0: Progress(10, False)})
    sequencer.advance("spans", 1, {0: Progress(4, False)})
    assert sequencer.watermark() == 10


def test_a_stale_report_does_not_undo_a_partition_caught_up():
    """A report behind the known position (a member that lost the partition, sending late) says
    nothing of now: the partition stays caught up, so nothing waits for it for ever."""
    sequencer = Sequencer(batch=1)
    sequencer.advance("spans", 1, {0: Progress(10, True)})
    sequencer.advance("spans", 1, {0: Progress(4, False)})
    assert sequencer.watermark() == float("inf")
    sequencer.advance("spans", 1, {0: Progress(10, False)})  # same position, later: new messages came
    assert sequencer.watermark() == 10
