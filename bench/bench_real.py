"""The real-model scenario: cegraph's loop on traffic a real model answered, beside the scalar-metric
search and random edits with the same budget of calls to the same model.

Nothing here is simulated but the tasks (the task families and their ground truth): SmolLM2-135M
on llama.cpp (ops/llm/local_llm.py, one thread) answers everything unless `--url` names another
OpenAI-compatible endpoint, and the workflow's own evaluators judge every answer.

- traffic: `--batch` tasks of `--family` at a time through the shipped example workflow, answered by
  the model and judged by the workflow's reference evaluators against each task's ground truth; the
  embedded daemon ingests the spans, finds the failure modes, and its refinement jobs (rules, the LLM
  proposer and the prompt editor on the same model, paired shadow verification on the same model)
  spend up to `--budget` calls; a patch becomes the spec of the next batch, as a promoted canary
  would; at most `--batches` batches. The recorded traffic is not charged (production runs anyway).
- scalar / random: `search` (every edit of the grammar on every node, greedy on the
  failure rate of `--validation` tasks; or random single edits), the same budget, the same model.
- held-out: `--test` other tasks; each final spec's failure rate overall and per mode (the daemon's
  modes, frozen after its traffic), and the calls each method spent.

One seed: one run is what fits in about 30 minutes here (about 2 s per call on a busy machine).

    python bench/bench_real.py --out bench/results.json      # make bench BENCH=real
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model_server import model_server
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from refinement_methods import candidate_edits
from results_file import report

from cegraph.connectors.llm.config import evaluation, openai_backend, shadow_llm
from cegraph.connectors.shadow.runtime import RuntimeShadowTarget, sim_evaluator_for
from cegraph.daemon.detect.density import NOISE
from cegraph.daemon.detect.detector import FailureDetector, ModeClassifier
from cegraph.daemon.detect.stage import stored_modes
from cegraph.daemon.embedded import EmbeddedDaemon
from cegraph.daemon.refine.operators import EditRefused, apply_edit
from cegraph.daemon.refine.replay import ReplayItem
from cegraph.daemon.refine.shadow import ShadowOutcome, ShadowRunner, ShadowTarget
from cegraph.daemon.settings import Settings, load_settings
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.sim.core import Task
from cegraph.daemon.sim.traffic import ExecutionIds
from cegraph.daemon.workflows.llm import LLMBackend
from cegraph.daemon.workflows.registry import apply_patch
from cegraph.daemon.workflows.runtime import WorkflowRuntime
from cegraph.schemas.workflow import WorkflowSpec, example_spec


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


def per_mode(outcomes: list[ShadowOutcome]) -> dict[str, float]:
    """Failures per execution in each mode (NOISE: failures in no mode) and overall."""
    counts = Counter(
        mode or "(no mode)" for o in outcomes for mode in (o.modes or ({NOISE} if o.failed else ()))
    )
    rates = {mode: count / len(outcomes) for mode, count in sorted(counts.items())}
    return {"any failure": sum(o.failed for o in outcomes) / len(outcomes), **rates}


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="an OpenAI-compatible base URL (default: start the local SmolLM2)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--family", default="arithmetic")
    parser.add_argument("--workflow", default="arithmetic", help="a shipped example's name")
    parser.add_argument("--options", default="digits=2", help="task options, e.g. digits=2")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--validation", type=int, default=8)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    options = dict(option.split("=", 1) for option in args.options.split(",") if option)
    with model_server(args.url, "bench_real") as (args.url, local):
        return run(args, options, server_local=local)


def run(args: argparse.Namespace, options: dict[str, str], *, server_local: bool) -> dict:
    started = time.perf_counter()
    world = SimWorld(args.seed)
    base = example_spec(args.workflow, tools=list(world.tools()))

    def tasks(index: int):
        return world.task(args.family, index, **options)

    with tempfile.TemporaryDirectory(prefix="cegraph-bench-real-") as folder:
        settings = load_settings(
            store={"path": str(Path(folder) / "s.duckdb")},
            llm={"backend": "openai", "base_url": args.url, "model": args.model,
                 "max_tokens": args.max_tokens, "timeout_s": 1_800, "sim_seed": args.seed},
            evaluation={"references": ["task_families"]},
            publisher={"signing_key": "bench"},
            detector={"cooldown_s": 0, "min_support": 8},
            refiner={"cooldown_s": 0, "max_llm_calls": args.budget, "replay_sample": 12, "max_candidates": 4,
                     "max_rounds": 2, "concurrency": 4},
        )  # fmt: skip
        llm = openai_backend(settings)
        judges = evaluation(settings, llm)
        loop = failure_driven(
            settings, world, base, tasks, args.budget, llm=llm,
            evaluator_for=lambda spec, task: judges.evaluator(spec, task.reference),
            batch=args.batch, max_batches=args.batches, concurrency=4,
        )  # fmt: skip
        print(
            f"{time.perf_counter() - started:7.0f}s cegraph: {loop.spent} calls, {loop.spec.version}",
            flush=True,
        )
        shadow, tools, evaluator_for = shadow_llm(settings)
        target = RuntimeShadowTarget(shadow, tools=tools, evaluator_for=evaluator_for)
        validation = Scorer(
            world, [tasks(100_000 + i) for i in range(args.validation)], target=target, concurrency=4
        )
        finals: dict[str, tuple[WorkflowSpec, int]] = {"cegraph": (loop.spec, loop.spent)}
        for name, greedy in (("scalar", True), ("random", False)):
            spec, spent = search(
                base, validation, args.budget, ["kb_search"], random.Random(args.seed), greedy=greedy
            )
            finals[name] = (spec, spent)
            print(f"{time.perf_counter() - started:7.0f}s {name}: {spent} calls, {spec.version}", flush=True)
        test = Scorer(
            world, [tasks(200_000 + i) for i in range(args.test)], target=target, classifier=loop.classifier,
            concurrency=4,
        )  # fmt: skip
        scored: dict[str | None, dict] = {}
        for spec in [base, *(spec for spec, _ in finals.values())]:
            if spec.content_hash not in scored:
                outcomes = test.outcomes(spec)
                scored[spec.content_hash] = {
                    "per_mode": per_mode(outcomes),
                    "calls": sum(o.llm_calls for o in outcomes),
                }
        print(f"{time.perf_counter() - started:7.0f}s held-out scored", flush=True)
    before = scored[base.content_hash]["per_mode"]
    methods = {}
    for name, (spec, spent) in finals.items():
        after = scored[spec.content_hash]["per_mode"]
        modes = sorted(set(before) | set(after), key=lambda m: (m != "any failure", m))
        methods[name] = {
            "llm_calls": spent, "final_version": spec.version,
            "nodes": {node_id: node.kind for node_id, node in spec.nodes.items()},
            "failure_mass": {
                mode: {"before": before.get(mode, 0.0), "after": after.get(mode, 0.0)} for mode in modes
            },
            "reduction": before["any failure"] - after["any failure"],
        }  # fmt: skip
    result = {
        "command": "make bench BENCH=real",
        "model": args.model, "endpoint": "local llama.cpp server, 1 thread" if server_local else args.url,
        "family": args.family, "workflow": args.workflow, "task_options": options, "seed": args.seed,
        "traffic_executions": loop.executions, "budget_llm_calls": args.budget,
        "validation_tasks": args.validation, "test_tasks": args.test, "max_tokens": args.max_tokens,
        "modes_found": [
            {"mode": m["mode"], "workflow_version": m["workflow_version"], "mass": round(m["mass"], 3),
             "support": m["support"], "node": m["description"].get("node"),
             "terms": m["description"].get("terms", [])[:6]}
            for m in loop.modes
        ],
        "jobs": [
            {k: job[k] for k in ("mode", "outcome", "reason", "rejected")}
            | {"calls": job["cost"]["llm_calls"]}
            for job in loop.jobs
        ],
        "methods": methods,
        "wall_s": round(time.perf_counter() - started),
    }  # fmt: skip
    report(result, "real", args.out)
    return result


if __name__ == "__main__":
    main()
