"""Runs untrusted Python (LLM-written programs, code under test) in a separate, limited interpreter.

Each run is a fresh `python -I -S` subprocess in an empty temporary folder with CPU, memory, file-size
and process limits and a wall-clock timeout, so a program can neither hang the daemon nor read its
state. A semaphore bounds how many run at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tempfile
import weakref

from pydantic import BaseModel

_BOOTSTRAP = r"""
import resource, sys
cpu, memory = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
source = sys.argv[3]
sys.argv = ["program"]
exec(compile(source, "<program>", "exec"), {"__name__": "__main__"})
"""

# Loads the code, then runs each test on its own; `assert call == expected` reports what the call gave.
_TEST_HARNESS = r"""
import ast, json
CODE, TESTS = json.loads(__import__("sys").stdin.read())
namespace = {"__name__": "solution"}
exec(compile(CODE, "<solution>", "exec"), namespace)
results = []
for test in TESTS:
    try:
        exec(compile(test, "<test>", "exec"), dict(namespace))
        results.append(None)
    except AssertionError as error:
        message = str(error)
        node = ast.parse(test).body[0]
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1:
            try:
                got = eval(ast.unparse(node.test.left), dict(namespace))
                message = f"got {got!r}, expected {ast.unparse(node.test.comparators[0])}"
            except Exception as inner:
                message = f"{type(inner).__name__}: {inner}"
        results.append(["AssertionError", message[:300]])
    except Exception as error:
        results.append([type(error).__name__, str(error)[:300]])
print("\x1eRESULTS" + json.dumps(results))
"""

_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)
_ERROR_LINE = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Exit|Interrupt|Warning)):?\s?(.*)$")


def extract_code(text: str) -> str:
    """The first fenced code block of an LLM's reply, or the whole reply when it has none."""
    match = _CODE_BLOCK.search(text)
    return (match.group(1) if match else text).strip("\n")


class ProgramRun(BaseModel):
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def error(self) -> tuple[str, str]:
        """(exception class, message) from the traceback's last line; ('Timeout', ...) on a timeout."""
        if self.timed_out:
            return "Timeout", "the program ran out of time"
        for line in reversed(self.stderr.strip().splitlines()):
            match = _ERROR_LINE.match(line.strip())
            if match:
                return match.group(1).rsplit(".", 1)[-1], match.group(2)
        return "ProgramError", f"exit code {self.exit_code}"


class TestOutcome(BaseModel):
    test: str
    passed: bool
    error_type: str = ""
    message: str = ""


class TestReport(BaseModel):
    """Per-test outcomes; `error` is set instead when the code could not even be loaded or timed out."""

    outcomes: list[TestOutcome]
    error: tuple[str, str] | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(outcome.passed for outcome in self.outcomes)

    @property
    def failures(self) -> list[TestOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.passed]

    def summary(self, limit: int = 3) -> str:
        """One line per failure (or the load error), for feedback to an LLM and for critiques."""
        if self.error is not None:
            return f"the code does not run: {self.error[0]}: {self.error[1]}"
        failures = self.failures
        lines = [f"{len(failures)} of {len(self.outcomes)} tests failed:"]
        lines += [f"{f.test} -> {f.error_type}: {f.message}" for f in failures[:limit]]
        return "\n".join(lines)


class Sandbox:
    """Runs Python source with limits; at most `max_concurrent` interpreters at a time."""

    def __init__(self, *, max_concurrent: int = 4, memory_mb: int = 512) -> None:
        self._max_concurrent = max_concurrent
        # An asyncio.Semaphore belongs to the loop it first waits on; a sandbox outlives loops (each
        # refinement job and demo tick runs its own), so each loop gets its own slots.
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._memory = memory_mb << 20

    async def run_program(self, source: str, *, stdin: str = "", timeout_s: float = 5.0) -> ProgramRun:
        cpu = max(1, int(timeout_s) + 1)
        loop = asyncio.get_running_loop()
        slots = self._slots.get(loop)
        if slots is None:
            slots = self._slots[loop] = asyncio.Semaphore(self._max_concurrent)
        async with slots:
            with tempfile.TemporaryDirectory(prefix="cegraph-sandbox-") as folder:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _BOOTSTRAP,
                    str(cpu),
                    str(self._memory),
                    source,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    cwd=folder,
                    env={},
                )
                try:
                    stdout, stderr = await asyncio.wait_for(process.communicate(stdin.encode()), timeout_s)
                except TimeoutError:
                    process.kill()
                    stdout, stderr = await process.communicate()
                    return ProgramRun(
                        stdout=stdout.decode(errors="replace"), stderr="", exit_code=None, timed_out=True
                    )
        return ProgramRun(
            stdout=stdout.decode(errors="replace"),
            stderr=stderr.decode(errors="replace"),
            exit_code=process.returncode,
        )

    async def run_tests(self, code: str, tests: list[str], *, timeout_s: float = 5.0) -> TestReport:
        run = await self.run_program(_TEST_HARNESS, stdin=json.dumps([code, tests]), timeout_s=timeout_s)
        marker = run.stdout.rfind("\x1eRESULTS")
        if marker < 0:
            return TestReport(outcomes=[], error=run.error)
        results = json.loads(run.stdout[marker + len("\x1eRESULTS") :])
        return TestReport(
            outcomes=[
                TestOutcome(
                    test=test,
                    passed=result is None,
                    error_type=(result or ["", ""])[0],
                    message=(result or ["", ""])[1],
                )
                for test, result in zip(tests, results, strict=True)
            ]
        )
