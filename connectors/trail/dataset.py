"""TRAIL (Patronus AI, arXiv 2505.08638) as cegraph input: load, convert to OTLP, annotations as feedback.

TRAIL ships real smolagents executions recorded with OpenInference instrumentation, exported as nested
span trees whose attribute values are all strings, plus expert error annotations that name a span and a
category of a 20-leaf taxonomy. cegraph reads OTLP from Kafka, so the trees become the bytes the OTel
Collector's kafkaexporter writes (`otlp_proto`), and the annotations become feedback messages naming the
failing span, with the human category kept apart for scoring only.

Layout (a `.tar.gz` or its extracted folder): `data/<split>/<trace_id>.json` and
`processed_annotations_<split>/<trace_id>.json`. Known defects handled here: a trailing comma in one
annotation file, annotation files without `trace_id` (the file name is the id), category spelling
variants, one annotation whose text was split into stray keys, and span trees left out of the release
(`TrailTrace.has_span_tree` is false for those). Span `logs` (Patronus SDK records of the harness's
function calls) are not converted: logs are a separate OTLP signal, and no annotation names those spans.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from pydantic import AliasChoices, BaseModel, BeforeValidator, Field, ValidationError, model_validator

# Kafka's default max.message.bytes is 1 MiB (1,048,588): leave room for the record's key and framing.
DEFAULT_MAX_MESSAGE_BYTES = 900 * 1024
FEEDBACK_SOURCE = "trail-annotation"

# ---------------------------------------------------------------- taxonomy

# The 20 leaves of the TRAIL taxonomy (paper, figure 2), each with its top-level class and parent.
TAXONOMY: dict[str, tuple[str, str]] = {
    "Language-only": ("Reasoning Errors", "Hallucinations"),
    "Tool-related": ("Reasoning Errors", "Hallucinations"),
    "Poor Information Retrieval": ("Reasoning Errors", "Information Processing"),
    "Tool Output Misinterpretation": ("Reasoning Errors", "Information Processing"),
    "Incorrect Problem Identification": ("Reasoning Errors", "Decision Making"),
    "Tool Selection Errors": ("Reasoning Errors", "Decision Making"),
    "Formatting Errors": ("Reasoning Errors", "Output Generation"),
    "Instruction Non-compliance": ("Reasoning Errors", "Output Generation"),
    "Tool Definition Issues": ("System Execution Errors", "Configuration"),
    "Environment Setup Errors": ("System Execution Errors", "Configuration"),
    "Rate Limiting": ("System Execution Errors", "API Issues"),
    "Authentication Errors": ("System Execution Errors", "API Issues"),
    "Service Errors": ("System Execution Errors", "API Issues"),
    "Resource Not Found": ("System Execution Errors", "API Issues"),
    "Resource Exhaustion": ("System Execution Errors", "Resource Management"),
    "Timeout Issues": ("System Execution Errors", "Resource Management"),
    "Context Handling Failures": ("Planning and Coordination Errors", "Context Management"),
    "Resource Abuse": ("Planning and Coordination Errors", "Context Management"),
    "Goal Deviation": ("Planning and Coordination Errors", "Task Management"),
    "Task Orchestration": ("Planning and Coordination Errors", "Task Management"),
}
LEAF_CATEGORIES: tuple[str, ...] = tuple(TAXONOMY)

# Spelling variants found in the gold files. Case and surrounding or repeated whitespace are folded
# before lookup, so "Goal deviation" and " Incorrect Problem Identification" need no entry.
CATEGORY_VARIANTS: dict[str, str] = {
    "Context Handling Failure": "Context Handling Failures",
    "Task Orchestration Errors": "Task Orchestration",
    "Tool Selection": "Tool Selection Errors",
}


def _category_key(name: str) -> str:
    return " ".join(name.split()).casefold()


_CATEGORY_LOOKUP = {
    _category_key(name): leaf
    for name, leaf in [*((leaf, leaf) for leaf in TAXONOMY), *CATEGORY_VARIANTS.items()]
}


def fold_category(name: str) -> str | None:
    """The taxonomy leaf a gold category string means, or None when it is not a known spelling."""
    return _CATEGORY_LOOKUP.get(_category_key(name))


# ---------------------------------------------------------------- time formats

_TIMESTAMP = re.compile(
    r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:[.,](\d{1,9})\d*)?(Z|[+-]\d{2}:?\d{2})?", re.IGNORECASE
)
_NUMBER = r"(\d+(?:[.,]\d+)?)"
_DURATION = re.compile(rf"P(?:{_NUMBER}W)?(?:{_NUMBER}D)?(?:T(?:{_NUMBER}H)?(?:{_NUMBER}M)?(?:{_NUMBER}S)?)?")
_DURATION_UNITS_NS = (604_800 * 10**9, 86_400 * 10**9, 3_600 * 10**9, 60 * 10**9, 10**9)


def parse_timestamp(text: str) -> int:
    """Unix nanoseconds of an ISO 8601 timestamp; TRAIL's event times carry no zone and are UTC."""
    match = _TIMESTAMP.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not an ISO 8601 timestamp: {text!r}")
    date, time, fraction, zone = match.groups()
    if zone is None or zone.upper() == "Z":
        zone = "+00:00"
    elif ":" not in zone:
        zone = f"{zone[:3]}:{zone[3:]}"
    seconds = int(datetime.fromisoformat(f"{date}T{time}{zone}").timestamp())
    return seconds * 10**9 + int((fraction or "").ljust(9, "0"))


def parse_duration(text: str) -> int:
    """Nanoseconds of an ISO 8601 duration such as `PT1M48.75533S` (years and months: ambiguous, refused)."""
    if not isinstance(text, str):
        raise ValueError(f"not an ISO 8601 duration: {text!r}")
    text = text.strip().upper()
    match = _DURATION.fullmatch(text)
    if match is None or text in ("P", "PT") or text.endswith("T"):
        raise ValueError(f"not an ISO 8601 duration in weeks, days, hours, minutes and seconds: {text!r}")
    total = sum(
        Decimal(value.replace(",", ".")) * unit
        for value, unit in zip(match.groups(), _DURATION_UNITS_NS, strict=True)
        if value is not None
    )
    return int(total)


_STATUS_CODES = {
    "unset": Status.STATUS_CODE_UNSET,
    "ok": Status.STATUS_CODE_OK,
    "error": Status.STATUS_CODE_ERROR,
}
_SPAN_KINDS = {name.removeprefix("SPAN_KIND_").casefold(): value for name, value in Span.SpanKind.items()}


def _status_code(value: Any) -> int:
    code = _STATUS_CODES.get(str(value).casefold().removeprefix("status_code_"))
    if code is None:
        raise ValueError(f"unknown status code {value!r} (expected Unset, Ok or Error)")
    return code


def _span_kind(value: Any) -> int:
    kind = _SPAN_KINDS.get(str(value).casefold().removeprefix("span_kind_"))
    if kind is None:
        raise ValueError(f"unknown span kind {value!r}")
    return kind


# ---------------------------------------------------------------- models

Timestamp = Annotated[int, BeforeValidator(parse_timestamp)]


class TrailEvent(BaseModel):
    """A span event as TRAIL exports it (`Name`, `Timestamp`, `Attributes`; lower case accepted too)."""

    name: str = Field(validation_alias=AliasChoices("Name", "name"))
    time_unix_nano: Timestamp = Field(validation_alias=AliasChoices("Timestamp", "timestamp"))
    attributes: dict[str, Any] = Field(
        default_factory=dict, validation_alias=AliasChoices("Attributes", "attributes")
    )


class TrailSpan(BaseModel):
    """One span of a TRAIL tree; times, status and kind are parsed on load so a bad value names its file."""

    span_id: str
    parent_span_id: str | None = None
    trace_id: str | None = None
    span_name: str
    span_kind: Annotated[int, BeforeValidator(_span_kind)] = Span.SPAN_KIND_INTERNAL
    service_name: str = ""
    resource_attributes: dict[str, Any] = Field(default_factory=dict)
    scope_name: str = ""
    scope_version: str = ""
    span_attributes: dict[str, Any] = Field(default_factory=dict)
    start_time_unix_nano: Timestamp = Field(validation_alias="timestamp")
    duration_ns: Annotated[int, BeforeValidator(parse_duration)] = Field(validation_alias="duration")
    status_code: Annotated[int, BeforeValidator(_status_code)] = Status.STATUS_CODE_UNSET
    status_message: str = ""
    trace_state: str = ""
    events: list[TrailEvent] = Field(default_factory=list)
    child_spans: list[TrailSpan] = Field(default_factory=list)

    @property
    def end_time_unix_nano(self) -> int:
        return self.start_time_unix_nano + self.duration_ns


_ERROR_KEYS = ("category", "location", "evidence", "description", "impact")


class TrailError(BaseModel):
    """One expert annotation: what went wrong (`category`) and where (`location`, a span id)."""

    category: str
    location: str
    evidence: str = ""
    description: str = ""
    impact: str = ""

    @model_validator(mode="before")
    @classmethod
    def _rejoin_split_text(cls, data: Any) -> Any:
        """One gold annotation lost its quoting: its evidence went into stray keys and values, and the
        description into the value of the last stray key. Put the text back where it belongs."""
        if not isinstance(data, dict) or "description" in data:
            return data
        stray = [(key, value) for key, value in data.items() if key not in _ERROR_KEYS]
        if not stray:
            return data
        repaired = {key: value for key, value in data.items() if key in _ERROR_KEYS}
        pieces = [
            str(data.get("evidence", "")),
            *(f"{key}\n{value}" for key, value in stray[:-1]),
            stray[-1][0],
        ]
        repaired["evidence"] = "\n".join(piece for piece in pieces if piece)
        repaired["description"] = str(stray[-1][1])
        return repaired

    @property
    def leaf(self) -> str | None:
        """The taxonomy leaf of `category`, None when its spelling is unknown (see `CATEGORY_VARIANTS`)."""
        return fold_category(self.category)


class _SpanFile(BaseModel):
    trace_id: str
    spans: list[TrailSpan]


class _AnnotationFile(BaseModel):
    trace_id: str | None = None
    errors: list[TrailError] = Field(default_factory=list)
    scores: list[dict[str, Any]] = Field(default_factory=list)


class TrailTrace(BaseModel):
    """One TRAIL execution: its span tree (empty when the release left it out) and its annotations."""

    trace_id: str
    roots: list[TrailSpan] = Field(default_factory=list)
    errors: list[TrailError] = Field(default_factory=list)
    scores: list[dict[str, Any]] = Field(default_factory=list)
    span_file: str | None = None
    annotation_file: str | None = None

    @property
    def has_span_tree(self) -> bool:
        return bool(self.roots)

    def iter_spans(self) -> Iterator[tuple[TrailSpan, TrailSpan | None]]:
        """Every span with its parent in the tree, parents before children."""
        stack: list[tuple[TrailSpan, TrailSpan | None]] = [(root, None) for root in reversed(self.roots)]
        while stack:
            span, parent = stack.pop()
            yield span, parent
            stack.extend((child, span) for child in reversed(span.child_spans))

    def span_ids(self) -> set[str]:
        return {span.span_id for span, _ in self.iter_spans()}


_Model = TypeVar("_Model", bound=BaseModel)


class TrailFormatError(ValueError):
    """A TRAIL file that cannot be read; the message names the file."""


# ---------------------------------------------------------------- loading


def _without_trailing_commas(text: str) -> str:
    """Drop commas that directly precede `}` or `]` outside strings (one gold file has one)."""
    out: list[str] = []
    after_comma: list[str] | None = None  # whitespace seen since a comma outside strings
    in_string = escaped = False
    for char in text:
        if in_string:
            out.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if after_comma is not None:
            if char.isspace():
                after_comma.append(char)
                continue
            if char not in "}]":
                out.append(",")
            out.extend(after_comma)
            after_comma = None
        if char == ",":
            after_comma = []
            continue
        in_string = char == '"'
        out.append(char)
    if after_comma is not None:
        out.append(",")
        out.extend(after_comma)
    return "".join(out)


def _load_json(name: str, raw: bytes, *, lenient: bool) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if lenient:
            try:
                return orjson.loads(_without_trailing_commas(raw.decode("utf-8")))
            except (orjson.JSONDecodeError, UnicodeDecodeError):
                pass
        raise TrailFormatError(f"{name}: not valid JSON: {error}") from None


def _validate(model: type[_Model], name: str, data: Any) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc'])) or '<file>'}: {problem['msg']}"
            for problem in error.errors()[:5]
        )
        raise TrailFormatError(f"{name}: not a TRAIL file: {problems}") from None


def read_span_tree(name: str, raw: bytes) -> TrailTrace:
    """One TRAIL span-tree file (`{trace_id, spans}`) on its own, without annotations."""
    parsed = _parse_span_file(name, raw, None)
    return TrailTrace(trace_id=parsed.trace_id, roots=parsed.spans, span_file=name)


def _parse_span_file(name: str, raw: bytes, stem: str | None) -> _SpanFile:
    parsed = _validate(_SpanFile, name, _load_json(name, raw, lenient=False))
    if stem is not None and parsed.trace_id != stem:
        raise TrailFormatError(f"{name}: trace_id {parsed.trace_id!r} differs from the file name")
    tree = TrailTrace(trace_id=parsed.trace_id, roots=parsed.spans)
    for span, parent in tree.iter_spans():
        if span.trace_id not in (None, parsed.trace_id):
            raise TrailFormatError(f"{name}: span {span.span_id} has trace_id {span.trace_id!r}")
        if parent is not None and span.parent_span_id not in (None, parent.span_id):
            raise TrailFormatError(
                f"{name}: span {span.span_id} names parent {span.parent_span_id} but is nested under "
                f"{parent.span_id}"
            )
    return parsed


def _parse_annotation_file(name: str, raw: bytes, stem: str) -> _AnnotationFile:
    parsed = _validate(_AnnotationFile, name, _load_json(name, raw, lenient=True))
    if parsed.trace_id not in (None, stem):
        raise TrailFormatError(f"{name}: trace_id {parsed.trace_id!r} differs from the file name")
    return parsed


def _annotation_dir(split: str) -> str:
    return "processed_annotations_" + "_".join(split.lower().split())


def _classify(parts: tuple[str, ...], split: str) -> str | None:
    """'spans', 'annotations' or None for a member path of the dataset."""
    if len(parts) < 2 or not parts[-1].endswith(".json"):
        return None
    if len(parts) >= 3 and parts[-3] == "data" and parts[-2] == split:
        return "spans"
    if parts[-2] == _annotation_dir(split):
        return "annotations"
    return None


def _collect(path: Path, split: str) -> dict[str, dict[str, tuple[str, Callable[[], bytes]]]]:
    """Per kind, trace id -> (display name, reader). A tarball is read in one pass; a folder lazily."""
    found: dict[str, dict[str, tuple[str, Callable[[], bytes]]]] = {"spans": {}, "annotations": {}}
    if path.is_dir():
        for file in path.rglob("*.json"):
            kind = _classify(file.relative_to(path).parts, split)
            if kind is not None:
                found[kind][file.stem] = (str(file), file.read_bytes)
        return found
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                kind = _classify(tuple(member.name.split("/")), split) if member.isfile() else None
                extracted = archive.extractfile(member) if kind else None
                if kind and extracted is not None:
                    data = extracted.read()
                    found[kind][Path(member.name).stem] = (f"{path}:{member.name}", lambda data=data: data)
    except (tarfile.TarError, OSError) as error:
        raise TrailFormatError(f"{path}: not a TRAIL folder or readable tar archive: {error}") from None
    return found


def _member_names(path: Path) -> Iterator[tuple[str, ...]]:
    if path.is_dir():
        yield from (file.relative_to(path).parts for file in path.rglob("*.json"))
        return
    try:
        with tarfile.open(path, "r:*") as archive:
            yield from (tuple(m.name.split("/")) for m in archive if m.isfile() and m.name.endswith(".json"))
    except (tarfile.TarError, OSError) as error:
        raise TrailFormatError(f"{path}: not a TRAIL folder or readable tar archive: {error}") from None


def trail_splits(path: str | Path) -> list[str]:
    """The splits of a TRAIL-layout set: every `data/<split>/` that holds span files, else (a set of
    annotations only) every `processed_annotations_<split>/`."""
    names = list(_member_names(Path(path)))
    found = {parts[-2] for parts in names if len(parts) >= 3 and parts[-3] == "data"}
    prefix = "processed_annotations_"
    annotated = {
        parts[-2].removeprefix(prefix) for parts in names if parts[-2:-1] and parts[-2].startswith(prefix)
    }
    return sorted(found or annotated)


def resolve_split(path: str | Path, split: str | None) -> str:
    """The split to read: `split` when given, else the only one the set has."""
    if split is not None:
        return split
    found = trail_splits(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise TrailFormatError(
            f"{path}: no data/<split>/*.json nor processed_annotations_<split>/*.json: not a TRAIL-layout set"
        )
    raise TrailFormatError(f"{path}: several splits ({', '.join(found)}): choose one with --split")


def iter_trail(path: str | Path, *, split: str | None = None) -> Iterator[TrailTrace]:
    """Every trace of a TRAIL split (a `.tar.gz` or an extracted folder), by trace id.

    `split` names the `data/<split>/` folder (its annotations are in `processed_annotations_<split>/`,
    lower case); without it the set must have exactly one split. A trace with annotations but no span
    tree is still yielded, with `has_span_tree` false, so callers can report it; a trace with a span
    tree and no annotation file has no errors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"TRAIL dataset not found: {path}")
    split = resolve_split(path, split)
    found = _collect(path, split)
    if not found["spans"] and not found["annotations"]:
        raise TrailFormatError(
            f"{path}: no data/{split}/*.json nor {_annotation_dir(split)}/*.json: not a TRAIL {split} split"
        )
    for trace_id in sorted(found["spans"].keys() | found["annotations"].keys()):
        span_name, read_spans = found["spans"].get(trace_id, (None, None))
        annotation_name, read_annotations = found["annotations"].get(trace_id, (None, None))
        tree = _parse_span_file(span_name, read_spans(), trace_id) if span_name and read_spans else None
        annotations = (
            _parse_annotation_file(annotation_name, read_annotations(), trace_id)
            if annotation_name and read_annotations
            else _AnnotationFile()
        )
        yield TrailTrace(
            trace_id=trace_id,
            roots=tree.spans if tree else [],
            errors=annotations.errors,
            scores=annotations.scores,
            span_file=span_name,
            annotation_file=annotation_name,
        )


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


# ---------------------------------------------------------------- conversion


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


# ---------------------------------------------------------------- trees, for checking a round trip


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


# ---------------------------------------------------------------- annotations as feedback


@dataclass(frozen=True)
class GoldLabel:
    """The human judgement behind one feedback record: for scoring modes, never sent to the daemon."""

    trace_id: str
    span_id: str | None
    category: str
    leaf: str | None
    impact: str


def _located_span_hex(error: TrailError, known: set[str]) -> str | None:
    return span_id_bytes(error.location).hex() if error.location in known else None


def annotations_to_feedback(trace: TrailTrace, *, with_critique: bool = False) -> list[dict[str, Any]]:
    """One `cegraph.feedback` record per annotated error, naming the span the annotation points at.

    The category stays out (see `gold_labels`, same order): the daemon must find modes without it. With
    `with_critique`, the annotation's description is sent as critique text, as an LLM judge's
    explanation would be. A location that names no span of the tree gives `span_id` None.
    """
    trace_hex = trace_id_bytes(trace.trace_id).hex()
    known = trace.span_ids()
    return [
        {
            "trace_id": trace_hex,
            "span_id": _located_span_hex(error, known),
            "outcome": "failed",
            "score": None,
            "critique": error.description if with_critique else "",
            "source": FEEDBACK_SOURCE,
        }
        for error in trace.errors
    ]


def gold_labels(trace: TrailTrace) -> list[GoldLabel]:
    """The gold category of each annotated error, in the order of `annotations_to_feedback`."""
    trace_hex = trace_id_bytes(trace.trace_id).hex()
    known = trace.span_ids()
    return [
        GoldLabel(trace_hex, _located_span_hex(error, known), error.category, error.leaf, error.impact)
        for error in trace.errors
    ]


# ---------------------------------------------------------------- Kafka


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
