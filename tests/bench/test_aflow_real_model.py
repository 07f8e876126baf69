"""The AFlow-style search with a real model as its optimizer (`bench_refinement.py --aflow-model real`):
each expansion is the model's answer, parsed into an edit of the operator grammar or counted as a
rejected expansion with its reason, never an exception; every answered request is a call of the
budget. The workflow runs on the simulated world; only the optimizer is real."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from llm_server import ModelServer

from cegraph.daemon.demo.scenario import PHASES, WORKFLOW
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.sim.llm import RememberingSimLLM
from cegraph.daemon.sim.traffic import Phase, TaskMix
from cegraph.schemas.workflow import example_spec, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from refinement_methods import Setup, aflow

pytestmark = pytest.mark.long(minutes=1)

OPTIMIZER_CALLS = 3  # what the budget leaves for the optimizer after the base spec's paid rounds


class Answered:
    """The backend, counting the requests the server answered (one that raised is no answer)."""

    def __init__(self, backend) -> None:
        self.backend, self.provider, self.count = backend, backend.provider, 0

    async def complete(self, messages, **arguments):
        completion = await self.backend.complete(messages, **arguments)
        self.count += 1
        return completion


def test_real_expansions_are_counted_in_the_budget_and_refused_answers_are_counted_with_reasons(
    llm_server: ModelServer,
):
    world = SimWorld(0)
    base = example_spec(WORKFLOW, tools=list(world.tools()))
    mix = TaskMix(world, [Phase(0, PHASES[-1].weights)], seed=0)
    setup = Setup(0, world, base, mix, recorded=40, validation=20, llm=RememberingSimLLM(world))
    # the base spec's second validation round is paid (the first is the recorded traffic); the
    # budget leaves room for OPTIMIZER_CALLS answers, or fewer and one child's evaluation
    paid = sum(run.calls for run in setup.runs(base, setup.validation, repeat=1))
    optimizer = Answered(llm_server.backend(max_tokens=160))
    budget = paid + OPTIMIZER_CALLS
    curve = aflow(
        setup, budget, repeats=2, optimizer=optimizer, fallback=False, max_optimizer_calls=2 * OPTIMIZER_CALLS
    )
    notes = curve.notes
    assert notes["optimizer_calls"] == optimizer.count
    assert 1 <= optimizer.count <= OPTIMIZER_CALLS
    assert "stopped" not in notes, notes["stopped"]  # the budget ended it: the real calls were in it
    assert notes["expansions_from_llm"] + notes["rejected_expansions"] == optimizer.count
    assert notes["expansions"] == notes["expansions_from_llm"]  # no fallback edit in place of an answer
    assert sum(notes["rejections"].values()) >= notes["rejected_expansions"]
    assert all(reason.strip() for reason in notes["rejections"])
    assert len(notes["rejected_answers"]) == min(3, notes["rejected_expansions"])
    for spent, spec in curve.points:
        assert spent <= budget
        assert parse_spec(spec.canonical(), tools=world.tools()).content_hash == spec.content_hash
