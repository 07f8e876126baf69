"""`cegraph demo --kafka`: the demo's scenario over a real Kafka broker, with the daemon
(`cegraph run`) and the traffic generator (`cegraph simulate --mix demo`) as separate processes.

The daemon gets the demo's settings as `CEGRAPH_*` variables and topics of its own; the traffic
generator sends spans to the spans topic and follows the patches and rollout decisions the daemon
publishes. The run lasts until a promoted patch has edited every planted mode's node (or the traffic
reaches `max_executions`), then until the daemon has stored every message and no job or canary is
open; the daemon stops and the report is written from its DuckDB file, as the in-process demo does.

So that a run does not depend on the machine's pace, the traffic is paused (SIGSTOP) while a
refinement job runs, as the in-process demo's ticks wait for refinement: a slow machine sees the
same number of executions per refinement step as a fast one, not more.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from kafka import KafkaConsumer, TopicPartition

from cegraph.connectors.kafka.client import kafka_python_options
from cegraph.daemon.demo.process import CEGRAPH, DaemonProcess, die_with_parent
from cegraph.daemon.demo.scenario import (
    PLANTED,
    WORKFLOW,
    DemoRun,
    demo_overrides,
    promoted_nodes,
    run_from_store,
)
from cegraph.daemon.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, KafkaSettings
from cegraph.daemon.store import EventStore
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.workflow import example_spec

POLL_S = 2.0


def settings_env(overrides: dict[str, dict[str, Any]]) -> dict[str, str]:
    """`{"detector": {"mass_threshold": 0.07}}` -> `{"CEGRAPH_DETECTOR__MASS_THRESHOLD": "0.07"}`."""
    return {
        f"{ENV_PREFIX}{group.upper()}{ENV_NESTED_DELIMITER}{name.upper()}": str(value)
        for group, values in overrides.items()
        for name, value in values.items()
    }


def _running_jobs(metrics: str) -> float:
    line = next(
        (line for line in metrics.splitlines() if line.startswith("cegraph_refinement_jobs_running ")), ""
    )
    return float(line.split()[-1]) if line else 0.0


def run_over_kafka(
    seed: int,
    out: Path,
    bootstrap: str,
    *,
    max_executions: int = 60_000,
    rate: float = 200.0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> DemoRun:
    out.mkdir(parents=True, exist_ok=False)
    started = time.monotonic()
    suffix = uuid.uuid4().hex[:8]
    topics = ("spans", "feedback", "dlq", "patches", "rollouts")
    kafka = {f"{name}_topic": f"demo-{name}-{suffix}" for name in topics}
    kafka |= {"bootstrap_servers": bootstrap, "group_id": f"demo-{suffix}"}
    overrides = {**demo_overrides(out, seed), "kafka": kafka, "ingest": {"idle_timeout_s": 1.0}}
    daemon = DaemonProcess(settings_env(overrides), out / "daemon.log")
    traffic: _Traffic | None = None
    try:
        daemon.start()
        spec = example_spec(WORKFLOW)
        httpx.post(
            daemon.url + "/workflows", content=orjson.dumps(spec.canonical()), timeout=10
        ).raise_for_status()
        traffic = _Traffic(
            [CEGRAPH, "simulate", "--workflow", WORKFLOW, "--mix", "demo", "--seed", str(seed),
             "--rate", f"{rate}/s", "--count", str(max_executions), "--canary-weight", "0.3"],
            daemon.env, out / "traffic.log",
        )  # fmt: skip
        ends = _EndOffsets(KafkaSettings(bootstrap_servers=bootstrap), kafka["spans_topic"])
        try:
            while True:
                state = _state(daemon)
                state["converged"] = set(PLANTED) <= _promoted(state)
                traffic.pause(state["jobs_running"] > 0 and not state["converged"])
                if state["converged"]:
                    traffic.stop()
                state["traffic_running"] = traffic.running()
                state["traffic_paused"] = traffic.paused
                if on_progress is not None:
                    on_progress(state)
                if not state["traffic_running"] and _caught_up(state, ends.read()):
                    break
                time.sleep(POLL_S)
        finally:
            ends.close()
        if not state["converged"] and traffic.returncode() != 0:
            raise RuntimeError(f"cegraph simulate exited with {traffic.returncode()}; see traffic.log")
    finally:
        if traffic is not None:
            traffic.stop()
        daemon.stop()
    store = EventStore(out / "cegraph.duckdb", read_only=True)
    try:
        run = run_from_store(store, seed, out)
    finally:
        store.close()
    run.elapsed_s = time.monotonic() - started
    return run


class _Traffic:
    """`cegraph simulate` as a process that the demo can pause and stop."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        self.paused = False

    def running(self) -> bool:
        return self.process.poll() is None

    def returncode(self) -> int | None:
        return self.process.poll()

    def pause(self, paused: bool) -> None:
        if paused != self.paused and self.running():
            self.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)
            self.paused = paused

    def stop(self) -> None:
        if self.running():
            self.pause(False)  # a stopped process would keep SIGTERM pending
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


class _EndOffsets:
    """The spans topic's end offsets: what the daemon must have stored to have caught up."""

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.topic = topic
        self.consumer = KafkaConsumer(**kafka_python_options(settings), enable_auto_commit=False)

    def read(self) -> dict[str, int]:
        partitions = [
            TopicPartition(self.topic, p) for p in self.consumer.partitions_for_topic(self.topic) or ()
        ]
        return {
            f"{tp.topic}/{tp.partition}": end for tp, end in self.consumer.end_offsets(partitions).items()
        }

    def close(self) -> None:
        self.consumer.close()


def _state(daemon: DaemonProcess) -> dict[str, Any]:
    stats = daemon.get("/stats")
    return {
        "executions": stats["executions"]["total"],
        "offsets": stats["offsets"],
        "modes": daemon.get("/modes"),
        "patches": daemon.get("/patches"),
        "canaries": daemon.get("/canaries"),
        "jobs_running": _running_jobs(daemon.get("/metrics")),
    }


def _promoted(state: dict[str, Any]) -> set[str]:
    patches = [WorkflowPatch.model_validate(row["patch"]) for row in state["patches"]]
    decisions = {c["version"]: c["decision"] for c in state["canaries"] if c["decision"]}
    return promoted_nodes(patches, decisions)


def _caught_up(state: dict[str, Any], ends: dict[str, int]) -> bool:
    """Every message of the spans topic stored, no job running, no canary undecided."""
    stored = state["offsets"]
    undecided = [c for c in state["canaries"] if c["state"] != "decided"]
    return (
        all(stored.get(partition, 0) >= end for partition, end in ends.items())
        and not state["jobs_running"]
        and not undecided
    )
