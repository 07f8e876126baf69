"""The TRAIL adapter on the real GAIA split: loading, OTLP round trip, splitting, feedback, Kafka."""

from __future__ import annotations

import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from cegraph.connectors.trail.labels import annotations_to_feedback, gold_labels
from cegraph.connectors.trail.model import TrailTrace, parse_duration, parse_timestamp
from cegraph.connectors.trail.otlp import iter_otlp_spans, span_id_bytes, trace_id_bytes
from cegraph.connectors.trail.pack import pack_requests, trail_to_otlp
from cegraph.connectors.trail.parse import TrailFormatError, iter_trail
from cegraph.connectors.trail.publish import publish_trail
from cegraph.connectors.trail.taxonomy import CATEGORY_VARIANTS, LEAF_CATEGORIES, TAXONOMY, fold_category
from cegraph.connectors.trail.trees import rebuild_span_trees, span_trees
from cegraph.schemas.feedback import Feedback

# Facts of the GAIA split, checked below.
MISSING_SPAN_TREES = {
    "6cc6dc35a28bbed6cfd873756094bc16",
    "860f9d45f2e50bfecb190bb26eff1f32",
    "915d2c66879657f694f88e0ed6f02cf5",
    "b241cb7deedf9646f01fa15095ed96d2",
}
KNOWN_UNMATCHED_LOCATIONS: set[tuple[str, str]] = set()  # every location names a span of its tree
SPELLING_VARIANTS = {
    "Context Handling Failure",
    "Goal deviation",
    " Incorrect Problem Identification",
    "Task Orchestration Errors",
    "Tool Selection",
}
# A few traces for the folder and Kafka tests: small ones, the trailing-comma annotation file, annotation
# files without `trace_id`, and one trace whose span tree is missing.
SAMPLE = (
    "0ebe673d64647ec44c370638b82d3c78",
    "5e5dc94e090341c564d582f551a0cddb",
    "a96c6811716c0473b86a23321db79c34",
    "6cc6dc35a28bbed6cfd873756094bc16",
)


@pytest.fixture(scope="session")
def dataset_path(trail_dataset: Path) -> Path:
    return trail_dataset


@pytest.fixture(scope="session")
def traces(dataset_path: Path) -> list[TrailTrace]:
    return list(iter_trail(dataset_path))


@pytest.fixture(scope="session")
def with_trees(traces: list[TrailTrace]) -> list[TrailTrace]:
    return [trace for trace in traces if trace.has_span_tree]


@pytest.fixture(scope="session")
def sample_folder(dataset_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SAMPLE traces extracted as a folder with the release's layout."""
    root = tmp_path_factory.mktemp("trail-sample")
    with tarfile.open(dataset_path) as archive:
        for member in archive:
            if member.isfile() and Path(member.name).stem in SAMPLE:
                target = root / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None
                target.write_bytes(source.read())
    return root


def _plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_plain(item) for item in value.array_value.values]
    return None if kind is None else getattr(value, kind)


def _renders(decoded: Any, source: str) -> bool:
    """Whether a typed OTLP value is what TRAIL's string said."""
    if isinstance(decoded, bool):
        return str(decoded).casefold() == source.casefold()
    if isinstance(decoded, list):
        return orjson.loads(source) == decoded
    return str(decoded) == source


def _span_keys(requests: list[ExportTraceServiceRequest]) -> Counter[tuple[str, str]]:
    return Counter(
        (span.trace_id.hex(), span.span_id.hex())
        for request in requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    )


# ---------------------------------------------------------------- loading


def test_dataset_facts(traces: list[TrailTrace], with_trees: list[TrailTrace]) -> None:
    assert len(traces) == 117
    assert {trace.trace_id for trace in traces if not trace.has_span_tree} == MISSING_SPAN_TREES
    assert len(with_trees) == 113
    assert all(trace.annotation_file for trace in traces)
    spans = [span for trace in with_trees for span, _ in trace.iter_spans()]
    assert len(spans) == 2944
    assert all(
        len(trace.trace_id) == 32 and trace_id_bytes(trace.trace_id).hex() == trace.trace_id
        for trace in traces
    )
    assert all(span_id_bytes(span.span_id).hex() == span.span_id for span in spans)
    assert all(len(trace.roots) == 1 for trace in with_trees)
    assert sum(len(trace.errors) for trace in traces) == 585
    assert sum(len(trace.errors) for trace in with_trees) == 547
    assert Counter(span.status_code for span in spans) == {0: 452, 1: 2205, 2: 287}
    assert sum(len(span.events) for span in spans) == 287


def test_every_category_folds_onto_a_leaf(traces: list[TrailTrace]) -> None:
    assert len(LEAF_CATEGORIES) == 20
    assert {root for root, _ in TAXONOMY.values()} == {
        "Reasoning Errors",
        "System Execution Errors",
        "Planning and Coordination Errors",
    }
    assert set(CATEGORY_VARIANTS.values()) <= set(LEAF_CATEGORIES)
    categories = Counter(error.category for trace in traces for error in trace.errors)
    unknown = sorted(name for name in categories if fold_category(name) is None)
    assert unknown == [], f"category strings that fold onto no TRAIL leaf: {unknown}"
    assert {name for name in categories if name not in TAXONOMY} == SPELLING_VARIANTS
    leaves = Counter(error.leaf for trace in traces for error in trace.errors)
    assert leaves["Context Handling Failures"] == 24 and leaves["Tool Selection Errors"] == 45
    assert "Rate Limiting" not in leaves  # the one leaf GAIA never uses


def test_annotation_locations_resolve(with_trees: list[TrailTrace]) -> None:
    unmatched = {
        (trace.trace_id, error.location)
        for trace in with_trees
        for error in trace.errors
        if error.location not in trace.span_ids()
    }
    assert unmatched == KNOWN_UNMATCHED_LOCATIONS
    assert sum(len(trace.errors) for trace in with_trees) - len(unmatched) == 547


def test_known_annotation_defects_are_repaired(traces: list[TrailTrace]) -> None:
    by_id = {trace.trace_id: trace for trace in traces}
    assert len(by_id["a96c6811716c0473b86a23321db79c34"].errors) > 0  # the trailing comma
    (split_text,) = [
        error for trace in traces for error in trace.errors if error.evidence.endswith("same output.")
    ]
    assert split_text.location == "eeee588b37492d71" and split_text.category == "Resource Abuse"
    assert split_text.description.startswith("The system initiated a fourth `web_search` call")
    assert "\nObservation: ...\nand then another Calling tools:" in split_text.evidence
    assert all(error.description for trace in traces for error in trace.errors)


def test_folder_and_tarball_load_the_same(sample_folder: Path, traces: list[TrailTrace]) -> None:
    from_folder = list(iter_trail(sample_folder))
    from_tar = [trace for trace in traces if trace.trace_id in SAMPLE]
    assert [trace.trace_id for trace in from_folder] == sorted(SAMPLE)
    exclude = {"span_file", "annotation_file"}
    assert [t.model_dump(exclude=exclude) for t in from_folder] == [
        t.model_dump(exclude=exclude) for t in from_tar
    ]


def test_bad_files_are_named(tmp_path: Path) -> None:
    spans = tmp_path / "data" / "GAIA"
    spans.mkdir(parents=True)
    broken = spans / "0123456789abcdef0123456789abcdef.json"
    broken.write_text('{"trace_id": "0123456789abcdef0123456789abcdef", "spans": [')
    with pytest.raises(TrailFormatError, match=rf"{broken}: not valid JSON"):
        list(iter_trail(tmp_path))
    span = {"span_id": "aa", "span_name": "x", "timestamp": "2025-03-19T16:32:08Z", "duration": "1 second"}
    broken.write_text(orjson.dumps({"trace_id": broken.stem, "spans": [span]}).decode())
    with pytest.raises(TrailFormatError, match=rf"{broken}: not a TRAIL file: spans.0.duration"):
        list(iter_trail(tmp_path))
    with pytest.raises(TrailFormatError, match="not a TRAIL-layout set"):
        list(iter_trail(tmp_path / "data"))
    with pytest.raises(TrailFormatError, match="not a TRAIL Other split"):
        list(iter_trail(tmp_path, split="Other"))
    with pytest.raises(FileNotFoundError):
        list(iter_trail(tmp_path / "nowhere.tar.gz"))


def test_trailing_commas_only_outside_strings(tmp_path: Path) -> None:
    folder = tmp_path / "processed_annotations_gaia"
    folder.mkdir()
    text = '{"errors": [{"category": "Goal deviation", "location": "x", "evidence": "a,]\\",}",},],}'
    (folder / "t1.json").write_text(text)
    (trace,) = iter_trail(tmp_path)
    assert trace.errors[0].evidence == 'a,]",}'
    assert trace.errors[0].leaf == "Goal Deviation"
    assert not trace.has_span_tree


@pytest.mark.parametrize(
    ("text", "nanoseconds"),
    [
        ("PT0.03179S", 31_790_000),
        ("PT1M48.75533S", 108_755_330_000),
        ("PT1H2M3.000000001S", 3_723_000_000_001),
        ("P1DT1S", 86_401_000_000_000),
        ("PT0S", 0),
    ],
)
def test_iso_8601_durations(text: str, nanoseconds: int) -> None:
    assert parse_duration(text) == nanoseconds


@pytest.mark.parametrize("text", ["P", "PT", "P1Y", "1S", "PT1.5", "P1DT"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_duration(text)


def test_timestamps_are_utc_nanoseconds() -> None:
    assert parse_timestamp("2025-03-19T16:32:08.062589Z") == 1_742_401_928_062_589_000
    assert parse_timestamp("2025-03-19T16:32:08.062589") == 1_742_401_928_062_589_000
    assert parse_timestamp("2025-03-19T17:32:08.062589+01:00") == 1_742_401_928_062_589_000
    assert parse_timestamp("1970-01-01T00:00:01.123456789Z") == 1_123_456_789


# ---------------------------------------------------------------- conversion


def test_round_trip_rebuilds_every_tree(with_trees: list[TrailTrace]) -> None:
    for trace in with_trees:
        requests = trail_to_otlp(trace)
        assert len(requests) == 1
        payloads = [request.SerializeToString() for request in requests]
        rebuilt = rebuild_span_trees(payloads)
        assert rebuilt == {trace.trace_id: span_trees(trace)}, trace.trace_id
        keys = _span_keys([ExportTraceServiceRequest.FromString(payload) for payload in payloads])
        assert set(keys) == {(trace.trace_id, span.span_id) for span, _ in trace.iter_spans()}
        assert set(keys.values()) == {1}


def test_spans_keep_attributes_status_events_and_resource(with_trees: list[TrailTrace]) -> None:
    typed: Counter[str] = Counter()
    for trace in with_trees:
        source = {span.span_id: span for span, _ in trace.iter_spans()}
        (request,) = trail_to_otlp(trace)
        for resource_spans in request.resource_spans:
            resource = {kv.key: _plain(kv.value) for kv in resource_spans.resource.attributes}
            assert resource["trail.trace_id"] == trace.trace_id
            assert resource["service.name"].endswith("/app:GAIA-Samples")
            for scope_spans in resource_spans.scope_spans:
                assert scope_spans.scope.name in ("patronus.sdk", "openinference.instrumentation.smolagents")
                for span in scope_spans.spans:
                    original = source[span.span_id.hex()]
                    assert span.kind == 1  # SPAN_KIND_INTERNAL
                    assert (span.status.code, span.status.message) == (
                        original.status_code,
                        original.status_message,
                    )
                    attributes = {kv.key: _plain(kv.value) for kv in span.attributes}
                    assert attributes.keys() == original.span_attributes.keys()
                    for key, value in attributes.items():
                        assert _renders(value, original.span_attributes[key]), (key, value)
                        if not isinstance(value, str):
                            typed[key.rsplit(".", 1)[0] if key.startswith("llm.token_count.") else key] += 1
                    for event, source_event in zip(span.events, original.events, strict=True):
                        assert (event.name, event.time_unix_nano) == (
                            source_event.name,
                            source_event.time_unix_nano,
                        )
                        event_attributes = {kv.key: _plain(kv.value) for kv in event.attributes}
                        assert isinstance(event_attributes["exception.escaped"], bool)
                        assert event_attributes["exception.type"] == source_event.attributes["exception.type"]
    assert typed == {"llm.token_count": 3 * 1391, "smolagents.max_steps": 162, "smolagents.tools_names": 162}


@pytest.mark.parametrize("limit", [900 * 1024, 256 * 1024])
def test_splitting_keeps_every_span_exactly_once(with_trees: list[TrailTrace], limit: int) -> None:
    messages = 0
    for trace in with_trees:
        requests = trail_to_otlp(trace, max_message_bytes=limit)
        payloads = [request.SerializeToString() for request in requests]
        assert all(len(payload) <= limit for payload in payloads)
        keys = _span_keys(requests)
        assert set(keys.values()) == {1} and len(keys) == sum(1 for _ in trace.iter_spans())
        assert rebuild_span_trees(payloads) == {trace.trace_id: span_trees(trace)}
        messages += len(requests)
    assert messages > len(with_trees)  # some traces really were split


def test_packing_across_traces(with_trees: list[TrailTrace]) -> None:
    limit = 900 * 1024
    spans = (item for trace in with_trees for item in iter_otlp_spans(trace))
    requests = list(pack_requests(spans, limit))
    assert all(request.ByteSize() <= limit for request in requests)
    assert any(len(request.resource_spans) > 1 for request in requests)
    keys = _span_keys(requests)
    assert set(keys.values()) == {1} and len(keys) == 2944
    assert rebuild_span_trees(requests) == {trace.trace_id: span_trees(trace) for trace in with_trees}


def test_a_span_over_the_limit_is_refused(with_trees: list[TrailTrace]) -> None:
    with pytest.raises(ValueError, match="over the 2000-byte message limit"):
        trail_to_otlp(with_trees[0], max_message_bytes=2000)
    with pytest.raises(ValueError, match="no span tree"):
        trail_to_otlp(TrailTrace(trace_id="x"))


def test_ids_that_are_not_hex_are_derived_and_kept() -> None:
    span = {
        "timestamp": "2025-03-19T16:32:08Z",
        "duration": "PT1S",
        "status_code": "Error",
        "service_name": "demo",
    }
    trace = TrailTrace.model_validate(
        {
            "trace_id": "run-1",
            "roots": [
                {
                    **span,
                    "span_id": "root",
                    "span_name": "agent",
                    "span_attributes": {
                        "llm.token_count.prompt": "0012",
                        "llm.token_count.completion": 7,
                        "nested": {"a": {"b": 1.5}, "flag": True, "none": None},
                        "messages": [{"role": "user"}, {"role": "assistant"}],
                        "tags": ["x", "y"],
                    },
                    "child_spans": [{**span, "span_id": "child", "span_name": "tool", "span_kind": "Client"}],
                }
            ],
            "errors": [
                {"category": "Tool-related", "location": "child", "impact": "HIGH"},
                {"category": "Goal Deviation", "location": "elsewhere", "impact": "LOW"},
            ],
        }
    )
    trace_bytes = trace_id_bytes("run-1")
    assert len(trace_bytes) == 16 and trace_bytes == trace_id_bytes("run-1")
    (request,) = trail_to_otlp(trace)
    root, child = request.resource_spans[0].scope_spans[0].spans
    assert root.trace_id == child.trace_id == trace_bytes
    assert child.parent_span_id == root.span_id == span_id_bytes("root")
    assert child.kind == 3 and root.status.code == 2
    assert {kv.key: _plain(kv.value) for kv in root.attributes} == {
        "llm.token_count.prompt": "0012",
        "llm.token_count.completion": 7,
        "nested.a.b": 1.5,
        "nested.flag": True,
        "messages.0.role": "user",
        "messages.1.role": "assistant",
        "tags": ["x", "y"],
        "trail.span_id": "root",
    }
    assert {kv.key: _plain(kv.value) for kv in child.attributes} == {"trail.span_id": "child"}
    resource = {kv.key: _plain(kv.value) for kv in request.resource_spans[0].resource.attributes}
    assert resource == {"service.name": "demo", "trail.trace_id": "run-1"}
    feedback = annotations_to_feedback(trace)
    assert [record["span_id"] for record in feedback] == [span_id_bytes("child").hex(), None]
    assert rebuild_span_trees([request]) == {trace_bytes.hex(): span_trees(trace)}


# ---------------------------------------------------------------- feedback


def test_annotations_become_feedback(with_trees: list[TrailTrace]) -> None:
    for trace in with_trees:
        records = annotations_to_feedback(trace)
        labels = gold_labels(trace)
        assert len(records) == len(labels) == len(trace.errors)
        for record, label, error in zip(records, labels, trace.errors, strict=True):
            Feedback.model_validate(record)
            assert record == {
                "trace_id": trace.trace_id,
                "span_id": error.location,
                "outcome": "failed",
                "score": None,
                "critique": "",
                "source": "trail-annotation",
            }
            assert (label.trace_id, label.span_id, label.category) == (
                trace.trace_id,
                error.location,
                error.category,
            )
            assert label.leaf in LEAF_CATEGORIES
        critiques = annotations_to_feedback(trace, with_critique=True)
        assert [record["critique"] for record in critiques] == [error.description for error in trace.errors]
        assert all(Feedback.model_validate(record) for record in critiques)


# ---------------------------------------------------------------- Kafka


def _consume(bootstrap: str, topic: str, count: int) -> list[Any]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    records: list[Any] = []
    deadline = time.monotonic() + 60
    try:
        while len(records) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


def test_publish_to_kafka_and_read_back(
    kafka_bootstrap: str, topic_name: str, sample_folder: Path, traces: list[TrailTrace]
) -> None:
    sample = [trace for trace in traces if trace.trace_id in SAMPLE and trace.has_span_tree]
    # Small enough that the trailing-comma trace goes over several messages.
    limit = max(item.span.ByteSize() for trace in sample for item in iter_otlp_spans(trace)) + 4096
    feedback_topic = f"{topic_name}-feedback"
    report = publish_trail(
        sample_folder,
        {"bootstrap_servers": kafka_bootstrap},
        topic_name,
        one_trace_per_message=True,
        max_message_bytes=limit,
        feedback_topic=feedback_topic,
        with_critique=True,
    )
    assert report.traces == 3 and report.missing_span_trees == ["6cc6dc35a28bbed6cfd873756094bc16"]
    assert report.spans == sum(1 for trace in sample for _ in trace.iter_spans())
    assert report.messages > report.traces
    assert report.feedback == sum(len(trace.errors) for trace in sample)

    messages = _consume(kafka_bootstrap, topic_name, report.messages)
    assert len(messages) == report.messages
    assert sum(len(message.value) for message in messages) == report.payload_bytes
    for message in messages:
        (trace_hex,) = rebuild_span_trees([message.value])
        assert message.key == trace_hex.encode()
    assert rebuild_span_trees(message.value for message in messages) == {
        trace.trace_id: span_trees(trace) for trace in sample
    }
    feedback = _consume(kafka_bootstrap, feedback_topic, report.feedback)
    expected = [record for trace in sample for record in annotations_to_feedback(trace, with_critique=True)]
    received = [orjson.loads(message.value) for message in feedback]
    assert sorted(received, key=orjson.dumps) == sorted(expected, key=orjson.dumps)


def test_publish_many_traces_per_message(kafka_bootstrap: str, topic_name: str, sample_folder: Path) -> None:
    report = publish_trail(sample_folder, {"bootstrap_servers": kafka_bootstrap}, topic_name, False)
    assert (report.traces, report.messages, report.feedback) == (3, 1, 0)
    (message,) = _consume(kafka_bootstrap, topic_name, 1)
    assert message.key is None
    assert len(rebuild_span_trees([message.value])) == 3
