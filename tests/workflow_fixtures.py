"""Workflow specs shared by the runtime and ingest tests, and a run of one through the real broker."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from cegraph.connectors.kafka.otlp_exporter import OtlpKafkaSpanExporter
from cegraph.daemon.settings import KafkaSettings
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.workflows.runtime import ExecutionResult, WorkflowRuntime
from cegraph.schemas.workflow import parse_spec

# retrieve -> answer -> review -> revise: four node spans per execution, all children of the root.
QA_REVIEWED = {
    "id": "qa-reviewed",
    "version": "1.2.0",
    "model": "sim-1",
    "input_schema": {"question": {"type": "string"}},
    "entry": "search",
    "output": "revise",
    "nodes": {
        "search": {"kind": "retrieve", "retriever": "kb_search", "inputs": {"query": "input.question"}},
        "answer": {"kind": "llm", "inputs": {"question": "input.question", "context": "search"}},
        "review": {"kind": "review", "inputs": {"question": "input.question", "answer": "answer"}},
        "revise": {
            "kind": "revise",
            "inputs": {"question": "input.question", "answer": "answer", "review": "review"},
        },
    },
    "edges": [
        {"source": "search", "target": "answer"},
        {"source": "answer", "target": "review"},
        {"source": "review", "target": "revise"},
    ],
}


async def run_qa_to_kafka(
    bootstrap: str, topic: str, *, executions: int, partition_by_trace: bool, seed: int
) -> list[ExecutionResult]:
    """QA_REVIEWED on SimLLM tasks, its spans exported to `topic` through the real SDK and exporter."""
    provider = TracerProvider(resource=Resource.create({"service.name": "qa-service"}))
    exporter = OtlpKafkaSpanExporter(
        KafkaSettings(bootstrap_servers=bootstrap), topic=topic, partition_by_trace=partition_by_trace
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    world = SimWorld(seed)
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())
    spec = parse_spec(QA_REVIEWED)
    tasks = world.tasks("qa", executions)
    results = await asyncio.gather(
        *(runtime.execute(spec, t.input, seed=i, evaluator=world.evaluator(t)) for i, t in enumerate(tasks))
    )
    assert provider.force_flush(30_000)
    provider.shutdown()
    return list(results)
