"""The ingest pipeline over a real DuckDB file, without Kafka: exactly-once in effect, end to end.

Payloads are real SDK traces (tests/fixtures/otel_traces.py); a fake clock drives completion.
Expectations come from what the traces were made of (`ExpectedTrace`), never from a previous run of the
code.
"""

from __future__ import annotations

from collections import Counter

import orjson
import pytest
from opentelemetry.trace import Status, StatusCode, Tracer
from otel_traces import ExpectedTrace, encode, record_spans, to_messages
from pipeline_fixtures import (
    FEEDBACK,
    IDLE,
    MAX_AGE,
    SPANS,
    TRACES,
    Clock,
    Topics,
    assert_landed_exactly_once,
    build_stream,
    expected_failures,
    expected_stats_hold,
    feed,
    pipeline_on,
    settle,
    unstored_messages,
)

from cegraph.daemon.ingest import pipeline as ingest
from cegraph.daemon.store import EventStore


@pytest.fixture
def store(tmp_path):
    store = EventStore(tmp_path / "cegraph.duckdb")
    yield store
    store.close()


def test_the_traces_used_have_every_kind_of_outcome():
    """The expectations below are only meaningful if the sample fails in both ways and succeeds too."""
    assert any(t.hard_failed for t in TRACES) and any(t.eval_failed for t in TRACES)
    assert any(not (t.hard_failed or t.eval_failed) for t in TRACES)


# ------------------------------------------------------------------------------------ landing


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
@pytest.mark.parametrize("one_per_message", [True, False], ids=["one-trace-per-message", "many-per-message"])
def test_every_trace_lands_exactly_once(store, encoding, one_per_message):
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock, encoding=encoding)
    payloads = to_messages(TRACES, encoding=encoding, one_trace_per_message=one_per_message, seed=3)
    messages = [topics.message(m.value, partition=i % 3) for i, m in enumerate(payloads)]
    assert feed(pipeline, clock, messages) == []
    settle(pipeline, clock)
    assert_landed_exactly_once(store, TRACES)
    stats = store.stats()
    assert stats["spans"] == sum(t.span_count for t in TRACES)
    assert stats["executions"] == {"complete": len(TRACES), "incomplete": 0, "total": len(TRACES)}
    assert stats["failures"]["from_spans"] == expected_failures(TRACES)
    assert (stats["amendments"], stats["dead_letters"], stats["feedback"]) == (0, 0, 0)
    assert store.offsets() == {(SPANS, p): topics.next[(SPANS, p)] for p in range(3)}
    workflow = store.query("SELECT DISTINCT workflow_id, workflow_version, track FROM executions")
    assert workflow == [("support-bot", "1.0.0", "stable")]


def test_the_same_message_twice_while_the_trace_is_open(store):
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock)
    payloads = to_messages(TRACES, one_trace_per_message=False, spans_per_message=4, seed=5)
    messages = [topics.message(m.value, partition=i % 2) for i, m in enumerate(payloads)]
    pipeline.handle(messages)
    pipeline.handle(messages[:25])  # re-delivered before anything completed
    settle(pipeline, clock)
    assert_landed_exactly_once(store, TRACES)
    assert store.stats()["amendments"] == 0


@pytest.mark.parametrize("same_process", [True, False], ids=["same-pipeline", "new-pipeline"])
def test_the_same_messages_again_after_they_were_stored_change_nothing(store, same_process):
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock)
    payloads = to_messages(TRACES, one_trace_per_message=False, spans_per_message=4, seed=5)
    messages = [topics.message(m.value, partition=i % 2) for i, m in enumerate(payloads)]
    messages.append(topics.feedback(TRACES[0].trace_id))
    messages.append(topics.message(b"not a trace export"))
    feed(pipeline, clock, messages)
    settle(pipeline, clock)
    before = (store.stats(), store.projection_digest())
    events = store.query("SELECT count(*) FROM events")
    if not same_process:
        pipeline = pipeline_on(store, clock)
    feed(pipeline, clock, messages)
    settle(pipeline, clock)
    assert (store.stats(), store.projection_digest()) == before
    assert store.query("SELECT count(*) FROM events") == events
    assert_landed_exactly_once(store, TRACES)


@pytest.mark.parametrize("window", [None, 2], ids=["all-recent", "past-the-recent-window"])
@pytest.mark.parametrize("same_process", [True, False], ids=["same-pipeline", "new-pipeline"])
def test_redelivery_above_the_stored_offset_changes_nothing(store, same_process, window, monkeypatch):
    """A trace still open holds the stored offset of its partition back, so the messages after it are
    read again after a restart (or a rebalance) although their traces, dead letters and feedback are
    stored: the already stored spans must be recognised, and nothing counted twice. Also when more
    traces are stored than the pipeline remembers as recent (it must then ask the store)."""
    if window is not None:
        monkeypatch.setattr(ingest, "RECENT_TRACES", window)
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock)
    waiting = [s for s in TRACES[10].spans if s.parent is not None]  # no root: open until max age
    messages = [topics.message(encode(waiting, "otlp_proto"))]
    messages += [topics.message(encode(t.spans, "otlp_proto")) for t in TRACES[11:16]]
    messages.insert(3, topics.message(b"\x0a\x02not a trace"))
    feedback = topics.feedback(TRACES[11].trace_id)
    pipeline.handle([feedback])
    pipeline.handle([feedback])  # the same feedback again, before a flush
    feed(pipeline, clock, messages)
    clock.advance(IDLE * 2)
    pipeline.flush()
    assert store.offsets()[(SPANS, 0)] == 0, "the open trace holds the offset back"
    before = store.stats()
    assert (before["executions"]["total"], before["dead_letters"], before["feedback"]) == (5, 1, 1)
    if not same_process:
        pipeline = pipeline_on(store, clock)
    letters = feed(pipeline, clock, [*messages, feedback])  # from the stored offset on
    assert letters == [], "already dead-lettered: not sent to the dead-letter topic again"
    settle(pipeline, clock)
    after = store.stats()
    assert_landed_exactly_once(store, TRACES[11:16], others=1)
    assert (after["dead_letters"], after["feedback"], after["amendments"]) == (1, 1, 0)
    assert after["spans"] == sum(t.span_count for t in TRACES[11:16]) + len(waiting)
    assert after["executions"] == {"complete": 5, "incomplete": 1, "total": 6}


# ------------------------------------------------------------------------------------ late spans


def _trace_with_one_failing_span() -> tuple[ExpectedTrace, int]:
    for trace in TRACES:
        failing = [i for i, s in enumerate(trace.spans) if s.status.status_code is StatusCode.ERROR]
        if trace.hard_failed and not trace.eval_failed and len(failing) == 1:
            return trace, failing[0]
    raise AssertionError("no trace with exactly one failing span in the sample")


@pytest.mark.parametrize("restart", [False, True], ids=["same-pipeline", "after-restart"])
def test_a_late_span_becomes_an_amendment(store, restart):
    trace, failing = _trace_with_one_failing_span()
    early = [s for i, s in enumerate(trace.spans) if i != failing]
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock)
    feed(pipeline, clock, [topics.message(encode(early, "otlp_proto"))])
    settle(pipeline, clock)
    [row] = store.query_dicts("SELECT * FROM executions")
    assert (row["span_count"], row["hard_failed"], row["complete"]) == (trace.span_count - 1, False, True)

    if restart:
        pipeline = pipeline_on(store, clock)
    feed(pipeline, clock, [topics.message(encode([trace.spans[failing]], "otlp_proto"))])
    settle(pipeline, clock)
    [row] = store.query_dicts("SELECT * FROM executions")
    assert (row["span_count"], row["hard_failed"], row["amendments"]) == (trace.span_count, True, 1)
    assert row["failed_nodes"] == 1
    stats = store.stats()
    assert stats["amendments"] == 1 and stats["spans"] == trace.span_count
    amended = store.query("SELECT span_id FROM nodes WHERE amended")
    assert amended == [(format(trace.spans[failing].context.span_id, "016x"),)]
    assert_landed_exactly_once(store, [trace])
    assert store.offsets() == {(SPANS, 0): 2}


def test_eviction_and_reopening_in_one_batch_still_stores_each_trace_once(store):
    """With `max_open` reached, a trace can be evicted, reopened by its next spans and evicted again
    before a flush: it must become one execution (plus amendments), not two."""
    first, second = TRACES[0], TRACES[1]
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock, max_open=1)
    halves = []
    for trace in (first, second):
        middle = len(trace.spans) // 2
        halves.append((trace.spans[:middle], trace.spans[middle:]))
    order = [halves[0][0], halves[1][0], halves[0][1], halves[1][1]]
    messages = [topics.message(encode(spans, "otlp_proto")) for spans in order]
    # Each message evicts the other trace; the last two are re-deliveries, so the first trace
    # leaves the assembler three times before the flush, twice with the same second half.
    pipeline.handle([*messages, *messages[2:]])
    pipeline.flush()
    settle(pipeline, clock)
    rows = store.query_dicts("SELECT trace_id, span_count FROM executions")
    assert Counter(r["trace_id"] for r in rows) == Counter({first.trace_id: 1, second.trace_id: 1})
    assert {r["trace_id"]: r["span_count"] for r in rows} == {
        first.trace_id: first.span_count,
        second.trace_id: second.span_count,
    }
    assert store.stats()["spans"] == first.span_count + second.span_count
    assert store.offsets() == {(SPANS, 0): 4}


def test_max_open_evicts_as_incomplete_and_later_spans_amend(store):
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock, max_open=2)
    rootless = [s for s in TRACES[2].spans if s.parent is not None]
    root = [s for s in TRACES[2].spans if s.parent is None]
    feed(pipeline, clock, [topics.message(encode(rootless, "otlp_proto"))])
    others = [topics.message(encode(t.spans, "otlp_proto")) for t in TRACES[3:5]]
    feed(pipeline, clock, others)  # two more open traces: the oldest (rootless) is evicted
    assert pipeline.metrics.registry.get_sample_value("cegraph_ingest_evicted_traces_total") == 1
    stats = store.stats()
    assert stats["executions"]["incomplete"] == 1
    feed(pipeline, clock, [topics.message(encode(root, "otlp_proto"))])
    settle(pipeline, clock)
    assert_landed_exactly_once(store, TRACES[3:5], others=1)
    row = store.query_dicts("SELECT * FROM executions WHERE trace_id = ?", TRACES[2].trace_id)[0]
    # the root arrived late, as an amendment: it completes the execution and names its root
    assert (row["complete"], row["reason"]) == (True, "evicted")
    assert row["root_span_id"] == format(root[0].context.span_id, "016x") and row["root_name"] == root[0].name
    assert row["start_ns"] == min(s.start_time for s in TRACES[2].spans)
    assert (row["span_count"], row["amendments"]) == (TRACES[2].span_count, 1)


def test_a_rootless_trace_completes_at_max_age_as_incomplete(store):
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock)
    rootless = [s for s in TRACES[5].spans if s.parent is not None]
    feed(pipeline, clock, [topics.message(encode(rootless, "otlp_proto"))])
    clock.advance(MAX_AGE / 2)
    pipeline.flush()
    assert store.stats()["executions"]["total"] == 0, "neither ended root nor max age yet"
    clock.advance(MAX_AGE / 2)
    pipeline.flush()
    [row] = store.query_dicts("SELECT * FROM executions")
    assert (row["complete"], row["reason"], row["span_count"]) == (False, "max-age", len(rootless))
    assert row["root_span_id"] == ""
    assert store.stats()["executions"] == {"complete": 0, "incomplete": 1, "total": 1}


# ------------------------------------------------------------------------------------ feedback


def _clean_traces(count: int) -> list[ExpectedTrace]:
    clean = [t for t in TRACES if not (t.hard_failed or t.eval_failed)]
    assert len(clean) >= count
    return clean[:count]


def test_feedback_before_and_after_the_execution(store):
    before, after, passed = _clean_traces(3)
    failing = next(t for t in TRACES if t.hard_failed)
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock)
    feed(pipeline, clock, [topics.feedback(before.trace_id, critique="the total is wrong", score=0.1)])
    assert store.stats()["feedback"] == 1, "stored although its execution is not there yet"
    spans = [topics.message(encode(t.spans, "otlp_proto")) for t in (before, after, passed, failing)]
    feed(pipeline, clock, spans)
    settle(pipeline, clock)
    span_id = format(after.spans[0].context.span_id, "016x")
    feed(
        pipeline,
        clock,
        [
            topics.feedback(after.trace_id, span_id=span_id.upper(), source="annotation"),
            topics.feedback(passed.trace_id, outcome="passed"),
            topics.feedback(failing.trace_id),  # already failed by its spans: not counted again
        ],
    )
    settle(pipeline, clock)
    stats = store.stats()
    assert stats["feedback"] == 4
    assert stats["failures"]["from_spans"] == 1
    assert stats["failures"]["from_feedback_only"] == 2
    assert stats["failures"]["executions_failed"] == 3
    rows = store.query_dicts("SELECT * FROM feedback ORDER BY seq")
    assert [(r["trace_id"], r["outcome"]) for r in rows] == [
        (before.trace_id, "failed"),
        (after.trace_id, "failed"),
        (passed.trace_id, "passed"),
        (failing.trace_id, "failed"),
    ]
    assert (rows[0]["critique"], rows[0]["score"], rows[0]["source"]) == ("the total is wrong", 0.1, "user")
    assert (rows[1]["span_id"], rows[1]["source"]) == (span_id, "annotation")
    assert store.offsets()[(FEEDBACK, 0)] == 4


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "invalid feedback"),
        (b'{"trace_id": "0af7651916cd43dd8448eb211c80319c"}', "outcome"),
        (b'{"trace_id": "xyz", "outcome": "failed"}', "trace_id"),
        (b'{"trace_id": "0af7651916cd43dd8448eb211c80319c", "outcome": "meh"}', "outcome"),
        (
            b'{"trace_id": "0af7651916cd43dd8448eb211c80319c", "outcome": "failed", "span_id": "12"}',
            "span_id",
        ),
        (b'{"trace_id": "0af7651916cd43dd8448eb211c80319c", "outcome": "failed", "extra": 1}', "extra"),
        (b"[]", "invalid feedback"),
    ],
)
def test_bad_feedback_is_dead_lettered_with_a_reason(store, body, fragment):
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock)
    message = topics.message(body, topic=FEEDBACK)
    [letter] = feed(pipeline, clock, [message])
    assert letter.message is message
    assert letter.reason.startswith("invalid feedback") and fragment in letter.reason
    stats = store.stats()
    assert (stats["dead_letters"], stats["feedback"]) == (1, 0)
    assert store.offsets() == {(FEEDBACK, 0): 1}, "consumption moves past it"
    [(payload,)] = store.query("SELECT payload FROM events WHERE type = 'MessageDeadLettered'")
    assert orjson.loads(payload)["reason"] == letter.reason


def test_undecodable_spans_are_dead_lettered_and_good_ones_around_them_land(store):
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock)
    payloads = [encode(t.spans, "otlp_proto") for t in TRACES[:4]]
    payloads[1] = payloads[1][:40]  # truncated
    letters = feed(pipeline, clock, [topics.message(payload) for payload in payloads])
    settle(pipeline, clock)
    assert [(letter.message.offset, bool(letter.reason)) for letter in letters] == [(1, True)]
    assert_landed_exactly_once(store, [TRACES[0], *TRACES[2:4]])
    assert store.stats()["dead_letters"] == 1
    assert store.offsets() == {(SPANS, 0): 4}


def _token_heavy(tracer: Tracer) -> None:
    with tracer.start_as_current_span("root"):
        for name in ("first", "second", "late"):
            with tracer.start_as_current_span(name, attributes={"gen_ai.usage.input_tokens": 2**63 - 1}):
                pass


def test_token_totals_past_int64_saturate_instead_of_failing_the_flush(store):
    """A span may report any int64 count; the executions row sums them, first at completion and again
    when a late span amends it. Either sum past int64's end used to fail the flush and stall ingest."""
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock)
    spans = record_spans(_token_heavy)
    [late] = [s for s in spans if s.name == "late"]
    feed(pipeline, clock, [topics.message(encode([s for s in spans if s is not late], "otlp_proto"))])
    settle(pipeline, clock)
    assert store.query("SELECT input_tokens FROM executions") == [(2**63 - 1,)]
    feed(pipeline, clock, [topics.message(encode([late], "otlp_proto"))])
    settle(pipeline, clock)
    assert store.query("SELECT input_tokens, amendments, span_count FROM executions") == [(2**63 - 1, 1, 4)]
    assert store.offsets() == {(SPANS, 0): 2}, "both messages are consumed"


# ------------------------------------------------------------------------------------ rebuild


def _odd_scores(tracer: Tracer) -> None:
    with tracer.start_as_current_span("root") as root:
        root.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.score.value": float("-inf")})
        with tracer.start_as_current_span("child", attributes={"gen_ai.usage.input_tokens": 1e30}) as child:
            child.set_status(Status(StatusCode.ERROR, "boom"))


def test_rebuild_equals_the_live_projections(store):
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock, max_open=8)
    traces = TRACES[:30]
    late = traces[0].spans[0]
    early = [topics.message(encode([s for s in traces[0].spans if s is not late], "otlp_proto"))]
    payloads = to_messages(traces[1:20], one_trace_per_message=False, spans_per_message=3, seed=9)
    rest = [topics.message(m.value, partition=i % 2) for i, m in enumerate(payloads)]
    halves = [t.spans[: len(t.spans) // 2] for t in traces[20:30]]
    halves += [t.spans[len(t.spans) // 2 :] for t in traces[20:30]]
    split = [topics.message(encode(spans, "otlp_proto")) for spans in halves]
    feed(pipeline, clock, [*early, topics.feedback(traces[1].trace_id)])
    # Ten first halves, then ten second halves, in one batch with max_open=8: some traces are
    # evicted incomplete and reopened by their second half, which then amends them.
    feed(pipeline, clock, split, batch=len(split))
    feed(pipeline, clock, rest)
    settle(pipeline, clock)
    feed(pipeline, clock, [topics.message(encode([late], "otlp_proto")), topics.feedback(traces[0].trace_id)])
    feed(pipeline, clock, [topics.message(encode(record_spans(_odd_scores), "otlp_proto"))])
    feed(pipeline, clock, [topics.message(b"\x00garbage"), topics.message(b"{}", topic=FEEDBACK)])
    settle(pipeline, clock)
    stats = store.stats()
    assert stats["amendments"] >= 3 and stats["executions"]["incomplete"] >= 2
    assert stats["feedback"] == 2 and stats["dead_letters"] == 2

    live = store.projection_digest()
    assert store.rebuild() == stats["events"]
    assert store.projection_digest() == live
    # The digest is sensitive to a change, and a rebuild repairs the change from the events.
    store.query("UPDATE executions SET span_count = span_count + 1 WHERE trace_id = ?", traces[3].trace_id)
    store.query("DELETE FROM feedback WHERE trace_id = ?", traces[1].trace_id)
    tampered = store.projection_digest()
    assert tampered["executions"] != live["executions"] and tampered["feedback"] != live["feedback"]
    store.rebuild()
    assert store.projection_digest() == live
    assert store.stats() == stats


# ------------------------------------------------------------------------------------ crashes


def test_the_stream_without_a_crash(tmp_path):
    stream = build_stream("otlp_proto")
    store = EventStore(tmp_path / "cegraph.duckdb")
    clock = Clock()
    pipeline = pipeline_on(store, clock)
    feed(pipeline, clock, stream.messages)
    settle(pipeline, clock)
    expected_stats_hold(store, stream)
    store.close()


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
@pytest.mark.parametrize("crashes", [[3], [7, 8], [1, 5, 12]], ids=lambda c: f"crashes-{c}")
@pytest.mark.parametrize("replay_from", ["stored-offsets", "zero"])
def test_crash_and_replay_loses_nothing_and_doubles_nothing(tmp_path, encoding, crashes, replay_from):
    """Each run handles and flushes some batches, then handles one more without flushing and dies.
    The next run opens the same DuckDB file and replays from the stored offsets (or from 0)."""
    stream = build_stream(encoding)
    path = tmp_path / "cegraph.duckdb"
    clock = Clock()
    pending = stream.messages
    skipped = 0
    for batches in crashes:
        store = EventStore(path)
        pipeline = pipeline_on(store, clock, encoding=encoding)
        feed(pipeline, clock, pending[: batches * 6])
        pipeline.handle(pending[batches * 6 : batches * 6 + 6])  # consumed, never flushed
        store.close()  # the process is gone; only what was committed remains
        store = EventStore(path)
        offsets = store.offsets() if replay_from == "stored-offsets" else {}
        store.close()
        pending = unstored_messages(stream, offsets)
        skipped += len(stream.messages) - len(pending)
    assert (skipped > 0) is (replay_from == "stored-offsets"), "the stored offsets let the replay skip"
    store = EventStore(path)
    pipeline = pipeline_on(store, clock, encoding=encoding)
    feed(pipeline, clock, pending)
    settle(pipeline, clock)
    expected_stats_hold(store, stream)
    live = store.projection_digest()
    store.rebuild()
    assert store.projection_digest() == live
    store.close()
