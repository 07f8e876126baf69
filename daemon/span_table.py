"""Spans as the span table's columns: what ingest normalizes into, assembles and stores, with no
Python object per span on the way.

`SpanColumns` is one Arrow table of `Node`'s fields (a batch's spans, or a flush's executions) with
the few columns assembly reads kept as Python lists; `SpanRows` is a stretch of one, which an
event carries instead of a list of nodes. Node objects are built only for a consumer that needs
them (the detector, a log record's join), once per table.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, overload

import numpy as np
import orjson
import pyarrow as pa

from cegraph.daemon.spans import Evaluation, Node

NODE_FIELDS = [f.name for f in fields(Node)]
_ARROW_TYPES = {
    "int": pa.int64(), "int | None": pa.int64(), "bool": pa.bool_(), "list[str]": pa.list_(pa.string())
}  # fmt: skip
# `Node`'s fields as `event_spans` declares them (evaluations as JSON): conversion never guesses a
# type from the values, so a batch converts exactly when every value is typed as `Node` says.
NODE_SCHEMA = pa.schema(
    [(f.name, pa.string() if f.name == "evaluations" else _ARROW_TYPES.get(str(f.type), pa.string()))
     for f in fields(Node)]
)  # fmt: skip
SPAN_SCHEMA = pa.schema([("seq", pa.int64()), ("amended", pa.bool_()), *NODE_SCHEMA])
_GETTERS = [operator.attrgetter(name) for name in NODE_FIELDS]


def evaluations_json(evaluations: list[Evaluation]) -> str:
    return orjson.dumps(evaluations).decode() if evaluations else "[]"


def evaluations_from_json(text: str | None) -> list[Evaluation]:
    return [Evaluation(**e) for e in orjson.loads(text or "[]")]


class SpanColumns:
    """Spans as columns of `NODE_SCHEMA`, in a table; `column(name)` as a Python list, made once."""

    __slots__ = ("_lists", "_nodes", "table")

    def __init__(self, table: pa.Table, lists: dict[str, list[Any]] | None = None) -> None:
        self.table = table
        self._lists = dict(lists or {})
        self._nodes: list[Node] | None = None

    @classmethod
    def of(cls, columns: dict[str, list[Any]]) -> SpanColumns:
        """From every field's values, a list each (`evaluations` as JSON)."""
        table = pa.table([pa.array(columns[f.name], f.type) for f in NODE_SCHEMA], schema=NODE_SCHEMA)
        return cls(table, columns)

    @classmethod
    def from_nodes(cls, nodes: list[Node]) -> SpanColumns:
        """The columns of nodes already made (the per-span path, a log record's join): a getter per
        column, no row tuples to transpose."""
        columns = {name: list(map(get, nodes)) for name, get in zip(NODE_FIELDS, _GETTERS, strict=True)}
        columns["evaluations"] = [evaluations_json(e) for e in columns["evaluations"]]
        made = cls.of(columns)
        made._nodes = nodes
        return made

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> list[Any]:
        values = self._lists.get(name)
        if values is None:
            values = self._lists[name] = self.table.column(name).to_pylist()
        return values

    def nodes(self) -> list[Node]:
        """A node per row, built once, for the consumers that read objects."""
        if self._nodes is None:
            columns = [self.column(name) for name in NODE_FIELDS]
            at = NODE_FIELDS.index("evaluations")
            columns[at] = [[] if e == "[]" else evaluations_from_json(e) for e in columns[at]]
            self._nodes = list(map(Node, *columns))
        return self._nodes

    def take(self, rows: list[int], node_ids: list[str]) -> SpanColumns:
        """These rows, in this order, with these node ids."""
        table = self.table.take(pa.array(rows, pa.int64()))
        at = NODE_SCHEMA.get_field_index("node_id")
        return SpanColumns(table.set_column(at, NODE_SCHEMA.field(at), pa.array(node_ids, pa.string())))


def gather(parts: list[tuple[SpanColumns, int]], node_ids: list[str]) -> SpanColumns:
    """One table of rows of several tables (each row as (table, row)), in order, with these node ids."""
    offsets: dict[int, int] = {}
    sources: list[pa.Table] = []
    for columns, _ in parts:
        if id(columns) not in offsets:
            offsets[id(columns)] = sum(len(t) for t in sources)
            sources.append(columns.table)
    combined = SpanColumns(pa.concat_tables(sources) if len(sources) > 1 else sources[0])
    return combined.take([offsets[id(columns)] + row for columns, row in parts], node_ids)


@dataclass(frozen=True, slots=True)
class SpanRows(Sequence[Node]):
    """Rows `start`..`stop` of a `SpanColumns`: one execution's spans, as an event carries them."""

    columns: SpanColumns
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    @overload
    def __getitem__(self, index: int) -> Node: ...
    @overload
    def __getitem__(self, index: slice) -> list[Node]: ...
    def __getitem__(self, index: int | slice) -> Node | list[Node]:
        return self.columns.nodes()[self.start : self.stop][index]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.columns.nodes()[self.start : self.stop])

    def by_trace(self) -> list[tuple[str, list[int]]]:
        """The rows by trace id, in order of each trace's first row."""
        trace_ids = self.columns.column("trace_id")
        if self.start < self.stop and len(set(trace_ids[self.start : self.stop])) == 1:
            return [(trace_ids[self.start], list(range(self.start, self.stop)))]  # the common case
        groups: dict[str, list[int]] = {}
        for row in range(self.start, self.stop):
            rows = groups.get(trace_ids[row])
            if rows is None:
                groups[trace_ids[row]] = [row]
            else:
                rows.append(row)
        return list(groups.items())


def span_table(carried: list[tuple[int, bool, Sequence[Node]]]) -> pa.Table | None:
    """The span rows of span-carrying events ((seq, amended, nodes) each): `event_spans`' bulk part.

    Rows an event carries as `SpanRows` are sliced from their table (neighbours of one table in one
    slice); nodes given as objects become columns a run of events at a time.
    """
    pieces: list[pa.Table] = []
    nodes: list[Node] = []
    run: list[Any] = []  # [columns, start, stop] of the slice being extended
    for _, _, spans in carried:
        if isinstance(spans, SpanRows):
            if nodes:
                pieces.append(SpanColumns.from_nodes(nodes).table)
                nodes = []
            if run and run[0] is spans.columns and run[2] == spans.start:
                run[2] = spans.stop
                continue
            if run:
                pieces.append(run[0].table.slice(run[1], run[2] - run[1]))
            run = [spans.columns, spans.start, spans.stop]
        else:
            if run:
                pieces.append(run[0].table.slice(run[1], run[2] - run[1]))
                run = []
            nodes.extend(spans)
    if run:
        pieces.append(run[0].table.slice(run[1], run[2] - run[1]))
    if nodes:
        pieces.append(SpanColumns.from_nodes(nodes).table)
    if not pieces:
        return None
    table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    counts = [len(spans) for _, _, spans in carried]
    seq = pa.array(np.repeat([seq for seq, _, _ in carried], counts), pa.int64())
    amended = pa.array(np.repeat([amended for _, amended, _ in carried], counts), pa.bool_())
    return table.add_column(0, SPAN_SCHEMA.field("amended"), amended).add_column(
        0, SPAN_SCHEMA.field("seq"), seq
    )
