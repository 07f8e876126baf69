"""The daemon in one process, with an in-process transport where `cegraph run` has Kafka.

Spans arrive through `exporter()` (the same OTLP protobuf messages the collector's kafkaexporter
writes) and go through the same `IngestPipeline` and the same stages as the Kafka daemon (`build_stages`
in `daemon/app.py` builds them for both). Nothing runs on its own: the caller pumps (`pump`, `refine`,
`judge`, `publish`), so a run is deterministic for a given seed; patches are delivered to the callables
in `on_patch`, as `cegraph.patches` consumers get them, decisions to `on_rollout`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import orjson
from prometheus_client import CollectorRegistry

from cegraph.connectors.otlp.span_export import CallbackSpanExporter
from cegraph.daemon.app import build_pipeline, build_stages
from cegraph.daemon.detect.stage import DETECT
from cegraph.daemon.events import REFINEMENT_FINISHED
from cegraph.daemon.ingest.pipeline import FlushResult, InMessage
from cegraph.daemon.metrics import IngestMetrics
from cegraph.daemon.outbox import InProcessTransport, OutboxEntry
from cegraph.daemon.settings import Settings
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import WorkflowRegistry
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.rollout import RolloutDecision

PATCHES, ROLLOUTS, JUDGE, REFINE = "publish.patches", "publish.rollouts", "judge", "refine"


class EmbeddedDaemon:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] | None = None) -> None:
        """`clock` is the canary judge's (seconds): the demo counts time in executions."""
        self.settings = settings
        self.store = EventStore.configured(settings.store)
        registry = CollectorRegistry()
        self.metrics = IngestMetrics(registry)
        self.pipeline = build_pipeline(settings, self.store, self.metrics)
        self.on_patch: list[Callable[[WorkflowPatch], object]] = []
        self.on_rollout: list[Callable[[RolloutDecision], object]] = []
        self._delivered: list = []
        kafka = settings.kafka
        transports = {
            kafka.patches_topic: InProcessTransport(kafka.patches_topic, [self._deliver(WorkflowPatch)]),
            kafka.rollouts_topic: InProcessTransport(kafka.rollouts_topic, [self._deliver(RolloutDecision)]),
        }
        stages = build_stages(
            settings, self.store, registry, transports.__getitem__, refining=True, judging=True, clock=clock
        )
        self.stage, self.refine_stage, self.canary_judge = stages.detector, stages.refine, stages.judge
        self.outbox, self.runner = stages.outbox, stages.runner
        self.refinement_metrics = stages.refinement_metrics
        self.runner.drain(DETECT)  # opens the detector from its checkpoint
        self.registry = WorkflowRegistry(self.store)
        self._lock = threading.Lock()
        self._queue: list[InMessage] = []
        self._next_offset = self.store.offsets().get((settings.kafka.spans_topic, 0), 0)

    def exporter(self) -> CallbackSpanExporter:
        """A span exporter whose messages this daemon ingests (any thread)."""
        return CallbackSpanExporter(self._receive, partition_by_trace=True)

    def _receive(self, key: bytes | None, payload: bytes) -> None:
        with self._lock:
            self._queue.append(InMessage(self.settings.kafka.spans_topic, 0, -1, payload, key))

    def pump(self, *, drain: bool = False) -> FlushResult:
        """Ingest what arrived, then run the detector stage; `drain` completes every open trace."""
        with self._lock:
            messages, self._queue = self._queue, []
        # in trace order, not arrival order: with derived trace ids a seeded run repeats itself (the
        # offsets too: they are the detector's order)
        messages.sort(key=lambda message: message.key or b"")
        for message in messages:
            message.offset, self._next_offset = self._next_offset, self._next_offset + 1
        self.pipeline.handle(messages)  # no dead letters here: the runtime's spans always decode
        result = self.pipeline.flush(drain=drain)
        self.runner.drain(DETECT)
        return result

    def refine(self) -> list[dict]:
        """Run the refinement jobs that are ready; their `RefinementFinished` payloads."""
        after = self.store.last_seq()
        self.runner.drain(REFINE)
        rows = self.store.query(
            "SELECT payload FROM events WHERE seq > ? AND type = ? ORDER BY seq", after, REFINEMENT_FINISHED
        )
        return [orjson.loads(payload) for (payload,) in rows]

    def judge(self) -> list[RolloutDecision]:
        """Judge the canaries and deliver the decisions to `on_rollout`; returns them."""
        self.runner.drain(JUDGE)
        return self._publish(ROLLOUTS)

    def publish(self) -> list[WorkflowPatch]:
        """Deliver the due patches to `on_patch`; returns them."""
        return self._publish(PATCHES)

    def _publish(self, publisher: str) -> list:
        self._delivered = []
        self.runner.drain(publisher)
        return self._delivered

    def _deliver(self, model: type[WorkflowPatch] | type[RolloutDecision]) -> Callable[[OutboxEntry], None]:
        """What the in-process topic of `model` messages does with one: what a consumer would."""

        def deliver(entry: OutboxEntry) -> None:
            message = model.model_validate_json(entry.value)
            for consumer in self.on_patch if model is WorkflowPatch else self.on_rollout:
                consumer(message)
            self._delivered.append(message)

        return deliver

    def close(self) -> None:
        self.store.close()
