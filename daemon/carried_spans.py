"""The nodes of the executions this process just appended, kept by event seq until their reader takes
them: the detector (or the failures publisher) reads an execution a moment after ingest committed it,
and rebuilding its nodes from the span log cost more than everything else ingest does per span.

Only a shortcut: a seq not here (taken already, pushed out, or written before a restart) is read from
the span log, which holds the same nodes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from cegraph.daemon.spans import Node

# A bound, not a working size: a reader takes each flush's nodes right after it, so this holds about
# one flush; it only fills while no reader runs in this process (then the oldest go first).
MAX_CARRIED_NODES = 50_000


class CarriedSpans:
    def __init__(self, max_nodes: int = MAX_CARRIED_NODES) -> None:
        self.max_nodes = max_nodes
        self._by_seq: OrderedDict[int, list[Node]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        """Nodes held."""
        return self._count

    def add(self, carried: Iterable[tuple[int, list[Node]]]) -> None:
        """Keep each event's nodes (appended in seq order) and drop the oldest past the bound."""
        for seq, nodes in carried:
            self._by_seq[seq] = nodes
            self._count += len(nodes)
        while self._count > self.max_nodes:
            self._count -= len(self._by_seq.popitem(last=False)[1])

    def take(self, seqs: Iterable[int]) -> tuple[dict[int, list[Node]], list[int]]:
        """The nodes held of `seqs` (no longer held after), and the seqs not held."""
        found: dict[int, list[Node]] = {}
        missing: list[int] = []
        for seq in seqs:
            nodes = self._by_seq.pop(seq, None)
            if nodes is None:
                missing.append(seq)
            else:
                found[seq] = nodes
                self._count -= len(nodes)
        return found, missing

    def clear(self) -> None:
        self._by_seq.clear()
        self._count = 0
