"""`cegraph demo --kafka`: the demo's scenario over a real Kafka broker, with the daemon
(`cegraph run`) and the traffic generator (`cegraph simulate --mix demo`) as separate processes.

The daemon gets the demo's settings as `CEGRAPH_*` variables and topics of its own; the traffic
generator sends spans to the spans topic and follows the patches and rollout decisions the daemon
publishes. When the traffic has run its course and the daemon has caught up (every execution stored,
no refinement job running, no canary undecided), the daemon stops and the report is written from
its DuckDB file, as the in-process demo writes it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from cegraph.daemon.demo import WORKFLOW, DemoRun, demo_overrides, run_from_store
from cegraph.daemon.settings import ENV_NESTED_DELIMITER, ENV_PREFIX
from cegraph.daemon.store import EventStore
from cegraph.schemas.workflow import example_spec

CEGRAPH = str(Path(sys.executable).parent / "cegraph")
GRACE_S = 120.0  # after the traffic ends, for the daemon to store the rest and finish its jobs


def settings_env(overrides: dict[str, dict[str, Any]]) -> dict[str, str]:
    """`{"detector": {"mass_threshold": 0.07}}` -> `{"CEGRAPH_DETECTOR__MASS_THRESHOLD": "0.07"}`."""
    return {
        f"{ENV_PREFIX}{group.upper()}{ENV_NESTED_DELIMITER}{name.upper()}": str(value)
        for group, values in overrides.items()
        for name, value in values.items()
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Daemon:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{env['CEGRAPH_HTTP__PORT']}"
        self._log = log.open("ab")
        self.process = subprocess.Popen([CEGRAPH, "run"], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response.json() if path != "/metrics" else response.text

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cegraph run exited with {self.process.returncode}; see {self._log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"cegraph run was not ready within {timeout} s; see {self._log.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


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
    executions: int = 20_000,
    rate: float = 200.0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> DemoRun:
    out.mkdir(parents=True, exist_ok=False)
    started = time.monotonic()
    suffix = uuid.uuid4().hex[:8]
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    topics = ("spans", "feedback", "dlq", "patches", "rollouts")
    kafka = {f"{name}_topic": f"demo-{name}-{suffix}" for name in topics}
    kafka |= {"bootstrap_servers": bootstrap, "group_id": f"demo-{suffix}"}
    overrides = {**demo_overrides(out, seed), "kafka": kafka, "ingest": {"idle_timeout_s": 1.0}}
    env = {
        **base,
        **settings_env(overrides),
        "CEGRAPH_HTTP__PORT": str(_free_port()),
        "CEGRAPH_LOG_LEVEL": "WARNING",
    }
    daemon = _Daemon(env, out / "daemon.log")
    traffic: subprocess.Popen[bytes] | None = None
    try:
        daemon.wait_ready()
        spec = example_spec(WORKFLOW)
        httpx.post(
            daemon.url + "/workflows", content=orjson.dumps(spec.canonical()), timeout=10
        ).raise_for_status()
        with (out / "traffic.log").open("ab") as log:
            traffic = subprocess.Popen(
                [CEGRAPH, "simulate", "--workflow", WORKFLOW, "--mix", "demo", "--seed", str(seed),
                 "--rate", f"{rate}/s", "--count", str(executions), "--canary-weight", "0.3"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            ended: float | None = None
            while True:
                state = _state(daemon)
                state["traffic_running"] = traffic.poll() is None
                if on_progress is not None:
                    on_progress(state)
                if not state["traffic_running"]:
                    if traffic.returncode != 0:
                        raise RuntimeError(
                            f"cegraph simulate exited with {traffic.returncode}; see traffic.log"
                        )
                    ended = ended or time.monotonic()
                    # caught up, or a canary that no traffic will decide any more: stop waiting
                    if _caught_up(state, executions) or time.monotonic() - ended > GRACE_S:
                        break
                time.sleep(2)
    finally:
        if traffic is not None and traffic.poll() is None:
            traffic.terminate()
        daemon.stop()
    store = EventStore(out / "cegraph.duckdb", read_only=True)
    try:
        run = run_from_store(store, seed, out)
    finally:
        store.close()
    run.elapsed_s = time.monotonic() - started
    return run


def _state(daemon: _Daemon) -> dict[str, Any]:
    stats = daemon.get("/stats")
    return {
        "executions": stats["executions"]["total"],
        "modes": daemon.get("/modes"),
        "patches": daemon.get("/patches"),
        "canaries": daemon.get("/canaries"),
        "jobs_running": _running_jobs(daemon.get("/metrics")),
    }


def _caught_up(state: dict[str, Any], executions: int) -> bool:
    undecided = [c for c in state["canaries"] if c["state"] != "decided"]
    return state["executions"] >= executions and not state["jobs_running"] and not undecided
