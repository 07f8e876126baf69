"""A small LLM service instrumented with a real GenAI instrumentation, run as its own process.

The instrumentations patch the openai SDK of the whole process, so each convention runs apart:

    python tests/genai_app.py --convention genai|openinference --base-url URL --runs N
        (--otlp-http URL | --otlp-grpc HOST:PORT | --out DIR) [--arms stable=1.0.0,canary=1.1.0]

`genai` is opentelemetry-instrumentation-openai-v2 (configured by the environment as a user would:
OTEL_SEMCONV_STABILITY_OPT_IN, OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT), `openinference`
is openinference-instrumentation-openai. Each scenario runs N times against an OpenAI-compatible
server, one execution (trace) per run, its root span made by the app: the stub of
tests/openai_stub.py, which obeys the X-Stub-Scenario header, or a real model server, where the
scenarios of REAL_SCENARIOS make their outcomes by the request alone (a small `max_tokens`, a prompt
longer than the context). With --evaluate the app judges each answer and sends the verdict as a
`gen_ai.evaluation.result` event. Spans and log records go to a Collector through the
SDK's OTLP exporters, or (--out) into DIR as OTLP protobuf exports (`spans.pb`, `logs.pb`, one
length-prefixed ExportTraceServiceRequest / ExportLogsServiceRequest each). One JSON line per
execution on stdout says what ran and what the app saw of each chat call (finish reason, token
usage, or the error raised) and of its evaluation.
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
# Scenarios that mean the same on a real model server, where no header steers the answer: two
# answered calls, a truncation by `max_tokens`, and a prompt longer than the model's context (run
# with --overflow-words past it; the server refuses the request).
REAL_SCENARIOS = ("answer_twice", "length", "overflow")
TRUNCATE_AT = 2  # the `max_tokens` of the `length` scenario


def span_count(scenario: str) -> int:
    """The spans of one execution: the root, its chat calls and (tool_call) the tool."""
    return 1 + CALLS.get(scenario, 1) + (scenario == "tool_call")


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


def error_name(error: Exception) -> str:
    """`openai.InternalServerError`: the exception's class as the app (and cegraph) spell it."""
    return f"{type(error).__module__.split('.')[0]}.{type(error).__name__}"


class App:
    def __init__(
        self,
        convention: str,
        base_url: str,
        tracer: trace.Tracer,
        evaluator: Any | None = None,
        *,
        model: str = MODEL,
        max_tokens: int = 64,
        timeout_s: float = 600.0,
        overflow_words: int = 0,
    ) -> None:
        """`evaluator`: a logger the app's evaluation events go to (None: no evaluation)."""
        self.convention = convention
        self.tracer = tracer
        self.evaluator = evaluator
        self.model, self.max_tokens, self.overflow_words = model, max_tokens, overflow_words
        key = "sk-stub-not-a-key"
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout_s)
        self.retrying = openai.OpenAI(base_url=base_url, api_key=key, max_retries=2, timeout=timeout_s)
        self.calls: list[dict[str, Any]] = []  # what the app saw of each chat call of the current run

    def chat(self, client: openai.OpenAI, scenario: str, content: str, **options: Any) -> Any:
        messages = options.pop("messages", None) or [
            {"role": "system", "content": "You are a support assistant. Be brief."},
            {"role": "user", "content": content},
        ]
        options.setdefault("max_tokens", self.max_tokens)
        try:
            response = client.chat.completions.create(
                model=self.model, messages=messages, extra_headers={"X-Stub-Scenario": scenario}, **options
            )
        except openai.OpenAIError as error:
            self.calls.append({"error": error_name(error)})
            raise
        usage = response.usage
        self.calls.append({
            "finish_reason": response.choices[0].finish_reason,
            "input_tokens": usage.prompt_tokens if usage else None,
            "output_tokens": usage.completion_tokens if usage else None,
        })  # fmt: skip
        return response

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
        raised = verdict = ""
        self.calls = []
        try:
            with self.tracer.start_as_current_span("support-bot", attributes=attributes) as root:
                script = self.SCRIPTED.get(scenario)
                if script is None:  # one call, answered as the scenario says
                    answer = self.chat(self.client, scenario, question)
                else:
                    answer = script(self, question, index)
                if self.evaluator is not None:
                    judged = forecast_judge(answer.choices[0].message.content or "")
                    self.evaluator.emit(event_name="gen_ai.evaluation.result", attributes=judged)
                    verdict = judged["gen_ai.evaluation.score.label"]
        except openai.OpenAIError as error:
            raised = error_name(error)
        trace_id = format(root.get_span_context().trace_id, "032x")
        return {"trace_id": trace_id, "scenario": scenario, "index": index, "raised": raised,
                "track": arm[0] if arm else "", "calls": self.calls, "verdict": verdict}  # fmt: skip

    def answer_twice(self, question: str, index: int) -> Any:
        plan = self.chat(self.client, "answer", f"Plan how to answer: {question}")
        return self.chat(self.client, "answer", f"Answer with this plan: {plan.choices[0].message.content}")

    def length(self, question: str, index: int) -> Any:
        return self.chat(self.client, "length", question, max_tokens=TRUNCATE_AT)

    def overflow(self, question: str, index: int) -> Any:
        """A question under a pasted document longer than the model's context."""
        document = " ".join(["Paris"] * self.overflow_words)
        return self.chat(self.client, "answer", f"{document}\n\n{question}")

    def tool_call(self, question: str, index: int) -> Any:
        first = self.chat(self.client, "tool_call", question, tools=[WEATHER_TOOL])
        call = first.choices[0].message.tool_calls[0]
        with self.tool_span(call.function.arguments):
            result = json.dumps({"city": "Paris", "forecast": "sunny", "celsius": 21})
        messages = [
            {"role": "user", "content": question},
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": result},
        ]
        return self.chat(self.client, "tool_call", question, messages=messages, tools=[WEATHER_TOOL])

    def sdk_retry(self, question: str, index: int) -> Any:
        return self.chat(self.retrying, f"flaky:{self.convention}-{index}:2", question)

    def app_retry(self, question: str, index: int) -> Any:
        try:
            return self.chat(self.client, "server_error", question)
        except openai.InternalServerError:
            return self.chat(self.client, "answer", question)

    SCRIPTED: ClassVar[dict[str, Callable[[App, str, int], Any]]] = {
        "answer_twice": answer_twice,
        "length": length,
        "overflow": overflow,
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
    parser.add_argument("--model", default=MODEL, help="the model every request asks for")
    parser.add_argument("--max-tokens", type=int, default=64, help="of every call but `length`'s")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="of one request, in seconds")
    parser.add_argument("--overflow-words", type=int, default=0, help="of the `overflow` prompt")
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
    app = App(
        args.convention, args.base_url, tracer_provider.get_tracer("support-bot"), evaluator,
        model=args.model, max_tokens=args.max_tokens, timeout_s=args.request_timeout,
        overflow_words=args.overflow_words,
    )  # fmt: skip
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
