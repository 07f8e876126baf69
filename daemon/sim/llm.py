"""SimLLM: the simulated model behind the same `LLMBackend` interface as a real endpoint.

It reads what the workflow actually gives it: the task in the messages (recognized by the world's
families), retrieved facts in the context, the instructions in the system prompt, the purpose of the
call (the node kind it is called as), earlier attempts and feedback in the conversation, temperature
and max_tokens. Everything random comes from the call's seed, so results repeat per seed, and a
completion is a function of the call's arguments (`RememberingSimLLM` answers a distinct call once, up to
its capacity).
"""

from __future__ import annotations

import json
import random
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cegraph.daemon.sim import refiner_model
from cegraph.daemon.sim.core import Family, SimCall, answer_of, count_tokens, lenient_json, truncate
from cegraph.daemon.workflows.llm import CallContext, Completion, Message

if TYPE_CHECKING:
    from cegraph.daemon.sim.world import SimWorld

_TARGET = re.compile(r"required output format: (json|number|text)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FAILED = re.compile(r"VERDICT:\s*FAIL|tests? failed|does not run", re.I)


class SimLLM:
    provider = "cegraph-sim"

    def __init__(self, world: SimWorld) -> None:
        self.world = world

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int | None,
        seed: int,
        context: CallContext,
    ) -> Completion:
        call = SimCall(messages, model, temperature, context, random.Random(seed))
        text, finish = self._respond(call), "stop"
        if max_tokens is not None and count_tokens(text) > max_tokens:
            text, finish = truncate(text, max_tokens), "length"
        return Completion(
            text=text,
            input_tokens=sum(count_tokens(message.content) for message in messages),
            output_tokens=count_tokens(text),
            finish_reason=finish,
            model=model,
        )

    def _respond(self, call: SimCall) -> str:
        if call.purpose == "format":
            return self._format(call)
        if call.purpose == "propose":
            return refiner_model.propose(call, self.world.rates)
        if call.purpose == "critique":
            return refiner_model.rewrite(call, self.world.rates)
        recognized = self.world.recognize(call.text)
        if recognized is None:
            return "I cannot tell what the task is."
        family, problem = recognized
        if call.purpose == "answer":
            return family.answer(problem, call)
        if call.purpose == "code":
            return family.program(problem, call)
        if call.purpose == "tool_arguments":
            return family.tool_arguments(problem, call)
        candidate = call.sections.get("answer") or call.sections.get("code", "")
        if call.purpose == "review":
            return self._review(family, problem, candidate, call)
        # revise / fix: follow the review or the failing tests, or leave a passing answer alone
        critique = call.sections.get("review") or call.sections.get("test_results") or ""
        if not _FAILED.search(critique):
            return candidate
        if call.rng.random() < self.world.rates.fix_success:
            return family.corrected(problem, candidate, call)
        return family.answer(problem, call)

    def _review(self, family: Family, problem: Any, candidate: str, call: SimCall) -> str:
        rates = self.world.rates
        critique = family.judge(problem, candidate, call)
        if critique is not None and call.rng.random() < rates.review_detect:
            return f"VERDICT: FAIL\n{critique}"
        if critique is None and call.rng.random() < rates.review_false_alarm:
            return "VERDICT: FAIL\nI am not sure the answer is right; please check it again."
        return "VERDICT: PASS\nThe answer looks correct."

    def _format(self, call: SimCall) -> str:
        """Rewrites the answer it is given (not the truth) in the requested format."""
        candidate = call.sections.get("answer", "")
        if call.rng.random() < self.world.rates.format_node_violation:
            return f"Here is the answer in the requested format:\n{candidate}"
        match = _TARGET.search(call.system)
        target = match.group(1) if match else "text"
        if target == "json":
            data = lenient_json(candidate)
            return candidate if data is None else json.dumps(data)
        value = answer_of(candidate)
        if target == "number":
            numbers = _NUMBER.findall(value if value is not None else candidate)
            return numbers[-1].replace(",", "") if numbers else candidate
        return value if value is not None else candidate.strip()


class RememberingSimLLM(SimLLM):
    """`SimLLM`, with its completions remembered by the call's arguments. A benchmark asks the same
    question with the same seed many times (the same candidate on the same validation inputs, a
    node an edit left alone, three variants reading the same recorded traffic) and learns nothing
    from the second answer: it is the first one, since the simulated model reads nothing else. The
    caller still counts every call it makes.

    At most `capacity` completions are kept, the least recently asked dropped first: a dropped one is
    computed again, and comes out the same, so the bound costs time, never a different answer (a
    refinement benchmark seed asks about 30,000 distinct calls)."""

    def __init__(self, world: SimWorld, *, capacity: int = 100_000) -> None:
        super().__init__(world)
        self.capacity = capacity
        self._answers: OrderedDict[tuple, Completion] = OrderedDict()

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int | None,
        seed: int,
        context: CallContext,
    ) -> Completion:
        key = (tuple((m.role, m.content) for m in messages), model, temperature, max_tokens, seed, context)
        known = self._answers.get(key)
        if known is not None:
            self._answers.move_to_end(key)
            return known
        known = await super().complete(
            messages, model=model, temperature=temperature, max_tokens=max_tokens, seed=seed, context=context
        )
        self._answers[key] = known
        if len(self._answers) > self.capacity:
            self._answers.popitem(last=False)
        return known
