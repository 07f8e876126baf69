"""The density stage: how fast, and whether its state stays bounded (the clusterers' bake-off is
bench/bench_modes.py).

Failures/s through featurizer + `ModeTracker` (learn, nearest micro-cluster, reclustering per
batch), and micro-clusters, modes and RSS after 100k, ... up to `--signatures` failures of a stream
whose modes drift (old ones stop, new ones start).

    python bench/bench_density.py [--signatures 1000000] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "fixtures")]

from fss_fixtures import planted_stream  # noqa: E402
from results_file import report  # noqa: E402

from cegraph.daemon.detect.density import ModeTracker  # noqa: E402
from cegraph.daemon.detect.signature import SignatureFeaturizer  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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

    result = {"command": "make bench BENCH=density", "bounded_state": bounded_state(args.signatures)}
    report(result, "density", args.out)
    return result


if __name__ == "__main__":
    main()
