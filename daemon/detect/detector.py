"""The density stage: executions in, failure modes, their mass and triggers out (as events).

Per batch of executions: label the failures, turn each into a signature, learn it into the mode
tracker, then assign the batch to modes, update the mass per (workflow, version, mode), watch for
drift and for mass crossings. Everything it decides is returned as events for the caller to store.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cegraph.daemon.detect.density import (
    EMBEDDED_MODE_DISTANCE,
    HASHED_MODE_DISTANCE,
    NOISE,
    ModeChange,
    ModeIds,
    ModeTracker,
    unit,
)
from cegraph.daemon.detect.failures import Failure, FeedbackSignal, label_failures
from cegraph.daemon.detect.mass import MassTracker
from cegraph.daemon.detect.signature import SignatureFeaturizer, SignatureParts, TextEmbedder
from cegraph.daemon.detect.trigger import DriftWatch, MassTrigger, Observed, node_groups
from cegraph.daemon.events import (
    MODE_DRIFTED,
    MODE_EMERGED,
    MODE_FADED,
    MODE_MASS_CROSSED,
    MODE_MERGED,
    Event,
    FailureObservedPayload,
    MassObservedPayload,
)
from cegraph.daemon.settings import DetectorSettings
from cegraph.daemon.spans import Node

EXEMPLARS = 5
TOP_TERMS = 8
LABEL_TERMS = 3

# A hint of the nearest category of TRAIL's taxonomy (`connectors/trail/taxonomy.py`), guessed only from
# unambiguous evidence, and only when most of a mode agrees: display text, never used by the loop.
CATEGORY_RULES: tuple[tuple[str, frozenset[str]], ...] = (
    ("Timeout Issues", frozenset({"timeout", "timeouterror", "timed"})),
    ("Rate Limiting", frozenset({"ratelimit", "ratelimiterror", "429"})),
    ("Authentication Errors", frozenset({"unauthorized", "authenticationerror", "forbidden", "401", "403"})),
    ("Resource Not Found", frozenset({"filenotfounderror", "notfound", "404"})),
    ("Formatting Errors", frozenset({"json", "jsondecodeerror", "format", "formatting", "schema"})),
    ("Tool-related", frozenset({"tool", "arguments", "argument", "typeerror"})),
    ("Resource Exhaustion", frozenset({"memoryerror", "length", "max_tokens", "exhausted"})),
)
CATEGORY_CONFIDENCE = 0.6


@dataclass(slots=True)
class ExecutionInput:
    trace_id: str
    workflow_id: str
    workflow_version: str
    nodes: list[Node]
    feedback: list[FeedbackSignal] = field(default_factory=list)
    feedback_only: bool = False  # late feedback on an execution already counted: only its failures


@dataclass(slots=True)
class Assignment:
    failure: Failure
    mode: str  # NOISE when the failure belongs to no mode yet
    vector: np.ndarray


@dataclass
class ModeDescription:
    """What a person needs to recognise a mode: where, what it says, and its most typical cases."""

    mode: str
    failures: int = 0
    nodes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    terms: Counter[str] = field(default_factory=Counter)
    categories: Counter[str] = field(default_factory=Counter)
    exemplars: list[tuple[float, str]] = field(default_factory=list)  # (distance to centre, failure id)

    def add(
        self,
        assignment: Assignment,
        parts: SignatureParts,
        centroid: np.ndarray | None,
        idf: Callable[[str], float] = lambda term: 1.0,
    ) -> None:
        """`idf` ranks a failure's terms by how specific they are, so the description's terms are
        what sets the mode apart, not the words every failure has."""
        failure = assignment.failure
        node = failure.node
        self.failures += 1
        self.nodes[f"{node.workflow_id}/{node.node_id}"] += 1
        error = node.exception_type or node.error_type or failure.source
        self.errors[error] += 1
        specific = {term: weight * idf(term) for term, weight in parts.text_terms.items()}
        for term, weight in sorted(specific.items(), key=lambda item: -item[1])[:TOP_TERMS]:
            self.terms[term] += weight
        category = guess_category(parts)
        if category:
            self.categories[category] += 1
        if centroid is not None:
            size = min(len(centroid), len(assignment.vector))
            distance = float(np.linalg.norm(unit(assignment.vector[:size]) - centroid[:size]))
            self.exemplars.append((distance, failure.failure_id))
            self.exemplars.sort()
            del self.exemplars[EXEMPLARS:]
        if len(self.terms) > 500:  # bounded: keep the heaviest terms
            self.terms = Counter(dict(self.terms.most_common(200)))

    def category(self) -> str | None:
        if not self.categories or not self.failures:
            return None
        name, count = self.categories.most_common(1)[0]
        return name if count / self.failures >= CATEGORY_CONFIDENCE else None

    @property
    def node(self) -> str:
        """Where most of its failures are (`workflow/node`), or "" before any."""
        return self.nodes.most_common(1)[0][0] if self.nodes else ""

    def label(self) -> str:
        """A short human label: the node, what it raised (or how it failed), the top terms."""
        if not self.nodes:
            return self.mode
        node = self.nodes.most_common(1)[0][0].split("/", 1)[-1]
        error = self.errors.most_common(1)[0][0] if self.errors else ""
        words = [t.removeprefix("err=") for t, _ in self.terms.most_common(TOP_TERMS)]
        words = [w for w in dict.fromkeys(words) if w != error.lower()][:LABEL_TERMS]
        return f"{node}: {error}" + (f" ({', '.join(words)})" if words else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "label": self.label(),
            "failures": self.failures,
            "node": self.node,
            "nodes": dict(self.nodes.most_common(3)),
            "errors": dict(self.errors.most_common(3)),
            "terms": [term for term, _ in self.terms.most_common(TOP_TERMS)],
            "exemplars": [failure_id for _, failure_id in self.exemplars],
            "category": self.category(),
        }


def workflow_of(nodes: list[Node]) -> tuple[str, str]:
    """(workflow id, version) of one execution: its root's, else the first node's that names one."""
    identity = next((n for n in nodes if n.is_root and n.workflow_id), None) or next(
        (n for n in nodes if n.workflow_id), None
    )
    return (identity.workflow_id, identity.workflow_version) if identity else ("", "")


@dataclass(slots=True)
class WorkflowModes:
    """The density of one workflow: its own featurizer (document frequencies, latency norms) and
    tracker, so modes, their mass and their descriptions never mix workflows."""

    featurizer: SignatureFeaturizer
    tracker: ModeTracker


@dataclass(frozen=True)
class ModeClassifier:
    """A frozen copy of the detector's featurizers and modes. It places the failures of shadow runs in
    the modes production has, learning nothing from them: shadow traffic must not move the density.

    Made from `FailureDetector.frozen()` (plain data: a refinement job carries it to a refine worker
    in another process, `daemon/refine/job_messages.py`), so a job classifies alike wherever it runs.
    """

    workflows: dict[str, WorkflowModes]

    @classmethod
    def of(cls, frozen: dict[str, Any], embedder: TextEmbedder | None = None) -> ModeClassifier:
        thaw = SignatureFeaturizer.thawed
        return cls({
            workflow: WorkflowModes(thaw(state["featurizer"], embedder), ModeTracker.thawed(state["tracker"]))
            for workflow, state in frozen.items()
        })  # fmt: skip

    def classify(self, nodes: list[Node]) -> list[tuple[Failure, str]]:
        """Each failure of one execution and its mode (NOISE when it falls in none, or its workflow
        has no modes yet)."""
        modes = self.workflows.get(workflow_of(nodes)[0])
        return [
            (failure, modes.tracker.classify(modes.featurizer.transform_one(failure)) if modes else NOISE)
            for failure in label_failures(nodes)
        ]


def guess_category(parts: SignatureParts) -> str | None:
    words = {term.removeprefix("err=") for term in parts.text_terms}
    for category, keys in CATEGORY_RULES:
        if words & keys:
            return category
    return None


def embedder_for(settings: DetectorSettings):
    if settings.text_features != "embedding":
        return None
    from cegraph.daemon.detect.embedding import shared_embedder

    return shared_embedder()


class FailureDetector:
    def __init__(
        self,
        settings: DetectorSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        tracker_factory: Callable[[ModeIds], ModeTracker] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.embedder = embedder_for(settings)
        cut = EMBEDDED_MODE_DISTANCE if self.embedder is not None else HASHED_MODE_DISTANCE
        self.tracker_factory = tracker_factory or (lambda ids: ModeTracker(mode_distance=cut, ids=ids))
        self.workflows: dict[str, WorkflowModes] = {}
        self.mode_workflow: dict[str, str] = {}  # live mode -> its workflow
        self.mass = MassTracker(settings.half_life_executions)
        self.trigger = MassTrigger(
            threshold=settings.mass_threshold,
            min_support=settings.min_support,
            hysteresis=settings.hysteresis,
            cooldown_s=settings.cooldown_s,
        )
        self.drift = DriftWatch()
        self.descriptions: dict[str, ModeDescription] = {}

    def _modes_of(self, workflow: str) -> WorkflowModes:
        modes = self.workflows.get(workflow)
        if modes is None:
            modes = self.workflows[workflow] = WorkflowModes(
                SignatureFeaturizer(self.embedder, latency=self.settings.latency_trait),
                self.tracker_factory(ModeIds(workflow)),
            )
        return modes

    def state(self) -> dict[str, int]:
        """Micro-clusters, modes and failures seen, over every workflow."""
        total = {"micro_clusters": 0, "modes": 0, "seen": 0, "workflows": len(self.workflows)}
        for modes in self.workflows.values():
            for key, value in modes.tracker.state().items():
                total[key] += value
        return total

    def observe(self, executions: list[ExecutionInput]) -> tuple[list[Event], list[Assignment]]:
        by_workflow: dict[str, list[tuple[ExecutionInput, Failure]]] = {}
        for execution in executions:
            failures = label_failures(execution.nodes, execution.feedback)
            if execution.feedback_only:
                failures = [f for f in failures if f.source == "feedback"]
            by_workflow.setdefault(execution.workflow_id, []).extend((execution, f) for f in failures)
        events: list[Event] = []
        assignments: list[Assignment] = []
        per_execution: dict[str, Counter[str]] = {}
        for workflow, labelled in by_workflow.items():
            modes_of = self._modes_of(workflow)
            signatures = modes_of.featurizer.learn_transform_many([failure for _, failure in labelled])
            for vector, _ in signatures:
                modes_of.tracker.learn_one(vector)
            modes, changes = modes_of.tracker.assign()
            events.extend(self._lifecycle(workflow, changes))
            for (execution, failure), (vector, parts), mode in zip(labelled, signatures, modes, strict=True):
                assignment = Assignment(failure, mode, vector)
                assignments.append(assignment)
                per_execution.setdefault(execution.trace_id, Counter())[mode] += 1
                if mode != NOISE:
                    description = self.descriptions.setdefault(mode, ModeDescription(mode))
                    centroid = modes_of.tracker.modes[mode].centroid
                    description.add(assignment, parts, centroid, modes_of.featurizer.idf)
                observed = FailureObservedPayload(
                    failure_id=failure.failure_id,
                    trace_id=failure.trace_id,
                    span_id=failure.span_id,
                    source=failure.source,
                    node_id=failure.node.node_id,
                    mode=mode,
                    workflow_id=execution.workflow_id,
                    workflow_version=execution.workflow_version,
                )
                events.append(observed.event(failure.trace_id))
        touched: set[tuple[str, str, str]] = set()
        for execution in executions:
            key = (execution.workflow_id, execution.workflow_version)
            counts = per_execution.pop(execution.trace_id, Counter())
            if not execution.feedback_only:
                self.mass.execution(key)
            for mode, count in counts.items():
                self.mass.failure(key, mode or "noise", count)
                if mode:
                    touched.add((*key, mode))
            if execution.feedback_only:
                continue  # late feedback is no new execution: nothing for the drift watch
            known = {m for m in self.mass.masses(key) if m != "noise" and m in self.mode_workflow}
            for found in self.drift.observe(*key, counts, known):
                drifted = {
                    "workflow_id": found.workflow,
                    "workflow_version": found.version,
                    "mode": found.mode,
                    "rate": found.rate,
                }
                events.append(Event(MODE_DRIFTED, found.mode, drifted))
        events.extend(self._mass_events(touched))
        return events, assignments

    def _lifecycle(self, workflow: str, changes: list[ModeChange]) -> list[Event]:
        events = []
        for change in changes:
            if change.kind == "emerged":
                self.mode_workflow[change.mode] = workflow
                events.append(
                    Event(MODE_EMERGED, change.mode, {"mode": change.mode, "workflow_id": workflow})
                )
            elif change.kind == "merged":
                assert change.into is not None
                self.mass.rename(change.mode, change.into)
                merged = self.descriptions.pop(change.mode, None)
                if merged is not None:
                    self.descriptions.setdefault(
                        change.into, ModeDescription(change.into)
                    ).failures += merged.failures
                self.trigger.forget(change.mode)
                self.drift.forget(change.mode)
                self.mode_workflow.pop(change.mode, None)
                merged_payload = {"mode": change.mode, "into": change.into, "workflow_id": workflow}
                events.append(Event(MODE_MERGED, change.mode, merged_payload))
            else:
                self.descriptions.pop(change.mode, None)
                self.trigger.forget(change.mode)
                self.drift.forget(change.mode)
                self.mode_workflow.pop(change.mode, None)
                events.append(Event(MODE_FADED, change.mode, {"mode": change.mode, "workflow_id": workflow}))
        return events

    def _mass_events(self, touched: set[tuple[str, str, str]]) -> list[Event]:
        events = []
        now = self.clock()
        for workflow, version, mode in sorted(touched):
            if mode not in self.mode_workflow:
                continue
            mass = self.mass.mass((workflow, version), mode)
            support = self.mass.support((workflow, version), mode)
            description = self.descriptions.get(mode)
            observed = MassObservedPayload(
                workflow_id=workflow,
                workflow_version=version,
                mode=mode,
                mass=mass,
                support=support,
                efm=self.mass.expected_failure_mass((workflow, version)),
                description=description.as_dict() if description else {},
            )
            events.append(observed.event(mode))
            if self.trigger.observe(workflow, version, mode, mass, support, now) is not None:
                events.append(Event(MODE_MASS_CROSSED, mode, asdict(observed)))
        for workflow, version in sorted({(w, v) for w, v, _ in touched}):
            events.extend(self._group_crossings(workflow, version, now))
        return events

    def _group_crossings(self, workflow: str, version: str, now: float) -> list[Event]:
        """A node's modes that cross the threshold together (`node_groups`): one trigger, the heaviest
        mode the target with the others joined to it."""
        key = (workflow, version)
        observed = [
            Observed(mode, self.descriptions[mode].node, mass, self.mass.support(key, mode))
            for mode, mass in sorted(self.mass.masses(key).items())
            if self.mode_workflow.get(mode) == workflow and mode in self.descriptions
        ]
        events = []
        for group in node_groups(observed, self.settings.mass_threshold):
            mass, support = sum(item.mass for item in group), sum(item.support for item in group)
            if self.trigger.observe(workflow, version, f"node:{group[0].node}", mass, support, now) is None:
                continue
            lead = group[0].mode
            crossed = MassObservedPayload(
                workflow_id=workflow, workflow_version=version, mode=lead, mass=mass, support=support,
                efm=self.mass.expected_failure_mass(key), description=self.descriptions[lead].as_dict(),
                joined=[item.mode for item in group[1:]],
            )  # fmt: skip
            events.append(Event(MODE_MASS_CROSSED, lead, asdict(crossed)))
        return events

    def frozen(self, workflow: str | None = None) -> dict[str, Any]:
        """What a `ModeClassifier` of every workflow (or of one) is made of, as plain data."""
        return {
            name: {"featurizer": modes.featurizer.frozen(), "tracker": modes.tracker.frozen()}
            for name, modes in self.workflows.items()
            if workflow is None or name == workflow
        }

    def classifier(self, workflow: str | None = None) -> ModeClassifier:
        """A snapshot for shadow verification (the embedding model, if any, is shared, not copied)."""
        return ModeClassifier.of(self.frozen(workflow), self.embedder)

    def modes(self) -> list[dict[str, Any]]:
        """Every live mode per workflow version: mass, support and description."""
        rows = []
        for (workflow, version), state in self.mass.versions.items():
            for mode in state.modes:
                if self.mode_workflow.get(mode) != workflow:
                    continue
                description = self.descriptions.get(mode, ModeDescription(mode))
                rows.append({
                    "mode": mode, "workflow_id": workflow, "workflow_version": version,
                    "mass": self.mass.mass((workflow, version), mode),
                    "support": self.mass.support((workflow, version), mode),
                    "description": description.as_dict(),
                })  # fmt: skip
        return sorted(rows, key=lambda row: -row["mass"])
