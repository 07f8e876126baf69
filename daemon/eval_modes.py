"""How well discovered failure modes match human judgement, on an annotated trace set (TRAIL format).

The traces go through the same online path as production traffic (OTLP decode, normalization,
failure labeling, signatures, the mode tracker); each annotated error arrives as feedback naming its
span, without its category. The modes of the annotated failures are then scored against the human
categories: AMI first (NMI alone rewards many clusters), ARI, NMI, purity. Beside them, in the same
run and on the same errors: (a) grouping by span name, (b) offline batch KMeans on the same
signature vectors with k = the number of categories.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

from cegraph.connectors.otlp_codec import decode_proto
from cegraph.connectors.trail import annotations_to_feedback, gold_labels, iter_trail, trail_to_otlp
from cegraph.daemon.density import ModeTracker
from cegraph.daemon.detector import ExecutionInput, FailureDetector
from cegraph.daemon.failures import FeedbackSignal
from cegraph.daemon.normalize import TextPolicy, normalize
from cegraph.daemon.settings import DetectorSettings

BATCH = 10  # executions per detector batch, as the daemon would see them between flushes


class Score(NamedTuple):
    method: str
    ami: float
    ari: float
    nmi: float
    purity: float
    clusters: int
    errors: int


def purity(truth: list[str], predicted: list[str]) -> float:
    by_cluster: dict[str, Counter[str]] = {}
    for gold, cluster in zip(truth, predicted, strict=True):
        by_cluster.setdefault(cluster, Counter())[gold] += 1
    return sum(c.most_common(1)[0][1] for c in by_cluster.values()) / len(truth) if truth else 0.0


def score(method: str, truth: list[str], predicted: list[str]) -> Score:
    return Score(
        method,
        adjusted_mutual_info_score(truth, predicted),
        adjusted_rand_score(truth, predicted),
        normalized_mutual_info_score(truth, predicted),
        purity(truth, predicted),
        len(set(predicted)),
        len(truth),
    )


def load_executions(
    dataset: Path, *, with_critique: bool, policy: TextPolicy
) -> tuple[list[ExecutionInput], dict]:
    """Executions with their annotations as feedback, and the gold category of each annotated span."""
    executions: list[ExecutionInput] = []
    gold: dict[tuple[str, str], list[str]] = {}
    for trace in iter_trail(dataset):
        if not trace.has_span_tree:
            continue
        nodes = [
            normalize(record, policy)
            for request in trail_to_otlp(trace)
            for record in decode_proto(request.SerializeToString())
        ]
        feedback = [
            FeedbackSignal(r["trace_id"], r["span_id"], r["critique"], r["source"])
            for r in annotations_to_feedback(trace, with_critique=with_critique)
        ]
        for label in gold_labels(trace):
            if label.leaf is not None and label.span_id is not None:
                gold.setdefault((label.trace_id, label.span_id), []).append(label.leaf)
        workflow = nodes[0].workflow_id if nodes else ""
        executions.append(ExecutionInput(nodes[0].trace_id, workflow, "", nodes, feedback))
    return executions, gold


def evaluate(
    dataset: Path,
    *,
    with_critique: bool,
    settings: DetectorSettings | None = None,
    tracker_factory: Callable[[], ModeTracker] = ModeTracker,
    policy: TextPolicy | None = None,
) -> list[Score]:
    executions, gold = load_executions(dataset, with_critique=with_critique, policy=policy or TextPolicy())
    detector = FailureDetector(settings or DetectorSettings(), tracker_factory=lambda ids: tracker_factory())
    truth: list[str] = []
    online: list[str] = []
    names: list[str] = []
    vectors: list[np.ndarray] = []
    for start in range(0, len(executions), BATCH):
        _, assignments = detector.observe(executions[start : start + BATCH])
        for assignment in assignments:
            failure = assignment.failure
            categories = gold.get((failure.trace_id, failure.span_id))
            if failure.source != "feedback" or not categories:
                continue
            for category in categories:  # two annotations on one span: both are scored
                truth.append(category)
                online.append(assignment.mode or "noise")
                names.append(failure.node.name)
                vectors.append(assignment.vector)
    k = len(set(truth))
    batch = KMeans(n_clusters=k, n_init=10, random_state=0).fit(np.array(vectors)).labels_
    return [
        score("cegraph (online)", truth, online),
        score("(a) span name", truth, names),
        score(f"(b) batch KMeans, k={k}", truth, [str(label) for label in batch]),
    ]
