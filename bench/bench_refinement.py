"""Refinement efficiency: expected failure mass removed per 1,000 LLM calls, three ways, same budget.

The workflow is the demo's routed `service` (`schemas/examples/service.json`) under the demo's final
traffic mix (arithmetic, order e-mails and knowledge questions, 1:1:2), where its three planted modes
are all active. Each method may spend `--budget` LLM calls on finding a better spec; what it ends with
is scored on a held-out test set of `--test` tasks (scoring is not charged to anyone):

- cegraph: the failure-driven loop. Recorded traffic (production traffic happens anyway; not charged)
  goes through the embedded daemon; its refinement jobs (replay of counterexamples and control, rules,
  LLM and prompt-editor proposers, paired shadow verification) spend the budget; each patch becomes
  the spec the next traffic runs, as a promoted canary would.
- scalar: an AFlow-style search on one scalar, overall accuracy: every edit the same operator grammar
  allows on every node is a candidate, evaluated on a validation sample of `--validation` tasks of the
  same mix; greedy, the best candidate is kept if it beats the current spec; again until no candidate
  helps or the budget is spent.
- random: random applicable edits, each evaluated on the same validation sample and kept if it beats
  the current spec, until the budget is spent.

Calls are counted from the spans of every run (the same count for every method). Per method and
seed: reduction = failure rate of the base spec on the test set minus that of the final spec; the
figure is reduction per 1,000 calls spent, mean and 95% t-interval over the seeds.

    python bench/bench_refinement.py --seeds 5 --out bench/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from results_file import report

from cegraph.connectors.shadow.runtime import RuntimeShadowTarget, sim_evaluator_for
from cegraph.daemon.demo.scenario import PHASES, WORKFLOW
from cegraph.daemon.detect.detector import FailureDetector, ModeClassifier
from cegraph.daemon.detect.stage import stored_modes
from cegraph.daemon.embedded import EmbeddedDaemon
from cegraph.daemon.refine.operators import OPERATORS, Edit, EditRefused, apply_edit, refusal
from cegraph.daemon.refine.proposers import FALLBACK, RULES
from cegraph.daemon.refine.replay import ReplayItem
from cegraph.daemon.refine.shadow import ShadowOutcome, ShadowRunner, ShadowTarget
from cegraph.daemon.settings import Settings, load_settings
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.sim.core import Task
from cegraph.daemon.sim.traffic import ExecutionIds, Phase, TaskMix
from cegraph.daemon.workflows.llm import LLMBackend
from cegraph.daemon.workflows.registry import apply_patch
from cegraph.daemon.workflows.runtime import WorkflowRuntime
from cegraph.schemas.workflow import WorkflowSpec, example_spec

FINAL_MIX = [Phase(0, PHASES[-1].weights)]
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


class Scorer:
    """Runs a spec on fixed tasks through a shadow target (by default the built-in runtime on the
    simulated world): failure rate and LLM calls; `classifier` places the failures in modes."""

    def __init__(
        self, world: SimWorld, tasks, *, target: ShadowTarget | None = None, classifier=None, concurrency=16
    ) -> None:
        target = target or RuntimeShadowTarget(
            world.llm(), tools=world.tools(), evaluator_for=sim_evaluator_for(world)
        )
        self.runner = ShadowRunner(target, concurrency=concurrency)
        self.classifier = classifier or FailureDetector(load_settings().detector).classifier()
        self.items = [
            ReplayItem(f"task-{i}", 10_000 + i, task.input, "success", 1.0) for i, task in enumerate(tasks)
        ]

    def outcomes(self, spec: WorkflowSpec) -> list[ShadowOutcome]:
        return asyncio.run(self.runner.run(spec, self.items, self.classifier))

    def score(self, spec: WorkflowSpec) -> tuple[float, int]:
        outcomes = self.outcomes(spec)
        return sum(o.failed for o in outcomes) / len(outcomes), sum(o.llm_calls for o in outcomes)


def candidate_edits(spec: WorkflowSpec, retrievers: list[str]) -> list[Edit]:
    """Every edit of the grammar with the rules' argument sets, on every node, that applies."""
    argument_sets = [dict(a) for _, options in RULES for a in options] + [dict(a) for a in FALLBACK]
    argument_sets += [{"operator": "format", "output_format": f} for f in ("json", "number", "text")]
    argument_sets += [{"operator": "adjust_parameter", "parameter": "temperature", "value": 0.0}]
    argument_sets += [{"operator": "custom_generate"}, {"operator": "test"}]
    edits: list[Edit] = []
    for node in spec.nodes:
        for arguments in argument_sets:
            if arguments["operator"] == "add_retrieval":
                arguments = {**arguments, "retriever": retrievers[0]}
            edit = Edit(node=node, **arguments)
            if edit not in edits and refusal(spec, edit) is None:
                edits.append(edit)
    assert {e.operator for e in edits} <= set(OPERATORS)
    return edits


def search(spec, scorer: Scorer, budget: int, retrievers, rng: random.Random, *, greedy: bool):
    """Scalar-metric search: greedy over all candidates (AFlow-style), or random proposals."""
    current_rate, spent = scorer.score(spec)
    version = 1
    while spent < budget:
        candidates = candidate_edits(spec, retrievers)
        rng.shuffle(candidates)
        if not greedy:
            candidates = candidates[:1]
        best = None
        for edit in candidates:
            if spent >= budget:
                break
            try:
                candidate, _ = apply_edit(spec, edit, f"1.{version}.0")
            except EditRefused:
                continue
            rate, calls = scorer.score(candidate)
            spent += calls
            if rate < current_rate and (best is None or rate < best[0]):
                best = (rate, candidate)
        if best is not None:
            current_rate, spec = best
            version += 1
        elif greedy:
            break  # no candidate helps
    return spec, spent


def failure_driven(
    settings: Settings, world: SimWorld, spec: WorkflowSpec, tasks: Callable[[int], Task], budget: int, *,
    llm: LLMBackend | None = None, evaluator_for=None, batch: int = 1_500, max_batches: int | None = None,
    concurrency: int = 10_000,
):  # fmt: skip
    """cegraph's loop on recorded traffic (task `i` is `tasks(i)`, answered by `llm`, by default the
    simulated one, and judged by `evaluator_for(spec, task)`, by default the world's judge)."""
    daemon = EmbeddedDaemon(settings)
    daemon.registry.register(spec)
    provider = TracerProvider(id_generator=ExecutionIds())
    provider.add_span_processor(SimpleSpanProcessor(daemon.exporter()))
    runtime = WorkflowRuntime(llm or world.llm(), provider, tools=world.tools())
    judge = evaluator_for or (lambda spec, task: world.evaluator(task))
    spent, start, idle, batches, finished = 0, 0, 0, 0, []
    try:
        while spent < budget and idle < 2 and (max_batches is None or batches < max_batches):
            chunk = [tasks(i) for i in range(start, start + batch)]
            asyncio.run(_record(runtime, spec, chunk, judge, start, concurrency))
            start, batches = start + len(chunk), batches + 1
            daemon.pump(drain=True)
            jobs = daemon.refine()
            finished += jobs
            spent += sum(job["cost"]["llm_calls"] for job in jobs)
            patches = daemon.publish()
            idle = 0 if patches else idle + 1
            for patch in patches:
                if patch.base_version == spec.version:
                    spec = apply_patch(spec, patch)  # promoted: the next traffic runs it
        return Loop(spec, spent, daemon.stage.classifier(), stored_modes(daemon.store), finished, start)
    finally:
        daemon.close()


@dataclass
class Loop:
    """What the failure-driven loop ended with."""

    spec: WorkflowSpec
    spent: int  # refinement calls (shadow runs and proposers); the recorded traffic is not charged
    classifier: ModeClassifier  # the modes it found, frozen
    modes: list[dict]
    jobs: list[dict]  # RefinementFinished payloads
    executions: int  # of recorded traffic


async def _record(runtime, spec, tasks, judge, start, concurrency):
    slots = asyncio.Semaphore(concurrency)

    async def one(offset: int, task: Task) -> None:
        async with slots:
            await runtime.execute(spec, task.input, seed=start + offset, evaluator=judge(spec, task))

    await asyncio.gather(*(one(offset, task) for offset, task in enumerate(tasks)))


def run_seed(seed: int, budget: int, validation: int, test: int) -> dict:
    world = SimWorld(seed)
    base = example_spec(WORKFLOW, tools=list(world.tools()))
    retrievers = ["kb_search"]
    mix = TaskMix(world, FINAL_MIX, seed=seed + 1_000)
    validation_scorer = Scorer(world, [mix(i) for i in range(validation)])
    test_scorer = Scorer(world, [mix(i) for i in range(50_000, 50_000 + test)])
    base_rate, _ = test_scorer.score(base)
    results = {}
    with tempfile.TemporaryDirectory(prefix="cegraph-bench-refinement-") as folder:
        started = time.perf_counter()
        settings = load_settings(
            store={"path": str(Path(folder) / "s.duckdb")}, llm={"sim_seed": seed},
            publisher={"signing_key": "bench"}, detector={"cooldown_s": 0},
            refiner={"cooldown_s": 0, "max_llm_calls": min(4_000, budget)},
        )  # fmt: skip
        traffic = TaskMix(world, FINAL_MIX, seed=seed)
        loop = failure_driven(settings, world, base, traffic, budget)
        results["cegraph"] = (loop.spec, loop.spent, time.perf_counter() - started)
    for name, greedy in (("scalar", True), ("random", False)):
        started = time.perf_counter()
        final, spent = search(base, validation_scorer, budget, retrievers, random.Random(seed), greedy=greedy)
        results[name] = (final, spent, time.perf_counter() - started)
    row = {"base_failure_rate": base_rate}
    for name, (final, spent, wall) in results.items():
        rate, _ = test_scorer.score(final)
        reduction = base_rate - rate
        row[name] = {
            "final_failure_rate": rate, "reduction": reduction, "llm_calls": spent,
            "reduction_per_1000_calls": reduction / (spent / 1_000) if spent else 0.0,
            "wall_s": round(wall, 1), "final_version": final.version,
        }  # fmt: skip
    print(seed, {k: v if not isinstance(v, dict) else v["reduction_per_1000_calls"] for k, v in row.items()})
    return row


def interval(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": mean, "high": mean}
    half = T_975.get(len(values), 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half}


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=10_000)
    parser.add_argument("--validation", type=int, default=100)
    parser.add_argument("--test", type=int, default=600)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = {str(seed): run_seed(seed, args.budget, args.validation, args.test) for seed in range(args.seeds)}
    summary = {
        name: {
            "reduction_per_1000_calls": interval(
                [r[name]["reduction_per_1000_calls"] for r in rows.values()]
            ),
            "reduction": interval([r[name]["reduction"] for r in rows.values()]),
            "llm_calls": interval([float(r[name]["llm_calls"]) for r in rows.values()]),
        }
        for name in ("cegraph", "scalar", "random")
    }
    scalar = summary["scalar"]["reduction_per_1000_calls"]["mean"]
    ratio = summary["cegraph"]["reduction_per_1000_calls"]["mean"] / scalar if scalar > 0 else None
    result = {
        "command": "make bench BENCH=refinement",
        "budget_llm_calls": args.budget, "validation_tasks": args.validation, "test_tasks": args.test,
        "seeds": rows, "summary": summary, "ratio_to_scalar": ratio,
        "target": ">= 3x the scalar-metric search", "met": ratio is not None and ratio >= 3,
    }  # fmt: skip
    report(result, "refinement", args.out)
    return result


if __name__ == "__main__":
    main()
