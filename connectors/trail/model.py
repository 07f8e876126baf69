"""TRAIL's executions as typed models: span trees, span events and expert error annotations.

TRAIL ships real smolagents executions recorded with OpenInference instrumentation, exported as nested
span trees whose attribute values are all strings, plus expert error annotations that name a span and a
category of a 20-leaf taxonomy (`taxonomy.py`). Times, status codes and span kinds are parsed when a
file is loaded, so a bad value is refused naming its file (`parse.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from pydantic import AliasChoices, BaseModel, BeforeValidator, Field, model_validator

from cegraph.connectors.trail.taxonomy import fold_category

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
