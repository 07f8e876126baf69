"""Reading a TRAIL-layout set from disk: a `.tar.gz` or its extracted folder.

Layout: `data/<split>/<trace_id>.json` and `processed_annotations_<split>/<trace_id>.json`. Known
defects handled here: a trailing comma in one annotation file, annotation files without `trace_id`
(the file name is the id), and span trees left out of the release (`TrailTrace.has_span_tree` is false
for those). Category spelling variants and the annotation whose text was split into stray keys are
handled by the models (`taxonomy.py`, `model.py`).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, Field, ValidationError

from cegraph.connectors.trail.model import TrailError, TrailSpan, TrailTrace


class _SpanFile(BaseModel):
    trace_id: str
    spans: list[TrailSpan]


class _AnnotationFile(BaseModel):
    trace_id: str | None = None
    errors: list[TrailError] = Field(default_factory=list)
    scores: list[dict[str, Any]] = Field(default_factory=list)


_Model = TypeVar("_Model", bound=BaseModel)


class TrailFormatError(ValueError):
    """A TRAIL file that cannot be read; the message names the file."""


def _without_trailing_commas(text: str) -> str:
    """Drop commas that directly precede `}` or `]` outside strings (one gold file has one)."""
    out: list[str] = []
    after_comma: list[str] | None = None  # whitespace seen since a comma outside strings
    in_string = escaped = False
    for char in text:
        if in_string:
            out.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if after_comma is not None:
            if char.isspace():
                after_comma.append(char)
                continue
            if char not in "}]":
                out.append(",")
            out.extend(after_comma)
            after_comma = None
        if char == ",":
            after_comma = []
            continue
        in_string = char == '"'
        out.append(char)
    if after_comma is not None:
        out.append(",")
        out.extend(after_comma)
    return "".join(out)


def _load_json(name: str, raw: bytes, *, lenient: bool) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if lenient:
            try:
                return orjson.loads(_without_trailing_commas(raw.decode("utf-8")))
            except (orjson.JSONDecodeError, UnicodeDecodeError):
                pass
        raise TrailFormatError(f"{name}: not valid JSON: {error}") from None


def _validate(model: type[_Model], name: str, data: Any) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc'])) or '<file>'}: {problem['msg']}"
            for problem in error.errors()[:5]
        )
        raise TrailFormatError(f"{name}: not a TRAIL file: {problems}") from None


def read_span_tree(name: str, raw: bytes) -> TrailTrace:
    """One TRAIL span-tree file (`{trace_id, spans}`) on its own, without annotations."""
    parsed = _parse_span_file(name, raw, None)
    return TrailTrace(trace_id=parsed.trace_id, roots=parsed.spans, span_file=name)


def _parse_span_file(name: str, raw: bytes, stem: str | None) -> _SpanFile:
    parsed = _validate(_SpanFile, name, _load_json(name, raw, lenient=False))
    if stem is not None and parsed.trace_id != stem:
        raise TrailFormatError(f"{name}: trace_id {parsed.trace_id!r} differs from the file name")
    tree = TrailTrace(trace_id=parsed.trace_id, roots=parsed.spans)
    for span, parent in tree.iter_spans():
        if span.trace_id not in (None, parsed.trace_id):
            raise TrailFormatError(f"{name}: span {span.span_id} has trace_id {span.trace_id!r}")
        if parent is not None and span.parent_span_id not in (None, parent.span_id):
            raise TrailFormatError(
                f"{name}: span {span.span_id} names parent {span.parent_span_id} but is nested under "
                f"{parent.span_id}"
            )
    return parsed


def _parse_annotation_file(name: str, raw: bytes, stem: str) -> _AnnotationFile:
    parsed = _validate(_AnnotationFile, name, _load_json(name, raw, lenient=True))
    if parsed.trace_id not in (None, stem):
        raise TrailFormatError(f"{name}: trace_id {parsed.trace_id!r} differs from the file name")
    return parsed


def _annotation_dir(split: str) -> str:
    return "processed_annotations_" + "_".join(split.lower().split())


def _classify(parts: tuple[str, ...], split: str) -> str | None:
    """'spans', 'annotations' or None for a member path of the dataset."""
    if len(parts) < 2 or not parts[-1].endswith(".json"):
        return None
    if len(parts) >= 3 and parts[-3] == "data" and parts[-2] == split:
        return "spans"
    if parts[-2] == _annotation_dir(split):
        return "annotations"
    return None


def _collect(path: Path, split: str) -> dict[str, dict[str, tuple[str, Callable[[], bytes]]]]:
    """Per kind, trace id -> (display name, reader). A tarball is read in one pass; a folder lazily."""
    found: dict[str, dict[str, tuple[str, Callable[[], bytes]]]] = {"spans": {}, "annotations": {}}
    if path.is_dir():
        for file in path.rglob("*.json"):
            kind = _classify(file.relative_to(path).parts, split)
            if kind is not None:
                found[kind][file.stem] = (str(file), file.read_bytes)
        return found
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                kind = _classify(tuple(member.name.split("/")), split) if member.isfile() else None
                extracted = archive.extractfile(member) if kind else None
                if kind and extracted is not None:
                    data = extracted.read()
                    found[kind][Path(member.name).stem] = (f"{path}:{member.name}", lambda data=data: data)
    except (tarfile.TarError, OSError) as error:
        raise TrailFormatError(f"{path}: not a TRAIL folder or readable tar archive: {error}") from None
    return found


def _member_names(path: Path) -> Iterator[tuple[str, ...]]:
    if path.is_dir():
        yield from (file.relative_to(path).parts for file in path.rglob("*.json"))
        return
    try:
        with tarfile.open(path, "r:*") as archive:
            yield from (tuple(m.name.split("/")) for m in archive if m.isfile() and m.name.endswith(".json"))
    except (tarfile.TarError, OSError) as error:
        raise TrailFormatError(f"{path}: not a TRAIL folder or readable tar archive: {error}") from None


def trail_splits(path: str | Path) -> list[str]:
    """The splits of a TRAIL-layout set: every `data/<split>/` that holds span files, else (a set of
    annotations only) every `processed_annotations_<split>/`."""
    names = list(_member_names(Path(path)))
    found = {parts[-2] for parts in names if len(parts) >= 3 and parts[-3] == "data"}
    prefix = "processed_annotations_"
    annotated = {
        parts[-2].removeprefix(prefix) for parts in names if parts[-2:-1] and parts[-2].startswith(prefix)
    }
    return sorted(found or annotated)


def resolve_split(path: str | Path, split: str | None) -> str:
    """The split to read: `split` when given, else the only one the set has."""
    if split is not None:
        return split
    found = trail_splits(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise TrailFormatError(
            f"{path}: no data/<split>/*.json nor processed_annotations_<split>/*.json: not a TRAIL-layout set"
        )
    raise TrailFormatError(f"{path}: several splits ({', '.join(found)}): choose one with --split")


def iter_trail(path: str | Path, *, split: str | None = None) -> Iterator[TrailTrace]:
    """Every trace of a TRAIL split (a `.tar.gz` or an extracted folder), by trace id.

    `split` names the `data/<split>/` folder (its annotations are in `processed_annotations_<split>/`,
    lower case); without it the set must have exactly one split. A trace with annotations but no span
    tree is still yielded, with `has_span_tree` false, so callers can report it; a trace with a span
    tree and no annotation file has no errors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"TRAIL dataset not found: {path}")
    split = resolve_split(path, split)
    found = _collect(path, split)
    if not found["spans"] and not found["annotations"]:
        raise TrailFormatError(
            f"{path}: no data/{split}/*.json nor {_annotation_dir(split)}/*.json: not a TRAIL {split} split"
        )
    for trace_id in sorted(found["spans"].keys() | found["annotations"].keys()):
        span_name, read_spans = found["spans"].get(trace_id, (None, None))
        annotation_name, read_annotations = found["annotations"].get(trace_id, (None, None))
        tree = _parse_span_file(span_name, read_spans(), trace_id) if span_name and read_spans else None
        annotations = (
            _parse_annotation_file(annotation_name, read_annotations(), trace_id)
            if annotation_name and read_annotations
            else _AnnotationFile()
        )
        yield TrailTrace(
            trace_id=trace_id,
            roots=tree.spans if tree else [],
            errors=annotations.errors,
            scores=annotations.scores,
            span_file=span_name,
            annotation_file=annotation_name,
        )
