"""SimWorld: the seeded simulated world: its task families, knowledge base, tools and evaluators."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cegraph.daemon.sim.arithmetic import Arithmetic
from cegraph.daemon.sim.coding import Coding
from cegraph.daemon.sim.core import Family, Rates, Task, rng_for
from cegraph.daemon.sim.extraction import Extraction
from cegraph.daemon.sim.judging import Judging
from cegraph.daemon.sim.llm import SimLLM
from cegraph.daemon.sim.qa import QA, KnowledgeBase
from cegraph.daemon.workflows.runtime import EvaluationResult, ExecutionResult
from cegraph.daemon.workflows.sandbox import Sandbox
from cegraph.daemon.workflows.tools import Retriever, Tool


@dataclass(frozen=True)
class TaskEvaluator:
    """The evaluator of one task (the runtime's `Evaluator`): the family's ground-truth verdict, as the
    world's `Judging` states it (with bare labels it blames no node either)."""

    family: Family
    task: Task
    judging: Judging = field(default_factory=Judging)

    async def evaluate(self, result: ExecutionResult) -> list[EvaluationResult]:
        found = await self.family.evaluate(self.task, result)
        if self.judging == Judging():
            return [found]
        passed, explanation = self.judging.verdict(
            bool(found.passed), found.explanation, self.task.input, result.seed, result.output
        )
        blamed = None if passed or self.judging.critiques == "labels" else found.node_id
        score = found.score if passed == found.passed else float(passed)
        return [found.model_copy(update={"passed": passed, "explanation": explanation, "node_id": blamed,
                                         "score": score})]  # fmt: skip


class SimWorld:
    """Everything in the world derives from `seed`: the knowledge base and every generated task."""

    def __init__(
        self, seed: int = 0, *, rates: Rates | None = None, sandbox: Sandbox | None = None,
        judging: Judging | None = None,
    ) -> None:  # fmt: skip
        self.seed = seed
        self.rates = rates or Rates()
        self.judging = judging or Judging()
        self.sandbox = sandbox or Sandbox()
        self.kb = KnowledgeBase.generate(rng_for("kb", seed), self.rates.popularity)
        families: list[Family] = [Arithmetic(self), Extraction(self), QA(self), Coding(self)]
        self.families = {family.name: family for family in families}

    def task(self, family: str, index: int, **options: Any) -> Task:
        """Task `index` of a family; `options` narrow it (digits, steps, distractors, hops, difficulty)."""
        rng = rng_for("task", self.seed, family, index, sorted(options.items()))
        return self.families[family].generate(rng, index, **options)

    def tasks(self, family: str, count: int, *, start: int = 0, **options: Any) -> list[Task]:
        return [self.task(family, index, **options) for index in range(start, start + count)]

    def recognize(self, text: str) -> tuple[Family, Any] | None:
        """The family and problem a prompt is about, if any."""
        for family in self.families.values():
            problem = family.find(text)
            if problem is not None:
                return family, problem
        return None

    def task_for_input(self, task_input: Mapping[str, Any]) -> Task | None:
        """The task a replayed input poses, with its ground truth recomputed; None when no family
        recognizes it (then it cannot be judged in shadow)."""
        text = "\n".join(value for value in task_input.values() if isinstance(value, str))
        recognized = self.recognize(text)
        if recognized is None:
            return None
        family, problem = recognized
        return Task(family=family.name, id="replayed", input=dict(task_input), truth=family.truth(problem))

    def reference_for(self, task_input: Mapping[str, Any]) -> dict[str, Any] | None:
        """The reference of a task input for a spec's evaluators (`Task.reference`), or None."""
        task = self.task_for_input(task_input)
        return None if task is None else task.reference

    def tools(self) -> dict[str, Tool | Retriever]:
        return {tool.name: tool for family in self.families.values() for tool in family.tools()}

    def evaluator(self, task: Task) -> TaskEvaluator:
        return TaskEvaluator(self.families[task.family], task, self.judging)

    def llm(self) -> SimLLM:
        return SimLLM(self)
