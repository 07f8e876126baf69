"""Composition root of the daemon: wires the Kafka connectors, the HTTP API and the core together."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request

from cegraph.connectors.http.api import create_app
from cegraph.connectors.http.patches import patch_routes
from cegraph.connectors.http.reads import inspection_routes
from cegraph.connectors.http.workflows import workflow_routes
from cegraph.connectors.kafka.client import ensure_topics
from cegraph.connectors.kafka.failures import KafkaRecordSource, KafkaRecordTransport
from cegraph.connectors.kafka.jobs import MAX_JOB_BYTES, KafkaRefineWorker
from cegraph.connectors.kafka.outbox_transport import KafkaTransport
from cegraph.connectors.kafka.source import KafkaIngestSource
from cegraph.connectors.llm.config import openai_backend, shadow_llm
from cegraph.connectors.otlp.codec import decoder_for, logs_decoder_for
from cegraph.connectors.shadow.http import HttpShadowTarget
from cegraph.connectors.shadow.runtime import RuntimeShadowTarget
from cegraph.daemon import gc_policy
from cegraph.daemon.detect.detector import FailureDetector, embedder_for
from cegraph.daemon.detect.failures_feed import (
    PUBLISH_FAILURES,
    FailuresPublisher,
    FailuresReceiver,
    RecordSource,
    RecordTransport,
)
from cegraph.daemon.detect.naming import INTERVAL_S as NAMING_INTERVAL_S
from cegraph.daemon.detect.naming import ModeNamer, named_modes
from cegraph.daemon.detect.stage import DETECT, DetectorStage
from cegraph.daemon.ingest.normalize import TextPolicy
from cegraph.daemon.ingest.pipeline import IngestPipeline
from cegraph.daemon.metrics import (
    CanaryMetrics,
    DetectorMetrics,
    IngestMetrics,
    RefinementMetrics,
    StageMetrics,
)
from cegraph.daemon.outbox import OutboxPublisher, Transport
from cegraph.daemon.refine.jobs import JobExecutor, LocalJobs, RefinementScheduler, RefinementStage
from cegraph.daemon.refine.patch_outbox import PatchOutbox
from cegraph.daemon.refine.proposers import LLMProposer, PromptEditor, Proposer, RuleProposer
from cegraph.daemon.refine.refiner import JobReader, Refiner
from cegraph.daemon.refine.remote import RefineWorker, RemoteJobs
from cegraph.daemon.refine.replay import ReplayStore
from cegraph.daemon.refine.shadow import ShadowRunner, ShadowTarget
from cegraph.daemon.rollout.canary import CanaryJudge, RolloutOutbox, TargetModeFor, patch_target_mode
from cegraph.daemon.runner import Backpressure, Runner, StageRunner
from cegraph.daemon.settings import Settings, is_loopback
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import WorkflowRegistry
from cegraph.daemon.workflows.tools import Retriever

log = logging.getLogger("cegraph")


def build_pipeline(settings: Settings, store: EventStore, metrics: IngestMetrics) -> IngestPipeline:
    return IngestPipeline(
        store,
        decoder_for(settings.ingest.encoding),
        settings.ingest,
        spans_topic=settings.kafka.spans_topic,
        feedback_topic=settings.kafka.feedback_topic,
        metrics=metrics,
        logs_topic=settings.kafka.logs_topic,
        decode_logs=logs_decoder_for(settings.ingest.encoding),
    )


def build_detector_stage(settings: Settings, store: EventStore, registry: CollectorRegistry) -> DetectorStage:
    """Stage 2 in this process (not open yet: its runner opens it, replaying the log)."""
    detector_metrics = DetectorMetrics(registry, max_modes=settings.detector.max_mode_series)

    def record(detector: FailureDetector, events: list) -> None:
        detector_metrics.record(detector.modes(), detector.state()["micro_clusters"], events)

    return DetectorStage(store, lambda: FailureDetector(settings.detector), on_batch=record)


def build_canary_judge(
    settings: Settings,
    store: EventStore,
    registry: CollectorRegistry,
    target_mode_for: TargetModeFor | None = None,
    clock: Callable[[], float] | None = None,
) -> CanaryJudge:
    """The canary judge; `target_mode_for` names the mode a version's patch aims at (by default the
    mode in the rationale of the patch cegraph made), `clock` its time (default: the wall clock)."""
    return CanaryJudge(
        store,
        settings.canary,
        target_mode_for=target_mode_for or patch_target_mode(store),
        metrics=CanaryMetrics(registry),
        clock=clock or time.time,
    )


def build_refiner(settings: Settings) -> Refiner:
    """Propose-and-Verify itself: the shadow target and the proposers, no store (it also runs on
    refine workers)."""
    llm, tools, evaluator_for = shadow_llm(settings)
    refiner_settings = settings.refiner
    target: ShadowTarget = (
        HttpShadowTarget(refiner_settings.shadow_url, timeout_s=settings.llm.timeout_s)
        if refiner_settings.shadow == "http" and refiner_settings.shadow_url
        else RuntimeShadowTarget(llm, tools=tools, evaluator_for=evaluator_for)
    )
    model = settings.llm.proposer_model
    proposers: dict[str, Proposer] = {
        "rules": RuleProposer(),
        "llm": LLMProposer(llm, model=model),
        "prompt_editor": PromptEditor(llm, model=model),
    }
    return Refiner(
        ShadowRunner(
            target,
            TextPolicy(settings.ingest.max_text_chars, settings.ingest.redact),
            concurrency=refiner_settings.concurrency,
        ),
        [proposers[name] for name in refiner_settings.proposers],
        refiner_settings,
        retrievers=[name for name, tool in tools.items() if isinstance(tool, Retriever)],
    )


def build_refinement(
    settings: Settings,
    store: EventStore,
    stage: DetectorStage,
    metrics: RefinementMetrics,
    workers: tuple[RecordTransport, RecordSource] | None = None,
) -> RefinementStage:
    """The refine stage: triggers become jobs, run here or, with `workers` (the jobs topic out, the
    job-results topic in), on refine workers."""
    refiner_settings = settings.refiner
    registry = WorkflowRegistry(store)
    replay = ReplayStore(store, retention=refiner_settings.replay_retention)
    reader = JobReader(store, registry, replay, sample=refiner_settings.replay_sample)
    jobs: JobExecutor = (
        LocalJobs(reader, build_refiner(settings), stage.classifier)
        if workers is None
        else RemoteJobs(reader, stage.frozen, *workers)
    )
    scheduler = RefinementScheduler(
        store, cooldown_s=refiner_settings.cooldown_s, deploy_wait_s=refiner_settings.deploy_wait_s
    )
    key = settings.publisher.signing_key
    return RefinementStage(
        scheduler, jobs, registry, signing_key=key.get_secret_value() if key else None, metrics=metrics
    )


@dataclass
class Stages:
    """The pipeline after ingest, built once for the Kafka daemon and the embedded one alike."""

    detector: DetectorStage
    refine: RefinementStage
    judge: CanaryJudge
    outbox: PatchOutbox
    runner: Runner
    metrics: StageMetrics
    refinement_metrics: RefinementMetrics


def build_stages(
    settings: Settings,
    store: EventStore,
    registry: CollectorRegistry,
    transport: Callable[[str], Transport],
    *,
    refining: bool,
    judging: bool,
    clock: Callable[[], float] | None = None,
    received: RecordSource | None = None,
    workers: tuple[RecordTransport, RecordSource] | None = None,
) -> Stages:
    """Read top to bottom, this is the pipeline after ingest: with ingest in other processes, the
        failures topic's records come into the log (`received`); the detector turns what ingest stored
        (or sent) into failures, modes and mass; with an LLM endpoint the namer gives modes display
        names; the refine stage (when `refining`) turns triggers into patches (here, or through the jobs
    topic on refine workers: `workers`, the jobs topic out and the job-results topic in); the canary
    judge (when
        `judging`) turns canaries into decisions; two outbox publishers send patches and decisions
        through `transport(topic)`. Each is a `Stage` on a `StageRunner`."""
    metrics = StageMetrics(registry)
    runners = (
        [] if received is None else [StageRunner(store, FailuresReceiver(store, received), metrics=metrics)]
    )
    detector = build_detector_stage(settings, store, registry)
    runners.append(StageRunner(store, detector, metrics=metrics))
    if settings.llm.backend == "openai":  # the simulated LLM answers tasks only
        namer = ModeNamer(store, openai_backend(settings), model=settings.llm.proposer_model)
        runners.append(StageRunner(store, namer, metrics=metrics, poll_s=NAMING_INTERVAL_S))
    refinement_metrics = RefinementMetrics(registry)
    refine = build_refinement(settings, store, detector, refinement_metrics, workers if refining else None)
    if refining:
        runners.append(StageRunner(store, refine, metrics=metrics))
    judge = build_canary_judge(settings, store, registry, clock=clock)
    if judging:
        runners.append(StageRunner(store, judge, metrics=metrics, poll_s=settings.canary.interval_s))
    outbox = PatchOutbox.configured(store, settings)
    kafka = settings.kafka
    patches = OutboxPublisher(
        outbox, transport(kafka.patches_topic), on_sent=lambda _: refinement_metrics.published.inc()
    )
    rollouts = OutboxPublisher(RolloutOutbox(store), transport(kafka.rollouts_topic))
    runners += [StageRunner(store, patches, metrics=metrics), StageRunner(store, rollouts, metrics=metrics)]
    return Stages(detector, refine, judge, outbox, Runner(runners), metrics, refinement_metrics)


def build(settings: Settings) -> Starlette:
    """The process `cegraph run` serves: every stage (the default), or those `settings.stages`
    names: ingest members publish to the failures topic what a detect member reads."""
    store = EventStore.configured(settings.store)
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    kafka = settings.kafka
    ingest, detecting, refining = settings.runs("ingest"), settings.runs("detect"), settings.runs("refine")
    stages = worker = None
    if detecting:
        workers = (
            KafkaRecordTransport(kafka, kafka.jobs_topic, max_request_size=MAX_JOB_BYTES),
            KafkaRecordSource(kafka, kafka.job_results_topic),
        )
        stages = build_stages(
            settings, store, registry, lambda topic: KafkaTransport(kafka, topic),
            refining=settings.refiner.enabled, judging=settings.runs("rollout") and settings.canary.enabled,
            received=None if ingest else KafkaRecordSource(kafka, kafka.failures_topic),
            workers=None if refining else workers,
        )  # fmt: skip
        runner = stages.runner
    elif ingest:
        publisher = FailuresPublisher(store, KafkaRecordTransport(kafka, kafka.failures_topic))
        runner = Runner([StageRunner(store, publisher, metrics=StageMetrics(registry))])
    else:
        runner = Runner([])
    if refining and not detecting:
        embedder = functools.partial(embedder_for, settings.detector)
        worker = KafkaRefineWorker(kafka, RefineWorker(build_refiner(settings), embedder))
    source = None
    if ingest:
        after = runner[DETECT if detecting else PUBLISH_FAILURES]
        backpressure = Backpressure([after], settings.ingest.max_detector_lag, after.metrics)
        source = KafkaIngestSource(
            settings,
            build_pipeline(settings, store, metrics),
            after_flush=after.wake,
            backpressure=backpressure.wait,
            handed_on=None if detecting else after.position,
        )

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        topics = [
            kafka.spans_topic,
            kafka.feedback_topic,
            kafka.dlq_topic,
            kafka.patches_topic,
            kafka.rollouts_topic,
            *([kafka.logs_topic] if kafka.logs_topic else []),
            *([kafka.failures_topic] if not (ingest and detecting) else []),
        ]
        await asyncio.to_thread(ensure_topics, kafka, topics)
        if detecting != refining:  # jobs go between processes
            big = {"max.message.bytes": str(MAX_JOB_BYTES)}
            await asyncio.to_thread(ensure_topics, kafka, [kafka.jobs_topic], kafka.jobs_partitions, big)
            await asyncio.to_thread(ensure_topics, kafka, [kafka.job_results_topic], 1, big)
        if detecting and settings.publisher.signing_key is None:
            log.warning("no CEGRAPH_PUBLISHER__SIGNING_KEY: patches are kept in the outbox, not published")
        # opening replays: the detector's state from the log, the publishers' view of their topics
        await asyncio.to_thread(runner.start)
        if source is not None:
            await source.start()
        if worker is not None:
            worker.start()
        log.info("running %s against %s", settings.stages, kafka.bootstrap_servers)
        try:
            yield
        finally:
            if source is not None:
                backpressure.release()
                await source.stop()
            if worker is not None:
                await asyncio.to_thread(worker.stop)
            await asyncio.to_thread(runner.stop)
            store.close()

    async def ready() -> dict[str, bool]:
        try:
            await asyncio.to_thread(store.query, "SELECT 1")
            store_ok = True
        except Exception:
            store_ok = False
        if source is None:
            return {"store": store_ok}
        kafka_ok = bool(await source.broker.ping(timeout=2.0))
        return {"kafka": kafka_ok, "store": store_ok, "ingest": source.ready}

    async def stats(_: Request) -> dict[str, Any]:
        """This process's store, and which stages it runs: with stages apart, the deployment's
        executions are the sum over the ingest members, its modes the detect member's."""
        covers: dict[str, Any] = {"runs": settings.stages}
        if source is not None:
            covers["assigned"] = source.assigned()
        if stages is not None:
            covers["sequenced"] = stages.detector.sequenced()
        if worker is not None:
            covers["jobs"] = {"done": worker.done, "running": worker.running}
        return {**covers, **await asyncio.to_thread(store.stats)}

    async def modes(_: Request) -> list[dict[str, Any]]:
        return await asyncio.to_thread(named_modes, store)

    token = settings.http.token.get_secret_value() if settings.http.token else None
    workflows = workflow_routes(WorkflowRegistry(store))
    read_routes: list = [("/stats", stats)]
    write_routes: list = []
    if stages is not None:
        patches = patch_routes(stages.outbox, token=token)
        read_routes += [
            ("/modes", modes),
            *patches.read,
            *workflows.read,
            *inspection_routes(store, stages.judge),
        ]
        write_routes += [*workflows.write, *patches.write]
    return create_app(
        ready=ready,
        read_routes=read_routes,
        write_routes=write_routes,
        token=token,
        metrics=settings.metrics.enabled,
        metrics_need_token=settings.http.metrics_need_token,
        max_body_bytes=settings.http.max_body_bytes,
        registry=registry,
        lifespan=lifespan,
    )


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.http.token is None and not is_loopback(settings.http.host):
        log.warning(
            "serving %s without a token (CEGRAPH_HTTP__ALLOW_UNAUTHENTICATED=true): anyone who reaches "
            "it reads trace text and registers workflows",
            settings.http.host,
        )
    app = build(settings)
    gc_policy.settle()  # after start-up: what it made is long-lived
    uvicorn.run(
        app,
        host=settings.http.host,
        port=settings.http.port,
        log_level=settings.log_level.lower(),
        lifespan="on",
    )
