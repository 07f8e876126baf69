"""How well discovered failure modes match human judgement, on any annotated trace set.

The traces go through the same online path as production traffic (normalization, failure labeling,
signatures per workflow, the mode trackers) in an order drawn from the run's seed; each human label
arrives as feedback naming its span, without its category (and, in the "with critique" variant,
with the label's critique text, as an LLM judge's explanation would arrive). The modes of the
labelled failures are then scored against the categories: AMI first (NMI alone rewards many
clusters), ARI, NMI, purity, the number of modes. Two readings of the online modes:

- at arrival: the mode each failure got when its batch was assigned (what the daemon records, and
  what its mass counts);
- at the end: the mode each failure falls in once the whole set was seen (what `cegraph modes` shows).

Beside them, on the same failures: (a) grouping by span name, (b) batch KMeans on the same signature
vectors with k = the number of categories (told the answer's size, which the daemon never is).
Failures in no mode count as one cluster, "noise".
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

from cegraph.connectors.trail.annotated import AnnotatedSet, AnnotatedSetError, Taxonomy, load_annotated
from cegraph.daemon.detect.density import ModeIds, ModeTracker
from cegraph.daemon.detect.detector import ExecutionInput, FailureDetector, workflow_of
from cegraph.daemon.detect.failures import FeedbackSignal
from cegraph.daemon.ingest.normalize import TextPolicy, normalize
from cegraph.daemon.settings import DetectorSettings

BATCH = 10  # executions per detector batch, as the daemon would see them between flushes
FEEDBACK_SOURCE = "annotation"
VARIANTS = {"location only": False, "with critique": True}


@dataclass(frozen=True)
class Score:
    method: str
    ami: float
    ari: float
    nmi: float
    purity: float
    clusters: int
    errors: int


@dataclass
class VariantResult:
    variant: str
    scores: list[Score]
    categories: int
    errors: int
    # (signature, category, workflow) of each labelled failure in stream order, for benchmarks
    points: list[tuple[np.ndarray, str, str]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "categories": self.categories, "errors": self.errors,
            "scores": [asdict(s) for s in self.scores],
        }  # fmt: skip


@dataclass
class Evaluation:
    dataset: str
    seed: int
    text_features: str
    variants: list[VariantResult] = field(default_factory=list)
    skipped: int = 0  # traces or labels left out (no span tree, a location naming no span)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "seed": self.seed, "text_features": self.text_features,
            "skipped": self.skipped, "variants": [v.as_dict() for v in self.variants],
        }  # fmt: skip


def purity(truth: list[str], predicted: list[str]) -> float:
    by_cluster: dict[str, Counter[str]] = {}
    for gold, cluster in zip(truth, predicted, strict=True):
        by_cluster.setdefault(cluster, Counter())[gold] += 1
    return sum(c.most_common(1)[0][1] for c in by_cluster.values()) / len(truth) if truth else 0.0


def score(method: str, truth: list[str], predicted: list[str]) -> Score:
    return Score(
        method,
        float(adjusted_mutual_info_score(truth, predicted)),
        float(adjusted_rand_score(truth, predicted)),
        float(normalized_mutual_info_score(truth, predicted)),
        purity(truth, predicted),
        len(set(predicted)),
        len(truth),
    )


def executions_of(
    annotated: AnnotatedSet, *, with_critique: bool, policy: TextPolicy
) -> tuple[list[ExecutionInput], dict[tuple[str, str], list[str]]]:
    """Executions with the labels as feedback, and the categories of each labelled span."""
    gold: dict[tuple[str, str], list[str]] = {}
    feedback: dict[str, list[FeedbackSignal]] = {}
    for label in annotated.labels:
        if label.trace_id not in annotated.spans:
            continue
        gold.setdefault((label.trace_id, label.span_id), []).append(label.category)
        critique = label.critique if with_critique else ""
        signal = FeedbackSignal(label.trace_id, label.span_id, critique, FEEDBACK_SOURCE)
        feedback.setdefault(label.trace_id, []).append(signal)
    executions = []
    for trace_id, records in annotated.spans.items():
        nodes = [normalize(record, policy) for record in records]
        executions.append(ExecutionInput(trace_id, *workflow_of(nodes), nodes, feedback.get(trace_id, [])))
    return executions, gold


def evaluate_variant(
    annotated: AnnotatedSet,
    *,
    with_critique: bool,
    seed: int,
    settings: DetectorSettings,
    tracker_factory: Callable[[ModeIds], ModeTracker] | None = None,
    policy: TextPolicy | None = None,
) -> VariantResult:
    executions, gold = executions_of(annotated, with_critique=with_critique, policy=policy or TextPolicy())
    random.Random(seed).shuffle(executions)
    detector = FailureDetector(settings, tracker_factory=tracker_factory)
    truth: list[str] = []
    arrival: list[str] = []
    names: list[str] = []
    vectors: list[np.ndarray] = []
    failures = []
    for start in range(0, len(executions), BATCH):
        _, assignments = detector.observe(executions[start : start + BATCH])
        for assignment in assignments:
            failure = assignment.failure
            categories = gold.get((failure.trace_id, failure.span_id))
            if failure.source != "feedback" or not categories:
                continue
            for category in categories:  # two labels on one span: both are scored
                truth.append(category)
                arrival.append(assignment.mode or "noise")
                names.append(failure.node.name)
                vectors.append(assignment.vector)
                failures.append(failure)
    k = len(set(truth))
    if len(truth) < 2 or k < 2:
        raise AnnotatedSetError(
            f"{annotated.name}: {len(truth)} labelled failures in {k} categories: nothing to score "
            "(labels must name spans of the traces, in at least two categories)"
        )
    workflow = {execution.trace_id: execution.workflow_id for execution in executions}
    final = [
        detector.workflows[workflow[failure.trace_id]].tracker.classify(vector) or "noise"
        for failure, vector in zip(failures, vectors, strict=True)
    ]
    batch = KMeans(n_clusters=min(k, len(set(map(bytes, vectors)))), n_init=10, random_state=seed)
    labels = batch.fit(np.array(vectors)).labels_
    return VariantResult(
        "with critique" if with_critique else "location only",
        [
            score("cegraph online, at arrival", truth, arrival),
            score("cegraph online, at the end", truth, final),
            score("(a) span name", truth, names),
            score(f"(b) batch KMeans, k={k}", truth, [str(label) for label in labels]),
        ],
        k,
        len(truth),
        [(v, c, workflow[f.trace_id]) for v, c, f in zip(vectors, truth, failures, strict=True)],
    )


def evaluate(
    dataset: Path,
    *,
    split: str | None = None,
    taxonomy: Taxonomy = "none",
    seed: int = 0,
    settings: DetectorSettings | None = None,
    variants: tuple[str, ...] = tuple(VARIANTS),
    tracker_factory: Callable[[ModeIds], ModeTracker] | None = None,
) -> Evaluation:
    """Both variants (only "location only" when no label has a critique) on one annotated set."""
    annotated = load_annotated(dataset, split=split, taxonomy=taxonomy)
    if not annotated.spans:
        raise AnnotatedSetError(f"{annotated.name}: no traces with spans")
    if not annotated.labels:
        raise AnnotatedSetError(f"{annotated.name}: no labels that name a span")
    settings = settings or DetectorSettings()
    result = Evaluation(annotated.name, seed, settings.text_features, skipped=len(annotated.skipped))
    for variant in variants:
        if VARIANTS[variant] and not annotated.has_critiques:
            continue
        result.variants.append(
            evaluate_variant(
                annotated,
                with_critique=VARIANTS[variant],
                seed=seed,
                settings=settings,
                tracker_factory=tracker_factory,
            )
        )
    return result
