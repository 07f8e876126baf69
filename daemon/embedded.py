"""The daemon in one process, with an in-process transport where `cegraph run` has Kafka.

Spans arrive through `exporter()` (the same OTLP protobuf messages the collector's kafkaexporter
writes) and go through the same `IngestPipeline`, detector stage, refinement worker and patch
outbox as the Kafka daemon (`daemon/app.py` builds them for both). Nothing runs on its own: the
caller pumps (`pump`, `refine`, `publish`), so a run is deterministic for a given seed; patches are
delivered to the callables in `on_patch`, as `cegraph.patches` consumers get them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from cegraph.connectors.otlp.span_export import CallbackSpanExporter
from cegraph.daemon.app import build_canary_judge, build_detector_stage, build_pipeline, build_refinement
from cegraph.daemon.ingest.pipeline import FlushResult, InMessage
from cegraph.daemon.metrics import IngestMetrics, RefinementMetrics, StageMetrics
from cegraph.daemon.refine.patch_outbox import PatchOutbox
from cegraph.daemon.rollout.canary import RolloutOutbox
from cegraph.daemon.runner import Runner, StageRunner
from cegraph.daemon.settings import Settings
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import WorkflowRegistry
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.rollout import RolloutDecision

IN_PROCESS = "in-process"


class EmbeddedDaemon:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] | None = None) -> None:
        """`clock` is the canary judge's (seconds): the demo counts time in executions."""
        self.settings = settings
        self.store = EventStore(settings.store.path)
        registry = CollectorRegistry()
        self.metrics = IngestMetrics(registry)
        self.pipeline = build_pipeline(settings, self.store, self.metrics)
        self.stage = build_detector_stage(settings, self.store, registry)
        self.runner = Runner([StageRunner(self.store, self.stage, metrics=StageMetrics(registry))])
        self.runner.drain()  # opens the detector from its checkpoint
        self.refinement_metrics = RefinementMetrics(registry)
        self.worker = build_refinement(settings, self.store, self.stage, self.refinement_metrics)
        self.outbox = PatchOutbox.configured(self.store, settings)
        self.canary_judge = build_canary_judge(settings, self.store, registry, clock=clock)
        self.rollouts = RolloutOutbox(self.store)
        self.registry = WorkflowRegistry(self.store)
        self.on_patch: list[Callable[[WorkflowPatch], object]] = []
        self.on_rollout: list[Callable[[RolloutDecision], object]] = []
        self._lock = threading.Lock()
        self._queue: list[InMessage] = []
        self._next_offset = self.store.offsets().get((settings.kafka.spans_topic, 0), 0)
        self._published = 0

    def exporter(self) -> CallbackSpanExporter:
        """A span exporter whose messages this daemon ingests (any thread)."""
        return CallbackSpanExporter(self._receive, partition_by_trace=True)

    def _receive(self, key: bytes | None, payload: bytes) -> None:
        with self._lock:
            self._queue.append(InMessage(self.settings.kafka.spans_topic, 0, self._next_offset, payload, key))
            self._next_offset += 1

    def pump(self, *, drain: bool = False) -> FlushResult:
        """Ingest what arrived, then run the detector stage; `drain` completes every open trace."""
        with self._lock:
            messages, self._queue = self._queue, []
        # in trace order, not arrival order: with derived trace ids a seeded run repeats itself
        messages.sort(key=lambda message: message.key or b"")
        self.pipeline.handle(messages)  # no dead letters here: the runtime's spans always decode
        result = self.pipeline.flush(drain=drain)
        self.runner.drain()
        return result

    def refine(self) -> list[dict]:
        """Run the refinement jobs that are ready; their `RefinementFinished` payloads."""
        return self.worker.run_pending()

    def judge(self) -> list[RolloutDecision]:
        """Judge the canaries, deliver the decisions to `on_rollout` and record them as published."""
        self.canary_judge.step()
        decisions = self.rollouts.pending()
        for decision in decisions:
            for deliver in self.on_rollout:
                deliver(decision)
            self.rollouts.published(decision, IN_PROCESS, 0, self._published)
            self._published += 1
        return decisions

    def publish(self) -> list[WorkflowPatch]:
        """Deliver the due patches to `on_patch` and record them as published."""
        due = self.outbox.due()
        for patch in due:
            for deliver in self.on_patch:
                deliver(patch)
            self.outbox.published(patch, IN_PROCESS, 0, self._published)
            self.refinement_metrics.published.inc()
            self._published += 1
        return due

    def close(self) -> None:
        self.store.close()
