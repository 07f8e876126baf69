"""Spans as the daemon sees them, before and after normalization.

`SpanRecord` is the wire-format-neutral span the codecs produce (OTLP protobuf or JSON); `Node` is the
normalized execution-graph node that both instrumentation conventions (OpenTelemetry GenAI and
OpenInference) map onto. Slotted dataclasses, not pydantic: tens of thousands are made per second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Attributes = dict[str, Any]

STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2

# Finish reasons that end an answer the caller did not get whole, or did not get at all.
TRUNCATING_FINISH = frozenset({"length", "content_filter", "max_tokens"})
REFUSING_FINISH = frozenset({"refusal"})  # Anthropic's stop reason; OpenAI sends `message.refusal`


def hard_failure_source(
    status: str, exception_type: str, error_type: str, finish_reasons: list[str], refusal: str
) -> str:
    """Why a span failed by itself ("error", "truncated", "refusal"), or "" when it did not.

    The one meaning of a hard failure: `Node.hard_failed` (and so `stats`, the canary judge and the
    executions table) and the failure labels of `failures.py` both come from it.
    """
    if status == "error" or exception_type or error_type:
        return "error"
    if refusal or not REFUSING_FINISH.isdisjoint(finish_reasons):
        return "refusal"
    if not TRUNCATING_FINISH.isdisjoint(finish_reasons):
        return "truncated"
    return ""


class InvalidMessage(ValueError):
    """A message is not what its topic should carry; `str(error)` is the dead-letter reason."""


@dataclass(slots=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: Attributes


@dataclass(slots=True)
class SpanRecord:
    """One decoded span: ids as lowercase hex, `parent_span_id` empty for a root span."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    status_code: int
    status_message: str
    attributes: Attributes
    events: list[SpanEvent]
    resource: Attributes
    parent_is_remote: bool = False  # OTLP span flags: the parent lives in another service


@dataclass(slots=True)
class SpanLog:
    """One OTLP log record as an event of the span it names (ids lowercase hex, "" when it names none):
    how GenAI instrumentations send message content (`event_only`) and evaluation results."""

    trace_id: str
    span_id: str
    event: SpanEvent


@dataclass(frozen=True, slots=True)
class LogDetails:
    """What one log record adds to the node of its span, normalized at the record's message (so that
    joining it to the node when the trace completes is field selection and cannot fail)."""

    model: str
    error_type: str
    exception_type: str
    exception_message: str
    finish_reasons: list[str]
    evaluations: list[Evaluation]
    input_text: str
    output_text: str


@dataclass(slots=True)
class Evaluation:
    """An evaluator's verdict on a span (GenAI `gen_ai.evaluation.result` or an OpenInference EVALUATOR)."""

    name: str
    score: float | None
    label: str
    explanation: str

    @property
    def failed(self) -> bool:
        label = self.label.lower()
        if label in FAILING_LABELS:
            return True
        if label in PASSING_LABELS:
            return False
        return self.score is not None and self.score < 0.5


# Besides the generic verdicts, the rails of the Phoenix evaluators (OpenInference EVALUATOR spans).
FAILING_LABELS = frozenset(
    {"fail", "failed", "failure", "false", "incorrect", "wrong", "bad", "no", "error",
     "hallucinated", "unrelated", "toxic"}
)  # fmt: skip
PASSING_LABELS = frozenset(
    {"pass", "passed", "success", "true", "correct", "right", "good", "yes", "ok",
     "factual", "relevant", "non-toxic"}
)  # fmt: skip


@dataclass(slots=True)
class Node:
    """A normalized node of one execution graph; what the `nodes` projection stores."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    node_id: str
    workflow_id: str
    workflow_version: str
    track: str
    operation: str
    provider: str
    model: str
    start_ns: int
    end_ns: int
    status: str
    status_message: str
    error_type: str
    exception_type: str
    exception_message: str
    finish_reasons: list[str]
    input_tokens: int | None
    output_tokens: int | None
    tool_name: str
    input_text: str
    output_text: str
    evaluations: list[Evaluation] = field(default_factory=list)
    hard_failed: bool = False  # `hard_failure_source` says why: an error, a truncation or a refusal
    eval_failed: bool = False  # an evaluator's verdict on this span was a failure
    parent_is_remote: bool = False  # the parent span is in another service: this is the local root
    seed: int | None = None  # `cegraph.seed` of a workflow root: what makes the execution replayable
    refusal: str = ""  # the model declined: its refusal text (OpenAI `message.refusal`), if it gave one

    def hard_failure_source(self) -> str:
        return hard_failure_source(
            self.status, self.exception_type, self.error_type, self.finish_reasons, self.refusal
        )

    @property
    def is_root(self) -> bool:
        """The root of this service's part of the trace: no parent, or a parent elsewhere."""
        return not self.parent_span_id or self.parent_is_remote
