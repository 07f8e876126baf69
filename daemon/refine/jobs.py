"""Refinement jobs: triggers from the density stage become Propose-and-Verify jobs, off the ingest path.

The worker reads its work from the event log: a `ModeMassCrossed` event with no job yet is a
pending trigger; a `RefinementStarted` with no `RefinementFinished` is a job a crash interrupted,
run again first. Jobs run one at a time on the worker's own thread and event loop (so one job per
workflow at a time), and a workflow gets no new job until `cooldown_s` after its last job ended.
Of several pending triggers of one workflow version and mode only the latest counts. Ingest only
appends to the log and never waits for a job.
"""

from __future__ import annotations

import asyncio
import logging
import threading
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
    Event,
)
from cegraph.daemon.metrics import RefinementMetrics
from cegraph.daemon.refine.refiner import Job, Refiner
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import version_key

log = logging.getLogger("cegraph.jobs")

PENDING = f"""
WITH triggers AS (
    SELECT seq, payload, payload->>'workflow_id' AS workflow_id, payload->>'workflow_version' AS version,
           payload->>'mode' AS mode,
           row_number() OVER (PARTITION BY workflow_id, version, mode ORDER BY seq DESC) AS newest
    FROM events WHERE type = '{MODE_MASS_CROSSED}'
),
started AS (
    SELECT (payload->>'trigger_seq')::BIGINT AS trigger_seq, payload->>'workflow_id' AS workflow_id,
           payload->>'workflow_version' AS version, payload->>'mode' AS mode
    FROM events WHERE type = '{REFINEMENT_STARTED}'
)
SELECT t.seq, t.payload FROM triggers t
WHERE t.newest = 1 AND NOT EXISTS (
    SELECT 1 FROM started s
    WHERE s.workflow_id = t.workflow_id AND s.version = t.version AND s.mode = t.mode
      AND s.trigger_seq >= t.seq
)
ORDER BY t.seq
"""
UNFINISHED = f"""
SELECT s.payload FROM events s
WHERE s.type = '{REFINEMENT_STARTED}' AND NOT EXISTS (
    SELECT 1 FROM events f
    WHERE f.type = '{REFINEMENT_FINISHED}' AND f.payload->>'job_id' = s.payload->>'job_id'
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
SELECT payload->>'version' FROM events
WHERE type = '{CANARY_DECIDED}' AND payload->>'workflow_id' = $1 AND payload->>'decision' = 'promote'
"""
CANARY_RUNNING = f"""
SELECT count(*) FROM events s
WHERE s.type = '{CANARY_STARTED}' AND s.payload->>'workflow_id' = ? AND NOT EXISTS (
    SELECT 1 FROM events d WHERE d.type = '{CANARY_DECIDED}' AND d.key = s.key
)
"""
UNDEPLOYED_PATCHES = f"""
SELECT c.payload->'patch'->>'new_version', (c.payload->>'created_at')::DOUBLE FROM events c
WHERE c.type = '{PATCH_CREATED}' AND c.key = ? AND NOT EXISTS (
    SELECT 1 FROM events d WHERE d.type = '{CANARY_DECIDED}' AND d.payload->>'workflow_id' = c.key
      AND d.payload->>'version' = c.payload->'patch'->>'new_version'
)
"""
FRUITLESS_MASS = f"""
SELECT max((s.payload->>'mass')::DOUBLE) FROM events f
JOIN events s ON s.type = '{REFINEMENT_STARTED}' AND s.payload->>'job_id' = f.payload->>'job_id'
WHERE f.type = '{REFINEMENT_FINISHED}' AND f.payload->>'outcome' = 'no_patch'
  AND f.payload->>'workflow_id' = ? AND f.payload->>'mode' = ?
"""
RETRY_FACTOR = 1.5  # a mode no candidate helped gets a new job once its mass is this much higher
LAST_FINISHED = f"""
SELECT payload->>'workflow_id', max((payload->>'finished_at')::DOUBLE)
FROM events WHERE type = '{REFINEMENT_FINISHED}' GROUP BY 1
"""


def _job(payload: dict[str, Any]) -> Job:
    return Job(
        payload["job_id"], payload["workflow_id"], payload["workflow_version"], payload["mode"],
        payload["until_seq"], payload.get("description") or {},
    )  # fmt: skip


class RefinementScheduler:
    """Decides, from the log alone, which job runs next."""

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

    def next_job(self) -> Job | None:
        """An interrupted job, else the oldest pending trigger that may start (that job's start is
        appended before it is returned). One change at a time: a trigger waits while its workflow
        cools down after a job, has a canary being judged, or has a patch that is neither decided
        nor running as the stable version yet (for at most `deploy_wait_s` after its creation: a
        patch nobody deploys does not stop refinement for ever). Only the stable version is refined:
        a trigger of a canary's version waits for its promotion, one of an older version never starts.
        A mode whose last job found nothing waits until its mass is `RETRY_FACTOR` times higher."""
        unfinished = self.store.query(UNFINISHED)
        if unfinished:
            return _job(orjson.loads(unfinished[0][0]))
        last = dict(self.store.query(LAST_FINISHED))
        now = self.clock()
        for seq, payload in self.store.query(PENDING):
            trigger = orjson.loads(payload)
            workflow = trigger["workflow_id"]
            if now < (last.get(workflow) or -float("inf")) + self.cooldown_s:
                continue
            if self.store.query(CANARY_RUNNING, workflow)[0][0]:
                continue
            stable = self.stable_version(workflow)
            if stable is not None and stable != trigger["workflow_version"]:
                continue  # a canary's mode waits for its promotion; an old version's is superseded
            if self._awaits_deployment(workflow, stable, now):
                continue
            [(fruitless,)] = self.store.query(FRUITLESS_MASS, workflow, trigger["mode"])
            if fruitless is not None and (trigger.get("mass") or 0.0) < RETRY_FACTOR * fruitless:
                continue  # nothing helped this mode at about this mass: do not spend on it again
            started = {
                "job_id": f"job-{seq}", "trigger_seq": seq, "workflow_id": workflow,
                "workflow_version": trigger["workflow_version"], "mode": trigger["mode"],
                "until_seq": detected_until(self.store), "mass": trigger.get("mass"),
                "description": trigger.get("description") or {},
            }  # fmt: skip
            self.store.append([Event(REFINEMENT_STARTED, workflow, started)])
            return _job(started)
        return None

    def stable_version(self, workflow: str) -> str | None:
        versions = [version for (version,) in self.store.query(STABLE_VERSIONS, workflow) if version]
        return max(versions, key=version_key) if versions else None

    def _awaits_deployment(self, workflow: str, stable: str | None, now: float) -> bool:
        for version, created_at in self.store.query(UNDEPLOYED_PATCHES, workflow):
            deployed = stable is not None and version_key(stable) >= version_key(version)
            if not deployed and now < created_at + self.deploy_wait_s:
                return True
        return False


class RefinementWorker:
    """Runs jobs on a thread of its own until stopped."""

    def __init__(
        self,
        scheduler: RefinementScheduler,
        refiner: Refiner,
        classifier: Callable[[], ModeClassifier],
        *,
        poll_s: float = 1.0,
        metrics: RefinementMetrics | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.refiner = refiner
        self.classifier = classifier
        self.poll_s = poll_s
        self.metrics = metrics
        self.running: Job | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cegraph-refiner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run_pending(self) -> list[dict[str, Any]]:
        """Run jobs until none is ready; returns their `RefinementFinished` payloads."""
        finished = []
        while not self._stop.is_set() and (job := self.scheduler.next_job()) is not None:
            self.running = job
            if self.metrics is not None:
                self.metrics.running.set(1)
            try:
                result = asyncio.run(self.refiner.run(job, self.classifier()))
            except Exception as error:  # a bug or an outage must end this job, not the worker
                log.exception("refinement job %s failed", job.job_id)
                result = self.refiner.fail(job, f"{type(error).__name__}: {error}")
            finally:
                self.running = None
                if self.metrics is not None:
                    self.metrics.running.set(0)
            finished.append(result)
            if self.metrics is not None:
                self.metrics.record(result)
        return finished

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pending()
            except Exception:  # the store itself failed: log, wait, go on
                log.exception("refinement worker")
            self._stop.wait(self.poll_s)
