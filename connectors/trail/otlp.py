"""A TRAIL trace as OTLP spans: ids, typed attributes, resources and scopes.

The spans become what the OpenInference instrumentation would have exported. Span `logs` (Patronus SDK
records of the harness's function calls) are not converted: logs are a separate OTLP signal, and no
annotation names those spans. Packing the spans into export requests of bounded size: `pack.py`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from cegraph.connectors.trail.model import TrailSpan, TrailTrace

# ---------------------------------------------------------------- ids


def _native_id(value: str, size: int) -> bytes | None:
    """The id itself when it is `size` bytes of hex and not all zeros (invalid in OTLP)."""
    if len(value) != 2 * size:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    return raw if len(raw) == size and any(raw) else None


def _id_bytes(value: str, size: int, person: bytes) -> bytes:
    native = _native_id(value, size)
    if native is not None:
        return native
    return hashlib.blake2b(value.encode(), digest_size=size, person=person).digest()


def trace_id_bytes(trail_id: str) -> bytes:
    """The 16-byte OTLP trace id: the TRAIL id itself when it is 32 hex digits, else a hash of it."""
    return _id_bytes(trail_id, 16, b"trail-trace")


def span_id_bytes(trail_id: str) -> bytes:
    """The 8-byte OTLP span id: the TRAIL id itself when it is 16 hex digits, else a hash of it."""
    return _id_bytes(trail_id, 8, b"trail-span")


# ---------------------------------------------------------------- attributes

_INTEGER = re.compile(r"-?[1-9][0-9]*|0")


def _int_string(value: str) -> int | None:
    return int(value) if _INTEGER.fullmatch(value) else None


def _bool_string(value: str) -> bool | None:
    return {"true": True, "false": False}.get(value.casefold())


def _string_list(value: str) -> list[str] | None:
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
        return parsed
    return None


# TRAIL stringified every value. These keys are typed by the OpenInference spec, the smolagents
# instrumentation or the OTel exception convention, so their type is restored when the string is an
# exact rendering of it (anything else stays a string). `llm.token_count.*` is handled by prefix.
TYPED_STRING_ATTRIBUTES: dict[str, Callable[[str], Any]] = {
    "smolagents.max_steps": _int_string,
    "smolagents.tools_names": _string_list,
    "exception.escaped": _bool_string,
}
_TOKEN_COUNT_PREFIX = "llm.token_count."


def _restore_type(key: str, value: str) -> Any:
    restore = _int_string if key.startswith(_TOKEN_COUNT_PREFIX) else TYPED_STRING_ATTRIBUTES.get(key)
    if restore is None:
        return value
    typed = restore(value)
    return value if typed is None else typed


def _scalar(value: Any) -> AnyValue:
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value) if -(2**63) <= value < 2**63 else AnyValue(string_value=str(value))
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if value is None:
        return AnyValue()
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[_scalar(item) for item in value]))
    return AnyValue(string_value=str(value))


def _key_values(attributes: dict[str, Any], prefix: str = "") -> Iterator[KeyValue]:
    """OTLP attributes; nested dicts and lists of dicts become dotted keys, as OpenInference writes them."""
    for key, value in attributes.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _key_values(value, f"{name}.")
        elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
            yield from _key_values({str(index): item for index, item in enumerate(value)}, f"{name}.")
        elif value is not None:
            typed = _restore_type(name, value) if isinstance(value, str) else value
            yield KeyValue(key=name, value=_scalar(typed))


# ---------------------------------------------------------------- spans


@dataclass(frozen=True)
class OtlpSpan:
    """A converted span with the resource and scope it is sent under; `group` keys the pair."""

    group: tuple[bytes, str, str]
    resource: Resource
    scope: InstrumentationScope
    span: Span


def _resource(trace_id: str, span: TrailSpan) -> Resource:
    attributes = dict(span.resource_attributes)
    if span.service_name:
        attributes.setdefault("service.name", span.service_name)
    attributes["trail.trace_id"] = trace_id
    return Resource(attributes=list(_key_values(attributes)))


def _otlp_span(trace_bytes: bytes, span: TrailSpan, parent: TrailSpan | None) -> Span:
    attributes = list(_key_values(span.span_attributes))
    if _native_id(span.span_id, 8) is None:
        attributes.append(KeyValue(key="trail.span_id", value=AnyValue(string_value=span.span_id)))
    # Nesting is the tree's truth; a root keeps the parent it declares (normally none).
    parent_id = parent.span_id if parent is not None else span.parent_span_id
    return Span(
        trace_id=trace_bytes,
        span_id=span_id_bytes(span.span_id),
        parent_span_id=span_id_bytes(parent_id) if parent_id else b"",
        trace_state=span.trace_state,
        name=span.span_name,
        kind=span.span_kind,
        start_time_unix_nano=span.start_time_unix_nano,
        end_time_unix_nano=span.end_time_unix_nano,
        attributes=attributes,
        events=[
            Span.Event(
                time_unix_nano=event.time_unix_nano,
                name=event.name,
                attributes=list(_key_values(event.attributes)),
            )
            for event in span.events
        ],
        status=Status(code=span.status_code, message=span.status_message),
    )


def iter_otlp_spans(trace: TrailTrace) -> Iterator[OtlpSpan]:
    """The trace's spans as OTLP, parents before children."""
    trace_bytes = trace_id_bytes(trace.trace_id)
    resources: dict[bytes, Resource] = {}
    for span, parent in trace.iter_spans():
        resource_key = orjson.dumps(
            [span.resource_attributes, span.service_name], option=orjson.OPT_SORT_KEYS
        )
        resource = resources.get(resource_key)
        if resource is None:
            resource = resources[resource_key] = _resource(trace.trace_id, span)
        yield OtlpSpan(
            group=(resource_key + trace_bytes, span.scope_name, span.scope_version),
            resource=resource,
            scope=InstrumentationScope(name=span.scope_name, version=span.scope_version),
            span=_otlp_span(trace_bytes, span, parent),
        )
