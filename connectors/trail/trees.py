"""Span trees reduced to what a round trip must keep, for checking that what ingest rebuilt from OTLP is
the TRAIL tree it came from."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from cegraph.connectors.trail.model import TrailSpan, TrailTrace
from cegraph.connectors.trail.otlp import span_id_bytes


@dataclass(frozen=True)
class SpanNode:
    """A span tree reduced to what a round trip must keep; children ordered by start time, then id."""

    span_id: str
    name: str
    start_time_unix_nano: int
    end_time_unix_nano: int
    children: tuple[SpanNode, ...] = ()


def _ordered(nodes: Iterable[SpanNode]) -> tuple[SpanNode, ...]:
    return tuple(sorted(nodes, key=lambda node: (node.start_time_unix_nano, node.span_id)))


def span_trees(trace: TrailTrace) -> list[SpanNode]:
    """The TRAIL tree with OTLP (hex) span ids, to compare with what an ingest rebuilt."""

    def node(span: TrailSpan) -> SpanNode:
        return SpanNode(
            span_id_bytes(span.span_id).hex(),
            span.span_name,
            span.start_time_unix_nano,
            span.end_time_unix_nano,
            _ordered(node(child) for child in span.child_spans),
        )

    return list(_ordered(node(root) for root in trace.roots))


def rebuild_span_trees(requests: Iterable[ExportTraceServiceRequest | bytes]) -> dict[str, list[SpanNode]]:
    """Trees per hex trace id from export requests (or their bytes), linked by `parent_span_id` only.

    A span whose parent is absent becomes a root; a span id seen twice in a trace is an error.
    """
    by_trace: dict[str, dict[str, Span]] = {}
    for request in requests:
        if isinstance(request, bytes):
            request = ExportTraceServiceRequest.FromString(request)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans = by_trace.setdefault(span.trace_id.hex(), {})
                    if span.span_id.hex() in spans:
                        raise ValueError(
                            f"span {span.span_id.hex()} of trace {span.trace_id.hex()} appears twice"
                        )
                    spans[span.span_id.hex()] = span
    return {trace_hex: _linked(spans) for trace_hex, spans in by_trace.items()}


def _linked(spans: dict[str, Span]) -> list[SpanNode]:
    children: dict[str, list[str]] = {}
    for span_hex, span in spans.items():
        parent = span.parent_span_id.hex()
        children.setdefault(parent if parent in spans else "", []).append(span_hex)

    def node(span_hex: str) -> SpanNode:
        span = spans[span_hex]
        return SpanNode(
            span_hex,
            span.name,
            span.start_time_unix_nano,
            span.end_time_unix_nano,
            _ordered(node(child) for child in children.get(span_hex, [])),
        )

    return list(_ordered(node(root) for root in children.get("", [])))
