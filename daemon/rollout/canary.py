"""The canary judge: compares each canary version against the stable one and decides, once.

A canary is a (workflow, version) whose executions carry `cegraph.track=canary`. It starts
(`CanaryStarted`) at its first stored execution, against the stable version that ran last before it;
from then on both arms count the executions stored after that point: failed or not (a failing span,
a failed evaluation, or failure feedback, also when it comes later), and failed in the patch's target
mode or not (`FailureObserved` events of that mode, or of the mode it was merged into). The judge
reads only executions and feedback the detector stage has processed (below its cursor; the detector's
own events lie past it), so an execution's failures and modes are all there when it is counted. The
rule and its statistics are `sequential.judge`.

A decision is a `CanaryDecided` event; the same events make the outbox of `cegraph.rollouts`
(`RolloutOutbox`), which the outbox publisher sends exactly once (`daemon/outbox.py`). A canary
replaced by a newer one of the same workflow is rolled back as superseded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import ValidationError

from cegraph.daemon.detect.stage import detected_until, merged_modes
from cegraph.daemon.events import (
    CANARY_DECIDED,
    CANARY_STARTED,
    FAILURE_OBSERVED,
    PATCH_CREATED,
    ROLLOUT_PUBLISHED,
    CanaryDecidedPayload,
    CanaryStartedPayload,
    Event,
    FailureObservedPayload,
    PatchCreatedPayload,
    RolloutPublishedPayload,
)
from cegraph.daemon.metrics import CanaryMetrics
from cegraph.daemon.outbox import Location, OutboxEntry
from cegraph.daemon.rollout.sequential import Arm, Verdict, judge
from cegraph.daemon.settings import CanarySettings
from cegraph.daemon.stage import Checkpoint, Step
from cegraph.daemon.store import EventStore
from cegraph.schemas.rollout import ArmStatistics, RolloutDecision, RolloutStatistics

log = logging.getLogger("cegraph.canary")

TargetModeFor = Callable[[str, str], "str | None"]

CANARIES = f"""
SELECT s.seq, s.key, s.payload AS started, d.payload AS decided, p.payload AS published
FROM events s
LEFT JOIN events d ON d.type = '{CANARY_DECIDED}' AND d.key = s.key
LEFT JOIN events p ON p.type = '{ROLLOUT_PUBLISHED}' AND p.key = s.key
WHERE s.type = '{CANARY_STARTED}'
ORDER BY s.seq
"""

NEW_CANARIES = f"""
SELECT workflow_id, workflow_version AS version, min(seq) AS first_seq
FROM executions
WHERE track = 'canary' AND workflow_id <> '' AND seq < $1
  AND workflow_id || '@' || workflow_version NOT IN (SELECT key FROM events WHERE type = '{CANARY_STARTED}')
GROUP BY workflow_id, workflow_version
ORDER BY first_seq
"""

STABLE_VERSION = """
SELECT workflow_version FROM executions
WHERE track = 'stable' AND workflow_id = $1 AND seq < $2
ORDER BY (seq > $3), abs(seq - $3)
LIMIT 1
"""

ARMS = f"""
WITH arm AS (
    SELECT trace_id, track, hard_failed OR eval_failed AS failed
    FROM executions
    WHERE workflow_id = $1 AND seq >= $4 AND seq < $5
      AND ((track = 'canary' AND workflow_version = $2) OR (track = 'stable' AND workflow_version = $3))
),
feedback_failed AS (SELECT DISTINCT trace_id FROM feedback WHERE outcome = 'failed' AND seq < $5),
in_mode AS (
    SELECT DISTINCT {FailureObservedPayload.sql("trace_id")} AS trace_id FROM events
    WHERE type = '{FAILURE_OBSERVED}' AND seq >= $4
      AND ({FailureObservedPayload.sql("mode")}) IN (SELECT unnest($6::VARCHAR[]))
)
SELECT a.track, count(*) AS executions,
       count(*) FILTER (WHERE a.failed OR f.trace_id IS NOT NULL) AS failures,
       count(m.trace_id) AS mode_failures
FROM arm a
LEFT JOIN feedback_failed f ON f.trace_id = a.trace_id
LEFT JOIN in_mode m ON m.trace_id = a.trace_id
GROUP BY a.track
"""


_PATCH = PatchCreatedPayload.json("patch")


def patch_target_mode(store: EventStore) -> TargetModeFor:
    """The mode the patch that made a version aims at (its `PatchCreated` event), for versions cegraph
    made; None for others."""

    def target(workflow_id: str, version: str) -> str | None:
        rows = store.query(
            f"""
            SELECT {_PATCH}->'rationale'->>'mode' FROM events
            WHERE type = '{PATCH_CREATED}' AND ({_PATCH}->>'workflow_id') = ?
              AND ({_PATCH}->>'new_version') = ?
            ORDER BY seq DESC LIMIT 1
            """,
            workflow_id,
            version,
        )
        return rows[0][0] if rows else None

    return target


def canary_key(workflow_id: str, version: str) -> str:
    return f"{workflow_id}@{version}"


def _arm_statistics(arm: Arm, mode_known: bool) -> ArmStatistics:
    return ArmStatistics(
        executions=arm.executions,
        failures=arm.failures,
        failure_rate=arm.rate,
        mode_failures=arm.mode_failures if mode_known else None,
        mode_failure_rate=arm.mode_rate if mode_known else None,
    )


def _statistics(
    verdict: Verdict, canary: Arm, stable: Arm, alpha: float, target: str | None
) -> RolloutStatistics:
    mode_known = verdict.mode is not None
    return RolloutStatistics(
        alpha=alpha,
        target_mode=target,
        canary=_arm_statistics(canary, mode_known),
        stable=_arm_statistics(stable, mode_known),
        difference=(verdict.overall.lower, verdict.overall.upper),
        mode_difference=(verdict.mode.lower, verdict.mode.upper) if verdict.mode is not None else None,
    )


def _arm(statistics: dict[str, Any]) -> Arm:
    return Arm(statistics["executions"], statistics["failures"], statistics["mode_failures"] or 0)


class CanaryJudge:
    def __init__(
        self,
        store: EventStore,
        settings: CanarySettings,
        *,
        target_mode_for: TargetModeFor | None = None,
        metrics: CanaryMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`target_mode_for(workflow_id, version)` names the mode the patch that made that version
        aims at (None when unknown); it is asked once, when the canary starts."""
        self.store = store
        self.settings = settings
        self.target_mode_for = target_mode_for or (lambda _workflow, _version: None)
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, dict[str, Any]] = {}  # running canaries' latest statistics, by key

    # ------------------------------------------------------------------ reading the log

    def canaries(self) -> list[dict[str, Any]]:
        """Every canary, oldest first: started, decided (how and why) and published, or its live state."""
        rows = []
        for row in self.store.query_dicts(CANARIES):
            started = orjson.loads(row["started"])
            decided = orjson.loads(row["decided"]) if row["decided"] else None
            entry: dict[str, Any] = {
                **started,
                "state": "decided" if decided else "running",
                "decision": decided["decision"] if decided else None,
                "reason": decided["reason"] if decided else None,
                "decided_at": decided["decided_at"] if decided else None,
                "statistics": decided["statistics"] if decided else None,
                "published": orjson.loads(row["published"]) if row["published"] else None,
            }
            if decided is None:
                live = self._live.get(row["key"])
                entry["statistics"] = live["statistics"] if live else None
                entry["reason"] = live["reason"] if live else None
            rows.append(entry)
        return rows

    def _arms(self, started: dict[str, Any], horizon: int) -> tuple[Arm, Arm]:
        target = started.get("target_mode")
        rows = self.store.query_dicts(
            ARMS,
            started["workflow_id"],
            started["version"],
            started["stable_version"],
            started["start_seq"],
            horizon,
            merged_modes(self.store, target, forward=True) if target else [],
        )
        arms = {r["track"]: Arm(r["executions"], r["failures"], r["mode_failures"]) for r in rows}
        return arms.get("canary", Arm()), arms.get("stable", Arm())

    # ------------------------------------------------------------------ judging

    # ------------------------------------------------------------------ the `Stage`

    name = "judge"

    def open(self, checkpoint: Checkpoint) -> None:
        """Nothing to rebuild: every canary's state is in the log."""
        self._restore_metrics()

    def poll(self) -> Step | None:
        """Start the canaries seen since the last look and judge the running ones; a step when that
        decided anything. The checkpoint is the detector's position the look read up to."""
        with self._lock:
            horizon = detected_until(self.store)
            now = self.clock()
            started = self._start(horizon, now)
            running = [(row["key"], orjson.loads(row["started"])) for row in self._running()]
            running += [(event.key, event.payload) for event in started]
            superseded = self._superseded(running)
            decided = []
            for key, payload in running:
                event = self._judge(key, payload, horizon, now, superseded.get(key))
                if event is not None:
                    decided.append(event)
            if not started and not decided:
                return None
            return Step(started + decided, Checkpoint(horizon))

    def close(self) -> None:
        return None

    def _running(self) -> list[dict[str, Any]]:
        return [r for r in self.store.query_dicts(CANARIES) if r["decided"] is None]

    def _start(self, horizon: int, now: float) -> list[Event]:
        events = []
        for row in self.store.query_dicts(NEW_CANARIES, horizon):
            workflow, version, first = row["workflow_id"], row["version"], row["first_seq"]
            stable = self.store.query(STABLE_VERSION, workflow, horizon, first)
            if not stable:
                continue  # nothing to compare with yet
            started = CanaryStartedPayload(
                workflow_id=workflow,
                version=version,
                stable_version=stable[0][0],
                start_seq=first,
                started_at=now,
                target_mode=self.target_mode_for(workflow, version),
            )
            events.append(started.event(canary_key(workflow, version)))
            log.info("canary %s@%s started against %s", workflow, version, stable[0][0])
        return events

    @staticmethod
    def _superseded(running: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
        """Running canaries with a newer running canary of the same workflow: key -> the newer version."""
        latest: dict[str, dict[str, Any]] = {}
        for _, started in running:  # oldest first
            latest[started["workflow_id"]] = started
        return {
            key: latest[started["workflow_id"]]["version"]
            for key, started in running
            if latest[started["workflow_id"]] is not started
        }

    def _judge(
        self, key: str, started: dict[str, Any], horizon: int, now: float, superseded_by: str | None
    ) -> Event | None:
        settings = self.settings
        canary, stable = self._arms(started, horizon)
        limit = now - started["started_at"] >= settings.max_duration_s or (
            settings.max_executions > 0 and canary.executions >= settings.max_executions
        )
        verdict = judge(
            canary,
            stable,
            alpha=settings.alpha,
            min_executions=settings.min_executions,
            mode_known=started.get("target_mode") is not None,
            at_limit=settings.at_max_duration if limit else None,
        )
        if superseded_by is not None:
            verdict = Verdict("rollback", f"superseded by {superseded_by}", verdict.overall, verdict.mode)
        statistics = _statistics(verdict, canary, stable, settings.alpha, started.get("target_mode"))
        statistics = statistics.model_dump(mode="json")
        workflow = started["workflow_id"]
        if verdict.decision is None:
            self._live[key] = {"statistics": statistics, "reason": verdict.reason}
        else:
            self._live.pop(key, None)
        if self.metrics is not None and superseded_by is None:
            self.metrics.record(
                workflow,
                {"canary": canary, "stable": stable},
                mode_known=verdict.mode is not None,
                decision=verdict.decision,
            )
        if verdict.decision is None:
            return None
        if self.metrics is not None:
            self.metrics.decisions.labels(verdict.decision).inc()
        log.info("canary %s: %s (%s)", key, verdict.decision, verdict.reason)
        return CanaryDecidedPayload(
            workflow_id=workflow,
            version=started["version"],
            stable_version=started["stable_version"],
            decision=verdict.decision,
            reason=verdict.reason,
            decided_at=now,
            statistics=statistics,
        ).event(key)

    def _restore_metrics(self) -> None:
        """After a restart: each workflow's latest canary as the log left it (running ones are
        recomputed at the next step)."""
        if self.metrics is None:
            return
        for entry in self.canaries():
            if entry["state"] == "decided":
                stats = entry["statistics"]
                arms = {"canary": _arm(stats["canary"]), "stable": _arm(stats["stable"])}
                self.metrics.record(
                    entry["workflow_id"],
                    arms,
                    mode_known=stats["mode_difference"] is not None,
                    decision=entry["decision"],
                )
            else:
                self.metrics.running.labels(entry["workflow_id"]).set(1)
                self.metrics.verdict.labels(entry["workflow_id"]).set(0)


class RolloutOutbox:
    """`Outbox` of `cegraph.rollouts`: the decisions, each sent once (`daemon/outbox.py`)."""

    name = "rollouts"

    def __init__(self, store: EventStore) -> None:
        self.store = store

    def entries(self, since: int) -> list[OutboxEntry]:
        rows = self.store.query(
            f"""
            SELECT d.seq, d.key, d.payload FROM events d
            WHERE d.type = '{CANARY_DECIDED}' AND d.seq >= ?
              AND d.key NOT IN (SELECT key FROM events WHERE type = '{ROLLOUT_PUBLISHED}')
            ORDER BY d.seq
            """,
            since,
        )
        entries = []
        for seq, key, payload in rows:
            decision = decision_message(orjson.loads(payload))
            headers = {"content-type": "application/json", "cegraph.canary": key}
            value = decision.model_dump_json(exclude_none=True).encode()
            entries.append(OutboxEntry(seq, key, decision.workflow_id, value, due=True, headers=headers))
        return entries

    def sent(self, entry: OutboxEntry, location: Location) -> Event:
        return RolloutPublishedPayload(location.topic, location.partition, location.offset).event(entry.id)

    def identify(self, value: bytes) -> str | None:
        try:
            decision = RolloutDecision.model_validate_json(value)
        except ValidationError:
            return None
        return canary_key(decision.workflow_id, decision.version)


def decision_message(decided: dict[str, Any]) -> RolloutDecision:
    """The `cegraph.rollouts` message of a `CanaryDecided` payload."""
    return RolloutDecision(
        workflow_id=decided["workflow_id"],
        version=decided["version"],
        decision=decided["decision"],
        reason=decided["reason"],
        stable_version=decided["stable_version"],
        statistics=RolloutStatistics.model_validate(decided["statistics"]),
    )
