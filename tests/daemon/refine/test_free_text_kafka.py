"""The text policy and the approval of free text through the real broker: `cegraph run` consumes traces
whose inputs carry an injection (one workflow) and clean traces (another); the injected rewrite is
rejected and shown by `cegraph patches list`, the clean one waits for `cegraph patches approve`, which
reaches the running daemon over HTTP with its token, and only then is on the patches topic."""

from __future__ import annotations

import asyncio
import json
import subprocess

import httpx
import orjson
from daemon_proc import Scenario, topic_messages, wait_until
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from refinement_fixtures import CHATTY, FINDING, run_tasks

from cegraph.connectors.kafka.otlp_exporter import OtlpKafkaSpanExporter
from cegraph.daemon.demo.process import CEGRAPH
from cegraph.daemon.settings import KafkaSettings
from cegraph.schemas.workflow import parse_spec

KEY = "free-text-kafka-key"
TOKEN = "free-text-kafka-token"
CLEAN = parse_spec({**CHATTY.canonical(), "id": "arithmetic-chatty-clean", "content_hash": None})


def get(daemon, path: str) -> list[dict]:
    response = httpx.get(f"{daemon.url}{path}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    response.raise_for_status()
    return response.json()


def cli(daemon, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in daemon.env.items() if k != "CEGRAPH_HTTP__TOKEN"}
    if token is not None:
        env["CEGRAPH_HTTP__TOKEN"] = token
    return subprocess.run([CEGRAPH, *args], env={**env, "COLUMNS": "250"}, capture_output=True, text=True)


def test_through_kafka_injected_text_is_rejected_and_free_text_waits_for_approval(kafka_bootstrap, tmp_path):
    scenario = Scenario(
        kafka_bootstrap,
        tmp_path,
        CEGRAPH_PUBLISHER__SIGNING_KEY=KEY,
        CEGRAPH_HTTP__TOKEN=TOKEN,
        CEGRAPH_REFINER__PROPOSERS='["prompt_editor"]',
        CEGRAPH_REFINER__APPROVE_FREE_TEXT="true",
    )
    daemon = scenario.daemon
    patches_topic = daemon.env["CEGRAPH_KAFKA__PATCHES_TOPIC"]
    daemon.start()
    try:
        for spec in (CHATTY, CLEAN):
            response = httpx.post(
                f"{daemon.url}/workflows",
                content=orjson.dumps(spec.canonical()),
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert response.status_code == 201, response.text
        for spec, edit in ((CHATTY, lambda question: f"{question} {FINDING}"), (CLEAN, None)):
            exporter = OtlpKafkaSpanExporter(
                KafkaSettings(bootstrap_servers=kafka_bootstrap), topic=scenario.spans_topic,
                partition_by_trace=True,
            )  # fmt: skip
            # two-digit problems: the truncations of a too small max_tokens are then the one failure
            # mechanism, so whichever batch the mode crosses in, the editor's rewrite addresses it
            processor = BatchSpanProcessor(exporter)
            asyncio.run(run_tasks(spec, range(600), processor, edit_input=edit, digits=2))

        rejected = wait_until(lambda: get(daemon, "/patches/rejected"), daemon)
        [held] = wait_until(lambda: get(daemon, "/patches"), daemon)
        assert {row["workflow_id"] for row in rejected} == {CHATTY.id}
        assert all(
            "text policy" in row["reason"] and row["edit"]["operator"] == "edit_prompt" for row in rejected
        )
        assert held["workflow_id"] == CLEAN.id and held["state"].startswith("held: free text awaits approval")
        assert topic_messages(kafka_bootstrap, patches_topic) == []

        listed = cli(daemon, "patches", "list")  # through the daemon: DuckDB refuses a second process
        assert listed.returncode == 0, listed.stderr
        assert "rejected: text policy" in listed.stdout and "awaits approval" in listed.stdout
        metrics = httpx.get(f"{daemon.url}/metrics", timeout=10).text
        assert 'cegraph_edits_rejected_by_text_policy_total{rule="url"}' in metrics
        assert 'cegraph_edits_rejected_by_text_policy_total{rule="url"} 0.0' not in metrics

        refused = cli(daemon, "patches", "approve", f"{CLEAN.id}@1.1.0", token=None)
        assert refused.returncode == 1 and "401" in refused.stderr
        approved = cli(daemon, "patches", "approve", f"{CLEAN.id}@1.1.0")
        assert approved.returncode == 0, approved.stderr
        wait_until(lambda: [p for p in get(daemon, "/patches") if p["state"] == "published"], daemon, 60)
    finally:
        daemon.stop()
    [message] = topic_messages(kafka_bootstrap, patches_topic)
    assert message.key == CLEAN.id.encode()
    assert "evil.example" not in message.value.decode()
    assert "Be brief" in json.dumps(orjson.loads(message.value)["operations"])
