"""Refinement jobs: triggers from the density stage become Propose-and-Verify jobs, off the ingest path.

The refine stage (a `Stage`, `daemon/stage.py`) reads `ModeMassCrossed` triggers from the log after
its checkpoint; the checkpoint's snapshot holds the triggers waiting for their turn (of several of one
workflow version and mode only the latest counts) and the job it started and has not finished. One
step starts a job (`RefinementStarted`), the next runs it to its end and appends the end (its patch in
the outbox, `RefinementFinished`) with the checkpoint: a job a crash interrupted is run again from the
start, and ends once. Its steps on the way (`CandidateVerified`, `ProposalRejected`) are appended as
they happen, so a job run again records them again. Where a job runs is the stage's executor: here,
one at a time on the stage's thread (`LocalJobs`), or on refine workers behind the jobs topic, one per
workflow out at once (`RemoteJobs`, `daemon/refine/remote.py`). When a trigger may start is the
`RefinementScheduler`'s policy, read from the log alone: a workflow gets no new job until
`cooldown_s` after its last one ended (a job that waited or was skipped sets no cooldown:
`NO_COOLDOWN`), or while one of its changes is in flight. A job that ends
"waiting" (too few counterexamples to choose and confirm a patch on) is kept in the checkpoint and
becomes a trigger again once that many more failures of its mode are in the log: the detector's
trigger, disarmed by the first crossing, would not fire again while the mode's mass stays high.
Ingest only appends to the log and never waits for a job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from cegraph.daemon.detect.detector import ModeClassifier
from cegraph.daemon.detect.stage import detected_until, target_modes
from cegraph.daemon.events import (
    CANARY_DECIDED,
    CANARY_STARTED,
    FAILURE_OBSERVED,
    MODE_MASS_CROSSED,
    PATCH_CREATED,
    REFINEMENT_FINISHED,
    REFINEMENT_STARTED,
    CanaryDecidedPayload,
    CanaryStartedPayload,
    Event,
    FailureObservedPayload,
    PatchCreatedPayload,
    RefinementFinishedPayload,
    RefinementStartedPayload,
)
from cegraph.daemon.metrics import RefinementMetrics
from cegraph.daemon.refine.patch_outbox import created
from cegraph.daemon.refine.refiner import Job, JobEnd, JobInputs, JobReader, Record, Refiner
from cegraph.daemon.refine.signing import sign
from cegraph.daemon.stage import Checkpoint, Step
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import WorkflowRegistry, version_key

log = logging.getLogger("cegraph.jobs")

_S, _F = RefinementStartedPayload, RefinementFinishedPayload
_C, _D = CanaryStartedPayload, CanaryDecidedPayload
# Stores written before the refine stage had a checkpoint: the triggers that already had a job, and
# the job a crash interrupted.
STARTED = f"""
SELECT {_S.sql("workflow_id")}, {_S.sql("workflow_version")}, {_S.sql("mode")},
       max({_S.sql("trigger_seq", "BIGINT")})
FROM events WHERE type = '{REFINEMENT_STARTED}' GROUP BY 1, 2, 3
"""
UNFINISHED = f"""
SELECT s.payload FROM events s
WHERE s.type = '{REFINEMENT_STARTED}' AND NOT EXISTS (
    SELECT 1 FROM events f
    WHERE f.type = '{REFINEMENT_FINISHED}'
      AND {_F.sql("job_id", of="f.payload")} = {_S.sql("job_id", of="s.payload")}
)
ORDER BY s.seq LIMIT 1
"""
# The stable version: the newest of the last stable execution's and every promoted canary's. Right
# after a promotion, executions of the version it replaced are still arriving (in flight, or behind
# in ingest), so the executions alone would name the superseded version for a while.
STABLE_VERSIONS = f"""
(SELECT workflow_version FROM executions
 WHERE workflow_id = $1 AND track IN ('stable', '') ORDER BY seq DESC LIMIT 1)
UNION
SELECT {_D.sql("version")} FROM events
WHERE type = '{CANARY_DECIDED}' AND {_D.sql("workflow_id")} = $1 AND {_D.sql("decision")} = 'promote'
"""
CANARY_RUNNING = f"""
SELECT count(*) FROM events s
WHERE s.type = '{CANARY_STARTED}' AND {_C.sql("workflow_id", of="s.payload")} = ? AND NOT EXISTS (
    SELECT 1 FROM events d WHERE d.type = '{CANARY_DECIDED}' AND d.key = s.key
)
"""
_NEW_VERSION = f"{PatchCreatedPayload.json('patch', of='c.payload')}->>'new_version'"
UNDEPLOYED_PATCHES = f"""
SELECT {_NEW_VERSION}, {PatchCreatedPayload.sql("created_at", "DOUBLE", of="c.payload")} FROM events c
WHERE c.type = '{PATCH_CREATED}' AND c.key = ? AND NOT EXISTS (
    SELECT 1 FROM events d
    WHERE d.type = '{CANARY_DECIDED}' AND {_D.sql("workflow_id", of="d.payload")} = c.key
      AND {_D.sql("version", of="d.payload")} = {_NEW_VERSION}
)
"""
FRUITLESS_MASS = f"""
SELECT max({_S.sql("mass", "DOUBLE", of="s.payload")}) FROM events f
JOIN events s ON s.type = '{REFINEMENT_STARTED}'
    AND {_S.sql("job_id", of="s.payload")} = {_F.sql("job_id", of="f.payload")}
WHERE f.type = '{REFINEMENT_FINISHED}' AND {_F.sql("outcome", of="f.payload")} = 'no_patch'
  AND {_F.sql("workflow_id", of="f.payload")} = ? AND {_F.sql("mode", of="f.payload")} = ?
"""
RETRY_FACTOR = 1.5  # a mode no candidate helped gets a new job once its mass is this much higher
# Ends after which the workflow does not cool down: the job changed nothing and spent nothing. A job
# that waits ran no replay (too few counterexamples); a skipped one found its version unregistered,
# which no pause mends (registering it does), and it would hold back the other modes' jobs.
NO_COOLDOWN = ("waiting", "skipped")
LAST_FINISHED = f"""
SELECT {_F.sql("workflow_id")}, max({_F.sql("finished_at", "DOUBLE")})
FROM events WHERE type = '{REFINEMENT_FINISHED}' AND {_F.sql("outcome")} NOT IN {NO_COOLDOWN} GROUP BY 1
"""
# the seq of the `$5`-th failure of the mode (or a mode merged into it) after seq `$4`
_O = FailureObservedPayload
NTH_FAILURE = f"""
SELECT seq FROM events
WHERE type = '{FAILURE_OBSERVED}' AND seq > $4 AND {_O.sql("workflow_id")} = $1
  AND {_O.sql("workflow_version")} = $2 AND list_contains($3, {_O.sql("mode")})
ORDER BY seq LIMIT 1 OFFSET $5 - 1
"""


class RefinementScheduler:
    """When a waiting trigger may start, from the log alone."""

    def __init__(
        self,
        store: EventStore,
        *,
        cooldown_s: float,
        deploy_wait_s: float = 3_600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cooldown_s = cooldown_s
        self.deploy_wait_s = deploy_wait_s
        self.clock = clock

    def may_start(self, trigger: dict[str, Any]) -> bool:
        """One change at a time: a trigger waits while its workflow cools down after a job, has a
        canary being judged, or has a patch that is neither decided nor running as the stable version
        yet (for at most `deploy_wait_s` after its creation: a patch nobody deploys does not stop
        refinement for ever). Only the stable version is refined: a trigger of a canary's version waits
        for its promotion, one of an older version never starts. A mode whose last job found nothing
        waits until its mass is `RETRY_FACTOR` times higher."""
        workflow = trigger["workflow_id"]
        now = self.clock()
        last = dict(self.store.query(LAST_FINISHED))
        if now < (last.get(workflow) or -float("inf")) + self.cooldown_s:
            return False
        if self.store.query(CANARY_RUNNING, workflow)[0][0]:
            return False
        stable = self.stable_version(workflow)
        if stable is not None and stable != trigger["workflow_version"]:
            return False  # a canary's mode waits for its promotion; an old version's is superseded
        if self._awaits_deployment(workflow, stable, now):
            return False
        [(fruitless,)] = self.store.query(FRUITLESS_MASS, workflow, trigger["mode"])
        return fruitless is None or (trigger.get("mass") or 0.0) >= RETRY_FACTOR * fruitless

    def stable_version(self, workflow: str) -> str | None:
        versions = [version for (version,) in self.store.query(STABLE_VERSIONS, workflow) if version]
        return max(versions, key=version_key) if versions else None

    def _awaits_deployment(self, workflow: str, stable: str | None, now: float) -> bool:
        for version, created_at in self.store.query(UNDEPLOYED_PATCHES, workflow):
            deployed = stable is not None and version_key(stable) >= version_key(version)
            if not deployed and now < created_at + self.deploy_wait_s:
                return True
        return False


def _key(trigger: dict[str, Any]) -> str:
    return f"{trigger['workflow_id']}@{trigger['workflow_version']}/{trigger['mode']}"


class JobExecutor(Protocol):
    """Where jobs run: in this process (`LocalJobs`), or on refine workers behind the jobs topic
    (`RemoteJobs`, `daemon/refine/remote.py`)."""

    def open(self, snapshot: dict[str, Any]) -> None:
        """From what `snapshot()` returned at the refine stage's last checkpoint."""
        ...

    def submit(self, job: Job) -> JobEnd | None:
        """Run or send the job: its end when it ended here, None when `ended()` will bring it."""
        ...

    def ended(self) -> list[EndedJob]:
        """Ends of sent jobs that came back since the last call (any job, possibly twice)."""
        ...

    def snapshot(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EndedJob:
    job_id: str
    steps: list[Event]  # its steps on the way, recorded where it ran
    end: JobEnd


class LocalJobs:
    """Jobs run here, to their end, on the refine stage's thread; their steps go to the log as they
    happen."""

    def __init__(
        self, reader: JobReader, refiner: Refiner, classifier: Callable[[str], ModeClassifier]
    ) -> None:
        self.reader = reader
        self.refiner = refiner
        self.classifier = classifier

    def open(self, snapshot: dict[str, Any]) -> None:
        return None

    def submit(self, job: Job) -> JobEnd:
        return run_job(self.refiner, job, self.reader.read(job), self.classifier(job.workflow_id),
                       self.reader.store.append)  # fmt: skip

    def ended(self) -> list[EndedJob]:
        return []

    def snapshot(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        return None


def run_job(
    refiner: Refiner, job: Job, inputs: JobInputs, classifier: ModeClassifier, record: Record
) -> JobEnd:
    """A job to its end, wherever it runs: an exception (a bug, an outage) ends the job, not the stage."""
    try:
        return asyncio.run(refiner.run(job, inputs, classifier, record))
    except Exception as error:
        log.exception("refinement job %s failed", job.job_id)
        return refiner.fail(job, f"{type(error).__name__}: {error}")


class RefinementStage:
    name = "refine"

    def __init__(
        self,
        scheduler: RefinementScheduler,
        jobs: JobExecutor,
        registry: WorkflowRegistry,
        *,
        signing_key: str | None = None,
        metrics: RefinementMetrics | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.store = scheduler.store
        self.jobs = jobs
        self.registry = registry
        self.signing_key = signing_key
        self.metrics = metrics
        self.position = 1
        self.waiting: dict[str, dict[str, Any]] = {}  # key -> the latest trigger (its payload and seq)
        self.running: dict[str, dict[str, Any]] = {}  # job id -> its `RefinementStarted` payload
        self.sent: set[str] = set()  # running jobs handed to the executor (sent to workers)
        # key -> a job that ended waiting: its trigger and the failures of its mode it waits for
        self.deferred: dict[str, dict[str, Any]] = {}
        self.skip: dict[str, int] = {}  # key -> trigger seq a job already started from (old stores)

    def open(self, checkpoint: Checkpoint) -> None:
        snapshot = checkpoint.snapshot
        self.position = checkpoint.position
        self.waiting = dict(snapshot.get("waiting", {}))
        running = snapshot.get("running")
        if isinstance(running, dict) and "job_id" in running:  # a checkpoint of one job at a time
            running = {running["job_id"]: running}
        self.running = dict(running or {})
        self.sent = set(snapshot.get("sent", []))
        self.deferred = dict(snapshot.get("deferred", {}))
        self.jobs.open(snapshot.get("jobs", {}))
        self.skip = {}
        if checkpoint.position == 1 and not snapshot:  # a store from before the checkpoint
            self.skip = {f"{w}@{v}/{m}": seq for w, v, m, seq in self.store.query(STARTED)}
            unfinished = self.store.query(UNFINISHED)
            if unfinished:
                payload = orjson.loads(unfinished[0][0])
                self.running = {payload["job_id"]: payload}
        self._gauge()

    def poll(self) -> Step | None:
        """Hand a started job to the executor (here: run it to its end); else take in the ends that
        came back; else take in new triggers and start the first that may."""
        for job_id, payload in self.running.items():
            if job_id in self.sent:
                continue
            end = self.jobs.submit(Job.of(payload))
            if end is None:
                self.sent.add(job_id)
                return Step([], self._checkpoint())
            return Step(self._end(job_id, end), self._checkpoint())
        events: list[Event] = []
        for ended in self.jobs.ended():
            if ended.job_id in self.running:  # else ended already: sent twice, or run by two workers
                events += ended.steps + self._end(ended.job_id, ended.end)
        if events:
            return Step(events, self._checkpoint())
        last = self.store.last_seq()
        for seq, payload in self.store.query(
            "SELECT seq, payload FROM events WHERE type = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            MODE_MASS_CROSSED, self.position, last,
        ):  # fmt: skip
            trigger = {**orjson.loads(payload), "seq": seq}
            if seq > self.skip.get(_key(trigger), 0):
                self.waiting[_key(trigger)] = trigger  # the later trigger supersedes the earlier
                self.deferred.pop(_key(trigger), None)
        self._rearm()
        moved, self.position = self.position != last + 1, last + 1
        busy = {job["workflow_id"] for job in self.running.values()}
        for key, trigger in sorted(self.waiting.items(), key=lambda item: item[1]["seq"]):
            if trigger["workflow_id"] not in busy and self.scheduler.may_start(trigger):
                del self.waiting[key]
                started = RefinementStartedPayload(
                    job_id=f"job-{trigger['seq']}", trigger_seq=trigger["seq"],
                    workflow_id=trigger["workflow_id"], workflow_version=trigger["workflow_version"],
                    mode=trigger["mode"], until_seq=detected_until(self.store), mass=trigger.get("mass"),
                    description=trigger.get("description") or {}, joined=trigger.get("joined") or [],
                ).event(trigger["workflow_id"])  # fmt: skip
                self.running[started.payload["job_id"]] = started.payload
                self._gauge()
                return Step([started], self._checkpoint())
        return Step([], self._checkpoint()) if moved else None

    def close(self) -> None:
        self.jobs.close()

    def _rearm(self) -> None:
        """A deferred job whose mode has had the failures it waits for becomes a trigger again, dated
        by the last of them (so its job gets an id of its own)."""
        for key, deferred in list(self.deferred.items()):
            trigger = deferred["trigger"]
            family = target_modes(self.store, trigger["mode"], trigger.get("joined") or ())
            found = self.store.query(
                NTH_FAILURE, trigger["workflow_id"], trigger["workflow_version"], family,
                deferred["after_seq"], deferred["failures"],
            )  # fmt: skip
            if found:
                del self.deferred[key]
                self.waiting.setdefault(key, {**trigger, "seq": found[0][0]})

    def _checkpoint(self) -> Checkpoint:
        snapshot = {
            "waiting": self.waiting, "running": self.running, "sent": sorted(self.sent),
            "deferred": self.deferred,
        }  # fmt: skip
        return Checkpoint(self.position, {**snapshot, "jobs": self.jobs.snapshot()})

    def _end(self, job_id: str, end: JobEnd) -> list[Event]:
        """The events that end a job: its spec registered, its patch signed into the outbox, its end."""
        started = self.running.pop(job_id)
        self.sent.discard(job_id)
        if end.finished["outcome"] == "waiting":
            fields = ("workflow_id", "workflow_version", "mode", "mass", "description", "joined")
            trigger = {name: started.get(name) for name in fields}
            waits = {"after_seq": started["until_seq"], "failures": end.finished["waiting_for"]}
            self.deferred[_key(trigger)] = {"trigger": trigger, **waits}
        self._gauge()
        events = []
        if end.patch is not None and end.spec is not None:
            self.registry.register(end.spec)  # idempotent: a job ended again registers the same content
            patch = sign(end.patch, self.signing_key) if self.signing_key else end.patch
            events.append(created(job_id, patch))
        if self.metrics is not None:
            self.metrics.record(end.finished)
        return [*events, Event(REFINEMENT_FINISHED, end.finished["workflow_id"], end.finished)]

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(len(self.running))
