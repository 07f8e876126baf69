"""Refinement jobs on a refine worker, in one process over in-memory topics: a job run by a worker from
its job message ends exactly as the same job run next to the log, and the refine stage keeps one end
of a job however often it comes back. The real broker and real worker processes are in
tests/daemon/test_scale_out_kafka.py."""

from __future__ import annotations

import asyncio

import orjson
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from refinement_fixtures import ARITHMETIC_SLIP, run_tasks

from cegraph.daemon.app import build_refiner
from cegraph.daemon.detect.failures_feed import Record
from cegraph.daemon.embedded import EmbeddedDaemon
from cegraph.daemon.events import CANDIDATE_VERIFIED, PATCH_CREATED, REFINEMENT_FINISHED
from cegraph.daemon.refine.job_messages import job_message, read_end, read_job
from cegraph.daemon.refine.jobs import LocalJobs
from cegraph.daemon.refine.refiner import Job
from cegraph.daemon.refine.remote import RefineWorker, RemoteJobs
from cegraph.daemon.settings import load_settings

KEY = "remote-test-key"


class Topic:
    """One partition in memory; `source()` reads it from an offset, as the refine stage's reader does."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    def partitions(self) -> int:
        return 1

    def send(self, records: list[Record]) -> None:
        self.values += [record.value for record in records]

    def close(self) -> None:
        return None

    def source(self) -> TopicReader:
        return TopicReader(self)


class TopicReader:
    def __init__(self, topic: Topic) -> None:
        self.topic, self.next = topic, 0

    def open(self, offsets: dict[int, int]) -> list[int]:
        self.next = offsets.get(0, 0)
        return [0]

    def poll(self, max_records: int) -> list[tuple[int, int, bytes]]:
        taken = self.topic.values[self.next : self.next + max_records]
        start, self.next = self.next, self.next + len(taken)
        return [(0, start + i, value) for i, value in enumerate(taken)]

    def close(self) -> None:
        return None


def recorded(tmp_path, name: str) -> EmbeddedDaemon:
    settings = load_settings(
        store={"path": str(tmp_path / f"{name}.duckdb")},
        publisher={"signing_key": KEY},
        detector={"latency_trait": False},  # a span's duration is the machine's pace: two runs would differ
    )
    daemon = EmbeddedDaemon(settings)
    daemon.registry.register(ARITHMETIC_SLIP)
    asyncio.run(run_tasks(ARITHMETIC_SLIP, range(600), SimpleSpanProcessor(daemon.exporter())))
    daemon.pump(drain=True)
    return daemon


def ended(daemon: EmbeddedDaemon) -> dict:
    """What a job left in the log, minus what the clock says."""
    rows = daemon.store.query(
        "SELECT type, payload FROM events WHERE type IN (?, ?, ?) ORDER BY seq",
        CANDIDATE_VERIFIED, PATCH_CREATED, REFINEMENT_FINISHED,
    )  # fmt: skip
    out: dict = {}
    for kind, payload in rows:
        body = orjson.loads(payload)
        body.pop("finished_at", None)
        body.pop("created_at", None)
        body.get("cost", {}).pop("wall_s", None)
        patch = body.get("patch") or {}
        (patch.get("rationale") or {}).get("cost", {}).pop("wall_s", None)
        patch.pop("signature", None)  # over the rationale, so over its wall time
        out.setdefault(kind, []).append(body)
    return out


def test_a_job_run_by_a_refine_worker_ends_as_it_does_next_to_the_log(tmp_path):
    here, there = recorded(tmp_path, "here"), recorded(tmp_path, "there")
    try:
        assert [job["outcome"] for job in here.refine()] == ["patched"]

        jobs, ends = Topic(), Topic()
        local = there.refine_stage.jobs
        assert isinstance(local, LocalJobs)
        remote = RemoteJobs(local.reader, there.stage.frozen, jobs, ends.source())
        remote.open({})
        there.refine_stage.jobs = remote
        worker = RefineWorker(build_refiner(there.settings), lambda: None)
        assert there.refine() == []  # started and sent: nothing has ended here
        [message] = jobs.values
        job, inputs, _ = read_job(message)
        assert job.workflow_id == "arithmetic-slip" and len(inputs.sample.of("target")) >= 5
        answer = worker.handle(message)
        assert answer is not None
        ends.send([Record(b"arithmetic-slip", answer), Record(b"arithmetic-slip", answer)])  # twice
        [finished] = there.refine()
        assert finished["outcome"] == "patched"
        assert there.refine() == []  # the second copy of the end is dropped
        assert ended(there) == ended(here)
        assert len(ended(here)[CANDIDATE_VERIFIED]) >= 1
        [published] = there.publish()
        assert published.signature  # signed where the log is, not by the worker
    finally:
        here.close()
        there.close()


def test_a_job_a_worker_cannot_read_or_run_ends_failed_with_the_reason(tmp_path):
    daemon = recorded(tmp_path, "daemon")
    try:
        worker = RefineWorker(build_refiner(daemon.settings), lambda: None)
        assert worker.handle(b"not a job") is None
        job = Job("job-7", "arithmetic-slip", "1.0.0", "m1@arithmetic-slip", daemon.stage.cursor, {})
        reader = daemon.refine_stage.jobs.reader
        frozen = daemon.stage.frozen("arithmetic-slip")
        frozen["arithmetic-slip"]["featurizer"]["embedded"] = True  # modes made with sentence embeddings
        answer = worker.handle(job_message(job, reader.read(job), frozen))
        assert answer is not None
        end = read_end(answer)
        assert end.job_id == "job-7" and end.end.finished["outcome"] == "failed" and end.steps == []
        assert "CEGRAPH_DETECTOR__TEXT_FEATURES" in end.end.finished["reason"]
    finally:
        daemon.close()
