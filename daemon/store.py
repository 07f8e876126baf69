"""The event store: an append-only `events` table in DuckDB, its projections, and consumer offsets.

Events are the truth; `executions`, `nodes`, `feedback`, `workflow_versions` and `retracted` (what an
ingest member gave up to another, which reads it again) are projections computed by SQL over the
event payloads (`PROJECT`), the same statements live and in `rebuild()`, so a rebuild equals the live
tables. The consumer offsets
(ingest's progress) and the stage cursors (every later stage's, `daemon/stage.py`) are written in the
same transaction as the events they produced: a crash at any instant loses nothing and counts nothing
twice. Bulk writes go through Arrow tables, never `executemany`.
"""

from __future__ import annotations

import contextlib
import operator
import re
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from cegraph.daemon.carried_spans import CarriedSpans
from cegraph.daemon.events import (
    EXECUTION_AMENDED,
    EXECUTION_COMPLETED,
    EXECUTIONS_RETRACTED,
    FAILURE_INPUT_RECEIVED,
    FEEDBACK_RECEIVED,
    MESSAGE_DEAD_LETTERED,
    WORKFLOW_REGISTERED,
    Event,
    ExecutionCompletedPayload,
    ExecutionsRetractedPayload,
    FailureInputReceivedPayload,
    FeedbackReceivedPayload,
    WorkflowRegisteredPayload,
)
from cegraph.daemon.settings import MEMORY_SIZE, StoreSettings
from cegraph.daemon.spans import Evaluation, Node
from cegraph.daemon.stage import Checkpoint

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
CREATE TABLE IF NOT EXISTS stage_cursors (
    stage VARCHAR PRIMARY KEY,
    position BIGINT NOT NULL,
    snapshot VARCHAR NOT NULL
);
"""
# Stores written before `stage_cursors` kept the detector's cursor as a fake topic among the offsets.
LEGACY_CURSORS = """
INSERT INTO stage_cursors
SELECT 'detect', next_offset, '{}' FROM consumer_offsets
WHERE topic = '__cegraph.detector__' AND 'detect' NOT IN (SELECT stage FROM stage_cursors);
DELETE FROM consumer_offsets WHERE topic = '__cegraph.detector__';
"""

SPAN_LOG = """
CREATE TABLE IF NOT EXISTS event_spans (
    seq BIGINT, amended BOOLEAN,
    trace_id VARCHAR, span_id VARCHAR, parent_span_id VARCHAR, name VARCHAR, kind VARCHAR,
    node_id VARCHAR, workflow_id VARCHAR, workflow_version VARCHAR, track VARCHAR, operation VARCHAR,
    provider VARCHAR, model VARCHAR, start_ns BIGINT, end_ns BIGINT, status VARCHAR,
    status_message VARCHAR, error_type VARCHAR, exception_type VARCHAR, exception_message VARCHAR,
    finish_reasons VARCHAR[], input_tokens BIGINT, output_tokens BIGINT, tool_name VARCHAR,
    input_text VARCHAR, output_text VARCHAR, evaluations JSON, hard_failed BOOLEAN, eval_failed BOOLEAN,
    parent_is_remote BOOLEAN, seed BIGINT, refusal VARCHAR
);
-- stores written before these columns existed
ALTER TABLE event_spans ADD COLUMN IF NOT EXISTS seed BIGINT;
ALTER TABLE event_spans ADD COLUMN IF NOT EXISTS refusal VARCHAR;
"""

EXECUTION_COLUMNS = {
    "trace_id": "VARCHAR", "workflow_id": "VARCHAR", "workflow_version": "VARCHAR", "track": "VARCHAR",
    "root_span_id": "VARCHAR", "root_name": "VARCHAR", "start_ns": "BIGINT", "end_ns": "BIGINT",
    "span_count": "INTEGER", "complete": "BOOLEAN", "reason": "VARCHAR", "hard_failed": "BOOLEAN",
    "eval_failed": "BOOLEAN", "failed_nodes": "INTEGER", "input_tokens": "BIGINT", "output_tokens": "BIGINT",
    "amendments": "INTEGER", "partition": "INTEGER", "first_offset": "BIGINT",
}  # fmt: skip
PROJECTIONS = f"""
CREATE TABLE IF NOT EXISTS executions (
    {", ".join(f"{name} {kind}" for name, kind in EXECUTION_COLUMNS.items())}, seq BIGINT
);
-- stores written before these columns existed (their rows: NULL, never retracted)
ALTER TABLE executions ADD COLUMN IF NOT EXISTS partition INTEGER;
ALTER TABLE executions ADD COLUMN IF NOT EXISTS first_offset BIGINT;
-- the executions retracted (`seq`: the retraction's), with their spans up to it
CREATE TABLE IF NOT EXISTS retracted (trace_id VARCHAR, seq BIGINT);
CREATE TABLE IF NOT EXISTS feedback (
    seq BIGINT, trace_id VARCHAR, span_id VARCHAR, outcome VARCHAR, score DOUBLE, critique VARCHAR,
    source VARCHAR, created_at VARCHAR
);
CREATE TABLE IF NOT EXISTS workflow_versions (
    seq BIGINT, workflow_id VARCHAR, version VARCHAR, content_hash VARCHAR, spec JSON,
    registered_at TIMESTAMP
);
"""
# The spans of the executions stored: a retracted execution's spans are not (those of the execution
# stored again under its trace id, after the retraction, are).
NODES = """
CREATE OR REPLACE VIEW nodes AS
SELECT n.* FROM event_spans n ANTI JOIN retracted r ON r.trace_id = n.trace_id AND n.seq < r.seq;
"""

PROJECTION_TABLES = ("executions", "feedback", "workflow_versions", "retracted")
_E, _FB, _W = ExecutionCompletedPayload, FeedbackReceivedPayload, WorkflowRegisteredPayload
_RECEIVED, _R = FailureInputReceivedPayload, ExecutionsRetractedPayload
_EXECUTION_STRUCT = orjson.dumps(EXECUTION_COLUMNS).decode()
SPAN_EVENTS = (EXECUTION_COMPLETED, EXECUTION_AMENDED, FAILURE_INPUT_RECEIVED)
MESSAGE_EVENTS = (FEEDBACK_RECEIVED, MESSAGE_DEAD_LETTERED)  # keyed by their message: a re-delivery adds none
CARRYING_EVENTS = (EXECUTION_COMPLETED, FAILURE_INPUT_RECEIVED)  # an execution's nodes, not amendments
NODE_FIELDS = [f.name for f in fields(Node)]
# The Kafka source's cursors. CONFIRMED moves once the consumer group holds the offsets stored before
# its position; its snapshot's "group" is, per "topic/partition", the group's offset as this member
# last knew it (its last commit, or what it found at assignment). COMMITTING's "group" holds the
# offsets of a commit being made, written before it is sent: after a crash it may or may not have taken.
CONFIRMED = "ingest.confirmed"
COMMITTING = "ingest.committing"

ROOT = "(n.parent_span_id = '' OR n.parent_is_remote)"  # as `Node.is_root`


def _saturated(total: str) -> str:
    """A token total clamped to BIGINT: spans report whatever int64 counts they like, and a sum past
    int64's end must not fail the flush that stores them (the daemon would stall on that data)."""
    return f"greatest(least({total}, 9223372036854775807), -9223372036854775808)::BIGINT"


# The projections are SQL over a range of events ($1..$2), run live on each appended batch and by
# rebuild() over the whole log: one definition, so rebuilt tables equal the live ones by construction.
# Completed executions are inserted before amendments are applied, which is also their order in time.
# Each statement reads one event type: a live batch without that type skips it (it would change nothing).
# A retraction applies to what came before it only: `_project` splits a range at each one (`segments`).
PROJECT: tuple[tuple[str, str], ...] = (
    (EXECUTION_COMPLETED, f"""
INSERT INTO executions BY NAME
SELECT n.trace_id,
       coalesce(max(n.workflow_id) FILTER (WHERE {ROOT} AND n.workflow_id <> ''),
                min(n.workflow_id) FILTER (WHERE n.workflow_id <> ''), '') AS workflow_id,
       coalesce(max(n.workflow_version) FILTER (WHERE {ROOT} AND n.workflow_id <> ''),
                min(n.workflow_version) FILTER (WHERE n.workflow_id <> ''), '') AS workflow_version,
       coalesce(max(n.track) FILTER (WHERE {ROOT} AND n.track <> ''),
                min(n.track) FILTER (WHERE n.track <> ''), '') AS track,
       coalesce(min(n.span_id) FILTER (WHERE {ROOT}), '') AS root_span_id,
       coalesce(min(n.name) FILTER (WHERE {ROOT}), '') AS root_name,
       min(n.start_ns) AS start_ns, max(n.end_ns) AS end_ns, count(*) AS span_count,
       any_value({_E.sql("complete", of="e.payload")})::BOOLEAN AS complete,
       any_value({_E.sql("reason", of="e.payload")}) AS reason,
       bool_or(n.hard_failed) AS hard_failed, bool_or(n.eval_failed) AS eval_failed,
       count(*) FILTER (WHERE n.hard_failed OR n.eval_failed) AS failed_nodes,
       {_saturated("coalesce(sum(n.input_tokens), 0)")} AS input_tokens,
       {_saturated("coalesce(sum(n.output_tokens), 0)")} AS output_tokens,
       0 AS amendments, n.seq,
       any_value({_E.sql("partition", "INTEGER", of="e.payload")}) AS partition,
       any_value({_E.sql("first_offset", "BIGINT", of="e.payload")}) AS first_offset
FROM event_spans n JOIN events e ON e.seq = n.seq
WHERE n.seq BETWEEN $1 AND $2 AND e.seq BETWEEN $1 AND $2 AND NOT n.amended
  AND e.type = '{EXECUTION_COMPLETED}'
GROUP BY n.trace_id, n.seq
"""),
    # an execution an ingest member sent on: its row as that member's log has it
    (FAILURE_INPUT_RECEIVED, f"""
INSERT INTO executions BY NAME
SELECT unnest(json_transform({_RECEIVED.json("execution")}, '{_EXECUTION_STRUCT}')), seq
FROM events
WHERE seq BETWEEN $1 AND $2 AND type = '{FAILURE_INPUT_RECEIVED}'
  AND json_type({_RECEIVED.json("execution")}) = 'OBJECT'
"""),
    (EXECUTION_AMENDED, f"""
UPDATE executions SET
    span_count = span_count + a.added,
    hard_failed = hard_failed OR a.hard,
    eval_failed = eval_failed OR a.evaluated,
    failed_nodes = failed_nodes + a.failed,
    start_ns = least(executions.start_ns, a.start_ns),
    end_ns = greatest(executions.end_ns, a.end_ns),
    input_tokens = {_saturated("input_tokens::HUGEINT + a.tokens_in")},
    output_tokens = {_saturated("output_tokens::HUGEINT + a.tokens_out")},
    amendments = amendments + a.events,
    -- a root that arrives late completes the execution and gives it its identity
    complete = complete OR a.root_span_id IS NOT NULL,
    root_span_id = CASE WHEN executions.root_span_id = '' THEN coalesce(a.root_span_id, '')
                        ELSE executions.root_span_id END,
    root_name = CASE WHEN executions.root_span_id = '' THEN coalesce(a.root_name, '')
                     ELSE executions.root_name END,
    workflow_id = CASE WHEN executions.workflow_id = '' THEN coalesce(a.workflow_id, '')
                       ELSE executions.workflow_id END,
    workflow_version = CASE WHEN executions.workflow_id = '' THEN coalesce(a.workflow_version, '')
                            ELSE executions.workflow_version END
FROM (
    SELECT trace_id, count(*) AS added, bool_or(hard_failed) AS hard, bool_or(eval_failed) AS evaluated,
           count(*) FILTER (WHERE hard_failed OR eval_failed) AS failed, min(start_ns) AS start_ns,
           max(end_ns) AS end_ns, {_saturated("coalesce(sum(input_tokens), 0)")} AS tokens_in,
           {_saturated("coalesce(sum(output_tokens), 0)")} AS tokens_out, count(DISTINCT seq) AS events,
           min(span_id) FILTER (WHERE {ROOT}) AS root_span_id, min(name) FILTER (WHERE {ROOT}) AS root_name,
           min(workflow_id) FILTER (WHERE workflow_id <> '') AS workflow_id,
           min(workflow_version) FILTER (WHERE workflow_id <> '') AS workflow_version
    FROM event_spans n WHERE amended AND seq BETWEEN $1 AND $2 GROUP BY trace_id
) a WHERE executions.trace_id = a.trace_id
"""),
    (FEEDBACK_RECEIVED, f"""
INSERT INTO feedback BY NAME
SELECT seq, {_FB.sql("trace_id")} AS trace_id, {_FB.sql("span_id")} AS span_id,
       {_FB.sql("outcome")} AS outcome, {_FB.sql("score", "DOUBLE")} AS score,
       {_FB.sql("critique")} AS critique, {_FB.sql("source")} AS source,
       {_FB.sql("created_at")} AS created_at
FROM events WHERE seq BETWEEN $1 AND $2 AND type = '{FEEDBACK_RECEIVED}'
"""),
    (WORKFLOW_REGISTERED, f"""
INSERT INTO workflow_versions BY NAME
SELECT seq, {_W.sql("workflow_id")} AS workflow_id, {_W.sql("version")} AS version,
       {_W.sql("content_hash")} AS content_hash, {_W.json("spec")} AS spec, recorded_at AS registered_at
FROM events WHERE seq BETWEEN $1 AND $2 AND type = '{WORKFLOW_REGISTERED}'
"""),
    (EXECUTIONS_RETRACTED, f"""
INSERT INTO retracted BY NAME
SELECT unnest(from_json({_R.json("trace_ids")}, '["VARCHAR"]')) AS trace_id, seq
FROM events WHERE seq BETWEEN $1 AND $2 AND type = '{EXECUTIONS_RETRACTED}'
"""),
    (EXECUTIONS_RETRACTED, """
DELETE FROM executions x USING retracted r
WHERE r.seq BETWEEN $1 AND $2 AND x.trace_id = r.trace_id AND x.seq < r.seq
"""),
)  # fmt: skip


def segments(first: int, last: int, retractions: list[int]) -> list[tuple[int, int]]:
    """`first`..`last` cut before each retraction in it: each range's statements then see the
    executions the retraction names as they were when it was appended, and one stored again after it
    is not retracted (nor amended by what its first incarnation was)."""
    starts = [first, *(seq for seq in sorted(retractions) if first < seq <= last)]
    return [(start, end - 1) for start, end in zip(starts, [*starts[1:], last + 1], strict=True)]


_NODE_COLUMNS = [(name, operator.attrgetter(name)) for name in NODE_FIELDS]
_ARROW_TYPES = {
    "int": pa.int64(), "int | None": pa.int64(), "bool": pa.bool_(), "list[str]": pa.list_(pa.string())
}  # fmt: skip
# The span table's columns as `event_spans` declares them: conversion never guesses a type from the
# values, so a batch converts exactly when every node is typed as `Node` says.
SPAN_SCHEMA = pa.schema(
    [("seq", pa.int64()), ("amended", pa.bool_())]
    + [(f.name, pa.string() if f.name == "evaluations" else _ARROW_TYPES.get(str(f.type), pa.string()))
       for f in fields(Node)]
)  # fmt: skip


def _span_table(numbered: list[tuple[int, Event]]) -> pa.Table | None:
    """The span rows of the span-carrying events, columnar: the event log's bulk part.

    Built a column at a time straight from the nodes: no row tuples to allocate and transpose.
    """
    seqs: list[int] = []
    amended: list[bool] = []
    nodes: list[Node] = []
    for seq, event in numbered:
        if event.type in SPAN_EVENTS:
            carried = event.payload["nodes"]
            seqs.extend([seq] * len(carried))
            amended.extend([event.type == EXECUTION_AMENDED] * len(carried))
            nodes.extend(carried)
    if not nodes:
        return None
    columns: dict[str, Any] = {"seq": seqs, "amended": amended}
    for name, get in _NODE_COLUMNS:
        columns[name] = list(map(get, nodes))
    columns["evaluations"] = [orjson.dumps(e).decode() if e else "[]" for e in columns["evaluations"]]
    return pa.table(columns, schema=SPAN_SCHEMA)


def node_from_row(row: dict[str, Any]) -> Node:
    """A node as `_span_table` stored it."""
    values = {name: row[name] for name in NODE_FIELDS}
    values["evaluations"] = [Evaluation(**e) for e in orjson.loads(row["evaluations"] or "[]")]
    values["finish_reasons"] = list(row["finish_reasons"] or [])
    return Node(**values)


class StoreError(RuntimeError):
    """The DuckDB file can't be opened or written; the message says which file and why."""


def _memory_size(value: str) -> str:
    if not re.match(MEMORY_SIZE, value):
        raise ValueError(f"not a memory size like 256MiB: {value!r}")
    return value


def _first_line(error: Exception) -> str:
    """DuckDB's messages can run to a stack trace; an operator needs their first line."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class EventStore:
    """Single writer of one DuckDB file. Thread-safe: one lock around every statement."""

    def __init__(
        self,
        path: Path | str,
        *,
        read_only: bool = False,
        memory_limit: str | None = None,
        checkpoint_threshold: str | None = None,
    ) -> None:
        """`memory_limit` caps DuckDB's memory and `checkpoint_threshold` sizes the WAL that makes it
        checkpoint (`CEGRAPH_STORE__*`; None: DuckDB's own)."""
        self.path = str(path)
        self.read_only = read_only
        self.memory_limit = _memory_size(memory_limit) if memory_limit else None
        self.checkpoint_threshold = _memory_size(checkpoint_threshold) if checkpoint_threshold else None
        self._lock = threading.RLock()
        self.carried = CarriedSpans()
        self._open()

    @classmethod
    def configured(cls, settings: StoreSettings, *, read_only: bool = False) -> EventStore:
        """The store as the daemon and every command open it: one place reads `CEGRAPH_STORE__*`."""
        return cls(
            settings.path,
            read_only=read_only,
            memory_limit=settings.memory_limit,
            checkpoint_threshold=settings.checkpoint_threshold,
        )

    def _open(self) -> None:
        self._broken = True  # until the file is open and its last seq known
        try:
            self._con = duckdb.connect(self.path, read_only=self.read_only)
        except duckdb.Error as error:
            raise StoreError(f"cannot open {self.path}: {_first_line(error)}") from None
        try:
            # SET, not connect options: another open of the file needn't repeat them
            if self.memory_limit:
                self._run(f"SET memory_limit = '{self.memory_limit}'")
            if self.checkpoint_threshold:
                self._run(f"SET checkpoint_threshold = '{self.checkpoint_threshold}'")
            if not self.read_only:
                self._run(SCHEMA)
                self._run(LEGACY_CURSORS)
                self._run(SPAN_LOG)
                self._run(PROJECTIONS)
                self._run(NODES)
            self._next_seq = self._scalar("SELECT coalesce(max(seq), 0) + 1 FROM events")
        except duckdb.Error as error:
            with contextlib.suppress(duckdb.Error):
                self._con.close()
            raise StoreError(f"cannot use {self.path}: {_first_line(error)}") from None
        self._broken = False

    @property
    def usable(self) -> bool:
        """False after a failure that needs `reopen()`."""
        return not self._broken

    def reopen(self) -> None:
        """After a fatal DuckDB error the connection is unusable: open the file again."""
        with self._lock:
            with contextlib.suppress(duckdb.Error):
                self._con.close()
            self._open()

    def _resync(self) -> None:
        """After a failed commit, ask the file which seq comes next: a COMMIT can be durable and still
        raise (its checkpoint failed), and numbering from memory would then reuse seqs."""
        try:
            self._next_seq = self._scalar("SELECT coalesce(max(seq), 0) + 1 FROM events")
        except duckdb.Error:
            self._broken = True  # nothing is written until reopen() succeeds

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

    def _usable(self) -> duckdb.DuckDBPyConnection:
        if self._broken:
            raise StoreError(f"{self.path} is unavailable until it is reopened after a failure")
        return self._con

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._usable().execute(sql, list(params)).fetchall()

    def query_dicts(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        with self._lock:
            self._usable()
            cursor = self._con.execute(sql, list(params))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # ------------------------------------------------------------------ writes

    def append(
        self,
        events: list[Event],
        offsets: dict[tuple[str, int], int] | None = None,
        cursors: dict[str, Checkpoint] | None = None,
    ) -> int:
        """Append events, update projections, store offsets and stage cursors, all in one transaction.

        Returns the seq of the last event appended.
        """
        with self._lock:
            self._usable()
            first = self._next_seq
            numbered = list(enumerate(events, start=first))
            self._run("BEGIN TRANSACTION")
            try:
                if numbered:
                    self._insert_events(numbered)
                    self._project(first, first + len(events) - 1, {event.type for event in events})
                if offsets:
                    self._store_offsets(offsets)
                if cursors:
                    self._store_cursors(cursors)
                self._run("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    self._run("ROLLBACK")
                self._resync()
                raise
            self._next_seq = first + len(events)
            self.carried.add((seq, e.payload["nodes"]) for seq, e in numbered if e.type in CARRYING_EVENTS)
            return self._next_seq - 1

    def _insert_events(self, numbered: list[tuple[int, Event]]) -> None:
        """Span-carrying events keep their spans in `event_spans`; the JSON payload holds the rest."""
        table = pa.table(
            {
                "seq": [seq for seq, _ in numbered],
                "type": [event.type for _, event in numbered],
                "key": [event.key for _, event in numbered],
                "payload": [event.payload_json(omit="nodes") for _, event in numbered],
            }
        )
        self._insert("events", table)
        spans = _span_table(numbered)
        if spans is not None:
            self._insert("event_spans", spans)

    def _insert(self, name: str, table: pa.Table) -> None:
        self._con.register("_batch", table)
        try:
            self._run(f"INSERT INTO {name} BY NAME SELECT * FROM _batch")
        finally:
            self._con.unregister("_batch")

    def _project(self, first: int, last: int, types: set[str] | None = None) -> None:
        """Project events `first`..`last`; `types`, when given, are the only event types among them."""
        retractions: list[int] = []
        if types is None or EXECUTIONS_RETRACTED in types:
            rows = self._con.execute(
                "SELECT seq FROM events WHERE type = ? AND seq BETWEEN ? AND ?",
                [EXECUTIONS_RETRACTED, first, last],
            ).fetchall()
            retractions = [seq for (seq,) in rows]
        for low, high in segments(first, last, retractions):
            for event_type, statement in PROJECT:
                if types is None or event_type in types:
                    self._con.execute(statement, [low, high]).fetchall()

    def _store_offsets(self, offsets: dict[tuple[str, int], int]) -> None:
        self._upsert(
            "consumer_offsets",
            ("VARCHAR", [topic for topic, _ in offsets]),
            ("INTEGER", [partition for _, partition in offsets]),
            ("BIGINT", list(offsets.values())),
        )

    def _store_cursors(self, cursors: dict[str, Checkpoint]) -> None:
        self._upsert(
            "stage_cursors",
            ("VARCHAR", list(cursors)),
            ("BIGINT", [c.position for c in cursors.values()]),
            ("VARCHAR", [orjson.dumps(c.snapshot).decode() for c in cursors.values()]),
        )

    def _upsert(self, table: str, *columns: tuple[str, list[Any]]) -> None:
        """INSERT OR REPLACE of a few rows (a table's columns in order, each as its SQL type and values):
        one statement with list parameters. Registering an Arrow table of them cost more than the
        statement (the offsets of stage 1 in the ingest bench: 4.5 us/span of wall time, 1.6 of CPU,
        against 1.7 and 1.0 so)."""
        select = ", ".join(f"unnest(?::{kind}[])" for kind, _ in columns)
        self._con.execute(
            f"INSERT OR REPLACE INTO {table} SELECT {select}", [v for _, v in columns]
        ).fetchall()

    # ------------------------------------------------------------------ reads

    def last_seq(self) -> int:
        with self._lock:
            return self._next_seq - 1

    def offsets(self) -> dict[tuple[str, int], int]:
        rows = self.query("SELECT topic, partition, next_offset FROM consumer_offsets")
        return {(topic, partition): offset for topic, partition, offset in rows}

    def cursor(self, stage: str) -> Checkpoint | None:
        """The last checkpoint `stage` committed, or None before its first."""
        rows = self.query("SELECT position, snapshot FROM stage_cursors WHERE stage = ?", stage)
        return Checkpoint(rows[0][0], orjson.loads(rows[0][1])) if rows else None

    def stored_spans(self, trace_ids: list[str]) -> dict[str, set[str]]:
        """For the traces among `trace_ids` that are already stored, their stored span ids."""
        if not trace_ids:
            return {}
        with self._lock:
            self._con.register("_ids", pa.table({"trace_id": trace_ids}))
            try:
                since = dict(
                    self._con.execute(
                        "SELECT e.trace_id, e.seq FROM executions e SEMI JOIN _ids i USING (trace_id)"
                    ).fetchall()
                )
                # A stored execution's spans are those from its ExecutionCompleted on (it and its
                # amendments; a retraction would have removed it from `executions`): reading from the
                # earliest seq lets DuckDB skip the row groups of the span log before it.
                rows = self._con.execute(
                    "SELECT trace_id, span_id, seq FROM event_spans "
                    "WHERE seq >= ? AND trace_id IN (SELECT unnest(?))",
                    [min(since.values()), list(since)],
                ).fetchall() if since else []  # fmt: skip
            finally:
                self._con.unregister("_ids")
        found: dict[str, set[str]] = {}
        for trace_id, span_id, seq in rows:
            if seq >= since[trace_id]:
                found.setdefault(trace_id, set()).add(span_id)
        return found

    def execution_nodes(self, seqs: list[int]) -> dict[int, list[Node]]:
        """The nodes an `ExecutionCompleted` or `FailureInputReceived` carried, by its seq: those this
        store just appended from memory (taken, so each is handed out once), the others from the span log.
        """
        with self._lock:
            found, missing = self.carried.take(seqs)
            if missing:
                for row in self.query_dicts(
                    "SELECT * FROM event_spans WHERE NOT amended AND seq BETWEEN ? AND ? "
                    "AND seq IN (SELECT unnest(?))",
                    min(missing), max(missing), missing,
                ):  # fmt: skip
                    found.setdefault(row["seq"], []).append(node_from_row(row))
        return found

    def executions_from(self, cut: dict[int, int]) -> list[str]:
        """The stored executions whose first spans message lies at or past `cut` (per spans partition,
        an offset), oldest first: those a consumer reading each partition from there reads whole."""
        if not cut:
            return []
        rows = self.query(
            """
            SELECT x.trace_id FROM executions x
            JOIN (SELECT unnest(?::INTEGER[]) AS partition, unnest(?::BIGINT[]) AS at) c
              ON x.partition = c.partition AND x.first_offset >= c.at
            ORDER BY x.seq
            """,
            list(cut),
            list(cut.values()),
        )
        return [trace_id for (trace_id,) in rows]

    def execution_count(self) -> int:
        return self._scalar("SELECT count(*) FROM executions")

    def feedback_count(self) -> int:
        return self._scalar("SELECT count(*) FROM feedback")

    def feedback_trace_ids(self) -> Iterator[list[str]]:
        """The trace id of every feedback stored, in batches (`_strings`)."""
        return self._strings("SELECT trace_id FROM feedback")

    def trace_ids(self) -> Iterator[list[str]]:
        """Every stored execution's trace id, in batches (`_strings`)."""
        return self._strings("SELECT trace_id FROM executions")

    def message_key_count(self) -> int:
        return self._scalar(f"SELECT count(*) FROM events WHERE type IN {MESSAGE_EVENTS}")

    def message_keys(self) -> Iterator[list[str]]:
        """The keys of the events one message each makes (feedback, dead letters), in batches."""
        return self._strings(f"SELECT key FROM events WHERE type IN {MESSAGE_EVENTS}")

    def _strings(self, sql: str, batch: int = 65_536) -> Iterator[list[str]]:
        """A query's one column, read as Arrow (no row tuples) and made into Python strings a slice
        at a time, so a million ids never sit in memory as objects at once (the freed strings would
        leave the heap fragmented, not smaller)."""
        with self._lock:
            table = self._usable().sql(sql).to_arrow_table()
        for chunk in table.to_batches(max_chunksize=batch):
            yield chunk.column(0).to_pylist()

    def recent_trace_ids(self, limit: int) -> list[str]:
        """The most recently stored executions, oldest first."""
        rows = self.query("SELECT trace_id FROM executions ORDER BY seq DESC LIMIT ?", limit)
        return [trace_id for (trace_id,) in reversed(rows)]

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
        confirmed = self.cursor(CONFIRMED)
        unconfirmed = 0
        if confirmed is not None:
            unconfirmed = self._scalar("SELECT count(*) FROM executions WHERE seq >= ?", confirmed.position)
        return {
            "spans": int(executions["spans"]),
            "executions": {
                "complete": executions["complete"],
                "incomplete": executions["incomplete"],
                "total": executions["complete"] + executions["incomplete"],
            },
            "unconfirmed": unconfirmed,
            "retracted": self._scalar("SELECT count(*) FROM retracted"),
            "failures": {
                "executions_failed": executions["failed"] + feedback_failed,
                "from_spans": executions["failed"],
                "from_feedback_only": feedback_failed,
            },
            "feedback": counts.get(FEEDBACK_RECEIVED, 0),
            "received": counts.get(FAILURE_INPUT_RECEIVED, 0),
            "amendments": counts.get(EXECUTION_AMENDED, 0),
            "dead_letters": counts.get(MESSAGE_DEAD_LETTERED, 0),
            "events": sum(counts.values()),
            "offsets": {
                f"{topic}/{partition}": offset
                for (topic, partition), offset in sorted(self.offsets().items())
            },
            "stages": dict(self.query("SELECT stage, position FROM stage_cursors ORDER BY stage")),
        }

    def workflow_versions(self, workflow_id: str | None = None) -> list[dict[str, Any]]:
        """Registered spec versions (of one workflow, or all) in registration order, with the number of
        stored executions that ran each."""
        return self.query_dicts(
            """
            SELECT v.workflow_id, v.version, v.content_hash, v.registered_at, count(e.trace_id) AS executions
            FROM workflow_versions v
            LEFT JOIN executions e ON e.workflow_id = v.workflow_id AND e.workflow_version = v.version
            WHERE $1 IS NULL OR v.workflow_id = $1
            GROUP BY v.seq, v.workflow_id, v.version, v.content_hash, v.registered_at
            ORDER BY v.workflow_id, v.seq
            """,
            workflow_id,
        )

    def workflow_spec(self, workflow_id: str, version: str) -> str | None:
        """The canonical JSON of a registered spec version, or None."""
        return self._scalar(
            "SELECT spec FROM workflow_versions WHERE workflow_id = ? AND version = ?", workflow_id, version
        )

    def execution(self, trace_id: str) -> dict[str, Any] | None:
        """One execution as stored: its row, its nodes (spans, amendments included) and its feedback."""
        rows = self.query_dicts("SELECT * EXCLUDE (seq) FROM executions WHERE trace_id = ?", trace_id)
        if not rows:
            return None
        nodes = self.query_dicts(
            "SELECT * EXCLUDE (seq, trace_id) FROM nodes WHERE trace_id = ? ORDER BY start_ns, span_id",
            trace_id,
        )
        for node in nodes:
            node["evaluations"] = orjson.loads(node["evaluations"] or "[]")
        feedback = self.query_dicts(
            "SELECT * EXCLUDE (seq, trace_id) FROM feedback WHERE trace_id = ? ORDER BY seq", trace_id
        )
        return {**rows[0], "nodes": nodes, "feedback": feedback}

    # ------------------------------------------------------------------ rebuild

    def rebuild(self) -> int:
        """Recompute every projection from the event log; returns the number of events replayed."""
        with self._lock:
            self._run("BEGIN TRANSACTION")
            try:
                for table in PROJECTION_TABLES:
                    self._run(f"DROP TABLE IF EXISTS {table}")
                self._run(PROJECTIONS)
                self._run(NODES)
                last = self._next_seq - 1
                self._project(1, last)
                self._run("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    self._run("ROLLBACK")
                raise
            return last

    def projection_digest(self) -> dict[str, str]:
        """An order-independent digest of each projection, to compare live against rebuilt."""
        digests = {}
        for table in PROJECTION_TABLES:
            digests[table] = str(
                self._scalar(f"SELECT coalesce(sum(hash(t)::HUGEINT), 0) || ':' || count(*) FROM {table} t")
            )
        return digests
