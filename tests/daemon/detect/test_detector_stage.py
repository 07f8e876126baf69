"""Stage 2 over a real event store: every failure observed once, nothing repeated after a restart,
feedback joined whether it comes before or after its execution."""

from __future__ import annotations

import orjson
import pytest
from otel_traces import make_traces, to_messages
from pipeline_fixtures import ingest

from cegraph.daemon.detect import inputs
from cegraph.daemon.detect.detector import FailureDetector
from cegraph.daemon.detect.stage import DETECT, DetectorStage
from cegraph.daemon.events import FAILURE_OBSERVED, MASS_OBSERVED
from cegraph.daemon.ingest.pipeline import InMessage
from cegraph.daemon.runner import StageRunner
from cegraph.daemon.settings import DetectorSettings
from cegraph.daemon.store import EventStore


def feedback(trace_id: str, offset: int, critique: str) -> InMessage:
    body = orjson.dumps({"trace_id": trace_id, "outcome": "failed", "critique": critique, "source": "user"})
    return InMessage("feedback", 0, offset, body)


def observed(store: EventStore) -> list[dict]:
    rows = store.query("SELECT payload FROM events WHERE type = ? ORDER BY seq", FAILURE_OBSERVED)
    return [orjson.loads(payload) for (payload,) in rows]


def test_failures_are_observed_once_and_a_restart_repeats_nothing(tmp_path):
    traces = make_traces(300, seed=9)
    store = EventStore(tmp_path / "s.duckdb")
    ingest(store, [InMessage("spans", 0, i, m.value) for i, m in enumerate(to_messages(traces))])
    stage = DetectorStage(store, lambda: FailureDetector(DetectorSettings()), batch=50)
    runner = StageRunner(store, stage)
    steps = []
    while (step := runner.step()) is not None and not step.passed_over:
        steps.append(step)
    assert sum(len(s.events) for s in steps) > 0
    failures = observed(store)
    failed_traces = {t.trace_id for t in traces if t.hard_failed or t.eval_failed}
    assert {f["trace_id"] for f in failures} == failed_traces
    assert len({f["failure_id"] for f in failures}) == len(failures)
    assert runner.position() == stage.cursor == store.last_seq() + 1
    # the last step read only the stage's own events: passed over, not a transaction of its own, so
    # a restart now (as after a crash) reads them again
    assert store.cursor(DETECT).position < store.last_seq() + 1
    assert store.query("SELECT count(*) FROM events WHERE type = ?", MASS_OBSERVED)[0][0] > 0

    restarted = DetectorStage(store, lambda: FailureDetector(DetectorSettings()), batch=50)
    again = StageRunner(store, restarted)
    assert again.step().passed_over  # the same stretch, and again nothing in it
    assert observed(store) == failures
    assert restarted.detector.state() == stage.detector.state()  # state rebuilt by replay
    assert runner.step() is None  # caught up: the passed-over checkpoint is stored now
    assert store.cursor(DETECT).position == store.last_seq() + 1
    runner.stop()
    store.close()


def test_feedback_before_and_after_its_execution(tmp_path):
    [early, late] = [t for t in make_traces(40, seed=3) if not (t.hard_failed or t.eval_failed)][:2]
    store = EventStore(tmp_path / "s.duckdb")
    ingest(store, [feedback(early.trace_id, 0, "answer came too early")])
    messages = to_messages([early, late])
    ingest(store, [InMessage("spans", 0, i, m.value) for i, m in enumerate(messages)])
    stage = DetectorStage(store, lambda: FailureDetector(DetectorSettings()))
    detect = StageRunner(store, stage)
    detect.drain()
    ingest(store, [feedback(late.trace_id, 1, "thumbs down")])
    detect.drain()
    sources = {(f["trace_id"], f["source"]) for f in observed(store)}
    assert sources == {(early.trace_id, "feedback"), (late.trace_id, "feedback")}
    executions = sum(state.tick for state in stage.detector.mass.versions.values())
    assert executions == 2  # late feedback is no new execution
    store.close()


@pytest.mark.parametrize("window", [1, 20_000])
def test_late_feedback_finds_its_execution_in_or_beyond_the_recent_window(tmp_path, monkeypatch, window):
    """Late feedback joins the execution it names whether the detector still holds that execution's
    place in memory or has to look it up in the log (the window smaller than the executions)."""
    monkeypatch.setattr(inputs, "RECENT_EXECUTIONS", window)
    traces = [t for t in make_traces(120, seed=5) if not (t.hard_failed or t.eval_failed)][:30]
    store = EventStore(tmp_path / "s.duckdb")
    ingest(store, [InMessage("spans", 0, i, m.value) for i, m in enumerate(to_messages(traces))])
    stage = DetectorStage(store, lambda: FailureDetector(DetectorSettings()), batch=10)
    detect = StageRunner(store, stage)
    detect.drain()
    assert observed(store) == []
    named = [traces[0], traces[14], traces[-1]]  # the oldest, a middle one and the newest
    ingest(store, [feedback(t.trace_id, i, f"wrong answer {i}") for i, t in enumerate(named)])
    detect.drain()
    failures = observed(store)
    assert sorted(f["trace_id"] for f in failures) == sorted(t.trace_id for t in named)
    assert all(f["span_id"] and f["node_id"] for f in failures)  # pointed at a node of the execution
    assert sum(state.tick for state in stage.detector.mass.versions.values()) == len(traces)
    store.close()


def test_a_batch_without_feedback_does_not_read_the_feedback_table(tmp_path):
    traces = make_traces(60, seed=4)
    store = EventStore(tmp_path / "s.duckdb")
    ingest(store, [feedback("0" * 32, 0, "for a trace that never came")])
    ingest(store, [InMessage("spans", 0, i, m.value) for i, m in enumerate(to_messages(traces))])
    asked: list[str] = []
    query_dicts = store.query_dicts
    store.query_dicts = lambda sql, *params: asked.append(sql) or query_dicts(sql, *params)
    StageRunner(store, DetectorStage(store, lambda: FailureDetector(DetectorSettings()))).drain()
    assert observed(store) and not [sql for sql in asked if "FROM feedback" in sql]
    store.close()


def test_stored_modes_show_live_modes_with_mass_and_description(tmp_path):
    from cegraph.daemon.detect.stage import stored_modes

    traces = make_traces(400, seed=12)
    store = EventStore(tmp_path / "s.duckdb")
    assert stored_modes(store) == []
    ingest(store, [InMessage("spans", 0, i, m.value) for i, m in enumerate(to_messages(traces))])
    stage = DetectorStage(store, lambda: FailureDetector(DetectorSettings()), batch=40)
    StageRunner(store, stage).drain()
    rows = stored_modes(store)
    live = {row["mode"] for row in stage.detector.modes()}
    assert {row["mode"] for row in rows} == live and live
    top = rows[0]
    assert top["mass"] == max(row["mass"] for row in rows) > 0
    assert top["workflow_id"] == "support-bot" and top["description"]["node"].startswith("support-bot/")
    store.close()


def test_merged_modes_follow_merges_both_ways_and_stop_at_cycles(tmp_path):
    """a and b merged into c, c into d, and d (re-emerged) back into a: counterexamples of c come from
    a, b and c; where a's later failures went is every mode downstream of it, each once."""
    from cegraph.daemon.detect.stage import merged_modes
    from cegraph.daemon.events import MODE_MERGED, Event

    store = EventStore(tmp_path / "s.duckdb")
    merges = [("a", "c"), ("b", "c"), ("c", "d"), ("x", "y"), ("d", "a")]
    store.append(
        [Event(MODE_MERGED, key, {"mode": key, "workflow_id": "w", "into": into}) for key, into in merges]
    )
    assert merged_modes(store, "c", forward=False) == ["a", "b", "c", "d"]
    assert merged_modes(store, "b", forward=False) == ["b"]
    assert merged_modes(store, "b", forward=True) == ["a", "b", "c", "d"]
    assert merged_modes(store, "y", forward=True) == ["y"] and merged_modes(store, "q", forward=True) == ["q"]
    store.close()


def test_a_root_whose_parent_is_in_another_service_completes_on_time(tmp_path):
    """The gateway that called this service owns the trace's root: the local root is the span whose
    parent is remote, and the execution completes after the idle timeout, not at the maximum age."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
    from otel_traces import encode

    from cegraph.connectors.otlp.codec import decoder_for

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    upstream = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                           trace_flags=TraceFlags(1))  # fmt: skip
    with (
        tracer.start_as_current_span(
            "handle request", context=set_span_in_context(NonRecordingSpan(upstream))
        ),
        tracer.start_as_current_span("chat", attributes={"gen_ai.operation.name": "chat"}),
    ):
        pass
    for encoding in ("otlp_proto", "otlp_json"):
        store = EventStore(tmp_path / f"{encoding}.duckdb")
        payload = encode(list(exporter.get_finished_spans()), encoding)
        ingest(store, [InMessage("spans", 0, 0, payload)], decode=decoder_for(encoding))
        [(complete, reason, root_name, spans)] = store.query(
            "SELECT complete, reason, root_name, span_count FROM executions"
        )
        assert (complete, reason, root_name, spans) == (True, "root-ended", "handle request", 2), encoding
        store.close()
