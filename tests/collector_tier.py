"""The pieces of the tests that go through the real OpenTelemetry Collector.

`collector_config` derives the tier's Collector config from the one users deploy
(ops/otel-collector/collector.yaml): the same receivers, processors and producer settings, only the
addresses, topics, encodings and partitioning changed, and the Collector's own metrics on a free port.
`send_spans` hands SDK spans to the real OTLP exporters (HTTP or gRPC), which talk to the Collector.
`CollectorRun` is one variant: topics on the real broker, a Collector, and `cegraph run` as a process.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from daemon_proc import Scenario
from kafka import KafkaConsumer, TopicPartition
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from cegraph.connectors.kafka.client import ensure_topics
from cegraph.daemon.settings import KafkaSettings
from cegraph.daemon.store import EventStore

SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "ops" / "otel-collector" / "collector.yaml"
PARTITIONS = 4


def collector_config(
    *,
    bootstrap: str,
    spans_topic: str,
    encoding: str,
    partition_traces_by_id: bool,
    logs_topic: str | None = None,
) -> str:
    """The shipped config, pointed at the test's broker and topics. Without `logs_topic` the logs
    pipeline is left out, so that no topic of the shipped name is created on the shared broker."""
    config: dict[str, Any] = yaml.safe_load(SHIPPED_CONFIG.read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    protocols["grpc"]["endpoint"] = "${env:OTLP_GRPC_ENDPOINT}"
    protocols["http"]["endpoint"] = "${env:OTLP_HTTP_ENDPOINT}"
    kafka = config["exporters"]["kafka"]
    kafka["brokers"] = [bootstrap]
    kafka["partition_traces_by_id"] = partition_traces_by_id
    kafka["traces"] = {**kafka["traces"], "topic": spans_topic, "encoding": encoding}
    if logs_topic is None:
        kafka.pop("logs", None)
        kafka.pop("partition_logs_by_trace_id", None)
        config["service"]["pipelines"].pop("logs", None)
    else:
        kafka["logs"] = {**kafka["logs"], "topic": logs_topic, "encoding": encoding}
    prometheus = {"host": "127.0.0.1", "port": "${env:TELEMETRY_PORT}"}
    config["service"]["telemetry"] = {
        "metrics": {"readers": [{"pull": {"exporter": {"prometheus": prometheus}}}]}
    }
    return yaml.safe_dump(config, sort_keys=False)


def send_spans(spans: list[ReadableSpan], *, protocol: str, collector: Any, chunk: int = 256) -> None:
    """Export finished SDK spans to the Collector with the SDK's own OTLP exporter."""
    if protocol == "http":
        exporter = HttpSpanExporter(endpoint=f"http://{collector.http_endpoint}/v1/traces", timeout=30)
    else:
        exporter = GrpcSpanExporter(endpoint=collector.grpc_endpoint, insecure=True, timeout=30)
    try:
        for start in range(0, len(spans), chunk):
            result = exporter.export(spans[start : start + chunk])
            assert result is SpanExportResult.SUCCESS, f"the Collector refused an OTLP/{protocol} export"
    finally:
        exporter.shutdown()


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def metric_sum(metrics_text: str, name: str, **labels: str) -> float:
    """The sum of the samples of one metric (Prometheus text) whose labels include `labels`."""
    total = 0.0
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match["value"])
    return total


def metric_names(metrics_text: str) -> set[str]:
    return {match["name"] for line in metrics_text.splitlines() if (match := _SAMPLE.match(line))}


def wait_until(
    condition: Callable[[], Any], what: str, *, timeout: float = 180, interval: float = 0.3
) -> Any:
    """Poll until `condition()` is truthy; the timeout only bounds a test that would otherwise hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def messages_per_trace(bootstrap: str, topic: str, decode: Callable[[bytes], list]) -> dict[str, int]:
    """Read the whole topic: trace id -> the number of messages holding some of its spans."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    found: dict[str, int] = {}
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    for trace_id in {span.trace_id for span in decode(record.value)}:
                        found[trace_id] = found.get(trace_id, 0) + 1
    finally:
        consumer.close()
    return found


class CollectorRun:
    """One variant of the tier: fresh topics (4 partitions), a Collector writing to them, and
    `cegraph run` reading them. `stored()` stops the daemon and opens its store."""

    def __init__(
        self,
        bootstrap: str,
        tmp_path: Path,
        start_collector: Callable[..., Any],
        *,
        encoding: str,
        partition_traces_by_id: bool,
        logs: bool = False,
        **daemon_env: str,
    ) -> None:
        self.scenario = Scenario(bootstrap, tmp_path, encoding=encoding, **daemon_env)
        self.logs_topic = f"logs-{self.scenario.spans_topic}" if logs else None
        if self.logs_topic:
            ensure_topics(
                KafkaSettings(bootstrap_servers=bootstrap), [self.logs_topic], partitions=PARTITIONS
            )
            self.scenario.daemon.env["CEGRAPH_KAFKA__LOGS_TOPIC"] = self.logs_topic
        self.collector = start_collector(
            collector_config(
                bootstrap=bootstrap,
                spans_topic=self.scenario.spans_topic,
                encoding=encoding,
                partition_traces_by_id=partition_traces_by_id,
                logs_topic=self.logs_topic,
            )
        )
        self.scenario.daemon.start()

    @property
    def daemon(self):
        return self.scenario.daemon

    def collector_metrics(self) -> str:
        return self.collector.metrics_text()

    def sent_spans(self) -> float:
        return metric_sum(self.collector_metrics(), "otelcol_exporter_sent_spans", exporter="kafka")

    def stored(self) -> EventStore:
        self.daemon.stop()
        return EventStore(self.scenario.store_path)
