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
from cegraph.daemon.events import (
    DETECTOR_STEPPED,
    EXECUTION_COMPLETED,
    FEEDBACK_RECEIVED,
    MASS_OBSERVED,
    MODE_FADED,
    MODE_MERGED,
    DetectorSteppedPayload,
    Event,
    MassObservedPayload,
    ModeChangedPayload,
)
from cegraph.daemon.spans import Evaluation, Node
from cegraph.daemon.stage import Checkpoint, Step
from cegraph.daemon.store import NODE_FIELDS, EventStore

DETECT = "detect"  # the stage's row in `stage_cursors`

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
    """The detector as a `Stage`: each step runs one batch of the log through the `FailureDetector`."""

    name = DETECT

    def __init__(
        self,
        store: EventStore,
        detector: Callable[[], FailureDetector],
        *,
        batch: int = 500,
        on_batch: Callable[[FailureDetector, list[Event]], None] | None = None,
    ) -> None:
        """`detector` makes a fresh detector: `open` starts from one and replays the log into it."""
        self.store = store
        self.new_detector = detector
        self.batch = batch
        self.on_batch = on_batch
        self.detector = detector()
        self.cursor = 1
        self._lock = threading.Lock()  # the detector is read by refinement workers between batches
        store.query(VIEWS)

    def classifier(self) -> ModeClassifier:
        with self._lock:
            return self.detector.classifier()

    def open(self, checkpoint: Checkpoint) -> None:
        """Rebuild the detector's state from the log before the checkpoint, emitting nothing.

        The detector's state depends on how its input was batched (each batch ends with a
        reclustering), so the replay runs the batches the live steps ran, as `DetectorStepped`
        recorded them; a log written before those events existed is replayed in windows.
        """
        detector = self.new_detector()
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
                detector.observe(self._inputs(first, last))
                first = last + 1
            if step_first <= step_last:
                detector.observe(self._inputs(step_first, step_last))
                first = step_last + 1
        with self._lock:
            self.detector, self.cursor = detector, checkpoint.position

    def poll(self) -> Step | None:
        """The next batch of what ingest stored, through the detector: `batch` executions and feedback
        (or what there is), counted in inputs, so other writers' events in between move no boundary."""
        end = self.store.last_seq()
        if self.cursor > end:
            return None
        [(count, nth)] = self.store.query(
            "SELECT count(*), max(seq) FROM (SELECT seq FROM events "
            "WHERE seq BETWEEN ? AND ? AND type IN (?, ?) ORDER BY seq LIMIT ?)",
            self.cursor, end, EXECUTION_COMPLETED, FEEDBACK_RECEIVED, self.batch,
        )  # fmt: skip
        first, last = self.cursor, nth if count == self.batch else end
        inputs = self._inputs(first, last)
        with self._lock:
            events, _ = self.detector.observe(inputs)
            self.cursor = last + 1
        if inputs:
            events.append(DetectorSteppedPayload(first, last).event(DETECT))
        if self.on_batch is not None:
            self.on_batch(self.detector, events)
        return Step(events, Checkpoint(self.cursor))

    def close(self) -> None:
        return None

    def _inputs(self, first: int, last: int) -> list[ExecutionInput]:
        """The executions completed and the feedback received in `first..last`, in log order."""
        rows = self.store.query_dicts(
            "SELECT seq, type, key, payload FROM events "
            "WHERE seq BETWEEN ? AND ? AND type IN (?, ?) ORDER BY seq",
            first, last, EXECUTION_COMPLETED, FEEDBACK_RECEIVED,
        )  # fmt: skip
        if not rows:
            return []
        executed_at = {r["key"]: r["seq"] for r in rows if r["type"] == EXECUTION_COMPLETED}
        feedback = {r["seq"]: orjson.loads(r["payload"]) for r in rows if r["type"] == FEEDBACK_RECEIVED}
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
        inputs: list[ExecutionInput] = []
        for row in rows:
            if row["type"] == EXECUTION_COMPLETED:
                trace = row["key"]
                joined = [
                    signal
                    for seq, signal in sorted(earlier.get(trace, []), key=lambda s: s[0])
                    if seq < row["seq"]
                ]
                inputs.append(_execution(trace, nodes.get(trace, []), joined))
            else:
                payload = feedback[row["seq"]]
                trace = payload["trace_id"]
                if trace not in nodes or executed_at.get(trace, 0) > row["seq"]:
                    continue  # not executed yet: it is joined when the execution completes
                inputs.append(_execution(trace, nodes[trace], [_signal(payload)], feedback_only=True))
        return inputs


def _execution(trace: str, nodes: list[Node], feedback: list[FeedbackSignal], feedback_only: bool = False):
    return ExecutionInput(trace, *workflow_of(nodes), nodes, feedback, feedback_only=feedback_only)
