"""Spans of either convention (OpenTelemetry GenAI or OpenInference) onto one `Node` shape.

Users keep their instrumentation; this module is the only place that knows attribute names.
Text is cut and, when asked, redacted here, before anything is stored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import orjson

from cegraph.daemon.spans import (
    STATUS_ERROR,
    STATUS_OK,
    Attributes,
    Evaluation,
    LogDetails,
    Node,
    SpanEvent,
    SpanRecord,
    hard_failure_source,
)

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

EVALUATION_EVENT = "gen_ai.evaluation.result"

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


def _message_index(text: str) -> int:
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else -1


def _indexed_messages(attributes: Attributes, prefix: str) -> str | None:
    """OpenInference flattens messages as `<prefix><i>.message.content` and, for an assistant's tool
    calls, `<prefix><i>.message.tool_calls.<j>.tool_call.function.name|arguments`: their text in
    message order, a tool call as `name(arguments)`. None when the span has no such messages."""
    if f"{prefix}0.message.content" not in attributes and f"{prefix}0.message.role" not in attributes:
        return None  # the common case, without a scan of every key
    parts: list[tuple[int, int, str, str]] = []
    calls: dict[tuple[int, int], dict[str, str]] = {}
    for key, value in attributes.items():
        if not key.startswith(prefix):
            continue
        index, _, rest = key[len(prefix) :].partition(".")
        if rest == "message.content":
            parts.append((_message_index(index), -1, key, _text(value)))
        elif rest.startswith("message.tool_calls."):
            call, _, name = rest[len("message.tool_calls.") :].partition(".")
            field = name.removeprefix("tool_call.function.")
            if field in ("name", "arguments") and field != name:
                calls.setdefault((_message_index(index), _message_index(call)), {})[field] = _text(value)
    for (index, call), function in calls.items():
        parts.append((index, call, "", f"{function.get('name', '')}({function.get('arguments', '')})"))
    return "\n".join(text for *_, text in sorted(parts))


def _refusal(raw_output: Any) -> str:
    """OpenAI's `message.refusal`, which OpenInference keeps only in the raw response (`output.value`)."""
    if not isinstance(raw_output, str) or '"refusal"' not in raw_output:
        return ""
    try:
        response = orjson.loads(raw_output)
    except orjson.JSONDecodeError:
        return ""
    choices = response.get("choices") if isinstance(response, dict) else None
    refusals = [
        choice["message"]["refusal"]
        for choice in choices or ()
        if isinstance(choice, dict)
        and isinstance(choice.get("message"), dict)
        and isinstance(choice["message"].get("refusal"), str)
    ]
    return "\n".join(refusals)


def _invoked_model(parameters: Any) -> Any:
    """`model` of OpenInference's `llm.invocation_parameters` (JSON): the requested model, which error
    spans carry too (`llm.model_name` is the response's, so only successful calls have it)."""
    if not isinstance(parameters, str) or '"model"' not in parameters:
        return None
    try:
        decoded = orjson.loads(parameters)
    except orjson.JSONDecodeError:
        return None
    return decoded.get("model") if isinstance(decoded, dict) else None


_CLASS_REPR = re.compile(r"<class '([^']+)'>")


def error_class(text: str) -> str:
    """One spelling of an error class: `str(type(exc))` ("<class 'openai.InternalServerError'>", as
    opentelemetry-instrumentation-openai-v2 sets `error.type`) becomes "openai.InternalServerError",
    as OpenInference's exception events spell it."""
    match = _CLASS_REPR.fullmatch(text.strip())
    return match.group(1) if match else text.strip()


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
    ("gen_ai.request.model", "gen_ai.response.model"),
    ("llm.invocation_parameters",),
    ("llm.model_name",),
    ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt"),
    ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.token_count.completion"),
    ("gen_ai.tool.name", "tool.name"),
    ("gen_ai.input.messages",),
    ("input.value", "gen_ai.prompt"),
    ("gen_ai.output.messages",),
    ("output.value", "gen_ai.completion"),
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


def _evaluation_events(events: list[SpanEvent]) -> list[Evaluation]:
    return [
        Evaluation(
            name=str(event.attributes.get("gen_ai.evaluation.name", "")),
            score=_float_or_none(event.attributes.get("gen_ai.evaluation.score.value")),
            label=str(event.attributes.get("gen_ai.evaluation.score.label", "")),
            explanation=_text(event.attributes.get("gen_ai.evaluation.explanation")),
        )
        for event in events
        if event.name == EVALUATION_EVENT
    ]


def evaluations_of(span: SpanRecord, kind: str) -> list[Evaluation]:
    found = _evaluation_events(span.events)
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


def _exception(events: list[SpanEvent]) -> tuple[str, str]:
    for event in events:
        if event.name == "exception":
            return (
                error_class(_text(event.attributes.get("exception.type"))),
                _text(event.attributes.get("exception.message")),
            )
    return "", ""


def _finish_reasons(attributes: Attributes) -> list[str]:
    finish = attributes.get("gen_ai.response.finish_reasons")
    if finish is None:
        finish = attributes.get("llm.finish_reason")
    return [str(f) for f in finish] if isinstance(finish, list) else ([str(finish)] if finish else [])


def _error_types(attributes: Attributes, exception_type: str) -> tuple[str, str]:
    """(error type, exception class), spelled alike whichever convention set them: `error.type` or,
    without it, the exception's class; an `error.type` that is a class repr names the exception too."""
    raw = _text(attributes.get("error.type"))
    error_type = error_class(raw) if raw else ""
    if not exception_type and error_type and error_type != raw.strip():
        exception_type = error_type
    return error_type or exception_type, exception_type


_STATUS_NAMES = {STATUS_ERROR: "error", STATUS_OK: "ok"}


def normalize(span: SpanRecord, policy: TextPolicy) -> Node:
    attributes = span.attributes
    (
        explicit_kind, openinference_kind, operation, node_id, workflow_id, workflow_version, track,
        provider, model, invocation_parameters, response_model, input_tokens, output_tokens, tool_name,
        genai_input, raw_input, genai_output, raw_output, seed,
    ) = _pick(attributes)  # fmt: skip
    kind = _kind(explicit_kind, openinference_kind, operation)
    exception_type, exception_message = _exception(span.events)
    error_type, exception_type = _error_types(attributes, exception_type)
    finish_reasons = _finish_reasons(attributes)
    status = _STATUS_NAMES.get(span.status_code, "unset")
    evaluations = evaluations_of(span, kind) if span.events or kind == "evaluator" else []
    workflow_id = workflow_id or _first(span.resource, "cegraph.workflow.id", "service.name")
    workflow_version = workflow_version or _first(
        span.resource, "cegraph.workflow.version", "service.version"
    )
    # Message contents before raw request/response JSON (OpenInference's input.value / output.value).
    input_text = _text(genai_input) if genai_input is not None else None
    if input_text is None:
        input_text = _indexed_messages(attributes, "llm.input_messages.")
    if input_text is None:
        input_text = _text(raw_input)
    output_text = _text(genai_output) if genai_output is not None else None
    if output_text is None:
        output_text = _indexed_messages(attributes, "llm.output_messages.")
    refusal = _refusal(raw_output) if not output_text else ""
    if output_text is None or refusal:
        output_text = refusal or _text(raw_output)
    model = model or _invoked_model(invocation_parameters) or response_model
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
        policy.apply_ends(input_text),
        policy.apply(output_text),
        evaluations,
        bool(hard_failure_source(status, exception_type, error_type, finish_reasons, refusal)),
        any(evaluation.failed for evaluation in evaluations),
        span.parent_is_remote,
        _int_or_none(seed),
        policy.apply(refusal) if refusal else "",
    )


def log_details(event: SpanEvent, policy: TextPolicy) -> LogDetails:
    """What a log record (joined by trace and span id) can add to its span's node: GenAI content
    captured `event_only` (`gen_ai.client.inference.operation.details`), evaluation results and
    exceptions sent as events. Raises on what a record can't say (its message is dead-lettered)."""
    attributes = event.attributes
    exception_type, message = _exception([event])
    error_type, exception_type = _error_types(attributes, exception_type)
    genai_input, genai_output = (
        attributes.get("gen_ai.input.messages"),
        attributes.get("gen_ai.output.messages"),
    )
    return LogDetails(
        model=_text(_first(attributes, "gen_ai.request.model", "gen_ai.response.model")),
        error_type=error_type,
        exception_type=exception_type,
        exception_message=policy.apply(message) if message else "",
        finish_reasons=_finish_reasons(attributes),
        evaluations=_evaluation_events([event]),
        input_text=policy.apply_ends(_text(genai_input)) if genai_input else "",
        output_text=policy.apply(_text(genai_output)) if genai_output else "",
    )


def with_log_details(node: Node, details: list[LogDetails]) -> Node:
    """The node with what its span's log records add: the span's own attributes win, the records (in
    arrival order) fill what it lacks, and their evaluations are added to the span's."""

    def first(own: Any, field: str) -> Any:
        return own or next((getattr(d, field) for d in details if getattr(d, field)), own)

    thrown = next((d for d in details if d.exception_type), None) if not node.exception_type else None
    exception_type = thrown.exception_type if thrown else node.exception_type
    exception_message = thrown.exception_message if thrown else node.exception_message
    error_type = first(node.error_type, "error_type")
    finish_reasons = first(node.finish_reasons, "finish_reasons")
    evaluations = node.evaluations + [e for d in details for e in d.evaluations]
    return replace(
        node,
        model=first(node.model, "model"),
        error_type=error_type,
        exception_type=exception_type,
        exception_message=exception_message,
        finish_reasons=finish_reasons,
        input_text=first(node.input_text, "input_text"),
        output_text=first(node.output_text, "output_text"),
        evaluations=evaluations,
        hard_failed=bool(
            hard_failure_source(node.status, exception_type, error_type, finish_reasons, node.refusal)
        ),
        eval_failed=any(evaluation.failed for evaluation in evaluations),
    )


def distinct_node_ids(nodes: list[Node]) -> list[Node]:
    """One execution's nodes in execution (start) order, with node ids that tell its calls apart.

    A span without a node id of its own (`cegraph.node.id`, `graph.node.id`) is named by its span
    name, which instrumentations share between calls ("chat gpt-4o", "ChatCompletion"): the second
    and later such calls of an execution become "<name>#2", "#3"... A call after a failed call of
    the same name under the same parent is a retry of that step and keeps its id (so retries count).
    """
    occurrences: dict[str, int] = {}
    last: dict[tuple[str, str], Node] = {}  # (parent span id, name) -> the latest node so named
    named = []
    for node in sorted(nodes, key=lambda n: (n.start_ns, n.span_id)):
        if node.node_id != node.name:
            named.append(node)
            continue
        previous = last.get((node.parent_span_id, node.name))
        if previous is not None and previous.hard_failed:
            node_id = previous.node_id
        else:
            occurrences[node.name] = count = occurrences.get(node.name, 0) + 1
            node_id = node.name if count == 1 else f"{node.name}#{count}"
        if node_id != node.node_id:
            node = replace(node, node_id=node_id)
        last[(node.parent_span_id, node.name)] = node
        named.append(node)
    return named
