"""The event store: an append-only `events` table in DuckDB, its projections, and consumer offsets.

Events are the truth; `executions`, `nodes` and `feedback` are projections computed by `project()`,
the same code live and in `rebuild()`, so a rebuild equals the live tables. The consumer offsets are
written in the same transaction as the events they produced: a crash at any instant loses nothing
and counts nothing twice. Bulk writes go through Arrow tables, never `executemany`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from cegraph.daemon.events import (
    EXECUTION_AMENDED,
    EXECUTION_COMPLETED,
    FEEDBACK_RECEIVED,
    MESSAGE_DEAD_LETTERED,
    Event,
    load_payload,
)
from cegraph.daemon.spans import Evaluation, Node

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT NOT NULL,
    recorded_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    type VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    payload VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS consumer_offsets (
    topic VARCHAR NOT NULL,
    partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""

PROJECTIONS = """
CREATE TABLE IF NOT EXISTS executions (
    trace_id VARCHAR, workflow_id VARCHAR, workflow_version VARCHAR, track VARCHAR,
    root_span_id VARCHAR, root_name VARCHAR, start_ns BIGINT, end_ns BIGINT, span_count INTEGER,
    complete BOOLEAN, reason VARCHAR, hard_failed BOOLEAN, eval_failed BOOLEAN, failed_nodes INTEGER,
    input_tokens BIGINT, output_tokens BIGINT, amendments INTEGER, seq BIGINT
);
CREATE TABLE IF NOT EXISTS nodes (
    trace_id VARCHAR, span_id VARCHAR, parent_span_id VARCHAR, name VARCHAR, kind VARCHAR,
    node_id VARCHAR, workflow_id VARCHAR, workflow_version VARCHAR, track VARCHAR, operation VARCHAR,
    provider VARCHAR, model VARCHAR, start_ns BIGINT, end_ns BIGINT, status VARCHAR,
    status_message VARCHAR, error_type VARCHAR, exception_type VARCHAR, exception_message VARCHAR,
    finish_reasons VARCHAR[], input_tokens BIGINT, output_tokens BIGINT, tool_name VARCHAR,
    input_text VARCHAR, output_text VARCHAR, evaluations VARCHAR, amended BOOLEAN, seq BIGINT
);
CREATE TABLE IF NOT EXISTS feedback (
    seq BIGINT, trace_id VARCHAR, span_id VARCHAR, outcome VARCHAR, score DOUBLE, critique VARCHAR,
    source VARCHAR, created_at VARCHAR
);
"""

PROJECTION_TABLES = ("executions", "nodes", "feedback")
NODE_FIELDS = [f.name for f in fields(Node)]


def node_from_dict(data: dict[str, Any]) -> Node:
    data = dict(data)
    data["evaluations"] = [Evaluation(**e) for e in data.get("evaluations", [])]
    return Node(**data)


def summarize(trace_id: str, nodes: list[Node], complete: bool, reason: str, seq: int) -> dict[str, Any]:
    """One `executions` row from the nodes of a trace (pure, so live and rebuild agree)."""
    root = next((n for n in nodes if not n.parent_span_id), None)
    identified = (
        root if root is not None and root.workflow_id else next((n for n in nodes if n.workflow_id), None)
    )
    tracked = next((n for n in ([root] if root else []) + nodes if n.track), None)
    return {
        "trace_id": trace_id,
        "workflow_id": identified.workflow_id if identified else "",
        "workflow_version": identified.workflow_version if identified else "",
        "track": tracked.track if tracked else "",
        "root_span_id": root.span_id if root else "",
        "root_name": root.name if root else "",
        "start_ns": min((n.start_ns for n in nodes), default=0),
        "end_ns": max((n.end_ns for n in nodes), default=0),
        "span_count": len(nodes),
        "complete": complete,
        "reason": reason,
        "hard_failed": any(n.hard_failed for n in nodes),
        "eval_failed": any(n.eval_failed for n in nodes),
        "failed_nodes": sum(1 for n in nodes if n.hard_failed or n.eval_failed),
        "input_tokens": sum(n.input_tokens or 0 for n in nodes),
        "output_tokens": sum(n.output_tokens or 0 for n in nodes),
        "amendments": 0,
        "seq": seq,
    }


@dataclass
class Projection:
    """Rows that a batch of events adds to the projections, plus the amendments to apply."""

    executions: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[tuple[Node, bool, int]] = field(default_factory=list)  # node, amended, seq
    amended: dict[str, list[Node]] = field(default_factory=dict)
    amendment_events: dict[str, int] = field(default_factory=dict)
    feedback: list[dict[str, Any]] = field(default_factory=list)


def project(events: Iterable[tuple[int, Event]]) -> Projection:
    projection = Projection()
    for seq, event in events:
        payload = event.payload
        if event.type == EXECUTION_COMPLETED:
            nodes = payload["nodes"]
            projection.executions.append(
                summarize(payload["trace_id"], nodes, payload["complete"], payload["reason"], seq)
            )
            projection.nodes.extend((node, False, seq) for node in nodes)
        elif event.type == EXECUTION_AMENDED:
            projection.nodes.extend((node, True, seq) for node in payload["nodes"])
            trace_id = payload["trace_id"]
            projection.amended.setdefault(trace_id, []).extend(payload["nodes"])
            projection.amendment_events[trace_id] = projection.amendment_events.get(trace_id, 0) + 1
        elif event.type == FEEDBACK_RECEIVED:
            projection.feedback.append({"seq": seq, **payload})
    return projection


def _node_table(rows: list[tuple[Node, bool, int]]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [getattr(n, name) for n, _, _ in rows] for name in NODE_FIELDS}
    columns["evaluations"] = [
        orjson.dumps(n.evaluations).decode() if n.evaluations else "[]" for n, _, _ in rows
    ]
    columns["amended"] = [amended for _, amended, _ in rows]
    columns["seq"] = [seq for _, _, seq in rows]
    return pa.table(columns)


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows)


class StoreError(RuntimeError):
    """The DuckDB file can't be opened or written; the message says which file and why."""


class EventStore:
    """Single writer of one DuckDB file. Thread-safe: one lock around every statement."""

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        self.path = str(path)
        self.read_only = read_only
        self._lock = threading.RLock()
        self._open()

    def _open(self) -> None:
        try:
            self._con = duckdb.connect(self.path, read_only=self.read_only)
        except duckdb.IOException as error:
            raise StoreError(f"cannot open {self.path}: {error}") from None
        if not self.read_only:
            self._run(SCHEMA)
            self._run(PROJECTIONS)
        self._next_seq = self._scalar("SELECT coalesce(max(seq), 0) + 1 FROM events")

    def reopen(self) -> None:
        """After a fatal DuckDB error the connection is unusable: open the file again."""
        with self._lock:
            with contextlib.suppress(duckdb.Error):
                self._con.close()
            self._open()

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def _run(self, sql: str) -> None:
        """Run a statement and consume its result (DuckDB refuses new work while one is pending)."""
        self._con.execute(sql).fetchall()

    def _scalar(self, sql: str, *params: Any) -> Any:
        with self._lock:
            rows = self._con.execute(sql, list(params)).fetchall()
        return rows[0][0] if rows else None

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._con.execute(sql, list(params)).fetchall()

    def query_dicts(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._con.execute(sql, list(params))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # ------------------------------------------------------------------ writes

    def append(self, events: list[Event], offsets: dict[tuple[str, int], int] | None = None) -> int:
        """Append events, update projections and store offsets, all in one transaction.

        Returns the seq of the last event appended.
        """
        with self._lock:
            first = self._next_seq
            numbered = list(enumerate(events, start=first))
            self._run("BEGIN TRANSACTION")
            try:
                if numbered:
                    self._insert_events(numbered)
                    self._apply(project(numbered))
                if offsets:
                    self._store_offsets(offsets)
                self._run("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    self._run("ROLLBACK")
                raise
            self._next_seq = first + len(events)
            return self._next_seq - 1

    def _insert_events(self, numbered: list[tuple[int, Event]]) -> None:
        table = pa.table(
            {
                "seq": [seq for seq, _ in numbered],
                "type": [event.type for _, event in numbered],
                "key": [event.key for _, event in numbered],
                "payload": [event.payload_json() for _, event in numbered],
            }
        )
        self._insert("events", table)

    def _insert(self, name: str, table: pa.Table) -> None:
        self._con.register("_batch", table)
        try:
            self._run(f"INSERT INTO {name} BY NAME SELECT * FROM _batch")
        finally:
            self._con.unregister("_batch")

    def _apply(self, projection: Projection) -> None:
        if projection.executions:
            self._insert("executions", _rows_table(projection.executions))
        if projection.nodes:
            self._insert("nodes", _node_table(projection.nodes))
        if projection.feedback:
            self._insert("feedback", _rows_table(projection.feedback))
        if projection.amended:
            changes = pa.table(
                {
                    "trace_id": list(projection.amended),
                    "events": [projection.amendment_events[t] for t in projection.amended],
                    "added": [len(nodes) for nodes in projection.amended.values()],
                    "hard": [any(n.hard_failed for n in nodes) for nodes in projection.amended.values()],
                    "eval": [any(n.eval_failed for n in nodes) for nodes in projection.amended.values()],
                    "failed": [
                        sum(1 for n in nodes if n.hard_failed or n.eval_failed)
                        for nodes in projection.amended.values()
                    ],
                    "end_ns": [max(n.end_ns for n in nodes) for nodes in projection.amended.values()],
                    "tokens_in": [
                        sum(n.input_tokens or 0 for n in nodes) for nodes in projection.amended.values()
                    ],
                    "tokens_out": [
                        sum(n.output_tokens or 0 for n in nodes) for nodes in projection.amended.values()
                    ],
                }
            )
            self._con.register("_amend", changes)
            try:
                self._run(
                    """
                    UPDATE executions SET
                        span_count = span_count + a.added,
                        hard_failed = hard_failed OR a.hard,
                        eval_failed = eval_failed OR a.eval,
                        failed_nodes = failed_nodes + a.failed,
                        end_ns = greatest(executions.end_ns, a.end_ns),
                        input_tokens = input_tokens + a.tokens_in,
                        output_tokens = output_tokens + a.tokens_out,
                        amendments = amendments + a.events
                    FROM _amend a WHERE executions.trace_id = a.trace_id
                    """
                )
            finally:
                self._con.unregister("_amend")

    def _store_offsets(self, offsets: dict[tuple[str, int], int]) -> None:
        table = pa.table(
            {
                "topic": [topic for topic, _ in offsets],
                "partition": pa.array([partition for _, partition in offsets], pa.int32()),
                "next_offset": list(offsets.values()),
            }
        )
        self._con.register("_offsets", table)
        try:
            self._run("INSERT OR REPLACE INTO consumer_offsets SELECT * FROM _offsets")
        finally:
            self._con.unregister("_offsets")

    # ------------------------------------------------------------------ reads

    def offsets(self) -> dict[tuple[str, int], int]:
        rows = self.query("SELECT topic, partition, next_offset FROM consumer_offsets")
        return {(topic, partition): offset for topic, partition, offset in rows}

    def stored_spans(self, trace_ids: list[str]) -> dict[str, set[str]]:
        """For the traces among `trace_ids` that are already stored, their stored span ids."""
        if not trace_ids:
            return {}
        with self._lock:
            self._con.register("_ids", pa.table({"trace_id": trace_ids}))
            try:
                rows = self._con.execute(
                    """
                    SELECT n.trace_id, n.span_id FROM nodes n
                    WHERE n.trace_id IN (
                        SELECT e.trace_id FROM executions e SEMI JOIN _ids i ON e.trace_id = i.trace_id
                    )
                    """
                ).fetchall()
            finally:
                self._con.unregister("_ids")
        found: dict[str, set[str]] = {}
        for trace_id, span_id in rows:
            found.setdefault(trace_id, set()).add(span_id)
        return found

    def recent_trace_ids(self, limit: int) -> list[str]:
        """The most recently stored executions, oldest first."""
        rows = self.query("SELECT trace_id FROM executions ORDER BY seq DESC LIMIT ?", limit)
        return [trace_id for (trace_id,) in reversed(rows)]

    def iter_events(self, batch: int = 10_000) -> Iterator[tuple[int, Event]]:
        last = 0
        while True:
            rows = self.query(
                "SELECT seq, type, key, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?", last, batch
            )
            if not rows:
                return
            for seq, kind, key, payload in rows:
                yield seq, decode_event(kind, key, payload)
            last = rows[-1][0]

    def stats(self) -> dict[str, Any]:
        executions = self.query_dicts(
            """
            SELECT count(*) FILTER (WHERE complete) AS complete,
                   count(*) FILTER (WHERE NOT complete) AS incomplete,
                   coalesce(sum(span_count), 0) AS spans,
                   count(*) FILTER (WHERE hard_failed OR eval_failed) AS failed
            FROM executions
            """
        )[0]
        counts = dict(self.query("SELECT type, count(*) FROM events GROUP BY type"))
        feedback_failed = self._scalar(
            "SELECT count(DISTINCT f.trace_id) FROM feedback f JOIN executions e USING (trace_id) "
            "WHERE f.outcome = 'failed' AND NOT (e.hard_failed OR e.eval_failed)"
        )
        return {
            "spans": int(executions["spans"]),
            "executions": {
                "complete": executions["complete"],
                "incomplete": executions["incomplete"],
                "total": executions["complete"] + executions["incomplete"],
            },
            "failures": {
                "executions_failed": executions["failed"] + feedback_failed,
                "from_spans": executions["failed"],
                "from_feedback_only": feedback_failed,
            },
            "feedback": counts.get(FEEDBACK_RECEIVED, 0),
            "amendments": counts.get(EXECUTION_AMENDED, 0),
            "dead_letters": counts.get(MESSAGE_DEAD_LETTERED, 0),
            "events": sum(counts.values()),
            "offsets": {
                f"{topic}/{partition}": offset
                for (topic, partition), offset in sorted(self.offsets().items())
            },
        }

    # ------------------------------------------------------------------ rebuild

    def rebuild(self) -> int:
        """Recompute every projection from the event log; returns the number of events replayed."""
        with self._lock:
            replayed = 0
            self._run("BEGIN TRANSACTION")
            try:
                for table in PROJECTION_TABLES:
                    self._run(f"DROP TABLE IF EXISTS {table}")
                self._run(PROJECTIONS)
                chunk: list[tuple[int, Event]] = []
                for item in self.iter_events():
                    chunk.append(item)
                    if len(chunk) >= 5_000:
                        self._apply(project(chunk))
                        replayed += len(chunk)
                        chunk = []
                if chunk:
                    self._apply(project(chunk))
                    replayed += len(chunk)
                self._run("COMMIT")
            except BaseException:
                self._run("ROLLBACK")
                raise
            return replayed

    def projection_digest(self) -> dict[str, str]:
        """An order-independent digest of each projection, to compare live against rebuilt."""
        digests = {}
        for table in PROJECTION_TABLES:
            digests[table] = str(
                self._scalar(f"SELECT coalesce(sum(hash(t)::HUGEINT), 0) || ':' || count(*) FROM {table} t")
            )
        return digests


def decode_event(kind: str, key: str, payload_text: str) -> Event:
    payload = load_payload(payload_text)
    if kind in (EXECUTION_COMPLETED, EXECUTION_AMENDED):
        payload["nodes"] = [node_from_dict(n) for n in payload["nodes"]]
    return Event(kind, key, payload)
