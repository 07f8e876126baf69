"""Refinement on refine workers: jobs out on the jobs topic, their ends back on the job-results topic.

The process that holds the log (with `--stages detect` and without `refine`) runs the refine stage
with `RemoteJobs`: a started job is read from the log and sent with its workflow's frozen modes to the
jobs topic (`job_messages.py`, keyed by workflow id); ends come back on the job-results topic, read
from the offsets in the refine stage's checkpoint, and the stage appends each job's steps and end once
(an end of a job no longer running is dropped: a job sent again after a crash, or run by two workers
around a rebalance). Several jobs may be out at once, one per workflow.

A refine worker (`cegraph run --stages refine`) runs each job it is given to its end with
`RefineWorker` and sends the end back (`connectors/kafka/jobs.py`); it commits a job's offset only
after its end is acknowledged, so a job whose worker died goes to the next one and is run again from
the start, as a job is in one process after a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cegraph.daemon.detect.detector import ModeClassifier
from cegraph.daemon.detect.failures_feed import Record, RecordSource, RecordTransport
from cegraph.daemon.detect.signature import TextEmbedder
from cegraph.daemon.events import Event
from cegraph.daemon.refine.job_messages import (
    JobMessageError,
    end_message,
    job_message,
    read_end,
    read_job,
    unreadable_job,
)
from cegraph.daemon.refine.jobs import EndedJob, run_job
from cegraph.daemon.refine.refiner import Job, JobReader, Refiner

log = logging.getLogger("cegraph.jobs")


class RemoteJobs:
    """The refine stage's executor when the jobs run on refine workers."""

    def __init__(
        self,
        reader: JobReader,
        frozen: Callable[[str], dict[str, Any]],
        jobs: RecordTransport,
        ends: RecordSource,
        *,
        batch: int = 50,
    ) -> None:
        self.reader = reader
        self.frozen = frozen  # a workflow's modes, frozen (`FailureDetector.frozen`)
        self.jobs = jobs
        self.ends = ends
        self.batch = batch
        self.offsets: dict[int, int] = {}

    def open(self, snapshot: dict[str, Any]) -> None:
        self.offsets = {int(p): o for p, o in snapshot.get("offsets", {}).items()}
        self.ends.open(self.offsets)

    def submit(self, job: Job) -> None:
        message = job_message(job, self.reader.read(job), self.frozen(job.workflow_id))
        self.jobs.send([Record(job.workflow_id.encode(), message)])

    def ended(self) -> list[EndedJob]:
        ended = []
        for partition, offset, value in self.ends.poll(self.batch):
            self.offsets[partition] = offset + 1
            try:
                ended.append(read_end(value))
            except JobMessageError as error:  # not ours to fix: skipped, and said so
                log.error("job-results partition %d offset %d skipped: %s", partition, offset, error)
        return ended

    def snapshot(self) -> dict[str, Any]:
        return {"offsets": {str(p): o for p, o in self.offsets.items()}}

    def close(self) -> None:
        self.jobs.close()
        self.ends.close()


class RefineWorker:
    """What a refine worker does with each job message: run it to its end, answer with the end."""

    def __init__(self, refiner: Refiner, embedder: Callable[[], TextEmbedder | None]) -> None:
        self.refiner = refiner
        self.embedder = embedder  # loaded only for modes made with sentence embeddings

    def handle(self, message: bytes) -> bytes | None:
        """The end message; None for a message with no job id to answer for (logged)."""
        try:
            job, inputs, frozen = read_job(message)
        except JobMessageError as error:
            job = unreadable_job(message)
            if job is None:
                log.error("a job message without a job id skipped: %s", error)
                return None
            return end_message(job.job_id, [], self.refiner.fail(job, str(error)))
        steps: list[Event] = []
        embedded = any(modes["featurizer"].get("embedded") for modes in frozen.values())
        try:
            classifier = ModeClassifier.of(frozen, self.embedder() if embedded else None)
        except ValueError as error:
            return end_message(job.job_id, [], self.refiner.fail(job, str(error)))
        end = run_job(self.refiner, job, inputs, classifier, steps.extend)
        return end_message(job.job_id, steps, end)
