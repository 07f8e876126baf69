"""The contract every stage after ingest keeps: read the event log from a checkpoint, append to it.

A stage is a step of the pipeline (the detector, the namer, the refine stage, the canary judge, the
outbox publishers) that turns what the log holds after its checkpoint into new events. Its
lifecycle, called by the `StageRunner` in this order and by nothing else:

1. `open(checkpoint)`: rebuild the in-memory state from the log before `checkpoint.position`, emitting
   nothing (the events it would emit are already in the log). Called again after any failure, with
   the last committed checkpoint: a stage never has to undo anything by hand.
2. `poll()`, repeatedly: do the next piece of work and return it as a `Step` (the events it produced
   and the checkpoint after them), or None when there is nothing to do yet. `poll` does not write:
   the runner appends the step's events and its checkpoint in one DuckDB transaction, so a crash at
   any instant resumes from a checkpoint that matches the log exactly; nothing is emitted twice and
   nothing is skipped (a step that read nothing may wait to be stored with the next, or until the
   stage is caught up: `Step`). A stage with side effects outside the store (a Kafka send) makes
   them idempotent in `open` (the outbox publisher reads what the topic already holds), or where
   they land (the failures publisher sends at least once; its receiver drops what its log already
   holds).
3. `close()`: release what the stage holds (connections, threads); the state in memory is dropped.

Progress lives in one place, the store's `stage_cursors` table (stage, position, snapshot): the
position is the next log seq to read, the snapshot what the stage keeps beyond it (work it saw but
could not do yet, a job it is running).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from cegraph.daemon.events import Event


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a stage is: the next log seq it reads, and what it must remember beyond that (JSON)."""

    position: int = 1
    snapshot: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Step:
    """One piece of a stage's work: the events to append and the checkpoint once they are.

    `passed_over`: the stretch held nothing the stage reads (the log's end is the events of its own
    last step), so no event and no state came of it. The runner then keeps the checkpoint in memory,
    without a transaction of its own: the next step's checkpoint, stored with its events, lies past
    it; when there is no next step yet (the stage is caught up) or at `stop()`, the runner stores it.
    After a crash the stage reads the stretch again and finds nothing."""

    events: list[Event]
    checkpoint: Checkpoint
    passed_over: bool = False


class Stage(Protocol):
    """`reads_log = False` on a stage whose input is not the event log (a topic): its checkpoint's
    position then means nothing, and the runner reports no lag for it (the consumer's lag is its own)."""

    name: str  # its row in `stage_cursors`

    def open(self, checkpoint: Checkpoint) -> None: ...

    def poll(self) -> Step | None: ...

    def close(self) -> None: ...
