"""The event log's vocabulary: every state change of cegraph is one of these, appended, never edited.

Payloads are plain JSON-able dicts, so the log stays readable with nothing but SQL and `jq`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

EXECUTION_COMPLETED = "ExecutionCompleted"
EXECUTION_AMENDED = "ExecutionAmended"
FEEDBACK_RECEIVED = "FeedbackReceived"
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
