"""Test payloads made by the real OpenTelemetry SDK and encoded as the Collector's kafkaexporter does.

`make_traces` records executions of a small agent-style workflow with the GenAI conventions (some
failing: an exception, an ERROR status, a failed evaluation); `to_messages` packs their spans into
`otlp_proto` or `otlp_json` messages, one trace per message (keyed by hex trace id) or many traces per
message with a trace split across messages, spans shuffled within each trace. `record_spans` runs any
tracer code against a fresh SDK provider; `openinference_trace` records an agent run the way the
openinference-instrumentation-* packages annotate it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode, Tracer

from cegraph.connectors.otlp.span_export import otlp_json


@dataclass
class ExpectedTrace:
    trace_id: str
    span_count: int
    edges: set[tuple[str, str]]  # (parent span id, child span id)
    hard_failed: bool
    eval_failed: bool
    spans: list[ReadableSpan] = field(default_factory=list, repr=False)


def make_traces(count: int, *, seed: int = 0, workflow: str = "support-bot", version: str = "1.0.0"):
    rng = random.Random(seed)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": workflow, "service.version": version})
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("cegraph.tests")
    expected: list[ExpectedTrace] = []
    for index in range(count):
        exporter.clear()
        hard = eval_failed = False
        common = {
            "cegraph.workflow.id": workflow,
            "cegraph.workflow.version": version,
            "cegraph.track": "stable",
        }
        with tracer.start_as_current_span(
            "invoke_workflow", attributes={**common, "gen_ai.operation.name": "invoke_workflow",
                                           "input.value": f"question {index} from a@b.com"}
        ) as root:  # fmt: skip
            for step in range(rng.randint(3, 6)):
                kind = rng.choice(["chat", "execute_tool", "retrieval"])
                with tracer.start_as_current_span(
                    f"{kind} step{step}",
                    attributes={**common, "gen_ai.operation.name": kind, "cegraph.node.id": f"step{step}",
                                "gen_ai.request.model": "sim-1", "gen_ai.usage.input_tokens": 10 + step,
                                "gen_ai.usage.output_tokens": 5, "output.value": f"answer {index}.{step}"},
                ) as span:  # fmt: skip
                    if rng.random() < 0.05:
                        span.record_exception(ValueError(f"bad tool arguments in {index}"))
                        span.set_status(Status(StatusCode.ERROR, "tool failed"))
                        hard = True
            verdict = rng.random() < 0.2
            eval_failed = verdict
            root.add_event(
                "gen_ai.evaluation.result",
                {"gen_ai.evaluation.name": "exact_match",
                 "gen_ai.evaluation.score.value": 0.0 if verdict else 1.0,
                 "gen_ai.evaluation.score.label": "fail" if verdict else "pass",
                 "gen_ai.evaluation.explanation": "wrong total" if verdict else "ok"},
            )  # fmt: skip
        spans = list(exporter.get_finished_spans())
        trace_id = format(spans[0].context.trace_id, "032x")
        edges = {
            (format(s.parent.span_id, "016x"), format(s.context.span_id, "016x")) for s in spans if s.parent
        }
        expected.append(ExpectedTrace(trace_id, len(spans), edges, hard, eval_failed, spans))
    return expected


def encode(spans: list[ReadableSpan], encoding: str) -> bytes:
    if encoding == "otlp_proto":
        return encode_spans(spans).SerializeToString()
    return otlp_json(spans)


@dataclass
class Message:
    key: bytes | None
    value: bytes


def to_messages(
    traces: list[ExpectedTrace], *, encoding: str = "otlp_proto", one_trace_per_message: bool = True,
    spans_per_message: int = 7, seed: int = 0,
) -> list[Message]:  # fmt: skip
    rng = random.Random(seed)
    if one_trace_per_message:
        messages = []
        for trace in traces:
            spans = list(trace.spans)
            rng.shuffle(spans)
            messages.append(Message(trace.trace_id.encode(), encode(spans, encoding)))
        return messages
    pool: list[ReadableSpan] = []
    for trace in traces:
        spans = list(trace.spans)
        rng.shuffle(spans)
        pool.extend(spans)
    return [
        Message(None, encode(pool[i : i + spans_per_message], encoding))
        for i in range(0, len(pool), spans_per_message)
    ]


def record_spans(
    build: Callable[[Tracer], None], *, resource: dict[str, Any] | None = None
) -> list[ReadableSpan]:
    """Run `build(tracer)` against a fresh SDK provider and return the spans it finished, in end order."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(resource or {}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    build(provider.get_tracer("cegraph.tests"))
    provider.shutdown()
    return list(exporter.get_finished_spans())


def openinference_trace(
    tracer: Tracer, *, messages: int = 3, evaluator_label: str = "correct", index: int = 0
) -> None:
    """One agent run instrumented the way the openinference-instrumentation-* packages do it.

    A CHAIN root with an LLM call (flattened `llm.input_messages.<i>.message.*`), a TOOL call, a
    RETRIEVER and an EVALUATOR span whose `output.value` is the verdict.
    """
    with tracer.start_as_current_span(
        "AgentRun", attributes={"openinference.span.kind": "CHAIN", "input.value": f"task {index}",
                                "output.value": f"result {index}"}
    ):  # fmt: skip
        llm_attributes: dict[str, Any] = {
            "openinference.span.kind": "LLM",
            "llm.model_name": "gpt-4o-mini",
            "llm.provider": "openai",
            "llm.token_count.prompt": 120 + index,
            "llm.token_count.completion": 30,
            "llm.token_count.total": 150 + index,
            "graph.node.id": "planner",
        }
        for i in range(messages):
            llm_attributes[f"llm.input_messages.{i}.message.role"] = "user" if i % 2 else "system"
            llm_attributes[f"llm.input_messages.{i}.message.content"] = f"message number {i}"
        llm_attributes["llm.output_messages.0.message.role"] = "assistant"
        llm_attributes["llm.output_messages.0.message.content"] = "call the search tool"
        with tracer.start_as_current_span("ChatCompletion", attributes=llm_attributes):
            pass
        with tracer.start_as_current_span(
            "search", attributes={"openinference.span.kind": "TOOL", "tool.name": "web_search",
                                  "input.value": '{"q": "capital of France"}', "output.value": "Paris"}
        ):  # fmt: skip
            pass
        with tracer.start_as_current_span(
            "retrieve", attributes={"openinference.span.kind": "RETRIEVER", "input.value": "France"}
        ):  # fmt: skip
            pass
        with tracer.start_as_current_span(
            "judge", attributes={"openinference.span.kind": "EVALUATOR", "output.value": evaluator_label,
                                 "eval.explanation": "compared with the reference answer"}
        ):  # fmt: skip
            pass
