"""The Kafka side of refine workers (`daemon/refine/remote.py`): the jobs topic read in a consumer group
(`<group id>.refine`), one job at a time, its end sent to the job-results topic, and the job's offset
committed once the broker has acknowledged the end.

A job may run for minutes. While it runs, the worker keeps polling with its partitions paused, so it
stays in the group (kafka-python's `max_poll_interval_ms` counts between polls); a partition assigned
to it meanwhile is paused too and read from where it was. A rebalance that takes the job's partition
away hands the job to another worker, which runs it again: the refine stage keeps the first end.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from cegraph.connectors.kafka.client import kafka_python_options
from cegraph.connectors.kafka.failures import KafkaRecordTransport
from cegraph.daemon.detect.failures_feed import Record
from cegraph.daemon.refine.remote import RefineWorker
from cegraph.daemon.settings import KafkaSettings

log = logging.getLogger("cegraph.jobs")

POLL_MS = 500
MAX_JOB_BYTES = 16 * 1024 * 1024  # a job carries its workflow's frozen modes: more than Kafka's 1 MB


def worker_group(settings: KafkaSettings) -> str:
    return f"{settings.group_id}.refine"


class KafkaRefineWorker:
    def __init__(self, settings: KafkaSettings, worker: RefineWorker) -> None:
        self.settings = settings
        self.worker = worker
        self.done = 0  # jobs answered
        self.running: str | None = None  # the job's key while one runs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cegraph-refine-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop between polls; a job still running is left uncommitted, for the next worker."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        consumer = KafkaConsumer(
            self.settings.jobs_topic,
            **kafka_python_options(self.settings),
            group_id=worker_group(self.settings),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=1,
            session_timeout_ms=self.settings.session_timeout_ms,
            heartbeat_interval_ms=max(self.settings.session_timeout_ms // 3, 100),
        )
        results = KafkaRecordTransport(self.settings, self.settings.job_results_topic)
        try:
            while not self._stop.is_set():
                for partition, records in consumer.poll(timeout_ms=POLL_MS, max_records=1).items():
                    for record in records:
                        self._job(consumer, results, partition, record)
        finally:
            consumer.close()
            results.close()

    def _job(
        self, consumer: KafkaConsumer, results: KafkaRecordTransport, partition: TopicPartition, record: Any
    ) -> None:
        self.running = (record.key or b"").decode(errors="replace")
        answer: list[bytes | None] = []
        thread = threading.Thread(target=lambda: answer.append(self.worker.handle(record.value)), daemon=True)
        consumer.pause(*consumer.assignment())
        thread.start()
        while thread.is_alive() and not self._stop.is_set():
            for stray, records in consumer.poll(timeout_ms=POLL_MS).items():
                consumer.seek(stray, records[0].offset)  # assigned while the job ran: read it later
            consumer.pause(*consumer.assignment())
        if not answer:
            return  # stopping: the job is not committed and goes to the next worker
        if answer[0] is not None:
            results.send([Record(record.key or b"", answer[0])])
        try:
            consumer.commit({partition: OffsetAndMetadata(record.offset + 1, None, -1)})
        except KafkaError as error:  # the partition moved on: its next owner runs the job again
            log.warning("job at %s offset %d not committed: %s", partition, record.offset, error)
        self.done += 1
        self.running = None  # the job was this worker's until its offset was committed
        consumer.resume(*consumer.paused())
