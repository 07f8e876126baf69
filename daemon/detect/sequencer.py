"""The order the detector learns in, the same however ingest is deployed.

Online clustering depends on the order of its input and on where its batches end (each batch ends
with a reclustering), so a detector fed in arrival order would find other modes with three ingest
members than with one, and other modes again after a restart. The sequencer takes the arrival order
out: it releases each workflow's inputs in a canonical order, (event time, trace id, feedback key),
in batches of exactly `batch`, and only once no input that sorts before them can still arrive.

The order is the spans topic's: an execution sorts by the offset of its last spans message (then its
partition and trace id), which is the same whichever member read it. "Can still arrive" is a
watermark, as in stream processors: every ingest member reports, per spans partition, the offset
below which every message is stored (`IngestAdvanced`, appended after the executions it covers) and
whether that was all the partition held. An input is closed when its offset is below the reported
offset of every partition that is not caught up; a caught-up partition holds nothing back (it may
be idle for good). When every partition is caught up, all pending inputs close and the last, short
batch of each workflow is released too (the only batch shorter than `batch`; where it falls depends
on when ingest catches up). An input that arrives after inputs sorting behind it were released is
late (feedback on an execution already learnt; a message on a partition after it was caught up): it
is learnt in its workflow's next batch, and counted.

Pure: no clock, no I/O. Inputs are opaque; the caller gives each its workflow and sort key.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

Key = tuple[int, int, str, str]  # (offset, partition, trace id, feedback key or "")


@dataclass(frozen=True, slots=True)
class Progress:
    """One ingest member's report for one spans partition."""

    position: int  # every message below this offset is stored, and its executions reported before
    caught_up: bool  # that was everything the partition held


def newer(known: Progress | None, reported: Progress) -> Progress:
    """A report behind the known position is stale, whole: its member read the partition before
    it moved (a report it sent late, or a new owner before its first fetch), and its `caught_up`
    says nothing of now. At the same position, the later report holds (new messages arrived)."""
    return known if known is not None and reported.position < known.position else reported


@dataclass(slots=True)
class _Workflow(Generic[T]):
    pending: list[tuple[Key, int, T]] = field(default_factory=list)  # a heap; the int keeps ties stable
    released_up_to: Key | None = None


class Sequencer(Generic[T]):
    def __init__(self, *, batch: int) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.batch = batch
        self.partitions: dict[str, int] = {}  # topic -> how many partitions it has
        self.progress: dict[tuple[str, int], Progress] = {}
        self.workflows: dict[str, _Workflow[T]] = {}
        self.late = 0
        self._added = 0

    def add(self, workflow: str, key: Key, item: T) -> None:
        state = self.workflows.setdefault(workflow, _Workflow())
        if state.released_up_to is not None and key < state.released_up_to:
            self.late += 1
        self._added += 1
        heapq.heappush(state.pending, (key, self._added, item))

    def advance(self, topic: str, partitions: int, progress: dict[int, Progress]) -> None:
        """Take a report (see `newer`)."""
        self.partitions[topic] = max(partitions, self.partitions.get(topic, 0))
        for partition, reported in progress.items():
            self.progress[(topic, partition)] = newer(self.progress.get((topic, partition)), reported)

    def watermark(self) -> float:
        """Inputs at an earlier offset are closed; inf when every partition is caught up."""
        expected = [(topic, p) for topic, count in self.partitions.items() for p in range(count)]
        if not expected or any(source not in self.progress for source in expected):
            return float("-inf")
        behind = [self.progress[s].position for s in expected if not self.progress[s].caught_up]
        return min(behind) if behind else float("inf")

    def ready(self) -> list[tuple[str, list[T]]]:
        """The batches that are closed, per workflow in workflow order, each in canonical order."""
        watermark = self.watermark()
        batches: list[tuple[str, list[T]]] = []
        for workflow in sorted(self.workflows):
            state = self.workflows[workflow]
            closed = sum(1 for key, _, _ in state.pending if key[0] < watermark)
            while closed >= self.batch or (watermark == float("inf") and closed):
                size = min(self.batch, closed)
                taken = [heapq.heappop(state.pending) for _ in range(size)]
                state.released_up_to = taken[-1][0]
                batches.append((workflow, [item for _, _, item in taken]))
                closed -= size
        return batches

    def pending(self) -> int:
        return sum(len(state.pending) for state in self.workflows.values())
