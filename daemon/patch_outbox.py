"""The patch outbox: patches wait in the event log (`PatchCreated`) until a publisher has sent them
and recorded it (`PatchPublished`).

A publisher sends what `due()` returns and then calls `published()`; a crash in between sends the
patch again on restart unless the publisher first looks at what the topic already holds
(`connectors/patch_publisher.py` does), which makes publication exactly once per patch. A patch is
held `hold_s` after its creation (an operator can look at it first) and for as long as it is not
signed (no signing key configured).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from cegraph.daemon.events import PATCH_CREATED, PATCH_PUBLISHED, Event
from cegraph.daemon.store import EventStore
from cegraph.schemas.patch import WorkflowPatch

PATCHES = f"""
SELECT c.seq, c.recorded_at, c.payload->>'job_id' AS job_id, c.payload->'patch' AS patch,
       p.payload->>'topic' AS topic, (p.payload->>'partition')::INTEGER AS partition,
       (p.payload->>'offset')::BIGINT AS offset, (c.payload->>'created_at')::DOUBLE AS created_at
FROM events c
LEFT JOIN events p ON p.type = '{PATCH_PUBLISHED}' AND p.key = c.key
    AND p.payload->>'patch_id' = c.payload->>'patch_id'
WHERE c.type = '{PATCH_CREATED}'
ORDER BY c.seq
"""


def patch_id(patch: WorkflowPatch) -> str:
    """What identifies a patch on the topic and in the log: its workflow, version and content."""
    return f"{patch.workflow_id}@{patch.new_version}#{patch.content_hash}"


def created(job_id: str, patch: WorkflowPatch, now: float | None = None) -> Event:
    payload = {
        "job_id": job_id,
        "patch_id": patch_id(patch),
        "created_at": time.time() if now is None else now,
        "patch": patch.model_dump(mode="json", by_alias=True),
    }
    return Event(PATCH_CREATED, patch.workflow_id, payload)


class PatchOutbox:
    def __init__(
        self, store: EventStore, *, hold_s: float = 0.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.hold_s = hold_s
        self.clock = clock

    def patches(self) -> list[dict[str, Any]]:
        """Every patch with its state: published (where), held (why) or due."""
        now = self.clock()
        rows = self.store.query_dicts(PATCHES)
        for row in rows:
            row["patch"] = WorkflowPatch.model_validate(orjson.loads(row["patch"]))
            if row["topic"] is not None:
                row["state"] = "published"
            elif row["patch"].signature is None:
                row["state"] = "held: unsigned (set CEGRAPH_PUBLISHER__SIGNING_KEY)"
            elif now < row["created_at"] + self.hold_s:
                row["state"] = f"held for {row['created_at'] + self.hold_s - now:.0f} s more"
            else:
                row["state"] = "due"
        return rows

    def due(self) -> list[WorkflowPatch]:
        return [row["patch"] for row in self.patches() if row["state"] == "due"]

    def pending(self) -> list[WorkflowPatch]:
        """Not published yet, held or due."""
        return [row["patch"] for row in self.patches() if row["state"] != "published"]

    def published(self, patch: WorkflowPatch, topic: str, partition: int, offset: int) -> None:
        payload = {"patch_id": patch_id(patch), "topic": topic, "partition": partition, "offset": offset}
        self.store.append([Event(PATCH_PUBLISHED, patch.workflow_id, payload)])


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
            "patch": row["patch"].model_dump(mode="json", by_alias=True),
        }
        for row in outbox.patches()
    ]
