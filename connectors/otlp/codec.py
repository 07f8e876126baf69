"""Decoders for what the OTel Collector's kafkaexporter writes: `otlp_proto` and `otlp_json`.

Trace exports become `SpanRecord`s; log exports (the optional logs topic) become `SpanLog`s, each
log record as an event of the span it names. A payload that is not an export (random bytes, a
truncated message, broken JSON, another OTLP message type that happens to parse) raises `DecodeError`
with a reason that goes into the dead-letter header. Protobuf parses almost anything, so structure is
checked: 16-byte trace ids, 8-byte span ids, at least one span (record), end not before start.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from ptars import HandlerPool

from cegraph.daemon.spans import Attributes, InvalidMessage, SpanEvent, SpanLog, SpanRecord

# OTLP span flags: bit 8 says whether bit 9 is known, bit 9 says the parent is in another process.
REMOTE_PARENT = 0x300


class DecodeError(InvalidMessage):
    """The payload is not a valid trace export; `str(error)` is the dead-letter reason."""


# ---------------------------------------------------------------- protobuf


def any_value(value: Any) -> Any:
    """An OTLP `AnyValue` as Python: scalars, lists, dicts, or None when unset."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


_SCALAR_KINDS = frozenset({"string_value", "bool_value", "int_value", "double_value", "bytes_value"})


def _attributes(pairs: Any) -> Attributes:
    """Hot path (every attribute of every span): scalars without a call per value."""
    attributes = {}
    for kv in pairs:
        value = kv.value
        kind = value.WhichOneof("value")
        attributes[kv.key] = getattr(value, kind) if kind in _SCALAR_KINDS else any_value(value)
    return attributes


def _parsed(request: Any, payload: bytes) -> Any:
    try:
        request.ParseFromString(payload)
    except (ProtobufDecodeError, RuntimeError, ValueError) as error:
        raise DecodeError(f"not an OTLP {type(request).__name__}: {error}") from None
    return request


def _json_document(payload: bytes, what: str) -> dict[str, Any]:
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise DecodeError(f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise DecodeError(f"not an OTLP/JSON {what} export: the document is not an object")
    return document


def decode_proto(payload: bytes) -> list[SpanRecord]:
    request = _parsed(ExportTraceServiceRequest(), payload)
    records: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                trace_id, span_id, parent = span.trace_id, span.span_id, span.parent_span_id
                _check_ids(len(trace_id), len(span_id), len(parent), trace_id, span_id)
                events = [
                    SpanEvent(event.name, event.time_unix_nano, _attributes(event.attributes))
                    for event in span.events
                ]
                records.append(
                    SpanRecord(
                        trace_id.hex(),
                        span_id.hex(),
                        parent.hex(),
                        span.name,
                        span.start_time_unix_nano,
                        span.end_time_unix_nano,
                        span.status.code,
                        span.status.message,
                        _attributes(span.attributes),
                        events,
                        resource,
                        span.flags & REMOTE_PARENT == REMOTE_PARENT,
                    )
                )
    return _checked(records)


def _check_ids(trace_len: int, span_len: int, parent_len: int, trace_id: bytes, span_id: bytes) -> None:
    if trace_len != 16 or span_len != 8 or parent_len not in (0, 8):
        raise DecodeError(
            f"not a trace export: trace id of {trace_len} bytes, span id of {span_len} bytes, "
            f"parent span id of {parent_len} bytes (expected 16, 8, 0 or 8)"
        )
    if not any(trace_id) or not any(span_id):
        raise DecodeError("not a trace export: all-zero trace or span id")


INT64_MAX = 2**63 - 1  # the store keeps times as BIGINT: a larger value would fail every later commit


def _checked(records: list[SpanRecord]) -> list[SpanRecord]:
    if not records:
        raise DecodeError("the export holds no spans")
    for record in records:
        if not 0 < record.start_ns <= INT64_MAX:
            raise DecodeError(
                f"not a trace export: span {record.span_id} has no valid start time ({record.start_ns})"
            )
        if not 0 <= record.end_ns <= INT64_MAX:
            raise DecodeError(f"span {record.span_id} has an end time out of range ({record.end_ns})")
        if record.end_ns and record.end_ns < record.start_ns:
            raise DecodeError(f"span {record.span_id} ends before it starts")
    return records


# ---------------------------------------------------------------- protobuf, columnar


@dataclass(frozen=True, slots=True)
class ProtoSpans:
    """The spans of a batch of trace exports as Arrow columns, in each message's order.

    `spans` is OTLP's `Span` struct (ids as bytes); `message[i]` is the index (into the payloads) of
    span i's message, `resource[i]` the index of its resource in `resources` (their attribute lists).
    `suspect` are the messages left out: those that fail a check, to be decoded one by one by
    `decode_proto`, which raises the reason the message is refused for.
    """

    spans: pa.StructArray
    message: np.ndarray
    resource: np.ndarray
    resources: pa.ListArray
    suspect: list[int]


@functools.cache
def _trace_handler() -> Any:
    """ptars' converter of `ExportTraceServiceRequest`: made once (it compiles the descriptors)."""
    return HandlerPool([ExportTraceServiceRequest.DESCRIPTOR.file]).get_for_message(
        ExportTraceServiceRequest.DESCRIPTOR
    )


def _parses(payload: bytes) -> bool:
    try:
        ExportTraceServiceRequest().ParseFromString(payload)
    except (ProtobufDecodeError, RuntimeError, ValueError):
        return False
    return True


def decode_proto_columns(payloads: list[bytes]) -> ProtoSpans:
    """`decode_proto` for a batch, into columns (ptars, in Rust) instead of a Python object per span.

    Every payload is first parsed by the protobuf runtime (without walking it), so that what it refuses
    (bad UTF-8, nesting past its recursion limit) is refused here too; the checks of `decode_proto`
    run on the columns, and a message that fails one is left to `decode_proto` for its reason.
    """
    suspect = [index for index, payload in enumerate(payloads) if not _parses(payload)]
    if suspect:
        refused = set(suspect)
        kept = [index for index in range(len(payloads)) if index not in refused]
    else:
        kept = list(range(len(payloads)))
    requests = pc.struct_field(
        _trace_handler().list_to_record_batch([payloads[i] for i in kept]).to_struct_array(), "resource_spans"
    )
    resource_spans = pc.list_flatten(requests)
    scope_lists = pc.struct_field(resource_spans, "scope_spans")
    span_lists = pc.struct_field(pc.list_flatten(scope_lists), "spans")
    spans = pc.list_flatten(span_lists)
    resource = np.asarray(pc.list_parent_indices(scope_lists))[np.asarray(pc.list_parent_indices(span_lists))]
    message = np.asarray(kept, dtype=np.int64)[np.asarray(pc.list_parent_indices(requests))][resource]
    bad = _failing_checks(spans)
    counts = np.bincount(message, minlength=len(payloads))
    empty = [i for i in kept if counts[i] == 0]
    if bad.any() or empty:
        failing = set(np.unique(message[bad]).tolist()) | set(empty)
        keep = ~np.isin(message, list(failing))
        spans, message, resource = spans.filter(pa.array(keep)), message[keep], resource[keep]
        suspect = sorted({*suspect, *failing})
    attributes = pc.struct_field(pc.struct_field(resource_spans, "resource"), "attributes")
    return ProtoSpans(spans, message, resource, attributes, suspect)


def _failing_checks(spans: pa.StructArray) -> np.ndarray:
    """Per span, whether it fails a check of `_check_ids` or `_checked`."""
    trace_id, span_id = pc.struct_field(spans, "trace_id"), pc.struct_field(spans, "span_id")
    parent_len = pc.binary_length(pc.struct_field(spans, "parent_span_id"))
    start = pc.struct_field(spans, "start_time_unix_nano")
    end = pc.struct_field(spans, "end_time_unix_nano")
    failing = pc.or_(
        pc.or_(pc.not_equal(pc.binary_length(trace_id), 16), pc.not_equal(pc.binary_length(span_id), 8)),
        pc.and_(pc.not_equal(parent_len, 0), pc.not_equal(parent_len, 8)),
    )
    failing = pc.or_(failing, pc.or_(pc.equal(trace_id, bytes(16)), pc.equal(span_id, bytes(8))))
    out_of_range = pc.or_(
        pc.or_(pc.equal(start, 0), pc.greater(start, INT64_MAX)),
        pc.or_(pc.greater(end, INT64_MAX), pc.and_(pc.not_equal(end, 0), pc.less(end, start))),
    )
    return np.asarray(pc.or_(failing, out_of_range), dtype=bool)


# ---------------------------------------------------------------- OTLP/JSON


def _field(data: dict[str, Any], camel: str, snake: str, default: Any = None) -> Any:
    """OTLP/JSON uses lowerCamelCase; receivers also accept the proto field names."""
    if camel in data:
        return data[camel]
    return data.get(snake, default)


def _int64(value: Any) -> int:
    number = int(value)
    if not -INT64_MAX - 1 <= number <= INT64_MAX:
        raise DecodeError(f"intValue {number} is outside int64")
    return number


_JSON_SCALARS: dict[str, Callable[[Any], Any]] = {
    "stringValue": str,
    "string_value": str,
    "boolValue": bool,
    "bool_value": bool,
    "intValue": _int64,
    "int_value": _int64,
    "doubleValue": float,
    "double_value": float,
    "bytesValue": base64.b64decode,
    "bytes_value": base64.b64decode,
}


def _json_any_value(value: dict[str, Any]) -> Any:
    for key, item in value.items():
        convert = _JSON_SCALARS.get(key)
        if convert is not None:
            return convert(item)
        if key in ("arrayValue", "array_value"):
            return [_json_any_value(v) for v in item.get("values", [])]
        if key in ("kvlistValue", "kvlist_value"):
            return _json_attributes(item.get("values", []))
    return None


def _json_attributes(pairs: list[dict[str, Any]]) -> Attributes:
    attributes = {}
    for pair in pairs:
        key = pair["key"]
        if not isinstance(key, str):
            raise DecodeError(f"an attribute key is {type(key).__name__}, not a string")
        attributes[key] = _json_any_value(pair.get("value") or {})
    return attributes


def _string(data: dict[str, Any], name: str, where: str) -> str:
    """A string field of OTLP/JSON; any other JSON type is refused here, not at the store."""
    value = data.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DecodeError(f"{where}.{name} is {type(value).__name__}, not a string")
    return value


def _uint64(data: dict[str, Any], camel: str, snake: str) -> int:
    """OTLP/JSON times are (u)int64, written as a decimal string or a number."""
    value = _field(data, camel, snake, 0)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DecodeError(f"{camel} is {type(value).__name__}, not an integer")
    return int(value)


def _hex_id(data: dict[str, Any], camel: str, snake: str, size: int) -> str:
    """OTLP/JSON ids are hex strings (not base64 as protobuf's JSON mapping would have them)."""
    text = _field(data, camel, snake, "") or ""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise DecodeError(f"{camel} {text[:40]!r} is not hex") from None
    if len(raw) not in (size, 0):
        raise DecodeError(f"{camel} has {len(raw)} bytes, expected {size}")
    return raw.hex()


_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


def _status_code(status: dict[str, Any]) -> int:
    code = status.get("code", 0)
    return _STATUS_NAMES.get(code, 0) if isinstance(code, str) else int(code)


def decode_json(payload: bytes) -> list[SpanRecord]:
    document = _json_document(payload, "trace")
    records: list[SpanRecord] = []
    try:
        for resource_spans in _field(document, "resourceSpans", "resource_spans", []):
            resource = _json_attributes((resource_spans.get("resource") or {}).get("attributes", []))
            for scope_spans in _field(resource_spans, "scopeSpans", "scope_spans", []):
                for span in scope_spans.get("spans", []):
                    trace_id = _hex_id(span, "traceId", "trace_id", 16)
                    span_id = _hex_id(span, "spanId", "span_id", 8)
                    if not trace_id or not span_id:
                        raise DecodeError("a span has no traceId or spanId")
                    if not trace_id.strip("0") or not span_id.strip("0"):
                        raise DecodeError("not a trace export: all-zero trace or span id")
                    status = span.get("status") or {}
                    events = [
                        SpanEvent(
                            _string(event, "name", "event"),
                            _uint64(event, "timeUnixNano", "time_unix_nano"),
                            _json_attributes(event.get("attributes", [])),
                        )
                        for event in span.get("events", [])
                    ]
                    records.append(
                        SpanRecord(
                            trace_id,
                            span_id,
                            _hex_id(span, "parentSpanId", "parent_span_id", 8),
                            _string(span, "name", "span"),
                            _uint64(span, "startTimeUnixNano", "start_time_unix_nano"),
                            _uint64(span, "endTimeUnixNano", "end_time_unix_nano"),
                            _status_code(status),
                            _string(status, "message", "status"),
                            _json_attributes(span.get("attributes", [])),
                            events,
                            resource,
                            int(span.get("flags") or 0) & REMOTE_PARENT == REMOTE_PARENT,
                        )
                    )
    except DecodeError:
        raise
    except (AttributeError, TypeError, KeyError, ValueError, RecursionError, binascii.Error) as error:
        raise DecodeError(f"not an OTLP/JSON trace export: {type(error).__name__}: {error}") from None
    return _checked(records)


# ---------------------------------------------------------------- logs


def _log_event_name(name: str, attributes: Attributes) -> str:
    """OTLP 1.5+ has `event_name`; older SDKs put the name in the `event.name` attribute."""
    return name or str(attributes.get("event.name") or "")


def _checked_logs(logs: list[SpanLog], records: int) -> list[SpanLog]:
    if not records:
        raise DecodeError("the export holds no log records")
    return logs


def decode_logs_proto(payload: bytes) -> list[SpanLog]:
    """Log records that name a span (a record without trace and span id can't be joined: left out)."""
    request = _parsed(ExportLogsServiceRequest(), payload)
    logs: list[SpanLog] = []
    records = 0
    for resource_logs in request.resource_logs:
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                records += 1
                trace_id, span_id = record.trace_id, record.span_id
                if len(trace_id) not in (0, 16) or len(span_id) not in (0, 8):
                    raise DecodeError(
                        f"not a log export: trace id of {len(trace_id)} bytes, span id of "
                        f"{len(span_id)} bytes (expected 16 and 8, or none)"
                    )
                if not any(trace_id) or not any(span_id):
                    continue
                attributes = _attributes(record.attributes)
                name = _log_event_name(record.event_name, attributes)
                time_ns = record.time_unix_nano or record.observed_time_unix_nano
                logs.append(SpanLog(trace_id.hex(), span_id.hex(), SpanEvent(name, time_ns, attributes)))
    return _checked_logs(logs, records)


def decode_logs_json(payload: bytes) -> list[SpanLog]:
    document = _json_document(payload, "log")
    logs: list[SpanLog] = []
    records = 0
    try:
        for resource_logs in _field(document, "resourceLogs", "resource_logs", []):
            for scope_logs in _field(resource_logs, "scopeLogs", "scope_logs", []):
                for record in _field(scope_logs, "logRecords", "log_records", []):
                    records += 1
                    trace_id = _hex_id(record, "traceId", "trace_id", 16)
                    span_id = _hex_id(record, "spanId", "span_id", 8)
                    if not trace_id.strip("0") or not span_id.strip("0"):
                        continue
                    attributes = _json_attributes(record.get("attributes", []))
                    name = _log_event_name(_field(record, "eventName", "event_name", ""), attributes)
                    time_ns = int(_field(record, "timeUnixNano", "time_unix_nano", 0)) or int(
                        _field(record, "observedTimeUnixNano", "observed_time_unix_nano", 0)
                    )
                    logs.append(SpanLog(trace_id, span_id, SpanEvent(name, time_ns, attributes)))
    except DecodeError:
        raise
    except (AttributeError, TypeError, KeyError, ValueError, binascii.Error) as error:
        raise DecodeError(f"not an OTLP/JSON log export: {type(error).__name__}: {error}") from None
    return _checked_logs(logs, records)


LOG_DECODERS: dict[str, Callable[[bytes], list[SpanLog]]] = {
    "otlp_proto": decode_logs_proto,
    "otlp_json": decode_logs_json,
}


DECODERS: dict[str, Callable[[bytes], list[SpanRecord]]] = {
    "otlp_proto": decode_proto,
    "otlp_json": decode_json,
}


# The decoders with a columnar twin for a batch of messages (the ingest pipeline's hot path).
COLUMNAR_DECODERS: dict[Callable[[bytes], list[SpanRecord]], Callable[[list[bytes]], ProtoSpans]] = {
    decode_proto: decode_proto_columns,
}


def decoder_for(encoding: str) -> Callable[[bytes], list[SpanRecord]]:
    return DECODERS[encoding]


def logs_decoder_for(encoding: str) -> Callable[[bytes], list[SpanLog]]:
    return LOG_DECODERS[encoding]
