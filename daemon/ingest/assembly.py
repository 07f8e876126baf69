"""Trace assembly: spans that arrive out of order, across messages and partitions, become executions.

An execution is complete when its root span has ended and nothing arrived for `idle_timeout_s`, or
at `max_age_s` anyway. Memory is bounded by `max_open`: past it the oldest trace is completed as
incomplete. The caller passes the clock (`now`), so assembly is deterministic under test. Log records
(from the optional logs topic) wait in their trace too and are joined to their spans when it leaves;
the nodes of a finished trace get ids that tell repeated calls apart (`distinct_node_ids`).

`PendingOffsets` is the other half of exactly-once: a message may be stored as consumed only when
every span it carried is in a completed (persisted) execution. Its low watermark per partition is the
offset the consumer restarts from.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cegraph.daemon.ingest.normalize import distinct_node_ids
from cegraph.daemon.spans import LogDetails, Node

MessageRef = tuple[str, int, int]  # topic, partition, offset


@dataclass(slots=True)
class OpenTrace:
    trace_id: str
    first_seen: float
    last_seen: float
    nodes: dict[str, Node] = field(default_factory=dict)
    root_ended: bool = False
    messages: set[MessageRef] = field(default_factory=set)
    logs: dict[str, list[LogDetails]] = field(default_factory=dict)  # span id -> its log records


@dataclass(slots=True)
class Assembled:
    """A trace leaving the assembler; `complete` is False when it was forced out."""

    trace_id: str
    nodes: list[Node]
    complete: bool
    reason: str  # "root-ended", "max-age", "evicted"
    messages: set[MessageRef]
    joined_logs: int = 0  # log records joined to a span of the trace
    unmatched_logs: int = 0  # log records naming a span the trace never had


JoinLogs = Callable[[Node, list[LogDetails]], Node]
SpanLogDetails = tuple[str, str, LogDetails]  # trace id, span id, what the record adds


class TraceAssembler:
    def __init__(
        self, *, idle_timeout_s: float, max_age_s: float, max_open: int, join_logs: JoinLogs | None = None
    ) -> None:
        """`join_logs(node, details)` makes a span's node with what its log records add."""
        self.idle_timeout_s = idle_timeout_s
        self.max_age_s = max_age_s
        self.max_open = max_open
        self.join_logs = join_logs
        self._open: OrderedDict[str, OpenTrace] = OrderedDict()  # least recently updated first
        self._by_age: list[tuple[float, str]] = []  # (first_seen, trace_id), pruned in poll()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, nodes: list[Node], ref: MessageRef, now: float) -> tuple[int, list[Assembled]]:
        """Add the spans of one message.

        Returns how many traces newly hold the message (each releases it once when persisted) and
        the traces evicted to respect `max_open`.
        """
        holds = 0
        trace: OpenTrace | None = None
        for node in nodes:
            if trace is None or node.trace_id != trace.trace_id:  # a message's spans come by trace
                trace = self._touch(node.trace_id, now)
                if ref not in trace.messages:
                    trace.messages.add(ref)
                    holds += 1
            trace.nodes[node.span_id] = node
            if node.is_root and node.end_ns:
                trace.root_ended = True
        return holds, self._evict()

    def add_logs(
        self, logs: list[SpanLogDetails], ref: MessageRef, now: float
    ) -> tuple[int, list[Assembled]]:
        """Add the log records of one message (each naming a trace and span); returns as `add` does.
        A trace that has only log records so far waits for its spans like any other."""
        holds = 0
        for trace_id, span_id, details in logs:
            trace = self._touch(trace_id, now)
            trace.logs.setdefault(span_id, []).append(details)
            if ref not in trace.messages:
                trace.messages.add(ref)
                holds += 1
        return holds, self._evict()

    def _touch(self, trace_id: str, now: float) -> OpenTrace:
        trace = self._open.get(trace_id)
        if trace is None:
            trace = self._open[trace_id] = OpenTrace(trace_id, now, now)
            heapq.heappush(self._by_age, (now, trace_id))
        else:
            self._open.move_to_end(trace_id)
        trace.last_seen = now
        return trace

    def _evict(self) -> list[Assembled]:
        evicted = []
        while len(self._open) > self.max_open:
            _, oldest = self._open.popitem(last=False)
            evicted.append(self._finish(oldest, complete=False, reason="evicted"))
        return evicted

    def poll(self, now: float) -> list[Assembled]:
        """Traces that are complete at `now`; walks only the idle ones and the too old ones."""
        done = []
        for trace in self._open.values():
            if now - trace.last_seen < self.idle_timeout_s:
                break
            if trace.root_ended:
                done.append(self._finish(trace, complete=True, reason="root-ended"))
        for assembled in done:
            del self._open[assembled.trace_id]
        while self._by_age and now - self._by_age[0][0] >= self.max_age_s:
            first_seen, trace_id = heapq.heappop(self._by_age)
            trace = self._open.get(trace_id)
            if trace is not None and trace.first_seen == first_seen:
                del self._open[trace_id]
                done.append(self._finish(trace, complete=trace.root_ended, reason="max-age"))
        if len(self._by_age) > 2 * len(self._open) + 1024:
            # most entries are of traces that completed: rebuilt from the open ones, the heap stays
            # proportional to them instead of to the traffic of the last `max_age_s`
            self._by_age = [(trace.first_seen, trace.trace_id) for trace in self._open.values()]
            heapq.heapify(self._by_age)
        return done

    def drain(self) -> list[Assembled]:
        """Everything still open, as incomplete (used when stopping without waiting)."""
        done = [self._finish(t, complete=t.root_ended, reason="drained") for t in self._open.values()]
        self._open.clear()
        return done

    def is_open(self, trace_id: str) -> bool:
        return trace_id in self._open

    def _finish(self, trace: OpenTrace, *, complete: bool, reason: str) -> Assembled:
        nodes = list(trace.nodes.values())  # put in start order by `distinct_node_ids`
        joined = unmatched = 0
        if trace.logs:
            for span_id, events in trace.logs.items():
                if span_id in trace.nodes:
                    joined += len(events)
                else:
                    unmatched += len(events)
            if self.join_logs is not None:
                join = self.join_logs
                nodes = [join(n, trace.logs[n.span_id]) if n.span_id in trace.logs else n for n in nodes]
        return Assembled(
            trace.trace_id, distinct_node_ids(nodes), complete, reason, trace.messages, joined, unmatched
        )


class PendingOffsets:
    """Per partition, the offsets of consumed messages whose spans are not all persisted yet."""

    def __init__(self) -> None:
        self._refs: dict[MessageRef, int] = {}
        self._heaps: dict[tuple[str, int], list[int]] = {}
        self._next: dict[tuple[str, int], int] = {}

    def consumed(self, ref: MessageRef, holders: int) -> None:
        """A message was read; `holders` open traces now hold some of its spans (0: nothing pending)."""
        topic, partition, offset = ref
        key = (topic, partition)
        self._next[key] = max(self._next.get(key, 0), offset + 1)
        if holders:
            self._refs[ref] = self._refs.get(ref, 0) + holders
            heapq.heappush(self._heaps.setdefault(key, []), offset)

    def released(self, refs: set[MessageRef]) -> None:
        """One trace holding spans of these messages was persisted."""
        for ref in refs:
            count = self._refs.get(ref)
            if count is None:
                continue
            if count <= 1:
                del self._refs[ref]
            else:
                self._refs[ref] = count - 1

    def committable(self) -> dict[tuple[str, int], int]:
        """The offset to restart from, per partition: the oldest still-pending message, or past the last."""
        result = {}
        for key, next_offset in self._next.items():
            heap = self._heaps.get(key, [])
            while heap and (key[0], key[1], heap[0]) not in self._refs:
                heapq.heappop(heap)
            result[key] = heap[0] if heap else next_offset
        return result

    def forget_partitions(self, keys: set[tuple[str, int]]) -> None:
        """After a rebalance revoked these partitions."""
        for key in keys:
            self._next.pop(key, None)
            self._heaps.pop(key, None)
        self._refs = {ref: n for ref, n in self._refs.items() if (ref[0], ref[1]) not in keys}
