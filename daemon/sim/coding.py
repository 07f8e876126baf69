"""Small coding tasks: write one Python function; hidden tests (the public ones plus edge cases) judge it.

Mechanism: bugs. The model writes a buggy variant with a probability that grows with the task's
difficulty and the temperature. A "logic" bug fails the public tests, so a test node that runs them and
feeds the failures back gets it fixed; an "edge" bug passes them and only a reviewer may notice it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cegraph.daemon.sim.core import Family, SimCall, Task
from cegraph.daemon.workflows.sandbox import TestReport, extract_code

if TYPE_CHECKING:
    from cegraph.daemon.sim.world import SimWorld


@dataclass(frozen=True)
class Bug:
    kind: str  # "logic": the public tests catch it; "edge": only edge cases do
    critique: str
    source: str


@dataclass(frozen=True)
class Template:
    signature: str
    description: str  # what the function does; `{name}` fields come from `params`
    pattern: str  # recovers the primary parameters from the description
    difficulty: int
    params: Callable[[random.Random], dict[str, Any]]
    correct: str
    bugs: tuple[Bug, ...]
    public: tuple[str, ...]  # argument lists of the tests shown to the workflow
    edge: tuple[str, ...]  # further argument lists only the evaluator runs

    @property
    def function(self) -> str:
        return self.signature.split("(")[0]


def _letters(params: dict[str, Any]) -> dict[str, Any]:
    chars = params["chars"]
    return {"chars": chars, "a": chars[0], "b": chars[1], "c": chars[2], "upper": chars.upper()}


def _sizes(params: dict[str, Any]) -> dict[str, Any]:
    n = int(params["n"])
    return {"n": n, "exact": 2 * n, "longer": 2 * n + 1}


def _code(*lines: str) -> str:
    return "\n".join(lines)


TEMPLATES = (
    Template(
        "sum_multiples(xs)", "returns the sum of the numbers in xs that are divisible by {k}.",
        r"divisible by (?P<k>\d+)\.", 1, lambda rng: {"k": rng.randint(2, 7)},
        _code("def sum_multiples(xs):", "    return sum(x for x in xs if x % {k} == 0)"),
        (Bug("logic", "It sums the numbers that are not divisible by {k}.",
             _code("def sum_multiples(xs):", "    return sum(x for x in xs if x % {k} != 0)")),
         Bug("edge", "It ignores zero and negative multiples.",
             _code("def sum_multiples(xs):", "    return sum(x for x in xs if x % {k} == 0 and x > 0)"))),
        ("[3, 4, 6, 10, 12, 14, 15, 20, 21, 28, 35]", "[7, 42, 9, 1]"),
        ("[]", "[-{k}, {k}, 0]", "[-{k}, 1]"),
    ),
    Template(
        "count_chars(s)", "returns how many characters of s are among '{chars}', ignoring case.",
        r"among '(?P<chars>[a-z]+)'", 1, lambda rng: {"chars": "".join(rng.sample("aeiou", 3))},
        _code("def count_chars(s):", '    return sum(1 for c in s.lower() if c in "{chars}")'),
        (Bug("edge", "It does not ignore case.",
             _code("def count_chars(s):", '    return sum(1 for c in s if c in "{chars}")')),
         Bug("logic", "It skips the first character.",
             _code("def count_chars(s):", '    return sum(1 for c in s.lower()[1:] if c in "{chars}")'))),
        ("'{a}pp{b}l{c}'", "'{c}{c}xy'"),
        ("''", "'{upper}'", "'xyz'"),
    ),
    Template(
        "second_largest(xs)", "returns the second largest distinct value in xs, or None if there is none.",
        r"second largest distinct value", 2, lambda rng: {},
        _code("def second_largest(xs):", "    values = sorted(set(xs))",
              "    return values[-2] if len(values) >= 2 else None"),
        (Bug("logic", "It returns the second smallest value.",
             _code("def second_largest(xs):", "    values = sorted(set(xs))",
                   "    return values[1] if len(values) >= 2 else None")),
         Bug("edge", "It does not skip duplicates of the largest value.",
             _code("def second_largest(xs):", "    values = sorted(xs)",
                   "    return values[-2] if len(values) >= 2 else None")),
         Bug("edge", "It fails on lists with fewer than two distinct values.",
             _code("def second_largest(xs):", "    return sorted(set(xs))[-2]"))),
        ("[4, 1, 9, 7]", "[10, 20]"),
        ("[5, 5, 3]", "[7]", "[]", "[-1, -3, -2]"),
    ),
    Template(
        "chunk(xs)", "splits xs into consecutive lists of {n} items; the last list may be shorter.",
        r"lists of (?P<n>\d+) items", 2, lambda rng: {"n": rng.randint(2, 4)},
        _code("def chunk(xs):", "    return [xs[i:i + {n}] for i in range(0, len(xs), {n})]"),
        (Bug("edge", "It drops a shorter last list.",
             _code("def chunk(xs):", "    return [xs[i:i + {n}] for i in range(0, len(xs) - {n} + 1, {n})]")),
         Bug("logic", "Its lists are one item too short.",
             _code("def chunk(xs):", "    return [xs[i:i + {n} - 1] for i in range(0, len(xs), {n})]"))),
        ("list(range({exact}))",),
        ("list(range({longer}))", "[]", "[1]"),
    ),
    Template(
        "dedupe(xs)",
        "returns the values of xs without duplicates, keeping the first occurrence of each, in order.",
        r"without duplicates", 1, lambda rng: {},
        _code("def dedupe(xs):", "    seen = set()", "    out = []", "    for x in xs:",
              "        if x not in seen:", "            seen.add(x)", "            out.append(x)",
              "    return out"),
        (Bug("logic", "It does not keep the original order.",
             _code("def dedupe(xs):", "    return sorted(set(xs))")),
         Bug("edge", "It drops zeros and other falsy values.",
             _code("def dedupe(xs):", "    seen = set()", "    out = []", "    for x in xs:",
                   "        if x and x not in seen:", "            seen.add(x)", "            out.append(x)",
                   "    return out"))),
        ("[3, 1, 3, 2]", "[5, 5]"),
        ("[]", "[0, 1, 0]", "['b', 'a', 'b']"),
    ),
    Template(
        "running_max(xs)", "returns a list whose i-th item is the largest of xs[0], ..., xs[i].",
        r"the largest of xs", 1, lambda rng: {},
        _code("def running_max(xs):", "    out = []", "    best = None", "    for x in xs:",
              "        best = x if best is None or x > best else best", "        out.append(best)",
              "    return out"),
        (Bug("edge", "It starts from 0, so it is wrong when every value is negative.",
             _code("def running_max(xs):", "    out = []", "    best = 0", "    for x in xs:",
                   "        best = max(best, x)", "        out.append(best)", "    return out")),
         Bug("logic", "It returns the values themselves, not the running maximum.",
             _code("def running_max(xs):", "    out = []", "    for x in xs:", "        out.append(x)",
                   "    return out"))),
        ("[1, 3, 2, 5]", "[2, 2, 1]"),
        ("[]", "[-3, -1, -2]"),
    ),
    Template(
        "is_palindrome(s)", "returns True when s reads the same backwards, ignoring case and every character "
        "that is not a letter.",
        r"reads the same backwards", 2, lambda rng: {},
        _code("def is_palindrome(s):", "    letters = [c.lower() for c in s if c.isalpha()]",
              "    return letters == letters[::-1]"),
        (Bug("logic", "It does not skip spaces and punctuation.",
             _code("def is_palindrome(s):", "    letters = [c.lower() for c in s]",
                   "    return letters == letters[::-1]")),
         Bug("edge", "It does not ignore case.",
             _code("def is_palindrome(s):", "    letters = [c for c in s if c.isalpha()]",
                   "    return letters == letters[::-1]"))),
        ("'never odd or even'", "'abca'"),
        ("'Racecar'", "''", "'A man, a plan, a canal: Panama'"),
    ),
    Template(
        "rotate(xs, k)", "returns xs rotated right by k positions; k may be larger than the length, and an "
        "empty list stays empty.",
        r"rotated right by k", 3, lambda rng: {},
        _code("def rotate(xs, k):", "    if not xs:", "        return []", "    k %= len(xs)",
              "    return xs[-k:] + xs[:-k] if k else list(xs)"),
        (Bug("edge", "It is wrong when k is larger than the length.",
             _code("def rotate(xs, k):", "    if not xs:", "        return []",
                   "    return xs[-k:] + xs[:-k] if k else list(xs)")),
         Bug("edge", "It fails on an empty list.",
             _code("def rotate(xs, k):", "    k %= len(xs)",
                   "    return xs[-k:] + xs[:-k] if k else list(xs)")),
         Bug("logic", "It rotates left instead of right.",
             _code("def rotate(xs, k):", "    if not xs:", "        return []", "    k %= len(xs)",
                   "    return xs[k:] + xs[:k]"))),
        ("[1, 2, 3, 4], 1", "[5, 6, 7], 2"),
        ("[1, 2, 3], 5", "[], 3", "[1, 2], 0"),
    ),
)  # fmt: skip
_EXPAND: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"count_chars": _letters, "chunk": _sizes}
_TASK = re.compile(r"Write a Python function `(\w+)\([^)]*\)` that ([^\n]+)")


@dataclass(frozen=True)
class Problem:
    template: Template
    params: dict[str, Any]

    def render(self, source: str) -> str:
        return source.format(**self.params)

    @property
    def correct(self) -> str:
        return self.render(self.template.correct)


def _normalized(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.strip().splitlines())


class Coding(Family):
    name = "coding"
    check = "hidden_tests"
    _CACHE_LIMIT = 4096

    def __init__(self, world: SimWorld) -> None:
        super().__init__(world)
        # The model writes few distinct programs per task: judge each (program, tests) pair once.
        self._reports: dict[tuple[str, tuple[str, ...]], TestReport] = {}

    def generate(self, rng: random.Random, index: int, **options: Any) -> Task:
        choices = [t for t in TEMPLATES if options.get("difficulty") in (None, t.difficulty)]
        template = rng.choice(choices)
        primary = template.params(rng)
        problem = Problem(template, _EXPAND.get(template.function, dict)(primary))
        hidden = self.truth(problem)["tests"]
        description = problem.render(template.description)
        return Task(
            family=self.name,
            id=f"{self.name}-{index}",
            input={
                "task": f"Write a Python function `{template.signature}` that {description}",
                "tests": hidden[: len(template.public)],
            },
            truth={"tests": hidden},
            features={"function": template.function, "difficulty": template.difficulty},
        )

    def truth(self, problem: Problem) -> dict[str, Any]:
        """The hidden tests: the public ones, then the edge cases."""
        template = problem.template
        namespace: dict[str, Any] = {}
        exec(problem.correct, namespace)  # our own reference solution, to compute the expected values
        function = namespace[template.function]

        def test(arguments: str) -> str:
            expected = eval(f"_f({arguments})", {"_f": function})
            return f"assert {template.function}({arguments}) == {expected!r}"

        return {"tests": [test(problem.render(args)) for args in (*template.public, *template.edge)]}

    def find(self, text: str) -> Problem | None:
        match = _TASK.search(text)
        if match is None:
            return None
        template = next((t for t in TEMPLATES if t.function == match.group(1)), None)
        found = re.search(template.pattern, match.group(2)) if template else None
        if template is None or found is None:
            return None
        return Problem(template, _EXPAND.get(template.function, dict)(found.groupdict()))

    def answer(self, problem: Problem, call: SimCall) -> str:
        rates, template = self.rates, problem.template
        bug = (
            rates.code_bug_per_difficulty * template.difficulty
            + rates.code_bug_per_temperature * call.temperature
        )
        source = problem.correct
        if call.rng.random() < bug:
            source = problem.render(call.rng.choice(template.bugs).source)
        return f"```python\n{source}\n```"

    def program(self, problem: Problem, call: SimCall) -> str:
        return self.answer(problem, call)

    def judge(self, problem: Problem, candidate: str, call: SimCall) -> str | None:
        code = _normalized(extract_code(candidate))
        bug = next((b for b in problem.template.bugs if _normalized(problem.render(b.source)) == code), None)
        return problem.render(bug.critique) if bug else None

    def corrected(self, problem: Problem, candidate: str, call: SimCall) -> str:
        return f"```python\n{problem.correct}\n```"

    async def verdict(self, task: Task, output: str) -> tuple[bool, float, str]:
        tests = list(task.truth["tests"])
        key = (extract_code(output), tuple(tests))
        report = self._reports.get(key)
        if report is None:
            report = await self.world.sandbox.run_tests(key[0], tests)
            if len(self._reports) >= self._CACHE_LIMIT:
                self._reports.clear()
            self._reports[key] = report
        if report.passed:
            return True, 1.0, f"all {len(tests)} hidden tests pass"
        passed = len(report.outcomes) - len(report.failures) if report.error is None else 0
        return False, passed / len(tests), f"tests failed: {report.summary(limit=2)}"
