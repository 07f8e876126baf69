"""The workflow registry: spec versions kept as `WorkflowRegistered` events, read from their projection.

Rules an operator can rely on: registering the same content again changes nothing; a version, once
registered, always means the same content; and a new version of a workflow must be greater than its
latest one in semver precedence, so "latest" is also "newest" and a canary's version tells which
spec it runs. Executions are linked to versions by the `cegraph.workflow.version` of their spans.
`spec_diff` and `apply_patch` turn two versions into RFC 6902 operations and back.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import jsonpatch
import orjson
from pydantic import BaseModel, ConfigDict

from cegraph.daemon.events import WorkflowRegisteredPayload
from cegraph.daemon.store import EventStore
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.workflow import SEMVER, WorkflowSpec, WorkflowSpecError, parse_spec

LATEST = "latest"  # stands for the greatest registered version wherever a version is asked for


class RegistryError(Exception):
    """A registry request was refused; the message says why."""


class UnknownWorkflowError(RegistryError, LookupError):
    """No such workflow, or no such version of it."""


class VersionConflictError(RegistryError):
    """The version does not increase, or it is already registered with other content."""


class PatchError(RegistryError):
    """A patch does not produce the spec it announces from the given base."""


def version_key(version: str) -> tuple[Any, ...]:
    """Sort key of a semantic version in semver 2.0.0 precedence (build metadata is ignored).

    A pre-release sorts before its release; pre-release identifiers compare numerically when numeric,
    else as text, numeric below text, and a longer list wins when one is a prefix of the other.
    """
    match = SEMVER.match(version)
    if match is None:
        raise ValueError(f"{version!r} is not a semantic version such as 1.2.0")
    major, minor, patch, prerelease, _build = match.groups()
    release = (int(major), int(minor), int(patch))
    if prerelease is None:
        return (release, 1, ())
    identifiers = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in prerelease.split("."))
    return (release, 0, identifiers)


def spec_diff(old: WorkflowSpec, new: WorkflowSpec) -> list[dict[str, Any]]:
    """RFC 6902 operations that turn `old` into `new`, over their canonical JSON (what patches edit)."""
    return jsonpatch.make_patch(old.canonical(), new.canonical()).patch


def apply_patch(base: WorkflowSpec, patch: WorkflowPatch) -> WorkflowSpec:
    """The spec a patch makes of `base`, checked against everything the patch announces.

    Refused (`PatchError`, naming the reason) unless the patch is for this workflow and base version,
    its new version is greater, its operations apply, the result is a valid spec of the announced
    version, and its content hash is the announced one.
    """
    if (patch.workflow_id, patch.base_version) != (base.id, base.version):
        raise PatchError(
            f"the patch is for {patch.workflow_id}@{patch.base_version}, not for {base.id}@{base.version}"
        )
    if version_key(patch.new_version) <= version_key(base.version):
        raise PatchError(f"its new version {patch.new_version} is not greater than {base.version}")
    try:
        document = jsonpatch.apply_patch(base.canonical(), patch.json_patch())
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
        raise PatchError(f"its operations do not apply to {base.id}@{base.version}: {error}") from None
    try:
        spec = parse_spec(document)
    except WorkflowSpecError as error:
        raise PatchError(f"the patched spec is refused: {error}") from None
    if spec.version != patch.new_version:
        raise PatchError(f"the patched spec has version {spec.version}, not {patch.new_version}")
    if spec.content_hash != patch.content_hash:
        raise PatchError(f"the patched spec's content hash is {spec.content_hash}, not {patch.content_hash}")
    return spec


class WorkflowVersion(BaseModel):
    """One registered version and how many stored executions ran it."""

    model_config = ConfigDict(frozen=True)

    workflow_id: str
    version: str
    content_hash: str
    registered_at: datetime
    executions: int = 0


class RegisteredSpec(WorkflowVersion):
    spec: WorkflowSpec


class Registration(BaseModel):
    """The outcome of `register`: the version, and whether this call added it (False: already there)."""

    version: WorkflowVersion
    created: bool


class WorkflowRegistry:
    """The registration rules over an event store; the only writer of `WorkflowRegistered` events."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._lock = threading.Lock()  # the rules check, then append: one registration at a time

    def register(self, spec: WorkflowSpec) -> Registration:
        with self._lock:
            known = self.versions(spec.id)
            same = next((v for v in known if v.content_hash == spec.content_hash), None)
            if same is not None:
                return Registration(version=same, created=False)
            taken = next((v for v in known if v.version == spec.version), None)
            if taken is not None:
                raise VersionConflictError(
                    f"{spec.id}@{spec.version} is already registered with other content "
                    f"({taken.content_hash}); give the changed spec a new version"
                )
            if known:
                latest = max(known, key=lambda v: version_key(v.version))
                if version_key(spec.version) <= version_key(latest.version):
                    raise VersionConflictError(
                        f"{spec.id}@{spec.version} is not greater than the latest registered version "
                        f"{latest.version}"
                    )
            registered = WorkflowRegisteredPayload(spec.id, spec.version, spec.content_hash, spec.canonical())
            self._store.append([registered.event(spec.id)])
            created = next(v for v in self.versions(spec.id) if v.version == spec.version)
            return Registration(version=created, created=True)

    def versions(self, workflow_id: str | None = None) -> list[WorkflowVersion]:
        """Registered versions of one workflow (or of all), oldest first."""
        return [WorkflowVersion(**row) for row in self._store.workflow_versions(workflow_id)]

    def versions_of(self, workflow_id: str) -> list[WorkflowVersion]:
        """Like `versions(workflow_id)`, but an unknown workflow is an error."""
        known = self.versions(workflow_id)
        if not known:
            raise UnknownWorkflowError(f"no workflow {workflow_id!r} is registered")
        return known

    def get(self, workflow_id: str, version: str = LATEST) -> RegisteredSpec:
        """A registered version with its spec; `LATEST` picks the greatest."""
        known = self.versions_of(workflow_id)
        if version == LATEST:
            found = max(known, key=lambda v: version_key(v.version))
        else:
            found = next((v for v in known if v.version == version), None)
            if found is None:
                registered = ", ".join(v.version for v in known)
                raise UnknownWorkflowError(
                    f"{workflow_id}@{version} is not registered (registered: {registered})"
                )
        canonical = orjson.loads(self._store.workflow_spec(workflow_id, found.version))
        spec = parse_spec({**canonical, "content_hash": found.content_hash})  # checks the stored content
        return RegisteredSpec(**found.model_dump(), spec=spec)
