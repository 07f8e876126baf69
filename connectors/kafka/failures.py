"""The Kafka side of the failures topic (`daemon/detect/failures_feed.py`): kafka-python's producer
(`acks=all`, every send of a step waited for) for ingest members, and a consumer that reads every
partition from the offsets the detect member's checkpoint holds (no consumer group: the checkpoint,
committed with the events, is where it stands)."""

from __future__ import annotations

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from cegraph.connectors.kafka.client import kafka_python_options
from cegraph.daemon.detect.failures_feed import Record
from cegraph.daemon.settings import KafkaSettings

SEND_TIMEOUT_S = 60.0
POLL_MS = 500


class KafkaRecordTransport:
    """`max_request_size`: the largest record it may send (kafka-python's default is 1 MB)."""

    def __init__(self, settings: KafkaSettings, topic: str, *, max_request_size: int = 1_048_576) -> None:
        self.settings, self.topic = settings, topic
        self.max_request_size = max_request_size
        self._producer: KafkaProducer | None = None

    def _open(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(
                **kafka_python_options(self.settings), acks="all", linger_ms=5,
                max_request_size=self.max_request_size,
            )  # fmt: skip
        return self._producer

    def partitions(self) -> int:
        found = self._open().partitions_for(self.topic)
        if not found:
            raise RuntimeError(f"topic {self.topic!r} has no partitions (does it exist?)")
        return len(found)

    def send(self, records: list[Record]) -> None:
        producer = self._open()
        futures = [
            producer.send(self.topic, key=record.key, value=record.value, partition=record.partition)
            for record in records
        ]
        producer.flush(timeout=SEND_TIMEOUT_S)
        for future in futures:
            future.get(timeout=SEND_TIMEOUT_S)  # raises what the broker refused

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None


class KafkaRecordSource:
    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.settings, self.topic = settings, topic
        self._consumer: KafkaConsumer | None = None

    def open(self, offsets: dict[int, int]) -> list[int]:
        self.close()
        consumer = KafkaConsumer(**kafka_python_options(self.settings), enable_auto_commit=False)
        partitions = sorted(consumer.partitions_for_topic(self.topic) or ())
        if not partitions:
            consumer.close()
            raise RuntimeError(f"topic {self.topic!r} has no partitions (does it exist?)")
        assigned = [TopicPartition(self.topic, p) for p in partitions]
        consumer.assign(assigned)
        fresh = [tp for tp in assigned if tp.partition not in offsets]
        if fresh:
            consumer.seek_to_beginning(*fresh)
        for tp in assigned:
            if tp.partition in offsets:
                consumer.seek(tp, offsets[tp.partition])
        self._consumer = consumer
        return partitions

    def poll(self, max_records: int) -> list[tuple[int, int, bytes]]:
        assert self._consumer is not None, "open() first"
        batches = self._consumer.poll(timeout_ms=POLL_MS, max_records=max_records)
        return [
            (record.partition, record.offset, record.value or b"")
            for records in batches.values()
            for record in records
        ]

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
