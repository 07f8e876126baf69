"""The `cegraph.rollouts` message: the canary judge's decision about a canary version.

Keyed by workflow id. `promote` makes the canary version the stable one; `rollback` drops it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cegraph.schemas.patch import SemVer
from cegraph.schemas.workflow import NodeId


class RolloutDecision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, title="cegraph rollout decision")

    workflow_id: NodeId = Field(description="The workflow the decision is about.")
    version: SemVer = Field(description="The canary version decided on.")
    decision: Literal["promote", "rollback"]
    reason: str = Field("", max_length=20_000, description="Why, e.g. the sequential test's outcome.")
