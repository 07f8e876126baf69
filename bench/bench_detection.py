"""Detection latency: from the onset of a planted failure mode to its trigger, beside an oracle.

The demo's scenario (`daemon/demo/scenario.py`: the routed `service` workflow, a traffic mix whose three
planted modes begin at executions 0, 2,400 and 4,800) runs through the embedded daemon (the same
ingest and detector stage as `cegraph run`, default detector settings except no trigger cooldown)
in batches of `--batch` executions, with no refinement: the workflow never changes. cegraph
detects a planted mode when a `ModeMassCrossed` event names a mode whose failures are on the planted
node. The oracle knows each execution's true label (the node the evaluator blamed, for the planted
mechanism) and runs the same `MassTracker` and `MassTrigger` (same threshold, support, hysteresis
and half-life) over those labels one execution at a time. Latency is counted in executions after
the onset, and in seconds at a nominal 20 executions per second (the simulated world has no clock).

    python bench/bench_detection.py --seeds 5 --out bench/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import orjson
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from results_file import report

from cegraph.daemon.demo.scenario import PHASES, PLANTED, WORKFLOW
from cegraph.daemon.detect.mass import MassTracker
from cegraph.daemon.detect.trigger import MassTrigger
from cegraph.daemon.embedded import EmbeddedDaemon
from cegraph.daemon.events import MODE_MASS_CROSSED
from cegraph.daemon.settings import load_settings
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.sim.traffic import ExecutionIds, TaskMix
from cegraph.daemon.workflows.runtime import ExecutionResult, WorkflowRuntime
from cegraph.schemas.workflow import example_spec

NOMINAL_RATE = 20.0  # executions per second, to state latencies in seconds
ONSETS = {"solve": PHASES[0].start, "extract": PHASES[1].start, "answer": PHASES[2].start}


def planted_label(result: ExecutionResult) -> str | None:
    """The planted node an execution failed at, if it failed there."""
    node = result.evaluation.node_id if result.evaluation and not result.evaluation.passed else None
    return node if node in PLANTED else None


def oracle(labels: list[str | None], settings) -> dict[str, int]:
    """First execution at which the oracle's trigger fires per planted node."""
    mass = MassTracker(settings.half_life_executions)
    trigger = MassTrigger(threshold=settings.mass_threshold, min_support=settings.min_support,
                          hysteresis=settings.hysteresis, cooldown_s=0)  # fmt: skip
    key = (WORKFLOW, "1.0.0")
    fired: dict[str, int] = {}
    for index, label in enumerate(labels, start=1):
        mass.execution(key)
        if label is None:
            continue
        mass.failure(key, label)
        crossing = trigger.observe(
            WORKFLOW, "1.0.0", label, mass.mass(key, label), mass.support(key, label), index
        )
        if crossing is not None and label not in fired:
            fired[label] = index
    return fired


def run_seed(seed: int, executions: int, batch: int) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="cegraph-bench-detection-") as folder:
        settings = load_settings(store={"path": str(Path(folder) / "s.duckdb")}, detector={"cooldown_s": 0})
        daemon = EmbeddedDaemon(settings)
        world = SimWorld(seed)
        spec = example_spec(WORKFLOW, tools=list(world.tools()))
        # without the SDK's atexit hook, which would keep this seed's daemon alive to the end of the run
        provider = TracerProvider(id_generator=ExecutionIds(), shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(daemon.exporter()))
        runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())
        mix = TaskMix(world, PHASES, seed=seed)
        labels: list[str | None] = []
        detected: dict[str, int] = {}
        seen_seq = 0
        try:
            for start in range(0, executions, batch):
                tasks = [mix(i) for i in range(start, start + batch)]
                results = asyncio.run(_execute(runtime, spec, tasks, world, start))
                labels += [planted_label(r) for r in results]
                daemon.pump(drain=True)
                crossings = daemon.store.query(
                    "SELECT seq, payload FROM events WHERE type = ? AND seq > ? ORDER BY seq",
                    MODE_MASS_CROSSED, seen_seq,
                )  # fmt: skip
                for seq, payload in crossings:
                    seen_seq = seq
                    node = orjson.loads(payload)["description"].get("node", "").removeprefix(f"{WORKFLOW}/")
                    if node in PLANTED and node not in detected:
                        detected[node] = start + batch
        finally:
            daemon.close()
    truth = oracle(labels, settings.detector)
    return {
        node: {
            "onset": ONSETS[node],
            "cegraph": None if node not in detected else detected[node] - ONSETS[node],
            "oracle": None if node not in truth else truth[node] - ONSETS[node],
        }
        for node in PLANTED
    }


async def _execute(runtime, spec, tasks, world, start) -> list[ExecutionResult]:
    return await asyncio.gather(*(
        runtime.execute(spec, task.input, seed=start + offset, evaluator=world.evaluator(task))
        for offset, task in enumerate(tasks)
    ))  # fmt: skip


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--executions", type=int, default=7_200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = {str(seed): run_seed(seed, args.executions, args.batch) for seed in range(args.seeds)}
    ratios = [
        row["cegraph"] / row["oracle"]
        for run in runs.values()
        for row in run.values()
        if row["cegraph"] is not None and row["oracle"]
    ]
    missed = sum(row["cegraph"] is None for run in runs.values() for row in run.values())
    median_ratio = statistics.median(ratios) if ratios else None
    result = {
        "command": "make bench BENCH=detection",
        "nominal_rate_per_s": NOMINAL_RATE,
        "batch": args.batch,
        "runs": runs,
        "median_latency_executions": {
            "cegraph": statistics.median(
                [r["cegraph"] for run in runs.values() for r in run.values() if r["cegraph"] is not None]
                or [0]
            ),
            "oracle": statistics.median(
                [r["oracle"] for run in runs.values() for r in run.values() if r["oracle"] is not None] or [0]
            ),
        },
        "median_ratio_to_oracle": median_ratio,
        "missed_by_cegraph": missed,
        "target": "median within 1.5x of the oracle",
        "met": median_ratio is not None and median_ratio <= 1.5 and missed == 0,
    }
    result["median_latency_seconds"] = {
        k: v / NOMINAL_RATE for k, v in result["median_latency_executions"].items()
    }
    report(result, "detection", args.out)
    return result


if __name__ == "__main__":
    main()
