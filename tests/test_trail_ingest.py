"""TRAIL's real agent traces, converted to OTLP and sent through Kafka, become executions whose node
trees match the source span trees; their expert annotations arrive as feedback naming the span."""

from __future__ import annotations

from daemon_proc import Scenario

from cegraph.connectors.kafka_client import kafka_python_options
from cegraph.connectors.trail import iter_trail, publish_trail, span_id_bytes, trace_id_bytes
from cegraph.daemon.settings import KafkaSettings
from cegraph.daemon.store import EventStore


def test_trail_traces_become_executions_with_the_source_trees(kafka_bootstrap, tmp_path, trail_dataset):
    traces = [t for t in iter_trail(trail_dataset) if t.has_span_tree]
    expected = {
        trace_id_bytes(t.trace_id).hex(): {
            (
                span_id_bytes(parent.span_id).hex() if parent else "",
                span_id_bytes(span.span_id).hex(),
                span.span_name,
            )
            for span, parent in t.iter_spans()
        }
        for t in traces
    }
    annotations = sum(len(t.errors) for t in traces)
    scenario = Scenario(kafka_bootstrap, tmp_path)
    report = publish_trail(
        trail_dataset, kafka_python_options(KafkaSettings(bootstrap_servers=kafka_bootstrap)),
        scenario.spans_topic, one_trace_per_message=True, feedback_topic=scenario.feedback_topic,
    )  # fmt: skip
    assert report.traces == len(traces) == 113
    scenario.daemon.start()
    try:
        stats = scenario.daemon.wait_for(
            lambda s: s["executions"]["total"] >= len(traces) and s["feedback"] >= annotations, timeout=180
        )
    finally:
        scenario.daemon.stop()
    assert stats["dead_letters"] == 0
    assert stats["spans"] == sum(len(spans) for spans in expected.values())
    store = EventStore(scenario.store_path, read_only=True)
    try:
        stored: dict[str, set[tuple[str, str, str]]] = {}
        for trace_id, parent, span, name in store.query(
            "SELECT trace_id, parent_span_id, span_id, name FROM nodes"
        ):
            stored.setdefault(trace_id, set()).add((parent, span, name))
        kinds = dict(store.query("SELECT kind, count(*) FROM nodes GROUP BY kind"))
        located = store.query("SELECT count(*) FROM feedback f JOIN nodes n USING (trace_id, span_id)")[0][0]
    finally:
        store.close()
    assert stored == expected
    assert kinds.get("llm", 0) > 0 and kinds.get("tool", 0) > 0, kinds  # OpenInference kinds understood
    assert located == annotations  # every annotation names a stored span
