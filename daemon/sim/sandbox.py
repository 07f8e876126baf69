"""A sandbox that runs each distinct simulated program once.

The simulated model's programs are pure: an arithmetic program prints a sum, a coding answer is a
templated function under fixed tests; none reads the clock, a random source or a file. So a program's
run is a function of (source, stdin, timeout), and a benchmark that runs the same program on the same
input thousands of times (every repeat of a validation split, every replay) learns nothing from the
second run but pays a process for it. A run that timed out is not kept: whether it times out is this
machine's pace, not the program's.
"""

from __future__ import annotations

from typing import Any

from cegraph.daemon.workflows.sandbox import ProgramRun, Sandbox


class PureProgramSandbox(Sandbox):
    """`Sandbox`, with every run that finished remembered by (source, stdin, timeout)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._runs: dict[tuple[str, str, float], ProgramRun] = {}

    async def run_program(self, source: str, *, stdin: str = "", timeout_s: float = 5.0) -> ProgramRun:
        key = (source, stdin, timeout_s)
        known = self._runs.get(key)
        if known is not None:
            return known.model_copy()
        run = await super().run_program(source, stdin=stdin, timeout_s=timeout_s)
        if not run.timed_out:
            self._runs[key] = run
        return run
