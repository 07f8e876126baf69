"""Stage 2 in one process: what ingest stored goes through the `FailureDetector`, exactly once.

The stage reads the event log after its cursor (completed executions and feedback, in log order),
runs the detector, and appends the detector's events together with the new cursor in one
transaction; the cursor lives beside the Kafka offsets. On start the detector's in-memory state
(signature statistics, micro-clusters, masses) is rebuilt by replaying the log up to the cursor
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
    EXECUTION_COMPLETED,
    FEEDBACK_RECEIVED,
    MASS_OBSERVED,
    MODE_FADED,
    MODE_MERGED,
    Event,
)
from cegraph.daemon.spans import Evaluation, Node
from cegraph.daemon.store import NODE_FIELDS, EventStore

CURSOR = ("__cegraph.detector__", 0)  # next event seq to read, stored with the Kafka offsets

# The stage's projections are views over its events: always equal to the log, nothing to rebuild.
VIEWS = f"""
CREATE OR REPLACE VIEW mass_history AS
SELECT seq, recorded_at,
       payload->>'workflow_id' AS workflow_id,
       payload->>'workflow_version' AS workflow_version,
       payload->>'mode' AS mode,
       (payload->>'mass')::DOUBLE AS mass,
       (payload->>'support')::BIGINT AS support,
       (payload->>'efm')::DOUBLE AS efm,
       payload->'description' AS description
FROM events WHERE type = '{MASS_OBSERVED}';
CREATE OR REPLACE VIEW ended_modes AS
SELECT key AS mode, type, payload->>'into' AS merged_into, seq
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
    def __init__(
        self,
        store: EventStore,
        detector: FailureDetector,
        *,
        batch: int = 500,
        on_batch: Callable[[FailureDetector, list[Event]], None] | None = None,
    ) -> None:
        self.store = store
        self.detector = detector
        self.batch = batch
        self.on_batch = on_batch
        self.cursor = store.offsets().get(CURSOR, 1)
        self._lock = threading.Lock()  # the detector is read by refinement workers between batches
        store.query(VIEWS)
        self._replay(self.cursor)

    def classifier(self) -> ModeClassifier:
        with self._lock:
            return self.detector.classifier()

    def _replay(self, until: int) -> None:
        """Rebuild the detector's state from the log before `until`, emitting nothing."""
        first = 1
        while first < until:
            last = min(first + self.batch * 10, until) - 1
            self.detector.observe(self._inputs(first, last))
            first = last + 1

    def catch_up(self) -> int:
        """Process everything stored since the cursor; returns how many events the detector wrote."""
        written = 0
        end = self.store.last_seq()
        while self.cursor <= end:
            last = min(self.cursor + self.batch - 1, end)
            with self._lock:
                events, _ = self.detector.observe(self._inputs(self.cursor, last))
            self.store.append(events, {CURSOR: last + 1})
            self.cursor = last + 1
            written += len(events)
            if self.on_batch is not None:
                self.on_batch(self.detector, events)
        return written

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
