"""Annotated trace sets for `cegraph eval-modes`: TRAIL-layout splits and a plain format of cegraph's own.

Both load into the same `AnnotatedSet`: decoded spans per trace, and human labels that each name a
span and a category. Categories are taken as given (surrounding and repeated whitespace and case
folded, so "Goal deviation" and "Goal Deviation" are one category); TRAIL's taxonomy mapping of
spelling variants onto its 20 leaves is an option (`taxonomy="trail"`).

The plain format (docs/modes.md): a folder with `labels.jsonl`, one JSON object a line with
`trace_id`, `span_id`, `category` and optionally `critique`, and the traces under `traces/`:
`*.json` files that are each an OTLP/JSON `ExportTraceServiceRequest` or a TRAIL span tree
(`{trace_id, spans}`), and `*.jsonl` files with one OTLP/JSON request a line (what the Collector's
file exporter writes). Ids are hex as in OTLP (TRAIL trees: their own ids).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ValidationError

from cegraph.connectors.otlp.codec import DecodeError, decode_json, decode_proto
from cegraph.connectors.trail.model import TrailTrace
from cegraph.connectors.trail.otlp import span_id_bytes, trace_id_bytes
from cegraph.connectors.trail.pack import trail_to_otlp
from cegraph.connectors.trail.parse import TrailFormatError, iter_trail, read_span_tree, resolve_split
from cegraph.connectors.trail.taxonomy import fold_category
from cegraph.daemon.spans import SpanRecord

Taxonomy = Literal["none", "trail"]
LABELS_FILE = "labels.jsonl"
TRACES_DIR = "traces"


class AnnotatedSetError(ValueError):
    """An annotated set that cannot be used; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class Label:
    trace_id: str  # hex, as the decoded spans have it
    span_id: str
    category: str
    critique: str = ""


@dataclass
class AnnotatedSet:
    name: str
    spans: dict[str, list[SpanRecord]] = field(default_factory=dict)  # hex trace id -> its spans
    labels: list[Label] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why some traces or labels were left out

    @property
    def has_critiques(self) -> bool:
        return any(label.critique for label in self.labels)


def category_of(name: str, taxonomy: Taxonomy) -> str:
    """The category a label names: as given (whitespace and case folded), or its TRAIL leaf."""
    if taxonomy == "trail":
        leaf = fold_category(name)
        if leaf is not None:
            return leaf
    return " ".join(name.split()).casefold()


def _hex_ids(trace_id: str, span_id: str) -> tuple[str, str]:
    return trace_id_bytes(trace_id).hex(), span_id_bytes(span_id).hex()


def _tree_spans(trace: TrailTrace) -> list[SpanRecord]:
    return [
        record for request in trail_to_otlp(trace) for record in decode_proto(request.SerializeToString())
    ]


def load_trail(path: Path, split: str | None, taxonomy: Taxonomy) -> AnnotatedSet:
    split = resolve_split(path, split)
    annotated = AnnotatedSet(f"{path.name} ({split})")
    for trace in iter_trail(path, split=split):
        if not trace.has_span_tree:
            annotated.skipped.append(f"trace {trace.trace_id}: no span tree")
            continue
        records = _tree_spans(trace)
        annotated.spans[records[0].trace_id] = records
        known = trace.span_ids()
        for error in trace.errors:
            if error.location not in known:
                annotated.skipped.append(f"trace {trace.trace_id}: location {error.location!r} names no span")
                continue
            trace_hex, span_hex = _hex_ids(trace.trace_id, error.location)
            category = category_of(error.category, taxonomy)
            annotated.labels.append(Label(trace_hex, span_hex, category, error.description))
    return annotated


class _LabelLine(BaseModel):
    trace_id: str
    span_id: str
    category: str
    critique: str = ""


def _trace_files(folder: Path) -> Iterator[tuple[str, bytes]]:
    """(display name, one JSON document) for every trace document under `folder`."""
    for file in sorted(folder.rglob("*.json*")):
        if file.suffix == ".json":
            yield str(file), file.read_bytes()
        elif file.suffix == ".jsonl":
            for number, line in enumerate(file.read_bytes().splitlines(), start=1):
                if line.strip():
                    yield f"{file}:{number}", line


def _records_of(name: str, raw: bytes) -> list[SpanRecord]:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise AnnotatedSetError(f"{name}: not valid JSON: {error}") from None
    if isinstance(document, dict) and "spans" in document and "resourceSpans" not in document:
        return _tree_spans(read_span_tree(name, raw))
    if isinstance(document, dict) and ("resourceSpans" in document or "resource_spans" in document):
        try:
            return decode_json(raw)
        except DecodeError as error:
            raise AnnotatedSetError(f"{name}: not OTLP/JSON: {error}") from None
    raise AnnotatedSetError(f"{name}: neither an OTLP/JSON request (resourceSpans) nor a TRAIL span tree")


def load_plain(path: Path, taxonomy: Taxonomy) -> AnnotatedSet:
    labels_file, traces = path / LABELS_FILE, path / TRACES_DIR
    if not labels_file.is_file() or not traces.is_dir():
        raise AnnotatedSetError(f"{path}: needs {LABELS_FILE} and a {TRACES_DIR}/ folder (the plain format)")
    annotated = AnnotatedSet(path.name)
    for name, raw in _trace_files(traces):
        for record in _records_of(name, raw):
            annotated.spans.setdefault(record.trace_id, []).append(record)
    for number, line in enumerate(labels_file.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed = _LabelLine.model_validate(orjson.loads(line))
        except (orjson.JSONDecodeError, ValidationError) as error:
            reason = str(error).splitlines()[0] if isinstance(error, orjson.JSONDecodeError) else (
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:3])
            )  # fmt: skip
            raise AnnotatedSetError(f"{labels_file}:{number}: not a label: {reason}") from None
        trace_hex, span_hex = _hex_ids(parsed.trace_id.strip(), parsed.span_id.strip())
        if not parsed.category.strip():
            annotated.skipped.append(f"{labels_file}:{number}: empty category")
            continue
        category = category_of(parsed.category, taxonomy)
        annotated.labels.append(Label(trace_hex, span_hex, category, parsed.critique))
    return annotated


def load_annotated(path: Path, *, split: str | None = None, taxonomy: Taxonomy = "none") -> AnnotatedSet:
    """A TRAIL-layout split (a `.tar.gz` or folder with `data/<split>/`) or a plain-format folder."""
    if not path.exists():
        raise AnnotatedSetError(f"no dataset at {path}")
    try:
        if path.is_dir() and (path / LABELS_FILE).exists():
            return load_plain(path, taxonomy)
        return load_trail(path, split, taxonomy)
    except (TrailFormatError, OSError) as error:
        raise AnnotatedSetError(str(error)) from None
