"""Run `cegraph run` as a real child process, for tests that kill, restart and watch it, and the
`Scenario` of one such test: its own topics, consumer group and store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from kafka import KafkaProducer
from otel_traces import Message

from cegraph.connectors.kafka.client import ensure_topics
from cegraph.daemon.settings import KafkaSettings
from local_service import die_with_parent

CEGRAPH = str(Path(sys.executable).parent / "cegraph")
PARTITIONS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("CEGRAPH_")}
        self.env = {**base, "CEGRAPH_HTTP__PORT": str(self.port), "CEGRAPH_LOG_LEVEL": "WARNING", **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [CEGRAPH, "run"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,  # no daemon outlives a killed test
            )  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cegraph run exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"cegraph run was not ready within {timeout}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as in a crash."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def stats(self) -> dict:
        response = httpx.get(f"{self.url}/stats", timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_for(self, predicate, timeout: float = 120, interval: float = 0.5) -> dict:
        """Poll /stats until `predicate(stats)` holds; returns the last stats."""
        deadline = time.monotonic() + timeout
        stats: dict = {}
        while time.monotonic() < deadline:
            stats = self.stats()
            if predicate(stats):
                return stats
            time.sleep(interval)
        raise AssertionError(f"timed out; last stats {stats}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Scenario:
    """Unique topics, group and store for one test, and the daemon that consumes them."""

    def __init__(
        self,
        bootstrap: str,
        tmp_path,
        *,
        encoding: str = "otlp_proto",
        local_broker: bool = True,
        **extra: str,
    ) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.bootstrap = bootstrap
        self.spans_topic = f"spans-{suffix}"
        self.feedback_topic = f"feedback-{suffix}"
        self.dlq_topic = f"dlq-{suffix}"
        self.store_path = tmp_path / "cegraph.duckdb"
        ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), [self.spans_topic], partitions=PARTITIONS)
        env = {
            "CEGRAPH_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "CEGRAPH_KAFKA__SPANS_TOPIC": self.spans_topic,
            "CEGRAPH_KAFKA__FEEDBACK_TOPIC": self.feedback_topic,
            "CEGRAPH_KAFKA__DLQ_TOPIC": self.dlq_topic,
            "CEGRAPH_KAFKA__PATCHES_TOPIC": f"patches-{suffix}",
            "CEGRAPH_KAFKA__ROLLOUTS_TOPIC": f"rollouts-{suffix}",
            "CEGRAPH_KAFKA__GROUP_ID": f"group-{suffix}",
            "CEGRAPH_STORE__PATH": str(self.store_path),
            "CEGRAPH_INGEST__ENCODING": encoding,
            "CEGRAPH_INGEST__IDLE_TIMEOUT_S": "0.5",
            "CEGRAPH_INGEST__MAX_TRACE_AGE_S": "30",
            # the fixture's broker allows short sessions, so a killed daemon's partitions come back fast
            "CEGRAPH_KAFKA__SESSION_TIMEOUT_MS": "2000" if local_broker else "6000",
            **extra,
        }
        self.daemon = Daemon(env, tmp_path / "daemon.log")
        self.produced: dict[int, int] = {}  # partition -> messages

    def produce(self, messages: list[Message], *, producer: KafkaProducer | None = None) -> None:
        own = producer is None
        producer = producer or KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        for index, message in enumerate(messages):
            partition = None if message.key is not None else index % PARTITIONS
            metadata = producer.send(
                self.spans_topic, key=message.key, value=message.value, partition=partition
            )
            metadata.add_callback(self.record)
        producer.flush()
        if own:
            producer.close()

    def record(self, metadata) -> None:
        """Producer callback (arrives in any order): remember the end offset of each partition."""
        self.produced[metadata.partition] = max(self.produced.get(metadata.partition, 0), metadata.offset + 1)

    def all_consumed(self, stats: dict) -> bool:
        stored = {
            int(k.rsplit("/", 1)[1]): v for k, v in stats["offsets"].items() if k.startswith(self.spans_topic)
        }
        return all(stored.get(partition, 0) >= end for partition, end in self.produced.items())
