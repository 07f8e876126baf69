"""The `cegraph.patches` message: a verified change to a workflow spec, as RFC 6902 operations.

Keyed by workflow id. Consumers apply `operations` to the canonical JSON of the spec at
`base_version` (`WorkflowSpec.canonical()`), validate the result and check that its content hash is
`content_hash`; a patch made for another base then fails instead of changing the wrong spec.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_serializer, model_validator

from cegraph.schemas.workflow import SEMVER, NodeId

SemVer = Annotated[str, StringConstraints(pattern=SEMVER.pattern)]
ContentHash = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
JsonPointer = Annotated[str, StringConstraints(pattern=r"^(/([^~/]|~[01])*)*$")]

_NEEDS_VALUE = frozenset({"add", "replace", "test"})
_NEEDS_FROM = frozenset({"move", "copy"})


class PatchOperation(BaseModel):
    """One RFC 6902 operation; it serializes with exactly the members its `op` takes."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    op: Literal["add", "remove", "replace", "move", "copy", "test"]
    path: JsonPointer = Field(description="JSON Pointer (RFC 6901) of the target location.")
    value: Any = Field(None, description="For add, replace and test.")
    from_: JsonPointer | None = Field(None, alias="from", description="For move and copy: the source.")

    @model_validator(mode="after")
    def _has_its_members(self) -> PatchOperation:
        if self.op in _NEEDS_VALUE and "value" not in self.model_fields_set:
            raise ValueError(f"operation {self.op!r} needs a 'value'")
        if self.op in _NEEDS_FROM and self.from_ is None:
            raise ValueError(f"operation {self.op!r} needs a 'from'")
        return self

    @model_serializer
    def _rfc6902(self) -> dict[str, Any]:
        data: dict[str, Any] = {"op": self.op, "path": self.path}
        if self.op in _NEEDS_VALUE:
            data["value"] = self.value
        if self.op in _NEEDS_FROM:
            data["from"] = self.from_
        return data


class Cost(BaseModel):
    """What finding and verifying a patch took: LLM calls and tokens (shadow runs and proposers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    llm_calls: int = Field(ge=0)
    tokens: int = Field(ge=0)
    wall_s: float = Field(ge=0, description="Wall time of the refinement job, in seconds.")


class Verification(BaseModel):
    """Current and patched spec on the same replayed inputs and seeds (paired). Rates are weighted
    back to the recorded traffic (the sample over-represents the mode's counterexamples)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pairs: int = Field(ge=0, description="Replayed inputs run on both specs.")
    counterexamples: int = Field(ge=0, description="Of them, executions that failed in the target mode.")
    target_before: float = Field(ge=0, le=1, description="Rate of failures in the target mode, current spec.")
    target_after: float = Field(ge=0, le=1, description="The same for the patched spec.")
    target_p: float = Field(ge=0, le=1, description="Exact McNemar p that the target mode dropped.")
    efm_before: float = Field(
        ge=0, le=1, description="Expected failure mass (failed executions per execution)."
    )
    efm_after: float = Field(ge=0, le=1)
    efm_change_low: float = Field(description="Paired bootstrap 95% interval of efm_after - efm_before.")
    efm_change_high: float
    worst_other: str = Field("", description="The other outcome closest to a significant rise.")
    worst_other_p: float = Field(1.0, ge=0, le=1, description="Its McNemar p that it rose.")
    calls_before: float = Field(
        0.0, ge=0, description="LLM calls per execution of the current spec (0: not measured)."
    )
    calls_after: float = Field(0.0, ge=0, description="The same for the patched spec.")


class Rationale(BaseModel):
    """Why the patch: the mode it addresses, its counterexamples, the edits, the evidence, the cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    mode: str
    mode_description: dict[str, Any] = Field(default_factory=dict)
    counterexamples: list[str] = Field(
        description="Trace ids of replayed executions that failed in the mode."
    )
    edits: list[dict[str, Any]] = Field(description="The operator edits, in order, with their proposer.")
    verification: Verification
    cost: Cost


class WorkflowPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, title="cegraph workflow patch")

    workflow_id: NodeId = Field(description="The workflow the patch changes.")
    base_version: SemVer = Field(description="The version the operations apply to.")
    new_version: SemVer = Field(description="The version of the resulting spec (greater than the base).")
    operations: list[PatchOperation] = Field(min_length=1, description="RFC 6902 JSON Patch.")
    content_hash: ContentHash = Field(description="Content hash of the resulting spec.")
    rationale: Rationale | None = Field(
        None, description="Why: the failure mode, counterexamples, verification statistics and cost."
    )
    signature: str | None = Field(None, description="Signature of the publisher over the patch.")

    def json_patch(self) -> list[dict[str, Any]]:
        """The operations as plain RFC 6902 JSON, for `jsonpatch.apply_patch`."""
        return [operation.model_dump(mode="json") for operation in self.operations]
