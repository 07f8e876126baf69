"""Normalization of real SDK spans of both conventions (OpenTelemetry GenAI, OpenInference) onto `Node`.

Spans are recorded with the OpenTelemetry SDK and go through the protobuf encoder and decoder first,
so the attribute types are the ones the daemon really sees.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
from fss_fixtures import node
from opentelemetry.trace import Status, StatusCode, Tracer
from otel_traces import encode, openinference_trace, record_spans

from cegraph.connectors.otlp.codec import decode_proto
from cegraph.daemon.ingest.normalize import TextPolicy, distinct_node_ids, normalize, redact
from cegraph.daemon.spans import Node

KEEP_ALL = TextPolicy(max_chars=100_000, redact=False)


def nodes_of(build, *, resource: dict[str, Any] | None = None, policy: TextPolicy = KEEP_ALL) -> dict:
    """Record spans with the SDK, encode and decode them as the daemon would, normalize by span name."""
    records = decode_proto(encode(record_spans(build, resource=resource), "otlp_proto"))
    return {record.name: normalize(record, policy) for record in records}


def one_span(name: str = "span", attributes: dict[str, Any] | None = None, **options) -> Node:
    def build(tracer: Tracer) -> None:
        with tracer.start_as_current_span(name, attributes=attributes or {}):
            pass

    return nodes_of(build, **options)[name]


# ------------------------------------------------------------------------------------ GenAI


@pytest.mark.parametrize(
    ("operation", "kind"),
    [
        ("chat", "llm"),
        ("text_completion", "llm"),
        ("embeddings", "embedding"),
        ("execute_tool", "tool"),
        ("invoke_agent", "agent"),
        ("create_agent", "agent"),
        ("invoke_workflow", "workflow"),
        ("retrieval", "retrieve"),
    ],
)
def test_genai_kind_comes_from_the_operation_name(operation, kind):
    node = one_span(attributes={"gen_ai.operation.name": operation})
    assert node.kind == kind
    assert node.operation == operation


def test_unknown_operation_is_kept_as_its_own_kind_and_plain_spans_are_spans():
    assert one_span(attributes={"gen_ai.operation.name": "summon_oracle"}).kind == "summon_oracle"
    assert one_span(attributes={"http.method": "GET"}).kind == "span"


def test_genai_chat_span_fields():
    node = one_span(
        "chat sim-1",
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.response.model": "gpt-4o-2024-08-06",
            "gen_ai.usage.input_tokens": 321,
            "gen_ai.usage.output_tokens": 54,
            "gen_ai.response.finish_reasons": ["stop", "length"],
            "gen_ai.input.messages": '[{"role": "user", "parts": [{"type": "text", "content": "2+2?"}]}]',
            "gen_ai.output.messages": '[{"role": "assistant", "parts": [{"type": "text", "content": "4"}]}]',
        },
    )
    assert (node.kind, node.provider, node.model) == ("llm", "openai", "gpt-4o")
    assert (node.input_tokens, node.output_tokens) == (321, 54)
    assert node.finish_reasons == ["stop", "length"]
    assert '"content": "2+2?"' in node.input_text and '"content": "4"' in node.output_text
    assert node.status == "unset" and not node.eval_failed
    assert node.hard_failed and node.hard_failure_source() == "truncated"  # one choice hit the length


def test_response_model_is_used_when_no_request_model():
    node = one_span(attributes={"gen_ai.operation.name": "chat", "gen_ai.response.model": "m-2"})
    assert node.model == "m-2"


def test_older_token_attribute_names():
    node = one_span(
        attributes={"gen_ai.usage.prompt_tokens": 11, "gen_ai.usage.completion_tokens": 7},
    )
    assert (node.input_tokens, node.output_tokens) == (11, 7)
    both = one_span(
        attributes={"gen_ai.usage.input_tokens": 1, "gen_ai.usage.prompt_tokens": 99,
                    "gen_ai.usage.output_tokens": 2, "gen_ai.usage.completion_tokens": 98},
    )  # fmt: skip
    assert (both.input_tokens, both.output_tokens) == (1, 2), "the current names win over the older ones"
    none = one_span(attributes={"gen_ai.operation.name": "chat"})
    assert (none.input_tokens, none.output_tokens) == (None, None), "no usage is not zero usage"


def test_token_values_that_are_not_int64_become_none_instead_of_crashing():
    """A double or a string in a token attribute must not take the ingest down (or poison the store)."""
    node = one_span(attributes={"gen_ai.usage.input_tokens": "12", "gen_ai.usage.output_tokens": 3.0})
    assert (node.input_tokens, node.output_tokens) == (12, 3)
    for odd in (float("inf"), float("nan"), 1e30, "lots", "9" * 30):
        node = one_span(attributes={"gen_ai.usage.input_tokens": odd})
        assert node.input_tokens is None, odd


def test_provider_falls_back_to_gen_ai_system():
    assert one_span(attributes={"gen_ai.system": "anthropic"}).provider == "anthropic"
    both = one_span(attributes={"gen_ai.system": "old", "gen_ai.provider.name": "new"})
    assert both.provider == "new"


def test_tool_and_agent_attributes():
    tool = one_span(attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "calculator"})
    assert (tool.kind, tool.tool_name) == ("tool", "calculator")


def test_exception_event_marks_a_hard_failure():
    def build(tracer: Tracer) -> None:
        with tracer.start_as_current_span("call", attributes={"gen_ai.operation.name": "chat"}) as span:
            span.record_exception(TimeoutError("upstream timed out after 30s"))

    node = nodes_of(build)["call"]
    assert node.exception_type == "TimeoutError"
    assert node.exception_message == "upstream timed out after 30s"
    assert node.status == "unset", "an exception event alone, without an ERROR status"
    assert node.hard_failed


def test_error_type_alone_marks_a_hard_failure():
    node = one_span(attributes={"gen_ai.operation.name": "chat", "error.type": "rate_limit_exceeded"})
    assert node.error_type == "rate_limit_exceeded"
    assert node.exception_type == "" and node.status == "unset"
    assert node.hard_failed


def test_error_status_marks_a_hard_failure_and_ok_does_not():
    def build(tracer: Tracer) -> None:
        with tracer.start_as_current_span("bad") as span:
            span.set_status(Status(StatusCode.ERROR, "the tool returned 500"))
        with tracer.start_as_current_span("good") as span:
            span.set_status(Status(StatusCode.OK))

    nodes = nodes_of(build)
    assert (nodes["bad"].status, nodes["bad"].status_message) == ("error", "the tool returned 500")
    assert nodes["bad"].hard_failed
    assert nodes["good"].status == "ok" and not nodes["good"].hard_failed


def _evaluated(**attributes: Any) -> Node:
    def build(tracer: Tracer) -> None:
        with tracer.start_as_current_span("answer", attributes={"gen_ai.operation.name": "chat"}) as span:
            span.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.name": "judge", **attributes})

    return nodes_of(build)["answer"]


@pytest.mark.parametrize(
    ("attributes", "failed"),
    [
        ({"gen_ai.evaluation.score.label": "fail"}, True),
        ({"gen_ai.evaluation.score.label": "Incorrect"}, True),
        ({"gen_ai.evaluation.score.label": "pass"}, False),
        ({"gen_ai.evaluation.score.value": 0.2}, True),
        ({"gen_ai.evaluation.score.value": 0.9}, False),
        # The label is the verdict when there is one; the score only decides without a known label.
        ({"gen_ai.evaluation.score.label": "pass", "gen_ai.evaluation.score.value": 0.0}, False),
        ({"gen_ai.evaluation.score.label": "fail", "gen_ai.evaluation.score.value": 1.0}, True),
        ({"gen_ai.evaluation.score.label": "so-so", "gen_ai.evaluation.score.value": 0.1}, True),
        ({"gen_ai.evaluation.score.label": "so-so"}, False),
        ({}, False),
    ],
)
def test_evaluation_events_mark_soft_failures(attributes, failed):
    node = _evaluated(**attributes, **{"gen_ai.evaluation.explanation": "the total is off by 10"})
    [evaluation] = node.evaluations
    assert evaluation.name == "judge"
    assert evaluation.explanation == "the total is off by 10"
    assert node.eval_failed is failed
    assert not node.hard_failed, "a wrong answer is a soft failure, not a hard one"


def test_non_finite_evaluation_scores_are_dropped():
    """NaN and infinities don't survive the JSON event log, so live and rebuilt results would differ."""
    for value in (float("nan"), float("-inf"), float("inf")):
        [evaluation] = _evaluated(**{"gen_ai.evaluation.score.value": value}).evaluations
        assert evaluation.score is None


# ------------------------------------------------------------------------------------ OpenInference


@pytest.mark.parametrize(
    ("span_kind", "kind"),
    [
        ("LLM", "llm"),
        ("CHAIN", "chain"),
        ("TOOL", "tool"),
        ("AGENT", "agent"),
        ("RETRIEVER", "retrieve"),
        ("RERANKER", "rerank"),
        ("EMBEDDING", "embedding"),
        ("GUARDRAIL", "guardrail"),
        ("EVALUATOR", "evaluator"),
        ("PROMPT", "prompt"),
    ],
)
def test_openinference_span_kinds(span_kind, kind):
    assert one_span(attributes={"openinference.span.kind": span_kind}).kind == kind
    assert one_span(attributes={"openinference.span.kind": span_kind.lower()}).kind == kind


def test_openinference_agent_run():
    nodes = nodes_of(lambda tracer: openinference_trace(tracer, messages=3))
    llm = nodes["ChatCompletion"]
    assert (llm.kind, llm.model, llm.provider) == ("llm", "gpt-4o-mini", "openai")
    assert (llm.input_tokens, llm.output_tokens) == (120, 30)
    assert llm.node_id == "planner", "graph.node.id names the node"
    assert llm.input_text == "message number 0\nmessage number 1\nmessage number 2"
    assert llm.output_text == "call the search tool"
    tool = nodes["search"]
    assert (tool.kind, tool.tool_name) == ("tool", "web_search")
    assert tool.input_text == '{"q": "capital of France"}' and tool.output_text == "Paris"
    assert nodes["retrieve"].kind == "retrieve" and nodes["retrieve"].input_text == "France"
    root = nodes["AgentRun"]
    assert root.kind == "chain" and root.parent_span_id == "" and root.node_id == "AgentRun"
    assert all(n.parent_span_id == root.span_id for name, n in nodes.items() if name != "AgentRun")
    assert not any(n.hard_failed or n.eval_failed for n in nodes.values())


def test_openinference_messages_keep_their_numeric_order():
    """Message 10 comes after message 9, not after message 1."""
    llm = nodes_of(lambda tracer: openinference_trace(tracer, messages=12))["ChatCompletion"]
    assert llm.input_text.split("\n") == [f"message number {i}" for i in range(12)]


@pytest.mark.parametrize(
    ("label", "failed"),
    # The rails of the Phoenix evaluators that emit OpenInference EVALUATOR spans.
    [("incorrect", True), ("correct", False), ("hallucinated", True), ("factual", False),
     ("unrelated", True), ("relevant", False), ("toxic", True), ("non-toxic", False)],
)  # fmt: skip
def test_openinference_evaluator_span_verdict(label, failed):
    judge = nodes_of(lambda tracer: openinference_trace(tracer, evaluator_label=label))["judge"]
    assert judge.kind == "evaluator"
    [evaluation] = judge.evaluations
    assert evaluation.label == label
    assert evaluation.explanation == "compared with the reference answer"
    assert judge.eval_failed is failed


# ------------------------------------------------------------------------------------ identity


def test_cegraph_attributes_win_over_the_fallbacks():
    node = one_span(
        attributes={
            "cegraph.workflow.id": "refund-flow",
            "cegraph.workflow.version": "2.1.0",
            "cegraph.node.id": "extract",
            "cegraph.track": "canary",
            "graph.node.id": "LangGraphNode",
            "openinference.span.kind": "LLM",
        },
        resource={"service.name": "refund-service", "service.version": "9.9.9",
                  "cegraph.workflow.id": "resource-level-id"},
    )  # fmt: skip
    assert (node.workflow_id, node.workflow_version) == ("refund-flow", "2.1.0")
    assert (node.node_id, node.track) == ("extract", "canary")


def test_workflow_identity_falls_back_to_the_resource():
    node = one_span("lookup", resource={"service.name": "support-bot", "service.version": "1.4.2"})
    assert (node.workflow_id, node.workflow_version) == ("support-bot", "1.4.2")
    assert node.node_id == "lookup", "without a node id attribute the span name is the node"
    assert node.track == ""
    on_resource = one_span(
        resource={"service.name": "svc", "cegraph.workflow.id": "wf", "cegraph.workflow.version": "3"}
    )
    assert (on_resource.workflow_id, on_resource.workflow_version) == ("wf", "3")


def test_graph_node_id_is_the_node_without_cegraph_node_id():
    assert one_span(attributes={"graph.node.id": "retriever"}).node_id == "retriever"


# ------------------------------------------------------------------------------------ redaction


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("write to alice.smith@example.com today", "alice.smith@example.com"),
        ("cc: bob+tag@mail.example.co.uk", "bob+tag@mail.example.co.uk"),
        ("call +1 415 555 2671 now", "415 555 2671"),
        ("call (415) 555-2671 now", "555-2671"),
        ("call 415-555-2671", "415-555-2671"),
        ("call 415.555.2671", "415.555.2671"),
        ("ring +44 20 7946 0958", "7946 0958"),
        ("key sk-proj-AbCdEf0123456789GhIjKl", "AbCdEf0123456789"),
        ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "4eC39HqLyjWDarjtT1zdp7dc"),
        ("aws AKIAIOSFODNN7EXAMPLE", "IOSFODNN7EXAMPLE"),
        ("gh ghp_16C7e42F292c6912E7710c838347Ae178B4a", "16C7e42F292c6912E7710c838347Ae178B4a"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "eyJhbGciOiJIUzI1NiJ9"),
    ],
)
def test_redaction_masks_secrets(text, secret):
    masked = redact(text)
    assert secret not in masked
    assert any(p in masked for p in ("[email]", "[phone]", "[api-key]"))


def test_redaction_placeholders_say_what_was_there():
    assert redact("a@b.io") == "[email]"
    assert redact("AKIAIOSFODNN7EXAMPLE") == "[api-key]"
    assert redact("415-555-2671") == "[phone]"


@pytest.mark.parametrize(
    "text",
    [
        "1234",
        "order 1234 shipped",
        "on 2024-05-06 at 12:30",
        "12 * 34 = 408",
        "3.14159 and 1,234,567",
        "version 1.2.3",
        "trace 4bf92f3577b34da6a3ce929d0e0e4736 span 00f067aa0ba902b7",
        "trace 0af7651916cd43dd8448eb211c80319c",
        "sk-short",
        "email me at alice at example dot com",
        "the sky is blue",
    ],
)
def test_redaction_leaves_ordinary_text_alone(text):
    assert redact(text) == text


def test_redaction_is_applied_to_span_text_when_asked():
    attributes = {"input.value": "my mail is carol@example.org", "output.value": "call 415-555-2671"}
    redacted = one_span(attributes=attributes, policy=TextPolicy(max_chars=1000, redact=True))
    assert "carol@example.org" not in redacted.input_text and "[email]" in redacted.input_text
    assert "555-2671" not in redacted.output_text
    kept = one_span(attributes=attributes, policy=TextPolicy(max_chars=1000, redact=False))
    assert kept.input_text == "my mail is carol@example.org"

    def failing(tracer: Tracer) -> None:
        with tracer.start_as_current_span("call") as span:
            span.record_exception(PermissionError("denied for dave@example.com"))
            span.set_status(Status(StatusCode.ERROR, "token sk-abcdefghijklmnopqrstuvwx rejected"))

    node = nodes_of(failing, policy=TextPolicy(max_chars=1000, redact=True))["call"]
    assert "dave@example.com" not in node.exception_message
    assert "sk-abcdefghijklmnopqrstuvwx" not in node.status_message


def test_redaction_of_long_text_stays_linear():
    """A long run of word characters (base64 blobs, hex dumps) must not make the e-mail pattern quadratic."""
    blob = "a" * 50_000
    started = time.perf_counter()
    assert redact(blob) == blob
    assert time.perf_counter() - started < 0.5


# ------------------------------------------------------------------------------------ truncation


def test_truncation_keeps_max_chars_and_says_how_much_was_cut():
    policy = TextPolicy(max_chars=100, redact=True)
    text = "".join(f"word{i} " for i in range(100))  # 690 chars, nothing to redact
    cut = policy.apply(text)
    assert cut.startswith(text[:100])
    assert cut[100:] == f"…[+{len(text) - 100} chars]"
    assert policy.apply(text[:100]) == text[:100], "text of exactly max_chars is not marked"
    assert policy.apply("") == ""


def test_truncation_applies_to_span_text_and_an_input_keeps_its_end():
    text = "h" * 2000 + "m" * 2000 + "t" * 1000
    node = one_span(
        attributes={"input.value": text, "output.value": text}, policy=TextPolicy(max_chars=100, redact=False)
    )
    assert node.output_text == "h" * 100 + "…[+4900 chars]"
    assert node.input_text == "h" * 25 + "…[4900 chars]…" + "t" * 75, "the new part of an input is its end"


def test_the_kept_end_of_an_input_is_redacted_too():
    policy = TextPolicy(max_chars=100, redact=True)
    for offset in range(0, 30):
        text = "x" * 500 + " mail alice.smith@example.com now" + "y" * offset
        kept = policy.apply_ends(text)
        assert "alice" not in kept and "example" not in kept, kept


@pytest.mark.parametrize(
    "secret", ["sk-abcdefghijklmnopqrstuvwxyz0123", "alice.smith@example.com", "AKIAIOSFODNN7EXAMPLE"]
)
def test_truncation_never_leaves_part_of_a_secret(secret):
    """A secret straddling the cut is redacted whole, not cut into a fragment that no longer matches."""
    policy = TextPolicy(max_chars=100, redact=True)
    for offset in range(1, len(secret)):
        text = "x" * (100 - offset) + " " + secret + " and more text after it"
        kept = policy.apply(text)
        visible = secret[: offset - 1]  # what a cut before redaction would leave of it
        assert len(visible) < 6 or visible not in kept, (offset, kept[-30:])


def test_text_after_many_redactions_is_redacted_too():
    """Masking shortens the text; what then moves up into the kept part must have been redacted as well."""
    policy = TextPolicy(max_chars=60, redact=True)
    text = " ".join(f"user{i}.with.a.long.name@example.com" for i in range(40))
    kept = policy.apply(text)
    assert "@" not in kept
    assert kept.startswith("[email] [email]")


def test_odd_message_indices_do_not_break_flattening():
    node = one_span(
        attributes={
            "llm.input_messages.1.message.content": "second",
            "llm.input_messages.0.message.content": "first",
            "llm.input_messages.².message.content": "odd",
            f"llm.input_messages.{'9' * 5000}.message.content": "huge",
        }
    )
    lines = node.input_text.split("\n")
    assert lines[-2:] == ["first", "second"] and sorted(lines[:2]) == ["huge", "odd"]


# ------------------------------------------------------------------------------------ node identity


def test_calls_of_one_name_in_an_execution_get_distinct_node_ids():
    nodes = [
        node(1, None, "root", "workflow"),
        node(2, 1, "chat gpt-4o", start=1),
        node(3, 1, "execute_tool search", "tool", 2),
        node(4, 1, "chat gpt-4o", start=3),
        node(5, 4, "chat gpt-4o", start=4),  # under another parent: still a third call
    ]
    assert [n.node_id for n in distinct_node_ids(nodes)] == [
        "root", "chat gpt-4o", "execute_tool search", "chat gpt-4o#2", "chat gpt-4o#3",
    ]  # fmt: skip


def test_a_call_after_a_failed_call_of_its_name_is_a_retry_of_the_same_node():
    nodes = [
        node(1, None, "root", "workflow"),
        node(2, 1, "chat gpt-4o", start=1, status="error", error_type="openai.RateLimitError"),
        node(3, 1, "chat gpt-4o", start=2, finish_reasons=["length"]),
        node(4, 1, "chat gpt-4o", start=3),
        node(5, 1, "chat gpt-4o", start=4),
    ]
    assert [n.node_id for n in distinct_node_ids(nodes)] == [
        "root", "chat gpt-4o", "chat gpt-4o", "chat gpt-4o", "chat gpt-4o#2",
    ]  # fmt: skip


def test_explicit_node_ids_are_kept_even_when_repeated():
    nodes = [
        node(1, None, "root", "workflow"),
        replace(node(2, 1, "solve", start=1), name="chat sim-1"),
        replace(node(3, 1, "solve", start=2), name="chat sim-1"),
    ]
    assert [n.node_id for n in distinct_node_ids(nodes)] == ["root", "solve", "solve"]
