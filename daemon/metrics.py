"""Prometheus metrics of the daemon, on a registry of their own so tests can make fresh ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "cegraph_ingest_messages_total", "Kafka messages consumed.", ["topic"], registry=r
        )
        self.spans = Counter("cegraph_ingest_spans_total", "Spans decoded from the spans topic.", registry=r)
        self.executions = Counter(
            "cegraph_ingest_executions_total", "Executions stored, by completeness.", ["status"], registry=r
        )
        self.evicted = Counter(
            "cegraph_ingest_evicted_traces_total",
            "Open traces completed as incomplete because max_open_traces was reached.",
            registry=r,
        )
        self.amendments = Counter(
            "cegraph_ingest_amendments_total", "Late spans added to an already stored execution.", registry=r
        )
        self.duplicate_spans = Counter(
            "cegraph_ingest_duplicate_spans_total",
            "Spans dropped because they were already stored.",
            registry=r,
        )
        self.duplicate_messages = Counter(
            "cegraph_ingest_duplicate_messages_total",
            "Feedback or undecodable messages delivered again after their event was recorded.",
            ["topic"],
            registry=r,
        )
        self.feedback = Counter(
            "cegraph_feedback_total", "Feedback messages stored.", ["outcome"], registry=r
        )
        self.dead_letters = Counter(
            "cegraph_dead_letters_total", "Messages sent to the dead-letter topic.", ["topic"], registry=r
        )
        self.open_traces = Gauge("cegraph_ingest_open_traces", "Traces being assembled.", registry=r)
        self.commit_seconds = Histogram(
            "cegraph_store_commit_seconds",
            "Time to write one batch of events and offsets to DuckDB.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
