"""Stage 1 to stage 2 over a topic: the detector's inputs leave the ingest member that made them.

When ingest and the detector run in different processes (`cegraph run --stages ingest` on several
members, `--stages detect` on one), each ingest member's `FailuresPublisher` sends what its detector
would have read (`DetectorInputs`: each execution with its place in the detector's order, late
feedback, and ingest's progress reports) to the failures topic, and the detect member's source
appends them to its own log as `FailureInputReceived` and `IngestAdvanced` events, which its
`DetectorStage` reads as it reads a local log.

Each execution goes with its row of `executions`; one that failed carries all its nodes, the others
their roots only (the detector counts them for the mass; refinement replays their task input and
seed, and the canary judge counts them). Nothing is weighted here: the featurizer's document frequencies and
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
from typing import Any, Protocol

import orjson

from cegraph.daemon.detect.failures import label_failures
from cegraph.daemon.detect.inputs import DetectorInputs, input_from_json, input_to_json
from cegraph.daemon.detect.sequencer import Progress, newer
from cegraph.daemon.events import (
    FAILURE_INPUT_RECEIVED,
    Event,
    FailureInputReceivedPayload,
    IngestAdvancedPayload,
)
from cegraph.daemon.stage import Checkpoint, Step
from cegraph.daemon.store import EventStore

PUBLISH_FAILURES = "publish.failures"
RECEIVE_FAILURES = "receive.failures"


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
        entries = self.inputs.entries(self.position, last)
        rows = self._rows([e[1].trace_id for e in entries if isinstance(e, tuple) and not e[1].feedback_only])
        for entry in entries:
            if isinstance(entry, IngestAdvancedPayload):
                value = orjson.dumps({"report": entry})
                records.extend(Record(entry.topic.encode(), value, partition) for partition in range(fanout))
                continue
            place, execution = entry
            if not label_failures(execution.nodes, execution.feedback):
                execution.nodes = [node for node in execution.nodes if node.is_root]  # counted, replayable
            row = None if execution.feedback_only else rows.get(execution.trace_id)
            value = orjson.dumps({"place": list(place), "input": input_to_json(execution), "execution": row})
            records.append(Record(execution.workflow_id.encode(), value))
        if records:
            self.transport.send(records)
        self.position = last + 1
        return Step([], Checkpoint(self.position))

    def _rows(self, traces: list[str]) -> dict[str, dict[str, Any]]:
        """The executions' rows as this log has them (seq aside: the receiving log numbers its own)."""
        found = self.store.query_dicts(
            "SELECT * EXCLUDE (seq) FROM executions WHERE trace_id IN (SELECT unnest(?::VARCHAR[]))", traces
        )
        return {row["trace_id"]: row for row in found}

    def close(self) -> None:
        self.transport.close()


class RecordSource(Protocol):
    def open(self, offsets: dict[int, int]) -> list[int]:
        """Read from these offsets (a partition not named: from its beginning); the partitions read."""
        ...

    def poll(self, max_records: int) -> list[tuple[int, int, bytes]]:
        """The next records as (partition, offset, value), in order per partition; [] when none came."""
        ...

    def close(self) -> None: ...


def received(message: dict[str, Any]) -> FailureInputReceivedPayload:
    """An execution's nodes move from its input to the span log; late feedback keeps its copy."""
    execution = message.get("execution")
    data = message["input"]
    if execution is None:
        return FailureInputReceivedPayload(message["place"], data)
    nodes = input_from_json(data).nodes
    return FailureInputReceivedPayload(message["place"], {**data, "nodes": []}, execution, nodes)


class FailuresReceiver:
    """Stage 2's start when ingest runs elsewhere: the failures topic, into this process's log.

    Its checkpoint is the topic's offsets and the latest report seen on each partition, committed
    with the events they produced: a record is appended once however often it is read again.
    """

    name = RECEIVE_FAILURES
    reads_log = False  # its input is the failures topic

    def __init__(self, store: EventStore, source: RecordSource, *, batch: int = 500) -> None:
        self.store = store
        self.source = source
        self.batch = batch
        self.offsets: dict[int, int] = {}
        self.partitions: list[int] = []
        self.reports: dict[int, dict[str, dict[str, Any]]] = {}  # partition read -> spans topic -> report
        self.merged: dict[str, dict[str, Any]] = {}  # spans topic -> the last report appended

    def open(self, checkpoint: Checkpoint) -> None:
        snapshot = checkpoint.snapshot
        self.offsets = {int(p): o for p, o in snapshot.get("offsets", {}).items()}
        self.reports = {int(p): r for p, r in snapshot.get("reports", {}).items()}
        self.merged = dict(snapshot.get("merged", {}))
        self.partitions = self.source.open(self.offsets)

    def poll(self) -> Step | None:
        records = self.source.poll(self.batch)
        if not records:
            return None
        inputs: dict[str, Event] = {}
        for partition, offset, value in records:
            self.offsets[partition] = offset + 1
            message = orjson.loads(value)
            if "report" in message:
                report = message["report"]
                self.reports.setdefault(partition, {}).setdefault(report["topic"], {"progress": {}})
                known = self.reports[partition][report["topic"]]
                known["partitions"] = report["partitions"]
                for spans_partition, (at, done) in report["progress"].items():
                    before = known["progress"].get(spans_partition)
                    taken = newer(Progress(*before) if before else None, Progress(at, done))
                    known["progress"][spans_partition] = [taken.position, taken.caught_up]
                continue
            key = input_record_key(message["place"])
            if key not in inputs:
                inputs[key] = received(message).event(key)
        events = self._unseen(list(inputs.values())) + self._merged_reports()
        snapshot = {
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "reports": {str(p): r for p, r in self.reports.items()},
            "merged": self.merged,
        }
        return Step(events, Checkpoint(1, snapshot))

    def _unseen(self, events: list[Event]) -> list[Event]:
        """Those whose key the log does not hold yet (sent again by a member, or by two members)."""
        if not events:
            return []
        rows = self.store.query(
            "SELECT key FROM events WHERE type = ? AND key IN (SELECT unnest(?::VARCHAR[]))",
            FAILURE_INPUT_RECEIVED, [event.key for event in events],
        )  # fmt: skip
        seen = {key for (key,) in rows}
        return [event for event in events if event.key not in seen]

    def _merged_reports(self) -> list[Event]:
        """Per spans partition, the least advanced report over the partitions read: an input sent
        to one partition before a report is read before the report is taken as covering it."""
        events = []
        for topic in sorted({t for reports in self.reports.values() for t in reports}):
            per_partition = [self.reports.get(p, {}).get(topic) for p in self.partitions]
            if any(report is None for report in per_partition):
                continue
            progress: dict[str, list[Any]] = {}
            for spans_partition in set.intersection(*(set(r["progress"]) for r in per_partition)):
                seen = [r["progress"][spans_partition] for r in per_partition]
                progress[spans_partition] = [min(at for at, _ in seen), all(done for _, done in seen)]
            count = max(r["partitions"] for r in per_partition)
            merged = {"topic": topic, "partitions": count, "progress": progress}
            if progress and merged != self.merged.get(topic):
                self.merged[topic] = merged
                events.append(IngestAdvancedPayload(**merged).event(topic))
        return events

    def close(self) -> None:
        self.source.close()
