"""What cegraph makes of the real GenAI instrumentations' output (openai SDK -> stub OpenAI server).

opentelemetry-instrumentation-openai-v2 ("genai") and openinference-instrumentation-openai
("openinference") record the same app (tests/fixtures/genai_app.py): answers, server errors, rate limits,
truncations, content-filter stops, refusals, tool calls, retries inside the SDK and by the app. Their
exports, byte for byte, go through the daemon's ingest stage; each test checks one thing cegraph
misread before (issue 17), on what the instrumentation really emitted.
"""

from __future__ import annotations

import pytest
from genai_app import CALLS, SCENARIOS
from instrumented import Recording, expected_source, ingest, record
from openai_stub import REFUSAL, TRUNCATED

from cegraph.connectors.otlp.codec import decode_logs_proto
from cegraph.daemon.app import build_canary_judge, build_detector_stage
from cegraph.daemon.detect.failures import ExecutionGraph, label_failures
from cegraph.daemon.detect.signature import describe
from cegraph.daemon.runner import StageRunner
from cegraph.daemon.settings import CanarySettings, Settings

CONVENTIONS = ["genai", "openinference"]
RUNS = 2
ARMS = "stable=1.0.0,canary=1.1.0"
SYSTEM = "You are a support assistant. Be brief."


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> dict[str, Recording]:
    return {
        convention: record(convention, tmp_path_factory.mktemp(convention), runs=str(RUNS), arms=ARMS)
        for convention in CONVENTIONS
    }


@pytest.fixture(scope="module")
def ingested(recordings, tmp_path_factory):
    return {
        convention: ingest(recording, tmp_path_factory.mktemp(f"{convention}-store") / "cegraph.duckdb")
        for convention, recording in recordings.items()
    }


def llm_nodes(ingested, trace_id: str):
    return [n for n in ingested.nodes(trace_id) if n.kind == "llm"]


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_every_run_is_one_execution_with_its_calls(recordings, ingested, convention):
    recording, stored = recordings[convention], ingested[convention]
    assert len(recording.executions) == RUNS * len(SCENARIOS)
    for execution in recording.executions:
        nodes = stored.nodes(execution["trace_id"])
        assert sum(n.kind == "llm" for n in nodes) == CALLS.get(execution["scenario"], 1)
        assert sum(n.is_root for n in nodes) == 1
    assert stored.store.stats()["executions"]["incomplete"] == 0


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_failed_means_one_thing_in_the_labels_in_stats_and_for_the_canary_judge(
    recordings, ingested, convention
):
    """Truncations and refusals are failed executions wherever cegraph counts failures: the failure
    labels, `cegraph stats` and the canary judge's arms."""
    recording, stored = recordings[convention], ingested[convention]
    failed_by_track = {"stable": 0, "canary": 0}
    for execution in recording.executions:
        source = expected_source(convention, execution["scenario"])
        failures = label_failures(stored.nodes(execution["trace_id"]))
        assert [f.source for f in failures] == ([source] if source else []), execution["scenario"]
        row = stored.store.execution(execution["trace_id"])
        assert (row["hard_failed"] or row["eval_failed"]) == bool(source)
        failed_by_track[execution["track"]] += bool(source)
    stats = stored.store.stats()
    assert stats["failures"]["executions_failed"] == sum(failed_by_track.values())
    assert 0 < failed_by_track["canary"] < RUNS * len(SCENARIOS) // 2
    # too little traffic to decide: the live statistics stay
    settings = Settings(canary=CanarySettings(min_executions=1_000))
    StageRunner(stored.store, build_detector_stage(settings, stored.store, stored.metrics.registry)).drain()
    judge = build_canary_judge(settings, stored.store, stored.metrics.registry)
    StageRunner(stored.store, judge).drain()  # starts the canary and judges it
    [canary] = judge.canaries()
    arms = canary["statistics"]
    assert (arms["canary"]["failures"], arms["stable"]["failures"]) == (
        failed_by_track["canary"],
        failed_by_track["stable"],
    )


def test_an_openinference_refusal_is_a_failure_with_the_refusal_text(recordings, ingested):
    for execution in recordings["openinference"].of("refusal"):
        [llm] = llm_nodes(ingested["openinference"], execution["trace_id"])
        assert llm.refusal == REFUSAL and llm.output_text == REFUSAL and llm.hard_failed
        [failure] = label_failures(ingested["openinference"].nodes(execution["trace_id"]))
        assert (failure.source, failure.message) == ("refusal", REFUSAL)


def test_truncations_name_their_finish_reason_in_both_conventions(recordings, ingested):
    for convention in CONVENTIONS:
        for scenario, finish in (("length", "length"), ("content_filter", "content_filter")):
            for execution in recordings[convention].of(scenario):
                [llm] = llm_nodes(ingested[convention], execution["trace_id"])
                assert llm.finish_reasons == [finish] and llm.hard_failure_source() == "truncated"
                if scenario == "length":
                    assert TRUNCATED in llm.output_text


@pytest.mark.parametrize(("scenario", "error"), [("server_error", "openai.InternalServerError"),
                                                 ("rate_limit", "openai.RateLimitError")])  # fmt: skip
def test_error_types_are_spelled_alike_whichever_instrumentation_set_them(
    recordings, ingested, scenario, error
):
    """openai-v2 sets `error.type` to "<class 'openai.InternalServerError'>", OpenInference records an
    exception event of type "openai.InternalServerError": one error type, one set of `err=` terms."""
    terms = {}
    for convention in CONVENTIONS:
        for execution in recordings[convention].of(scenario):
            assert execution["raised"] == error
            [failure] = label_failures(ingested[convention].nodes(execution["trace_id"]))
            assert (failure.node.error_type, failure.node.exception_type) == (error, error)
            assert failure.message.startswith("Error code: ")
            terms[convention] = {t for t in describe(failure).text_terms if t.startswith("err=")}
    assert terms["genai"] == terms["openinference"] == {f"err={error.lower()}"}


def test_openinference_text_is_the_message_contents_not_the_raw_request_and_response(recordings, ingested):
    for execution in recordings["openinference"].of("answer_twice"):
        plan, answer = llm_nodes(ingested["openinference"], execution["trace_id"])
        assert (
            plan.input_text
            == f"{SYSTEM}\nPlan how to answer: What is the weather in Paris? (request {execution['index']})"
        )
        assert plan.output_text.startswith("Answer to: Plan how to answer")
        for node in (plan, answer):
            assert '"model"' not in node.input_text and "chatcmpl" not in node.output_text
    for execution in recordings["openinference"].of("tool_call"):
        call, _ = llm_nodes(ingested["openinference"], execution["trace_id"])
        assert call.output_text == 'get_weather({"city": "Paris"})'


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_the_model_is_the_requested_one_on_every_call_errors_included(recordings, ingested, convention):
    """OpenInference names the model of an error span only in `llm.invocation_parameters`."""
    for execution in recordings[convention].executions:
        for node in llm_nodes(ingested[convention], execution["trace_id"]):
            assert node.model == "stub-model", (execution["scenario"], node.status)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_two_calls_of_one_name_are_two_nodes_and_a_retry_after_a_failure_is_the_same_node(
    recordings, ingested, convention
):
    stored = ingested[convention]
    for scenario in ("answer_twice", "tool_call"):
        for execution in recordings[convention].of(scenario):
            first, second = llm_nodes(stored, execution["trace_id"])
            assert first.name == second.name and second.node_id == f"{first.node_id}#2"
    for execution in recordings[convention].of("app_retry"):
        nodes = stored.nodes(execution["trace_id"])
        failed, retried = (n for n in nodes if n.kind == "llm")
        assert failed.node_id == retried.node_id and failed.hard_failed and not retried.hard_failed
        assert ExecutionGraph(nodes).position(retried)[1] == 1  # one retry of this step before it


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_retries_inside_the_openai_sdk_are_one_successful_call(recordings, ingested, convention):
    recording = recordings[convention]
    for execution in recording.of("sdk_retry"):
        [llm] = llm_nodes(ingested[convention], execution["trace_id"])
        assert llm.status != "error" and not llm.hard_failed
        key = f"flaky:{convention}-{execution['index']}:2"
        asked = [{k.lower(): v for k, v in headers.items()} for _, headers, _ in recording.requests]
        assert sum(h.get("x-stub-scenario") == key for h in asked) == 3  # two 500s, then the answer


# ------------------------------------------------------------------ content and evaluations as log records


@pytest.fixture(scope="module")
def event_only(tmp_path_factory) -> Recording:
    """openai-v2 with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=event_only, and the app's
    evaluator sending its verdicts as `gen_ai.evaluation.result` events."""
    return record("genai", tmp_path_factory.mktemp("event-only"), content="event_only", runs="1", evaluate="")


def test_event_only_content_and_evaluation_events_count_once_joined_from_the_logs_topic(event_only, tmp_path):
    without = ingest(event_only, tmp_path / "spans-only.duckdb")
    joined = ingest(event_only, tmp_path / "with-logs.duckdb", logs=True)
    for execution in event_only.of("answer_twice"):
        assert all(not n.input_text and not n.output_text for n in llm_nodes(without, execution["trace_id"]))
        plan, answer = llm_nodes(joined, execution["trace_id"])
        assert "Plan how to answer" in plan.input_text and "Answer to: Plan how" in plan.output_text
        assert "Answer with this plan" in answer.input_text
    for execution in event_only.executions:
        answered = not execution["raised"]
        grounded = execution["scenario"] == "tool_call"  # only there does the answer name the forecast
        source = expected_source("genai", execution["scenario"])
        sources = {f.source for f in label_failures(joined.nodes(execution["trace_id"]))}
        assert sources == ({source} if source else set()) | (
            {"evaluation"} if answered and not grounded else set()
        )
        assert {f.source for f in label_failures(without.nodes(execution["trace_id"]))} == (
            {source} if source else set()
        )
    records = sum(len(decode_logs_proto(export)) for export in event_only.log_exports)
    assert (
        joined.metrics.registry.get_sample_value("cegraph_ingest_log_records_total", {"outcome": "joined"})
        == records
        > len(event_only.executions)
    )
    stats = joined.store.stats()
    assert stats["failures"]["executions_failed"] > without.store.stats()["failures"]["executions_failed"]


def test_an_evaluation_event_on_the_root_points_at_the_answer(event_only, tmp_path):
    joined = ingest(event_only, tmp_path / "with-logs.duckdb", logs=True)
    for execution in event_only.of("answer_twice"):
        nodes = joined.nodes(execution["trace_id"])
        [failure] = label_failures(nodes)
        assert failure.source == "evaluation" and failure.critique == "the answer ignores the forecast"
        assert failure.node.node_id == llm_nodes(joined, execution["trace_id"])[-1].node_id
