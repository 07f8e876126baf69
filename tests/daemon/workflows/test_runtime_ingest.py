"""Spans emitted by the workflow runtime, sent through the real broker, are ingested by the daemon into
executions with the same node graph and the same verdicts as the runs that produced them."""

from __future__ import annotations

import asyncio

from daemon_proc import Scenario
from workflow_fixtures import run_qa_to_kafka

from cegraph.daemon.store import EventStore


def test_runtime_spans_become_executions_with_the_same_graph(kafka_bootstrap, tmp_path):
    scenario = Scenario(kafka_bootstrap, tmp_path)
    results = asyncio.run(
        run_qa_to_kafka(kafka_bootstrap, scenario.spans_topic, executions=40, partition_by_trace=True, seed=3)
    )
    scenario.daemon.start()
    try:
        scenario.daemon.wait_for(lambda s: s["executions"]["total"] >= len(results))
    finally:
        scenario.daemon.stop()
    store = EventStore(scenario.store_path, read_only=True)
    try:
        executions = {
            row["trace_id"]: row
            for row in store.query_dicts(
                "SELECT trace_id, workflow_id, workflow_version, hard_failed, eval_failed, "
                "root_span_id, span_count FROM executions"
            )
        }
        nodes = store.query_dicts("SELECT trace_id, span_id, parent_span_id, node_id, kind FROM nodes")
    finally:
        store.close()
    assert set(executions) == {r.trace_id for r in results}
    assert any(r.failed for r in results) and not all(r.failed for r in results)
    for result in results:
        execution = executions[result.trace_id]
        assert (execution["workflow_id"], execution["workflow_version"]) == (
            "qa-reviewed",
            result.workflow_version,
        )
        assert (execution["hard_failed"] or execution["eval_failed"]) == result.failed
        ran = [run for run in result.nodes if run.status != "skipped"]
        assert execution["span_count"] == len(ran) + 1
        stored = {
            n["node_id"]: (n["span_id"], n["parent_span_id"], n["kind"])
            for n in nodes
            if n["trace_id"] == result.trace_id and n["parent_span_id"]
        }
        assert stored == {run.node_id: (run.span_id, execution["root_span_id"], run.kind) for run in ran}
