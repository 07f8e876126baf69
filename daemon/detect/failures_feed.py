"""Stage 1 to stage 2 over a topic: the detector's inputs leave the ingest member that made them.

When ingest and the detector run in different processes (`cegraph run --stages ingest` on several
members, `--stages detect` on one), each ingest member's `FailuresPublisher` sends what its detector
would have read (`DetectorInputs`: each execution with its place in the detector's order, late
feedback, and ingest's progress reports) to the failures topic, and the detect member's source
appends them to its own log as `FailureInputReceived` and `IngestAdvanced` events, which its
`DetectorStage` reads as it reads a local log.

Only the executions that failed carry their nodes (the detector needs the rest for the execution
count of the mass only), and nothing is weighted here: the featurizer's document frequencies and
latency norms stay in the one detector of each workflow, so a failure's vector does not depend on
which member saw it.

Delivery: at least once from each member (a crash between a send and the commit of the publisher's
checkpoint sends again; a partition moved after a crash is read again by its next owner), made
exactly once where it lands: the receiving source drops a record whose key its log already holds.
Progress reports go to every partition of the topic, after the inputs they cover on that partition;
the receiver takes, per spans partition, the least advanced report over the partitions it reads,
so a report never overtakes an input that went to another partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import orjson

from cegraph.daemon.detect.failures import label_failures
from cegraph.daemon.detect.inputs import DetectorInputs, input_to_json
from cegraph.daemon.events import IngestAdvancedPayload
from cegraph.daemon.stage import Checkpoint, Step
from cegraph.daemon.store import EventStore

PUBLISH_FAILURES = "publish.failures"


@dataclass(frozen=True, slots=True)
class Record:
    """One message of the failures topic; `partition` None: by the key's hash (the workflow id)."""

    key: bytes
    value: bytes
    partition: int | None = None


class RecordTransport(Protocol):
    def partitions(self) -> int:
        """How many partitions the topic has."""
        ...

    def send(self, records: list[Record]) -> None:
        """Send all, in order per partition, and wait until the broker has acknowledged every one."""
        ...

    def close(self) -> None: ...


def input_record_key(place: list) -> str:
    """What makes two records the same input, whichever member sent it: its trace and, for late
    feedback, the feedback's key."""
    return f"{place[2]}/{place[3]}" if place[3] else place[2]


class FailuresPublisher:
    """Stage 1's end when the detector runs elsewhere: the log's detector inputs, to the topic."""

    name = PUBLISH_FAILURES

    def __init__(self, store: EventStore, transport: RecordTransport, *, batch: int = 500) -> None:
        self.store = store
        self.transport = transport
        self.inputs = DetectorInputs(store)
        self.batch = batch
        self.position = 1

    def open(self, checkpoint: Checkpoint) -> None:
        self.position = checkpoint.position

    def poll(self) -> Step | None:
        end = self.store.last_seq()
        if self.position > end:
            return None
        last = self.inputs.stretch(self.position, end, self.batch)
        records: list[Record] = []
        fanout = self.transport.partitions()
        for entry in self.inputs.entries(self.position, last):
            if isinstance(entry, IngestAdvancedPayload):
                value = orjson.dumps({"report": entry})
                records.extend(Record(entry.topic.encode(), value, partition) for partition in range(fanout))
                continue
            place, execution = entry
            if not label_failures(execution.nodes, execution.feedback):
                execution.nodes = []  # counted, not learnt from: the nodes stay with ingest
            value = orjson.dumps({"place": list(place), "input": input_to_json(execution)})
            records.append(Record(execution.workflow_id.encode(), value))
        if records:
            self.transport.send(records)
        self.position = last + 1
        return Step([], Checkpoint(self.position))

    def close(self) -> None:
        self.transport.close()
