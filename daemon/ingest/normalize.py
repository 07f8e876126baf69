"""Spans of either convention (OpenTelemetry GenAI or OpenInference) onto one `Node` shape.

Users keep their instrumentation; this module is the only place that knows attribute names.
Text is cut and, when asked, redacted here, before anything is stored. `normalize` is one span at a
time, the reference; `normalize_columns` the same for a decoded batch, on its columns, and it turns
only the keys of `SPAN_KEYS` (and the flattened messages) into Python: a key `normalize` reads must
be among them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from cegraph.connectors.otlp.codec import REMOTE_PARENT, ProtoSpans, any_value
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


MESSAGE_PREFIXES = ("llm.input_messages.", "llm.output_messages.")  # OpenInference's flattened messages


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


_EVALUATION_KEYS = (
    "gen_ai.evaluation.name",
    "gen_ai.evaluation.score.value",
    "gen_ai.evaluation.score.label",
    "gen_ai.evaluation.explanation",
)


def _evaluation_events(events: list[SpanEvent]) -> list[Evaluation]:
    name, score, label, explanation = _EVALUATION_KEYS
    return [
        Evaluation(
            name=str(event.attributes.get(name, "")),
            score=_float_or_none(event.attributes.get(score)),
            label=str(event.attributes.get(label, "")),
            explanation=_text(event.attributes.get(explanation)),
        )
        for event in events
        if event.name == EVALUATION_EVENT
    ]


# An OpenInference EVALUATOR span's verdict: its name, score, label and explanation, each the first set.
_EVALUATOR_KEYS = (
    ("eval.name", "evaluation.name"),
    ("eval.score", "evaluation.score"),
    ("eval.label", "evaluation.label", "output.value"),
    ("eval.explanation", "evaluation.explanation"),
)


def evaluations_of(span: SpanRecord, kind: str) -> list[Evaluation]:
    found = _evaluation_events(span.events)
    if kind == "evaluator":
        name, score, label, explanation = (_first(span.attributes, *keys) for keys in _EVALUATOR_KEYS)
        found.append(
            Evaluation(
                name=str(name or span.name),
                score=_float_or_none(score),
                label=_text(label)[:64],
                explanation=_text(explanation),
            )
        )
    return found


_EXCEPTION_KEYS = ("exception.type", "exception.message")


def _exception(events: list[SpanEvent]) -> tuple[str, str]:
    type_key, message_key = _EXCEPTION_KEYS
    for event in events:
        if event.name == "exception":
            return (
                error_class(_text(event.attributes.get(type_key))),
                _text(event.attributes.get(message_key)),
            )
    return "", ""


_FINISH_KEYS = ("gen_ai.response.finish_reasons", "llm.finish_reason")


def _finish_reasons(attributes: Attributes) -> list[str]:
    finish = attributes.get(_FINISH_KEYS[0])
    if finish is None:
        finish = attributes.get(_FINISH_KEYS[1])
    return _finish_list(finish)


def _finish_list(finish: Any) -> list[str]:
    return [str(f) for f in finish] if isinstance(finish, list) else ([str(finish)] if finish else [])


ERROR_TYPE_KEY = "error.type"


def _error_types(attributes: Attributes, exception_type: str) -> tuple[str, str]:
    """(error type, exception class), spelled alike whichever convention set them: `error.type` or,
    without it, the exception's class; an `error.type` that is a class repr names the exception too."""
    raw = _text(attributes.get(ERROR_TYPE_KEY))
    error_type = error_class(raw) if raw else ""
    if not exception_type and error_type and error_type != raw.strip():
        exception_type = error_type
    return error_type or exception_type, exception_type


_STATUS_NAMES = {STATUS_ERROR: "error", STATUS_OK: "ok"}
# What a span lacking its own workflow id and version takes from its resource.
_WORKFLOW_ID_KEYS = ("cegraph.workflow.id", "service.name")
_WORKFLOW_VERSION_KEYS = ("cegraph.workflow.version", "service.version")


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
    workflow_id = workflow_id or _first(span.resource, *_WORKFLOW_ID_KEYS)
    workflow_version = workflow_version or _first(span.resource, *_WORKFLOW_VERSION_KEYS)
    # Message contents before raw request/response JSON (OpenInference's input.value / output.value).
    input_text = _text(genai_input) if genai_input is not None else None
    if input_text is None:
        input_text = _indexed_messages(attributes, MESSAGE_PREFIXES[0])
    if input_text is None:
        input_text = _text(raw_input)
    output_text = _text(genai_output) if genai_output is not None else None
    if output_text is None:
        output_text = _indexed_messages(attributes, MESSAGE_PREFIXES[1])
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


# ---------------------------------------------------------------- columnar
#
# `normalize_columns` is `normalize` for a batch of decoded exports (`ProtoSpans`), on their Arrow
# columns: only the attributes `normalize` reads become Python values, and what a span needs is
# computed a column at a time. A span the columns can't settle exactly (a key given twice, a value of
# an unexpected type, OpenInference's flattened messages, a refusal or a model to dig out of JSON, an
# evaluator span) is normalized by `normalize` itself, from a record of just those attributes.

# Every attribute key `normalize` reads besides the flattened messages.
SPAN_KEYS = frozenset(_SLOT_OF) | {
    ERROR_TYPE_KEY,
    *_FINISH_KEYS,
    *(k for keys in _EVALUATOR_KEYS for k in keys),
}
_MESSAGE_MARKERS = frozenset(f"{p}0.message.{f}" for p in MESSAGE_PREFIXES for f in ("content", "role"))
RESOURCE_KEYS = frozenset({*_WORKFLOW_ID_KEYS, *_WORKFLOW_VERSION_KEYS})
EVENT_NAMES = frozenset({"exception", EVALUATION_EVENT})
EVENT_KEYS = frozenset({*_EXCEPTION_KEYS, *_EVALUATION_KEYS})

# OTLP `AnyValue`'s oneof as ptars decodes it: one column per field, the one set is not null.
_ANY_VALUE_FIELDS = ("string_value", "bool_value", "int_value", "double_value", "array_value",
                     "kvlist_value", "bytes_value", "string_value_strindex")  # fmt: skip
_STRING, _INT, _ARRAY = 0, 2, 4
_INT_SLOTS = frozenset(
    _SLOT_OF[key][0] for key in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "cegraph.seed")
)
_KEYS = sorted(SPAN_KEYS | _MESSAGE_MARKERS)
_KEY_ARRAY = pa.array(_KEYS)
_SLOT = np.array([_SLOT_OF.get(key, (-1, 0))[0] for key in _KEYS])
_RANK = np.array([_SLOT_OF.get(key, (-1, 0))[1] for key in _KEYS])
_EVALUATOR_ONLY = {k for keys in _EVALUATOR_KEYS for k in keys} - set(_SLOT_OF)


def _expected_kinds(key: str) -> set[int]:
    """The value kinds the columnar path takes for a key (an unset value always); others go to `normalize`."""
    if key in _MESSAGE_MARKERS:
        return set()
    if key in _EVALUATOR_ONLY:
        return set(range(len(_ANY_VALUE_FIELDS)))
    if key in _FINISH_KEYS:
        return {_STRING, _ARRAY}
    return {_INT} if _SLOT_OF.get(key, (-1, 0))[0] in _INT_SLOTS else {_STRING}


_ACCEPTED = np.array(
    [[kind in _expected_kinds(key) for kind in range(len(_ANY_VALUE_FIELDS))] for key in _KEYS]
)
# A superset of `_MAY_REDACT` in RE2 (Arrow's regex engine): a non-ASCII character may be a digit.
_DIGIT_RE2 = r"(?:[0-9]|[^\x00-\x7f])"
_MAY_REDACT_RE2 = (
    rf"@|sk[-_]|AKIA|gh[pousr]_|xox[abprs]-|AIza|Bearer|{_DIGIT_RE2}{{3}}(?s:.){_DIGIT_RE2}{{3}}"
)


@dataclass(frozen=True, slots=True)
class _Pairs:
    """The key-values of lists of OTLP key-values whose key is wanted, in order."""

    owner: np.ndarray  # the index of each pair's list
    keys: pa.Array
    kind: np.ndarray  # the index in `_ANY_VALUE_FIELDS` of the value's field that is set, -1 for none
    values: pa.StructArray


def _pairs(lists: pa.ListArray, wanted: pa.Array, prefixes: tuple[str, ...] = ()) -> _Pairs:
    """The pairs whose key is wanted or starts with one of `prefixes`."""
    pairs = pc.list_flatten(lists)
    keys = pc.struct_field(pairs, "key")
    mask = pc.is_in(keys, wanted)
    for prefix in prefixes:
        mask = pc.or_(mask, pc.starts_with(keys, prefix))
    owner = np.asarray(pc.list_parent_indices(lists))[np.asarray(mask, dtype=bool)]
    chosen = pairs.filter(mask)
    values = pc.struct_field(chosen, "value")
    kind = np.full(len(chosen), -1)
    valid = np.asarray(values.is_valid(), dtype=bool)
    for index in reversed(range(len(_ANY_VALUE_FIELDS))):
        kind[np.asarray(pc.struct_field(values, _ANY_VALUE_FIELDS[index]).is_valid(), dtype=bool) & valid] = (
            index
        )
    return _Pairs(owner, pc.struct_field(chosen, "key"), kind, values)


def _array_value(item: dict[str, list[bytes]]) -> list[Any]:
    return [any_value(AnyValue.FromString(raw)) for raw in item["values"]]


def _kvlist_value(item: dict[str, list[bytes]]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in map(KeyValue.FromString, item["values"])}


_NESTED = {_ARRAY: _array_value, _ANY_VALUE_FIELDS.index("kvlist_value"): _kvlist_value}


def _python_values(pairs: _Pairs) -> np.ndarray:
    """The pairs' values as `codec._attributes` makes them (ptars keeps nested values serialized), in
    an object array: scalars are placed a field at a time, without a Python step per value."""
    out = np.full(len(pairs.kind), None, dtype=object)
    for index, name in enumerate(_ANY_VALUE_FIELDS):
        rows = np.flatnonzero(pairs.kind == index)
        if not rows.size:
            continue
        items = pc.struct_field(pairs.values, name).take(pa.array(rows)).to_pylist()
        convert = _NESTED.get(index)
        if convert is None:
            placed = np.empty(len(items), dtype=object)
            placed[:] = items
            out[rows] = placed
        else:
            for row, item in zip(rows.tolist(), items, strict=True):
                out[row] = convert(item)
    return out


def _dicts(pairs: _Pairs, values: np.ndarray, count: int) -> list[Attributes]:
    """Per list, its pairs as a dict (the last of a repeated key wins, as in a dict built in order)."""
    out: list[Attributes] = [{} for _ in range(count)]
    for owner, key, value in zip(pairs.owner.tolist(), pairs.keys.to_pylist(), values.tolist(), strict=True):
        out[owner][key] = value
    return out


def _span_events(spans: pa.StructArray) -> dict[int, list[SpanEvent]]:
    """Per span that has any, its events that `normalize` reads (exceptions, evaluation results), in order."""
    lists = pc.struct_field(spans, "events")
    events = pc.list_flatten(lists)
    mask = pc.is_in(pc.struct_field(events, "name"), pa.array(sorted(EVENT_NAMES)))
    out: dict[int, list[SpanEvent]] = {}
    chosen = events.filter(mask)
    if not len(chosen):
        return out
    pairs = _pairs(pc.struct_field(chosen, "attributes"), pa.array(sorted(EVENT_KEYS)))
    attributes = _dicts(pairs, _python_values(pairs), len(chosen))
    rows = zip(
        np.asarray(pc.list_parent_indices(lists))[np.asarray(mask, dtype=bool)].tolist(),
        pc.struct_field(chosen, "name").to_pylist(),
        pc.struct_field(chosen, "time_unix_nano").to_pylist(),
        attributes,
        strict=True,
    )
    for owner, name, time_ns, attrs in rows:
        out.setdefault(owner, []).append(SpanEvent(name, time_ns, attrs))
    return out


def _unsettled(pairs: _Pairs, key_index: np.ndarray, count: int) -> np.ndarray:
    """Per span, whether the columns can't settle it: a key twice, flattened messages, a value's kind."""
    out = np.zeros(count, dtype=bool)
    odd = ~_ACCEPTED[key_index, np.maximum(pairs.kind, 0)] & (pairs.kind >= 0)
    odd |= _ACCEPTED[key_index].sum(axis=1) == 0  # the flattened messages' markers accept nothing
    out[pairs.owner[odd]] = True
    combined = np.sort(pairs.owner * len(_KEYS) + key_index)
    out[combined[1:][combined[1:] == combined[:-1]] // len(_KEYS)] = True
    return out


def _picked(pairs: _Pairs, key_index: np.ndarray, values: np.ndarray, count: int) -> list[list[Any]]:
    """`_pick` for every span: per entry of `_PICKED_KEYS`, per span, the value of its first key set."""
    empty = np.asarray(pc.fill_null(pc.equal(pc.struct_field(pairs.values, "string_value"), ""), False))
    slot, rank = _SLOT[key_index], _RANK[key_index]
    rows = np.flatnonzero((slot >= 0) & (pairs.kind >= 0) & ~empty)
    rows = rows[np.lexsort((rank[rows], slot[rows], pairs.owner[rows]))]
    group = pairs.owner[rows] * len(_PICKED_KEYS) + slot[rows]
    first = rows[np.r_[True, group[1:] != group[:-1]]] if rows.size else rows
    out = []
    for at in range(len(_PICKED_KEYS)):
        chosen = first[slot[first] == at]
        column = np.full(count, None, dtype=object)
        column[pairs.owner[chosen]] = values[chosen]
        out.append(column.tolist())
    return out


def _by_key(
    pairs: _Pairs, key_index: np.ndarray, values: np.ndarray, keys: tuple[str, ...]
) -> dict[int, Any]:
    """Per span with one, the value of the first of `keys` it has that is not None (`dict.get` in turn)."""
    out: dict[int, tuple[int, Any]] = {}
    for rank, key in enumerate(keys):
        for row in np.flatnonzero(key_index == _KEYS.index(key)).tolist():
            owner = int(pairs.owner[row])
            if values[row] is not None and rank < out.get(owner, (len(keys), None))[0]:
                out[owner] = (rank, values[row])
    return {owner: value for owner, (_, value) in out.items()}


def _texts(texts: list[str], apply: Callable[[str], str], policy: TextPolicy) -> list[str]:
    """`apply` of each text, called only on those it can change: over the length or maybe redacted."""
    array = pa.array(texts, pa.string())
    change = pc.greater(pc.utf8_length(array), policy.max_chars)
    if policy.redact:
        change = pc.or_(change, pc.match_substring_regex(array, _MAY_REDACT_RE2))
    rows = np.flatnonzero(np.asarray(change, dtype=bool))
    if not rows.size:
        return texts
    out = list(texts)
    for row in rows.tolist():
        out[row] = apply(texts[row])
    return out


def _either(preferred: list[Any], other: list[Any]) -> list[str]:
    """Per span, the text of `preferred` where it is set, else of `other` (messages before raw JSON)."""
    return [_text(p if p is not None else o) for p, o in zip(preferred, other, strict=True)]


def _hex(ids: pa.Array) -> list[str]:
    return [raw.hex() for raw in ids.to_pylist()]


def normalize_columns(batch: ProtoSpans, policy: TextPolicy) -> list[Node]:
    """`normalize` of every span of a decoded batch, in order: the same nodes, from columns."""
    spans = batch.spans
    count = len(spans)
    if not count:
        return []
    pairs = _pairs(pc.struct_field(spans, "attributes"), _KEY_ARRAY)
    key_index = np.asarray(pc.index_in(pairs.keys, _KEY_ARRAY))
    values = _python_values(pairs)
    unsettled = _unsettled(pairs, key_index, count)
    picked = _picked(pairs, key_index, values, count)
    (
        explicit_kind, openinference_kind, operation, node_id, workflow_id, workflow_version, track,
        provider, model, invocation_parameters, response_model, input_tokens, output_tokens, tool_name,
        genai_input, raw_input, genai_output, raw_output, seed,
    ) = picked  # fmt: skip
    finish = _by_key(pairs, key_index, values, _FINISH_KEYS)
    error_types = _by_key(pairs, key_index, values, (ERROR_TYPE_KEY,))
    events = _span_events(spans)
    resource_pairs = _pairs(batch.resources, pa.array(sorted(RESOURCE_KEYS)))
    resources = _dicts(resource_pairs, _python_values(resource_pairs), len(batch.resources))
    resource_id = [_first(r, *_WORKFLOW_ID_KEYS) for r in resources]
    resource_version = [_first(r, *_WORKFLOW_VERSION_KEYS) for r in resources]
    status = pc.struct_field(spans, "status")
    codes = pc.fill_null(pc.struct_field(status, "code"), 0).to_pylist()
    status_messages = _texts(
        pc.fill_null(pc.struct_field(status, "message"), "").to_pylist(), policy.apply, policy
    )
    names = pc.struct_field(spans, "name").to_pylist()
    kinds = list(map(_kind, explicit_kind, openinference_kind, operation))
    for row in range(count):
        if kinds[row] == "evaluator" or (
            genai_output[row] is None and isinstance(raw_output[row], str) and '"refusal"' in raw_output[row]
        ) or (model[row] is None and isinstance(invocation_parameters[row], str)
              and '"model"' in invocation_parameters[row]):  # fmt: skip
            unsettled[row] = True
    exceptions = {row: _exception(e) for row, e in events.items()}
    evaluations = {row: _evaluation_events(e) for row, e in events.items()}
    errors = {
        row: _error_types({ERROR_TYPE_KEY: error_types.get(row)}, exceptions.get(row, ("", ""))[0])
        for row in error_types.keys() | exceptions.keys()
    }
    statuses = [_STATUS_NAMES.get(code, "unset") for code in codes]
    input_texts = _texts(_either(genai_input, raw_input), policy.apply_ends, policy)
    output_texts = _texts(_either(genai_output, raw_output), policy.apply, policy)
    exception_messages = dict(
        zip(
            exceptions,
            _texts([message for _, message in exceptions.values()], policy.apply, policy),
            strict=True,
        )
    )
    resource_of = batch.resource.tolist()
    remote = pc.equal(
        pc.bit_wise_and(pc.struct_field(spans, "flags"), REMOTE_PARENT), REMOTE_PARENT
    ).to_pylist()
    trace_ids = _hex(pc.struct_field(spans, "trace_id"))
    span_ids = _hex(pc.struct_field(spans, "span_id"))
    parents = _hex(pc.struct_field(spans, "parent_span_id"))
    starts = pc.struct_field(spans, "start_time_unix_nano").to_pylist()
    ends = pc.struct_field(spans, "end_time_unix_nano").to_pylist()
    nodes: list[Node] = []
    no_error = ("", "")
    for row, left in enumerate(unsettled.tolist()):
        if left:
            continue
        error_type, exception_type = errors.get(row, no_error)
        kind, name, status = kinds[row], names[row], statuses[row]
        evaluated = evaluations.get(row)
        evaluated = [] if evaluated is None else evaluated
        finish_reasons = _finish_list(finish.get(row))
        resource = resource_of[row]
        nodes.append(
            Node(
                trace_ids[row], span_ids[row], parents[row], name, kind, node_id[row] or name,
                str(workflow_id[row] or resource_id[resource] or ""),
                str(workflow_version[row] or resource_version[resource] or ""),
                track[row] or "", operation[row] or kind, provider[row] or "",
                model[row] or response_model[row] or "", starts[row], ends[row], status,
                status_messages[row], error_type, exception_type, exception_messages.get(row, ""),
                finish_reasons, input_tokens[row], output_tokens[row], tool_name[row] or "",
                input_texts[row], output_texts[row], evaluated,
                bool(hard_failure_source(status, exception_type, error_type, finish_reasons, "")),
                bool(evaluated) and any(e.failed for e in evaluated), remote[row], seed[row], "",
            )
        )  # fmt: skip
    if unsettled.any():
        nodes = _with_unsettled(nodes, unsettled, batch, resources, policy)
    return nodes


def _with_unsettled(
    settled: list[Node],
    unsettled: np.ndarray,
    batch: ProtoSpans,
    resources: list[Attributes],
    policy: TextPolicy,
) -> list[Node]:
    """The nodes of the spans left unsettled, by `normalize` on records of what it reads, in their places."""
    rows = np.flatnonzero(unsettled)
    spans = batch.spans.take(pa.array(rows))
    pairs = _pairs(pc.struct_field(spans, "attributes"), _KEY_ARRAY, MESSAGE_PREFIXES)
    status = pc.struct_field(spans, "status")
    records = zip(
        _hex(pc.struct_field(spans, "trace_id")),
        _hex(pc.struct_field(spans, "span_id")),
        _hex(pc.struct_field(spans, "parent_span_id")),
        pc.struct_field(spans, "name").to_pylist(),
        pc.struct_field(spans, "start_time_unix_nano").to_pylist(),
        pc.struct_field(spans, "end_time_unix_nano").to_pylist(),
        pc.fill_null(pc.struct_field(status, "code"), 0).to_pylist(),
        pc.fill_null(pc.struct_field(status, "message"), "").to_pylist(),
        _dicts(pairs, _python_values(pairs), len(rows)),
        _span_events(spans),
        [resources[r] for r in batch.resource[rows].tolist()],
        pc.equal(pc.bit_wise_and(pc.struct_field(spans, "flags"), REMOTE_PARENT), REMOTE_PARENT).to_pylist(),
        strict=True,
    )
    normalized = iter([normalize(SpanRecord(*record), policy) for record in records])
    done = iter(settled)
    return [next(normalized) if flag else next(done) for flag in unsettled.tolist()]
