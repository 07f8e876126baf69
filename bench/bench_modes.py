"""Failure modes against human categories, and the bake-off of online clusterers (docs/modes.md).

1. TRAIL-GAIA through `eval-modes` (TRAIL's taxonomy folding, so the numbers compare with the
   issue's), mean over 5 seeds (the order of the executions, KMeans' start), both variants: the
   online modes at arrival and at the end beside span names and batch KMeans on the same vectors,
   and (c) the tracker's own partition computed in batch: average linkage of the same vectors, per
   workflow, at the tracker's cut. (c) is what the online modes would be with no stream at all, so it
   tells a loss of the online step from a limit of the partition at that cut.
2. Bake-off: every candidate sees the same signatures in the same order, in batches of 40
   failures, and is scored at arrival (AMI, ARI), with its learning speed; on TRAIL-GAIA (both
   variants, seed 0) and on synthetic streams with known modes (`tests/fixtures/fss_fixtures.py`): planted
   modes on separate nodes, and six mechanisms of which pairs share a node, one starting late (how
   many of its failures pass before it has a mode of its own).

    python bench/bench_modes.py [--seeds 5] [--embedding] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path
from statistics import mean

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "fixtures")]

from fss_fixtures import mechanism_stream, planted_stream  # noqa: E402
from results_file import report  # noqa: E402
from river import cluster  # noqa: E402
from sklearn.cluster import HDBSCAN, AgglomerativeClustering, KMeans  # noqa: E402
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, silhouette_score  # noqa: E402

from cegraph.daemon.detect.density import EMBEDDED_MODE_DISTANCE, HASHED_MODE_DISTANCE, NOISE, ModeTracker  # noqa: E402
from cegraph.daemon.detect.eval_modes import Score, VariantResult, evaluate, score  # noqa: E402
from cegraph.daemon.detect.signature import SignatureFeaturizer  # noqa: E402
from cegraph.daemon.settings import DetectorSettings  # noqa: E402

TRAIL = ROOT.parent / "shared" / "datasets" / "trail-gaia.tar.gz"
BATCH = 40


def batch_linkage(variant: VariantResult, cut: float) -> Score:
    """Average linkage of a variant's labelled failures, per workflow, cut where the tracker cuts."""
    by_workflow: dict[str, list[int]] = {}
    for index, (_, _, workflow) in enumerate(variant.points):
        by_workflow.setdefault(workflow, []).append(index)
    found: dict[int, str] = {}
    for workflow, rows in by_workflow.items():
        vectors = np.array([variant.points[row][0] for row in rows])
        if len(rows) < 2:
            found.update({row: f"{workflow}:0" for row in rows})
            continue
        model = AgglomerativeClustering(
            n_clusters=None, distance_threshold=cut, metric="cosine", linkage="average"
        )
        for row, label in zip(rows, model.fit(vectors).labels_, strict=True):
            found[row] = f"{workflow}:{label}"
    labels = [found[row] for row in range(len(variant.points))]
    return score("(c) batch average linkage at the cut", [p[1] for p in variant.points], labels)


def gaia(seeds: int, text_features: str) -> dict:
    settings = DetectorSettings(text_features=text_features)
    cut = EMBEDDED_MODE_DISTANCE if text_features == "embedding" else HASHED_MODE_DISTANCE
    runs = [evaluate(TRAIL, taxonomy="trail", seed=seed, settings=settings) for seed in range(seeds)]
    for run in runs:
        for variant in run.variants:
            variant.scores.append(batch_linkage(variant, cut))
    out: dict = {"seeds": seeds, "text_features": text_features, "variants": {}}
    for index, variant in enumerate(runs[0].variants):
        methods = {}
        for position, first in enumerate(variant.scores):
            scores = [run.variants[index].scores[position] for run in runs]
            methods[first.method] = {
                "ami": mean(s.ami for s in scores), "ari": mean(s.ari for s in scores),
                "nmi": mean(s.nmi for s in scores), "purity": mean(s.purity for s in scores),
                "modes": mean(s.clusters for s in scores), "ami_per_seed": [s.ami for s in scores],
                "ari_per_seed": [s.ari for s in scores],
            }  # fmt: skip
        out["variants"][variant.variant] = {"errors": variant.errors, "categories": variant.categories,
                                            "methods": methods}  # fmt: skip
    return out


# ---------------------------------------------------------------- candidates: learn a batch, label it


class Tracked:
    """The daemon's tracker (or a variant of its macro step): labels at the batch's assign()."""

    def __init__(self, tracker: ModeTracker) -> None:
        self.tracker = tracker

    def batch(self, points: list[np.ndarray]) -> list[str]:
        for point in points:
            self.tracker.learn_one(point)
        return [mode or "noise" for mode in self.tracker.assign()[0]]


class FromScratchTracker(ModeTracker):
    """The macro step before the incremental one: the agglomeration of all micro-cluster centres
    recomputed from scratch at every batch (scikit-learn's average linkage at the same cut)."""

    def _groups(self) -> dict[int, dict[int, float]]:
        self.micro.fade()
        if not len(self.micro):
            return {}
        labels = np.zeros(1, dtype=np.int64)
        if len(self.micro) > 1:
            labels = (
                AgglomerativeClustering(
                    n_clusters=None, distance_threshold=self.mode_distance, metric="cosine", linkage="average"
                )
                .fit(self.micro.directions())
                .labels_
            )
        groups: dict[int, dict[int, float]] = {}
        for micro_id, label, weight in zip(self.micro.ids, labels, self.micro.current_weights(), strict=True):
            groups.setdefault(int(label), {})[int(micro_id)] = float(weight)
        return {label: g for label, g in groups.items() if sum(g.values()) >= self.minimum_weight}


class HdbscanTracker(ModeTracker):
    """The same micro-clusters, modes by HDBSCAN over their centres instead of a distance cut."""

    def _groups(self) -> dict[int, dict[int, float]]:
        self.micro.fade()
        if len(self.micro) < 3:
            return {}
        labels = HDBSCAN(min_cluster_size=3, metric="cosine", copy=True).fit(self.micro.directions()).labels_
        groups: dict[int, dict[int, float]] = {}
        for micro_id, label, weight in zip(self.micro.ids, labels, self.micro.current_weights(), strict=True):
            if label >= 0:
                groups.setdefault(int(label), {})[int(micro_id)] = float(weight)
        return groups


class RiverModel:
    """A River clusterer: learn_one per failure, predict_one at the batch's end."""

    def __init__(self, model) -> None:
        self.model = model

    def batch(self, points: list[np.ndarray]) -> list[str]:
        dicts = [{i: float(v) for i, v in enumerate(p) if v} for p in points]
        for point in dicts:
            self.model.learn_one(point)
        return [str(self.model.predict_one(point)) for point in dicts]


class ReservoirPrototypes:
    """Prototypes refreshed from a reservoir every `every` failures: KMeans with k chosen by
    silhouette (2 to 15), then each failure goes to its nearest prototype."""

    def __init__(self, size: int = 1_000, seed: int = 0, every: int = 200) -> None:
        self.size, self.rng, self.seen, self.reservoir = size, random.Random(seed), 0, []
        self.every, self.refreshed, self.centres = every, -every, np.zeros((0, 0))

    def batch(self, points: list[np.ndarray]) -> list[str]:
        for point in points:
            self.seen += 1
            if len(self.reservoir) < self.size:
                self.reservoir.append(point)
            elif (slot := self.rng.randrange(self.seen)) < self.size:
                self.reservoir[slot] = point
        if self.seen - self.refreshed >= self.every:
            self.refreshed = self.seen
            data = np.array(self.reservoir)
            best, self.centres = -2.0, data[:1]
            for k in range(2, min(15, len(data) - 1) + 1):
                model = KMeans(k, n_init=2, random_state=0).fit(data)
                if len(set(model.labels_)) > 1 and (value := silhouette_score(data, model.labels_)) > best:
                    best, self.centres = value, model.cluster_centers_
        return [str(int(np.argmin(((self.centres - p) ** 2).sum(1)))) for p in points]


CANDIDATES = {
    "micro-clusters + incremental agglomerative cut (chosen)": lambda: Tracked(ModeTracker()),
    "micro-clusters + agglomerative cut from scratch (before)": lambda: Tracked(FromScratchTracker()),
    "micro-clusters + incremental agglomerative cut 0.5": lambda: Tracked(ModeTracker(mode_distance=0.5)),
    "micro-clusters + incremental agglomerative cut 0.8": lambda: Tracked(ModeTracker(mode_distance=0.8)),
    "micro-clusters + HDBSCAN": lambda: Tracked(HdbscanTracker()),
    "River DBSTREAM r=1.05 (before)": lambda: RiverModel(
        cluster.DBSTREAM(
            clustering_threshold=1.05,
            fading_factor=0.0002,
            cleanup_interval=200,
            intersection_factor=0.3,
            minimum_weight=2.0,
        )
    ),
    "River DenStream eps=1.1": lambda: RiverModel(
        cluster.DenStream(
            epsilon=1.1, decaying_factor=0.001, beta=0.75, mu=2, n_samples_init=50, stream_speed=100
        )
    ),
    "reservoir prototypes (KMeans, k by silhouette)": ReservoirPrototypes,
}


def bake(vectors: list[np.ndarray], truth: list[str], late: str | None = None) -> dict:
    results = {}
    for name, make in CANDIDATES.items():
        candidate, labels = make(), []
        started = time.perf_counter()
        for start in range(0, len(vectors), BATCH):
            labels.extend(candidate.batch(vectors[start : start + BATCH]))
        elapsed = time.perf_counter() - started
        row = {
            "ami": float(adjusted_mutual_info_score(truth, labels)),
            "ari": float(adjusted_rand_score(truth, labels)),
            "modes": len(set(labels) - {"noise"}),
            "failures_per_s": len(vectors) / elapsed,
        }
        if isinstance(candidate, Tracked):  # how many failures are at the end in their arrival mode
            end = [candidate.tracker.classify(v) or "noise" for v in vectors]
            row["arrival_mode_kept"] = sum(a == b for a, b in zip(labels, end, strict=True)) / len(end)
        if late is not None:
            own = [label for label, t in zip(labels, truth, strict=True) if t == late]
            earlier = set(labels[: truth.index(late)])
            main = Counter(own).most_common(1)[0][0]
            row["late_mode_new"] = main not in earlier and main not in (NOISE, "noise")
            row["late_failures_before_its_mode"] = own.index(main)
        results[name] = row
        print(name, row, flush=True)
    return results


def synthetic(stream) -> tuple[list[np.ndarray], list[str]]:
    featurizer = SignatureFeaturizer()
    return [featurizer.learn_transform_one(f)[0] for f, _ in stream], [m for _, m in stream]


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--embedding", action="store_true", help="also TRAIL with sentence embeddings (slow)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict = {"command": "make bench BENCH=modes", "batch": BATCH}
    if TRAIL.exists():
        result["gaia"] = gaia(args.seeds, "hashed")
        print(result["gaia"], flush=True)
        if args.embedding:
            result["gaia_embedding"] = gaia(1, "embedding")
        first = evaluate(TRAIL, taxonomy="trail", seed=0)
        result["bakeoff_gaia"] = {
            v.variant: bake([p[0] for p in v.points], [p[1] for p in v.points]) for v in first.variants
        }
    planted = planted_stream(3_000, seed=3, modes={"calc": 1, "search": 1, "format": 1, "noise": 0.3})
    result["bakeoff_planted"] = bake(*synthetic(planted))
    mechanisms = dict.fromkeys(
        ["carry", "misread", "format", "hallucination", "tool_args", "late_timeout"], 1
    )
    stream = mechanism_stream(3_000, seed=5, mechanisms=mechanisms, late={"late_timeout": 2_000})
    result["bakeoff_mechanisms"] = bake(*synthetic(stream), late="late_timeout")
    report(result, "modes", args.out)
    return result


if __name__ == "__main__":
    main()
