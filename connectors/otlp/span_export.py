"""Span exporters that emit exactly what the OTel Collector's kafkaexporter writes with `otlp_proto`.

A batch of finished spans becomes the serialized bytes of an `ExportTraceServiceRequest`
(`encode_spans`, the SDK's own encoder). With `partition_by_trace` each trace of the batch becomes a
message of its own keyed by its hex trace id, like the collector's `partition_traces_by_id`. A payload
over `max_message_bytes` is split, so a large trace may span several messages, as it may in Kafka.
`CallbackSpanExporter` hands the messages to a function: the embedded daemon's ingest in-process.
"""

from __future__ import annotations

import base64
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import orjson
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("cegraph.export")

DEFAULT_MAX_MESSAGE_BYTES = 1_000_000  # under the broker's default message.max.bytes (1 MiB + overhead)


def otlp_messages(
    spans: Sequence[ReadableSpan],
    *,
    partition_by_trace: bool,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[tuple[bytes | None, bytes]]:
    """(key, payload) messages for a batch of spans; the key is the hex trace id when partitioning."""
    if not partition_by_trace:
        return [(None, payload) for payload in _encoded(list(spans), max_message_bytes)]
    traces: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        assert span.context is not None
        traces.setdefault(span.context.trace_id, []).append(span)
    return [
        (format(trace_id, "032x").encode(), payload)
        for trace_id, members in traces.items()
        for payload in _encoded(members, max_message_bytes)
    ]


def otlp_json(spans: Sequence[ReadableSpan]) -> bytes:
    """The spans as an OTLP/JSON `ExportTraceServiceRequest`: protobuf's JSON mapping, with the ids
    in hex as OTLP/JSON wants them (the mapping writes bytes as base64)."""
    document = MessageToDict(encode_spans(list(spans)))
    for resource_spans in document.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64decode(span[key]).hex()
    return orjson.dumps(document)


def _encoded(spans: list[ReadableSpan], limit: int) -> list[bytes]:
    payload = encode_spans(spans).SerializeToString()
    if len(payload) <= limit or len(spans) == 1:
        return [payload]
    middle = len(spans) // 2
    return _encoded(spans[:middle], limit) + _encoded(spans[middle:], limit)


class OtlpPayloadExporter(SpanExporter, ABC):
    """Encodes each batch as collector-format messages and delivers them; subclasses say where to."""

    def __init__(
        self, *, partition_by_trace: bool = False, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self.partition_by_trace = partition_by_trace
        self.max_message_bytes = max_message_bytes

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            messages = otlp_messages(
                spans, partition_by_trace=self.partition_by_trace, max_message_bytes=self.max_message_bytes
            )
            self.deliver(messages)
        except Exception:  # an exporter reports failure to the SDK instead of raising into it
            log.exception("could not export %d spans", len(spans))
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    @abstractmethod
    def deliver(self, messages: list[tuple[bytes | None, bytes]]) -> None:
        """Hand over the messages; raise when they could not be delivered."""


class CallbackSpanExporter(OtlpPayloadExporter):
    """Calls `callback(key, payload)` per message, on the span processor's thread.

    The callback must be thread-safe and quick; an asyncio consumer should hop onto its loop with
    `loop.call_soon_threadsafe`.
    """

    def __init__(
        self,
        callback: Callable[[bytes | None, bytes], None],
        *,
        partition_by_trace: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(partition_by_trace=partition_by_trace, max_message_bytes=max_message_bytes)
        self._callback = callback

    def deliver(self, messages: list[tuple[bytes | None, bytes]]) -> None:
        for key, payload in messages:
            self._callback(key, payload)
