"""The real GenAI instrumentations on a real model: the instrumented app of tests/fixtures/genai_app.py,
with opentelemetry-instrumentation-openai-v2 and openinference-instrumentation-openai, talking to the
model server of tests/fixtures/llm_server.py (SmolLM2-135M on llama.cpp unless `CEGRAPH_TEST_LLM_URL`
says otherwise) instead of the stub, its exports through the daemon's ingest stage.

Nobody scripts the answers here, so what a failure should be is what the app saw (`observed_sources`):
a call that stopped on `max_tokens` is truncated, a request longer than the model's context is an
error from the server, an answer the app's evaluator failed is an evaluation failure. Mechanics only:
spans, token usage, finish reasons, executions stored, failures where the app saw them; never whether
the model answered well.
"""

from __future__ import annotations

from collections import Counter

import pytest
from genai_app import TRUNCATE_AT
from instrumented import Recording, ingest, observed_sources, real_model_flags, record
from llm_server import MAX_TOKENS, ModelServer

from cegraph.daemon.detect.failures import label_failures

CONVENTIONS = ["genai", "openinference"]
RUNS = 2


@pytest.fixture(scope="module")
def recordings(llm_server: ModelServer, tmp_path_factory) -> dict[str, Recording]:
    flags = real_model_flags(llm_server, RUNS)
    return {
        convention: record(convention, tmp_path_factory.mktemp(convention), base_url=llm_server.base_url,
                           **flags)
        for convention in CONVENTIONS
    }  # fmt: skip


@pytest.fixture(scope="module")
def ingested(recordings, tmp_path_factory):
    """With the logs topic: the app's verdicts are log records."""
    return {
        convention: ingest(recording, tmp_path_factory.mktemp(f"{convention}-store") / "s.duckdb", logs=True)
        for convention, recording in recordings.items()
    }


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_every_call_to_the_real_model_is_a_node_with_its_finish_reason_tokens_and_model(
    llm_server, recordings, ingested, convention
):
    recording, stored = recordings[convention], ingested[convention]
    scenarios = real_model_flags(llm_server, RUNS)["scenarios"].split(",")
    assert len(recording.executions) == RUNS * len(scenarios)
    for execution in recording.executions:
        nodes = stored.nodes(execution["trace_id"])
        assert sum(n.is_root for n in nodes) == 1
        calls = [n for n in nodes if n.kind == "llm"]
        assert len(calls) == len(execution["calls"]) > 0, execution["scenario"]
        for node, seen in zip(calls, execution["calls"], strict=True):
            assert node.model == llm_server.model
            if seen.get("error"):
                assert node.hard_failure_source() == "error"
                assert node.error_type == seen["error"] == execution["raised"]
                continue
            assert node.finish_reasons == [seen["finish_reason"]]
            assert (node.input_tokens, node.output_tokens) == (seen["input_tokens"], seen["output_tokens"])
            assert node.input_tokens > 0 and node.output_tokens <= MAX_TOKENS
    assert stored.store.stats()["executions"] == {
        "complete": len(recording.executions), "incomplete": 0, "total": len(recording.executions)
    }  # fmt: skip


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_failures_are_found_where_the_truncation_the_server_or_the_evaluator_says(
    llm_server, recordings, ingested, convention
):
    recording, stored = recordings[convention], ingested[convention]
    for execution in recording.executions:
        failures = label_failures(stored.nodes(execution["trace_id"]))
        assert Counter(f.source for f in failures) == observed_sources(execution), execution
        row = stored.store.execution(execution["trace_id"])
        assert bool(row["hard_failed"] or row["eval_failed"]) == bool(observed_sources(execution))
        for failure in failures:
            if failure.source == "truncated":
                assert failure.message.startswith("finish reason length")
            if failure.source == "evaluation":
                assert failure.critique == "the answer ignores the forecast"
                assert failure.node.kind == "llm"  # the verdict on the root judges the answer's call
    failed = sum(bool(observed_sources(e)) for e in recording.executions)
    assert stored.store.stats()["failures"]["executions_failed"] == failed


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_a_small_max_tokens_truncates_and_a_prompt_past_the_context_is_refused(
    llm_server, recordings, convention
):
    """The tier sees real truncations and real server errors, not only answers."""
    recording = recordings[convention]
    truncated = [e for e in recording.of("length") if e["calls"][0].get("finish_reason") == "length"]
    assert truncated, "no call capped at max_tokens=2 stopped on length"
    assert all(e["calls"][0]["output_tokens"] == TRUNCATE_AT for e in truncated)
    if llm_server.context_tokens:
        for execution in recording.of("overflow"):
            assert execution["raised"] and execution["calls"] == [{"error": execution["raised"]}]
