"""Publishes the outbox's patches to `cegraph.patches`, keyed by workflow id, exactly once.

Per patch: send, wait for the broker's acknowledgement, then record `PatchPublished` with the
offset. A crash between the acknowledgement and the record would send the patch again, so before
its first send a publisher reads the topic from the beginning to its current end and records the
patches it finds there (by workflow, version and content hash) as published. One publisher per
store (the daemon is one process), so nothing else sends from the same outbox meanwhile.
"""

from __future__ import annotations

import logging
import threading

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pydantic import ValidationError

from cegraph.connectors.kafka.client import kafka_python_options
from cegraph.daemon.refine.patch_outbox import PatchOutbox, patch_id
from cegraph.daemon.settings import KafkaSettings
from cegraph.schemas.patch import WorkflowPatch

log = logging.getLogger("cegraph.publisher")


class KafkaPatchPublisher:
    def __init__(
        self, settings: KafkaSettings, outbox: PatchOutbox, *, poll_s: float = 1.0, on_publish=None
    ) -> None:
        self.settings = settings
        self.topic = settings.patches_topic
        self.outbox = outbox
        self.poll_s = poll_s
        self.on_publish = on_publish
        self._producer: KafkaProducer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cegraph-publisher", daemon=True)

    def recover(self) -> int:
        """Record as published the outbox's patches already on the topic; returns how many."""
        waiting = {patch_id(patch): patch for patch in self.outbox.pending()}
        if not waiting:
            return 0
        consumer = KafkaConsumer(**kafka_python_options(self.settings), enable_auto_commit=False)
        try:
            partitions = [
                TopicPartition(self.topic, p) for p in sorted(consumer.partitions_for_topic(self.topic) or [])
            ]
            consumer.assign(partitions)
            consumer.seek_to_beginning()
            ends = consumer.end_offsets(partitions)
            found = 0
            while any(consumer.position(tp) < ends[tp] for tp in partitions):
                for tp, records in consumer.poll(timeout_ms=1_000).items():
                    for record in records:
                        try:
                            patch = WorkflowPatch.model_validate(orjson.loads(record.value))
                        except (orjson.JSONDecodeError, ValidationError):
                            continue
                        if patch_id(patch) in waiting:
                            self.outbox.published(
                                waiting.pop(patch_id(patch)), self.topic, tp.partition, record.offset
                            )
                            found += 1
            return found
        finally:
            consumer.close()

    def publish_due(self) -> list[WorkflowPatch]:
        if self._producer is None:
            self._producer = KafkaProducer(**kafka_python_options(self.settings), acks="all")
        sent = []
        for patch in self.outbox.due():
            value = orjson.dumps(patch.model_dump(mode="json", by_alias=True))
            metadata = self._producer.send(self.topic, key=patch.workflow_id.encode(), value=value).get(
                timeout=30
            )
            self.outbox.published(patch, self.topic, metadata.partition, metadata.offset)
            log.info("published %s@%s to %s at offset %d", patch.workflow_id, patch.new_version, self.topic,
                     metadata.offset)  # fmt: skip
            sent.append(patch)
            if self.on_publish is not None:
                self.on_publish(patch)
        return sent

    def start(self) -> None:
        self.recover()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._producer is not None:
            self._producer.close(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish_due()
            except Exception:  # Kafka unreachable, a timeout: the patches stay in the outbox
                log.exception("publishing patches to %s", self.topic)
            self._stop.wait(self.poll_s)
