"""Refinement jobs: triggers from the density stage become Propose-and-Verify jobs, off the ingest path.

The refine stage (a `Stage`, `daemon/stage.py`) reads `ModeMassCrossed` triggers from the log after
its checkpoint; the checkpoint's snapshot holds the triggers waiting for their turn (of several of one
workflow version and mode only the latest counts) and the job it started and has not finished. One
step starts a job (`RefinementStarted`), the next runs it to its end and appends the end (its patch in
the outbox, `RefinementFinished`) with the checkpoint: a job a crash interrupted is run again from the
start, and ends once. Its steps on the way (`CandidateVerified`, `ProposalRejected`) are appended as
they happen, so a job run again records them again. Jobs run one at a time, on the stage's thread;
when a trigger may start is the `RefinementScheduler`'s policy, read from the log alone: a workflow
gets no new job until `cooldown_s` after its last one ended, or while one of its changes is in
flight. Ingest only appends to the log and never waits for a job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from cegraph.daemon.detect.detector import ModeClassifier
from cegraph.daemon.detect.stage import detected_until
from cegraph.daemon.events import (
    CANARY_DECIDED,
    CANARY_STARTED,
    MODE_MASS_CROSSED,
    PATCH_CREATED,
    REFINEMENT_FINISHED,
    REFINEMENT_STARTED,
    CanaryDecidedPayload,
    CanaryStartedPayload,
    PatchCreatedPayload,
    RefinementFinishedPayload,
    RefinementStartedPayload,
)
from cegraph.daemon.metrics import RefinementMetrics
from cegraph.daemon.refine.refiner import Job, JobEnd, Refiner
from cegraph.daemon.stage import Checkpoint, Step
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import version_key

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
LAST_FINISHED = f"""
SELECT {_F.sql("workflow_id")}, max({_F.sql("finished_at", "DOUBLE")})
FROM events WHERE type = '{REFINEMENT_FINISHED}' GROUP BY 1
"""


def _job(payload: dict[str, Any]) -> Job:
    return Job(
        payload["job_id"], payload["workflow_id"], payload["workflow_version"], payload["mode"],
        payload["until_seq"], payload.get("description") or {},
    )  # fmt: skip


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


class RefinementStage:
    name = "refine"

    def __init__(
        self,
        scheduler: RefinementScheduler,
        refiner: Refiner,
        classifier: Callable[[], ModeClassifier],
        *,
        metrics: RefinementMetrics | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.store = scheduler.store
        self.refiner = refiner
        self.classifier = classifier
        self.metrics = metrics
        self.position = 1
        self.waiting: dict[str, dict[str, Any]] = {}  # key -> the latest trigger (its payload and seq)
        self.running: dict[str, Any] | None = None  # the started job's `RefinementStarted` payload
        self.skip: dict[str, int] = {}  # key -> trigger seq a job already started from (old stores)

    def open(self, checkpoint: Checkpoint) -> None:
        self.position = checkpoint.position
        self.waiting = dict(checkpoint.snapshot.get("waiting", {}))
        self.running = checkpoint.snapshot.get("running")
        self.skip = {}
        if checkpoint.position == 1 and not checkpoint.snapshot:  # a store from before the checkpoint
            self.skip = {f"{w}@{v}/{m}": seq for w, v, m, seq in self.store.query(STARTED)}
            unfinished = self.store.query(UNFINISHED)
            self.running = orjson.loads(unfinished[0][0]) if unfinished else None

    def poll(self) -> Step | None:
        """Run the started job to its end; else take in new triggers and start the first that may."""
        if self.running is not None:
            end = self._run(_job(self.running))
            self.running = None
            return Step(end.events, self._checkpoint())
        last = self.store.last_seq()
        for seq, payload in self.store.query(
            "SELECT seq, payload FROM events WHERE type = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            MODE_MASS_CROSSED, self.position, last,
        ):  # fmt: skip
            trigger = {**orjson.loads(payload), "seq": seq}
            if seq > self.skip.get(_key(trigger), 0):
                self.waiting[_key(trigger)] = trigger  # the later trigger supersedes the earlier
        moved, self.position = self.position != last + 1, last + 1
        for key, trigger in sorted(self.waiting.items(), key=lambda item: item[1]["seq"]):
            if self.scheduler.may_start(trigger):
                del self.waiting[key]
                started = RefinementStartedPayload(
                    job_id=f"job-{trigger['seq']}", trigger_seq=trigger["seq"],
                    workflow_id=trigger["workflow_id"], workflow_version=trigger["workflow_version"],
                    mode=trigger["mode"], until_seq=detected_until(self.store), mass=trigger.get("mass"),
                    description=trigger.get("description") or {},
                ).event(trigger["workflow_id"])  # fmt: skip
                self.running = started.payload
                return Step([started], self._checkpoint())
        return Step([], self._checkpoint()) if moved else None

    def close(self) -> None:
        return None

    def _checkpoint(self) -> Checkpoint:
        return Checkpoint(self.position, {"waiting": self.waiting, "running": self.running})

    def _run(self, job: Job) -> JobEnd:
        if self.metrics is not None:
            self.metrics.running.set(1)
        try:
            end = asyncio.run(self.refiner.run(job, self.classifier()))
        except Exception as error:  # a bug or an outage must end this job, not the stage
            log.exception("refinement job %s failed", job.job_id)
            end = self.refiner.fail(job, f"{type(error).__name__}: {error}")
        finally:
            if self.metrics is not None:
                self.metrics.running.set(0)
        if self.metrics is not None:
            self.metrics.record(end.finished)
        return end
