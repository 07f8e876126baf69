"""Malformed spans messages of every kind an attacker or a broken exporter sends, made from real ones.

Each kind starts from a real export (OpenTelemetry SDK spans, encoded as the kafkaexporter does) and
breaks one thing: a field of the wrong JSON type, an attribute nested past any sane depth, random
bytes, a truncated protobuf, another OTLP signal's message. `is_refused` is the oracle: the message
cannot become nodes, so the daemon must dead-letter it (and only it).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Gauge,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)

from cegraph.connectors.otlp.codec import decoder_for
from cegraph.daemon.ingest.normalize import TextPolicy
from cegraph.daemon.ingest.pipeline import message_nodes


def is_refused(payload: bytes, encoding: str) -> bool:
    try:
        message_nodes(payload, decoder_for(encoding), TextPolicy())
    except Exception:
        return True
    return False


def wrong_signal_payloads() -> list[bytes]:
    """A metrics and a logs export: valid OTLP protobuf, but not traces."""
    metric = ExportMetricsServiceRequest(
        resource_metrics=[
            ResourceMetrics(
                scope_metrics=[
                    ScopeMetrics(
                        metrics=[
                            Metric(name="latency", gauge=Gauge(data_points=[NumberDataPoint(as_double=1.0)]))
                        ]
                    )
                ]
            )
        ]
    ).SerializeToString()
    logs = ExportLogsServiceRequest(
        resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=[LogRecord(severity_text="ERROR")])])]
    ).SerializeToString()
    return [metric, logs]


NESTED = "__nested__"


def nested_value(depth: int) -> bytes:
    """An OTLP/JSON AnyValue nested `depth` levels deep (kvlists and arrays in turn), as JSON text:
    deeper than JSON libraries will write."""
    opening = [b'{"kvlistValue":{"values":[{"key":"k","value":', b'{"arrayValue":{"values":[']
    closing = [b"}]}}", b"]}}"]
    head = b"".join(opening[level % 2] for level in range(depth))
    tail = b"".join(closing[level % 2] for level in reversed(range(depth)))
    return head + b'{"stringValue":"bottom"}' + tail


def _nested_attribute(depth: int) -> Callable[[dict, random.Random], None]:
    """Under a key cegraph reads (the span's output), where the value must become text."""

    def add(span: dict, rng: random.Random) -> None:
        attributes = [a for a in span.get("attributes", []) if a.get("key") != "output.value"]
        span["attributes"] = [*attributes, {"key": "output.value", "value": f"{NESTED}{depth}"}]

    return add


def _spans(document: dict) -> list[dict]:
    return [
        span
        for resource in document["resourceSpans"]
        for scope in resource["scopeSpans"]
        for span in scope["spans"]
    ]


JSON_BREAKS: dict[str, Callable[[dict, random.Random], None]] = {
    "name is a number": lambda span, rng: span.__setitem__("name", rng.randint(1, 10**6)),
    "name is an object": lambda span, rng: span.__setitem__("name", {"evil": True}),
    "status.message is not a string": lambda span, rng: span.__setitem__(
        "status", {"code": 2, "message": rng.choice([42, ["x"], {"m": 1}, True])}
    ),
    "an attribute nested 270 deep": _nested_attribute(270),  # parses (< 1,024 JSON levels), too deep to write
    "an attribute nested 300 deep": _nested_attribute(300),
    "an attribute nested 2,000 deep": _nested_attribute(2_000),
    "an attribute key is not a string": lambda span, rng: span.setdefault("attributes", []).append(
        {"key": 7, "value": {"stringValue": "x"}}
    ),
    "a time is an object": lambda span, rng: span.__setitem__("startTimeUnixNano", {"t": 1}),
    "an event name is a list": lambda span, rng: span.__setitem__(
        "events", [{"name": ["exception"], "timeUnixNano": "1"}]
    ),
    "a trace id is a number": lambda span, rng: span.__setitem__("traceId", 12),
}


def break_json(payload: bytes, kind: str, rng: random.Random) -> bytes:
    document = orjson.loads(payload)
    spans = _spans(document)
    JSON_BREAKS[kind](rng.choice(spans), rng)
    text = orjson.dumps(document)
    for depth in (270, 300, 2_000):
        text = text.replace(f'"{NESTED}{depth}"'.encode(), nested_value(depth))
    return text


def malformed_payloads(good: list[bytes], encoding: str, count: int, seed: int) -> list[bytes]:
    """`count` refused payloads of every kind, each checked against the oracle."""
    rng = random.Random(seed)
    makers: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randint(1, 400)),
        lambda: (lambda p: p[: rng.randint(1, len(p) - 1)])(rng.choice(good)),
        lambda: b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "ab' + rng.randbytes(8),
        lambda: rng.choice(wrong_signal_payloads()),
        lambda: b"",
    ]
    if encoding == "otlp_json":
        makers += [
            lambda kind=kind: break_json(rng.choice(good), kind, rng) for kind in JSON_BREAKS
        ] * 2  # the poison kinds as often as the rest together
    bad: list[bytes] = []
    while len(bad) < count:
        payload = rng.choice(makers)()
        if is_refused(payload, encoding):
            bad.append(payload)
    return bad
