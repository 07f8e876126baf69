"""The runtime: span conventions, evaluation events, failures, routing, determinism under concurrency,
the in-process exporter and the sandbox."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import BaseModel, ValidationError

from cegraph.connectors.otlp.span_export import CallbackSpanExporter, otlp_messages
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.workflows.runtime import EvaluationResult, ExecutionResult, WorkflowRuntime, answer_key
from cegraph.daemon.workflows.sandbox import Sandbox
from cegraph.daemon.workflows.tools import ToolArgumentError
from cegraph.schemas.workflow import WorkflowSpec, WorkflowSpecError, example_spec, parse_spec

RETRIEVAL_QA = {
    "id": "qa-rag",
    "version": "2.1.0",
    "model": "sim-1",
    "input_schema": {"question": {"type": "string"}},
    "entry": "search",
    "output": "answer",
    "nodes": {
        "search": {
            "kind": "retrieve",
            "retriever": "kb_search",
            "inputs": {"query": "input.question"},
            "params": {"hops": 3, "top_k": 10},
        },
        "answer": {
            "kind": "llm",
            "prompt": "Answer from the context. End with 'Answer: <name>'.",
            "inputs": {"question": "input.question", "context": "search"},
            "params": {"temperature": 0.3},
        },
    },
    "edges": [{"source": "search", "target": "answer"}],
}


def recorder() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "tests"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def by_trace(spans: tuple[ReadableSpan, ...], trace_id: str) -> list[ReadableSpan]:
    return [span for span in spans if format(span.context.trace_id, "032x") == trace_id]


def root_of(spans: list[ReadableSpan]) -> ReadableSpan:
    [root] = [span for span in spans if span.parent is None]
    return root


def node_spans(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {span.attributes["cegraph.node.id"]: span for span in spans if span.parent is not None}


def evaluation_events(span: ReadableSpan) -> list[Mapping[str, Any]]:
    return [event.attributes for event in span.events if event.name == "gen_ai.evaluation.result"]


async def test_spans_follow_the_genai_and_cegraph_conventions():
    world = SimWorld(1)
    provider, exporter = recorder()
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools(), sandbox=world.sandbox)
    spec = parse_spec(RETRIEVAL_QA)
    task = world.task("qa", 0)
    result = await runtime.execute(spec, task.input, seed=7, track="canary", evaluator=world.evaluator(task))

    spans = by_trace(exporter.get_finished_spans(), result.trace_id)
    root, nodes = root_of(spans), node_spans(spans)
    assert root.name == "invoke_workflow qa-rag"
    assert dict(root.attributes) == {
        "gen_ai.operation.name": "invoke_workflow",
        "cegraph.workflow.id": "qa-rag",
        "cegraph.workflow.version": "2.1.0",
        "cegraph.workflow.hash": spec.content_hash,
        "cegraph.track": "canary",
        "cegraph.seed": 7,
        "input.value": json.dumps(task.input),
        "output.value": result.output,
    }
    assert set(nodes) == {"search", "answer"}
    assert all(span.parent.span_id == root.context.span_id for span in nodes.values())
    for node_id, span in nodes.items():
        assert span.attributes["cegraph.node.id"] == node_id
        assert span.attributes["cegraph.workflow.id"] == "qa-rag"
        assert span.attributes["cegraph.workflow.version"] == "2.1.0"
        assert span.attributes["cegraph.track"] == "canary"
        assert span.attributes["output.value"] == result.node(node_id).output

    search = nodes["search"].attributes
    assert search["gen_ai.operation.name"] == "retrieval" and search["cegraph.node.kind"] == "retrieve"
    assert search["gen_ai.data_source.id"] == "kb_search"
    assert search["gen_ai.retrieval.query.text"] == task.input["question"]
    assert "gen_ai.request.model" not in search

    answer = nodes["answer"].attributes
    assert nodes["answer"].name == "chat sim-1"
    assert answer["gen_ai.operation.name"] == "chat" and answer["cegraph.node.kind"] == "llm"
    assert answer["gen_ai.provider.name"] == "cegraph-sim"
    assert answer["gen_ai.request.model"] == "sim-1" and answer["gen_ai.response.model"] == "sim-1"
    assert answer["gen_ai.request.temperature"] == 0.3
    assert tuple(answer["gen_ai.response.finish_reasons"]) == ("stop",)
    assert answer["gen_ai.usage.input_tokens"] > 0 and answer["gen_ai.usage.output_tokens"] > 0
    messages = json.loads(answer["gen_ai.input.messages"])
    assert messages[0]["role"] == "user" and "## context" in messages[0]["parts"][0]["content"]
    assert json.loads(answer["gen_ai.system_instructions"])[0]["content"].startswith(
        "Answer from the context"
    )
    [output] = json.loads(answer["gen_ai.output.messages"])
    assert output["parts"][0]["content"] == result.output and output["finish_reason"] == "stop"
    assert json.loads(answer["input.value"]) == {
        "question": task.input["question"],
        "context": result.nodes[0].output,
    }

    assert result.evaluation is not None and result.evaluation.passed
    [event] = evaluation_events(root)
    assert event == {
        "gen_ai.evaluation.name": "qa.exact_match",
        "gen_ai.evaluation.score.value": 1.0,
        "gen_ai.evaluation.score.label": "pass",
        "gen_ai.evaluation.explanation": result.evaluation.explanation,
    }


async def test_a_failed_evaluation_lands_on_the_node_it_blames():
    world = SimWorld(2)
    provider, exporter = recorder()
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())
    spec = example_spec("qa")
    for index, task in enumerate(world.tasks("qa", 40, hops=3)):
        result = await runtime.execute(spec, task.input, seed=index, evaluator=world.evaluator(task))
        if result.failed:
            break
    else:
        pytest.fail("no failing execution among 40 three-hop questions without retrieval")
    assert result.evaluation and result.evaluation.node_id == "answer"
    spans = by_trace(exporter.get_finished_spans(), result.trace_id)
    [event] = evaluation_events(node_spans(spans)["answer"])
    assert event["gen_ai.evaluation.score.label"] == "fail"
    assert event["gen_ai.evaluation.explanation"] == result.evaluation.explanation
    assert not evaluation_events(root_of(spans))
    # a soft failure is not a hard one: no error status anywhere
    assert all(span.status.status_code != StatusCode.ERROR for span in spans)


class _LookupArguments(BaseModel):
    key: str


class BrokenTool:
    name = "lookup"
    description = "Looks a key up."
    arguments = _LookupArguments

    async def call(self, arguments: Mapping[str, Any]) -> str:
        raise ToolArgumentError(f"lookup: no such key {arguments.get('key')!r}")


TOOL_CHAIN = {
    "id": "lookup-chain",
    "version": "0.1.0",
    "model": "sim-1",
    "input_schema": {"question": {"type": "string"}},
    "entry": "look",
    "output": "explain",
    "nodes": {
        "look": {"kind": "tool", "tool": "lookup", "inputs": {"question": "input.question"}},
        "explain": {"kind": "llm", "inputs": {"found": "look"}},
    },
    "edges": [{"source": "look", "target": "explain"}],
}


async def test_a_raising_node_marks_its_span_and_the_root_and_skips_what_follows():
    world = SimWorld(0)
    provider, exporter = recorder()
    runtime = WorkflowRuntime(world.llm(), provider, tools={"lookup": BrokenTool()})
    task = world.task("arithmetic", 0)
    result = await runtime.execute(
        parse_spec(TOOL_CHAIN), task.input, seed=1, evaluator=world.evaluator(task)
    )

    qualified = "cegraph.daemon.workflows.tools.ToolArgumentError"
    assert result.output is None and result.error_type == qualified and result.failed
    assert [(run.node_id, run.status) for run in result.nodes] == [("look", "error"), ("explain", "skipped")]
    spans = by_trace(exporter.get_finished_spans(), result.trace_id)
    nodes = node_spans(spans)
    assert set(nodes) == {"look"}  # a skipped node has no span
    look = nodes["look"]
    assert look.status.status_code == StatusCode.ERROR
    assert look.attributes["error.type"] == qualified
    assert look.attributes["gen_ai.operation.name"] == "execute_tool" and look.name == "execute_tool lookup"
    [exception] = [event for event in look.events if event.name == "exception"]
    assert exception.attributes["exception.type"] == qualified
    root = root_of(spans)
    assert root.status.status_code == StatusCode.ERROR and root.attributes["error.type"] == qualified
    assert "output.value" not in root.attributes
    [event] = evaluation_events(root)
    assert event["gen_ai.evaluation.explanation"] == f"no output: node 'look' raised {qualified}"


async def test_a_recovered_retry_is_an_event_not_an_error():
    world = SimWorld(0)
    provider, exporter = recorder()
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())
    data = example_spec("arithmetic-calculator").canonical()
    data["nodes"]["calculate"]["params"] |= {"validate_arguments": True, "retries": 3}
    spec = parse_spec(data)
    for index, task in enumerate(world.tasks("arithmetic", 60, digits=5)):
        result = await runtime.execute(spec, task.input, seed=index)
        if result.nodes[0].llm_calls > 1 and result.error_type is None:
            break
    else:
        pytest.fail("no repaired tool call among 60 five-digit problems")
    [span] = node_spans(by_trace(exporter.get_finished_spans(), result.trace_id)).values()
    retries = [event for event in span.events if event.name == "cegraph.retry"]
    assert len(retries) == result.nodes[0].llm_calls - 1
    assert retries[0].attributes["cegraph.retry.cause"] == "invalid_arguments"
    assert "expression" in retries[0].attributes["cegraph.retry.reason"]
    assert span.status.status_code != StatusCode.ERROR and "error.type" not in span.attributes
    assert span.attributes["gen_ai.tool.name"] == "calculator"
    assert json.loads(span.attributes["gen_ai.tool.call.arguments"]).keys() == {"expression"}


ROUTED = {
    "id": "router",
    "version": "1.0.0",
    "model": "sim-1",
    "input_schema": {"question": {"type": "string"}},
    "entry": "route",
    "output": "done",
    "nodes": {
        "route": {
            "kind": "route",
            "inputs": {"q": "input.question"},
            "params": {"routes": [{"label": "numbers", "pattern": r"\d"}], "default": "words"},
        },
        "count": {
            "kind": "code",
            "source": "import json, sys\nq = json.load(sys.stdin)['q']\nprint(sum(c.isdigit() for c in q))",
            "inputs": {"q": "input.question"},
        },
        "shout": {
            "kind": "code",
            "source": "import json, sys\nprint(json.load(sys.stdin)['q'].upper())",
            "inputs": {"q": "input.question"},
        },
        "done": {
            "kind": "code",
            "source": "import json, sys\nprint('result:', json.load(sys.stdin)['r'])",
            "inputs": {"r": ["count", "shout"]},
        },
    },
    "edges": [
        {"source": "route", "target": "count", "when": "numbers"},
        {"source": "route", "target": "shout", "when": "words"},
        {"source": "count", "target": "done"},
        {"source": "shout", "target": "done"},
    ],
}


async def test_a_route_runs_one_branch_and_the_join_takes_what_ran():
    provider, exporter = recorder()
    runtime = WorkflowRuntime(SimWorld(0).llm(), provider)
    spec = parse_spec(ROUTED)
    numbers = await runtime.execute(spec, {"question": "call 555 0199"}, seed=1)
    words = await runtime.execute(spec, {"question": "hello"}, seed=1)
    assert numbers.output == "result: 7" and words.output == "result: HELLO"
    assert [run.status for run in numbers.nodes] == ["ok", "ok", "skipped", "ok"]
    assert set(node_spans(by_trace(exporter.get_finished_spans(), words.trace_id))) == {
        "route",
        "shout",
        "done",
    }
    route = node_spans(by_trace(exporter.get_finished_spans(), words.trace_id))["route"]
    assert route.attributes["output.value"] == "words" and "gen_ai.operation.name" not in route.attributes


async def test_executions_are_reproducible_per_seed_whatever_runs_concurrently():
    world = SimWorld(4)
    runtime = WorkflowRuntime(world.llm(), TracerProvider(), tools=world.tools())
    spec = example_spec("arithmetic")
    tasks = world.tasks("arithmetic", 30)
    one_by_one = [await runtime.execute(spec, task.input, seed=index) for index, task in enumerate(tasks)]
    together = await asyncio.gather(
        *(runtime.execute(spec, task.input, seed=index) for index, task in reversed(list(enumerate(tasks))))
    )
    assert [r.output for r in one_by_one] == [r.output for r in reversed(together)]
    reseeded = [
        await runtime.execute(spec, task.input, seed=index + 1000) for index, task in enumerate(tasks)
    ]
    assert sum(a.output != b.output for a, b in zip(one_by_one, reseeded, strict=True)) >= 5


async def test_bad_inputs_and_unregistered_tools_are_refused_before_any_span():
    provider, exporter = recorder()
    world = SimWorld(0)
    runtime = WorkflowRuntime(world.llm(), provider, tools={})
    with pytest.raises(WorkflowSpecError, match="node 'search': 'kb_search' is not a registered retriever"):
        await runtime.execute(parse_spec(RETRIEVAL_QA), {"question": "q"}, seed=0)
    with pytest.raises(ValidationError):
        await runtime.execute(parse_spec(ROUTED), {"query": "wrong field"}, seed=0)
    assert exporter.get_finished_spans() == ()


class CrashingEvaluator:
    async def evaluate(self, result: ExecutionResult) -> list[EvaluationResult]:
        raise RuntimeError("judge unavailable")


async def test_a_crashing_evaluator_propagates_and_leaves_no_span_open():
    world = SimWorld(0)
    provider, exporter = recorder()
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())
    with pytest.raises(RuntimeError, match="judge unavailable"):
        await runtime.execute(
            parse_spec(RETRIEVAL_QA), world.task("qa", 2).input, seed=0, evaluator=CrashingEvaluator()
        )
    assert sorted(span.name for span in exporter.get_finished_spans()) == [
        "chat sim-1",
        "invoke_workflow qa-rag",
        "retrieval kb_search",
    ]


def test_ensemble_votes_compare_final_answers():
    assert answer_key("Work...\nAnswer: 12,345.") == answer_key("Answer: 12345") == "12345"
    assert answer_key('{"b": 1, "a": 2}') == answer_key('{"a":2,"b":1}')
    assert answer_key("Answer: Velmora") != answer_key("Answer: Ostrava")


async def test_the_callback_exporter_hands_over_collector_format_messages():
    received: list[tuple[bytes | None, bytes]] = []
    world = SimWorld(0)
    provider = TracerProvider()
    exporter = CallbackSpanExporter(
        lambda key, payload: received.append((key, payload)), partition_by_trace=True
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())
    result = await runtime.execute(parse_spec(RETRIEVAL_QA), world.task("qa", 1).input, seed=3)
    assert {key for key, _ in received} == {result.trace_id.encode()}
    decoded = [ExportTraceServiceRequest.FromString(payload) for _, payload in received]
    names = {
        span.name for r in decoded for rs in r.resource_spans for ss in rs.scope_spans for span in ss.spans
    }
    assert names == {"invoke_workflow qa-rag", "retrieval kb_search", "chat sim-1"}


def test_large_batches_are_split_below_the_message_limit():
    provider, exporter = recorder()
    tracer = provider.get_tracer("t")
    for index in range(40):
        with tracer.start_as_current_span(f"s{index}", attributes={"blob": "x" * 2_000}):
            pass
    spans = exporter.get_finished_spans()
    messages = otlp_messages(spans, partition_by_trace=False, max_message_bytes=20_000)
    assert len(messages) > 1 and all(len(payload) <= 20_000 for _, payload in messages)
    total = sum(
        len(ExportTraceServiceRequest.FromString(p).resource_spans[0].scope_spans[0].spans)
        for _, p in messages
    )
    assert total == 40
    per_trace = otlp_messages(spans, partition_by_trace=True)
    assert len(per_trace) == 40 and all(key is not None and len(key) == 32 for key, _ in per_trace)


async def test_the_sandbox_reports_errors_timeouts_and_test_results():
    sandbox = Sandbox()
    assert (await sandbox.run_program("print(6 * 7)")).stdout == "42\n"
    assert (await sandbox.run_program("1 / 0")).error == ("ZeroDivisionError", "division by zero")
    slow = await sandbox.run_program("while True: pass", timeout_s=0.5)
    assert slow.timed_out and slow.error[0] == "Timeout"
    report = await sandbox.run_tests(
        "def f(xs):\n    return xs[1:]", ["assert f([1, 2]) == [2]", "assert f([]) == None"]
    )
    assert not report.passed and [o.passed for o in report.outcomes] == [True, False]
    assert report.failures[0].message == "got [], expected None"
    broken = await sandbox.run_tests("def f(:", ["assert f() == 1"])
    assert broken.error is not None and broken.error[0] == "SyntaxError"


def test_specs_are_frozen():
    spec = parse_spec(RETRIEVAL_QA)
    with pytest.raises(ValidationError):
        spec.version = "9.9.9"  # type: ignore[misc]
    assert isinstance(spec, WorkflowSpec)


def test_one_sandbox_serves_programs_from_successive_event_loops():
    """Refinement jobs and demo ticks each run their own loop over the same world's sandbox."""
    from cegraph.daemon.workflows.sandbox import Sandbox

    sandbox = Sandbox(max_concurrent=2)

    async def burst() -> list[str]:
        runs = await asyncio.gather(*(sandbox.run_program(f"print({i} * 2)") for i in range(5)))
        return [run.stdout.strip() for run in runs]

    for _ in range(3):
        assert asyncio.run(burst()) == ["0", "2", "4", "6", "8"]
