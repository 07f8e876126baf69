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
# Something every match of `_REDACTIONS` contains: an "@", a key's literal prefix, or the six digits
# around a phone number's inner separator. Far cheaper to scan for, and most texts have none.
_MAY_REDACT = re.compile(r"@|sk[-_]|AKIA|gh[pousr]_|xox[abprs]-|AIza|Bearer|\d{3}[\s.-]\d{3}")


def redact(text: str) -> str:
    """Mask e-mail addresses, API-key-like strings and phone numbers."""
    if _MAY_REDACT.search(text) is None:
        return text
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
        head = self._redacted_head(text, self.max_chars)
        if len(head) > self.max_chars:
            head = f"{head[: self.max_chars]}…[+{len(head) - self.max_chars} chars]"
        return head

    def apply_ends(self, text: str) -> str:
        """Like `apply`, but a long text keeps its first quarter and its last three quarters.

        An LLM call's input is the shared prompt first and what is new to the call (the latest
        messages, the last tool observation) at the end: the end is what tells failures apart.
        """
        if not text:
            return ""
        whole = self._redacted_head(text, self.max_chars)
        if len(whole) <= self.max_chars:
            return whole
        first = self.max_chars // 4
        last = self.max_chars - first
        end = self._redacted_head(text[::-1], last, reverse=True)[::-1][-last:] if last else ""
        space = end.find(" ", 0, 40)  # start the end at a word: half a word is a meaningless term
        end = end[space + 1 :] if space >= 0 else end
        omitted = max(len(text) - first - last, 0)
        return f"{whole[:first]}…[{omitted} chars]…{end}"

    def _redacted_head(self, text: str, keep: int, *, reverse: bool = False) -> str:
        """The text with at least its first `keep` characters (after masking) redacted."""
        if not self.redact:
            return text
        # Only the head is redacted (long inputs are common); it must still fill `keep` plus the
        # margin after masking, so that nothing unredacted slides into what is kept.
        mask = (lambda t: redact(t[::-1])[::-1]) if reverse else redact
        window = keep + REDACTION_MARGIN
        head = mask(text[:window])
        while window < len(text) and len(head) < keep + REDACTION_MARGIN:
            window *= 2
            head = mask(text[:window])
        return head + text[window:]


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


# What `normalize` reads from a span's attributes: per field, its keys in order of precedence (the
# first one set, neither None nor "", wins). `_pick` finds them all in one pass over the attributes,
# instead of ~40 lookups per span.
_PICKED_KEYS: tuple[tuple[str, ...], ...] = (
    ("cegraph.node.kind",),
    ("openinference.span.kind",),
    ("gen_ai.operation.name",),
    ("cegraph.node.id", "graph.node.id"),
    ("cegraph.workflow.id",),
    ("cegraph.workflow.version",),
    ("cegraph.track",),
    ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system"),
    ("gen_ai.request.model", "gen_ai.response.model", "llm.model_name"),
    ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt"),
    ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.token_count.completion"),
    ("gen_ai.tool.name", "tool.name"),
    ("gen_ai.input.messages", "input.value", "gen_ai.prompt"),
    ("gen_ai.output.messages", "output.value", "gen_ai.completion"),
    ("cegraph.seed",),
)
_SLOT_OF: dict[str, tuple[int, int]] = {
    key: (slot, rank) for slot, keys in enumerate(_PICKED_KEYS) for rank, key in enumerate(keys)
}
_UNRANKED = len(max(_PICKED_KEYS, key=len))


def _pick(attributes: Attributes) -> list[Any]:
    """Per entry of `_PICKED_KEYS`, the value of its first key that is set, else None."""
    values: list[Any] = [None] * len(_PICKED_KEYS)
    ranks = [_UNRANKED] * len(_PICKED_KEYS)
    for key, value in attributes.items():
        found = _SLOT_OF.get(key)
        if found is not None and value is not None and value != "":
            slot, rank = found
            if rank < ranks[slot]:
                ranks[slot] = rank
                values[slot] = value
    return values


def _kind(explicit: Any, openinference: Any, operation: Any) -> str:
    if explicit:
        return str(explicit)
    if openinference:
        return OPENINFERENCE_KINDS.get(str(openinference).upper(), str(openinference).lower())
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


_STATUS_NAMES = {STATUS_ERROR: "error", STATUS_OK: "ok"}


def normalize(span: SpanRecord, policy: TextPolicy) -> Node:
    attributes = span.attributes
    (
        explicit_kind, openinference_kind, operation, node_id, workflow_id, workflow_version, track,
        provider, model, input_tokens, output_tokens, tool_name, input_text, output_text, seed,
    ) = _pick(attributes)  # fmt: skip
    kind = _kind(explicit_kind, openinference_kind, operation)
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
    status = _STATUS_NAMES.get(span.status_code, "unset")
    error_type = _text(attributes.get("error.type"))
    evaluations = evaluations_of(span, kind) if span.events or kind == "evaluator" else []
    workflow_id = workflow_id or _first(span.resource, "cegraph.workflow.id", "service.name")
    workflow_version = workflow_version or _first(
        span.resource, "cegraph.workflow.version", "service.version"
    )
    return Node(
        span.trace_id,
        span.span_id,
        span.parent_span_id,
        span.name,
        kind,
        str(node_id or span.name),
        str(workflow_id or ""),
        str(workflow_version or ""),
        str(track or ""),
        str(operation or kind),
        str(provider or ""),
        str(model or ""),
        span.start_ns,
        span.end_ns,
        status,
        policy.apply(span.status_message) if span.status_message else "",
        error_type,
        exception_type,
        policy.apply(exception_message) if exception_message else "",
        finish_reasons,
        _int_or_none(input_tokens),
        _int_or_none(output_tokens),
        str(tool_name or ""),
        policy.apply_ends(
            _text(input_text)
            if input_text is not None
            else _indexed_messages(attributes, "llm.input_messages.")
        ),
        policy.apply(
            _text(output_text)
            if output_text is not None
            else _indexed_messages(attributes, "llm.output_messages.")
        ),
        evaluations,
        status == "error" or bool(exception_type) or bool(error_type),
        any(evaluation.failed for evaluation in evaluations),
        span.parent_is_remote,
        _int_or_none(seed),
    )
