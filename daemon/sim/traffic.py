"""The deployed service of demos and benchmarks: simulated tasks run through the instrumented runtime at
a steady rate, split between a stable spec and a canary, following patches and rollout decisions.

Spans go wherever the runtime's tracer provider sends them (Kafka, or the embedded daemon in-process).
Execution `i` runs task `i` of the family with a seed derived from (seed, i), and goes to the canary
when a value derived from (seed, i) falls below the canary weight: the same seed gives the same
traffic and the same split. Decisions may arrive on any thread (a Kafka consumer): they change the
routing under a lock, and an execution reads it once, so it runs one spec from start to end.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

from cegraph.daemon.sim.core import Task, unit
from cegraph.daemon.sim.world import SimWorld
from cegraph.daemon.workflows.registry import PatchError, apply_patch
from cegraph.daemon.workflows.runtime import Evaluator, Track, WorkflowRuntime
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.rollout import RolloutDecision
from cegraph.schemas.workflow import WorkflowSpec, WorkflowSpecError

log = logging.getLogger("cegraph.traffic")

# (traffic seed, execution index, spans started so far) of the execution running in this task
_EXECUTION: contextvars.ContextVar[list[int | str] | None] = contextvars.ContextVar(
    "cegraph_execution", default=None
)


def derive_ids_for(seed: int | str, index: int) -> None:
    """From here on in the current task (an asyncio task has a context of its own), `ExecutionIds`
    derive the trace and span ids of execution `index` of `seed` (any run's name)."""
    _EXECUTION.set([seed, index, 0])


class ExecutionIds(IdGenerator):
    """Trace and span ids derived from (seed, execution index, span number) inside a traffic
    generator's executions (random elsewhere): the same seed gives the same traces, whatever order
    concurrent executions happen to finish in."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def _derived(self, bits: int, *parts: object) -> int:
        digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
        return int.from_bytes(digest[: bits // 8], "big") or 1

    def generate_trace_id(self) -> int:
        current = _EXECUTION.get()
        return (
            self._random.generate_trace_id() if current is None else self._derived(128, "trace", *current[:2])
        )

    def generate_span_id(self) -> int:
        current = _EXECUTION.get()
        if current is None:
            return self._random.generate_span_id()
        current[2] += 1
        return self._derived(64, "span", *current)


@dataclass
class Counts:
    executions: int = 0
    failed: int = 0
    errors: int = 0  # raised instead of finishing (a backend outage, a bug): not a workflow failure

    @property
    def failure_rate(self) -> float:
        return self.failed / self.executions if self.executions else 0.0


@dataclass(frozen=True)
class Snapshot:
    """Progress so far; `counts` per (track, version) since the start."""

    elapsed_s: float
    started: int
    stable: str
    canary: str | None
    canary_weight: float
    counts: dict[tuple[str, str], Counts] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return sum(c.executions + c.errors for c in self.counts.values())

    @property
    def rate(self) -> float:
        return self.finished / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class Phase:
    """From execution `start` on, tasks come from these sources in proportion to their weights."""

    start: int
    weights: dict[str, float]


class TaskMix:
    """A traffic mix that changes over time: task `i` comes from the source a value derived from
    (seed, i) picks under the phase in force at `i`. A source is a family with options, e.g.
    `"arithmetic:digits=5"`; the same source and index always give the same task."""

    def __init__(self, world: SimWorld, phases: list[Phase], *, seed: int = 0) -> None:
        if not phases or phases[0].start != 0 or [p.start for p in phases] != sorted(p.start for p in phases):
            raise ValueError("phases must start at execution 0 and be in order")
        for phase in phases:
            for source in phase.weights:
                if source.split(":")[0] not in world.families:
                    raise ValueError(
                        f"unknown task family in {source!r} (families: {', '.join(world.families)})"
                    )
        self.world = world
        self.phases = phases
        self.seed = seed

    def phase(self, index: int) -> Phase:
        return next(phase for phase in reversed(self.phases) if phase.start <= index)

    def __call__(self, index: int) -> Task:
        weights = self.phase(index).weights
        point = unit("mix", self.seed, index) * sum(weights.values())
        cumulative = itertools.accumulate(weights.values())
        source = next(
            (s for s, upto in zip(weights, cumulative, strict=True) if point < upto), list(weights)[-1]
        )
        family, _, spelled = source.partition(":")
        options = dict(option.split("=", 1) for option in spelled.split(",") if option)
        return self.world.task(family, index, **options)


class TrafficGenerator:
    def __init__(
        self,
        runtime: WorkflowRuntime,
        world: SimWorld,
        stable: WorkflowSpec,
        *,
        family: str | None = None,
        tasks: Callable[[int], Task] | None = None,
        canary: WorkflowSpec | None = None,
        canary_weight: float = 0.1,
        rate: float = 20.0,
        seed: int = 0,
        concurrency: int = 64,
        evaluator_for: Callable[[WorkflowSpec, Task], Evaluator | None] | None = None,
    ) -> None:
        """Task `i` is `tasks(i)`, or task `i` of `family`; it is judged by `evaluator_for(spec, task)`
        (by default the simulated world's judge). Refuses (ValueError, or WorkflowSpecError for a spec
        the runtime can't run) bad arguments."""
        if (family is None) == (tasks is None):
            raise ValueError("give a task family or a task source, not both")
        if family is not None and family not in world.families:
            raise ValueError(f"unknown task family {family!r} (families: {', '.join(world.families)})")
        if not 0.0 <= canary_weight <= 1.0:
            raise ValueError(f"the canary weight must be within [0, 1], not {canary_weight}")
        if rate <= 0 or concurrency < 1:
            raise ValueError("the rate must be positive and the concurrency at least 1")
        runtime.check(stable)
        if canary is not None:
            runtime.check(canary)
            if canary.id != stable.id or canary.version == stable.version:
                raise WorkflowSpecError(
                    [f"the canary {canary.id}@{canary.version} must be another version of {stable.id}"]
                )
        self.runtime = runtime
        self.world = world
        self.tasks = tasks or (lambda index: world.task(family, index))
        self.evaluator_for = evaluator_for or (lambda spec, task: world.evaluator(task))
        self.canary_weight = canary_weight
        self.rate = rate
        self.seed = seed
        self.concurrency = concurrency
        self._lock = threading.Lock()
        self._stable = stable
        self._canary = canary
        self._counts: defaultdict[tuple[str, str], Counts] = defaultdict(Counts)
        self._started = 0  # also the index of the next execution: runs continue where the last ended
        self._start_time: float | None = None

    @property
    def stable(self) -> WorkflowSpec:
        return self._stable

    @property
    def canary(self) -> WorkflowSpec | None:
        return self._canary

    def snapshot(self) -> Snapshot:
        with self._lock:
            stable, canary = self._stable, self._canary
            counts = {key: Counts(c.executions, c.failed, c.errors) for key, c in self._counts.items()}
        elapsed = 0.0 if self._start_time is None else time.monotonic() - self._start_time
        return Snapshot(
            elapsed_s=elapsed,
            started=self._started,
            stable=stable.version,
            canary=None if canary is None else canary.version,
            canary_weight=0.0 if canary is None else self.canary_weight,
            counts=counts,
        )

    async def run(self, *, count: int | None = None, duration_s: float | None = None) -> Snapshot:
        """Start executions at `rate` per second until `count` have started or `duration_s` has passed
        (without either: until cancelled), and return once those started have finished.

        At most `concurrency` run at once; when they all take longer, the rate falls behind rather than
        piling up work. Cancelling stops at once and cancels the executions in flight.
        """
        slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task[None]] = set()
        self._start_time = start = time.monotonic()
        first = self._started
        try:
            index = first
            while count is None or index < first + count:
                due = (index - first) / self.rate
                if duration_s is not None and due >= duration_s:
                    break
                await asyncio.sleep(max(0.0, due - (time.monotonic() - start)))
                await slots.acquire()
                task = asyncio.create_task(self._execute(index, slots))
                running.add(task)
                task.add_done_callback(running.discard)
                self._started += 1
                index += 1
            await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        return self.snapshot()

    def _route(self, index: int) -> tuple[WorkflowSpec, Track, Counts]:
        with self._lock:
            if self._canary is not None and unit("track", self.seed, index) < self.canary_weight:
                spec, track = self._canary, "canary"
            else:
                spec, track = self._stable, "stable"
            return spec, track, self._counts[(track, spec.version)]

    async def _execute(self, index: int, slots: asyncio.Semaphore) -> None:
        derive_ids_for(self.seed, index)
        try:
            task = self.tasks(index)
            spec, track, counts = self._route(index)
            seed = int(unit("execution", self.seed, index) * 2**31)
            try:
                result = await self.runtime.execute(
                    spec, task.input, seed=seed, track=track, evaluator=self.evaluator_for(spec, task)
                )
            except Exception:
                counts.errors += 1
                log.exception("execution %d of %s@%s raised", index, spec.id, spec.version)
                return
            counts.executions += 1
            counts.failed += result.failed
        finally:
            slots.release()

    # ------------------------------------------------------------------ decisions

    def apply_patch(self, patch: WorkflowPatch) -> bool:
        """Start the patched stable spec as the canary (replacing any canary); a patch that does not
        fit is ignored with the reason logged. Returns whether it was applied."""
        with self._lock:
            stable, canary = self._stable, self._canary
            if patch.workflow_id != stable.id:
                log.debug("patch for %s ignored: this traffic runs %s", patch.workflow_id, stable.id)
                return False
            if canary is not None and canary.content_hash == patch.content_hash:
                log.info("patch %s@%s ignored: it already runs as the canary", stable.id, patch.new_version)
                return False
            try:
                spec = apply_patch(stable, patch)
                self.runtime.check(spec)
            except (PatchError, WorkflowSpecError) as error:
                log.warning("patch %s@%s ignored: %s", patch.workflow_id, patch.new_version, error)
                return False
            self._canary = spec
        log.info("canary %s@%s started at weight %.3f", spec.id, spec.version, self.canary_weight)
        return True

    def apply_rollout(self, decision: RolloutDecision) -> bool:
        """Promote the canary to stable, or drop it; a decision about another version is ignored with
        the reason logged. Returns whether it was applied."""
        with self._lock:
            stable, canary = self._stable, self._canary
            if decision.workflow_id != stable.id:
                log.debug("rollout for %s ignored: this traffic runs %s", decision.workflow_id, stable.id)
                return False
            if canary is None or canary.version != decision.version:
                running = "no canary runs" if canary is None else f"the canary is {canary.version}"
                log.warning(
                    "%s of %s@%s ignored: %s", decision.decision, stable.id, decision.version, running
                )
                return False
            if decision.decision == "promote":
                self._stable = canary
            self._canary = None
        log.info("%s %s@%s: %s", decision.decision, stable.id, decision.version, decision.reason or "-")
        return True


def infer_family(spec: WorkflowSpec, families: Iterable[str]) -> str | None:
    """The task family a spec is named after (`arithmetic-calculator` runs arithmetic tasks), if any."""
    return next((f for f in families if spec.id == f or spec.id.startswith(f + "-")), None)
