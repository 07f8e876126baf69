"""What every task family of the simulated world shares: tasks, seeded randomness, the rates table,
the view of one LLM call, and the evaluator plumbing.

Randomness comes from two places only. Per-call randomness (`SimCall.rng`) is seeded by the seed the
runtime derives from (execution seed, node id, call index), so a re-run with the same seed repeats
itself whatever else runs concurrently. Systematic behaviour (what the model does not know, the
slips it always makes on one question) is a hash of (model, question, ...), the same in every call:
sampling the model again cannot fix it, only a different workflow structure can.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, Field

from cegraph.daemon.workflows.evaluators import blame
from cegraph.daemon.workflows.llm import CallContext, Message
from cegraph.daemon.workflows.runtime import ANSWER_LINE, EvaluationResult, ExecutionResult
from cegraph.daemon.workflows.tools import Retriever, Tool

if TYPE_CHECKING:
    from cegraph.daemon.sim.world import SimWorld

_TOKEN = re.compile(r"\w+|[^\w\s]")
_SECTION = re.compile(r"^## (\w+)\n(.*?)(?=\n\n## \w+\n|\Z)", re.S | re.M)


def unit(*parts: object) -> float:
    """A number in [0, 1) that depends only on `parts` (stable across processes, unlike `hash`)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def rng_for(*parts: object) -> random.Random:
    return random.Random(int(unit(*parts) * 2**53))


def count_tokens(text: str) -> int:
    """The simulated tokenizer: a word, a number or a punctuation mark is one token."""
    return len(_TOKEN.findall(text))


def truncate(text: str, max_tokens: int) -> str:
    tokens = list(_TOKEN.finditer(text))
    return text if len(tokens) <= max_tokens else text[: tokens[max_tokens - 1].end()]


@dataclass(frozen=True)
class Rates:
    """Every probability of the simulated world, in one place (docs/simulation.md, the mechanisms table)."""

    random_slip_base: float = 0.02
    random_slip_per_temperature: float = 0.12
    carry_slip_per_digit: float = 0.03
    separator_copy: float = 0.1
    wrong_argument_name: float = 0.05
    times_sign: float = 0.25
    argument_repair: float = 0.9
    format_violation_base: float = 0.12
    format_violation_per_distractor: float = 0.05
    format_violation_per_temperature: float = 0.1
    format_instruction_factor: float = 0.5
    format_feedback_factor: float = 0.2
    format_node_violation: float = 0.01
    popularity: tuple[float, float] = (0.7, 1.0)
    code_bug_per_difficulty: float = 0.1
    code_bug_per_temperature: float = 0.1
    review_detect: float = 0.7
    review_false_alarm: float = 0.03
    fix_success: float = 0.85
    filler_weights: tuple[float, ...] = (0.35, 0.3, 0.2, 0.1, 0.05)
    brevity_compliance: float = 0.9
    injection_compliance: float = 1.0

    def random_slip(self, temperature: float) -> float:
        return self.random_slip_base + self.random_slip_per_temperature * temperature


class Task(BaseModel):
    """One generated task: what the workflow gets (`input`) and what only the evaluator sees (`truth`)."""

    family: str
    id: str
    input: dict[str, Any]
    truth: dict[str, Any]
    features: dict[str, Any] = Field(default_factory=dict, description="Difficulty descriptors.")

    @property
    def reference(self) -> dict[str, Any]:
        """The truth as a reference for a spec's evaluators: `{family: truth}`, so each reference
        check reads the family it is written for (e.g. `arithmetic.answer`)."""
        return {self.family: self.truth}


@dataclass
class SimCall:
    """One LLM call as the simulated model sees it."""

    messages: Sequence[Message]
    model: str
    temperature: float
    context: CallContext
    rng: random.Random
    text: str = field(init=False)
    system: str = field(init=False)
    sections: dict[str, str] = field(init=False)
    feedback: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.text = "\n\n".join(message.content for message in self.messages)
        self.system = "\n".join(m.content for m in self.messages if m.role == "system")
        first_user = next((m.content for m in self.messages if m.role == "user"), "")
        self.sections = {name: body.strip() for name, body in _SECTION.findall(first_user)}
        # A conversation that already holds an answer of ours: the last user turn is feedback on it.
        has_answer = any(m.role == "assistant" for m in self.messages)
        self.feedback = self.messages[-1].content if has_answer and self.messages[-1].role == "user" else None

    @property
    def purpose(self) -> str:
        return self.context.purpose


class Family(ABC):
    """A task family: generates tasks, recognizes them in prompts, answers them and judges answers."""

    name: ClassVar[str]
    check: ClassVar[str]

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self.rates = world.rates

    @abstractmethod
    def generate(self, rng: random.Random, index: int, **options: Any) -> Task: ...

    @abstractmethod
    def find(self, text: str) -> Any | None:
        """The problem this family recognizes in a prompt, or None."""

    @abstractmethod
    def truth(self, problem: Any) -> dict[str, Any]:
        """The ground truth of a recognized problem: what lets a replayed input be judged again."""

    @abstractmethod
    def answer(self, problem: Any, call: SimCall) -> str: ...

    @abstractmethod
    def judge(self, problem: Any, candidate: str, call: SimCall) -> str | None:
        """What the model, by its own lights, finds wrong with `candidate`; None when it looks right."""

    @abstractmethod
    def corrected(self, problem: Any, candidate: str, call: SimCall) -> str:
        """The model's revision of a candidate it was told is wrong."""

    @abstractmethod
    async def verdict(self, task: Task, output: str) -> tuple[bool, float, str]:
        """(passed, score, explanation) of an execution's output against the task's truth."""

    def program(self, problem: Any, call: SimCall) -> str:
        """A program for the problem; by default one that prints the answer the model would give."""
        return f"```python\nprint({self.answer(problem, call)!r})\n```"

    def tool_arguments(self, problem: Any, call: SimCall) -> str:
        return "{}"

    def tools(self) -> list[Tool | Retriever]:
        return []

    async def evaluate(self, task: Task, result: ExecutionResult) -> EvaluationResult:
        name = f"{self.name}.{self.check}"
        if result.output is None:
            failed = next((run for run in result.nodes if run.status == "error"), None)
            reason = f"node {failed.node_id!r} raised {failed.error_type}" if failed else "no output node ran"
            return EvaluationResult(name=name, passed=False, score=0.0, explanation=f"no output: {reason}")
        passed, score, explanation = await self.verdict(task, result.output)
        return EvaluationResult(
            name=name,
            passed=passed,
            score=score,
            explanation=explanation,
            node_id=None if passed else blame(result),
        )


def answer_of(text: str) -> str | None:
    """The value of the last `Answer:` line."""
    lines = ANSWER_LINE.findall(text)
    return lines[-1].strip() if lines else None


def lenient_json(text: str) -> dict[str, Any] | None:
    """An object out of near-JSON (fenced, single-quoted, trailing commas, odd key case), or None."""
    match = re.search(r"\{.*\}", text, re.S)
    if match is None:
        return None
    body = re.sub(r",\s*}", "}", match.group(0))
    for candidate in (body, body.replace("'", '"')):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            return {str(key).lower(): value for key, value in data.items()}
    return None
