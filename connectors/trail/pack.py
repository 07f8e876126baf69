"""OTLP spans into export requests that fit a Kafka message, as the Collector's kafkaexporter sends them.

Sizes are computed from the protobuf encoding without serializing, so a request is closed just before
the span that would take it over the limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from cegraph.connectors.trail.model import TrailTrace
from cegraph.connectors.trail.otlp import OtlpSpan, iter_otlp_spans


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_size(payload: int) -> int:
    """Bytes of a length-delimited field (one-byte tag) holding `payload` bytes."""
    return 1 + _varint_size(payload) + payload


def _group_overhead(item: OtlpSpan) -> int:
    # The two length prefixes (ScopeSpans, ResourceSpans) measured empty may each grow by 4 bytes.
    empty = ResourceSpans(resource=item.resource, scope_spans=[ScopeSpans(scope=item.scope)])
    return _field_size(empty.ByteSize()) + 8


def _request(groups: dict[tuple[bytes, str, str], tuple[OtlpSpan, list[Span]]]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for first, spans in groups.values():
        resource_spans = request.resource_spans.add()
        resource_spans.resource.CopyFrom(first.resource)
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.CopyFrom(first.scope)
        scope_spans.spans.extend(spans)
    return request


def pack_requests(
    spans: Iterable[OtlpSpan], max_message_bytes: int | None = None
) -> Iterator[ExportTraceServiceRequest]:
    """Spans into export requests, each serializing to at most `max_message_bytes` (no limit if None).

    Spans keep their order; one trace may end up in several requests and one request may hold several
    traces, as with the Collector's batch processor. A single span over the limit is an error: it could
    never be delivered.
    """
    groups: dict[tuple[bytes, str, str], tuple[OtlpSpan, list[Span]]] = {}
    overheads: dict[tuple[bytes, str, str], int] = {}
    size = 0
    for item in spans:
        span_size = _field_size(item.span.ByteSize())
        if item.group not in overheads:
            overheads[item.group] = _group_overhead(item)
        cost = span_size + (0 if item.group in groups else overheads[item.group])
        if max_message_bytes is not None and groups and size + cost > max_message_bytes:
            yield _request(groups)
            groups, size = {}, 0
            cost = span_size + overheads[item.group]
        if max_message_bytes is not None and cost > max_message_bytes:
            raise ValueError(
                f"span {item.span.span_id.hex()} of trace {item.span.trace_id.hex()} needs {cost} bytes, "
                f"over the {max_message_bytes}-byte message limit"
            )
        groups.setdefault(item.group, (item, []))[1].append(item.span)
        size += cost
    if groups:
        yield _request(groups)


def trail_to_otlp(
    trace: TrailTrace, *, max_message_bytes: int | None = None
) -> list[ExportTraceServiceRequest]:
    """The trace as OTLP export requests: one, or several of at most `max_message_bytes` each."""
    if not trace.has_span_tree:
        raise ValueError(f"TRAIL trace {trace.trace_id} has no span tree in this release")
    return list(pack_requests(iter_otlp_spans(trace), max_message_bytes))
