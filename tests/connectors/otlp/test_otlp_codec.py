"""The OTLP codecs against payloads made by the real OpenTelemetry SDK and encoder.

What is checked: every field a `SpanRecord` carries survives the protobuf encoding; OTLP/JSON (hex ids)
decodes to the very same records; and every kind of bad payload is refused with `DecodeError` and a
reason an operator can act on, never with another exception.
"""

from __future__ import annotations

import base64
import json
import random

import orjson
import pytest
from google.protobuf.json_format import MessageToDict, MessageToJson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import Status, StatusCode, Tracer
from otel_traces import encode, make_traces, record_spans

from cegraph.connectors.otlp.codec import DecodeError, decode_json, decode_proto, decoder_for
from cegraph.daemon.spans import STATUS_ERROR, STATUS_OK, STATUS_UNSET, SpanRecord

INT64_MAX = 2**63 - 1

# Every AnyValue kind the OTLP protocol has, as the SDK accepts them on a span.
ALL_KINDS = {
    "a.string": "text with ünïcode",
    "a.bool": True,
    "a.int": -42,
    "a.big_int": INT64_MAX,
    "a.double": 2.5,
    "a.bytes": b"\x00\xffraw",
    "a.int_array": [1, 2, 3],
    "a.string_array": ["x", "y"],
    "a.mixed_array": [1, "two", 3.0, False],
    "a.empty_array": [],
    "a.kvlist": {"k": "v", "n": 7, "nested": {"deep": [1, {"deeper": True}]}},
}


def _expected_value(value):
    """What an attribute of the SDK becomes after decoding: sequences are lists, mappings dicts."""
    if isinstance(value, (list, tuple)):
        return [_expected_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _expected_value(v) for k, v in value.items()}
    return value


def _build_workflow(tracer: Tracer) -> None:
    with tracer.start_as_current_span("root", attributes=ALL_KINDS) as root:
        root.add_event("checkpoint", {"step": 1, "tags": ["a", "b"], "meta": {"ok": True}})
        with tracer.start_as_current_span("child", attributes={"gen_ai.operation.name": "chat"}) as child:
            child.set_status(Status(StatusCode.OK))
            with tracer.start_as_current_span("grandchild") as grandchild:
                grandchild.record_exception(ValueError("bad tool arguments"))
                grandchild.set_status(Status(StatusCode.ERROR, "tool failed"))


@pytest.fixture(scope="module")
def sdk_spans() -> list[ReadableSpan]:
    spans = record_spans(_build_workflow, resource={"service.name": "codec-test", "deployment": "eu-1"})
    assert [s.name for s in spans] == ["grandchild", "child", "root"]
    return spans


def _status_code(span: ReadableSpan) -> int:
    return {StatusCode.UNSET: STATUS_UNSET, StatusCode.OK: STATUS_OK, StatusCode.ERROR: STATUS_ERROR}[
        span.status.status_code
    ]


def test_proto_round_trip_keeps_every_field(sdk_spans):
    records = {r.span_id: r for r in decode_proto(encode(sdk_spans, "otlp_proto"))}
    assert len(records) == len(sdk_spans)
    for span in sdk_spans:
        record = records[format(span.context.span_id, "016x")]
        assert record.trace_id == format(span.context.trace_id, "032x")
        assert len(record.trace_id) == 32 and record.trace_id == record.trace_id.lower()
        assert record.parent_span_id == (format(span.parent.span_id, "016x") if span.parent else "")
        assert record.name == span.name
        assert (record.start_ns, record.end_ns) == (span.start_time, span.end_time)
        assert record.status_code == _status_code(span)
        assert record.status_message == (span.status.description or "")
        assert record.attributes == _expected_value(dict(span.attributes))
        assert record.resource == dict(span.resource.attributes)
        assert [(e.name, e.time_ns, e.attributes) for e in record.events] == [
            (e.name, e.timestamp, _expected_value(dict(e.attributes))) for e in span.events
        ]
    by_name = {r.name: r for r in records.values()}
    # The tree: root <- child <- grandchild, all in one trace.
    assert by_name["root"].parent_span_id == ""
    assert by_name["child"].parent_span_id == by_name["root"].span_id
    assert by_name["grandchild"].parent_span_id == by_name["child"].span_id
    assert len({r.trace_id for r in records.values()}) == 1
    # Each AnyValue kind decodes to its Python type (not e.g. a string of it).
    attributes = by_name["root"].attributes
    assert attributes["a.bytes"] == b"\x00\xffraw"
    assert attributes["a.kvlist"]["nested"] == {"deep": [1, {"deeper": True}]}
    assert attributes["a.mixed_array"] == [1, "two", 3.0, False]
    assert type(attributes["a.bool"]) is bool and type(attributes["a.int"]) is int
    # The exception recorded by the SDK is an event with the standard attributes.
    exception = by_name["grandchild"].events[0]
    assert exception.name == "exception"
    assert exception.attributes["exception.type"] == "ValueError"
    assert exception.attributes["exception.message"] == "bad tool arguments"
    assert by_name["grandchild"].status_code == STATUS_ERROR
    assert by_name["grandchild"].status_message == "tool failed"
    assert by_name["child"].status_code == STATUS_OK


def test_json_with_hex_ids_decodes_to_the_same_records_as_proto(sdk_spans):
    payload = encode(sdk_spans, "otlp_json")
    document = orjson.loads(payload)
    span_json = document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert all(c in "0123456789abcdef" for c in span_json["traceId"]) and len(span_json["traceId"]) == 32
    assert decode_json(payload) == decode_proto(encode(sdk_spans, "otlp_proto"))


def test_json_with_proto_field_names_decodes_too(sdk_spans):
    """Receivers accept the proto (snake_case) field names as well; so does the decoder."""
    document = MessageToDict(encode_spans(sdk_spans), preserving_proto_field_name=True)
    for resource_spans in document["resource_spans"]:
        for scope_spans in resource_spans["scope_spans"]:
            for span in scope_spans["spans"]:
                for key in ("trace_id", "span_id", "parent_span_id"):
                    if span.get(key):
                        span[key] = base64.b64decode(span[key]).hex()
    assert decode_json(orjson.dumps(document)) == decode_proto(encode(sdk_spans, "otlp_proto"))


def test_uppercase_hex_ids_are_normalized_to_lowercase(sdk_spans):
    document = orjson.loads(encode(sdk_spans, "otlp_json"))
    for span in document["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        span["traceId"] = span["traceId"].upper()
    records = decode_json(orjson.dumps(document))
    assert records == decode_proto(encode(sdk_spans, "otlp_proto"))


def test_json_with_base64_ids_is_rejected(sdk_spans):
    """What `json_format.MessageToJson` writes (base64 ids) is not OTLP/JSON and must not pass as it."""
    payload = MessageToJson(encode_spans(sdk_spans)).encode()
    with pytest.raises(DecodeError) as caught:
        decode_json(payload)
    reason = str(caught.value)
    assert "traceId" in reason and "not hex" in reason


# ------------------------------------------------------------------------------------ malformed


def _metrics_export(name: str, description: str) -> bytes:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    provider.get_meter("cegraph.tests").create_counter(name, description=description, unit="s").add(3)
    payload = encode_metrics(reader.get_metrics_data()).SerializeToString()
    provider.shutdown()
    return payload


def _logs_export() -> bytes:
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    tracer = TracerProvider().get_tracer("cegraph.tests")
    # Inside a span, so the log record carries a trace id and a span id like a span would.
    with tracer.start_as_current_span("logging"):
        provider.get_logger("cegraph.tests").emit(
            LogRecord(body="the tool failed", severity_number=SeverityNumber.ERROR, severity_text="ERROR")
        )
    payload = encode_logs(exporter.get_finished_logs()).SerializeToString()
    provider.shutdown()
    return payload


def _span_ending_before_it_starts(tracer: Tracer) -> None:
    span = tracer.start_span("backwards", start_time=2_000_000_000)
    span.end(end_time=1_000_000_000)


def _good_proto(sdk_spans) -> bytes:
    return encode(sdk_spans, "otlp_proto")


def _mutated_proto(sdk_spans, mutate) -> bytes:
    request = encode_spans(sdk_spans)
    mutate(request.resource_spans[0].scope_spans[0].spans[0])
    return request.SerializeToString()


def _mutated_json(sdk_spans, mutate) -> bytes:
    document = orjson.loads(encode(sdk_spans, "otlp_json"))
    mutate(document["resourceSpans"][0]["scopeSpans"][0]["spans"][0])
    return orjson.dumps(document)


def _set(key, value):
    def mutate(span):
        if isinstance(span, dict):
            span[key] = value
        else:
            setattr(span, key, value)

    return mutate


BAD_PROTO = {
    "truncated": (lambda s: _good_proto(s)[: len(_good_proto(s)) // 2],
                  "not an OTLP ExportTraceServiceRequest"),
    "empty": (lambda s: b"", "no spans"),
    "metrics export": (lambda s: _metrics_export("gen_ai.client.operation.duration", "GenAI time"), "not a"),
    "metrics export with id-sized name": (lambda s: _metrics_export("process.cpu.time", "CPU time"), "not a"),
    "logs export": (lambda s: _logs_export(), "not a"),
    "end before start": (lambda s: encode(record_spans(_span_ending_before_it_starts), "otlp_proto"),
                         "ends before it starts"),
    "no start time": (lambda s: _mutated_proto(s, _set("start_time_unix_nano", 0)), "start"),
    "end past int64": (lambda s: _mutated_proto(s, _set("end_time_unix_nano", 2**64 - 1)), "time"),
    "short trace id": (lambda s: _mutated_proto(s, _set("trace_id", b"\x01" * 8)), "trace id of 8 bytes"),
    "all-zero span id": (lambda s: _mutated_proto(s, _set("span_id", bytes(8))), "all-zero"),
}  # fmt: skip

BAD_JSON = {
    "broken": (lambda s: encode(s, "otlp_json")[:-7], "not JSON"),
    "empty": (lambda s: b"", "not JSON"),
    "array": (lambda s: b"[" + encode(s, "otlp_json") + b"]", "not an object"),
    "random text": (lambda s: b"hello, world", "not JSON"),
    "no spans": (lambda s: b'{"resourceSpans": []}', "no spans"),
    "base64 span id": (lambda s: _mutated_json(s, _set("spanId", "AAECAwQFBgc=")), "spanId"),
    "short trace id": (lambda s: _mutated_json(s, _set("traceId", "0af7651916cd43dd")),
                       "traceId has 8 bytes"),
    "all-zero trace id": (lambda s: _mutated_json(s, _set("traceId", "0" * 32)), "all-zero"),
    "no span id": (lambda s: _mutated_json(s, lambda span: span.pop("spanId")), "no traceId or spanId"),
    "wrong shape": (lambda s: b'{"resourceSpans": [{"scopeSpans": "spans"}]}', "not an OTLP/JSON"),
    "end before start": (lambda s: encode(record_spans(_span_ending_before_it_starts), "otlp_json"),
                         "ends before it starts"),
    "no start time": (lambda s: _mutated_json(s, lambda span: span.pop("startTimeUnixNano")), "start"),
    "time past int64": (lambda s: _mutated_json(s, _set("endTimeUnixNano", str(2**64))), "time"),
    "int attribute past int64": (
        lambda s: _mutated_json(s, lambda span: span.setdefault("attributes", []).append(
            {"key": "gen_ai.usage.input_tokens", "value": {"intValue": str(2**70)}})),
        "int64",
    ),
    "metrics export": (lambda s: orjson.dumps(MessageToDict(_metrics_request())), "no spans"),
}  # fmt: skip


def _metrics_request() -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    request.ParseFromString(_metrics_export("gen_ai.client.operation.duration", "GenAI time"))
    return request


@pytest.mark.parametrize("case", sorted(BAD_PROTO))
def test_malformed_proto_is_refused_with_a_reason(sdk_spans, case):
    make, fragment = BAD_PROTO[case]
    payload = make(sdk_spans)
    with pytest.raises(DecodeError) as caught:
        decode_proto(payload)
    reason = str(caught.value)
    assert reason and fragment in reason


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_malformed_json_is_refused_with_a_reason(sdk_spans, case):
    make, fragment = BAD_JSON[case]
    with pytest.raises(DecodeError) as caught:
        decode_json(make(sdk_spans))
    reason = str(caught.value)
    assert reason and fragment in reason


def test_wrong_message_types_name_what_is_wrong():
    """A metrics or logs export is not mistaken for spans, and the reason says it is not a trace export."""
    for payload in (
        _metrics_export("gen_ai.client.operation.duration", "GenAI time"),
        _metrics_export("process.cpu.time", "CPU time"),
        _logs_export(),
    ):
        with pytest.raises(DecodeError) as caught:
            decode_proto(payload)
        reason = str(caught.value)
        assert any(
            phrase in reason for phrase in ("not an OTLP ExportTraceServiceRequest", "not a trace export")
        ), reason


def test_every_truncation_of_a_proto_export_is_refused():
    spans = make_traces(1, seed=3)[0].spans
    payload = encode(spans, "otlp_proto")
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            decode_proto(payload[:cut])


def test_decoder_for_picks_the_codec():
    assert decoder_for("otlp_proto") is decode_proto
    assert decoder_for("otlp_json") is decode_json


# ------------------------------------------------------------------------------------ properties


def _assert_storable(records: list[SpanRecord]) -> None:
    """What a decoder returns is always safe to store: valid ids and times in range."""
    assert records
    for record in records:
        assert len(record.trace_id) == 32 and int(record.trace_id, 16) != 0
        assert len(record.span_id) == 16 and int(record.span_id, 16) != 0
        assert record.parent_span_id == "" or len(record.parent_span_id) == 16
        assert 0 < record.start_ns <= INT64_MAX and 0 <= record.end_ns <= INT64_MAX
        assert record.end_ns == 0 or record.end_ns >= record.start_ns


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=3_000))
def test_arbitrary_bytes_raise_only_decode_error(payload):
    for decode in (decode_proto, decode_json):
        try:
            records = decode(payload)
        except DecodeError as error:
            assert str(error)
        else:
            _assert_storable(records)


_GOOD = encode(make_traces(2, seed=5)[0].spans, "otlp_proto")


@FAST
@given(st.lists(st.tuples(st.integers(0, len(_GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_proto_raises_only_decode_error(flips):
    """Byte flips in a real export reach deeper than random bytes: they keep most of the structure."""
    payload = bytearray(_GOOD)
    for index, value in flips:
        payload[index] = value
    try:
        records = decode_proto(bytes(payload))
    except DecodeError as error:
        assert str(error)
    else:
        _assert_storable(records)


_JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
_OTLP_KEYS = st.sampled_from(
    ["traceId", "spanId", "parentSpanId", "name", "startTimeUnixNano", "endTimeUnixNano", "status",
     "code", "message", "events", "attributes", "key", "value", "stringValue", "intValue", "boolValue",
     "doubleValue", "bytesValue", "arrayValue", "kvlistValue", "values", "timeUnixNano", "resource"]
)  # fmt: skip
_JSON_VALUES = st.recursive(
    _JSON_LEAVES
    | st.sampled_from(["0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "00", "zz", "1700000000"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_OTLP_KEYS, inner, max_size=5),
    max_leaves=30,
)


@FAST
@given(
    spans=st.lists(st.dictionaries(_OTLP_KEYS, _JSON_VALUES, max_size=8), min_size=1, max_size=3),
    resource=_JSON_VALUES,
)
def test_otlp_shaped_json_raises_only_decode_error(spans, resource):
    """Documents with the right skeleton and random leaves exercise every branch of the JSON decoder."""
    document = {"resourceSpans": [{"resource": resource, "scopeSpans": [{"spans": spans}]}]}
    try:
        records = decode_json(json.dumps(document).encode())
    except DecodeError as error:
        assert str(error)
    else:
        _assert_storable(records)


def test_json_decoding_of_random_real_exports_matches_proto():
    """Many SDK traces, one export each: the two encodings always agree."""
    rng = random.Random(11)
    for trace in make_traces(20, seed=12):
        spans = list(trace.spans)
        rng.shuffle(spans)
        assert decode_json(encode(spans, "otlp_json")) == decode_proto(encode(spans, "otlp_proto"))
