"""Follows `cegraph.patches` and `cegraph.rollouts` for a service that runs workflows (`cegraph simulate`).

Every replica of a service must see every decision, so there is no consumer group: the consumer takes
all partitions of both topics and starts at their end (decisions published while it runs). kafka-python
is synchronous, so it polls on a thread of its own; a message that does not parse, or a handler that
raises, is logged and skipped, never fatal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from pydantic import BaseModel, ValidationError

from cegraph.connectors.kafka.client import kafka_python_options
from cegraph.daemon.settings import KafkaSettings
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.rollout import RolloutDecision

log = logging.getLogger("cegraph.decisions")


class DecisionConsumer:
    def __init__(
        self,
        settings: KafkaSettings,
        *,
        on_patch: Callable[[WorkflowPatch], Any],
        on_rollout: Callable[[RolloutDecision], Any],
    ) -> None:
        self._settings = settings
        self._handlers: dict[str, tuple[type[BaseModel], Callable[[Any], Any]]] = {
            settings.patches_topic: (WorkflowPatch, on_patch),
            settings.rollouts_topic: (RolloutDecision, on_rollout),
        }
        self._stop = threading.Event()
        self._consumer: KafkaConsumer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Assign every partition of both topics at its current end; returns once positioned, so a
        decision published after `start` returns is seen. The topics must exist."""
        consumer = KafkaConsumer(**kafka_python_options(self._settings), enable_auto_commit=False)
        partitions = []
        for topic in self._handlers:
            found = consumer.partitions_for_topic(topic)
            if not found:
                consumer.close()
                raise RuntimeError(f"topic {topic!r} does not exist")
            partitions += [TopicPartition(topic, partition) for partition in sorted(found)]
        consumer.assign(partitions)
        consumer.seek_to_end()
        for partition in partitions:
            consumer.position(partition)  # resolve the end offsets now, not at the first poll
        self._consumer = consumer
        self._thread = threading.Thread(target=self._run, name="cegraph-decisions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._consumer is not None:
            self._consumer.close()

    def _run(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            try:
                batches = self._consumer.poll(timeout_ms=200)
            except Exception:
                log.exception("polling the decision topics failed; retrying")
                self._stop.wait(1.0)
                continue
            for records in batches.values():
                for record in records:
                    self._handle(record.topic, record.offset, record.value)

    def _handle(self, topic: str, offset: int, value: bytes | None) -> None:
        model, handler = self._handlers[topic]
        try:
            message = model.model_validate_json(value or b"")
        except ValidationError as error:
            log.warning("%s@%d ignored: not a %s: %s", topic, offset, model.__name__, error)
            return
        try:
            handler(message)
        except Exception:
            log.exception("handling %s@%d failed", topic, offset)
