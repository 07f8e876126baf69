"""The canary judge on seeded SimLLM traffic, through the daemon's own stages in-process: spans from
the instrumented runtime (real OTel SDK, collector-format messages) -> ingest -> detector stage ->
judge, looked at after every chunk of traffic. A worse canary is rolled back, a better one promoted,
a neutral one decided at the maximum; decisions are events, published once through the outbox, and
survive a restart."""

from __future__ import annotations

import orjson
import pytest
from canary_fixtures import BETTER, NEUTRAL, WORSE, at_version, traffic_messages
from prometheus_client import generate_latest

from cegraph.daemon.app import build_canary_judge, build_detector_stage, build_pipeline
from cegraph.daemon.events import CANARY_DECIDED, CANARY_STARTED, PATCH_CREATED, ROLLOUT_PUBLISHED, Event
from cegraph.daemon.ingest.pipeline import InMessage
from cegraph.daemon.metrics import IngestMetrics
from cegraph.daemon.outbox import InProcessTransport, OutboxPublisher
from cegraph.daemon.rollout.canary import RolloutOutbox, patch_target_mode
from cegraph.daemon.runner import StageRunner
from cegraph.daemon.settings import CanarySettings, ConfigError, Settings, StoreSettings, load_settings
from cegraph.daemon.store import EventStore
from cegraph.schemas.rollout import RolloutDecision


class Daemon:
    """The daemon's stages as `daemon/app.py` builds them, pumped by hand."""

    def __init__(self, path, canary: CanarySettings, target_mode_for=None, clock=None) -> None:
        self.settings = Settings(store=StoreSettings(path=path), canary=canary)
        self.store = EventStore(path)
        self.metrics = IngestMetrics()
        self.pipeline = build_pipeline(self.settings, self.store, self.metrics)
        stage = build_detector_stage(self.settings, self.store, self.metrics.registry)
        self.detect = StageRunner(self.store, stage)
        self.judge = build_canary_judge(self.settings, self.store, self.metrics.registry, target_mode_for)
        if clock is not None:
            self.judge.clock = clock
        self.judging = StageRunner(self.store, self.judge)
        self.judging.open()
        self.offset = max((o for (t, _), o in self.store.offsets().items() if t == "otlp_spans"), default=0)

    def judge_step(self) -> list:
        """One look of the judge, committed; the events it wrote."""
        step = self.judging.step()
        return step.events if step is not None else []

    def ingest(self, messages: list[tuple[bytes | None, bytes]]) -> None:
        batch = [
            InMessage("otlp_spans", 0, self.offset + i, value, key) for i, (key, value) in enumerate(messages)
        ]
        self.offset += len(batch)
        self.pipeline.handle(batch)
        self.pipeline.flush(drain=True)
        self.detect.drain()

    def run(self, messages, chunk: int = 400) -> dict | None:
        """Ingest in chunks, the judge looking after each; returns the decision when there is one."""
        for first in range(0, len(messages), chunk):
            self.ingest(messages[first : first + chunk])
            self.judge_step()
            decided = [c for c in self.judge.canaries() if c["state"] == "decided"]
            if decided:
                return decided[0]
        return None

    def events(self, kind: str) -> list[dict]:
        rows = self.store.query("SELECT payload FROM events WHERE type = ? ORDER BY seq", kind)
        return [orjson.loads(payload) for (payload,) in rows]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture(scope="module")
def worse_traffic():
    return traffic_messages(WORSE, 3_000)


def test_a_worse_canary_is_rolled_back(tmp_path, worse_traffic):
    daemon = Daemon(tmp_path / "c.duckdb", CanarySettings(min_executions=100))
    decided = daemon.run(worse_traffic)
    assert decided is not None and decided["decision"] == "rollback", decided
    assert decided["reason"].startswith("canary worse")
    stats = decided["statistics"]
    assert stats["difference"][0] > 0 and stats["canary"]["failure_rate"] > stats["stable"]["failure_rate"]
    assert stats["canary"]["executions"] < 1_500, "decided before all traffic was in"
    [started] = daemon.events(CANARY_STARTED)
    assert (started["workflow_id"], started["version"], started["stable_version"]) == (
        "arithmetic",
        "1.1.0",
        "1.0.0",
    )
    assert [d["decision"] for d in daemon.events(CANARY_DECIDED)] == ["rollback"]
    assert daemon.metric("cegraph_canary_verdict", workflow="arithmetic") == -1
    assert daemon.metric("cegraph_canary_running", workflow="arithmetic") == 0
    assert daemon.metric("cegraph_canary_decisions_total", decision="rollback") == 1
    assert (
        daemon.metric("cegraph_canary_executions", workflow="arithmetic", track="canary")
        == stats["canary"]["executions"]
    )
    # more traffic of a decided canary decides nothing again
    daemon.ingest(worse_traffic[-200:])
    assert daemon.judge_step() == []


def test_a_better_canary_is_promoted(tmp_path):
    daemon = Daemon(tmp_path / "c.duckdb", CanarySettings(min_executions=100))
    decided = daemon.run(traffic_messages(BETTER, 3_000))
    assert decided is not None and decided["decision"] == "promote", decided
    assert decided["reason"].startswith("canary better")
    assert decided["statistics"]["difference"][1] < 0
    assert daemon.metric("cegraph_canary_verdict", workflow="arithmetic") == 1


def test_a_neutral_canary_is_decided_at_the_maximum(tmp_path):
    daemon = Daemon(tmp_path / "c.duckdb", CanarySettings(min_executions=100, max_executions=600))
    decided = daemon.run(traffic_messages(NEUTRAL, 1_600), chunk=200)
    assert decided is not None and decided["reason"].startswith("max duration"), decided
    stats = decided["statistics"]
    assert stats["difference"][0] < 0 < stats["difference"][1]
    assert stats["canary"]["executions"] >= 600
    expected = "promote" if stats["canary"]["failure_rate"] <= stats["stable"]["failure_rate"] else "rollback"
    assert decided["decision"] == expected


def test_the_maximum_duration_in_seconds(tmp_path):
    now = [1_000.0]
    daemon = Daemon(tmp_path / "c.duckdb", CanarySettings(max_duration_s=60), clock=lambda: now[0])
    messages = traffic_messages(NEUTRAL, 300)
    daemon.ingest(messages)
    daemon.judge_step()
    assert [c["state"] for c in daemon.judge.canaries()] == ["running"]
    assert daemon.metric("cegraph_canary_running", workflow="arithmetic") == 1
    assert daemon.metric("cegraph_canary_verdict", workflow="arithmetic") == 0
    now[0] += 59
    assert daemon.judge_step() == []
    now[0] += 1
    [event] = daemon.judge_step()
    assert event.type == CANARY_DECIDED and event.payload["reason"].startswith("max duration")


def test_the_target_mode_and_feedback_failures_are_counted(tmp_path, worse_traffic):
    """The target mode named by the caller is compared too; a feedback failure counts for its arm."""
    asked = []

    def target(workflow: str, version: str) -> str | None:
        asked.append((workflow, version))
        return modes[0]

    daemon = Daemon(tmp_path / "c.duckdb", CanarySettings(min_executions=10_000), target_mode_for=target)
    daemon.ingest(worse_traffic[:1_000])
    in_mode: dict[str, set[str]] = {}
    for failure in daemon.events("FailureObserved"):
        if failure["mode"] and failure["workflow_version"] == "1.1.0":
            in_mode.setdefault(failure["mode"], set()).add(failure["trace_id"])
    modes = sorted(in_mode, key=lambda m: -len(in_mode[m]))
    daemon.judge_step()
    assert asked == [("arithmetic", "1.1.0")]
    [running] = daemon.judge.canaries()
    stats = running["statistics"]
    assert stats["target_mode"] == modes[0]
    assert stats["canary"]["mode_failures"] == len(in_mode[modes[0]]) > 0
    assert stats["mode_difference"] is not None
    assert daemon.metric(
        "cegraph_canary_mode_failure_rate", workflow="arithmetic", track="canary"
    ) == pytest.approx(stats["canary"]["mode_failure_rate"])
    passed = daemon.store.query(
        "SELECT trace_id FROM executions WHERE track = 'canary' AND NOT (hard_failed OR eval_failed) LIMIT 1"
    )[0][0]
    body = orjson.dumps(
        {"trace_id": passed, "outcome": "failed", "critique": "wrong total", "source": "user"}
    )
    daemon.pipeline.handle([InMessage("cegraph.feedback", 0, 0, body)])
    daemon.pipeline.flush(drain=True)
    daemon.detect.drain()
    daemon.judge_step()
    after = daemon.judge.canaries()[0]["statistics"]["canary"]
    assert after["failures"] == stats["canary"]["failures"] + 1
    assert after["executions"] == stats["canary"]["executions"]


def test_decisions_are_published_once_and_survive_a_restart(tmp_path, worse_traffic):
    path = tmp_path / "c.duckdb"
    daemon = Daemon(path, CanarySettings(min_executions=100))
    daemon.run(worse_traffic)
    [entry] = RolloutOutbox(daemon.store).entries(1)
    message = RolloutDecision.model_validate_json(entry.value)
    assert (message.workflow_id, message.version, message.decision) == ("arithmetic", "1.1.0", "rollback")
    assert message.stable_version == "1.0.0" and message.statistics.difference[0] > 0
    daemon.store.close()

    restarted = Daemon(path, CanarySettings(min_executions=100))  # crashed before publishing
    assert restarted.metric("cegraph_canary_verdict", workflow="arithmetic") == -1
    outbox = RolloutOutbox(restarted.store)
    assert outbox.entries(1) == [entry]
    delivered = []
    topic = InProcessTransport("cegraph.rollouts", [delivered.append], offset=7)
    publisher = StageRunner(restarted.store, OutboxPublisher(outbox, topic))
    assert publisher.drain() == 1 and delivered == [entry]
    assert outbox.entries(1) == [] and publisher.drain() == 0
    assert restarted.events(ROLLOUT_PUBLISHED) == [{"topic": "cegraph.rollouts", "partition": 0, "offset": 7}]
    assert restarted.judge_step() == []
    assert restarted.judge.canaries()[0]["published"]["offset"] == 7
    assert b"cegraph_canary_verdict" in generate_latest(restarted.metrics.registry)


def test_a_canary_replaced_by_a_newer_one_is_rolled_back_as_superseded(tmp_path, worse_traffic):
    daemon = Daemon(tmp_path / "c.duckdb", CanarySettings(min_executions=10_000))
    daemon.ingest(worse_traffic[:300])
    daemon.judge_step()
    daemon.ingest(traffic_messages(at_version(WORSE, "1.2.0"), 300))
    events = daemon.judge_step()
    assert [(e.type, e.key) for e in events] == [
        (CANARY_STARTED, "arithmetic@1.2.0"),
        (CANARY_DECIDED, "arithmetic@1.1.0"),
    ]
    assert (
        events[1].payload["decision"] == "rollback" and events[1].payload["reason"] == "superseded by 1.2.0"
    )
    assert daemon.metric("cegraph_canary_running", workflow="arithmetic") == 1


def test_bad_canary_settings_stop_the_start_naming_the_setting(monkeypatch):
    monkeypatch.setenv("CEGRAPH_CANARY__ALPHA", "0.7")
    monkeypatch.setenv("CEGRAPH_CANARY__MIN_EXECUTIONS", "500")
    monkeypatch.setenv("CEGRAPH_CANARY__MAX_EXECUTIONS", "300")
    monkeypatch.setenv("CEGRAPH_CANARY__AT_MAX_DURATION", "coin_flip")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert "CEGRAPH_CANARY__ALPHA" in message and "less than 0.5" in message
    assert "CEGRAPH_CANARY__MAX_EXECUTIONS" in message and "at least min_executions (500)" in message
    assert "CEGRAPH_CANARY__AT_MAX_DURATION" in message


def test_the_api_binds_to_loopback_unless_told_otherwise():
    assert Settings().http.host == "127.0.0.1"


def test_the_target_mode_comes_from_the_patch_that_made_the_version(tmp_path):
    store = EventStore(tmp_path / "c.duckdb")
    patch = {"workflow_id": "arithmetic", "new_version": "1.1.0", "rationale": {"mode": "m7"}}
    store.append([Event(PATCH_CREATED, "arithmetic", {"patch_id": "p", "patch": patch})])
    target = patch_target_mode(store)
    assert target("arithmetic", "1.1.0") == "m7"
    assert target("arithmetic", "1.2.0") is None and target("qa", "1.1.0") is None
