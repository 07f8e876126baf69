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
- scalar / random: `bench_refinement.search` (every edit of the grammar on every node, greedy on the
  failure rate of `--validation` tasks; or random single edits), the same budget, the same model.
- held-out: `--test` other tasks; each final spec's failure rate overall and per mode (the daemon's
  modes, frozen after its traffic), and the calls each method spent.

One seed: one run is what fits in about 30 minutes here (about 2 s per call on a busy machine).

    python bench/bench_real.py --out bench/results.json      # make bench BENCH=real
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_refinement import Scorer, failure_driven, search
from results_file import report

from cegraph.connectors.llm.config import evaluation, openai_backend, shadow_llm
from cegraph.connectors.shadow.runtime import RuntimeShadowTarget
from cegraph.daemon.detect.density import NOISE
from cegraph.daemon.refine.shadow import ShadowOutcome
from cegraph.daemon.settings import load_settings
from cegraph.daemon.sim import SimWorld
from cegraph.schemas.workflow import WorkflowSpec, example_spec

ROOT = Path(__file__).resolve().parents[1]


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
    server = None
    if args.url is None:
        sys.path.insert(0, str(ROOT / "ops" / "llm"))
        from local_llm import LocalLLM

        server = LocalLLM()
        args.url = server.start()
    try:
        return run(args, options, server_local=server is not None)
    finally:
        if server is not None:
            server.stop()


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
