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
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from cegraph.daemon.detect.detector import ExecutionInput, FailureDetector, ModeClassifier
from cegraph.daemon.detect.inputs import DetectorInputs
from cegraph.daemon.detect.sequencer import Progress, Sequencer
from cegraph.daemon.events import (
    DETECTOR_STEPPED,
    MASS_OBSERVED,
    MODE_FADED,
    MODE_MERGED,
    DetectorSteppedPayload,
    Event,
    IngestAdvancedPayload,
    MassObservedPayload,
    ModeChangedPayload,
)
from cegraph.daemon.stage import Checkpoint, Step
from cegraph.daemon.store import EventStore
from cegraph.schemas.workflow import reachable

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


def merged_modes(store: EventStore, mode: str, *, forward: bool) -> list[str]:
    """The mode and, along the stored merges, every mode merged into it (`forward=False`: their
    failures are its counterexamples too) or every mode it was merged into (`forward=True`: where its
    later failures are assigned)."""
    edges: dict[str, list[str]] = {}
    for key, into in store.query(
        f"SELECT key, {ModeChangedPayload.sql('into')} FROM events WHERE type = ?", MODE_MERGED
    ):
        source, target = (key, into) if forward else (into, key)
        edges.setdefault(source, []).append(target)
    return sorted(reachable(mode, edges))


def target_modes(store: EventStore, mode: str, joined: Sequence[str] = ()) -> list[str]:
    """A job's target: the mode, the modes joined to it, and every mode merged into any of them."""
    return sorted({m for one in (mode, *joined) for m in merged_modes(store, one, forward=False)})


def stored_modes(store: EventStore) -> list[dict[str, Any]]:
    """Live modes from the log: latest mass and description, and the change over the last 10 observations."""
    if not store.query("SELECT count(*) FROM duckdb_views() WHERE view_name = 'mass_history'")[0][0]:
        return []
    rows = store.query_dicts(MODES_QUERY)
    for row in rows:
        row["description"] = orjson.loads(row["description"]) if row["description"] else {}
    return rows


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
        self.inputs = DetectorInputs(store)
        self.sequencer: Sequencer[ExecutionInput] = Sequencer(batch=batch)
        self.cursor = 1
        self._lock = threading.Lock()  # the detector is read by refinement workers between batches
        store.query(VIEWS)

    def classifier(self, workflow: str | None = None) -> ModeClassifier:
        with self._lock:
            return self.detector.classifier(workflow)

    def frozen(self, workflow: str | None = None) -> dict[str, Any]:
        """The modes a refinement job on a refine worker classifies with (`FailureDetector.frozen`)."""
        with self._lock:
            return self.detector.frozen(workflow)

    def sequenced(self) -> dict[str, int]:
        """Inputs read but not released yet (waiting for a partition behind), and late ones so far."""
        with self._lock:
            return {"pending": self.sequencer.pending(), "late": self.sequencer.late}

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
        (executions, feedback, ingest's reports)."""
        end = self.store.last_seq()
        if self.cursor > end:
            return None
        first, last = self.cursor, self.inputs.stretch(self.cursor, end, self.batch)
        with self._lock:
            events, read = self._run(self.detector, self.sequencer, first, last)
            self.cursor = last + 1
        if read:
            events.append(DetectorSteppedPayload(first, last).event(DETECT))
        if self.on_batch is not None:
            self.on_batch(self.detector, events)
        return Step(events, Checkpoint(self.cursor), passed_over=not read)

    def close(self) -> None:
        return None

    def _run(
        self, detector: FailureDetector, sequencer: Sequencer[ExecutionInput], first: int, last: int
    ) -> tuple[list[Event], int]:
        """Feed `first..last` to the sequencer, in log order, and detect in what it releases; the
        events, and how many entries the stretch held."""
        entries = self.inputs.entries(first, last)
        for entry in entries:
            if isinstance(entry, IngestAdvancedPayload):
                progress = {int(p): Progress(int(at), bool(done)) for p, (at, done) in entry.progress.items()}
                sequencer.advance(entry.topic, entry.partitions, progress)
            else:
                key, execution = entry
                sequencer.add(execution.workflow_id, key, execution)
        events: list[Event] = []
        for _, batch in sequencer.ready():
            events.extend(detector.observe(batch)[0])
        return events, len(entries)
