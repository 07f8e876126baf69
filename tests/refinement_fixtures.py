"""The planted arithmetic-slip scenario shared by the Propose-and-Verify tests.

Five-digit word problems at a low temperature with room to finish: nearly every failure is a carry
slip (systematic per model and question, DESIGN section 7), the mode a programmer node removes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from cegraph.daemon.events import REFINEMENT_FINISHED, Event
from cegraph.daemon.refine.refiner import JobEnd
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.sim.traffic import ExecutionIds, derive_ids_for
from cegraph.daemon.workflows.runtime import ExecutionResult, WorkflowRuntime
from cegraph.schemas.workflow import WorkflowSpec, parse_spec

ARITHMETIC_SLIP = parse_spec(
    {
        "id": "arithmetic-slip",
        "version": "1.0.0",
        "model": "sim-1",
        "input_schema": {"question": {"type": "string"}},
        "entry": "solve",
        "output": "solve",
        "nodes": {
            "solve": {
                "kind": "llm",
                "prompt": "Solve the word problem. Show your steps, then end with a line 'Answer: <number>'.",
                "inputs": {"question": "input.question"},
                "params": {"temperature": 0.2, "max_tokens": 400},
            }
        },
        "edges": [],
    }
)
DIGITS = 5


async def run_tasks(
    spec: WorkflowSpec,
    indices: Sequence[int],
    processor: SpanProcessor,
    *,
    world_seed: int = 0,
    edit_input: Callable[[str], str] | None = None,
    digits: int = DIGITS,
) -> list[ExecutionResult]:
    """Task i of the arithmetic family (five digits unless told) with seed i, its spans to `processor`;
    `edit_input` changes the question the workflow sees (not the truth it is judged by)."""
    world = SimWorld(world_seed)
    provider = TracerProvider(  # trace ids derived from the task index: the same input, the same run
        resource=Resource.create({"service.name": "arithmetic-service"}), id_generator=ExecutionIds()
    )
    provider.add_span_processor(processor)
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())

    async def one(index: int, task) -> ExecutionResult:
        derive_ids_for(f"{spec.id}@{spec.version}/{world_seed}", index)
        return await runtime.execute(spec, task.input, seed=index, evaluator=world.evaluator(task))

    results: list[ExecutionResult] = []
    for start in range(0, len(indices), 200):
        chunk = indices[start : start + 200]
        tasks = [world.task("arithmetic", i, digits=digits) for i in chunk]
        if edit_input is not None:
            tasks = [
                t.model_copy(update={"input": {"question": edit_input(t.input["question"])}}) for t in tasks
            ]
        results += await asyncio.gather(*(one(i, t) for i, t in zip(chunk, tasks, strict=True)))
    assert provider.force_flush(60_000)
    provider.shutdown()
    return results


class EndsAtOnce:
    """A refiner whose jobs end as soon as they run, with the outcome the test sets: what is tested
    here is which job runs when, not Propose-and-Verify."""

    def __init__(self, now: list[float]) -> None:
        self.now = now
        self.outcome = "no_patch"
        self.ran: list[str] = []

    async def run(self, job, classifier) -> JobEnd:
        self.ran.append(job.job_id)
        finished = {"job_id": job.job_id, "workflow_id": job.workflow_id, "mode": job.mode,
                    "finished_at": self.now[0], "outcome": self.outcome}  # fmt: skip
        return JobEnd(finished, [Event(REFINEMENT_FINISHED, job.workflow_id, finished)])
