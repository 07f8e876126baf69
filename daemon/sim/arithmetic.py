"""Arithmetic word problems: a running total changed by two or three operations.

Mechanisms: carry slips (systematic per model and question, more likely with more digits; a program
or a calculator computes exactly), random slips (a misread operand; more likely with temperature),
truncation (a verbose chain of thought cut off by max_tokens), and, when the model fills the
calculator's arguments, argument errors (thousands separators copied from the question, `x` for
multiplication, a wrong argument name) that a validation-and-repair loop removes. The option
`opening` words the starting count ("starts with", the default, or "holds"): a router that keys on the
first wording sends the second elsewhere, where the failure shows downstream of its cause.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cegraph.daemon.sim.core import Family, SimCall, Task, answer_of, unit
from cegraph.daemon.sim.refiner_model import BRIEF
from cegraph.daemon.workflows.tools import Retriever, Tool, ToolArgumentError

PLACES = (
    ("warehouse", "crates", "crate"),
    ("library", "books", "book"),
    ("farm", "eggs", "egg"),
    ("depot", "pallets", "pallet"),
    ("bakery", "loaves", "loaf"),
)
FILLERS = (
    "Let me work through this carefully, one step at a time.",
    "I will keep a running total of the count as it changes.",
    "Each sentence of the problem changes the total, so I follow them in order.",
    "It helps to write every intermediate result down explicitly.",
)
# how a problem states its starting count: the service's router knows the first wording only
OPENINGS = ("starts with", "holds")
_START = re.compile(r"A (\w+) (?:starts with|holds) ([\d,]+) (\w+)\.")
_STEP = re.compile(
    r"A delivery brings (?P<add1>[\d,]+) more \w+\.|Then (?P<add2>[\d,]+) more \w+ arrive\."
    r"|(?:Then|Later) (?P<sub>[\d,]+) \w+ are (?:shipped out|sold)\."
    r"|Each \w+ is worth (?P<mul>[\d,]+) dollars\."
)
_WORKED = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_VERBS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}


def _digits(value: int) -> int:
    return len(str(abs(value)))


@dataclass(frozen=True)
class Problem:
    text: str
    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def expression(self) -> str:
        terms = str(self.start)
        for op, value in self.steps:
            terms = f"({terms}) * {value}" if op == "*" else f"{terms} {op} {value}"
        return terms


@dataclass(frozen=True)
class Step:
    op: str
    operand: int
    before: int
    after: int


class CalculatorArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expression: str = Field(
        pattern=r"^[0-9+\-*/(). ]+$", max_length=200, description="Digits, + - * / ( ) and spaces only."
    )


class Calculator:
    """Evaluates one arithmetic expression exactly (no names, no calls: an AST walk, never `eval`)."""

    name = "calculator"
    description = "Evaluates an arithmetic expression over integers and returns the number."
    arguments = CalculatorArguments
    _BINARY: Mapping[type, Any] = {
        ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    }  # fmt: skip

    async def call(self, arguments: Mapping[str, Any]) -> str:
        unknown = sorted(set(arguments) - {"expression"})
        if unknown:
            raise ToolArgumentError(f"calculator: unknown arguments {unknown}")
        expression = arguments.get("expression")
        if not isinstance(expression, str):
            raise ToolArgumentError("calculator: the argument 'expression' (a string) is missing")
        try:
            tree = ast.parse(expression, mode="eval")
        except SyntaxError as error:
            raise ToolArgumentError(f"calculator: cannot parse {expression!r}: {error.msg}") from None
        value = self._value(tree.body, expression)
        return str(int(value)) if float(value).is_integer() else str(value)

    def _value(self, node: ast.AST, expression: str) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = self._value(node.operand, expression)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in self._BINARY:
            left, right = self._value(node.left, expression), self._value(node.right, expression)
            try:
                return self._BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolArgumentError(f"calculator: division by zero in {expression!r}") from None
        if isinstance(node, ast.Tuple):
            raise ToolArgumentError(f"calculator: {expression!r} is a tuple of values, not one expression")
        raise ToolArgumentError(f"calculator: {ast.unparse(node)!r} is not allowed in {expression!r}")


class Arithmetic(Family):
    name = "arithmetic"
    check = "exact_match"

    def generate(self, rng: random.Random, index: int, **options: Any) -> Task:
        digits = int(options.get("digits") or rng.randint(2, 5))
        count = int(options.get("steps") or rng.randint(2, 3))
        opening = str(options.get("opening") or OPENINGS[0])
        if opening not in OPENINGS:
            raise ValueError(f"unknown opening {opening!r} (openings: {', '.join(OPENINGS)})")
        place, items, item = rng.choice(PLACES)
        low, high = 10 ** (digits - 1), 10**digits - 1
        start = total = rng.randint(low, high)
        sentences = [f"A {place} {opening} {start:,} {items}."]
        steps: list[tuple[str, int]] = []
        question = f"How many {items} does the {place} have now?"
        for position in range(count):
            if position == count - 1 and rng.random() < 0.35:
                value = rng.randint(2, 9)
                steps.append(("*", value))
                sentences.append(f"Each {item} is worth {value} dollars.")
                question = f"What is the total value of the {items} in dollars?"
            elif total > low and rng.random() < 0.5:
                value = rng.randint(max(1, low // 2), min(high, total))
                steps.append(("-", value))
                sentences.append(
                    rng.choice(
                        [f"Then {value:,} {items} are shipped out.", f"Later {value:,} {items} are sold."]
                    )
                )
            else:
                value = rng.randint(low, high)
                steps.append(("+", value))
                sentences.append(
                    rng.choice(
                        [f"A delivery brings {value:,} more {items}.", f"Then {value:,} more {items} arrive."]
                    )
                )
            total = _OPS[steps[-1][0]](total, value)
        text = " ".join([*sentences, question])
        return Task(
            family=self.name,
            id=f"{self.name}-{index}",
            input={"question": text},
            truth={"answer": total},
            features={"digits": digits, "steps": count, "multiplies": steps[-1][0] == "*"},
        )

    def find(self, text: str) -> Problem | None:
        start = _START.search(text)
        if start is None:
            return None
        end = text.find("?", start.end())
        body = text[start.start() : end + 1 if end >= 0 else len(text)]
        steps = []
        for match in _STEP.finditer(body):
            group = next(name for name, value in match.groupdict().items() if value)
            op = {"add1": "+", "add2": "+", "sub": "-", "mul": "*"}[group]
            steps.append((op, int(match.group(group).replace(",", ""))))
        return Problem(text=body, start=int(start.group(2).replace(",", "")), steps=tuple(steps))

    def truth(self, problem: Problem) -> dict[str, Any]:
        total = problem.start
        for op, value in problem.steps:
            total = _OPS[op](total, value)
        return {"answer": total}

    def _work(self, problem: Problem, model: str, call: SimCall | None) -> list[Step]:
        """The model's mental computation: systematic carry slips, plus a random misread when `call`."""
        misread = -1
        if call is not None and call.rng.random() < self.rates.random_slip(call.temperature):
            misread = call.rng.randrange(len(problem.steps))
        total, work = problem.start, []
        for position, (op, value) in enumerate(problem.steps):
            operand = _misread(value, call.rng) if position == misread and call is not None else value
            after = _OPS[op](total, operand)
            size = _digits(max(abs(total), operand))
            if unit(model, problem.text, "carry", position) < self.rates.carry_slip_per_digit * (size - 1):
                power = 10 ** (1 + int(unit(model, problem.text, "place", position) * (size - 1)))
                after += power if unit(model, problem.text, "sign", position) < 0.5 else -power
            work.append(Step(op, operand, total, after))
            total = after
        return work

    def _render(self, problem: Problem, work: list[Step], fillers: list[str]) -> str:
        lines = [*fillers, f"Start with {problem.start}."]
        lines += [f"{_VERBS[s.op]} {s.operand}: {s.before} {s.op} {s.operand} = {s.after}." for s in work]
        lines.append(f"Answer: {work[-1].after if work else problem.start}")
        return "\n".join(lines)

    def answer(self, problem: Problem, call: SimCall) -> str:
        count = call.rng.choices(range(len(self.rates.filler_weights)), self.rates.filler_weights)[0]
        if BRIEF.search(call.system) and call.rng.random() < self.rates.brevity_compliance:
            count = 0
        fillers = call.rng.sample(FILLERS, min(count, len(FILLERS)))
        return self._render(problem, self._work(problem, call.model, call), fillers)

    def program(self, problem: Problem, call: SimCall) -> str:
        misread = -1
        if call.rng.random() < self.rates.random_slip(call.temperature):
            misread = call.rng.randrange(len(problem.steps))
        lines = [f"total = {problem.start}"]
        for position, (op, value) in enumerate(problem.steps):
            operand = _misread(value, call.rng) if position == misread else value
            lines.append(f"total = total {op} {operand}")
        return "```python\n" + "\n".join([*lines, "print(total)"]) + "\n```"

    def tool_arguments(self, problem: Problem, call: SimCall) -> str:
        rates, rng = self.rates, call.rng
        expression = problem.expression
        if rng.random() < rates.random_slip(call.temperature):
            position = rng.randrange(len(problem.steps))
            op, value = problem.steps[position]
            steps = list(problem.steps)
            steps[position] = (op, _misread(value, rng))
            expression = Problem(problem.text, problem.start, tuple(steps)).expression
        if call.feedback is not None and rng.random() < rates.argument_repair:
            return json.dumps({"expression": expression})
        big = [value for value in (problem.start, *(v for _, v in problem.steps)) if value >= 1000]
        if rng.random() < 1 - (1 - rates.separator_copy) ** len(big):
            expression = re.sub(r"\d{4,}", lambda m: f"{int(m.group(0)):,}", expression)
        if "*" in expression and rng.random() < rates.times_sign:
            expression = expression.replace("*", "x")
        key = "expr" if rng.random() < rates.wrong_argument_name else "expression"
        return json.dumps({key: expression})

    def judge(self, problem: Problem, candidate: str, call: SimCall) -> str | None:
        given = _number(candidate)
        if given is None:
            return "The answer is incomplete: it has no final 'Answer:' line."
        own = self._work(problem, call.model, None)[-1].after
        return None if given == own else f"The result is wrong: recomputing gives {own}."

    def corrected(self, problem: Problem, candidate: str, call: SimCall) -> str:
        return self._render(problem, self._work(problem, call.model, None), [])

    async def verdict(self, task: Task, output: str) -> tuple[bool, float, str]:
        """Exact match; a wrong answer is explained from the worked steps when the output shows them."""
        truth = int(task.truth["answer"])
        given = _number(output)
        if given is None:
            return False, 0.0, "missing answer: the output has no final 'Answer:' line and is not a number"
        if given == truth:
            return True, 1.0, f"correct: {truth}"
        stated = {int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", task.input["question"])}
        for position, step in enumerate(_WORKED.finditer(output), start=1):
            left, op, right, result = int(step[1]), step[2], int(step[3]), int(step[4])
            if _OPS[op](left, right) != result:
                slip = f"{left} {op} {right} = {result}, not {_OPS[op](left, right)}"
                return False, 0.0, f"calculation error in step {position}: {slip} (answered {given})"
            if right not in stated:
                return False, 0.0, f"misread number in step {position}: {right} is not in the question"
        return False, 0.0, f"wrong result: answered {given}, expected {truth}"

    def tools(self) -> list[Tool | Retriever]:
        return [Calculator()]


def _misread(value: int, rng: random.Random) -> int:
    """The operand with one digit off by 2 to 8 (never a power of ten away, unlike a carry slip)."""
    if value < 10:
        return value + rng.choice([-1, 1]) if value > 2 else value + 1
    power = 10 ** rng.randrange(_digits(value) - 1)
    return max(1, value + rng.choice([-1, 1]) * rng.randint(2, 8) * power)


def _number(text: str) -> int | None:
    """The final answer: the `Answer:` line, else the whole output when it is one number."""
    value = answer_of(text)
    candidate = (value if value is not None else text).strip().rstrip(".").replace(",", "")
    try:
        number = float(candidate)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None
