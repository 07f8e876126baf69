"""The canary judge in `cegraph run` against the real broker: seeded SimLLM traffic with a worse canary
goes to the spans topic through the OTel SDK and the collector-format exporter, and the daemon
publishes one rollback on the rollouts topic; the HTTP API shows the canary, the execution and the
metrics an AnalysisTemplate queries, behind the bearer token; a restart publishes nothing again."""

from __future__ import annotations

import asyncio
import time

import httpx
from canary_fixtures import SEED, WORSE
from daemon_proc import Scenario
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from cegraph.connectors.kafka.client import ensure_topics, read_topic
from cegraph.connectors.kafka.otlp_exporter import OtlpKafkaSpanExporter
from cegraph.daemon.settings import KafkaSettings
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.sim.traffic import TrafficGenerator
from cegraph.daemon.workflows.runtime import WorkflowRuntime
from cegraph.schemas.rollout import RolloutDecision
from cegraph.schemas.workflow import example_spec

TOKEN = "canary-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class CanaryRoots(SpanProcessor):
    """Remembers the trace ids of the canary executions sent."""

    def __init__(self) -> None:
        self.trace_ids: list[str] = []

    def on_end(self, span: ReadableSpan) -> None:
        if span.parent is None and (span.attributes or {}).get("cegraph.track") == "canary":
            self.trace_ids.append(format(span.context.trace_id, "032x"))


def send_traffic(bootstrap: str, topic: str, executions: int) -> list[str]:
    """Sends the traffic; returns the trace ids of its canary executions."""
    provider = TracerProvider()
    roots = CanaryRoots()
    provider.add_span_processor(roots)
    exporter = OtlpKafkaSpanExporter(
        KafkaSettings(bootstrap_servers=bootstrap), topic=topic, partition_by_trace=True
    )
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=100_000))
    world = SimWorld(SEED)
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())
    traffic = TrafficGenerator(
        runtime, world, example_spec("arithmetic"), family="arithmetic", canary=WORSE, canary_weight=0.5,
        rate=2_000, seed=SEED,
    )  # fmt: skip
    asyncio.run(traffic.run(count=executions))
    assert provider.force_flush(60_000)
    provider.shutdown()
    return roots.trace_ids


def decisions_on(bootstrap: str, topic: str) -> list[tuple[bytes, RolloutDecision]]:
    """Every decision the topic holds now (read to its end offsets: no wait that a slow machine outruns)."""
    records = read_topic(KafkaSettings(bootstrap_servers=bootstrap), topic)
    return [(r.key, RolloutDecision.model_validate_json(r.value)) for r in records]


def get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, timeout=10, **kwargs)


def test_a_worse_canary_is_rolled_back_on_the_rollouts_topic(kafka_bootstrap, tmp_path):
    scenario = Scenario(
        kafka_bootstrap, tmp_path,
        CEGRAPH_HTTP__TOKEN=TOKEN,
        CEGRAPH_CANARY__MIN_EXECUTIONS="100",
        CEGRAPH_CANARY__INTERVAL_S="0.5",
    )  # fmt: skip
    rollouts = scenario.daemon.env["CEGRAPH_KAFKA__ROLLOUTS_TOPIC"]
    ensure_topics(KafkaSettings(bootstrap_servers=kafka_bootstrap), [rollouts])
    daemon = scenario.daemon
    daemon.start()
    try:
        unauthorised = get(f"{daemon.url}/canaries")
        assert unauthorised.status_code == 401 and "bearer token" in unauthorised.json()["error"]

        canary_traces = send_traffic(kafka_bootstrap, scenario.spans_topic, 1_500)
        deadline = time.monotonic() + 120
        canaries: list[dict] = []
        while time.monotonic() < deadline:
            canaries = get(f"{daemon.url}/canaries", headers=AUTH).json()
            if canaries and canaries[0]["published"]:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no published decision: {canaries}\n{daemon.log_tail()}")
        [canary] = canaries
        assert (canary["workflow_id"], canary["version"], canary["decision"]) == (
            "arithmetic",
            "1.1.0",
            "rollback",
        )
        assert canary["published"]["topic"] == rollouts

        [(key, decision)] = decisions_on(kafka_bootstrap, rollouts)
        assert key == b"arithmetic"
        assert (decision.version, decision.decision, decision.stable_version) == (
            "1.1.0",
            "rollback",
            "1.0.0",
        )
        assert decision.statistics is not None and decision.statistics.difference[0] > 0

        metrics = get(f"{daemon.url}/metrics").text
        assert 'cegraph_canary_verdict{workflow="arithmetic"} -1.0' in metrics
        assert 'cegraph_canary_decisions_total{decision="rollback"} 1.0' in metrics
        assert 'cegraph_canary_running{workflow="arithmetic"} 0.0' in metrics
        for name in ("cegraph_canary_executions", "cegraph_canary_failure_rate", "cegraph_consumer_lag"):
            assert f"\n{name}{{" in metrics, name
        assert "faststream_received_messages_total" in metrics
        lag = f'cegraph_consumer_lag{{topic="{scenario.spans_topic}"}} 0.0'
        deadline = time.monotonic() + 120  # measured every 5 s; a loaded machine stores what was sent later
        while lag not in get(f"{daemon.url}/metrics").text and time.monotonic() < deadline:
            time.sleep(0.5)
        assert lag in get(f"{daemon.url}/metrics").text

        trace_id = canary_traces[0]
        execution = get(f"{daemon.url}/executions/{trace_id}", headers=AUTH).json()
        assert execution["trace_id"] == trace_id and execution["track"] == "canary"
        assert execution["nodes"] and all(node["workflow_version"] == "1.1.0" for node in execution["nodes"])
        missing = get(f"{daemon.url}/executions/{'0' * 32}", headers=AUTH)
        assert missing.status_code == 404 and "no execution" in missing.json()["error"]
        assert get(f"{daemon.url}/executions/{trace_id}").status_code == 401

        daemon.stop()  # a restart finds the decision marked as published: nothing is sent again
        daemon.start()
        time.sleep(2)
        assert len(decisions_on(kafka_bootstrap, rollouts)) == 1
        assert 'cegraph_canary_verdict{workflow="arithmetic"} -1.0' in get(f"{daemon.url}/metrics").text
    finally:
        daemon.stop()
