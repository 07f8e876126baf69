"""The instrumented app as a service would run it: openai SDK + a real GenAI instrumentation -> OTLP ->
the real OpenTelemetry Collector -> the real broker -> `cegraph run`, a process of its own.

Each execution must be stored whole, with the failures the scenario makes; with content captured as
log records (`event_only`), the logs topic brings the content and the app's evaluation events. The
same path with the real model server (tests/fixtures/llm_server.py) in place of the stub: the failures are
where the app saw them (truncations, the server's refusal of a prompt past the context, failed
verdicts), never a judgement of the model's answers.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from collector_tier import CollectorRun, metric_sum, wait_until
from genai_app import CALLS, span_count
from instrumented import expected_source, observed_sources, real_model_flags, run_app
from openai_stub import ChatServer, ScenarioResponder

from cegraph.daemon.detect.failures import label_failures
from cegraph.daemon.store import node_from_row

pytestmark = pytest.mark.long(minutes=2)


def target(collector, protocol: str) -> list[str]:
    if protocol == "http":
        return ["--otlp-http", f"http://{collector.http_endpoint}"]
    return ["--otlp-grpc", collector.grpc_endpoint]


def stored_failures(store, trace_id: str) -> Counter[str]:
    rows = store.query_dicts("SELECT * FROM nodes WHERE trace_id = ? ORDER BY start_ns, span_id", trace_id)
    return Counter(failure.source for failure in label_failures([node_from_row(row) for row in rows]))


def stored_sources(store, trace_id: str) -> set[str]:
    return set(stored_failures(store, trace_id))


def log_records(run: CollectorRun, outcome: str) -> float:
    metrics = httpx.get(f"{run.daemon.url}/metrics", timeout=10).text
    return metric_sum(metrics, "cegraph_ingest_log_records_total", outcome=outcome)


@pytest.mark.parametrize(("convention", "protocol"), [("genai", "http"), ("openinference", "grpc")])
def test_an_instrumented_service_through_the_collector(
    kafka_bootstrap, tmp_path, start_collector, convention, protocol
):
    run = CollectorRun(
        kafka_bootstrap, tmp_path, start_collector, encoding="otlp_proto", partition_traces_by_id=True
    )
    with ChatServer(ScenarioResponder()) as server:
        executions = run_app(convention, server.url, *target(run.collector, protocol), runs="3")
    spans = sum(span_count(e["scenario"]) for e in executions)
    stats = run.daemon.wait_for(lambda s: s["spans"] >= spans and s["executions"]["total"] >= len(executions))
    assert stats["spans"] == spans and stats["dead_letters"] == 0
    assert stats["executions"] == {"complete": len(executions), "incomplete": 0, "total": len(executions)}
    failing = [e for e in executions if expected_source(convention, e["scenario"])]
    assert stats["failures"]["executions_failed"] == len(failing) > 0
    store = run.stored()
    for execution in executions:
        source = expected_source(convention, execution["scenario"])
        assert stored_sources(store, execution["trace_id"]) == ({source} if source else set())


def test_content_and_evaluations_sent_as_log_records_reach_cegraph_through_the_logs_topic(
    kafka_bootstrap, tmp_path, start_collector
):
    """openai-v2 with `event_only` content capture, OTLP/JSON on both topics. The idle timeout leaves
    room for a trace's log records and spans to arrive in different Collector batches."""
    run = CollectorRun(
        kafka_bootstrap, tmp_path, start_collector, encoding="otlp_json", partition_traces_by_id=True,
        logs=True, CEGRAPH_INGEST__IDLE_TIMEOUT_S="10",
    )  # fmt: skip
    with ChatServer(ScenarioResponder()) as server:
        executions = run_app(
            "genai", server.url, *target(run.collector, "http"), content="event_only", runs="2", evaluate=""
        )
    spans = sum(span_count(e["scenario"]) for e in executions)
    # one record per chat call (its content, `gen_ai.client.inference.operation.details`), one verdict
    # per answered execution
    records = sum(CALLS.get(e["scenario"], 1) for e in executions) + sum(not e["raised"] for e in executions)

    stats = run.daemon.wait_for(lambda s: s["spans"] >= spans and s["executions"]["total"] >= len(executions))
    assert stats["dead_letters"] == 0 and stats["spans"] == spans
    wait_until(lambda: log_records(run, "joined") >= records, "every log record joined to its span")
    assert (log_records(run, "joined"), log_records(run, "late"), log_records(run, "unmatched")) == (
        records, 0, 0,
    )  # fmt: skip
    sent = metric_sum(run.collector_metrics(), "otelcol_exporter_sent_log_records", exporter="kafka")
    assert sent == records
    store = run.stored()
    for execution in executions:
        source = expected_source("genai", execution["scenario"])
        judged_wrong = not execution["raised"] and execution["scenario"] != "tool_call"
        assert stored_sources(store, execution["trace_id"]) == ({source} if source else set()) | (
            {"evaluation"} if judged_wrong else set()
        )
    [row] = store.query_dicts(
        "SELECT input_text, output_text FROM nodes WHERE trace_id = ? AND kind = 'llm' "
        "ORDER BY start_ns LIMIT 1",
        next(e["trace_id"] for e in executions if e["scenario"] == "answer_twice"),
    )
    assert "Plan how to answer" in row["input_text"] and "Answer to: Plan how" in row["output_text"]


@pytest.mark.parametrize(("convention", "protocol"), [("genai", "http"), ("openinference", "grpc")])
def test_an_instrumented_service_on_the_real_model_through_the_collector(
    kafka_bootstrap, tmp_path, start_collector, llm_server, convention, protocol
):
    """The app's verdicts travel as log records on the logs topic; the idle timeout leaves room for
    them to arrive in another Collector batch than their spans."""
    run = CollectorRun(
        kafka_bootstrap, tmp_path, start_collector, encoding="otlp_proto", partition_traces_by_id=True,
        logs=True, CEGRAPH_INGEST__IDLE_TIMEOUT_S="10",
    )  # fmt: skip
    executions = run_app(
        convention, llm_server.base_url, *target(run.collector, protocol), timeout=None,
        **real_model_flags(llm_server, runs=1),
    )  # fmt: skip
    spans = sum(1 + len(e["calls"]) for e in executions)
    verdicts = sum(bool(e["verdict"]) for e in executions)
    stats = run.daemon.wait_for(lambda s: s["spans"] >= spans and s["executions"]["total"] >= len(executions))
    wait_until(lambda: log_records(run, "joined") >= verdicts, "every verdict joined to its span")
    assert stats["spans"] == spans and stats["dead_letters"] == 0
    assert stats["executions"] == {"complete": len(executions), "incomplete": 0, "total": len(executions)}
    assert (log_records(run, "late"), log_records(run, "unmatched")) == (0, 0)
    failing = [e for e in executions if observed_sources(e)]
    assert stats["failures"]["executions_failed"] == len(failing) > 0
    store = run.stored()
    for execution in executions:
        assert stored_failures(store, execution["trace_id"]) == observed_sources(execution), execution
