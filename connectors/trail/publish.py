"""Sending a TRAIL split to Kafka: spans as the Collector's kafkaexporter would write them (`otlp_proto`),
then the annotations to the feedback topic."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from cegraph.connectors.trail.labels import annotations_to_feedback
from cegraph.connectors.trail.model import TrailTrace
from cegraph.connectors.trail.otlp import iter_otlp_spans, trace_id_bytes
from cegraph.connectors.trail.pack import pack_requests, trail_to_otlp
from cegraph.connectors.trail.parse import iter_trail

# Kafka's default max.message.bytes is 1 MiB (1,048,588): leave room for the record's key and framing.
DEFAULT_MAX_MESSAGE_BYTES = 900 * 1024


@dataclass
class PublishReport:
    """What `publish_trail` sent, and the traces it could not send."""

    traces: int = 0
    spans: int = 0
    messages: int = 0
    payload_bytes: int = 0
    feedback: int = 0
    missing_span_trees: list[str] = field(default_factory=list)


def publish_trail(
    path: str | Path,
    producer_options: dict[str, Any],
    topic: str,
    one_trace_per_message: bool = True,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    feedback_topic: str | None = None,
    with_critique: bool = False,
    split: str | None = None,
) -> PublishReport:
    """Send a TRAIL split to Kafka as the Collector's kafkaexporter would (`otlp_proto`).

    With `one_trace_per_message` (like `partition_traces_by_id`) each message holds spans of one trace,
    keyed by its hex trace id, and a trace over `max_message_bytes` is split over several messages;
    without it, spans of consecutive traces share messages, unkeyed. With `feedback_topic`, every
    annotated error then goes there as a JSON feedback record keyed by hex trace id, once all spans are
    sent (feedback usually comes after the execution). Traces without a span tree are reported, not
    sent. `producer_options` are kafka-python `KafkaProducer` arguments (`acks` defaults to "all").
    """
    from kafka import KafkaProducer

    report = PublishReport()
    feedback: list[tuple[bytes, dict[str, Any]]] = []

    def usable() -> Iterator[TrailTrace]:
        for trace in iter_trail(path, split=split):
            if not trace.has_span_tree:
                report.missing_span_trees.append(trace.trace_id)
                continue
            report.traces += 1
            if feedback_topic is not None:
                key = trace_id_bytes(trace.trace_id).hex().encode()
                records = annotations_to_feedback(trace, with_critique=with_critique)
                feedback.extend((key, record) for record in records)
            yield trace

    producer = KafkaProducer(**{"acks": "all", **producer_options})
    futures = []

    def send(request: ExportTraceServiceRequest, key: bytes | None) -> None:
        payload = request.SerializeToString()
        futures.append(producer.send(topic, value=payload, key=key))
        report.messages += 1
        report.payload_bytes += len(payload)
        report.spans += sum(
            len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans
        )

    try:
        if one_trace_per_message:
            for trace in usable():
                key = trace_id_bytes(trace.trace_id).hex().encode()
                for request in trail_to_otlp(trace, max_message_bytes=max_message_bytes):
                    send(request, key)
        else:
            spans = (item for trace in usable() for item in iter_otlp_spans(trace))
            for request in pack_requests(spans, max_message_bytes):
                send(request, None)
        if feedback_topic is not None:
            for key, record in feedback:
                futures.append(producer.send(feedback_topic, value=orjson.dumps(record), key=key))
            report.feedback = len(feedback)
        producer.flush()
        for future in futures:
            future.get(timeout=60)
    finally:
        producer.close()
    return report
