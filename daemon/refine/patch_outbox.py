"""The patch outbox: patches wait in the event log (`PatchCreated`) until the outbox publisher
(`daemon/outbox.py`, exactly once) has sent them and recorded it (`PatchPublished`). A patch is
held for as long as it is not signed (no signing key configured), while it waits for a human's
approval (`approve_free_text`: a patch whose edits carry free text waits for `PatchApproved`, which
`cegraph patches approve` records), and `hold_s` after its creation (an operator can look at it first).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import ValidationError

from cegraph.daemon.events import (
    PATCH_APPROVED,
    PATCH_CREATED,
    PATCH_PUBLISHED,
    PROPOSAL_REJECTED,
    Event,
    PatchApprovedPayload,
    PatchCreatedPayload,
    PatchPublishedPayload,
    ProposalRejectedPayload,
)
from cegraph.daemon.outbox import Location, OutboxEntry
from cegraph.daemon.refine.operators import Edit
from cegraph.daemon.refine.text_policy import free_text
from cegraph.daemon.settings import Settings
from cegraph.daemon.store import EventStore
from cegraph.schemas.patch import WorkflowPatch

_C, _P, _A = PatchCreatedPayload, PatchPublishedPayload, PatchApprovedPayload
PATCHES = f"""
SELECT c.seq, c.recorded_at, {_C.sql("job_id", of="c.payload")} AS job_id,
       {_C.json("patch", of="c.payload")} AS patch, {_P.sql("topic", of="p.payload")} AS topic,
       {_P.sql("partition", "INTEGER", of="p.payload")} AS partition,
       {_P.sql("offset", "BIGINT", of="p.payload")} AS offset,
       {_C.sql("created_at", "DOUBLE", of="c.payload")} AS created_at,
       (SELECT min({_A.sql("approved_by", of="a.payload")}) FROM events a WHERE a.type = '{PATCH_APPROVED}'
        AND a.key = c.key AND {_A.sql("patch_id", of="a.payload")} = {_C.sql("patch_id", of="c.payload")}
       ) AS approved_by
FROM events c
LEFT JOIN events p ON p.type = '{PATCH_PUBLISHED}' AND p.key = c.key
    AND {_P.sql("patch_id", of="p.payload")} = {_C.sql("patch_id", of="c.payload")}
WHERE c.type = '{PATCH_CREATED}'
ORDER BY c.seq
"""
_POLICY = ProposalRejectedPayload.json("text_policy")  # what the text policy refused, and why
TEXT_REJECTIONS = f"""
SELECT key AS workflow_id, {_POLICY}->>'base_version' AS base_version,
       {ProposalRejectedPayload.sql("job_id")} AS job_id,
       {ProposalRejectedPayload.sql("proposer")} AS proposer,
       {ProposalRejectedPayload.sql("reason")} AS reason,
       {_POLICY}->>'rule' AS rule, {_POLICY}->'edit' AS edit,
       ({_POLICY}->>'rejected_at')::DOUBLE AS created_at
FROM events WHERE type = '{PROPOSAL_REJECTED}' AND coalesce(json_type({_POLICY}), 'NULL') <> 'NULL'
ORDER BY seq
"""


class ApprovalError(ValueError):
    """The patch named for approval is not waiting for one."""


class UnknownPatchError(ApprovalError):
    """No patch has that workflow and version."""


def patch_id(patch: WorkflowPatch) -> str:
    """What identifies a patch on the topic and in the log: its workflow, version and content."""
    return f"{patch.workflow_id}@{patch.new_version}#{patch.content_hash}"


def created(job_id: str, patch: WorkflowPatch, now: float | None = None) -> Event:
    return PatchCreatedPayload(
        job_id=job_id,
        patch_id=patch_id(patch),
        created_at=time.time() if now is None else now,
        patch=patch.model_dump(mode="json", by_alias=True),
    ).event(patch.workflow_id)


def carries_free_text(patch: WorkflowPatch) -> bool:
    """Whether any edit of the patch writes free text (an instruction, a prompt, validation keys) into
    the workflow; a patch without a rationale cannot tell, so it counts as carrying some."""
    if patch.rationale is None:
        return True
    edits = [Edit(**{k: v for k, v in edit.items() if k != "proposer"}) for edit in patch.rationale.edits]
    return any(free_text(edit) for edit in edits)


class PatchOutbox:
    def __init__(
        self,
        store: EventStore,
        *,
        hold_s: float = 0.0,
        approve_free_text: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.hold_s = hold_s
        self.approve_free_text = approve_free_text
        self.clock = clock

    @classmethod
    def configured(cls, store: EventStore, settings: Settings) -> PatchOutbox:
        """The outbox as the settings hold patches (`publisher.hold_s`, `refiner.approve_free_text`)."""
        return cls(
            store, hold_s=settings.publisher.hold_s, approve_free_text=settings.refiner.approve_free_text
        )

    def patches(self) -> list[dict[str, Any]]:
        """Every patch with its state: published (where), held (why) or due."""
        now = self.clock()
        rows = self.store.query_dicts(PATCHES)
        for row in rows:
            patch = row["patch"] = WorkflowPatch.model_validate(orjson.loads(row["patch"]))
            row["awaits_approval"] = (
                self.approve_free_text and row["approved_by"] is None and carries_free_text(patch)
            )
            if row["topic"] is not None:
                row["state"] = "published"
            elif patch.signature is None:
                row["state"] = "held: unsigned (set CEGRAPH_PUBLISHER__SIGNING_KEY)"
            elif row["awaits_approval"]:
                row["state"] = (
                    "held: free text awaits approval "
                    f"(cegraph patches approve {patch.workflow_id}@{patch.new_version})"
                )
            elif now < row["created_at"] + self.hold_s:
                row["state"] = f"held for {row['created_at'] + self.hold_s - now:.0f} s more"
            else:
                row["state"] = "due"
        return rows

    name = "patches"

    def entries(self, since: int) -> list[OutboxEntry]:
        """`Outbox`: the patches created at or after `since` and not published, due or held."""
        return [
            OutboxEntry(
                row["seq"],
                patch_id(row["patch"]),
                row["patch"].workflow_id,
                orjson.dumps(row["patch"].model_dump(mode="json", by_alias=True)),
                due=row["state"] == "due",
            )
            for row in self.patches()
            if row["seq"] >= since and row["state"] != "published"
        ]

    def sent(self, entry: OutboxEntry, location: Location) -> Event:
        published = PatchPublishedPayload(location.topic, location.partition, location.offset, entry.id)
        return published.event(entry.key)

    def identify(self, value: bytes) -> str | None:
        try:
            return patch_id(WorkflowPatch.model_validate(orjson.loads(value)))
        except (orjson.JSONDecodeError, ValidationError):
            return None

    def approve(self, workflow_id: str, version: str, approved_by: str) -> WorkflowPatch:
        """Record a human's approval of the patch to `version` of `workflow_id` (`PatchApproved`); only a
        patch held for approval can be approved."""
        found = [
            row
            for row in self.patches()
            if (row["patch"].workflow_id, row["patch"].new_version) == (workflow_id, version)
        ]
        if not found:
            raise UnknownPatchError(f"no patch of {workflow_id} to {version} (see `cegraph patches list`)")
        row = found[-1]
        if not row["awaits_approval"]:
            raise ApprovalError(f"the patch of {workflow_id} to {version} awaits no approval: {row['state']}")
        approval = PatchApprovedPayload(patch_id(row["patch"]), approved_by, self.clock())
        self.store.append([approval.event(workflow_id)])
        return row["patch"]


def patch_rows(outbox: PatchOutbox) -> list[dict[str, Any]]:
    """The patches as plain data (the HTTP API and `cegraph patches`)."""
    return [
        {
            "workflow_id": row["patch"].workflow_id,
            "base_version": row["patch"].base_version,
            "new_version": row["patch"].new_version,
            "state": row["state"],
            "job_id": row["job_id"],
            "created_at": row["created_at"],
            "published": None
            if row["topic"] is None
            else f"{row['topic']}[{row['partition']}]@{row['offset']}",
            "approved_by": row["approved_by"],
            "patch": row["patch"].model_dump(mode="json", by_alias=True),
        }
        for row in outbox.patches()
    ]


def rejected_rows(store: EventStore) -> list[dict[str, Any]]:
    """The edits the text policy refused, as plain data beside the patches: they never became one."""
    rows = store.query_dicts(TEXT_REJECTIONS)
    for row in rows:
        row["edit"] = orjson.loads(row["edit"])
        row["state"] = f"rejected: {row['reason']}"
    return rows
