"""Executes a workflow spec on one task input as one OpenTelemetry trace.

The root span (`invoke_workflow`) carries the workflow identity, the track, the seed and the task
input; each node execution is one child span that follows the GenAI conventions plus cegraph's own
attributes (the table in docs/workflows.md, "The runtime"). The evaluator's verdict becomes a
`gen_ai.evaluation.result` event on the node it blames, or on the root. Spans go to the TracerProvider
the caller passes (never the global one), so the same runtime feeds Kafka, the embedded daemon or a
test. Node spans stay open until the verdict is known and are then ended at their recorded end times.

Every LLM call gets a seed derived from (execution seed, node id, call index): an execution is
reproducible from its seed whatever else runs concurrently. Nodes of one topological level run
concurrently; a node runs when one of its incoming edges is taken (a route node takes the edges whose
`when` matches its label) and none of its predecessors failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider, set_span_in_context
from pydantic import BaseModel, Field, ValidationError

from cegraph.daemon.workflows.llm import CallContext, Completion, LLMBackend, Message, Purpose
from cegraph.daemon.workflows.sandbox import Sandbox, extract_code
from cegraph.daemon.workflows.tools import Registry, Retriever, Tool, ToolArgumentError
from cegraph.schemas.workflow import (
    INPUT,
    LLM_KINDS,
    PLACEHOLDER,
    OutputCheck,
    WorkflowSpec,
    WorkflowSpecError,
)

Track = Literal["stable", "canary", "shadow"]
PROGRAM_KINDS = frozenset({"code", "programmer", "test"})  # nodes that run code in the sandbox
TRACER_NAME = "cegraph.runtime"

_OPERATIONS = {
    "tool": "execute_tool",
    "code": "execute_tool",
    "test": "execute_tool",
    "retrieve": "retrieval",
}
_PROTOCOL = {
    "review": "Review the answer to the task. Start your reply with 'VERDICT: PASS' when it is correct and "
    "complete, or with 'VERDICT: FAIL' followed by what is wrong.",
    "revise": "Revise the answer so that it addresses the review. Reply with the complete revised answer "
    "only.",
    "programmer": "Write a complete Python program that computes the result and prints only the final "
    "answer. Reply with a single ```python code block.",
    "fix": "Fix the code so that the tests pass. Reply with the complete corrected code in a single "
    "```python code block.",
}
_FORMATS = {
    "json": "a single JSON object and nothing else",
    "number": "a single number and nothing else",
    "text": "plain text without any preamble",
}
ANSWER_LINE = re.compile(r"(?im)^\s*answer\s*:\s*(.+?)\s*$")
_JSON_OBJECT = re.compile(r"\{.*\}", re.S)


class OutputValidationError(Exception):
    """An LLM node's output failed its `validate_output` check on every attempt."""


class CodeExecutionError(Exception):
    """A program (LLM-written or a code node's source) failed or timed out."""


class EvaluationResult(BaseModel):
    """One evaluator's verdict on one execution; `passed` is None when it could give none (a judge
    that did not answer with a verdict, an endpoint that failed: `error_type` says which)."""

    name: str
    passed: bool | None
    score: float | None = Field(None, ge=0.0, le=1.0)
    explanation: str = ""
    node_id: str | None = Field(None, description="The node the evaluator blames, when it can tell.")
    error_type: str | None = None
    llm_calls: int = Field(0, ge=0, description="Calls the evaluator itself made (an LLM judge's).")
    tokens: int = Field(0, ge=0)


class NodeRun(BaseModel):
    node_id: str
    kind: str
    status: Literal["ok", "error", "skipped"]
    output: str | None = None
    error_type: str | None = None
    error_message: str = ""
    llm_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reasons: list[str] = Field(default_factory=list)
    span_id: str = ""


class ExecutionResult(BaseModel):
    trace_id: str
    workflow_id: str
    workflow_version: str
    track: Track
    seed: int
    input: dict[str, Any]
    output: str | None
    nodes: list[NodeRun] = Field(description="In execution order, skipped nodes included.")
    error_type: str | None = None
    evaluations: list[EvaluationResult] = Field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.error_type is not None or any(e.passed is False for e in self.evaluations)

    @property
    def evaluation(self) -> EvaluationResult | None:
        """The first failing verdict, else the first verdict."""
        return next((e for e in self.evaluations if e.passed is False), None) or next(
            iter(self.evaluations), None
        )

    def node(self, node_id: str) -> NodeRun | None:
        return next((run for run in self.nodes if run.node_id == node_id), None)


class Evaluator(Protocol):
    """Judges an execution: the verdicts of the evaluators that apply to it (possibly none)."""

    async def evaluate(self, result: ExecutionResult) -> list[EvaluationResult]: ...


def exception_type(error: BaseException) -> str:
    """The exception's type as OpenTelemetry's `exception.type` spells it (and so `error.type` too)."""
    module, name = type(error).__module__, type(error).__qualname__
    return f"{module}.{name}" if module and module != "builtins" else name


def _span_name(node: Any, node_id: str, model: str) -> str:
    """GenAI span names: `{operation} {model | tool | data source}`."""
    if node.kind == "tool":
        return f"execute_tool {node.tool}"
    if node.kind == "retrieve":
        return f"retrieval {node.retriever}"
    if node.kind in ("code", "test"):
        return "execute_tool python"
    if node.kind == "route":
        return f"route {node_id}"
    return f"chat {model}"


def derive_seed(seed: int, node_id: str, call_index: int) -> int:
    digest = hashlib.sha256(f"{seed}\x1f{node_id}\x1f{call_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def answer_key(text: str) -> str:
    """What two answers must share to count as the same vote: the final answer, normalized."""
    lines = ANSWER_LINE.findall(text)
    if lines:
        value = lines[-1]
    else:
        try:
            return json.dumps(json.loads(text), sort_keys=True)
        except ValueError:
            value = text
    value = re.sub(r"(?<=\d),(?=\d{3})", "", value.strip().rstrip(".").lower())
    return " ".join(value.split())


def check_output(text: str, check: OutputCheck) -> str | None:
    """Why `text` fails the check, or None when it passes."""
    if check.kind == "number":
        try:
            float(text.strip().replace(",", ""))
        except ValueError:
            return f"the output is not a single number: {text.strip()[:80]!r}"
        return None
    try:
        data = json.loads(text)
    except ValueError as error:
        return f"the output is not valid JSON ({error})"
    if not isinstance(data, dict):
        return f"the output is JSON but not an object ({type(data).__name__})"
    missing = [key for key in check.required_keys if key not in data]
    return f"the JSON object lacks the keys {missing}" if missing else None


_Known = TypeVar("_Known")


def _per_spec(cache: dict[str, _Known], spec: WorkflowSpec, compute: Callable[[], _Known]) -> _Known:
    """What a spec's content determines (its input model, its levels), computed once per content:
    shadow replays run the same few candidate specs thousands of times."""
    if (known := cache.get(spec.content_hash)) is None:
        known = cache[spec.content_hash] = compute()
    return known


def _messages_json(messages: Sequence[Message]) -> str:
    return json.dumps(
        [
            {"role": m.role, "parts": [{"type": "text", "content": m.content}]}
            for m in messages
            if m.role != "system"
        ]
    )


class _NodeCall:
    """One node execution: its LLM calls (seeded by call index) and what its span records about them."""

    def __init__(self, runtime: WorkflowRuntime, spec: WorkflowSpec, node_id: str, seed: int) -> None:
        self.runtime, self.spec, self.node_id, self.seed = runtime, spec, node_id, seed
        self.node: Any = spec.nodes[node_id]
        self.calls = 0
        self.input_tokens = self.output_tokens = 0
        self.finish_reasons: list[str] = []
        self.last_messages: Sequence[Message] = ()
        self.last_completion: Completion | None = None
        self.attributes: dict[str, Any] = {}
        self.retries: list[tuple[str, str]] = []

    @property
    def model(self) -> str:
        return self.node.params.model or self.spec.model

    def system(self, inputs: Mapping[str, str], protocol: str = "") -> Message:
        prompt = PLACEHOLDER.sub(lambda m: inputs.get(m.group(1), m.group(0)), self.node.prompt)
        return Message(role="system", content="\n\n".join(part for part in (prompt, protocol) if part))

    @staticmethod
    def user(inputs: Mapping[str, str]) -> Message:
        return Message(
            role="user", content="\n\n".join(f"## {name}\n{value}" for name, value in inputs.items())
        )

    async def complete(self, messages: list[Message], purpose: Purpose) -> Completion:
        params = self.node.params
        context = CallContext(
            workflow_id=self.spec.id,
            node_id=self.node_id,
            node_kind=self.node.kind,
            purpose=purpose,
            call_index=self.calls,
        )
        seed = derive_seed(self.seed, self.node_id, self.calls)
        self.calls += 1
        completion = await self.runtime.backend.complete(
            messages,
            model=self.model,
            temperature=params.temperature,
            max_tokens=params.max_tokens,
            seed=seed,
            context=context,
        )
        self.input_tokens += completion.input_tokens
        self.output_tokens += completion.output_tokens
        self.finish_reasons.append(completion.finish_reason)
        self.last_messages, self.last_completion = messages, completion
        return completion

    def retry(self, cause: str, reason: str) -> None:
        """An attempt that was rejected and tried again (a span event; it fails nothing by itself)."""
        self.retries.append((cause, reason))


class WorkflowRuntime:
    """Runs specs against one LLM backend, with a tool registry and a sandbox for programs."""

    def __init__(
        self,
        backend: LLMBackend,
        tracer_provider: TracerProvider,
        *,
        tools: Registry | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.backend = backend
        self.tools: Registry = tools or {}
        self.sandbox = sandbox or Sandbox()
        self._tracer = tracer_provider.get_tracer(TRACER_NAME)
        self._input_models: dict[str, type[BaseModel]] = {}
        self._levels: dict[str, list[list[str]]] = {}
        self._handlers: dict[str, Callable[[_NodeCall, dict[str, str]], Awaitable[str]]] = {
            "llm": self._llm, "ensemble": self._ensemble, "programmer": self._programmer,
            "review": self._review, "revise": self._revise, "format": self._format, "verify": self._verify,
            "test": self._test, "tool": self._tool, "retrieve": self._retrieve, "code": self._code,
            "route": self._route,
        }  # fmt: skip

    def check(self, spec: WorkflowSpec) -> None:
        """Refuse a spec that names tools this runtime does not have (or of the wrong sort), or that
        runs programs where the sandbox cannot isolate them."""
        problems = []
        for node_id, node in spec.nodes.items():
            if node.kind in PROGRAM_KINDS and (unavailable := self.sandbox.unavailable()) is not None:
                problems.append(f"node {node_id!r} ({node.kind}) runs programs: {unavailable}")
            if node.kind == "tool" and not isinstance(self.tools.get(node.tool), Tool):
                problems.append(f"node {node_id!r}: {node.tool!r} is not a registered tool")
            if node.kind == "retrieve" and not isinstance(self.tools.get(node.retriever), Retriever):
                problems.append(f"node {node_id!r}: {node.retriever!r} is not a registered retriever")
        if problems:
            raise WorkflowSpecError(problems)

    async def execute(
        self,
        spec: WorkflowSpec,
        task_input: Mapping[str, Any],
        *,
        seed: int,
        track: Track = "stable",
        evaluator: Evaluator | None = None,
    ) -> ExecutionResult:
        """Run the spec on one input; raises only for a bad spec or input, never for a failing node."""
        self.check(spec)
        assert spec.content_hash is not None
        model = _per_spec(self._input_models, spec, spec.input_model)
        task = model.model_validate(dict(task_input)).model_dump(exclude_none=True)
        common = {
            "cegraph.workflow.id": spec.id,
            "cegraph.workflow.version": spec.version,
            "cegraph.track": track,
        }
        root = self._tracer.start_span(
            f"invoke_workflow {spec.id}",
            kind=SpanKind.INTERNAL,
            attributes={
                **common,
                "gen_ai.operation.name": "invoke_workflow",
                "cegraph.workflow.hash": spec.content_hash,
                "cegraph.seed": seed,
                "input.value": json.dumps(task, sort_keys=True),
            },
        )
        runs: dict[str, NodeRun] = {}
        spans: dict[str, tuple[Span, int]] = {}
        try:
            levels = _per_spec(self._levels, spec, spec.topological_levels)
            for level in levels:
                ready = [node_id for node_id in level if self._should_run(spec, node_id, runs)]
                for node_id in level:
                    if node_id not in ready:
                        runs[node_id] = NodeRun(
                            node_id=node_id, kind=spec.nodes[node_id].kind, status="skipped"
                        )
                nodes = [self._run_node(spec, node_id, task, runs, seed, root, common) for node_id in ready]
                # a level of one node (most are) is awaited in place: a task would only cost its set-up
                done = [await nodes[0]] if len(nodes) == 1 else await asyncio.gather(*nodes)
                for node_id, (run, span, end_ns) in zip(ready, done, strict=True):
                    runs[node_id] = run
                    spans[node_id] = (span, end_ns)

            order = [node_id for level in levels for node_id in level]
            failed = next((runs[n] for n in order if runs[n].status == "error"), None)
            output_run = runs[spec.output]
            result = ExecutionResult(
                trace_id=format(root.get_span_context().trace_id, "032x"),
                workflow_id=spec.id,
                workflow_version=spec.version,
                track=track,
                seed=seed,
                input=task,
                output=output_run.output if output_run.status == "ok" else None,
                nodes=[runs[n] for n in order],
                error_type=failed.error_type if failed else None,
            )
            if evaluator is not None:
                result.evaluations = await evaluator.evaluate(result)
                for evaluation in result.evaluations:
                    record_evaluation(evaluation, root, spans)
            if result.output is not None:
                root.set_attribute("output.value", result.output)
            if failed is not None:
                root.set_attribute("error.type", failed.error_type or "")
                root.set_status(
                    Status(StatusCode.ERROR, f"node {failed.node_id!r} failed: {failed.error_message}")
                )
            return result
        finally:  # even when the evaluator or the caller's cancellation interrupts: no span left open
            for span, end_ns in spans.values():
                span.end(end_time=end_ns)
            root.end()

    @staticmethod
    def _should_run(spec: WorkflowSpec, node_id: str, runs: Mapping[str, NodeRun]) -> bool:
        if node_id == spec.entry:
            return True
        incoming = [edge for edge in spec.edges if edge.target == node_id]
        if any(runs[edge.source].status == "error" for edge in incoming):
            return False
        return any(
            runs[edge.source].status == "ok" and edge.when in (None, runs[edge.source].output)
            for edge in incoming
        )

    @staticmethod
    def _resolve(ref: str | list[str], task: Mapping[str, Any], runs: Mapping[str, NodeRun]) -> str:
        for one in [ref] if isinstance(ref, str) else ref:
            if one == INPUT:
                return json.dumps(task, sort_keys=True)
            if one.startswith(INPUT + "."):
                value = task.get(one.removeprefix(INPUT + "."))
                return value if isinstance(value, str) else json.dumps(value)
            run = runs.get(one)
            if run is not None and run.status == "ok" and run.output is not None:
                return run.output
        return ""

    async def _run_node(
        self,
        spec: WorkflowSpec,
        node_id: str,
        task: Mapping[str, Any],
        runs: Mapping[str, NodeRun],
        seed: int,
        root: Span,
        common: Mapping[str, Any],
    ) -> tuple[NodeRun, Span, int]:
        node = spec.nodes[node_id]
        call = _NodeCall(self, spec, node_id, seed)
        inputs = {name: self._resolve(ref, task, runs) for name, ref in node.inputs.items()}
        operation = _OPERATIONS.get(node.kind, "chat" if node.kind in LLM_KINDS else None)
        attributes: dict[str, Any] = {
            **common,
            "cegraph.node.id": node_id,
            "cegraph.node.kind": node.kind,
            "input.value": json.dumps(inputs),
        }
        if operation:
            attributes["gen_ai.operation.name"] = operation
        if node.kind in LLM_KINDS:
            attributes |= {
                "gen_ai.provider.name": self.backend.provider,
                "gen_ai.request.model": call.model,
                "gen_ai.request.temperature": node.params.temperature,
            }
            if node.params.max_tokens is not None:
                attributes["gen_ai.request.max_tokens"] = node.params.max_tokens
        span = self._tracer.start_span(
            _span_name(node, node_id, call.model if node.kind in LLM_KINDS else ""),
            context=set_span_in_context(root),
            kind=SpanKind.CLIENT if operation == "chat" else SpanKind.INTERNAL,
            attributes=attributes,
        )
        run = NodeRun(
            node_id=node_id,
            kind=node.kind,
            status="ok",
            span_id=format(span.get_span_context().span_id, "016x"),
        )
        try:
            run.output = await self._handlers[node.kind](call, inputs)
            span.set_attribute("output.value", run.output)
        except asyncio.CancelledError:
            span.end()  # the caller gave up on the execution: close the span, don't record a failure
            raise
        except Exception as error:  # a failing node fails the execution, not the runtime
            run.status, run.error_type, run.error_message = "error", exception_type(error), str(error)
            span.record_exception(error)
            span.set_attribute("error.type", run.error_type)
            span.set_status(Status(StatusCode.ERROR, str(error)[:500]))
        run.llm_calls, run.input_tokens, run.output_tokens = call.calls, call.input_tokens, call.output_tokens
        run.finish_reasons = call.finish_reasons
        self._record_calls(span, call)
        return run, span, time.time_ns()

    @staticmethod
    def _record_calls(span: Span, call: _NodeCall) -> None:
        if not span.is_recording():  # a no-op tracer's span keeps nothing: spare the JSON
            return
        for attempt, (cause, reason) in enumerate(call.retries, start=1):
            span.add_event(
                "cegraph.retry",
                {
                    "cegraph.retry.attempt": attempt,
                    "cegraph.retry.cause": cause,
                    "cegraph.retry.reason": reason[:500],
                },
            )
        span.set_attributes(call.attributes)
        if call.calls == 0:
            return
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": call.input_tokens,
                "gen_ai.usage.output_tokens": call.output_tokens,
                "gen_ai.response.finish_reasons": call.finish_reasons,
                "cegraph.node.llm_calls": call.calls,
                "gen_ai.input.messages": _messages_json(call.last_messages),
            }
        )
        system = [m.content for m in call.last_messages if m.role == "system"]
        if system:
            span.set_attribute(
                "gen_ai.system_instructions", json.dumps([{"type": "text", "content": system[0]}])
            )
        completion = call.last_completion
        if completion is not None:
            span.set_attribute("gen_ai.response.model", completion.model or call.model)
            span.set_attribute(
                "gen_ai.output.messages",
                json.dumps(
                    [
                        {
                            "role": "assistant",
                            "parts": [{"type": "text", "content": completion.text}],
                            "finish_reason": completion.finish_reason,
                        }
                    ]
                ),
            )

    # Node kinds. Each returns the node's output text or raises; `inputs` are the resolved inputs.

    async def _generate(
        self, call: _NodeCall, inputs: Mapping[str, str], protocol: str = "", purpose: Purpose = "answer"
    ) -> str:
        """One answer, re-asked with the rejection as feedback while `validate_output` rejects it."""
        params = call.node.params
        messages = [call.system(inputs, protocol), call.user(inputs)]
        for attempt in range(params.retries + 1):
            text = (await call.complete(messages, purpose)).text
            problem = check_output(text, params.validate_output) if params.validate_output else None
            if problem is None:
                return text
            if attempt == params.retries:
                raise OutputValidationError(problem)
            call.retry("invalid_output", problem)
            feedback = f"Your answer was rejected: {problem}. Answer again, in exactly the required format."
            messages = _ask_again(messages, text, feedback)
        raise AssertionError("unreachable")

    async def _llm(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        return await self._generate(call, inputs)

    async def _ensemble(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        messages = [call.system(inputs), call.user(inputs)]
        # Concurrent samples; call indexes (and so seeds) are taken in order before the first await.
        samples = await asyncio.gather(
            *(call.complete(messages, "answer") for _ in range(call.node.params.samples))
        )
        keys = [answer_key(sample.text) for sample in samples]
        votes = {key: keys.count(key) for key in keys}
        winner = keys.index(max(votes, key=lambda key: (votes[key], -keys.index(key))))
        call.last_completion = samples[winner]
        call.attributes |= {
            "gen_ai.request.choice.count": len(samples),
            "cegraph.ensemble.votes": votes[keys[winner]],
        }
        return samples[winner].text

    async def _programmer(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        params = call.node.params
        messages = [call.system(inputs, _PROTOCOL["programmer"]), call.user(inputs)]
        for attempt in range(params.retries + 1):
            text = (await call.complete(messages, "code")).text
            run = await self.sandbox.run_program(extract_code(text), timeout_s=params.timeout_s)
            if run.ok:
                return run.stdout.strip()
            error = "{}: {}".format(*run.error)
            if attempt == params.retries:
                raise CodeExecutionError(error)
            call.retry("program_failed", error)
            messages = _ask_again(
                messages, text, f"The program failed: {error}. Reply with a corrected program."
            )
        raise AssertionError("unreachable")

    async def _verdict(self, call: _NodeCall, inputs: Mapping[str, str]) -> tuple[bool, str]:
        text = (
            await call.complete([call.system(inputs, _PROTOCOL["review"]), call.user(inputs)], "review")
        ).text
        return not re.search(r"VERDICT:\s*FAIL", text, re.I), text

    async def _review(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        passed, text = await self._verdict(call, inputs)
        call.attributes["cegraph.review.passed"] = passed
        return text

    async def _revise(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        return await self._generate(call, inputs, _PROTOCOL["revise"], "revise")

    async def _format(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        target = call.node.params.output_format
        protocol = f"Rewrite the answer in the required output format: {target}, {_FORMATS[target]}."
        return await self._generate(call, inputs, protocol, "format")

    async def _verify(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        answer = inputs["answer"]
        for _ in range(call.node.params.rounds):
            passed, critique = await self._verdict(call, {**inputs, "answer": answer})
            if passed:
                return answer
            call.retry("verification_failed", critique)
            revision = {**inputs, "answer": answer, "review": critique}
            answer = await self._generate(call, revision, _PROTOCOL["revise"], "revise")
        return answer

    async def _test(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        params = call.node.params
        code = extract_code(inputs["code"])
        tests = _tests_of(inputs["tests"])
        for round_ in range(params.rounds + 1):
            report = await self.sandbox.run_tests(code, tests, timeout_s=params.timeout_s)
            if report.passed or round_ == params.rounds:
                break
            call.retry("tests_failed", report.summary())
            feedback = {**inputs, "code": f"```python\n{code}\n```", "test_results": report.summary()}
            code = extract_code(await self._generate(call, feedback, _PROTOCOL["fix"], "fix"))
        call.attributes |= {
            "gen_ai.tool.name": "python",
            "cegraph.test.passed": report.passed,
            "cegraph.test.failures": len(report.failures),
        }
        return f"```python\n{code}\n```"

    async def _tool(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        node = call.node
        tool = self.tools[node.tool]
        assert isinstance(tool, Tool)
        protocol = (
            f"Call the tool {tool.name!r}: {tool.description}\nReply with only a JSON object of its "
            f"arguments, matching this JSON Schema:\n{json.dumps(tool.arguments.model_json_schema())}"
        )
        messages = [call.system(inputs, protocol), call.user(inputs)]
        attempts = node.params.retries + 1 if node.params.validate_arguments else 1
        for attempt in range(attempts):
            text = (await call.complete(messages, "tool_arguments")).text
            arguments, problem = _arguments_of(text)
            if problem is None and node.params.validate_arguments:
                try:
                    tool.arguments.model_validate(arguments)
                except ValidationError as error:
                    problem = "; ".join(
                        f"{'.'.join(map(str, e['loc'])) or '(arguments)'}: {e['msg']}" for e in error.errors()
                    )
            if problem is None:
                break
            if attempt == attempts - 1:
                raise ToolArgumentError(f"{tool.name}: {problem}")
            call.retry("invalid_arguments", problem)
            feedback = (
                f"The arguments were rejected: {problem}. Reply with corrected arguments as a JSON object."
            )
            messages = _ask_again(messages, text, feedback)
        call.attributes |= {
            "gen_ai.tool.name": tool.name,
            "gen_ai.tool.call.arguments": json.dumps(arguments),
        }
        return await tool.call(arguments)

    async def _retrieve(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        node = call.node
        retriever = self.tools[node.retriever]
        assert isinstance(retriever, Retriever)
        passages = await retriever.retrieve(inputs["query"], top_k=node.params.top_k, hops=node.params.hops)
        call.attributes |= {
            "gen_ai.data_source.id": retriever.name,
            "gen_ai.retrieval.query.text": inputs["query"],
            "cegraph.retrieval.count": len(passages),
        }
        return "\n".join(passages)

    async def _code(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        node = call.node
        run = await self.sandbox.run_program(
            node.source, stdin=json.dumps(inputs), timeout_s=node.params.timeout_s
        )
        if not run.ok:
            raise CodeExecutionError("{}: {}".format(*run.error))
        call.attributes["gen_ai.tool.name"] = "python"
        return run.stdout.strip()

    async def _route(self, call: _NodeCall, inputs: dict[str, str]) -> str:
        params = call.node.params
        text = "\n".join(inputs.values())
        return next((rule.label for rule in params.routes if re.search(rule.pattern, text)), params.default)


def evaluation_attributes(evaluation: EvaluationResult) -> dict[str, Any]:
    """A verdict as the attributes of a GenAI `gen_ai.evaluation.result` event. No verdict has no
    label and no score, and an `error.type`, so nothing downstream counts it as a pass or a fail."""
    attributes: dict[str, Any] = {
        "gen_ai.evaluation.name": evaluation.name,
        "gen_ai.evaluation.explanation": evaluation.explanation,
    }
    if evaluation.passed is not None:
        attributes["gen_ai.evaluation.score.label"] = "pass" if evaluation.passed else "fail"
    if evaluation.score is not None:
        attributes["gen_ai.evaluation.score.value"] = evaluation.score
    if evaluation.error_type is not None:
        attributes["error.type"] = evaluation.error_type
    if evaluation.llm_calls:
        attributes["cegraph.evaluation.llm_calls"] = evaluation.llm_calls
        attributes["cegraph.evaluation.tokens"] = evaluation.tokens
    return attributes


def record_evaluation(
    evaluation: EvaluationResult, root: Span, spans: Mapping[str, tuple[Span, int]]
) -> None:
    """The verdict as an event on the span of the node it blames, else on the execution's root."""
    attributes = evaluation_attributes(evaluation)
    if evaluation.node_id in spans:
        span, end_ns = spans[evaluation.node_id]
        span.add_event("gen_ai.evaluation.result", attributes, timestamp=end_ns)
    else:
        root.add_event("gen_ai.evaluation.result", attributes)


def _ask_again(messages: list[Message], reply: str, feedback: str) -> list[Message]:
    """The conversation continued: the rejected reply, then why it was rejected."""
    return [*messages, Message(role="assistant", content=reply), Message(role="user", content=feedback)]


def _tests_of(text: str) -> list[str]:
    """Tests as a JSON list of assert statements, or one per line."""
    try:
        tests = json.loads(text)
    except ValueError:
        tests = None
    if isinstance(tests, list):
        return [str(test) for test in tests]
    return [line for line in text.splitlines() if line.strip()]


def _arguments_of(text: str) -> tuple[dict[str, Any], str | None]:
    """The JSON object in an LLM's reply, or why there is none."""
    match = _JSON_OBJECT.search(text)
    try:
        arguments = json.loads(match.group(0) if match else text)
    except ValueError as error:
        return {}, f"the reply is not a JSON object ({error})"
    if not isinstance(arguments, dict):
        return {}, "the reply is not a JSON object"
    return arguments, None
