"""The Kafka source's recovery, in process against the real broker, at the moments that lose data.

A batch is fetched before its handler waits for the source's lock. If, meanwhile, a flush fails and
the recovery seeks every partition back to its stored offset, that batch lies ahead of the consumer:
handling it would store offsets past the messages in between, which are then skipped as "stored"
when they are read again. The test holds the lock to make that moment happen for sure (no timing).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from daemon_proc import assert_stored_exactly_once
from kafka import KafkaProducer
from otel_traces import make_traces, to_messages

from cegraph.connectors.kafka.client import ensure_topics
from cegraph.connectors.kafka.source import KafkaIngestSource
from cegraph.connectors.otlp.codec import decoder_for
from cegraph.daemon.ingest.pipeline import IngestPipeline
from cegraph.daemon.settings import IngestSettings, KafkaSettings, Settings, StoreSettings
from cegraph.daemon.store import EventStore

pytestmark = pytest.mark.kafka


class WatchedLock(asyncio.Lock):
    """Says when someone starts waiting for it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()

    async def acquire(self) -> bool:
        if self.locked():
            self.waiting.set()
        return await super().acquire()


async def until(condition, what: str, *, polls: int = 1_200) -> None:
    for _ in range(polls):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never happened: {what}")


async def test_a_batch_fetched_before_a_recovery_seek_is_read_again_not_skipped(kafka_bootstrap, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    kafka = KafkaSettings(
        bootstrap_servers=kafka_bootstrap, spans_topic=f"spans-{suffix}", feedback_topic=f"fb-{suffix}",
        dlq_topic=f"dlq-{suffix}", group_id=f"group-{suffix}", session_timeout_ms=6_000,
    )  # fmt: skip
    ensure_topics(kafka, [kafka.spans_topic, kafka.feedback_topic, kafka.dlq_topic], partitions=2)
    settings = Settings(
        kafka=kafka,
        store=StoreSettings(path=tmp_path / "cegraph.duckdb"),
        ingest=IngestSettings(idle_timeout_s=1, batch_size=20, recovery_initial_s=0.05),
    )
    now = [0.0]  # traces complete only when the test moves this clock
    store = EventStore(settings.store.path)
    pipeline = IngestPipeline(
        store, decoder_for("otlp_proto"), settings.ingest, spans_topic=kafka.spans_topic,
        feedback_topic=kafka.feedback_topic, clock=lambda: now[0],
    )  # fmt: skip
    source = KafkaIngestSource(settings, pipeline)
    source._lock = lock = WatchedLock()
    traces = make_traces(400, seed=71)
    messages = to_messages(traces, one_trace_per_message=True, seed=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)

    def produce(part) -> None:
        for index, message in enumerate(part):
            producer.send(kafka.spans_topic, key=message.key, value=message.value, partition=index % 2)
        producer.flush()

    def stored() -> int:
        return store.stats()["executions"]["total"]

    await source.start()
    try:
        produce(messages[:200])
        await until(lambda: len(pipeline.assembler) == 200, "the first 200 traces open")
        now[0] += 10
        await until(lambda: stored() == 200, "the first 200 stored")
        produce(messages[200:220])  # consumed, still open: past the stored offsets
        await until(lambda: len(pipeline.assembler) == 20, "20 more traces open")
        await lock.acquire()  # as a slow flush would hold it
        produce(messages[220:])
        await asyncio.wait_for(lock.waiting.wait(), timeout=120)  # the next batch is fetched and waits
        await source._recover(RuntimeError("the periodic flush failed"))  # seeks back to 200 stored
        lock.release()
        for _ in range(600):
            if stored() == len(traces):
                break
            now[0] += 10
            await asyncio.sleep(0.2)
        now[0] += 10
        await asyncio.sleep(1)  # a second chance for anything still open
    finally:
        producer.close()
        await source.stop()
        store.close()
    assert_stored_exactly_once(settings.store.path, traces, amendments=0)
