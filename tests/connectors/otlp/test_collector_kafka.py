"""SDK -> OTLP/HTTP and OTLP/gRPC -> the real OpenTelemetry Collector -> the real broker -> `cegraph run`.

Nothing here encodes a Kafka message itself: the SDK's OTLP exporters send to the Collector built from
ops/otel-collector/manifest.yaml, running the shipped collector.yaml (addresses and topics changed),
and its kafkaexporter writes the topics that cegraph, a separate process, consumes. Every variant of
encoding x partitioning must store every execution whole: span count, tree and failure flags.
"""

from __future__ import annotations

import pytest
from collector_tier import (
    COLLECTOR_SERIES,
    CollectorRun,
    messages_per_trace,
    metric_names,
    metric_sum,
    send_spans,
    wait_until,
)
from opentelemetry.sdk.trace import ReadableSpan
from otel_traces import ExpectedTrace, make_traces, record_spans

from cegraph.connectors.otlp.codec import decoder_for

pytestmark = pytest.mark.long(minutes=1)

EXECUTIONS = 240


def span_tree(spans: list[ReadableSpan]) -> set[tuple[str, str, str]]:
    return {
        (format(s.context.span_id, "016x"), format(s.parent.span_id, "016x") if s.parent else "", s.name)
        for s in spans
    }


def stored_tree(execution: dict) -> set[tuple[str, str, str]]:
    return {(n["span_id"], n["parent_span_id"], n["name"]) for n in execution["nodes"]}


def assert_stored_whole(store, traces: list[ExpectedTrace]) -> None:
    for trace in traces:
        execution = store.execution(trace.trace_id)
        assert execution is not None, f"execution {trace.trace_id} was not stored"
        assert execution["complete"] and execution["span_count"] == trace.span_count
        assert stored_tree(execution) == span_tree(trace.spans)
        assert (execution["hard_failed"], execution["eval_failed"]) == (trace.hard_failed, trace.eval_failed)


@pytest.mark.parametrize("partition_traces_by_id", [True, False], ids=["by-trace-id", "mixed"])
@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_every_execution_arrives_whole_through_the_collector(
    kafka_bootstrap, tmp_path, start_collector, encoding, partition_traces_by_id
):
    run = CollectorRun(
        kafka_bootstrap,
        tmp_path,
        start_collector,
        encoding=encoding,
        partition_traces_by_id=partition_traces_by_id,
    )
    traces = make_traces(EXECUTIONS, seed=17)
    half = EXECUTIONS // 2
    send_spans([s for t in traces[:half] for s in t.spans], protocol="http", collector=run.collector)
    send_spans([s for t in traces[half:] for s in t.spans], protocol="grpc", collector=run.collector)
    spans = sum(t.span_count for t in traces)
    wait_until(lambda: run.sent_spans() >= spans, "the Collector to write every span to Kafka")

    def stored_all_or_dead_lettered(s: dict) -> bool:
        return (s["spans"] >= spans and s["executions"]["complete"] >= EXECUTIONS) or s["dead_letters"] > 0

    stats = run.daemon.wait_for(stored_all_or_dead_lettered, timeout=180)
    assert stats["dead_letters"] == 0 and stats["spans"] == spans
    assert stats["executions"] == {"complete": EXECUTIONS, "incomplete": 0, "total": EXECUTIONS}
    failed = sum(t.hard_failed or t.eval_failed for t in traces)
    assert 0 < failed < EXECUTIONS and stats["failures"]["executions_failed"] == failed
    assert_stored_whole(run.stored(), traces)
    per_trace = messages_per_trace(kafka_bootstrap, run.scenario.spans_topic, decoder_for(encoding))
    assert set(per_trace) == {t.trace_id for t in traces}
    if partition_traces_by_id:  # each message is one trace (a trace may still be split over several)
        print(f"traces the Collector split over messages: {sum(n > 1 for n in per_trace.values())}")


def test_a_trace_the_collector_splits_over_messages_is_one_execution(
    kafka_bootstrap, tmp_path, start_collector
):
    """The batch processor splits a trace when its spans reach the Collector in different exports.
    Forced here both ways: the children first (the trace waits for its root), and the root first (the
    execution is stored, then amended by the children)."""
    run = CollectorRun(
        kafka_bootstrap, tmp_path, start_collector, encoding="otlp_proto", partition_traces_by_id=True,
        CEGRAPH_INGEST__MAX_TRACE_AGE_S="600",
    )  # fmt: skip
    traces = make_traces(20, seed=3)
    children_first, root_first = traces[:10], traces[10:]

    def roots(group):
        return [s for t in group for s in t.spans if s.parent is None]

    def children(group):
        return [s for t in group for s in t.spans if s.parent is not None]

    send_spans(children(children_first), protocol="http", collector=run.collector)
    send_spans(roots(root_first), protocol="grpc", collector=run.collector)
    sent = len(children(children_first)) + len(roots(root_first))
    wait_until(lambda: run.sent_spans() >= sent, "the first halves to reach Kafka")
    run.daemon.wait_for(lambda s: s["executions"]["complete"] >= len(root_first), timeout=120)
    send_spans(roots(children_first), protocol="grpc", collector=run.collector)
    send_spans(children(root_first), protocol="http", collector=run.collector)
    spans = sum(t.span_count for t in traces)
    stats = run.daemon.wait_for(lambda s: s["spans"] >= spans and s["executions"]["complete"] >= 20)
    assert stats["spans"] == spans and stats["executions"]["incomplete"] == 0
    assert stats["amendments"] == len(root_first)  # the root-first executions, amended once each
    assert_stored_whole(run.stored(), traces)
    per_trace = messages_per_trace(kafka_bootstrap, run.scenario.spans_topic, decoder_for("otlp_proto"))
    assert all(per_trace[t.trace_id] >= 2 for t in traces)


def oversize_trace(attribute_bytes: int, children: int) -> ExpectedTrace:
    def build(tracer):
        with tracer.start_as_current_span(
            "invoke_workflow", attributes={"gen_ai.operation.name": "invoke_workflow"}
        ):
            for index in range(children):
                with tracer.start_as_current_span(
                    f"chat step{index}",
                    attributes={"gen_ai.operation.name": "chat", "input.value": "x" * attribute_bytes},
                ):
                    pass

    spans = record_spans(build, resource={"service.name": "support-bot"})
    return ExpectedTrace(format(spans[0].context.trace_id, "032x"), len(spans), set(), False, False, spans)


def test_a_trace_over_max_message_bytes_is_dropped_by_the_collector_and_says_so(
    kafka_bootstrap, tmp_path, start_collector
):
    """cegraph never sees such a trace: the kafkaexporter drops it (a permanent MESSAGE_TOO_LARGE).
    What the operator sees is the Collector's error log and its failed-record count, which the
    `CegraphCollectorDroppedTraces` alert of ops/prometheus reads. Its send-failed span count says more
    was lost than was: it counts every span of the export, though only the big trace's record failed."""
    run = CollectorRun(
        kafka_bootstrap, tmp_path, start_collector, encoding="otlp_proto", partition_traces_by_id=True
    )
    big = oversize_trace(attribute_bytes=30_000, children=40)  # ~1.2 MB encoded, over the 1,000,000 set
    traces = make_traces(30, seed=5)
    send_spans(
        [s for t in traces[:15] for s in t.spans] + big.spans, protocol="http", collector=run.collector
    )
    send_spans([s for t in traces[15:] for s in t.spans], protocol="http", collector=run.collector)

    def failed_records() -> float:
        return metric_sum(run.collector_metrics(), "otelcol_kafka_exporter_records", outcome="failure")

    assert wait_until(failed_records, "the Collector to count the dropped record") == 1
    assert metric_names(run.collector_metrics()) >= COLLECTOR_SERIES  # what the alert rule reads

    def failed_spans() -> float:  # the exporter's own count, which the Collector records a moment later
        return metric_sum(run.collector_metrics(), "otelcol_exporter_send_failed_spans", exporter="kafka")

    wait_until(lambda: failed_spans() >= big.span_count, "the big trace's spans counted as failed")
    wait_until(lambda: "exceeds max message size" in run.collector.log_text(), "the Collector's error log")
    spans = sum(t.span_count for t in traces)
    stats = run.daemon.wait_for(lambda s: s["spans"] >= spans and s["executions"]["complete"] >= len(traces))
    assert stats["spans"] == spans and stats["executions"]["total"] == len(traces)
    store = run.stored()
    assert store.execution(big.trace_id) is None
    assert_stored_whole(store, traces)
