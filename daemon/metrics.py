"""Prometheus metrics of the daemon, on a registry of their own so tests can make fresh ones."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cegraph.daemon.events import (
    FAILURE_OBSERVED,
    MODE_DRIFTED,
    MODE_EMERGED,
    MODE_FADED,
    MODE_MASS_CROSSED,
    MODE_MERGED,
    Event,
)
from cegraph.daemon.refine.text_policy import RULES as TEXT_RULES
from cegraph.daemon.rollout.sequential import Arm


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "cegraph_ingest_messages_total", "Kafka messages consumed.", ["topic"], registry=r
        )
        self.spans = Counter("cegraph_ingest_spans_total", "Spans decoded from the spans topic.", registry=r)
        self.executions = Counter(
            "cegraph_ingest_executions_total", "Executions stored, by completeness.", ["status"], registry=r
        )
        self.evicted = Counter(
            "cegraph_ingest_evicted_traces_total",
            "Open traces completed as incomplete because max_open_traces was reached.",
            registry=r,
        )
        self.retracted = Counter(
            "cegraph_ingest_retracted_executions_total",
            "Executions left to their spans partition's next owner, which reads them again, by reason "
            "(restart, hand-over).",
            ["reason"],
            registry=r,
        )
        self.amendments = Counter(
            "cegraph_ingest_amendments_total", "Late spans added to an already stored execution.", registry=r
        )
        self.duplicate_spans = Counter(
            "cegraph_ingest_duplicate_spans_total",
            "Spans dropped because they were already stored.",
            registry=r,
        )
        self.duplicate_messages = Counter(
            "cegraph_ingest_duplicate_messages_total",
            "Feedback or undecodable messages delivered again after their event was recorded.",
            ["topic"],
            registry=r,
        )
        self.feedback = Counter(
            "cegraph_feedback_total", "Feedback messages stored.", ["outcome"], registry=r
        )
        self.dead_letters = Counter(
            "cegraph_dead_letters_total", "Messages sent to the dead-letter topic.", ["topic"], registry=r
        )
        self.log_records = Counter(
            "cegraph_ingest_log_records_total",
            "Log records of the logs topic, by outcome: joined to their span, late (the trace was stored "
            "already), unmatched (the trace never had that span).",
            ["outcome"],
            registry=r,
        )
        self.open_traces = Gauge("cegraph_ingest_open_traces", "Traces being assembled.", registry=r)
        self.consumer_lag = Gauge(
            "cegraph_consumer_lag", "Messages behind the latest offset, summed over the partitions.",
            ["topic"], registry=r,
        )  # fmt: skip
        self.store_failures = Counter(
            "cegraph_ingest_store_failures_total",
            "Flushes to the store that failed (disk full, fatal DuckDB error); re-read after recovery.",
            registry=r,
        )
        self.recoveries = Counter(
            "cegraph_ingest_recoveries_total",
            "Attempts to reopen the store and resume ingest after a failure, by result.",
            ["result"],
            registry=r,
        )
        self.ingest_ready = Gauge(
            "cegraph_ingest_ready", "1 while ingest stores what it reads, 0 while it recovers.", registry=r
        )
        self.commit_seconds = Histogram(
            "cegraph_store_commit_seconds",
            "Time to write one batch of events and offsets to DuckDB.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )


class StageMetrics:
    """Progress of the stages after ingest (`daemon/runner.py`), one series per stage."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.position = Gauge(
            "cegraph_stage_position", "The next event-log seq the stage reads.", ["stage"], registry=r
        )
        self.lag = Gauge(
            "cegraph_stage_lag_events", "Events in the log the stage has not read yet.", ["stage"], registry=r
        )
        self.events = Counter(
            "cegraph_stage_events_total", "Events the stage appended to the log.", ["stage"], registry=r
        )
        self.failures = Counter(
            "cegraph_stage_failures_total",
            "Steps that failed; the stage was reopened from its checkpoint.",
            ["stage"],
            registry=r,
        )
        self.backpressure = Counter(
            "cegraph_stage_backpressure_seconds_total",
            "Seconds ingest waited because the stage was too far behind.",
            ["stage"],
            registry=r,
        )


class DetectorMetrics:
    """Failure modes and their mass. Label sets are bounded: per workflow version only the
    `max_modes` heaviest modes get a series of their own, the rest are summed as mode="other"."""

    def __init__(self, registry: CollectorRegistry, max_modes: int = 10) -> None:
        self.max_modes = max_modes
        r = registry
        self.mass = Gauge(
            "cegraph_failure_mass", "Failure mass of a mode in a workflow version (failures per execution).",
            ["workflow", "version", "mode"], registry=r,
        )  # fmt: skip
        self.expected = Gauge(
            "cegraph_expected_failure_mass", "Sum of the failure mass of all modes of a workflow version.",
            ["workflow", "version"], registry=r,
        )  # fmt: skip
        self.modes = Gauge("cegraph_modes", "Live failure modes.", registry=r)
        self.micro_clusters = Gauge(
            "cegraph_density_micro_clusters", "Micro-clusters of the density.", registry=r
        )
        self.failures = Counter(
            "cegraph_failures_total", "Failures observed, by source.", ["source"], registry=r
        )
        self.changes = Counter(
            "cegraph_mode_changes_total", "Mode lifecycle changes.", ["change"], registry=r
        )  # fmt: skip
        self.triggers = Counter(
            "cegraph_mode_triggers_total", "Mode mass crossings of the threshold.", registry=r
        )
        self.drifts = Counter(
            "cegraph_mode_drifts_total", "Changes of a mode's failure rate (ADWIN).", registry=r
        )

    def record(self, modes: list[dict], micro_clusters: int, events: list[Event]) -> None:
        """After a detector batch: the live modes (as `FailureDetector.modes()`) and its events."""
        per_version: dict[tuple[str, str], list[dict]] = {}
        for row in modes:
            per_version.setdefault((row["workflow_id"], row["workflow_version"]), []).append(row)
        self.mass.clear()
        self.expected.clear()
        for (workflow, version), rows in per_version.items():
            rows.sort(key=lambda row: -row["mass"])
            for row in rows[: self.max_modes]:
                self.mass.labels(workflow, version, row["mode"]).set(row["mass"])
            if len(rows) > self.max_modes:
                self.mass.labels(workflow, version, "other").set(
                    sum(r["mass"] for r in rows[self.max_modes :])
                )
            self.expected.labels(workflow, version).set(sum(r["mass"] for r in rows))
        self.modes.set(len({row["mode"] for row in modes}))
        self.micro_clusters.set(micro_clusters)
        for event in events:
            if event.type == FAILURE_OBSERVED:
                self.failures.labels(event.payload["source"]).inc()
            elif event.type in (MODE_EMERGED, MODE_MERGED, MODE_FADED):
                self.changes.labels(event.type.removeprefix("Mode").lower()).inc()
            elif event.type == MODE_MASS_CROSSED:
                self.triggers.inc()
            elif event.type == MODE_DRIFTED:
                self.drifts.inc()


class CanaryMetrics:
    """The running comparison of each workflow's canary, shaped for an Argo Rollouts AnalysisTemplate
    or a Flagger MetricTemplate: `cegraph_canary_verdict` is the one scalar they query. Labelled by
    workflow (few) and track (two); the version is in `/canaries`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.running = Gauge(
            "cegraph_canary_running", "1 while a canary of the workflow is being judged, else 0.",
            ["workflow"], registry=r,
        )  # fmt: skip
        self.executions = Gauge(
            "cegraph_canary_executions",
            "Executions compared so far, per arm.",
            ["workflow", "track"],
            registry=r,
        )
        self.failure_rate = Gauge(
            "cegraph_canary_failure_rate", "Observed failure rate (failures per execution) of each arm.",
            ["workflow", "track"], registry=r,
        )  # fmt: skip
        self.mode_failure_rate = Gauge(
            "cegraph_canary_mode_failure_rate", "Observed failure rate of each arm in the target mode.",
            ["workflow", "track"], registry=r,
        )  # fmt: skip
        self.verdict = Gauge(
            "cegraph_canary_verdict", "+1 promote decided, -1 rollback decided, 0 undecided.",
            ["workflow"], registry=r,
        )  # fmt: skip
        self.decisions = Counter(
            "cegraph_canary_decisions_total", "Canary decisions, by decision.", ["decision"], registry=r
        )
        for decision in ("promote", "rollback"):
            self.decisions.labels(decision)

    def record(
        self, workflow: str, arms: Mapping[str, Arm], *, mode_known: bool, decision: str | None
    ) -> None:
        """The state of a workflow's latest canary; `arms` maps track to what it showed."""
        self.running.labels(workflow).set(0 if decision else 1)
        self.verdict.labels(workflow).set({"promote": 1, "rollback": -1}.get(decision or "", 0))
        for track, arm in arms.items():
            self.executions.labels(workflow, track).set(arm.executions)
            self.failure_rate.labels(workflow, track).set(arm.rate)
            if mode_known:
                self.mode_failure_rate.labels(workflow, track).set(arm.mode_rate)
            else:
                with contextlib.suppress(KeyError):
                    self.mode_failure_rate.remove(workflow, track)


class RefinementMetrics:
    """Propose-and-Verify jobs and the patches they publish."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.running = Gauge("cegraph_refinement_jobs_running", "Refinement jobs running.", registry=r)
        self.jobs = Counter(
            "cegraph_refinement_jobs_total", "Refinement jobs ended, by outcome.", ["outcome"], registry=r
        )
        self.llm_calls = Counter(
            "cegraph_refinement_llm_calls_total", "LLM calls of refinement jobs (shadow and proposers).",
            registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "cegraph_proposals_rejected_total",
            "Proposed edits rejected (outside the grammar or the mode's scope, or not applicable).",
            ["proposer"], registry=r,
        )  # fmt: skip
        self.text_rejected = Counter(
            "cegraph_edits_rejected_by_text_policy_total",
            "Proposed edits whose free text the text policy refused, by rule (URL, code, contact, ...).",
            ["rule"], registry=r,
        )  # fmt: skip
        for rule in TEXT_RULES:
            self.text_rejected.labels(rule)
        self.published = Counter(
            "cegraph_patches_published_total", "Patches published to the patches topic.", registry=r
        )

    def record(self, finished: dict) -> None:
        """After a job, with its `RefinementFinished` payload."""
        self.jobs.labels(finished["outcome"]).inc()
        self.llm_calls.inc(finished["cost"]["llm_calls"])
        for proposer, count in finished.get("rejected", {}).items():
            self.rejected.labels(proposer).inc(count)
        for rule, count in finished.get("text_rejected", {}).items():
            self.text_rejected.labels(rule).inc(count)
