"""The `cegraph.rollouts` message: the canary judge's decision about a canary version.

Keyed by workflow id. `promote` makes the canary version the stable one; `rollback` drops it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cegraph.schemas.patch import SemVer
from cegraph.schemas.workflow import NodeId


class ArmStatistics(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    executions: int = Field(ge=0, description="Executions of this arm compared.")
    failures: int = Field(ge=0, description="Of them, failed ones (spans, evaluations or feedback).")
    failure_rate: float = Field(ge=0, le=1, description="failures / executions.")
    mode_failures: int | None = Field(None, ge=0, description="Failed in the target mode, when known.")
    mode_failure_rate: float | None = Field(None, ge=0, le=1, description="mode_failures / executions.")


class RolloutStatistics(BaseModel):
    """The sequential test behind a decision (always-valid intervals, see daemon/rollout/sequential.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(
        gt=0, lt=1, description="Chance of any decision about a canary no different from stable."
    )
    target_mode: str | None = Field(None, description="The failure mode the patch aimed at, when known.")
    canary: ArmStatistics
    stable: ArmStatistics
    difference: tuple[float, float] = Field(
        description="Interval of canary minus stable failure rate, valid at every look."
    )
    mode_difference: tuple[float, float] | None = Field(
        None, description="The same for the target mode's failure rate."
    )


class RolloutDecision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, title="cegraph rollout decision")

    workflow_id: NodeId = Field(description="The workflow the decision is about.")
    version: SemVer = Field(description="The canary version decided on.")
    decision: Literal["promote", "rollback"]
    reason: str = Field("", max_length=20_000, description="Why, e.g. the sequential test's outcome.")
    stable_version: SemVer | None = Field(
        None, description="The stable version the canary was compared with."
    )
    statistics: RolloutStatistics | None = Field(None, description="The comparison the decision rests on.")
