"""`cegraph simulate`: the deployed service of demos and benchmarks, as a command.

A thin shell around `TrafficGenerator`: it builds the simulated world and the runtime, sends the spans
to the spans topic through the OTel SDK, follows the decision topics and prints progress.
"""

from __future__ import annotations

import asyncio
import logging
import re
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cegraph.daemon.cli.common import fail, load_spec, out, settings_or_exit

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from cegraph.connectors.kafka.decision_consumer import DecisionConsumer
    from cegraph.daemon.settings import Settings
    from cegraph.daemon.sim.traffic import Snapshot, TrafficGenerator

_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([sm]))?\s*$")


class Sink(StrEnum):
    kafka = "kafka"
    stdout_summary = "stdout-summary"


def parse_rate(text: str) -> float:
    """`20`, `20/s` or `600/m` as executions per second."""
    match = _RATE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a positive rate such as 20/s or 600/m")
    return float(match.group(1)) / (60 if match.group(2) == "m" else 1)


def simulate(
    workflow: Annotated[str, typer.Option(help="The stable spec: a JSON file or a shipped example's name.")],
    canary: Annotated[str | None, typer.Option(help="A canary version of it: a file or an example.")] = None,
    canary_weight: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of executions on the canary (also one a patch starts)."),
    ] = 0.1,
    rate: Annotated[str, typer.Option(help="Executions started per second: 20, 20/s or 600/m.")] = "20/s",
    count: Annotated[int | None, typer.Option(min=1, help="Stop after this many executions.")] = None,
    duration: Annotated[float | None, typer.Option(min=0.0, help="Stop after this many seconds.")] = None,
    family: Annotated[
        str | None,
        typer.Option(help="Task family: arithmetic, extraction, qa or coding (default: as the workflow id)."),
    ] = None,
    mix: Annotated[
        str | None,
        typer.Option(
            help="A mix of task sources that changes over time instead of one family: 'demo' (the demo's), "
            'or a JSON file [{"start": 0, "weights": {"arithmetic:digits=5": 1, "qa": 1}}, ...].'
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the world, the tasks and the canary split.")] = 0,
    concurrency: Annotated[int, typer.Option(min=1, help="Executions in flight at most.")] = 64,
    sink: Annotated[
        Sink,
        typer.Option(help="kafka: spans to Kafka, decisions followed; stdout-summary: nothing leaves."),
    ] = Sink.kafka,
    one_trace_per_message: Annotated[
        bool,
        typer.Option("--one-trace-per-message/--batched", help="As the collector's partition_traces_by_id."),
    ] = True,
    progress_every: Annotated[float, typer.Option(min=0.1, help="Seconds between progress lines.")] = 5.0,
) -> None:
    """Run simulated traffic through a workflow, split between a stable and a canary version.

    The tasks come from the simulated families; they are answered by the simulated LLM, or with
    CEGRAPH_LLM__BACKEND=openai by that endpoint and judged by the spec's evaluators.

    Follows the patches and rollout decisions published while it runs. Without --count or --duration
    it runs until Ctrl-C.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    from cegraph.daemon.sim import SimWorld
    from cegraph.daemon.sim.traffic import TrafficGenerator, infer_family
    from cegraph.daemon.workflows.runtime import WorkflowRuntime

    settings = settings_or_exit()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if count is not None and duration is not None:
        fail("give --count or --duration, not both")
    stable = load_spec(workflow)
    canary_spec = load_spec(canary) if canary is not None else None
    world = SimWorld(seed)
    tasks = _mix(mix, world, seed) if mix is not None else None
    family = None if tasks is not None else family or infer_family(stable, world.families)
    if tasks is None and family is None:
        fail(f"which task family does {stable.id} run? Pass --family ({', '.join(world.families)})")
    provider = TracerProvider(resource=Resource.create({"service.name": "cegraph-simulate"}))
    llm, evaluator_for = _answered_by(settings, world)
    runtime = WorkflowRuntime(llm, provider, tools=world.tools())
    try:
        generator = TrafficGenerator(
            runtime, world, stable, family=family, tasks=tasks, canary=canary_spec,
            canary_weight=canary_weight,
            rate=parse_rate(rate), seed=seed, concurrency=concurrency, evaluator_for=evaluator_for,
        )  # fmt: skip
    except ValueError as error:
        fail(str(error))
    consumer = _connect(settings, generator, provider, one_trace_per_message) if sink is Sink.kafka else None
    interrupted = False
    try:
        asyncio.run(_run(generator, count, duration, progress_every))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if consumer is not None:
            consumer.stop()
        provider.shutdown()  # exports the spans still batched
    _summary(generator.snapshot())
    if interrupted:
        raise typer.Exit(130)


def _answered_by(settings: Settings, world):
    """Who answers the tasks: the simulated LLM, judged by its world (sim); or the configured endpoint
    (openai), judged by the spec's evaluators with the task's ground truth as the reference."""
    if settings.llm.backend == "sim":
        return world.llm(), None
    from cegraph.connectors.llm.config import evaluation, openai_backend

    llm = openai_backend(settings)
    judges = evaluation(settings, llm)
    return llm, lambda spec, task: judges.evaluator(spec, task.reference)


def _mix(source: str, world, seed: int):
    """The task mix of --mix: the demo's phases, or phases from a JSON file."""
    import json
    from pathlib import Path

    from cegraph.daemon.sim.traffic import Phase, TaskMix

    if source == "demo":
        from cegraph.daemon.demo.scenario import PHASES

        phases = PHASES
    else:
        try:
            phases = [
                Phase(int(p["start"]), dict(p["weights"])) for p in json.loads(Path(source).read_text())
            ]
        except (OSError, ValueError, KeyError, TypeError) as error:
            fail(f"--mix {source}: not 'demo' or a JSON list of phases ({error})")
    try:
        return TaskMix(world, phases, seed=seed)
    except ValueError as error:
        fail(f"--mix {source}: {error}")


def _connect(
    settings: Settings, generator: TrafficGenerator, provider: TracerProvider, one_trace_per_message: bool
) -> DecisionConsumer:
    """Spans to the spans topic; patches and rollouts to the generator. Exits when Kafka can't be reached."""
    from kafka.errors import KafkaError
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from cegraph.connectors.kafka.client import ensure_topics
    from cegraph.connectors.kafka.decision_consumer import DecisionConsumer
    from cegraph.connectors.kafka.otlp_exporter import OtlpKafkaSpanExporter
    from cegraph.daemon.refine.signing import signed_only

    kafka = settings.kafka
    try:
        ensure_topics(kafka, [kafka.spans_topic, kafka.patches_topic, kafka.rollouts_topic])
        exporter = OtlpKafkaSpanExporter(kafka, partition_by_trace=one_trace_per_message)
        key = settings.publisher.signing_key
        # with a signing key, only patches signed with it are run
        on_patch = (
            signed_only(generator.apply_patch, key.get_secret_value()) if key else generator.apply_patch
        )
        consumer = DecisionConsumer(kafka, on_patch=on_patch, on_rollout=generator.apply_rollout)
        consumer.start()
    except (KafkaError, RuntimeError) as error:
        fail(f"Kafka at {kafka.bootstrap_servers}: {error}")
    # A queue that absorbs bursts at high rates: the SDK drops spans when its queue is full.
    processor = BatchSpanProcessor(exporter, max_queue_size=65_536, max_export_batch_size=2_048)
    provider.add_span_processor(processor)
    return consumer


async def _run(generator: TrafficGenerator, count: int | None, duration: float | None, every: float) -> None:
    async def report() -> None:
        while True:
            await asyncio.sleep(every)
            out.print(_progress(generator.snapshot()), highlight=False)

    reporter = asyncio.create_task(report())
    try:
        await generator.run(count=count, duration_s=duration)
    finally:
        reporter.cancel()


def _progress(snapshot: Snapshot) -> str:
    def track(name: str, version: str) -> str:
        counts = snapshot.counts.get((name, version))
        runs = 0 if counts is None else counts.executions
        rate = 0.0 if counts is None else counts.failure_rate
        return f"{name} {version}: {runs} runs, {rate:.1%} failed"

    line = f"{snapshot.elapsed_s:7.1f}s {snapshot.finished} done ({snapshot.rate:.1f}/s)  "
    line += track("stable", snapshot.stable)
    if snapshot.canary is not None:
        line += f" | {track('canary', snapshot.canary)} (weight {snapshot.canary_weight:g})"
    return line


def _summary(snapshot: Snapshot) -> None:
    table = Table(
        "track", "version", "executions", "failed", "failure rate", "errors",
        title=f"{snapshot.finished} executions in {snapshot.elapsed_s:.1f}s ({snapshot.rate:.1f}/s)",
    )  # fmt: skip
    for (track, version), counts in sorted(snapshot.counts.items()):
        table.add_row(
            track, version, str(counts.executions), str(counts.failed), f"{counts.failure_rate:.1%}",
            str(counts.errors),
        )  # fmt: skip
    out.print(table)
