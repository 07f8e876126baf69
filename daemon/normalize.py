"""Spans of either convention (OpenTelemetry GenAI or OpenInference) onto one `Node` shape.

Users keep their instrumentation; this module is the only place that knows attribute names.
Text is cut and, when asked, redacted here, before anything is stored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from cegraph.daemon.spans import STATUS_ERROR, STATUS_OK, Attributes, Evaluation, Node, SpanRecord

OPENINFERENCE_KINDS = {
    "LLM": "llm", "CHAIN": "chain", "TOOL": "tool", "AGENT": "agent", "RETRIEVER": "retrieve",
    "RERANKER": "rerank", "EMBEDDING": "embedding", "GUARDRAIL": "guardrail", "EVALUATOR": "evaluator",
    "PROMPT": "prompt",
}  # fmt: skip
GENAI_OPERATION_KINDS = {
    "chat": "llm", "text_completion": "llm", "generate_content": "llm", "embeddings": "embedding",
    "execute_tool": "tool", "invoke_agent": "agent", "create_agent": "agent",
    "invoke_workflow": "workflow", "retrieval": "retrieve",
}  # fmt: skip

_REDACTIONS = re.compile(
    # The look-behind starts an e-mail only where a run of its characters starts: without it a long
    # run with no "@" (a base64 blob) is rescanned from every position, quadratic in its length.
    r"(?P<email>(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})"
    r"|(?P<key>\b(?:sk-[A-Za-z0-9_-]{16,}|sk_(?:live|test)_[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})\b"
    r"|\bBearer\s+[A-Za-z0-9._~+/-]{16,}=*)"
    r"|(?P<phone>(?<![\w+])\+?(?:\d[\s.-]?){0,3}(?:\(\d{2,4}\)[\s.-]?)?\d{3,4}[\s.-]\d{3,4}(?:[\s.-]\d{2,4})?(?!\w))"
)
_PLACEHOLDERS = {"email": "[email]", "key": "[api-key]", "phone": "[phone]"}


def redact(text: str) -> str:
    """Mask e-mail addresses, API-key-like strings and phone numbers."""
    return _REDACTIONS.sub(lambda match: _PLACEHOLDERS[match.lastgroup or "key"], text)


REDACTION_MARGIN = 512  # longer than any e-mail address, phone number or key the patterns mask


@dataclass(frozen=True, slots=True)
class TextPolicy:
    max_chars: int = 4_000
    redact: bool = True

    def apply(self, text: str) -> str:
        """Redact, then cut to `max_chars`: cutting first could split a secret into an unmatched prefix."""
        if not text:
            return ""
        if self.redact:
            # Only the head is redacted (long inputs are common); it must still fill `max_chars`
            # plus the margin after masking, so that nothing unredacted slides into what is kept.
            window = self.max_chars + REDACTION_MARGIN
            head = redact(text[:window])
            while window < len(text) and len(head) < self.max_chars + REDACTION_MARGIN:
                window *= 2
                head = redact(text[:window])
            text = head + text[window:]
        if len(text) > self.max_chars:
            text = f"{text[: self.max_chars]}…[+{len(text) - self.max_chars} chars]"
        return text


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, default=str).decode()


def _first(attributes: Attributes, *keys: str) -> Any:
    for key in keys:
        value = attributes.get(key)
        if value is not None and value != "":
            return value
    return None


def _int_or_none(value: Any) -> int | None:
    """An int64 or None: the store keeps BIGINTs, and a value it can't hold would fail every commit."""
    try:
        number = None if value is None else int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number is not None and -(2**63) <= number < 2**63 else None


def _float_or_none(value: Any) -> float | None:
    """A finite float or None: NaN and infinities don't survive the JSON of the event log."""
    try:
        number = None if value is None else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _indexed_messages(attributes: Attributes, prefix: str) -> str:
    """OpenInference flattens messages as `llm.input_messages.<i>.message.content`."""
    if f"{prefix}0.message.content" not in attributes and f"{prefix}0.message.role" not in attributes:
        return ""  # the common case, without a scan of every key
    parts = []
    for key, value in attributes.items():
        if key.startswith(prefix) and key.endswith(".message.content"):
            index = key[len(prefix) : -len(".message.content")]
            number = int(index) if index.isascii() and index.isdigit() and len(index) < 19 else -1
            parts.append((number, key, value))
    return "\n".join(_text(value) for _, _, value in sorted(parts, key=lambda part: part[:2]))


def kind_of(attributes: Attributes) -> str:
    explicit = attributes.get("cegraph.node.kind")
    if explicit:
        return str(explicit)
    openinference = attributes.get("openinference.span.kind")
    if openinference:
        return OPENINFERENCE_KINDS.get(str(openinference).upper(), str(openinference).lower())
    operation = attributes.get("gen_ai.operation.name")
    if operation:
        return GENAI_OPERATION_KINDS.get(str(operation), str(operation))
    return "span"


def evaluations_of(span: SpanRecord, kind: str) -> list[Evaluation]:
    found = [
        Evaluation(
            name=str(event.attributes.get("gen_ai.evaluation.name", "")),
            score=_float_or_none(event.attributes.get("gen_ai.evaluation.score.value")),
            label=str(event.attributes.get("gen_ai.evaluation.score.label", "")),
            explanation=_text(event.attributes.get("gen_ai.evaluation.explanation")),
        )
        for event in span.events
        if event.name == "gen_ai.evaluation.result"
    ]
    if kind == "evaluator":
        attributes = span.attributes
        label = _first(attributes, "eval.label", "evaluation.label", "output.value")
        found.append(
            Evaluation(
                name=str(_first(attributes, "eval.name", "evaluation.name") or span.name),
                score=_float_or_none(_first(attributes, "eval.score", "evaluation.score")),
                label=_text(label)[:64],
                explanation=_text(_first(attributes, "eval.explanation", "evaluation.explanation")),
            )
        )
    return found


def normalize(span: SpanRecord, policy: TextPolicy) -> Node:
    attributes, resource = span.attributes, span.resource
    kind = kind_of(attributes)
    exception_type = exception_message = ""
    for event in span.events:
        if event.name == "exception":
            exception_type = _text(event.attributes.get("exception.type"))
            exception_message = _text(event.attributes.get("exception.message"))
            break
    finish = attributes.get("gen_ai.response.finish_reasons")
    if finish is None:
        finish = attributes.get("llm.finish_reason")
    finish_reasons = (
        [str(f) for f in finish] if isinstance(finish, list) else ([str(finish)] if finish else [])
    )
    status = {STATUS_ERROR: "error", STATUS_OK: "ok"}.get(span.status_code, "unset")
    error_type = _text(attributes.get("error.type"))
    evaluations = evaluations_of(span, kind)
    input_text = _first(attributes, "gen_ai.input.messages", "input.value", "gen_ai.prompt")
    output_text = _first(attributes, "gen_ai.output.messages", "output.value", "gen_ai.completion")
    return Node(
        trace_id=span.trace_id,
        span_id=span.span_id,
        parent_span_id=span.parent_span_id,
        parent_is_remote=span.parent_is_remote,
        name=span.name,
        kind=kind,
        node_id=str(_first(attributes, "cegraph.node.id", "graph.node.id") or span.name),
        workflow_id=str(
            _first(attributes, "cegraph.workflow.id")
            or _first(resource, "cegraph.workflow.id", "service.name")
            or ""
        ),
        workflow_version=str(
            _first(attributes, "cegraph.workflow.version")
            or _first(resource, "cegraph.workflow.version", "service.version")
            or ""
        ),
        track=str(_first(attributes, "cegraph.track") or ""),
        operation=str(_first(attributes, "gen_ai.operation.name") or kind),
        provider=str(
            _first(attributes, "gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system") or ""
        ),
        model=str(
            _first(attributes, "gen_ai.request.model", "gen_ai.response.model", "llm.model_name") or ""
        ),
        start_ns=span.start_ns,
        end_ns=span.end_ns,
        status="error"
        if span.status_code == STATUS_ERROR
        else "ok"
        if span.status_code == STATUS_OK
        else "unset",
        status_message=policy.apply(span.status_message),
        error_type=error_type,
        exception_type=exception_type,
        exception_message=policy.apply(exception_message),
        finish_reasons=finish_reasons,
        input_tokens=_int_or_none(
            _first(
                attributes,
                "gen_ai.usage.input_tokens",
                "gen_ai.usage.prompt_tokens",
                "llm.token_count.prompt",
            )
        ),
        output_tokens=_int_or_none(
            _first(
                attributes,
                "gen_ai.usage.output_tokens",
                "gen_ai.usage.completion_tokens",
                "llm.token_count.completion",
            )
        ),
        tool_name=str(_first(attributes, "gen_ai.tool.name", "tool.name") or ""),
        input_text=policy.apply(
            _text(input_text)
            if input_text is not None
            else _indexed_messages(attributes, "llm.input_messages.")
        ),
        output_text=policy.apply(
            _text(output_text)
            if output_text is not None
            else _indexed_messages(attributes, "llm.output_messages.")
        ),
        evaluations=evaluations,
        hard_failed=status == "error" or bool(exception_type) or bool(error_type),
        eval_failed=any(evaluation.failed for evaluation in evaluations),
    )
