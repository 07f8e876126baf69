"""`cegraph simulate` on the real broker: its spans land on the spans topic in the collector's format,
the canary split holds, and the patches and rollout decisions published while it runs change which
spec later executions run (read back from the `cegraph.workflow.version` of their root spans)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from cegraph.connectors.kafka.client import ensure_topics, kafka_python_options
from cegraph.connectors.kafka.decision_consumer import DecisionConsumer
from cegraph.connectors.kafka.otlp_exporter import OtlpKafkaSpanExporter
from cegraph.daemon.settings import KafkaSettings
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.sim.traffic import TrafficGenerator
from cegraph.daemon.workflows.registry import spec_diff
from cegraph.daemon.workflows.runtime import WorkflowRuntime
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.rollout import RolloutDecision
from cegraph.schemas.workflow import WorkflowSpec, example_spec, parse_spec

CEGRAPH = str(Path(sys.executable).parent / "cegraph")
BASE = example_spec("arithmetic")


def variant(base: WorkflowSpec, version: str, temperature: float) -> WorkflowSpec:
    data = base.canonical()
    data["version"] = version
    data["nodes"]["solve"]["params"]["temperature"] = temperature
    return parse_spec(data)


@dataclass(frozen=True)
class Root:
    trace_id: str
    start_ns: int
    version: str
    track: str


@pytest.fixture
def kafka(kafka_bootstrap) -> KafkaSettings:
    """Topics of this test only."""
    suffix = uuid.uuid4().hex[:10]
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        spans_topic=f"spans-{suffix}",
        patches_topic=f"patches-{suffix}",
        rollouts_topic=f"rollouts-{suffix}",
    )
    ensure_topics(settings, [settings.spans_topic, settings.patches_topic, settings.rollouts_topic])
    return settings


def read_roots(settings: KafkaSettings, expected: int, timeout_s: float = 30) -> list[Root]:
    """The root spans on the spans topic, once `expected` of them are there."""
    consumer = KafkaConsumer(
        settings.spans_topic, auto_offset_reset="earliest", enable_auto_commit=False,
        **kafka_python_options(settings),
    )  # fmt: skip
    roots: list[Root] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batches = consumer.poll(timeout_ms=500)
            for record in (r for batch in batches.values() for r in batch):
                request = ExportTraceServiceRequest.FromString(record.value)
                for span in (s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans):
                    if not span.parent_span_id:
                        attributes = {kv.key: kv.value.string_value for kv in span.attributes}
                        roots.append(
                            Root(span.trace_id.hex(), span.start_time_unix_nano,
                                 attributes["cegraph.workflow.version"], attributes["cegraph.track"])
                        )  # fmt: skip
            if len(roots) >= expected:
                break
    finally:
        consumer.close()
    return roots


def traffic_on(settings: KafkaSettings, **options) -> tuple[TrafficGenerator, TracerProvider]:
    world = SimWorld(11)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OtlpKafkaSpanExporter(settings, partition_by_trace=True)))
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())
    return TrafficGenerator(runtime, world, BASE, family="arithmetic", seed=11, **options), provider


async def test_spans_land_on_the_topic_and_the_canary_split_holds(kafka):
    traffic, provider = traffic_on(kafka, canary=variant(BASE, "1.1.0", 0.2), canary_weight=0.3, rate=5_000)
    snapshot = await traffic.run(count=300)
    provider.shutdown()
    roots = read_roots(kafka, expected=300)
    assert len(roots) == len({r.trace_id for r in roots}) == 300
    tracks = Counter((r.track, r.version) for r in roots)
    assert set(tracks) == {("stable", "1.0.0"), ("canary", "1.1.0")}
    canary = tracks[("canary", "1.1.0")]
    assert abs(canary - 90) <= 4 * math.sqrt(300 * 0.3 * 0.7), f"{canary} of 300 on the canary"
    assert canary == snapshot.counts[("canary", "1.1.0")].executions


async def _until(condition: Callable[[], bool], timeout_s: float = 20) -> int:
    """Wait for `condition`; returns the wall clock (ns) once it holds, to compare with span times."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
    return time.time_ns()


async def test_patches_and_rollouts_published_while_it_runs_change_later_executions(kafka, caplog):
    caplog.set_level(logging.INFO)
    traffic, provider = traffic_on(kafka, canary_weight=0.4, rate=300)
    decisions = DecisionConsumer(kafka, on_patch=traffic.apply_patch, on_rollout=traffic.apply_rollout)
    decisions.start()
    producer = KafkaProducer(**kafka_python_options(kafka))

    def publish(topic: str, message: WorkflowPatch | RolloutDecision | bytes) -> int:
        value = message if isinstance(message, bytes) else message.model_dump_json().encode()
        producer.send(topic, key=b"arithmetic", value=value).get(timeout=10)
        return time.time_ns()

    def runs(track: str, version: str) -> int:
        counts = traffic.snapshot().counts.get((track, version))
        return 0 if counts is None else counts.executions

    v110, v120 = variant(BASE, "1.1.0", 0.2), variant(BASE, "1.2.0", 0.1)
    running = asyncio.create_task(traffic.run())
    try:
        await _until(lambda: runs("stable", "1.0.0") >= 100)
        # Not a patch, a patch for another base, one whose result has another hash: all ignored.
        publish(kafka.patches_topic, b"{not json")
        publish(kafka.patches_topic, WorkflowPatch(
            workflow_id="arithmetic", base_version="0.9.0", new_version="1.1.0",
            operations=spec_diff(BASE, v110), content_hash=v110.content_hash,
        ))  # fmt: skip
        publish(kafka.patches_topic, WorkflowPatch(
            workflow_id="arithmetic", base_version="1.0.0", new_version="1.1.0",
            operations=spec_diff(BASE, v110), content_hash=v120.content_hash,
        ))  # fmt: skip
        patched = publish(kafka.patches_topic, WorkflowPatch(
            workflow_id="arithmetic", base_version="1.0.0", new_version="1.1.0",
            operations=spec_diff(BASE, v110), content_hash=v110.content_hash,
        ))  # fmt: skip
        canary_on = await _until(lambda: traffic.canary == v110)
        await _until(lambda: runs("canary", "1.1.0") >= 40)

        promoted = publish(kafka.rollouts_topic, RolloutDecision(
            workflow_id="arithmetic", version="1.1.0", decision="promote", reason="canary mass lower",
        ))  # fmt: skip
        promoted_on = await _until(lambda: traffic.stable == v110 and traffic.canary is None)
        await _until(lambda: runs("stable", "1.1.0") >= 60)

        publish(kafka.patches_topic, WorkflowPatch(
            workflow_id="arithmetic", base_version="1.1.0", new_version="1.2.0",
            operations=spec_diff(v110, v120), content_hash=v120.content_hash,
        ))  # fmt: skip
        await _until(lambda: traffic.canary == v120)
        await _until(lambda: runs("canary", "1.2.0") >= 40)
        rolled_back = publish(kafka.rollouts_topic, RolloutDecision(
            workflow_id="arithmetic", version="1.2.0", decision="rollback", reason="regression",
        ))  # fmt: skip
        rolled_back_on = await _until(lambda: traffic.canary is None)
        after = runs("stable", "1.1.0")
        await _until(lambda: runs("stable", "1.1.0") >= after + 100)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        decisions.stop()
        producer.close()
        provider.shutdown()

    # An execution reads the routing and starts its root span in one step of the event loop; a decision
    # applied on the consumer's thread in between is the only overlap, a matter of microseconds.
    margin = 50_000_000  # ns
    # Every started execution has a root span, also those cancelled in flight at the end.
    roots = sorted(read_roots(kafka, expected=traffic.snapshot().started), key=lambda r: r.start_ns)

    def seen(start: int, end: int) -> Counter:
        return Counter((r.track, r.version) for r in roots if start + margin <= r.start_ns < end)

    assert set(seen(0, patched)) == {("stable", "1.0.0")}
    assert set(seen(canary_on, promoted)) == {("stable", "1.0.0"), ("canary", "1.1.0")}
    assert set(seen(promoted_on, rolled_back)) == {("stable", "1.1.0"), ("canary", "1.2.0")}
    assert set(seen(rolled_back_on, time.time_ns())) == {("stable", "1.1.0")}
    for reason in ("ignored: not a WorkflowPatch", "the patch is for arithmetic@0.9.0", "content hash is"):
        assert reason in caplog.text


def test_the_command_sends_spans_and_prints_a_summary(kafka, tmp_path):
    canary = tmp_path / "canary.json"
    canary.write_text(variant(BASE, "1.1.0", 0.2).model_dump_json())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CEGRAPH_")} | {
        "CEGRAPH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "CEGRAPH_KAFKA__SPANS_TOPIC": kafka.spans_topic,
        "CEGRAPH_KAFKA__PATCHES_TOPIC": kafka.patches_topic,
        "CEGRAPH_KAFKA__ROLLOUTS_TOPIC": kafka.rollouts_topic,
    }
    result = subprocess.run(
        [CEGRAPH, "simulate", "--workflow", "arithmetic", "--canary", str(canary), "--canary-weight", "0.5",
         "--count", "30", "--rate", "100/s", "--seed", "2", "--progress-every", "0.1"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "30 executions" in result.stdout
    assert "stable 1.0.0:" in result.stdout and "canary 1.1.0:" in result.stdout  # progress lines
    roots = read_roots(kafka, expected=30)
    assert len(roots) == 30
    assert {r.version for r in roots} == {"1.0.0", "1.1.0"}
