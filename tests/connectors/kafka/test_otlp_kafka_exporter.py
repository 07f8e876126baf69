"""Runtime spans through a real Kafka broker, in the collector's `otlp_proto` format, decoded back."""

from __future__ import annotations

import time
from collections import defaultdict

from kafka import KafkaConsumer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from workflow_fixtures import QA_REVIEWED as SPEC
from workflow_fixtures import run_qa_to_kafka

from cegraph.connectors.kafka.client import kafka_python_options
from cegraph.connectors.otlp.codec import decode_proto
from cegraph.daemon.ingest.normalize import TextPolicy, normalize
from cegraph.daemon.settings import KafkaSettings
from cegraph.daemon.workflows.runtime import ExecutionResult


def attributes(item) -> dict:
    """A decoded span's (or resource's) attributes as a plain dict."""
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in item.attributes}


async def run_through_kafka(
    bootstrap: str, topic: str, *, partition_by_trace: bool, executions: int
) -> tuple[list[ExecutionResult], list]:
    settings = KafkaSettings(bootstrap_servers=bootstrap)
    results = await run_qa_to_kafka(
        bootstrap, topic, executions=executions, partition_by_trace=partition_by_trace, seed=5
    )

    consumer = KafkaConsumer(
        topic, auto_offset_reset="earliest", consumer_timeout_ms=2_000, **kafka_python_options(settings)
    )
    records, deadline = [], time.monotonic() + 60
    wanted = 4 * executions + executions  # node spans + roots
    try:
        while time.monotonic() < deadline:
            records += [record for batch in consumer.poll(timeout_ms=1_000).values() for record in batch]
            spans = sum(
                len(ss.spans)
                for r in records
                for rs in _decode(r.value).resource_spans
                for ss in rs.scope_spans
            )
            if spans >= wanted:
                break
    finally:
        consumer.close()
    return results, records


def _decode(payload: bytes) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(payload)


async def test_one_trace_per_message_keyed_by_trace_id_with_the_spec_node_graph(kafka_bootstrap, topic_name):
    results, records = await run_through_kafka(
        kafka_bootstrap, topic_name, partition_by_trace=True, executions=6
    )
    by_trace: dict[str, list] = defaultdict(list)
    for record in records:
        request = _decode(record.value)
        assert [attributes(rs.resource)["service.name"] for rs in request.resource_spans] == ["qa-service"]
        spans = [span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]
        trace_ids = {span.trace_id.hex() for span in spans}
        assert trace_ids == {record.key.decode()}, "one trace per message, keyed by its hex trace id"
        by_trace[record.key.decode()] += spans

    assert set(by_trace) == {result.trace_id for result in results}
    for result in results:
        spans = by_trace[result.trace_id]
        [root] = [span for span in spans if not span.parent_span_id]
        root_attributes = attributes(root)
        assert root_attributes["gen_ai.operation.name"] == "invoke_workflow"
        assert root_attributes["cegraph.workflow.version"] == "1.2.0"
        assert root_attributes["cegraph.seed"] == result.seed
        nodes = {attributes(span)["cegraph.node.id"]: span for span in spans if span.parent_span_id}
        executed = [run.node_id for run in result.nodes if run.status != "skipped"]
        assert sorted(nodes) == sorted(executed) == sorted(SPEC["nodes"])
        assert all(span.parent_span_id == root.span_id for span in nodes.values())
        assert {n: attributes(s)["cegraph.node.kind"] for n, s in nodes.items()} == {
            "search": "retrieve",
            "answer": "llm",
            "review": "review",
            "revise": "revise",
        }
        for node_id, span in nodes.items():
            assert span.span_id.hex() == result.node(node_id).span_id
        events = [e for s in spans for e in s.events if e.name == "gen_ai.evaluation.result"]
        assert len(events) == 1
        label = {kv.key: kv.value.string_value for kv in events[0].attributes}[
            "gen_ai.evaluation.score.label"
        ]
        assert label == ("fail" if result.failed else "pass")


async def test_the_daemon_codec_reads_the_same_node_graph(kafka_bootstrap, topic_name):
    results, records = await run_through_kafka(
        kafka_bootstrap, topic_name, partition_by_trace=True, executions=3
    )
    nodes = [normalize(span, TextPolicy()) for record in records for span in decode_proto(record.value)]
    for result in results:
        mine = [node for node in nodes if node.trace_id == result.trace_id]
        [root] = [node for node in mine if not node.parent_span_id]
        assert (root.kind, root.workflow_id, root.workflow_version) == ("workflow", "qa-reviewed", "1.2.0")
        graph = {node.node_id: (node.kind, node.parent_span_id) for node in mine if node.parent_span_id}
        assert graph == {run.node_id: (run.kind, root.span_id) for run in result.nodes}
        assert all(node.track == "stable" for node in mine)
        answer = next(node for node in mine if node.node_id == "answer")
        assert answer.operation == "chat" and answer.provider == "cegraph-sim" and answer.output_tokens
        failed = any(node.eval_failed for node in mine)
        assert failed == result.failed


async def test_without_partitioning_a_message_carries_many_traces(kafka_bootstrap, topic_name):
    results, records = await run_through_kafka(
        kafka_bootstrap, topic_name, partition_by_trace=False, executions=4
    )
    assert all(record.key is None for record in records)
    traces = [
        {
            span.trace_id.hex()
            for rs in _decode(r.value).resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        }
        for r in records
    ]
    assert set().union(*traces) == {result.trace_id for result in results}
    assert max(len(t) for t in traces) > 1
