"""Composition root of the daemon: wires the Kafka connectors, the HTTP API and the core together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request

from cegraph.connectors.http_api import create_app
from cegraph.connectors.http_reads import inspection_routes
from cegraph.connectors.http_workflows import workflow_routes
from cegraph.connectors.kafka_client import ensure_topics
from cegraph.connectors.kafka_source import KafkaIngestSource
from cegraph.connectors.otlp_codec import decoder_for
from cegraph.connectors.rollout_publisher import RolloutPublisher, judge_periodically
from cegraph.daemon.canary import CanaryJudge, RolloutOutbox, TargetModeFor
from cegraph.daemon.detector import FailureDetector
from cegraph.daemon.detector_stage import DetectorStage, stored_modes
from cegraph.daemon.ingest import IngestPipeline
from cegraph.daemon.metrics import CanaryMetrics, DetectorMetrics, IngestMetrics
from cegraph.daemon.registry import WorkflowRegistry
from cegraph.daemon.settings import Settings
from cegraph.daemon.store import EventStore

log = logging.getLogger("cegraph")


def build_pipeline(settings: Settings, store: EventStore, metrics: IngestMetrics) -> IngestPipeline:
    return IngestPipeline(
        store,
        decoder_for(settings.ingest.encoding),
        settings.ingest,
        spans_topic=settings.kafka.spans_topic,
        feedback_topic=settings.kafka.feedback_topic,
        metrics=metrics,
    )


def build_detector_stage(settings: Settings, store: EventStore, metrics: IngestMetrics) -> DetectorStage:
    """Stage 2 in this process; replays the log up to its cursor to rebuild its state."""
    detector_metrics = DetectorMetrics(metrics.registry, max_modes=settings.detector.max_mode_series)

    def record(detector: FailureDetector, events: list) -> None:
        detector_metrics.record(detector.modes(), detector.tracker.state()["micro_clusters"], events)

    return DetectorStage(store, FailureDetector(settings.detector), on_batch=record)


def build_canary_judge(
    settings: Settings,
    store: EventStore,
    metrics: IngestMetrics,
    target_mode_for: TargetModeFor | None = None,
) -> CanaryJudge:
    """The canary judge; `target_mode_for` names the mode a version's patch aims at."""
    return CanaryJudge(
        store, settings.canary, target_mode_for=target_mode_for, metrics=CanaryMetrics(metrics.registry)
    )


def build(settings: Settings) -> Starlette:
    store = EventStore(settings.store.path)
    metrics = IngestMetrics()
    stage = build_detector_stage(settings, store, metrics)
    source = KafkaIngestSource(settings, build_pipeline(settings, store, metrics), after_flush=stage.catch_up)
    judge = build_canary_judge(settings, store, metrics)
    publisher = RolloutPublisher(RolloutOutbox(store), source.broker, settings.kafka.rollouts_topic)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        kafka = settings.kafka
        topics = [
            kafka.spans_topic,
            kafka.feedback_topic,
            kafka.dlq_topic,
            kafka.patches_topic,
            kafka.rollouts_topic,
        ]
        await asyncio.to_thread(ensure_topics, kafka, topics)
        await asyncio.to_thread(stage.catch_up)
        await source.start()
        log.info(
            "consuming %s and %s from %s", kafka.spans_topic, kafka.feedback_topic, kafka.bootstrap_servers
        )
        judging = (
            asyncio.create_task(judge_periodically(judge, publisher, settings.canary.interval_s))
            if settings.canary.enabled
            else None
        )
        try:
            yield
        finally:
            if judging is not None:
                judging.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await judging
            await source.stop()
            store.close()

    async def ready() -> dict[str, bool]:
        kafka_ok = bool(await source.broker.ping(timeout=2.0))
        try:
            await asyncio.to_thread(store.query, "SELECT 1")
            store_ok = True
        except Exception:
            store_ok = False
        return {"kafka": kafka_ok, "store": store_ok}

    async def stats(_: Request) -> dict[str, Any]:
        return await asyncio.to_thread(store.stats)

    async def modes(_: Request) -> list[dict[str, Any]]:
        return await asyncio.to_thread(stored_modes, store)

    token = settings.http.token.get_secret_value() if settings.http.token else None
    workflows = workflow_routes(WorkflowRegistry(store))
    return create_app(
        ready=ready,
        read_routes=[("/stats", stats), ("/modes", modes), *workflows.read, *inspection_routes(store, judge)],
        write_routes=workflows.write,
        token=token,
        metrics=settings.metrics.enabled,
        registry=metrics.registry,
        lifespan=lifespan,
    )


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(
        build(settings),
        host=settings.http.host,
        port=settings.http.port,
        log_level=settings.log_level.lower(),
        lifespan="on",
    )
