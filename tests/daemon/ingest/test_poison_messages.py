"""Per-message isolation: whatever a message carries, it is dead-lettered alone or stored whole.

The payloads start from real SDK exports and are broken the ways issue 13 found (a span `name` that is
a number, a `status.message` that is not a string, an attribute nested hundreds deep), then fuzzed
with hypothesis over OTLP/JSON and protobuf structures. The neighbours of a bad message, in the same
batch, must always land; no flush may fail because of what a message said.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from otel_traces import ExpectedTrace, encode, make_traces
from pipeline_fixtures import FEEDBACK, IDLE, MAX_AGE, SPANS, Clock, Topics, pipeline_on
from poison import JSON_BREAKS, break_json, is_refused, malformed_payloads

from cegraph.daemon.ingest.pipeline import IngestPipeline
from cegraph.daemon.store import EventStore


def stored_spans(store: EventStore) -> set[tuple[str, str]]:
    return set(store.query("SELECT trace_id, span_id FROM nodes"))


def spans_of(trace: ExpectedTrace) -> set[tuple[str, str]]:
    return {(trace.trace_id, format(s.context.span_id, "016x")) for s in trace.spans}


def settle(pipeline: IngestPipeline, clock: Clock) -> None:
    clock.advance(MAX_AGE + IDLE)
    pipeline.flush()


@pytest.mark.parametrize("kind", sorted(JSON_BREAKS))
def test_each_kind_of_poison_is_refused_at_its_own_message(kind):
    (trace,) = make_traces(1, seed=3)
    payload = break_json(encode(trace.spans, "otlp_json"), kind, random.Random(1))
    assert is_refused(payload, "otlp_json")


@pytest.mark.parametrize("kind", sorted(JSON_BREAKS))
def test_a_poison_message_goes_to_the_dead_letter_topic_alone(tmp_path, kind):
    store = EventStore(tmp_path / "cegraph.duckdb")
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock, encoding="otlp_json")
    before, victim, after = make_traces(3, seed=5)
    poison = break_json(encode(victim.spans, "otlp_json"), kind, random.Random(2))
    batch = [topics.message(encode(before.spans, "otlp_json")), topics.message(poison),
             topics.message(encode(after.spans, "otlp_json"))]  # fmt: skip
    dead = pipeline.handle(batch)
    settle(pipeline, clock)
    assert [letter.message.offset for letter in dead] == [1]
    assert dead[0].reason and "\n" not in dead[0].reason
    assert stored_spans(store) == spans_of(before) | spans_of(after)
    assert store.stats()["dead_letters"] == 1
    assert store.offsets()[(SPANS, 0)] == 3, "the poison does not hold the partition back"
    store.close()


def test_a_thousand_malformed_messages_among_a_thousand_good_ones(tmp_path):
    """The issue's mix, in process: every good execution stored once, every bad message refused."""
    store = EventStore(tmp_path / "cegraph.duckdb")
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock, encoding="otlp_json")
    traces = make_traces(1_000, seed=11)
    good = [encode(t.spans, "otlp_json") for t in traces]
    bad = malformed_payloads(good, "otlp_json", 1_000, seed=12)
    stream = [(p, True) for p in good] + [(p, False) for p in bad]
    random.Random(13).shuffle(stream)
    messages = [topics.message(payload, partition=i % 3) for i, (payload, _) in enumerate(stream)]
    dead = []
    for start in range(0, len(messages), 50):
        dead += pipeline.handle(messages[start : start + 50])
        clock.advance(IDLE / 4)
        pipeline.flush()
    settle(pipeline, clock)
    bad_refs = {m.ref for m, (_, ok) in zip(messages, stream, strict=True) if not ok}
    assert {letter.message.ref for letter in dead} == bad_refs
    assert all(letter.reason for letter in dead)
    assert store.stats()["executions"]["total"] == 1_000
    assert stored_spans(store) == set().union(*(spans_of(t) for t in traces))
    assert store.stats()["dead_letters"] == 1_000
    store.close()


# ---------------------------------------------------------------- fuzzing

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
SPAN_FIELDS = [
    "name", "kind", "flags", "status", "startTimeUnixNano", "endTimeUnixNano", "traceId", "spanId",
    "parentSpanId", "attributes", "events", "links", "droppedAttributesCount", "traceState",
]  # fmt: skip


def _fresh_traces(seed: int) -> Iterator[ExpectedTrace]:
    """As many as hypothesis asks for (shrinking replays examples); SDK trace ids never repeat."""
    for round_ in itertools.count(seed * 1_000):
        yield from make_traces(20, seed=round_)


def _json_mutation(document: dict, target: str, value, index: int) -> None:
    span = document["resourceSpans"][0]["scopeSpans"][0]["spans"][index % 3]
    where = target
    if where == "attribute-value" and span.get("attributes"):
        span["attributes"][index % len(span["attributes"])]["value"] = value
    elif where == "attribute-key" and span.get("attributes"):
        span["attributes"][index % len(span["attributes"])]["key"] = value
    elif where == "status-message":
        span["status"] = {"code": 2, "message": value}
    elif where == "resource":
        document["resourceSpans"][0]["resource"] = value
    elif where == "span":
        document["resourceSpans"][0]["scopeSpans"][0]["spans"][index % 3] = value
    else:
        span[target] = value


@pytest.mark.parametrize("encoding", ["otlp_json"])
def test_fuzzed_otlp_json_is_refused_alone_or_stored_whole(tmp_path, encoding):
    store = EventStore(tmp_path / "cegraph.duckdb")
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock, encoding=encoding)
    traces = _fresh_traces(21)
    targets = [*SPAN_FIELDS, "attribute-value", "attribute-key", "status-message", "resource", "span"]

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(target=st.sampled_from(targets), value=JSON_VALUES, index=st.integers(0, 20))
    def check(target, value, index):
        neighbour, victim = next(traces), next(traces)
        document = orjson.loads(encode(victim.spans, encoding))
        _json_mutation(document, target, value, index)
        payload = json.dumps(document).encode()  # writes what orjson refuses to (ints past 64 bits)
        _refused_alone_or_stored_whole(pipeline, store, clock, topics, neighbour, payload, encoding)

    check()
    store.close()


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, by hand: messages deeper than the protobuf library will build."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _nested_any(depth: int) -> bytes:
    """AnyValue bytes nested `depth` levels: kvlist_value (6) > values (1) > KeyValue.value (2), and
    array_value (5) > values (1) in turn."""
    value = _field(1, b"bottom")  # string_value
    for level in range(depth):
        if level % 2:
            value = _field(5, _field(1, value))
        else:
            value = _field(6, _field(1, _field(1, b"k") + _field(2, value)))
    return value


def _with_attribute(request: ExportTraceServiceRequest, index: int, key: bytes, value: bytes) -> bytes:
    """The request with one more attribute on one span, spliced in as bytes (Span.attributes is 9): a
    second ResourceSpans holding that span replaces nothing, so the span is moved there."""
    spans = request.resource_spans[0].scope_spans[0].spans
    span = spans[index % len(spans)]
    moved = span.SerializeToString() + _field(9, _field(1, key) + _field(2, value))
    del spans[index % len(spans)]
    resource = request.resource_spans[0].resource.SerializeToString()
    extra = _field(1, resource) + _field(2, _field(2, moved))  # ResourceSpans: resource 1, scope_spans 2
    return request.SerializeToString() + _field(1, extra)


def test_fuzzed_otlp_protobuf_is_refused_alone_or_stored_whole(tmp_path):
    store = EventStore(tmp_path / "cegraph.duckdb")
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock, encoding="otlp_proto")
    traces = _fresh_traces(22)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        depth=st.integers(0, 300),
        text=st.text(max_size=300),
        flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
        index=st.integers(0, 20),
    )
    def check(depth, text, flips, index):
        neighbour, victim = next(traces), next(traces)
        request = ExportTraceServiceRequest()
        request.ParseFromString(encode(victim.spans, "otlp_proto"))
        for span in request.resource_spans[0].scope_spans[0].spans:
            span.name = text or span.name
            span.attributes.append(KeyValue(key=text, value=AnyValue(string_value=text * 50)))
        payload = bytearray(_with_attribute(request, index, b"nested", _nested_any(depth)))
        for position, byte in flips:
            payload[position % len(payload)] = byte
        payload = bytes(payload)
        _refused_alone_or_stored_whole(pipeline, store, clock, topics, neighbour, payload, "otlp_proto")

    check()
    store.close()


def _refused_alone_or_stored_whole(
    pipeline: IngestPipeline, store: EventStore, clock: Clock, topics: Topics,
    neighbour: ExpectedTrace, payload: bytes, encoding: str,
) -> None:  # fmt: skip
    before = stored_spans(store)
    message = topics.message(payload)
    dead = pipeline.handle([topics.message(encode(neighbour.spans, encoding)), message])
    settle(pipeline, clock)  # must not raise, whatever the payload was
    after = stored_spans(store)
    assert spans_of(neighbour) <= after, "a neighbour of the message was lost"
    if is_refused(payload, encoding):
        assert [letter.message.ref for letter in dead] == [message.ref]
    else:
        assert dead == []
        decoded = pipeline.decode(payload)
        assert {(r.trace_id, r.span_id) for r in decoded} <= after | before


# ---------------------------------------------------------------- feedback


def test_the_same_feedback_through_any_partition_is_counted_once(tmp_path):
    store = EventStore(tmp_path / "cegraph.duckdb")
    clock, topics = Clock(), Topics()
    pipeline = pipeline_on(store, clock)
    bodies = [
        orjson.dumps({"trace_id": f"{i:032x}", "outcome": "failed", "source": "user", "critique": f"bad {i}"})
        for i in range(1, 101)
    ]
    for partition in (0, 1, 0, 2):  # sent, re-sent, sent again elsewhere
        pipeline.handle([topics.message(body, topic=FEEDBACK, partition=partition) for body in bodies])
        pipeline.flush()
    assert store.stats()["feedback"] == 100
    assert store.query("SELECT count(*) FROM feedback")[0][0] == 100
    # another critique for the same execution is another signal
    pipeline.handle([topics.message(orjson.dumps(
        {"trace_id": f"{1:032x}", "outcome": "failed", "source": "user", "critique": "also slow"}
    ), topic=FEEDBACK)])  # fmt: skip
    pipeline.flush()
    assert store.stats()["feedback"] == 101
    store.close()
