"""SimLLM with its answers remembered gives every execution exactly what SimLLM gives, and answers a
repeated call without computing it again: what the refinement benchmark's speed rests on."""

from __future__ import annotations

import asyncio

from opentelemetry.trace import NoOpTracerProvider

from cegraph.daemon.refine.operators import Edit, apply_edit
from cegraph.daemon.sim import SimLLM, SimWorld
from cegraph.daemon.sim.llm import RememberingSimLLM
from cegraph.daemon.workflows.runtime import ExecutionResult, WorkflowRuntime
from cegraph.schemas.workflow import example_spec


def executions(llm: SimLLM, world: SimWorld, specs, tasks) -> list[ExecutionResult]:
    runtime = WorkflowRuntime(llm, NoOpTracerProvider(), tools=world.tools())

    async def all_of() -> list[ExecutionResult]:
        return [
            await runtime.execute(spec, task.input, seed=seed, evaluator=world.evaluator(task))
            for spec in specs
            for seed, task in enumerate(tasks)
        ]

    return asyncio.run(all_of())


def test_remembered_answers_are_simllms_and_a_repeated_call_is_not_computed_again(monkeypatch):
    world = SimWorld(3)
    base = example_spec("qa", tools=list(world.tools()))
    # an ensemble at a warm temperature: calls that differ only by their seed must stay apart
    hot, _ = apply_edit(base, Edit(node="answer", operator="ensemble", samples=3), "1.1.0")
    tasks = world.tasks("qa", 12)
    plain = executions(SimLLM(world), world, [base, hot], tasks)
    computed: list[str] = []
    respond = SimLLM._respond

    def counting(self, call):
        computed.append(call.purpose)
        return respond(self, call)

    monkeypatch.setattr(SimLLM, "_respond", counting)
    remembering = RememberingSimLLM(world)
    first = executions(remembering, world, [base, hot], tasks)
    calls = len(computed)
    again = executions(remembering, world, [base, hot], tasks)
    assert [r.model_dump(exclude={"trace_id"}) for r in first] == [
        r.model_dump(exclude={"trace_id"}) for r in plain
    ]
    assert [r.model_dump(exclude={"trace_id"}) for r in again] == [
        r.model_dump(exclude={"trace_id"}) for r in plain
    ]
    assert calls == sum(sum(node.llm_calls for node in r.nodes) for r in first) > 0  # none remembered yet
    assert len(computed) == calls  # the second pass computed nothing


def test_a_bounded_memory_keeps_its_capacity_and_answers_what_simllm_answers():
    world = SimWorld(4)
    base = example_spec("qa", tools=list(world.tools()))
    hot, _ = apply_edit(base, Edit(node="answer", operator="ensemble", samples=3), "1.1.0")
    tasks = world.tasks("qa", 8)
    plain = executions(SimLLM(world), world, [base, hot, base], tasks)
    small = RememberingSimLLM(world, capacity=5)  # far fewer than the distinct calls: most are dropped
    bounded = executions(small, world, [base, hot, base], tasks)
    assert [r.model_dump(exclude={"trace_id"}) for r in bounded] == [
        r.model_dump(exclude={"trace_id"}) for r in plain
    ]
    assert len(small._answers) == small.capacity
