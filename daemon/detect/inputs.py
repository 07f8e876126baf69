"""What the detector reads: executions with the feedback joined to them, late feedback, and ingest's
progress reports, each execution with its place in the detector's order (`daemon/detect/sequencer.py`).

From a log that ingest wrote (`ExecutionCompleted`, `FeedbackReceived`, `IngestAdvanced`), or from a
log a failures-topic source wrote (`FailureInputReceived`, `IngestAdvanced`: the same inputs, made by
ingest members in other processes, `daemon/detect/failures_feed.py`), read alike.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict
from typing import Any

import orjson

from cegraph.daemon.detect.detector import ExecutionInput, workflow_of
from cegraph.daemon.detect.failures import FeedbackSignal
from cegraph.daemon.detect.sequencer import Key
from cegraph.daemon.events import (
    EXECUTION_COMPLETED,
    FAILURE_INPUT_RECEIVED,
    FEEDBACK_RECEIVED,
    INGEST_ADVANCED,
    ExecutionCompletedPayload,
    IngestAdvancedPayload,
)
from cegraph.daemon.spans import Evaluation, Node
from cegraph.daemon.store import EventStore
from cegraph.daemon.stored_keys import StoredKeys

LOG = "log"  # the source of executions recorded without a spans offset: always caught up
COUNTED = (EXECUTION_COMPLETED, FEEDBACK_RECEIVED, FAILURE_INPUT_RECEIVED)  # what a step's size counts
READ = (*COUNTED, INGEST_ADVANCED)

Entry = IngestAdvancedPayload | tuple[Key, ExecutionInput]
Place = tuple[int, int, str]  # a key's first three parts: where an execution sorts
# Late feedback for one of the executions read last finds it in memory: ~400 bytes each (measured), 8 MB.
RECENT_EXECUTIONS = 20_000


def _signal(row: dict[str, Any]) -> FeedbackSignal:
    """From a feedback projection row or a FeedbackReceived payload (same field names)."""
    return FeedbackSignal(
        row["trace_id"],
        row.get("span_id"),
        row.get("critique") or "",
        row.get("source") or "",
        row.get("score"),
    )


def _execution(trace: str, nodes: list[Node], feedback: list[FeedbackSignal], feedback_only: bool = False):
    return ExecutionInput(trace, *workflow_of(nodes), nodes, feedback, feedback_only=feedback_only)


def input_to_json(execution: ExecutionInput) -> dict[str, Any]:
    return asdict(execution)


def input_from_json(data: dict[str, Any]) -> ExecutionInput:
    nodes = [
        Node(**{**node, "evaluations": [Evaluation(**e) for e in node["evaluations"]]})
        for node in data["nodes"]
    ]
    feedback = [FeedbackSignal(**signal) for signal in data["feedback"]]
    return ExecutionInput(
        data["trace_id"],
        data["workflow_id"],
        data["workflow_version"],
        nodes,
        feedback,
        data["feedback_only"],
    )


class DetectorInputs:
    """Reads the detector's inputs in constant time per batch whatever the store holds: the store is
    asked about feedback only for traces that may have some (a Bloom filter over the traces with
    feedback), and late feedback finds its execution among the last `RECENT_EXECUTIONS` read (an
    older one costs one look-up of the log for all such feedback of the batch)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._with_feedback = StoredKeys(store.feedback_trace_ids, store.feedback_count)
        # per trace read lately: where its first execution sorts, and the seqs of its executions
        self._executed: OrderedDict[str, tuple[Place, list[int]]] = OrderedDict()

    def stretch(self, first: int, end: int, count: int) -> int:
        """The last seq of the stretch from `first` that holds `count` executions and feedback (or up
        to `end`), counted in entries, so other writers' events in between move no boundary. It runs
        up to the next counted entry, so ingest's report that follows a flush's executions is read in
        the same step: it is what releases them, and a step that stopped short of it would release
        nothing and cost a transaction of its own."""
        marks = ", ".join("?" * len(COUNTED))
        [(found, after)] = self.store.query(
            f"SELECT count(*), max(seq) FROM (SELECT seq FROM events "
            f"WHERE seq BETWEEN ? AND ? AND type IN ({marks}) ORDER BY seq LIMIT ?)",
            first, end, *COUNTED, count + 1,
        )  # fmt: skip
        return after - 1 if found > count else end

    def entries(self, first: int, last: int) -> list[Entry]:
        """The executions completed, the feedback received and ingest's reports in `first..last`, in
        log order; each execution and late feedback with its place in the sequencer's order."""
        marks = ", ".join("?" * len(READ))
        rows = self.store.query_dicts(
            f"SELECT seq, type, key, payload FROM events WHERE seq BETWEEN ? AND ? AND type IN ({marks}) "
            "ORDER BY seq",
            first, last, *READ,
        )  # fmt: skip
        if not rows:
            return []
        payloads = {r["seq"]: orjson.loads(r["payload"]) for r in rows}
        executed_at = {r["key"]: r["seq"] for r in rows if r["type"] == EXECUTION_COMPLETED}
        feedback = {r["seq"]: payloads[r["seq"]] for r in rows if r["type"] == FEEDBACK_RECEIVED}
        received = {r["seq"] for r in rows if r["type"] == FAILURE_INPUT_RECEIVED}
        # From memory when this process just appended them (the usual case); otherwise a read by seq
        # range, which lets DuckDB skip every row group outside the stretch.
        carried = self.store.execution_nodes([*executed_at.values(), *received])
        nodes = {trace: carried.get(seq, []) for trace, seq in executed_at.items()}
        places = self._places(executed_at, payloads)
        self._with_feedback.add(p["trace_id"] for p in feedback.values())
        before = self._executed_before({p["trace_id"] for p in feedback.values()} - executed_at.keys(), first)
        if before:  # late feedback: the spans of its execution, stored before this stretch
            stored = self.store.execution_nodes(sorted({seq for _, seqs in before.values() for seq in seqs}))
            for trace, (_, seqs) in before.items():
                nodes[trace] = [node for seq in seqs for node in stored.get(seq, [])]
        earlier: dict[str, list[tuple[int, FeedbackSignal]]] = {}
        maybe = self._with_feedback.maybe(executed_at)
        for row in self.store.query_dicts(
            "SELECT * FROM feedback WHERE trace_id = ANY(?::VARCHAR[]) AND seq <= ?", maybe, last
        ) if maybe else []:  # fmt: skip
            earlier.setdefault(row["trace_id"], []).append((row["seq"], _signal(row)))
        entries: list[Entry] = []
        for row in rows:
            seq, payload = row["seq"], payloads[row["seq"]]
            if row["type"] == INGEST_ADVANCED:
                entries.append(IngestAdvancedPayload(**payload))
            elif row["type"] == FAILURE_INPUT_RECEIVED:
                execution = input_from_json(payload["input"])
                execution.nodes = execution.nodes or carried.get(seq, [])
                entries.append((tuple(payload["place"]), execution))
            elif row["type"] == EXECUTION_COMPLETED:
                trace = row["key"]
                joined = [signal for at, signal in sorted(earlier.get(trace, [])) if at < seq]
                if "offset" not in payload:  # a log from before executions had a place: the log's order
                    entries.append(IngestAdvancedPayload(LOG, 1, {"0": [seq + 1, True]}))
                entries.append((places[trace], _execution(trace, nodes.get(trace, []), joined)))
            else:
                trace = payload["trace_id"]
                if trace in executed_at:
                    if executed_at[trace] > seq:
                        continue  # not executed yet: it is joined when the execution completes
                    place = places[trace][:3]
                elif trace in before:
                    place = before[trace][0]
                else:
                    continue  # not executed yet: it is joined when the execution completes
                late = _execution(trace, nodes[trace], [_signal(payload)], feedback_only=True)
                entries.append(((*place, row["key"]), late))
        self._remember(executed_at, places)
        return entries

    def _places(self, executed_at: dict[str, int], payloads: dict[int, dict[str, Any]]) -> dict[str, Key]:
        places = {}
        for trace, seq in executed_at.items():
            payload = payloads[seq]
            offset, partition = payload.get("offset"), payload.get("partition", 0)
            places[trace] = (seq, 0, trace, "") if offset is None else (offset, partition, trace, "")
        return places

    def _executed_before(self, traces: set[str], first: int) -> dict[str, tuple[Place, list[int]]]:
        """Of `traces`, those executed before `first`: where each sorts (right behind its first
        execution, so its late feedback is late by construction) and its executions' seqs."""
        found = {trace: self._executed[trace] for trace in traces if trace in self._executed}
        missing = sorted(traces - found.keys())
        if missing:
            done = ExecutionCompletedPayload
            for trace, seq, offset, partition in self.store.query(
                f"SELECT key, seq, {done.sql('offset', 'BIGINT')}, {done.sql('partition', 'BIGINT')} "
                "FROM events WHERE type = ? AND key = ANY(?::VARCHAR[]) AND seq < ? ORDER BY seq",
                EXECUTION_COMPLETED, missing, first,
            ):  # fmt: skip
                place = (seq, 0, trace) if offset is None else (offset, partition, trace)
                found.setdefault(trace, (place, []))[1].append(seq)
        return found

    def _remember(self, executed_at: dict[str, int], places: dict[str, Key]) -> None:
        for trace, seq in executed_at.items():
            known = self._executed.get(trace)
            if known is None:
                self._executed[trace] = (places[trace][:3], [seq])
            else:
                known[1].append(seq)
                self._executed.move_to_end(trace)
        while len(self._executed) > RECENT_EXECUTIONS:
            self._executed.popitem(last=False)
