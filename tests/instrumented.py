"""Recordings of tests/genai_app.py under a real GenAI instrumentation, and the daemon's view of them.

`record` runs the app in its own process against the stub OpenAI server of tests/openai_stub.py (or
any OpenAI-compatible server, such as the real model of tests/llm_server.py) and keeps its OTLP
exports byte for byte; `ingest` hands them to the daemon's ingest stage, built as `daemon/app.py`
builds it, as messages of the spans and logs topics.

What a failure should be comes from the stub's scenarios (`expected_source`), and on a real server,
where nobody scripts the answers, from what the app saw (`observed_sources`): each call that raised,
each call that stopped on `length` or `content_filter`, and a failed verdict of the app's evaluator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from genai_app import REAL_SCENARIOS, SCENARIOS, read_exports
from llm_server import MAX_TOKENS, REQUEST_TIMEOUT_S, ModelServer
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


TRUNCATING = frozenset({"length", "content_filter"})


def real_model_flags(server: ModelServer, runs: int) -> dict[str, str]:
    """The app's flags against a real model server: its model, the real-model tests' token cap, a
    generous per-request timeout, REAL_SCENARIOS (`overflow` only where the context size is known:
    a prompt past an unknown context may be a very long one to process) and the app's evaluator."""
    scenarios = [s for s in REAL_SCENARIOS if s != "overflow" or server.context_tokens]
    flags = {
        "runs": str(runs), "scenarios": ",".join(scenarios), "evaluate": "", "model": server.model,
        "max_tokens": str(MAX_TOKENS), "request_timeout": str(REQUEST_TIMEOUT_S),
    }  # fmt: skip
    if server.context_tokens:  # a word is at least one token: this is past the context window
        flags["overflow_words"] = str(server.context_tokens + 256)
    return flags


def observed_sources(execution: dict) -> Counter[str]:
    """The failures of one execution by what the app saw: one per call that raised or was truncated
    (a point of failure each), and one for a failed verdict."""
    sources: Counter[str] = Counter()
    for call in execution["calls"]:
        if call.get("error"):
            sources["error"] += 1
        elif call["finish_reason"] in TRUNCATING:
            sources["truncated"] += 1
    if execution["verdict"] == "fail":
        sources["evaluation"] += 1
    return sources


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
    convention: str,
    base_url: str,
    *target: str,
    content: str = "span_only",
    timeout: float | None = 600,
    **options: str,
) -> list[dict]:
    """Run tests/genai_app.py; `options` are its flags (`runs="2"` -> `--runs 2`, `evaluate=""`,
    `max_tokens="48"` -> `--max-tokens 48`). `timeout` None: a real model's pace is not bounded here
    (each of its requests is, by the app's `--request-timeout`)."""
    flags = [part for key, value in options.items() for part in (f"--{key.replace('_', '-')}", value) if part]
    result = subprocess.run(
        [sys.executable, str(APP), "--convention", convention, "--base-url", base_url, *target, *flags],
        env=app_environment(content),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"the instrumented app failed:\n{result.stderr[-3000:]}"
    return [json.loads(line) for line in result.stdout.splitlines()]


def record(
    convention: str, out: Path, *, base_url: str = "", content: str = "span_only", **options: str
) -> Recording:
    """The app's run and its exports: against `base_url`, else against a fresh stub server (whose
    requests are kept)."""
    if base_url:
        executions = run_app(
            convention, base_url, "--out", str(out), content=content, timeout=None, **options
        )
        requests = []
    else:
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
