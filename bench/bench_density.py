"""The density stage: which River clusterer, how fast, and whether its state stays bounded.

1. Bake-off (quality and speed, same signatures for every candidate): River DBSTREAM and DenStream
   at a few thresholds, on (a) a planted-mode stream (AMI against the planted labels) and (b) the
   TRAIL-GAIA failures named by its annotations (AMI, ARI against the human categories).
2. Throughput and bounded state: failures/s through featurizer + `ModeTracker` (learn, nearest
   micro-cluster, reclustering per batch), and micro-clusters, modes and RSS after 100k, ... up to
   `--signatures` failures of a stream whose modes drift (old ones stop, new ones start).

    python bench/bench_density.py [--signatures 1000000] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from fss_fixtures import planted_stream  # noqa: E402
from results_file import report  # noqa: E402
from river import cluster  # noqa: E402
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score  # noqa: E402

from cegraph.daemon.density import ModeTracker  # noqa: E402
from cegraph.daemon.eval_modes import load_executions  # noqa: E402
from cegraph.daemon.failures import label_failures  # noqa: E402
from cegraph.daemon.normalize import TextPolicy  # noqa: E402
from cegraph.daemon.signature import SignatureFeaturizer  # noqa: E402

TRAIL = ROOT.parent / "shared" / "datasets" / "trail-gaia.tar.gz"


def _dbstream(radius: float) -> cluster.DBSTREAM:
    return cluster.DBSTREAM(
        clustering_threshold=radius, fading_factor=0.0002, cleanup_interval=200, intersection_factor=0.3,
        minimum_weight=2.0,
    )  # fmt: skip


def _denstream(epsilon: float) -> cluster.DenStream:
    return cluster.DenStream(
        epsilon=epsilon, decaying_factor=0.001, beta=0.75, mu=2, n_samples_init=50, stream_speed=100
    )


CANDIDATES = {
    "DBSTREAM r=1.0": lambda: _dbstream(1.0),
    "DBSTREAM r=1.05 (chosen)": lambda: _dbstream(1.05),
    "DenStream eps=1.1": lambda: _denstream(1.1),
    "DenStream eps=1.3": lambda: _denstream(1.3),
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vectors_of(failures) -> list[dict[int, float]]:
    featurizer = SignatureFeaturizer()
    return [{i: float(v) for i, v in enumerate(featurizer.learn_transform_one(f)[0])} for f in failures]


def bake(points: list[dict[int, float]], truth: list[str]) -> dict[str, dict]:
    results = {}
    for name, make in CANDIDATES.items():
        model = make()
        started = time.perf_counter()
        for point in points:
            model.learn_one(point)
        learn_s = time.perf_counter() - started
        predicted = [model.predict_one(point) for point in points]
        results[name] = {
            "ami": adjusted_mutual_info_score(truth, predicted),
            "ari": adjusted_rand_score(truth, predicted),
            "clusters": len(set(predicted)),
            "learn_per_s": len(points) / learn_s,
        }
    return results


def trail_failures() -> tuple[list, list[str]]:
    executions, gold = load_executions(TRAIL, with_critique=False, policy=TextPolicy())
    failures, truth = [], []
    for execution in executions:
        for failure in label_failures(execution.nodes, execution.feedback):
            categories = gold.get((failure.trace_id, failure.span_id))
            if failure.source == "feedback" and categories:
                failures.append(failure)
                truth.append(categories[0])
    return failures, truth


def drifting_stream(count: int, seed: int):
    """Three modes at a time; every quarter of the stream one stops and another starts."""
    phases = [
        {"calc": 1, "search": 1, "format": 1, "noise": 0.3},
        {"search": 1, "format": 1, "noise": 0.3},
        {"format": 1, "calc": 1, "noise": 0.3},
        {"calc": 1, "search": 1, "noise": 0.3},
    ]
    per_phase = count // len(phases)
    for index, modes in enumerate(phases):
        yield from planted_stream(per_phase, seed + index, modes)


def bounded_state(total: int, batch: int = 500) -> list[dict]:
    featurizer, tracker = SignatureFeaturizer(), ModeTracker()
    checkpoints = sorted({total // 10, total // 2, total})
    rows, started = [], time.perf_counter()
    for seen, (failure, _) in enumerate(drifting_stream(total, seed=1), start=1):
        tracker.learn_one(featurizer.learn_transform_one(failure)[0])
        if seen % batch == 0:
            tracker.assign()
        if seen in checkpoints:
            state = tracker.state()
            rows.append({
                "signatures": seen, "micro_clusters": state["micro_clusters"], "modes": state["modes"],
                "failures_per_s": seen / (time.perf_counter() - started), "max_rss_mb": rss_mb(),
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--signatures", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    planted = planted_stream(6_000, seed=3, modes={"calc": 1, "search": 1, "format": 1, "noise": 0.3})
    result = {
        "command": "make bench BENCH=density",
        "bakeoff_planted": bake(vectors_of([f for f, _ in planted]), [m for _, m in planted]),
    }
    if TRAIL.exists():
        failures, truth = trail_failures()
        result["bakeoff_trail"] = bake(vectors_of(failures), truth)
    result["bounded_state"] = bounded_state(args.signatures)
    report(result, "density", args.out)
    return result


if __name__ == "__main__":
    main()
