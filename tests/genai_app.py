"""A small LLM service instrumented with a real GenAI instrumentation, run as its own process.

The instrumentations patch the openai SDK of the whole process, so each convention runs apart:

    python tests/genai_app.py --convention genai|openinference --base-url URL --runs N
        (--otlp-http URL | --otlp-grpc HOST:PORT | --out DIR) [--arms stable=1.0.0,canary=1.1.0]

`genai` is opentelemetry-instrumentation-openai-v2 (configured by the environment as a user would:
OTEL_SEMCONV_STABILITY_OPT_IN, OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT), `openinference`
is openinference-instrumentation-openai. Each scenario runs N times against an OpenAI-compatible
server (the stub of tests/openai_stub.py, which obeys the X-Stub-Scenario header), one execution
(trace) per run, its root span made by the app; with --evaluate the app judges each answer and
sends the verdict as a `gen_ai.evaluation.result` event. Spans and log records go to a Collector through the
SDK's OTLP exporters, or (--out) into DIR as OTLP protobuf exports (`spans.pb`, `logs.pb`, one
length-prefixed ExportTraceServiceRequest / ExportLogsServiceRequest each). One JSON line per
execution on stdout says what ran.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import openai
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, InMemoryLogRecordExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

MODEL = "stub-model"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# scenario -> (does the execution fail, by cegraph's one meaning; the failure's source at its point)
SCENARIOS: dict[str, tuple[bool, str]] = {
    "answer_twice": (False, ""),
    "server_error": (True, "error"),
    "rate_limit": (True, "error"),
    "length": (True, "truncated"),
    "content_filter": (True, "truncated"),
    "refusal": (True, "refusal"),
    "tool_call": (False, ""),
    "sdk_retry": (False, ""),  # two 500s the openai SDK retries away inside one call
    "app_retry": (True, "error"),  # the app calls again after a 500: the first call failed
}
CALLS = {"answer_twice": 2, "tool_call": 2, "app_retry": 2}  # chat calls of a scenario (else one)


def span_count(scenario: str) -> int:
    """The spans of one execution: the root, its chat calls and (tool_call) the tool."""
    return 1 + CALLS.get(scenario, 1) + (scenario == "tool_call")


def _chat(client: openai.OpenAI, scenario: str, content: str, **options: Any) -> Any:
    messages = options.pop("messages", None) or [
        {"role": "system", "content": "You are a support assistant. Be brief."},
        {"role": "user", "content": content},
    ]
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=64, extra_headers={"X-Stub-Scenario": scenario}, **options
    )


def forecast_judge(answer: str) -> dict[str, Any]:
    """The app's own evaluator: is the answer grounded in the weather tool's forecast? Sent as the
    GenAI `gen_ai.evaluation.result` event (a log record in the context of the execution's root)."""
    grounded = "sunny" in answer
    return {
        "gen_ai.evaluation.name": "grounded_in_forecast",
        "gen_ai.evaluation.score.value": 1.0 if grounded else 0.0,
        "gen_ai.evaluation.score.label": "pass" if grounded else "fail",
        "gen_ai.evaluation.explanation": "names the forecast"
        if grounded
        else "the answer ignores the forecast",
    }


class App:
    def __init__(
        self, convention: str, base_url: str, tracer: trace.Tracer, evaluator: Any | None = None
    ) -> None:
        """`evaluator`: a logger the app's evaluation events go to (None: no evaluation)."""
        self.convention = convention
        self.tracer = tracer
        self.evaluator = evaluator
        self.client = openai.OpenAI(base_url=base_url, api_key="sk-stub-not-a-key", max_retries=0)
        self.retrying = openai.OpenAI(base_url=base_url, api_key="sk-stub-not-a-key", max_retries=2)

    def root_attributes(self, question: str) -> dict[str, Any]:
        if self.convention == "genai":
            return {"gen_ai.operation.name": "invoke_workflow"}
        return {"openinference.span.kind": "CHAIN", "input.value": question}

    def tool_span(self, arguments: str) -> Any:
        if self.convention == "genai":
            attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_weather"}
            return self.tracer.start_as_current_span("execute_tool get_weather", attributes=attributes)
        attributes = {"openinference.span.kind": "TOOL", "tool.name": "get_weather", "input.value": arguments}
        return self.tracer.start_as_current_span("get_weather", attributes=attributes)

    def run(self, scenario: str, index: int, arm: tuple[str, str] | None) -> dict[str, Any]:
        question = f"What is the weather in Paris? (request {index})"
        attributes = self.root_attributes(question)
        if arm is not None:
            attributes |= {"cegraph.track": arm[0], "cegraph.workflow.version": arm[1]}
        raised = ""
        try:
            with self.tracer.start_as_current_span("support-bot", attributes=attributes) as root:
                script = self.SCRIPTED.get(scenario)
                if script is None:  # one call, answered as the scenario says
                    answer = _chat(self.client, scenario, question)
                else:
                    answer = script(self, question, index)
                if self.evaluator is not None:
                    text = answer.choices[0].message.content or ""
                    self.evaluator.emit(
                        event_name="gen_ai.evaluation.result", attributes=forecast_judge(text)
                    )
        except openai.OpenAIError as error:
            raised = f"{type(error).__module__.split('.')[0]}.{type(error).__name__}"
        trace_id = format(root.get_span_context().trace_id, "032x")
        return {"trace_id": trace_id, "scenario": scenario, "index": index, "raised": raised,
                "track": arm[0] if arm else ""}  # fmt: skip

    def answer_twice(self, question: str, index: int) -> Any:
        plan = _chat(self.client, "answer", f"Plan how to answer: {question}")
        return _chat(self.client, "answer", f"Answer with this plan: {plan.choices[0].message.content}")

    def tool_call(self, question: str, index: int) -> Any:
        first = _chat(self.client, "tool_call", question, tools=[WEATHER_TOOL])
        call = first.choices[0].message.tool_calls[0]
        with self.tool_span(call.function.arguments):
            result = json.dumps({"city": "Paris", "forecast": "sunny", "celsius": 21})
        messages = [
            {"role": "user", "content": question},
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": result},
        ]
        return _chat(self.client, "tool_call", question, messages=messages, tools=[WEATHER_TOOL])

    def sdk_retry(self, question: str, index: int) -> Any:
        return _chat(self.retrying, f"flaky:{self.convention}-{index}:2", question)

    def app_retry(self, question: str, index: int) -> Any:
        try:
            return _chat(self.client, "server_error", question)
        except openai.InternalServerError:
            return _chat(self.client, "answer", question)

    SCRIPTED: ClassVar[dict[str, Callable[[App, str, int], Any]]] = {
        "answer_twice": answer_twice,
        "tool_call": tool_call,
        "sdk_retry": sdk_retry,
        "app_retry": app_retry,
    }


def _exporters(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.otlp_http:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return (
            OTLPSpanExporter(endpoint=f"{args.otlp_http}/v1/traces"),
            OTLPLogExporter(endpoint=f"{args.otlp_http}/v1/logs"),
        )
    if args.otlp_grpc:
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=args.otlp_grpc, insecure=True), OTLPLogExporter(
            endpoint=args.otlp_grpc, insecure=True
        )
    return InMemorySpanExporter(), InMemoryLogRecordExporter()


def _write_exports(out: Path, spans: InMemorySpanExporter, logs: InMemoryLogRecordExporter) -> None:
    """What the OTLP exporters would have sent, as length-prefixed protobuf exports."""
    out.mkdir(parents=True, exist_ok=True)
    finished = spans.get_finished_spans()
    with (out / "spans.pb").open("wb") as file:
        for start in range(0, len(finished), 100):
            body = encode_spans(finished[start : start + 100]).SerializeToString()
            file.write(struct.pack(">I", len(body)) + body)
    records = logs.get_finished_logs()
    with (out / "logs.pb").open("wb") as file:
        for start in range(0, len(records), 100):
            body = encode_logs(records[start : start + 100]).SerializeToString()
            file.write(struct.pack(">I", len(body)) + body)


def read_exports(path: Path) -> list[bytes]:
    data, exports, at = path.read_bytes(), [], 0
    while at < len(data):
        (size,) = struct.unpack(">I", data[at : at + 4])
        exports.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return exports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--convention", choices=["genai", "openinference"], required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--arms", default="", help="track=version,...: executions take them in turn")
    parser.add_argument("--service", default="support-bot")
    parser.add_argument("--evaluate", action="store_true", help="send an evaluation event per answer")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--otlp-http", help="OTLP/HTTP base URL of a Collector")
    target.add_argument("--otlp-grpc", help="OTLP/gRPC host:port of a Collector")
    target.add_argument("--out", type=Path, help="write the OTLP exports into this folder instead")
    args = parser.parse_args(argv)

    resource = Resource.create({"service.name": args.service, "service.version": "1.0.0"})
    span_exporter, log_exporter = _exporters(args)
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
    if args.convention == "genai":
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(tracer_provider=tracer_provider, logger_provider=logger_provider)
    else:
        from openinference.instrumentation.openai import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(tracer_provider=tracer_provider)
    evaluator = logger_provider.get_logger("support-bot.evaluator") if args.evaluate else None
    app = App(args.convention, args.base_url, tracer_provider.get_tracer("support-bot"), evaluator)
    arms = [tuple(arm.split("=", 1)) for arm in args.arms.split(",") if arm]
    count = 0
    for index in range(args.runs):
        for scenario in args.scenarios.split(","):
            arm = arms[count % len(arms)] if arms else None
            print(json.dumps(app.run(scenario, index, arm)), flush=True)
            count += 1
    logger_provider.force_flush()  # the log records first: they wait in cegraph for their spans
    tracer_provider.force_flush()
    if args.out:
        _write_exports(args.out, span_exporter, log_exporter)
    tracer_provider.shutdown()
    logger_provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
