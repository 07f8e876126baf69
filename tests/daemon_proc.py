"""`cegraph run` as a real child process for tests that kill, restart and watch it (the demo's
`DaemonProcess`), and the `Scenario` of one such test: its own topics, consumer group and store."""

from __future__ import annotations

import time
import uuid

from kafka import KafkaProducer
from otel_traces import Message

from cegraph.connectors.kafka.client import ensure_topics
from cegraph.daemon.demo.process import DaemonProcess
from cegraph.daemon.settings import KafkaSettings

PARTITIONS = 4


class Daemon(DaemonProcess):
    """The daemon of a test: what `cegraph demo --kafka` runs, watched through `/stats`."""

    def stats(self) -> dict:
        return self.get("/stats")

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
