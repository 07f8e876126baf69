"""The refinement methods the benchmark compares, each as an anytime search: a `Curve` of the specs it
held and the LLM calls it had spent when it adopted each.

Every method starts from the same recorded, labelled traffic: executions `0 .. recorded-1` of the
task source on the base spec, with seed `i` for execution `i` (`Setup.record`). That traffic is free
for everyone; everything after it is paid in LLM calls, counted per completion (an ensemble's five
samples are five calls, a retry is a call, a proposer's or an LLM judge's call is a call):

- `failure_driven`: cegraph's loop (the embedded daemon: ingest, modes, refinement jobs, shadow
  verification, patches). It reads the recorded traffic; each patch becomes the spec later traffic
  runs, as a promoted canary would, and that later traffic is charged to it (executions it reads
  beyond the recorded ones cost what they cost the service).
- `random_edits`: a random applicable edit, evaluated on the validation split, kept when it fails on
  fewer validation inputs; `on_failing_node` restricts the edits to the node most validation
  failures are blamed on (what knowing where it fails buys, without the failure modes).
- `aflow`: AFlow's search (Zhang et al., arXiv 2410.10762, and its code) over the same operators:
  a tree of specs, the parent drawn from the top `sample` specs by AFlow's soft mixed probability
  (`select`), the child proposed by an LLM shown the parent spec and three of its failure logs
  (input, output, the evaluator's explanation), each spec scored `repeats` times on the validation
  split, the best validation score kept.

Determinism: every execution's trace ids derive from (run, index) (`derive_ids_for`), seeds are task
indices, every random choice comes from a `random.Random` seeded per run, and the signatures leave
out latency (`CEGRAPH_DETECTOR__LATENCY_TRAIT=false`: a simulated span's duration is this machine's
pace, and with it the modes, and so the jobs, changed between runs of one seed); the same seed gives
the same curve.
"""

from __future__ import annotations

import asyncio
import math
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import NoOpTracerProvider

from cegraph.connectors.otlp.span_export import CallbackSpanExporter
from cegraph.connectors.shadow.runtime import RuntimeShadowTarget, sim_evaluator_for
from cegraph.daemon.detect.density import ModeTracker
from cegraph.daemon.embedded import EmbeddedDaemon
from cegraph.daemon.refine.operators import OPERATORS, Edit, EditRefused, apply_edit, refusal
from cegraph.daemon.refine.proposers import FALLBACK, RULES, Counterexample, LLMProposer, ModeContext
from cegraph.daemon.settings import load_settings
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.sim.core import Task
from cegraph.daemon.sim.traffic import ExecutionIds, derive_ids_for
from cegraph.daemon.workflows.llm import LLMBackend
from cegraph.daemon.workflows.registry import apply_patch
from cegraph.daemon.workflows.runtime import ExecutionResult, WorkflowRuntime
from cegraph.schemas.workflow import WorkflowSpec

AFLOW_SAMPLE = 4  # specs the parent is drawn from (AFlow's `--sample`), the initial one among them
AFLOW_ALPHA, AFLOW_LAMBDA = 0.2, 0.3  # AFlow's `_compute_probabilities` defaults (scores in percent)
AFLOW_REPEATS = 5  # AFlow's validation rounds: each spec is scored this many times
AFLOW_LOGS = 3  # failure logs shown to the optimizer (AFlow's `load_log` samples three)
REPEATED = "repeats an edit already expanded from this parent"
MAX_REASON = 160  # characters of a rejection's reason kept in the notes
AFLOW_SHOWN, MAX_SHOWN = 3, 400  # rejected answers kept in the notes, as examples, and their length


@dataclass(frozen=True, slots=True)
class Run:
    """One execution as a search sees it."""

    index: int
    failed: bool
    calls: int  # LLM calls, per completion, the judge's included
    node: str | None  # the node the failure is blamed on
    log: str  # input, output and the evaluator's explanation: AFlow's failure log


def run_of(index: int, result: ExecutionResult) -> Run:
    evaluation = result.evaluation
    failing = next((node.node_id for node in result.nodes if node.status == "error"), None)
    node = (evaluation.node_id if evaluation is not None and evaluation.passed is False else None) or failing
    explanation = evaluation.explanation if evaluation is not None else (result.error_type or "")
    calls = sum(node.llm_calls for node in result.nodes) + sum(e.llm_calls for e in result.evaluations)
    log = f"input: {result.input}\noutput: {(result.output or '')[:400]}\nverdict: {explanation}"
    return Run(index, result.failed, calls, node if result.failed else None, log)


@dataclass
class Curve:
    """(calls spent, spec) each time the method's answer changed; the first point is the base spec."""

    points: list[tuple[int, WorkflowSpec]]
    notes: dict = field(default_factory=dict)

    def add(self, spent: int, spec: WorkflowSpec) -> None:
        if spec.content_hash != self.points[-1][1].content_hash:
            self.points.append((spent, spec))

    def at(self, budget: int) -> WorkflowSpec:
        """The spec the method held when it had spent at most `budget` calls."""
        return [spec for spent, spec in self.points if spent <= budget][-1]


class Setup:
    """One seed's world: the base spec, the task source, the recorded traffic and the runtime that
    every execution of every method goes through (`world.llm()` unless `llm` says otherwise)."""

    def __init__(
        self, seed: int, world: SimWorld, base: WorkflowSpec, tasks: Callable[[int], Task], *,
        recorded: int, validation: int, llm=None, retrievers: Sequence[str] = ("kb_search",),
    ) -> None:  # fmt: skip
        self.seed = seed
        self.world = world
        self.base = base
        self.tasks = tasks
        self.recorded = recorded
        self.validation = list(range(validation))  # the validation split: the first recorded inputs
        self.llm = llm or world.llm()
        self.retrievers = list(retrievers)
        # the held-out verdicts are the truth, whatever the scenario's judge says
        self.truth = SimWorld(seed, rates=world.rates, sandbox=world.sandbox)
        # the searches read results, not spans: a no-op tracer spares building spans nobody exports
        self._runtime = WorkflowRuntime(
            self.llm, NoOpTracerProvider(), tools=world.tools(), sandbox=world.sandbox
        )
        self._tasks: dict[int, Task] = {}
        # (spec, index, seed, judge) -> its run: an execution is a function of these, and the searches
        # evaluate the same spec on the same inputs again (a random edit drawn twice, every method's
        # base spec); they pay for each evaluation all the same
        self._runs: dict[tuple[str | None, int, int, bool], Run] = {}
        # (spec, index) -> calls and OTLP messages of that execution of the traffic (`_Traffic`)
        self.traffic: dict[tuple[str | None, int], tuple[int, list[tuple[bytes | None, bytes]]]] = {}

    def task(self, index: int) -> Task:
        if index not in self._tasks:
            self._tasks[index] = self.tasks(index)
        return self._tasks[index]

    def runs(
        self, spec: WorkflowSpec, indices: Sequence[int], *, repeat: int = 0, truth: bool = False
    ) -> list[Run]:
        """`spec` on tasks `indices`, task `i` with seed `i` (repeat 0: the recorded seed) or a seed
        of its own per repeat, judged by the scenario's judge (by the ground truth with `truth`)."""
        judge = self.truth if truth else self.world
        keys = {
            i: (spec.content_hash, i, i if repeat == 0 else 1_000_003 * repeat + i, truth) for i in indices
        }

        async def one(index: int) -> None:
            task = self.task(index)
            result = await self._runtime.execute(
                spec, task.input, seed=keys[index][2], evaluator=judge.evaluator(task)
            )
            self._runs[keys[index]] = run_of(index, result)

        async def missing() -> None:
            await asyncio.gather(*(one(i) for i in dict.fromkeys(indices) if keys[i] not in self._runs))

        asyncio.run(missing())
        return [self._runs[keys[i]] for i in indices]


def candidate_edits(spec: WorkflowSpec, retrievers: Sequence[str], node: str | None = None) -> list[Edit]:
    """Every edit of the grammar with the rules' argument sets that applies (on `node` when given)."""
    argument_sets = [dict(a) for _, options in RULES for a in options] + [dict(a) for a in FALLBACK]
    argument_sets += [{"operator": "format", "output_format": f} for f in ("json", "number", "text")]
    argument_sets += [{"operator": "adjust_parameter", "parameter": "temperature", "value": 0.0}]
    argument_sets += [{"operator": "custom_generate"}, {"operator": "test"}]
    edits: dict[str, Edit] = {}  # by its JSON: distinct, in order
    for node_id in [node] if node is not None else list(spec.nodes):
        for arguments in argument_sets:
            if arguments["operator"] == "add_retrieval":
                arguments = {**arguments, "retriever": retrievers[0]}
            edit = Edit(node=node_id, **arguments)
            if edit.model_dump_json() not in edits and refusal(spec, edit) is None:
                edits[edit.model_dump_json()] = edit
    assert {e.operator for e in edits.values()} <= set(OPERATORS)
    return list(edits.values())


def blamed_node(runs: Sequence[Run]) -> str | None:
    counts = Counter(run.node for run in runs if run.node is not None)
    return counts.most_common(1)[0][0] if counts else None


# ------------------------------------------------------------------ random edits


def random_edits(setup: Setup, budget: int, *, on_failing_node: bool = False) -> Curve:
    rng = random.Random(f"random/{setup.seed}/{on_failing_node}")
    spec, current = setup.base, setup.runs(setup.base, setup.validation)  # recorded: free
    curve, spent, version = Curve([(0, spec)]), 0, 1
    while spent < budget:
        node = blamed_node(current) if on_failing_node else None
        candidates = candidate_edits(spec, setup.retrievers, node) or candidate_edits(spec, setup.retrievers)
        if not candidates:
            break
        try:
            candidate, _ = apply_edit(spec, rng.choice(candidates), f"1.{version}.0")
        except EditRefused:
            continue
        runs = setup.runs(candidate, setup.validation)
        spent += sum(run.calls for run in runs)
        if sum(run.failed for run in runs) < sum(run.failed for run in current):
            spec, current, version = candidate, runs, version + 1
            if spent <= budget:
                curve.add(spent, spec)
    curve.notes["accepted"] = version - 1
    return curve


# ------------------------------------------------------------------ AFlow-style MCTS


@dataclass
class _Round:
    spec: WorkflowSpec
    runs: list[Run]  # every validation run of this spec, over all repeats
    tried: set[str] = field(default_factory=set)  # edits already expanded from it (AFlow's experience)

    @property
    def score(self) -> float:
        return 1 - sum(run.failed for run in self.runs) / len(self.runs)


def select(rounds: Sequence[_Round], rng: random.Random) -> _Round:
    """AFlow's parent selection: the initial spec and the best others up to `AFLOW_SAMPLE`, drawn
    with a mix of uniform and softmax(alpha * score in percent) probabilities."""
    top = [rounds[0], *sorted(rounds[1:], key=lambda r: -r.score)][:AFLOW_SAMPLE]
    top.sort(key=lambda r: -r.score)
    best = max(r.score for r in top) * 100
    weights = [math.exp(AFLOW_ALPHA * (r.score * 100 - best)) for r in top]
    total = sum(weights)
    mixed = [AFLOW_LAMBDA / len(top) + (1 - AFLOW_LAMBDA) * w / total for w in weights]
    return rng.choices(top, weights=mixed)[0]


def aflow(
    setup: Setup, budget: int, *, repeats: int = AFLOW_REPEATS, optimizer: LLMBackend | None = None,
    fallback: bool = True, max_optimizer_calls: int | None = None,
) -> Curve:  # fmt: skip
    """AFlow's search; its expansions are proposed by `optimizer` (default: the setup's LLM, whose
    simulated refiner model cegraph's LLM proposer also uses), every answered request a call.

    An answer that yields no fresh edit of the grammar (not the JSON asked for, an edit the grammar
    or the parent refuses, a repeat of an edit already expanded from that parent) is a rejected
    expansion, counted with its reasons. With `fallback` an untried edit of the failing node is taken
    in its place (the simulated model answers the same prompt the same way, so asking again would
    repeat it); without, the search asks again, from a newly drawn parent and logs, as AFlow's loop
    does. A request the optimizer does not answer ends the search (noted in `stopped`), as does
    `max_optimizer_calls` answered requests."""
    rng = random.Random(f"aflow/{setup.seed}")
    proposer = LLMProposer(optimizer or setup.llm, model=setup.base.model or "sim-1")
    spent = 0

    def score(spec: WorkflowSpec, first: list[Run] | None = None) -> list[Run]:
        nonlocal spent
        runs = list(first or [])
        for repeat in range(1 if first is not None else 0, repeats):
            more = setup.runs(spec, setup.validation, repeat=repeat)
            spent += sum(run.calls for run in more)
            runs += more
        return runs

    rounds = [_Round(setup.base, score(setup.base, setup.runs(setup.base, setup.validation)))]
    curve, expansions, from_llm, asked, rejected = Curve([(0, setup.base)]), 0, 0, 0, 0
    reasons: Counter[str] = Counter()  # why answers (or entries of answers) were refused
    answers: list[str] = []  # the first rejected answers, as the optimizer gave them
    while spent < budget:
        if max_optimizer_calls is not None and asked >= max_optimizer_calls:
            curve.notes["stopped"] = f"{asked} optimizer calls, the cap"
            break
        parent = select(rounds, rng)
        failures = [run for run in parent.runs if run.failed]
        node = blamed_node(failures) or parent.spec.output
        logs = rng.sample(failures, min(AFLOW_LOGS, len(failures)))
        context = ModeContext(
            parent.spec, "aflow", node, {"node": node},
            [Counterexample(f"log-{run.index}", run.node or node, run.log) for run in logs], setup.retrievers,
        )  # fmt: skip
        proposals = asyncio.run(proposer.propose(context))
        if proposals.llm_calls == 0:  # the request failed: no answer, no call
            curve.notes["stopped"] = proposals.rejections[0].reason[:MAX_REASON]
            break
        spent, asked = spent + proposals.llm_calls, asked + proposals.llm_calls
        reasons.update(r.reason[:MAX_REASON] for r in proposals.rejections)
        fresh = [p.edit for p in proposals.proposals if p.edit.model_dump_json() not in parent.tried]
        reasons.update([REPEATED] * (len(proposals.proposals) - len(fresh)))
        edit = fresh[0] if fresh else None
        if edit is None:
            rejected += 1
            if len(answers) < AFLOW_SHOWN:
                first = proposals.rejections[0].excerpt if proposals.rejections else REPEATED
                answers.append(first[:MAX_SHOWN])
            if not fallback:
                continue
            untried = [
                e for e in candidate_edits(parent.spec, setup.retrievers, node)
                if e.model_dump_json() not in parent.tried
            ]  # fmt: skip
            if not untried:
                parent.tried.add("exhausted")
                if all("exhausted" in r.tried for r in rounds):
                    break
                continue
            edit = rng.choice(untried)
        parent.tried.add(edit.model_dump_json())
        try:
            child, _ = apply_edit(parent.spec, edit, f"1.{len(rounds)}.0")
        except EditRefused as error:
            reasons[f"refused when applied: {error}"[:MAX_REASON]] += 1
            rejected += bool(fresh)  # an answer whose edit does not apply is a rejected expansion
            continue
        from_llm += bool(fresh)
        expansions += 1
        rounds.append(_Round(child, score(child)))
        best = max(rounds, key=lambda r: r.score)
        if spent <= budget:
            curve.add(spent, best.spec)
    curve.notes |= {
        "expansions": expansions, "expansions_from_llm": from_llm, "optimizer_calls": asked,
        "rejected_expansions": rejected, "rejections": dict(reasons.most_common()),
        "rejected_answers": answers,
    }  # fmt: skip
    return curve


# ------------------------------------------------------------------ cegraph


def failure_driven(
    setup: Setup, budget: int, *, proposers: Sequence[str] | None = None, one_mode: bool = False,
    batch: int = 500,
) -> Curve:  # fmt: skip
    """cegraph's loop: the recorded traffic, then `batch` executions at a time on the spec it holds,
    each later batch charged; the daemon's refinement jobs spend the rest. `one_mode` puts every
    failure in one mode (a mode distance no two signatures exceed); `proposers` replaces the default."""
    refiner = {"cooldown_s": 0} | ({"proposers": list(proposers)} if proposers is not None else {})
    with tempfile.TemporaryDirectory(prefix="cegraph-bench-refinement-") as folder:
        settings = load_settings(
            store={"path": str(Path(folder) / "s.duckdb")}, llm={"sim_seed": setup.seed},
            publisher={"signing_key": "bench"}, refiner=refiner,
            detector={"cooldown_s": 0, "latency_trait": False},
        )  # fmt: skip
        daemon = EmbeddedDaemon(settings)
        # shadow runs in the scenario's world, judged by its judge, as the recorded traffic was
        daemon.refine_stage.jobs.refiner.runner.target = RuntimeShadowTarget(
            setup.llm, tools=setup.world.tools(), evaluator_for=sim_evaluator_for(setup.world)
        )
        daemon.refine_stage.jobs.refiner.runner.target.runtime.sandbox = setup.world.sandbox
        if one_mode:  # cosine distances are at most 2: one cut above that joins everything
            daemon.stage.detector.tracker_factory = lambda ids: ModeTracker(mode_distance=2.5, ids=ids)
        try:
            return _loop(setup, daemon, budget, batch)
        finally:
            daemon.close()


def _loop(setup: Setup, daemon: EmbeddedDaemon, budget: int, batch: int) -> Curve:
    spec = setup.base
    daemon.registry.register(spec)
    traffic = _Traffic(setup, daemon.exporter())
    curve, spent, start, idle, jobs = Curve([(0, spec)]), 0, 0, 0, []
    while spent < budget and idle < 2:
        size = setup.recorded if start == 0 else batch
        calls = traffic.record(spec, range(start, start + size))
        spent += 0 if start == 0 else calls  # the recorded traffic is everyone's; the rest is paid
        start += size
        daemon.pump(drain=True)
        for job in daemon.refine():
            jobs.append(
                {k: job[k] for k in ("mode", "outcome", "reason")} | {"calls": job["cost"]["llm_calls"]}
            )
            spent += job["cost"]["llm_calls"]
        patches = daemon.publish()
        idle = 0 if patches else idle + 1
        for patch in patches:
            if patch.base_version == spec.version:
                spec = apply_patch(spec, patch)  # promoted: the next traffic runs it
                if spent <= budget:
                    curve.add(spent, spec)
    curve.notes |= {"jobs": jobs, "executions_read": start}
    return curve


class _Traffic:
    """Executions of the traffic on the spec cegraph holds, their spans exported to its daemon.

    Execution `i` of a spec is the same trace whichever cegraph variant runs it (its ids derive from
    (seed, i), its answers from its seeds), so its messages are kept per (spec, index) in the seed's
    `Setup` and the next variant that runs it gets them again: the recorded traffic runs once per
    seed, not once per variant. The span timestamps are the first run's, which nothing in a run
    reads (the latency trait is off)."""

    def __init__(self, setup: Setup, exporter: CallbackSpanExporter) -> None:
        self.setup, self.exporter = setup, exporter
        self._sent: dict[bytes, list[tuple[bytes | None, bytes]]] = {}  # trace id -> its messages
        # without the SDK's atexit hook, which would keep this and its seed's `Setup` alive to the end
        provider = TracerProvider(id_generator=ExecutionIds(), shutdown_on_exit=False)
        provider.add_span_processor(
            SimpleSpanProcessor(CallbackSpanExporter(self._keep, partition_by_trace=True))
        )
        self.runtime = WorkflowRuntime(
            setup.llm, provider, tools=setup.world.tools(), sandbox=setup.world.sandbox
        )

    def _keep(self, key: bytes | None, payload: bytes) -> None:
        assert key is not None  # partitioned by trace
        self._sent.setdefault(key, []).append((key, payload))

    def record(self, spec: WorkflowSpec, indices: range) -> int:
        """Executions `indices` on `spec`, exported; the LLM calls they took."""
        known = self.setup.traffic
        todo = [i for i in indices if (spec.content_hash, i) not in known]
        for index, (calls, trace) in zip(todo, asyncio.run(self._run(spec, todo)), strict=True):
            known[spec.content_hash, index] = (calls, self._sent.pop(trace.encode()))
        for index in indices:
            self.exporter.deliver(known[spec.content_hash, index][1])
        return sum(known[spec.content_hash, index][0] for index in indices)

    async def _run(self, spec: WorkflowSpec, indices: list[int]) -> list[tuple[int, str]]:
        """The executions' LLM calls and trace ids (their spans are exported when they end)."""
        setup = self.setup

        async def one(index: int) -> tuple[int, str]:
            derive_ids_for(f"bench/{setup.seed}", index)
            task = setup.task(index)
            result = await self.runtime.execute(
                spec, task.input, seed=index, evaluator=setup.world.evaluator(task)
            )
            return run_of(index, result).calls, result.trace_id

        return list(await asyncio.gather(*(one(index) for index in indices)))
