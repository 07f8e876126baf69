"""Stage 2 in one process: what ingest stored goes through the `FailureDetector`, exactly once.

The stage (a `Stage`, `daemon/stage.py`) reads the event log after its checkpoint (completed
executions and feedback, in log order), runs the detector, and the runner appends the detector's
events together with the new checkpoint in one transaction. On open the detector's in-memory state
(signature statistics, micro-clusters, masses) is rebuilt by replaying the log up to the checkpoint
without emitting anything, so a restart neither repeats nor loses a decision.

Feedback that arrives before its execution is joined to it when the execution completes; feedback
that arrives after it adds feedback failures to the already counted execution.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import orjson

from cegraph.daemon.detect.detector import ExecutionInput, FailureDetector, ModeClassifier, workflow_of
from cegraph.daemon.detect.failures import FeedbackSignal
from cegraph.daemon.detect.sequencer import Key, Progress, Sequencer
from cegraph.daemon.events import (
    DETECTOR_STEPPED,
    EXECUTION_COMPLETED,
    FEEDBACK_RECEIVED,
    INGEST_ADVANCED,
    MASS_OBSERVED,
    MODE_FADED,
    MODE_MERGED,
    DetectorSteppedPayload,
    Event,
    ExecutionCompletedPayload,
    IngestAdvancedPayload,
    MassObservedPayload,
    ModeChangedPayload,
)
from cegraph.daemon.spans import Evaluation, Node
from cegraph.daemon.stage import Checkpoint, Step
from cegraph.daemon.store import NODE_FIELDS, EventStore

DETECT = "detect"  # the stage's row in `stage_cursors`
LOG = "log"  # the source of executions recorded without a spans offset: always caught up

# The stage's projections are views over its events: always equal to the log, nothing to rebuild.
_M = MassObservedPayload
VIEWS = f"""
CREATE OR REPLACE VIEW mass_history AS
SELECT seq, recorded_at,
       {_M.sql("workflow_id")} AS workflow_id,
       {_M.sql("workflow_version")} AS workflow_version,
       {_M.sql("mode")} AS mode,
       {_M.sql("mass", "DOUBLE")} AS mass,
       {_M.sql("support", "BIGINT")} AS support,
       {_M.sql("efm", "DOUBLE")} AS efm,
       {_M.json("description")} AS description
FROM events WHERE type = '{MASS_OBSERVED}';
CREATE OR REPLACE VIEW ended_modes AS
SELECT key AS mode, type, {ModeChangedPayload.sql("into")} AS merged_into, seq
FROM events WHERE type IN ('{MODE_MERGED}', '{MODE_FADED}');
"""

MODES_QUERY = """
WITH latest AS (
    SELECT *, row_number() OVER (PARTITION BY workflow_id, workflow_version, mode ORDER BY seq DESC) AS age
    FROM mass_history
)
SELECT now.mode, now.workflow_id, now.workflow_version, now.mass, now.support, now.efm,
       now.mass - coalesce(before.mass, 0) AS trend, now.description
FROM latest now
LEFT JOIN latest before
    ON before.workflow_id = now.workflow_id
    AND before.workflow_version = now.workflow_version
    AND before.mode = now.mode
    AND before.age = 11
WHERE now.age = 1 AND now.mode NOT IN (SELECT mode FROM ended_modes)
ORDER BY now.mass DESC
"""


def detected_until(store: EventStore) -> int:
    """The first log seq the detector has not read yet: everything before it has been through it."""
    checkpoint = store.cursor(DETECT)
    return checkpoint.position if checkpoint is not None else 1


def stored_modes(store: EventStore) -> list[dict[str, Any]]:
    """Live modes from the log: latest mass and description, and the change over the last 10 observations."""
    if not store.query("SELECT count(*) FROM duckdb_views() WHERE view_name = 'mass_history'")[0][0]:
        return []
    rows = store.query_dicts(MODES_QUERY)
    for row in rows:
        row["description"] = orjson.loads(row["description"]) if row["description"] else {}
    return rows


def node_from_row(row: dict[str, Any]) -> Node:
    values = {name: row[name] for name in NODE_FIELDS}
    values["evaluations"] = [Evaluation(**e) for e in orjson.loads(row["evaluations"] or "[]")]
    values["finish_reasons"] = list(row["finish_reasons"] or [])
    return Node(**values)


def _signal(row: dict[str, Any]) -> FeedbackSignal:
    """From a feedback projection row or a FeedbackReceived payload (same field names)."""
    return FeedbackSignal(
        row["trace_id"],
        row.get("span_id"),
        row.get("critique") or "",
        row.get("source") or "",
        row.get("score"),
    )


class DetectorStage:
    """The detector as a `Stage`: each step reads a stretch of the log into the `Sequencer` and runs
    the batches it releases through the `FailureDetector`, one workflow at a time."""

    name = DETECT

    def __init__(
        self,
        store: EventStore,
        detector: Callable[[], FailureDetector],
        *,
        batch: int = 500,
        on_batch: Callable[[FailureDetector, list[Event]], None] | None = None,
    ) -> None:
        """`detector` makes a fresh detector: `open` starts from one and replays the log into it;
        `batch` is the sequencer's batch (a reclustering ends each) and the inputs one step reads."""
        self.store = store
        self.new_detector = detector
        self.batch = batch
        self.on_batch = on_batch
        self.detector = detector()
        self.sequencer: Sequencer[ExecutionInput] = Sequencer(batch=batch)
        self.cursor = 1
        self._lock = threading.Lock()  # the detector is read by refinement workers between batches
        store.query(VIEWS)

    def classifier(self) -> ModeClassifier:
        with self._lock:
            return self.detector.classifier()

    def open(self, checkpoint: Checkpoint) -> None:
        """Rebuild the detector's and the sequencer's state from the log before the checkpoint,
        emitting nothing.

        Where the sequencer releases batches depends on where steps ended (when ingest has caught
        up, a step's end releases the short last batch), so the replay runs the steps the live run
        ran, as `DetectorStepped` recorded them; a log written before those events existed is
        replayed in windows.
        """
        detector, sequencer = self.new_detector(), Sequencer[ExecutionInput](batch=self.batch)
        stepped = DetectorSteppedPayload
        ranges = self.store.query(
            f"SELECT {stepped.sql('first', 'BIGINT')}, {stepped.sql('last', 'BIGINT')} FROM events "
            f"WHERE type = ? AND {stepped.sql('last', 'BIGINT')} < ? ORDER BY seq",
            DETECTOR_STEPPED, checkpoint.position,
        )  # fmt: skip
        first = 1
        for step_first, step_last in [*ranges, (checkpoint.position, checkpoint.position - 1)]:
            while first < step_first:  # no recorded step: a log from before they were recorded
                last = min(first + self.batch * 10, step_first) - 1
                self._run(detector, sequencer, first, last)
                first = last + 1
            if step_first <= step_last:
                self._run(detector, sequencer, step_first, step_last)
                first = step_last + 1
        with self._lock:
            self.detector, self.sequencer, self.cursor = detector, sequencer, checkpoint.position

    def poll(self) -> Step | None:
        """The next stretch of the log through the sequencer and the detector: up to `batch` inputs
        (executions, feedback, ingest's reports), counted in inputs, so other writers' events in
        between move no boundary."""
        end = self.store.last_seq()
        if self.cursor > end:
            return None
        [(count, nth)] = self.store.query(
            "SELECT count(*), max(seq) FROM (SELECT seq FROM events "
            "WHERE seq BETWEEN ? AND ? AND type IN (?, ?, ?) ORDER BY seq LIMIT ?)",
            self.cursor, end, EXECUTION_COMPLETED, FEEDBACK_RECEIVED, INGEST_ADVANCED, self.batch,
        )  # fmt: skip
        first, last = self.cursor, nth if count == self.batch else end
        with self._lock:
            events = self._run(self.detector, self.sequencer, first, last)
            self.cursor = last + 1
        if count:
            events.append(DetectorSteppedPayload(first, last).event(DETECT))
        if self.on_batch is not None:
            self.on_batch(self.detector, events)
        return Step(events, Checkpoint(self.cursor))

    def close(self) -> None:
        return None

    def _run(
        self, detector: FailureDetector, sequencer: Sequencer[ExecutionInput], first: int, last: int
    ) -> list[Event]:
        """Feed `first..last` to the sequencer, in log order, and detect in what it releases."""
        for entry in self._entries(first, last):
            if isinstance(entry, IngestAdvancedPayload):
                progress = {int(p): Progress(int(at), bool(done)) for p, (at, done) in entry.progress.items()}
                sequencer.advance(entry.topic, entry.partitions, progress)
            else:
                key, execution = entry
                sequencer.add(execution.workflow_id, key, execution)
        events: list[Event] = []
        for _, batch in sequencer.ready():
            events.extend(detector.observe(batch)[0])
        return events

    def _entries(self, first: int, last: int) -> list[IngestAdvancedPayload | tuple[Key, ExecutionInput]]:
        """The executions completed, the feedback received and ingest's reports in `first..last`, in
        log order; each execution and late feedback with its place in the sequencer's order."""
        rows = self.store.query_dicts(
            "SELECT seq, type, key, payload FROM events "
            "WHERE seq BETWEEN ? AND ? AND type IN (?, ?, ?) ORDER BY seq",
            first, last, EXECUTION_COMPLETED, FEEDBACK_RECEIVED, INGEST_ADVANCED,
        )  # fmt: skip
        if not rows:
            return []
        payloads = {r["seq"]: orjson.loads(r["payload"]) for r in rows}
        executed_at = {r["key"]: r["seq"] for r in rows if r["type"] == EXECUTION_COMPLETED}
        feedback = {r["seq"]: payloads[r["seq"]] for r in rows if r["type"] == FEEDBACK_RECEIVED}
        nodes: dict[str, list[Node]] = {}
        for row in self.store.query_dicts(
            "SELECT * FROM event_spans WHERE NOT amended AND (seq IN (SELECT unnest(?)) "
            "OR (trace_id IN (SELECT unnest(?)) AND seq < ?))",
            list(executed_at.values()), [p["trace_id"] for p in feedback.values()], first,
        ):  # fmt: skip
            nodes.setdefault(row["trace_id"], []).append(node_from_row(row))
        earlier: dict[str, list[tuple[int, FeedbackSignal]]] = {}
        for row in self.store.query_dicts(
            "SELECT * FROM feedback WHERE trace_id IN (SELECT unnest(?)) AND seq <= ?",
            list(executed_at),
            last,
        ):
            earlier.setdefault(row["trace_id"], []).append((row["seq"], _signal(row)))
        places = self._places(executed_at, payloads)
        entries: list[IngestAdvancedPayload | tuple[Key, ExecutionInput]] = []
        for row in rows:
            seq, payload = row["seq"], payloads[row["seq"]]
            if row["type"] == INGEST_ADVANCED:
                entries.append(IngestAdvancedPayload(**payload))
            elif row["type"] == EXECUTION_COMPLETED:
                trace = row["key"]
                joined = [signal for at, signal in sorted(earlier.get(trace, [])) if at < seq]
                if "offset" not in payload:  # a log from before executions had a place: the log's order
                    entries.append(IngestAdvancedPayload(LOG, 1, {"0": [seq + 1, True]}))
                entries.append((places[trace], _execution(trace, nodes.get(trace, []), joined)))
            else:
                trace = payload["trace_id"]
                if trace not in nodes or executed_at.get(trace, 0) > seq:
                    continue  # not executed yet: it is joined when the execution completes
                place = (*self._place_of(trace, places), row["key"])
                late = _execution(trace, nodes[trace], [_signal(payload)], feedback_only=True)
                entries.append((place, late))
        return entries

    def _places(self, executed_at: dict[str, int], payloads: dict[int, dict[str, Any]]) -> dict[str, Key]:
        places = {}
        for trace, seq in executed_at.items():
            payload = payloads[seq]
            offset, partition = payload.get("offset"), payload.get("partition", 0)
            places[trace] = (seq, 0, trace, "") if offset is None else (offset, partition, trace, "")
        return places

    def _place_of(self, trace: str, places: dict[str, Key]) -> tuple[int, int, str]:
        """Where late feedback sorts: right behind its execution (so it is late by construction)."""
        if trace in places:
            return places[trace][:3]
        completed = ExecutionCompletedPayload
        found = self.store.query(
            f"SELECT seq, {completed.sql('offset', 'BIGINT')}, {completed.sql('partition', 'BIGINT')} "
            "FROM events WHERE type = ? AND key = ? ORDER BY seq LIMIT 1",
            EXECUTION_COMPLETED, trace,
        )  # fmt: skip
        if not found:
            return (0, 0, trace)
        seq, offset, partition = found[0]
        return (seq, 0, trace) if offset is None else (offset, partition, trace)


def _execution(trace: str, nodes: list[Node], feedback: list[FeedbackSignal], feedback_only: bool = False):
    return ExecutionInput(trace, *workflow_of(nodes), nodes, feedback, feedback_only=feedback_only)
