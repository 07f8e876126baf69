"""The built-in shadow target: cegraph's own runtime on the configured LLM backend.

Each replayed input runs with its recorded seed on a tracer provider of its own (never the global
one, never the exporter that feeds production ingest); the spans are collected in memory and go
through the OTLP protobuf codec, so the daemon reads them exactly as it reads spans from Kafka.
Judging an output needs ground truth: `evaluator_for` gives the evaluator of a replayed input: the
simulated world's own judge (it recomputes the truth from the input), or the spec's evaluators
against the item's reference (recorded feedback's `expected`, or a reference source such as the
simulated task families' truth). Without one only hard failures count. The spec is the candidate's,
and operators never edit evaluators, so both sides of a comparison are judged alike.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from cegraph.connectors.otlp.codec import decode_proto
from cegraph.daemon.refine.replay import ReplayItem
from cegraph.daemon.refine.shadow import ShadowError
from cegraph.daemon.spans import SpanRecord
from cegraph.daemon.workflows.evaluators import Evaluation
from cegraph.daemon.workflows.llm import LLMBackend
from cegraph.daemon.workflows.runtime import Evaluator, WorkflowRuntime
from cegraph.daemon.workflows.tools import Retriever, Tool
from cegraph.schemas.workflow import WorkflowSpec, WorkflowSpecError

if TYPE_CHECKING:
    from cegraph.daemon.sim import SimWorld

EvaluatorFor = Callable[[WorkflowSpec, ReplayItem], Evaluator | None]
ReferenceOf = Callable[[Mapping[str, Any]], Any]


class _ByTrace(SpanProcessor):
    """Keeps ended spans per trace until their execution collects them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: dict[int, list[ReadableSpan]] = {}

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        with self._lock:
            self._spans.setdefault(span.context.trace_id, []).append(span)

    def pop(self, trace_id: int) -> list[ReadableSpan]:
        with self._lock:
            return self._spans.pop(trace_id, [])


class RuntimeShadowTarget:
    def __init__(
        self,
        llm: LLMBackend,
        *,
        tools: Mapping[str, Tool | Retriever] | None = None,
        evaluator_for: EvaluatorFor | None = None,
    ) -> None:
        self._spans = _ByTrace()
        provider = TracerProvider(resource=Resource.create({"service.name": "cegraph-shadow"}))
        provider.add_span_processor(self._spans)
        self.runtime = WorkflowRuntime(llm, provider, tools=tools)
        self.evaluator_for = evaluator_for

    async def run(self, spec: WorkflowSpec, item: ReplayItem) -> list[SpanRecord]:
        spans = await self.run_spans(spec, item)
        return decode_proto(encode_spans(spans).SerializeToString())

    async def run_spans(self, spec: WorkflowSpec, item: ReplayItem) -> list[ReadableSpan]:
        """The SDK's spans of the execution (what the HTTP reference endpoint serves)."""
        evaluator = self.evaluator_for(spec, item) if self.evaluator_for else None
        try:
            result = await self.runtime.execute(
                spec, item.input, seed=item.seed, track="shadow", evaluator=evaluator
            )
        except (WorkflowSpecError, ValueError) as error:
            raise ShadowError(f"the runtime refused the input or the spec: {error}") from None
        return self._spans.pop(int(result.trace_id, 16))


def sim_evaluator_for(world: SimWorld) -> EvaluatorFor:
    """Ground truth from the simulated world: it recognizes the task in the input."""

    def evaluator_for(spec: WorkflowSpec, item: ReplayItem) -> Evaluator | None:
        task = world.task_for_input(item.input)
        return None if task is None else world.evaluator(task)

    return evaluator_for


def reference_evaluator_for(
    evaluation: Evaluation, reference_of: ReferenceOf | None = None, *, feedback: bool = True
) -> EvaluatorFor:
    """The spec's evaluators, against the item's recorded reference (with `feedback`), else
    `reference_of(input)`."""

    def evaluator_for(spec: WorkflowSpec, item: ReplayItem) -> Evaluator | None:
        reference = item.reference if feedback else None
        if reference is None and reference_of is not None:
            reference = reference_of(item.input)
        return evaluation.evaluator(spec, reference)

    return evaluator_for
