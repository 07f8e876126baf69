"""The sandbox's cost per program: the isolated run (bubblewrap, `daemon/workflows/sandbox.py`) against
the same interpreter started bare (`python -I -S` in a subprocess, what the sandbox did before it isolated
anything), one at a time and four at once (the sandbox's default concurrency), and `run_tests` (the
coding evaluator's and the test node's call). Wall milliseconds per program, median of `--rounds`
rounds of `--programs` programs each, the two kinds interleaved round by round so that a busy machine
slows both alike.

    python bench/bench_sandbox.py [--programs 40] [--rounds 5] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from results_file import report

from cegraph.daemon.workflows.sandbox import Sandbox

PROGRAM = "import json, sys\nprint(sum(json.loads('[1, 2, 3]')))"
CODE, TESTS = "def f(x):\n    return x + 1", ["assert f(1) == 2", "assert f(2) == 3", "assert f(-1) == 0"]


async def bare(source: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", "-c", source, stdout=asyncio.subprocess.PIPE, env={}
    )
    stdout, _ = await process.communicate()
    return stdout.decode()


async def per_program(run, programs: int, concurrent: int) -> float:
    """Wall ms per program with `concurrent` in flight."""
    slots = asyncio.Semaphore(concurrent)

    async def one() -> None:
        async with slots:
            await run()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(programs)))
    return (time.perf_counter() - started) * 1000 / programs


async def measure(programs: int, rounds: int) -> dict:
    sandbox = Sandbox(max_concurrent=4)
    problem = sandbox.unavailable()
    if problem is not None:
        raise SystemExit(f"no sandbox to measure: {problem}")
    assert (await sandbox.run_program(PROGRAM)).stdout == "6\n" and await bare(PROGRAM) == "6\n"

    async def isolated() -> None:
        assert (await sandbox.run_program(PROGRAM)).ok

    async def tests() -> None:
        assert (await sandbox.run_tests(CODE, TESTS)).passed

    figures: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, run, concurrent in (
            ("bare_sequential_ms", lambda: bare(PROGRAM), 1),
            ("isolated_sequential_ms", isolated, 1),
            ("bare_concurrent_ms", lambda: bare(PROGRAM), 4),
            ("isolated_concurrent_ms", isolated, 4),
            ("isolated_run_tests_ms", tests, 1),
        ):
            figures.setdefault(name, []).append(await per_program(run, programs, concurrent))
    medians = {name: round(statistics.median(values), 1) for name, values in figures.items()}
    return {
        **medians,
        "overhead_sequential_ms": round(medians["isolated_sequential_ms"] - medians["bare_sequential_ms"], 1),
        "overhead_concurrent_ms": round(medians["isolated_concurrent_ms"] - medians["bare_concurrent_ms"], 1),
        "programs": programs,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = asyncio.run(measure(args.programs, args.rounds))
    result["command"] = "make bench BENCH=sandbox"
    report(result, "sandbox", args.out)


if __name__ == "__main__":
    main()
