"""The `cegraph.feedback` message: a late outcome signal for one execution.

User thumbs-down, an offline evaluator's verdict or a human annotation: it names the execution by its
trace id and, optionally, the span where it went wrong (the point of failure), and what the right
output was when the signal knows it (so that replays of the execution can be judged).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_SPAN_ID = re.compile(r"^[0-9a-f]{16}$")


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", title="cegraph feedback")

    trace_id: str = Field(description="Hex trace id of the execution (32 hex digits, as in OTLP/JSON).")
    span_id: str | None = Field(None, description="Hex span id of the point of failure, if known.")
    outcome: Literal["failed", "passed"] = Field(description="Whether the execution failed.")
    score: float | None = Field(None, description="Optional score, e.g. an evaluator's value in [0, 1].")
    critique: str = Field("", max_length=20_000, description="Why it failed: a judge's or a user's words.")
    source: str = Field(
        "unknown", max_length=200, description="Who said so: user, evaluator, annotation, ..."
    )
    created_at: datetime | None = Field(None, description="When the signal was produced.")
    expected: JsonValue = Field(
        None,
        description="The correct output, when the signal knows it (a user's correction, an annotator's "
        "answer): the reference the workflow's evaluators compare a replay of this execution with.",
    )

    @field_validator("trace_id")
    @classmethod
    def _trace_id_is_hex(cls, value: str) -> str:
        value = value.lower().removeprefix("0x")
        if not _TRACE_ID.match(value):
            raise ValueError("must be 32 hex digits")
        return value

    @field_validator("span_id")
    @classmethod
    def _span_id_is_hex(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        value = value.lower().removeprefix("0x")
        if not _SPAN_ID.match(value):
            raise ValueError("must be 16 hex digits")
        return value
