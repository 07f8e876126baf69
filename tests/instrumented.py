"""Recordings of tests/genai_app.py under a real GenAI instrumentation, and the daemon's view of them.

`record` runs the app in its own process against the stub OpenAI server of tests/openai_stub.py and
keeps its OTLP exports byte for byte; `ingest` hands them to the daemon's ingest stage, built as
`daemon/app.py` builds it, as messages of the spans and logs topics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from genai_app import SCENARIOS, read_exports
from openai_stub import ChatServer, ScenarioResponder

from cegraph.daemon.app import build_pipeline
from cegraph.daemon.detect.stage import node_from_row
from cegraph.daemon.ingest.pipeline import InMessage
from cegraph.daemon.metrics import IngestMetrics
from cegraph.daemon.settings import KafkaSettings, Settings, StoreSettings
from cegraph.daemon.spans import Node
from cegraph.daemon.store import EventStore

APP = Path(__file__).resolve().parent / "genai_app.py"
SPANS_TOPIC, LOGS_TOPIC = "otlp_spans", "otlp_logs"


def app_environment(content: str) -> dict[str, str]:
    """The process environment a user sets for opentelemetry-instrumentation-openai-v2 to capture
    message content with the latest (experimental) GenAI conventions."""
    return {
        **os.environ,
        "OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental",
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": content,
    }


def expected_source(convention: str, scenario: str) -> str:
    """The source of the failure a scenario makes ("" for none). openai-v2 2.4b0 drops OpenAI's
    `message.refusal` (its output message has no parts): that refusal is invisible in its spans."""
    if convention == "genai" and scenario == "refusal":
        return ""
    return SCENARIOS[scenario][1]


@dataclass
class Recording:
    convention: str
    executions: list[dict]  # what the app says it ran, one entry per trace
    span_exports: list[bytes]
    log_exports: list[bytes]
    requests: list = field(default_factory=list)  # what the stub server was asked

    def of(self, scenario: str) -> list[dict]:
        return [e for e in self.executions if e["scenario"] == scenario]


def run_app(
    convention: str, base_url: str, *target: str, content: str = "span_only", **options: str
) -> list[dict]:
    """Run tests/genai_app.py; `options` are its flags (`runs="2"` -> `--runs 2`, `evaluate=""`)."""
    flags = [part for key, value in options.items() for part in (f"--{key}", value) if part]
    result = subprocess.run(
        [sys.executable, str(APP), "--convention", convention, "--base-url", base_url, *target, *flags],
        env=app_environment(content),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"the instrumented app failed:\n{result.stderr[-3000:]}"
    return [json.loads(line) for line in result.stdout.splitlines()]


def record(convention: str, out: Path, *, content: str = "span_only", **options: str) -> Recording:
    with ChatServer(ScenarioResponder()) as server:
        executions = run_app(convention, server.url, "--out", str(out), content=content, **options)
        requests = list(server.requests)
    return Recording(
        convention, executions, read_exports(out / "spans.pb"), read_exports(out / "logs.pb"), requests
    )


@dataclass
class Ingested:
    store: EventStore
    metrics: IngestMetrics

    def nodes(self, trace_id: str) -> list[Node]:
        rows = self.store.query_dicts(
            "SELECT * FROM nodes WHERE trace_id = ? ORDER BY start_ns, span_id", trace_id
        )
        assert rows, f"execution {trace_id} was not stored"
        return [node_from_row(row) for row in rows]


def ingest(recording: Recording, path: Path, *, logs: bool = False) -> Ingested:
    """The recording's exports through the ingest stage (spans, then log records), stored in `path`."""
    kafka = KafkaSettings(spans_topic=SPANS_TOPIC, logs_topic=LOGS_TOPIC if logs else "")
    settings = Settings(store=StoreSettings(path=path), kafka=kafka)
    store, metrics = EventStore(path), IngestMetrics()
    pipeline = build_pipeline(settings, store, metrics)
    messages = [InMessage(SPANS_TOPIC, 0, i, value) for i, value in enumerate(recording.span_exports)]
    if logs:
        messages += [InMessage(LOGS_TOPIC, 0, i, value) for i, value in enumerate(recording.log_exports)]
    assert not pipeline.handle(messages), "dead letters"
    pipeline.flush(drain=True)
    return Ingested(store, metrics)
