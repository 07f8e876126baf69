"""The event log's vocabulary: every state change of cegraph is one of these, appended, never edited.

Payloads are plain JSON-able dicts, so the log stays readable with nothing but SQL and `jq`; their
fields are declared once, below, by type.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

import orjson
from pydantic import BaseModel

from cegraph.schemas.feedback import Feedback

EXECUTION_COMPLETED = "ExecutionCompleted"
EXECUTION_AMENDED = "ExecutionAmended"
FEEDBACK_RECEIVED = "FeedbackReceived"
INGEST_ADVANCED = "IngestAdvanced"  # how far ingest has stored each spans partition: the detector's watermark
# executions an ingest member leaves to its spans partitions' next owner, which reads them again
EXECUTIONS_RETRACTED = "ExecutionsRetracted"
FAILURE_INPUT_RECEIVED = "FailureInputReceived"  # a detector input another process's ingest made
MESSAGE_DEAD_LETTERED = "MessageDeadLettered"
WORKFLOW_REGISTERED = "WorkflowRegistered"
# the density stage
FAILURE_OBSERVED = "FailureObserved"
MODE_EMERGED = "ModeEmerged"
MODE_MERGED = "ModeMerged"
MODE_FADED = "ModeFaded"
MODE_MASS_CROSSED = "ModeMassCrossed"
MODE_DRIFTED = "ModeDrifted"
MASS_OBSERVED = "MassObserved"
DETECTOR_STEPPED = "DetectorStepped"  # the log range one detector step read: its replay runs the same
MODE_NAMED = "ModeNamed"  # display text from the LLM (daemon/detect/naming.py), never used in a decision
# Propose-and-Verify: one job per trigger, every step an event; PatchCreated is the outbox
REFINEMENT_STARTED = "RefinementStarted"
PROPOSAL_REJECTED = "ProposalRejected"
CANDIDATE_VERIFIED = "CandidateVerified"
REFINEMENT_FINISHED = "RefinementFinished"
PATCH_CREATED = "PatchCreated"
PATCH_APPROVED = "PatchApproved"  # a human let a patch carrying free text be published
PATCH_PUBLISHED = "PatchPublished"
# the canary judge: CanaryDecided is the outbox of `cegraph.rollouts`, RolloutPublished marks it sent
CANARY_STARTED = "CanaryStarted"
CANARY_DECIDED = "CanaryDecided"
ROLLOUT_PUBLISHED = "RolloutPublished"


@dataclass(slots=True)
class Event:
    type: str
    key: str
    payload: dict[str, Any]

    def payload_json(self, omit: str | None = None) -> str:
        payload = self.payload if omit is None else {k: v for k, v in self.payload.items() if k != omit}
        return orjson.dumps(payload).decode()


# ---------------------------------------------------------------------- typed payloads
# What each event's payload holds, for the Python that writes it and the SQL that reads it: SQL names
# a field through its type (`MassObserved.sql("mass", "DOUBLE")`), so a field misspelled or renamed on
# one side fails at import, not as a silent NULL.


def _sql(type_: str, names: Iterable[str], name: str, cast: str | None, of: str, *, text: bool) -> str:
    if name not in names:
        raise AttributeError(f"{type_} payloads have no field {name!r}")
    path = f"{of}->>'{name}'" if text else f"{of}->'{name}'"
    return f"({path})::{cast}" if cast else path


def _plain(value: Any) -> Any:
    if isinstance(value, str | int | float | bool | None):
        return value
    return asdict(value) if is_dataclass(value) else copy.deepcopy(value)


@dataclass(frozen=True, slots=True)
class Payload:
    TYPE: ClassVar[str]

    @classmethod
    def sql(cls, name: str, cast: str | None = None, *, of: str = "payload") -> str:
        """The field as text (`payload->>'name'`, cast when asked) in SQL over the events table."""
        return _sql(cls.TYPE, {f.name for f in fields(cls)}, name, cast, of, text=True)

    @classmethod
    def json(cls, name: str, *, of: str = "payload") -> str:
        """The field as JSON (`payload->'name'`): an object or list to go into."""
        return _sql(cls.TYPE, {f.name for f in fields(cls)}, name, None, of, text=False)

    def event(self, key: str) -> Event:
        """Fields one level deep: the detector makes one of these per failure, and `asdict`'s recursive
        copy was a tenth of its step; a field that holds a dataclass still becomes a dict."""
        return Event(self.TYPE, key, {f.name: _plain(getattr(self, f.name)) for f in fields(self)})


@dataclass(frozen=True, slots=True)
class ModelPayload:
    """A payload that is a message model already (`FeedbackReceived` is a `Feedback`): SQL names its
    fields through the model."""

    TYPE: str
    model: type[BaseModel]

    def sql(self, name: str, cast: str | None = None, *, of: str = "payload") -> str:
        return _sql(self.TYPE, self.model.model_fields, name, cast, of, text=True)

    def json(self, name: str, *, of: str = "payload") -> str:
        return _sql(self.TYPE, self.model.model_fields, name, None, of, text=False)


@dataclass(frozen=True, slots=True)
class ExecutionCompletedPayload(Payload):
    """`partition` and `offset`: the last spans message of the execution, its place in the detector's
    order; `first_offset`: its first spans message on that partition, which says whether a consumer
    reading the partition from some offset on reads all of it (`ExecutionsRetracted`). Each is absent
    in logs written before it was recorded."""

    TYPE = EXECUTION_COMPLETED
    trace_id: str
    complete: bool
    reason: str
    partition: int
    offset: int
    first_offset: int


@dataclass(frozen=True, slots=True)
class ExecutionsRetractedPayload(Payload):
    """Executions this store stops counting as its own, because the consumer group reads every spans
    message of each again elsewhere: `cut` is, per spans partition (its number as text), the offset
    the group reads it from once this member no longer does (its last commit); the executions whose
    first message lies at or past it are `trace_ids`. `reason`: "restart" (the member came back
    after a crash) or "hand-over" (a rebalance took the partitions)."""

    TYPE = EXECUTIONS_RETRACTED
    topic: str
    cut: dict[str, int]
    trace_ids: list[str]
    reason: str


@dataclass(frozen=True, slots=True)
class FailureInputReceivedPayload(Payload):
    """An execution (or late feedback) from the failures topic, with its place in the detector's order.

    An execution's `nodes` (all of them when it failed, its roots otherwise: the task input and seed a
    replay needs) go to the span log, as a locally completed execution's do, and `execution` (its row
    in the sending member's `executions`) to this log's: refinement and the canary judge read both.
    Late feedback has no `execution`, and its copy of the nodes stays in `input`: the span log holds
    each execution once.
    """

    TYPE = FAILURE_INPUT_RECEIVED
    place: list[Any]
    input: dict[str, Any]
    execution: dict[str, Any] | None = None
    nodes: list[Any] = field(default_factory=list)

    def event(self, key: str) -> Event:
        """`nodes` stay `Node`s: the store writes them to the span log a column at a time."""
        return Event(
            self.TYPE, key,
            {"place": self.place, "input": self.input, "execution": self.execution, "nodes": self.nodes},
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class IngestAdvancedPayload(Payload):
    """Per spans partition (its number as text): [the offset below which every message is stored,
    whether that was all the partition held], for the partitions the reporting consumer reads."""

    TYPE = INGEST_ADVANCED
    topic: str
    partitions: int
    progress: dict[str, list[Any]]


FeedbackReceivedPayload = ModelPayload(FEEDBACK_RECEIVED, Feedback)


@dataclass(frozen=True, slots=True)
class WorkflowRegisteredPayload(Payload):
    TYPE = WORKFLOW_REGISTERED
    workflow_id: str
    version: str
    content_hash: str
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FailureObservedPayload(Payload):
    TYPE = FAILURE_OBSERVED
    failure_id: str
    trace_id: str
    span_id: str | None
    source: str
    node_id: str
    mode: str
    workflow_id: str
    workflow_version: str


@dataclass(frozen=True, slots=True)
class ModeChangedPayload(Payload):
    """`ModeEmerged`, `ModeFaded`, and `ModeMerged` with `into`."""

    TYPE = MODE_MERGED
    mode: str
    workflow_id: str
    into: str | None = None


@dataclass(frozen=True, slots=True)
class MassObservedPayload(Payload):
    """`MassObserved`, and `ModeMassCrossed` (the same observation, past the threshold)."""

    TYPE = MASS_OBSERVED
    workflow_id: str
    workflow_version: str
    mode: str
    mass: float
    support: int
    efm: float
    description: dict[str, Any]
    # a node's crossing: the other modes of its node joined to `mode` (mass and support are theirs
    # together); empty for one mode's crossing
    joined: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DetectorSteppedPayload(Payload):
    TYPE = DETECTOR_STEPPED
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class ModeNamedPayload(Payload):
    TYPE = MODE_NAMED
    mode: str
    workflow_id: str
    label: str
    name: str
    refused: str
    tokens: int


@dataclass(frozen=True, slots=True)
class RefinementStartedPayload(Payload):
    TYPE = REFINEMENT_STARTED
    job_id: str
    trigger_seq: int
    workflow_id: str
    workflow_version: str
    mode: str
    until_seq: int
    mass: float | None
    description: dict[str, Any]
    joined: list[str] = field(default_factory=list)  # modes targeted with `mode` (a node's crossing)


@dataclass(frozen=True, slots=True)
class RefinementFinishedPayload(Payload):
    TYPE = REFINEMENT_FINISHED
    job_id: str
    workflow_id: str
    workflow_version: str
    mode: str
    outcome: str
    reason: str
    finished_at: float
    cost: dict[str, Any]
    rejected: dict[str, int]
    text_rejected: dict[str, int]
    patch: dict[str, Any] | None
    waiting_for: int = 0  # outcome "waiting": more failures of the mode before it is tried again


@dataclass(frozen=True, slots=True)
class ProposalRejectedPayload(Payload):
    TYPE = PROPOSAL_REJECTED
    job_id: str
    round: int
    proposer: str
    reason: str
    excerpt: str
    text_policy: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PatchCreatedPayload(Payload):
    TYPE = PATCH_CREATED
    job_id: str
    patch_id: str
    created_at: float
    patch: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PatchApprovedPayload(Payload):
    TYPE = PATCH_APPROVED
    patch_id: str
    approved_by: str
    approved_at: float


@dataclass(frozen=True, slots=True)
class RolloutPublishedPayload(Payload):
    """Where the outbox publisher sent a decision (keyed by its canary)."""

    TYPE = ROLLOUT_PUBLISHED
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class PatchPublishedPayload(RolloutPublishedPayload):
    TYPE = PATCH_PUBLISHED
    patch_id: str


@dataclass(frozen=True, slots=True)
class CanaryStartedPayload(Payload):
    TYPE = CANARY_STARTED
    workflow_id: str
    version: str
    stable_version: str
    start_seq: int
    started_at: float
    target_mode: str | None


@dataclass(frozen=True, slots=True)
class CanaryDecidedPayload(Payload):
    TYPE = CANARY_DECIDED
    workflow_id: str
    version: str
    stable_version: str
    decision: str
    reason: str
    decided_at: float
    statistics: dict[str, Any]
