"""The spec's evaluators: reference checks, the strict LLM-judge parser, the HTTP evaluator against a
real HTTP server, the events they leave on the trace, and what the shadow verifier reads back."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sim_fixtures import truth_output

from cegraph.connectors.http.evaluator import http_judges
from cegraph.daemon.ingest.normalize import evaluations_of
from cegraph.daemon.refine.operators import OPERATORS, Edit, EditRefused, apply_edit, refusal
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.spans import SpanEvent, SpanRecord
from cegraph.daemon.workflows.evaluators import Evaluation, parse_judgement, reference_part
from cegraph.daemon.workflows.runtime import ExecutionResult, NodeRun, WorkflowRuntime
from cegraph.schemas.workflow import WorkflowSpecError, example_spec, parse_spec

EXAMPLES = {"arithmetic": "arithmetic", "extraction": "extraction", "qa": "qa", "coding": "coding"}


def execution(output: str | None, task_input: dict[str, Any] | None = None, **extra: Any) -> ExecutionResult:
    return ExecutionResult(
        trace_id="0" * 32, workflow_id="w", workflow_version="1.0.0", track="stable", seed=3,
        input=task_input or {"question": "q"}, output=output,
        nodes=[NodeRun(node_id="solve", kind="llm", status="ok", output=output)], **extra,
    )  # fmt: skip


def spec_with(*evaluators: dict[str, Any]):
    document = json.loads(example_spec("arithmetic").model_dump_json(exclude={"content_hash"}))
    document["evaluators"] = list(evaluators)
    return parse_spec(document)


async def verdicts(spec, reference, output, evaluation: Evaluation | None = None):
    evaluator = (evaluation or Evaluation()).evaluator(spec, reference)
    assert evaluator is not None
    return await evaluator.evaluate(execution(output))


async def test_the_shipped_examples_reference_checks_agree_with_the_simulated_worlds_judge():
    """On the ground truth and on a wrong answer, the examples' evaluators (task.reference) give the
    same verdict as the simulated world's own judge: the two judges of the same truth agree."""
    world = SimWorld(19)
    evaluation = Evaluation()
    for family, example in EXAMPLES.items():
        spec = example_spec(example)
        for task in world.tasks(family, 4):
            for output in (truth_output(world, task), "Answer: 7", '{"customer": 1}'):
                result = execution(output, task.input)
                [own] = await world.evaluator(task).evaluate(result)
                found = await evaluation.evaluator(spec, task.reference).evaluate(result)
                assert [v.passed for v in found] == [own.passed], (family, output, found, own)


async def test_a_reference_check_judges_only_executions_whose_reference_has_its_part():
    spec = example_spec("service")
    evaluation = Evaluation()
    arithmetic = await verdicts(spec, {"arithmetic": {"answer": 42}}, "Answer: 42", evaluation)
    assert [(v.name, v.passed) for v in arithmetic] == [("arithmetic.exact_match", True)]
    assert await verdicts(spec, None, "Answer: 42", evaluation) == []
    assert await verdicts(spec, {"other": 1}, "Answer: 42", evaluation) == []


async def test_numeric_exact_regex_and_schema_checks_fail_wrong_answers_with_a_reason():
    spec = spec_with(
        {"kind": "numeric", "name": "n", "reference": "x", "abs_tolerance": 0.5},
        {"kind": "exact", "name": "e", "reference": "y"},
        {"kind": "regex", "name": "r", "pattern": r"^Answer: \d+$"},
        {"kind": "json_schema", "name": "j", "json_schema": {"type": "object", "required": ["a"]}},
    )
    reference = {"x": 10, "y": "Ten"}
    right = {v.name: v for v in await verdicts(spec, reference, "Answer: 10")}
    assert [right[n].passed for n in "ner"] == [True, False, True]  # 10 is not "Ten"
    assert right["j"].passed is False and "not valid JSON" in right["j"].explanation
    close = {v.name: v for v in await verdicts(spec, reference, "Answer: 10.4")}
    assert close["n"].passed
    wrong = {v.name: v for v in await verdicts(spec, reference, "Working...\nAnswer: ten")}
    assert wrong["n"].passed is False and "not a number" in wrong["n"].explanation
    assert wrong["e"].passed is True  # case and the final line only
    assert wrong["r"].passed is False and "format violation" in wrong["r"].explanation
    for verdict in wrong.values():
        if verdict.passed is False:
            assert verdict.node_id == "solve" and verdict.explanation


async def test_a_bad_reference_is_no_verdict_not_a_failure():
    spec = spec_with({"kind": "numeric", "name": "n", "reference": "x"})
    [verdict] = await verdicts(spec, {"x": "many"}, "Answer: 3")
    assert verdict.passed is None and verdict.error_type == "bad_reference"


async def test_code_tests_run_in_the_sandbox_against_the_referenced_tests():
    spec = spec_with({"kind": "code_tests", "name": "t", "reference": "tests"})
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    [passed] = await verdicts(spec, {"tests": tests}, good)
    assert passed.passed and passed.score == 1.0
    [failed] = await verdicts(spec, {"tests": tests}, "def add(a, b):\n    return abs(a) + b")
    assert failed.passed is False and failed.score == 0.5 and "got 2" in failed.explanation


def test_a_spec_refuses_a_broken_evaluator_with_its_position():
    with pytest.raises(WorkflowSpecError) as error:
        spec_with(
            {"kind": "json_schema", "name": "j", "json_schema": {"type": 5}}, {"kind": "numeric", "name": "n"}
        )
    assert error.value.problems[0].startswith("evaluator 0 (json_schema): not a JSON Schema")
    assert error.value.problems[1] == "evaluator 1 (reference): Field required"
    with pytest.raises(WorkflowSpecError, match="used by more than one evaluator"):
        spec_with(
            {"kind": "regex", "name": "r", "pattern": "x"}, {"kind": "regex", "name": "r", "pattern": "y"}
        )


def test_an_example_without_evaluators_keeps_the_hash_it_had_before_they_existed():
    document = json.loads(example_spec("arithmetic").model_dump_json(exclude={"content_hash"}))
    del document["evaluators"]
    spec = parse_spec(document)
    assert "evaluators" not in spec.canonical()
    assert spec.content_hash == "sha256:dffc56a0caa9efb80e11ccfd75adcfa8c577c7f9c3a132051ae652cad64ea112"


@given(st.text(max_size=200), st.sampled_from(["PASS", "FAIL"]))
def test_a_judge_reply_is_a_verdict_only_when_its_first_line_is_one(rest: str, word: str):
    verdict = parse_judgement("j", f"VERDICT: {word}\n{rest}")
    assert verdict.passed is (word == "PASS") and verdict.explanation.startswith("judge: ")
    if "verdict" not in rest.lower():
        unparsed = parse_judgement("j", rest)
        assert unparsed.passed is None and unparsed.error_type == "judge_unparseable"


def test_the_judge_parser_is_strict_about_the_first_line():
    assert parse_judgement("j", "VERDICT: PASS\nlooks right").passed is True
    assert parse_judgement("j", "  verdict: fail.\nwrong total").passed is False
    for reply in ("The answer is right. VERDICT: PASS", "VERDICT: PASS because", "PASS", "", "VERDICT:"):
        assert parse_judgement("j", reply).passed is None, reply


def test_a_reference_path_reads_nested_objects_only():
    reference = {"a": {"b": 1, "c": None}, "d": [1]}
    assert reference_part(reference, "a.b") == 1
    missing = reference_part(reference, "a.x")
    assert all(reference_part(reference, path) is missing for path in ("a.b.c", "d.0", "e"))
    assert reference_part(reference, "a.c") is None


class VerdictServer:
    """The user's evaluation service: answers each POST with the next scripted (status, body)."""

    def __init__(self, replies: list[tuple[int, bytes]]) -> None:
        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body = outer.replies.pop(0)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/evaluate"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)


@pytest.fixture
def verdict_server(request) -> Iterator[VerdictServer]:
    server = VerdictServer(request.param)
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.mark.parametrize(
    "verdict_server",
    [[(200, b'{"passed": false, "score": 0.25, "explanation": "total is off"}'), (200, b'{"passed": "yes"}'),
      (200, b'{"passed": true, "extra": 1}'), (500, b"{}"), (200, b"not json")]],
    indirect=True,
)  # fmt: skip
async def test_the_http_evaluator_takes_only_a_well_formed_verdict(verdict_server: VerdictServer):
    spec = spec_with({"kind": "http", "name": "service", "url": verdict_server.url, "reference": "x"})
    evaluation = Evaluation(http=http_judges(5.0))
    results = [(await verdicts(spec, {"x": 5}, "Answer: 4", evaluation))[0] for _ in range(5)]
    assert results[0].passed is False and results[0].score == 0.25 and results[0].node_id == "solve"
    assert [r.error_type for r in results[1:]] == [
        "http_bad_verdict", "http_bad_verdict", "http_status", "http_bad_verdict"
    ]  # fmt: skip
    assert all(r.passed is None for r in results[1:])
    sent = verdict_server.requests[0]
    assert sent["evaluator"] == "service" and sent["output"] == "Answer: 4" and sent["reference"] == 5


async def test_an_unreachable_http_evaluator_is_no_verdict():
    spec = spec_with({"kind": "http", "name": "service", "url": "http://127.0.0.1:9/evaluate"})
    [result] = await verdicts(spec, None, "Answer: 4", Evaluation(http=http_judges(2.0)))
    assert result.passed is None and result.error_type == "http_unreachable"


async def test_verdicts_become_evaluation_events_the_daemon_reads_back_the_same_way():
    """The runtime records each verdict as `gen_ai.evaluation.result`; no verdict carries no label, so
    the daemon's reading of the event counts it neither as a pass nor as a failure."""
    world = SimWorld(4)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spec = spec_with(
        {"kind": "numeric", "name": "n", "reference": "arithmetic.answer"},
        {"kind": "llm_judge", "name": "judge", "criteria": "The answer is correct."},
    )
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())
    task = world.task("arithmetic", 0)
    evaluator = Evaluation().evaluator(spec, {"arithmetic": {"answer": -1}})  # no LLM for the judge
    result = await runtime.execute(spec, task.input, seed=1, evaluator=evaluator)
    assert result.failed and [e.passed for e in result.evaluations] == [False, None]
    events = [
        SpanEvent(e.name, e.timestamp, dict(e.attributes))
        for span in exporter.get_finished_spans()
        for e in span.events
        if e.name == "gen_ai.evaluation.result"
    ]
    record = SpanRecord("t", "s", "", "x", 0, 1, 0, "", {}, events, {})
    read = {e.name: e for e in evaluations_of(record, "llm")}
    assert read["n"].failed and read["n"].label == "fail"
    assert not read["judge"].failed and read["judge"].label == "" and read["judge"].score is None
    judge_event = next(e for e in events if e.attributes["gen_ai.evaluation.name"] == "judge")
    assert judge_event.attributes["error.type"] == "evaluator_unavailable"


def test_no_operator_changes_how_a_spec_is_judged():
    spec = example_spec("service")
    for operator in OPERATORS:
        for node in spec.nodes:
            options: dict[str, Any] = (
                {"instruction": "Be careful."} if operator in ("custom_generate", "edit_prompt") else {}
            )
            if operator == "adjust_parameter":
                options = {"parameter": "temperature", "value": 0.1}
            if operator == "add_retrieval":
                options = {"retriever": "kb_search"}
            edit = Edit(operator=operator, node=node, **options)
            if refusal(spec, edit) is not None:
                continue
            try:
                edited, ops = apply_edit(spec, edit, "1.1.0")
            except EditRefused:
                continue
            assert edited.evaluators == spec.evaluators, (operator, node)
            assert not any(op["path"].startswith("/evaluators") for op in ops)
