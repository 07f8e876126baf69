"""The Kafka side of the outbox publisher (`daemon/outbox.py`): kafka-python's producer with
`acks=all`, each send waited for; the entry's id travels in the `cegraph.outbox.id` header so a
restarted publisher can tell what the topic already holds."""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaProducer

from cegraph.connectors.kafka.client import kafka_python_options, read_topic
from cegraph.daemon.outbox import ID_HEADER, Location, OutboxEntry
from cegraph.daemon.settings import KafkaSettings

SEND_TIMEOUT_S = 30.0


class KafkaTransport:
    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._producer: KafkaProducer | None = None

    def send(self, entry: OutboxEntry) -> Location:
        if self._producer is None:
            self._producer = KafkaProducer(**kafka_python_options(self.settings), acks="all")
        headers = [(ID_HEADER, entry.id.encode()), *((k, v.encode()) for k, v in entry.headers.items())]
        future = self._producer.send(self.topic, key=entry.key.encode(), value=entry.value, headers=headers)
        metadata = future.get(timeout=SEND_TIMEOUT_S)
        return Location(self.topic, metadata.partition, metadata.offset)

    def on_topic(self) -> Iterable[tuple[dict[str, str], bytes, Location]]:
        for record in read_topic(self.settings, self.topic):
            headers = {key: value.decode(errors="replace") for key, value in record.headers or ()}
            yield headers, record.value or b"", Location(self.topic, record.partition, record.offset)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None
