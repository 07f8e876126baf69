"""Refinement: held-out failure rate against LLM calls spent, per method, at fixed budgets, many seeds.

Per scenario and seed, every method (`refinement_methods`) starts from the same recorded, labelled
traffic of the base spec and spends up to the largest budget; the curve says which spec it held at
each budget. Each spec held at a budget is scored on `--test` held-out tasks (scoring is charged to
no one): its failure rate and its inference cost, LLM calls per execution. Over the seeds: the mean
with a 95% t-interval, and the paired difference to cegraph (same seed, same tasks) with its
t-interval. Seeds run in `--jobs` processes; nothing in a run reads the clock or a random id, so the
same arguments give the same numbers (tests/bench/test_bench_refinement.py runs a small case twice).

Scenarios (SimLLM; the demo's `service` spec under the demo's final mix: arithmetic, order e-mails and
knowledge questions 1:1:2, with its three planted modes, each on its own node):
- `routed`: the judge explains failures in the families' own words ("calculation error in step 2").
- `paraphrased`: the judge says what went wrong in varied words that name no mechanism or operator.
- `labels only`: the judge says pass or fail, nothing else, and blames no node.
- `noisy judge`: the routed judge with 15% of its verdicts flipped (recorded traffic, validation and
  shadow runs alike); the held-out figures are always the ground truth.
- `two on one node`: `answer` at temperature 0.8: hallucinations (fixed by retrieval) and wrong
  entities (fixed by an ensemble or a cold temperature) on one node, under one evaluator.
- `misrouted`: half the arithmetic worded so the router sends it to `answer`: it fails there, beside
  `answer`'s hallucinations, and needs a program where it shows.
- `drifting`: knowledge questions begin at execution 2,000, after the recorded traffic.

    python bench/bench_refinement.py --seeds 20 --jobs 2 --out bench/results.json --plot docs/refinement.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from model_server import model_server
from refinement_methods import Curve, Setup, aflow, failure_driven, random_edits
from results_file import report
from scipy.stats import t as student_t

from cegraph.connectors.llm.openai import OpenAIChatBackend
from cegraph.daemon.demo.scenario import PHASES, WORKFLOW
from cegraph.daemon.refine.operators import Edit, apply_edit
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.sim.judging import Judging
from cegraph.daemon.sim.llm import RememberingSimLLM
from cegraph.daemon.sim.sandbox import PureProgramSandbox
from cegraph.daemon.sim.traffic import Phase, TaskMix
from cegraph.schemas.workflow import WorkflowSpec, example_spec

BUDGETS = (1_000, 2_000, 5_000, 10_000, 20_000)
REAL_KEY = "refinement_aflow_real"  # results.json: the run whose AFlow-style search has a real optimizer
TEST_OFFSET = 1_000_000  # held-out tasks: indices no method ever runs


@dataclass(frozen=True)
class Scenario:
    spec: str  # a shipped example
    phases: list[Phase]
    judging: Judging = field(default_factory=Judging)
    edits: tuple[Edit, ...] = ()  # applied to the example to make the scenario's base spec

    def base(self, world: SimWorld) -> WorkflowSpec:
        spec = example_spec(self.spec, tools=list(world.tools()))
        for edit in self.edits:
            spec, _ = apply_edit(spec, edit, spec.version)
        return spec


FINAL = PHASES[-1].weights
FINAL_MIX = [Phase(0, FINAL)]
# two mechanisms on `answer` at a hot temperature: hallucinations (systematic: retrieval puts the
# facts in context, resampling repeats them) and wrong entities (random slips: an ensemble or a cold
# temperature removes them, retrieval does not)
HOT_ANSWER = Edit(node="answer", operator="adjust_parameter", parameter="temperature", value=0.8)
# half the arithmetic says "holds" where the router expects "starts with": it goes to `answer`
MISROUTED = {**FINAL, "arithmetic:digits=5": 0.5, "arithmetic:digits=5,opening=holds": 0.5}
# knowledge questions begin after the recorded traffic and cegraph's first paid batch
DRIFT_AT, BEFORE_DRIFT = 2_000, {k: v for k, v in FINAL.items() if k != "qa"}
SCENARIOS = {
    "routed": Scenario(WORKFLOW, FINAL_MIX),
    "paraphrased": Scenario(WORKFLOW, FINAL_MIX, Judging("paraphrased")),
    "labels only": Scenario(WORKFLOW, FINAL_MIX, Judging("labels")),
    "noisy judge": Scenario(WORKFLOW, FINAL_MIX, Judging(flip=0.15)),
    "two on one node": Scenario(WORKFLOW, FINAL_MIX, edits=(HOT_ANSWER,)),
    "misrouted": Scenario(WORKFLOW, [Phase(0, MISROUTED)]),
    "drifting": Scenario(WORKFLOW, [Phase(0, BEFORE_DRIFT), Phase(DRIFT_AT, FINAL)]),
}

METHODS: dict[str, Callable[[Setup, int], Curve]] = {
    "cegraph": failure_driven,
    "cegraph, no rule proposer": lambda s, b: failure_driven(s, b, proposers=["llm", "prompt_editor"]),
    "cegraph, one mode": lambda s, b: failure_driven(s, b, one_mode=True),
    "aflow": aflow,
    "random edits": random_edits,
    "random edits, failing node": lambda s, b: random_edits(s, b, on_failing_node=True),
}


@dataclass(frozen=True)
class RealOptimizer:
    """The real model that proposes the AFlow-style search's expansions (`--aflow-model real`): each
    answered request is a call of the budget, an answer that is no fresh edit a rejected expansion."""

    url: str  # OpenAI-compatible, ending in /v1
    model: str
    max_tokens: int  # a cap on each answer
    max_calls: int  # the search stops after this many answered requests (a real call takes seconds)

    def method(self) -> Callable[[Setup, int], Curve]:
        backend = OpenAIChatBackend(
            self.url, model=self.model, max_tokens=self.max_tokens, timeout_s=1_800, max_retries=1
        )
        return lambda s, b: aflow(s, b, optimizer=backend, fallback=False, max_optimizer_calls=self.max_calls)


def run_seed(
    scenario: str, seed: int, budgets: tuple[int, ...], recorded: int, validation: int, test: int,
    optimizer: RealOptimizer | None = None,
):  # fmt: skip
    """One scenario and seed: per method, the spec held at each budget and its held-out figures, and
    the CPU seconds the seed took in its process (`cpu_s`: what a full run's length follows);
    `optimizer` replaces the AFlow-style search's simulated optimizer by a real model."""
    cpu = time.process_time()
    methods = METHODS if optimizer is None else METHODS | {"aflow": optimizer.method()}
    plan = SCENARIOS[scenario]
    world = SimWorld(seed, judging=plan.judging, sandbox=PureProgramSandbox())
    base = plan.base(world)
    setup = Setup(seed, world, base, TaskMix(world, plan.phases, seed=seed), recorded=recorded,
                  validation=validation, llm=RememberingSimLLM(world))  # fmt: skip
    held_out = list(range(TEST_OFFSET, TEST_OFFSET + test))
    scored: dict[str | None, dict] = {}

    def score(spec: WorkflowSpec) -> dict:
        if spec.content_hash not in scored:
            runs = setup.runs(spec, held_out, truth=True)
            scored[spec.content_hash] = {
                "failure_rate": sum(r.failed for r in runs) / len(runs),
                "calls_per_execution": sum(r.calls for r in runs) / len(runs),
            }
        return scored[spec.content_hash]

    row = {"base": score(base), "methods": {}}
    for name, method in methods.items():
        started = time.perf_counter()
        curve = method(setup, max(budgets))
        points = {}
        for budget in budgets:
            spec = curve.at(budget)
            nodes = sorted(f"{node_id}:{node.kind}" for node_id, node in spec.nodes.items())
            points[str(budget)] = {**score(spec), "version": spec.version, "nodes": nodes}
        row["methods"][name] = {
            "budgets": points, "adopted_at": [spent for spent, _ in curve.points[1:]], "notes": curve.notes,
            "wall_s": round(time.perf_counter() - started, 1),
        }  # fmt: skip
    row["cpu_s"] = round(time.process_time() - cpu, 1)
    shown = {m: [row["methods"][m]["budgets"][str(b)]["failure_rate"] for b in budgets] for m in METHODS}
    print(scenario, seed, f"base {row['base']['failure_rate']:.3f}", shown, f"cpu {row['cpu_s']}", flush=True)
    return row


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": mean, "high": mean}
    half = student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half}


def summarize(rows: dict[str, dict], budgets: tuple[int, ...]) -> dict:
    """Per method and budget: failure rate and calls per execution over the seeds, and the paired
    difference (method minus cegraph) of the failure rate; positive: cegraph fails less."""
    base_cost = statistics.fmean(r["base"]["calls_per_execution"] for r in rows.values())
    base_rate = interval([r["base"]["failure_rate"] for r in rows.values()])
    out = {"seeds": len(rows), "base_failure_rate": base_rate, "base_calls_per_execution": base_cost,
           "methods": {}}  # fmt: skip
    for name in METHODS:
        per_budget = {}
        for budget in map(str, budgets):
            rates = [r["methods"][name]["budgets"][budget]["failure_rate"] for r in rows.values()]
            ours = [r["methods"]["cegraph"]["budgets"][budget]["failure_rate"] for r in rows.values()]
            costs = [r["methods"][name]["budgets"][budget]["calls_per_execution"] for r in rows.values()]
            per_budget[budget] = {
                "failure_rate": interval(rates),
                "minus_cegraph": interval([a - b for a, b in zip(rates, ours, strict=True)]),
                "calls_per_execution": interval(costs),
                "cost_vs_base": statistics.fmean(costs) / base_cost,
            }
        out["methods"][name] = per_budget
    return out


def table(summary: dict, budgets: tuple[int, ...]) -> str:
    """Markdown: failure rate (95% interval) per method and budget, and the cost of the spec held."""
    head = "| method | " + " | ".join(f"{b:,} calls" for b in budgets) + " | calls/execution at the end |"
    lines = [head, "|" + " --- |" * (len(budgets) + 2)]
    base = summary["base_failure_rate"]
    lines.append(f"| base spec | {base['mean']:.3f} | " + "| " * (len(budgets) - 1)
                 + f"{summary['base_calls_per_execution']:.2f} |")  # fmt: skip
    for name, per_budget in summary["methods"].items():
        cells = []
        for budget in map(str, budgets):
            rate, diff = per_budget[budget]["failure_rate"], per_budget[budget]["minus_cegraph"]
            paired = (
                ""
                if name == "cegraph"
                else f"; {diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]"
            )
            cells.append(f"{rate['mean']:.3f} ({rate['low']:.3f}-{rate['high']:.3f}){paired}")
        last = per_budget[str(budgets[-1])]
        cost = f"{last['calls_per_execution']['mean']:.2f} ({last['cost_vs_base']:.2f}x)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cost} |")
    return "\n".join(lines)


def plot(summaries: dict[str, dict], budgets: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(summaries), figsize=(6.5 * len(summaries), 4.5), squeeze=False)
    for axis, (scenario, summary) in zip(axes[0], summaries.items(), strict=True):
        for name, per_budget in summary["methods"].items():
            rates = [per_budget[str(b)]["failure_rate"] for b in budgets]
            axis.plot(budgets, [r["mean"] for r in rates], marker="o", label=name)
            axis.fill_between(budgets, [r["low"] for r in rates], [r["high"] for r in rates], alpha=0.15)
        axis.axhline(summary["base_failure_rate"]["mean"], color="grey", linestyle=":", label="base spec")
        axis.set(xscale="log", xlabel="LLM calls spent", ylabel="held-out failure rate", title=scenario)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--recorded", type=int, default=1_500, help="recorded executions every method gets")
    parser.add_argument("--validation", type=int, default=100, help="validation split of the recorded")
    parser.add_argument("--test", type=int, default=600)
    parser.add_argument("--jobs", type=int, default=2, help="seeds run in this many processes")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--add", action="store_true", help="keep the other scenarios' figures already in --out"
    )
    parser.add_argument("--plot", type=Path, help="PNG of the curves")
    parser.add_argument(
        "--aflow-model", choices=("sim", "real"), default="sim",
        help="the AFlow-style search's optimizer: the simulated refiner model, or a real model (figures "
        f"under `{REAL_KEY}`)",
    )  # fmt: skip
    parser.add_argument("--url", help="the real model's base URL (default: start the local SmolLM2)")
    parser.add_argument("--model", default="smollm2-135m", help="the real model's name")
    parser.add_argument("--aflow-max-tokens", type=int, default=256, help="cap on each real optimizer answer")
    parser.add_argument("--aflow-max-calls", type=int, default=40, help="real optimizer calls per seed")
    args = parser.parse_args()
    if args.aflow_model == "sim":
        return run(args)
    with model_server(args.url, "bench_refinement") as (url, local):
        endpoint = "local llama.cpp server, 1 thread" if local else url
        optimizer = RealOptimizer(url, args.model, args.aflow_max_tokens, args.aflow_max_calls)
        return run(args, optimizer, endpoint)


def kept(args: argparse.Namespace, budgets: tuple[int, ...], key: str) -> dict:
    """The refinement figures already in `--out`, which `--add` keeps for the scenarios it does not
    run; refused when they were measured under other settings (their rows would not compare)."""
    earlier = json.loads(args.out.read_text()).get(key, {}) if args.out and args.out.exists() else {}
    settings = (list(budgets), args.recorded, args.validation, args.test)
    found = tuple(earlier.get(k) for k in ("budgets_llm_calls", "recorded_executions", "validation_tasks",
                                           "test_tasks"))  # fmt: skip
    if earlier and found != settings:
        raise SystemExit(f"--add: {args.out} was measured with {found}, this run uses {settings}")
    return earlier or {"per_seed": {}}


def run(args: argparse.Namespace, optimizer: RealOptimizer | None = None, endpoint: str = "") -> dict:
    started = time.perf_counter()
    budgets = tuple(int(b) for b in args.budgets.split(","))
    scenarios = args.scenarios.split(",")
    key = "refinement" if optimizer is None else REAL_KEY
    earlier = kept(args, budgets, key) if args.add else None  # refused before the work, not after
    work = [
        (s, seed, budgets, args.recorded, args.validation, args.test, optimizer)
        for s in scenarios
        for seed in range(args.seeds)
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_seed, *zip(*work, strict=True)))
    by_scenario = {
        s: {str(w[1]): row for w, row in zip(work, rows, strict=True) if w[0] == s} for s in scenarios
    }
    wall_s = round(time.perf_counter() - started)
    cpu_s = round(sum(row["cpu_s"] for row in rows), 1)  # the seeds' processes, not this one's
    runs = [{"scenarios": scenarios, "seeds": args.seeds, "jobs": args.jobs, "wall_s": wall_s,
             "cpu_s": cpu_s}]  # fmt: skip
    if earlier is not None:
        by_scenario = {s: v for s, v in earlier["per_seed"].items() if s not in scenarios} | by_scenario
        runs = earlier.get("runs", []) + runs
    summaries = {s: summarize(seeds, budgets) for s, seeds in by_scenario.items()}
    result = {
        "command": "make bench BENCH=refinement" if optimizer is None else " ".join(["python", *sys.argv]),
        "budgets_llm_calls": list(budgets), "recorded_executions": args.recorded,
        "validation_tasks": args.validation, "test_tasks": args.test,
        "summary": summaries, "tables": {s: table(summary, budgets) for s, summary in summaries.items()},
        "per_seed": by_scenario, "runs": runs, "wall_s": sum(r["wall_s"] for r in runs),
    }  # fmt: skip
    if optimizer is not None:
        result["aflow_optimizer"] = {
            "model": optimizer.model, "endpoint": endpoint, "max_tokens": optimizer.max_tokens,
            "max_calls_per_seed": optimizer.max_calls,
        }  # fmt: skip
    if args.plot is not None:
        plot(summaries, budgets, args.plot)
    report(result, key, args.out)
    for scenario, text in result["tables"].items():
        print(f"\n{scenario}\n{text}")
    return result


if __name__ == "__main__":
    main()
