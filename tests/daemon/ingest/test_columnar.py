"""The columnar hot path (ptars decode, `normalize_columns`) against the per-span reference path.

Spans are recorded with the real OpenTelemetry SDK and encoded by its OTLP encoder, with attributes,
events, statuses, nesting and resources drawn by hypothesis from what `normalize` reads (values of
every type the SDK sends, texts to redact or cut, repeated and flattened keys) and from what it
ignores. Batches mix them with messages that must be dead-lettered. The two paths must give the same
nodes, the same dead-letter reasons, the same stored spans and executions, and hand the detector the
same nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.trace import Status, StatusCode, Tracer
from otel_traces import encode, record_spans
from pipeline_fixtures import Clock, reference_decode

from cegraph.connectors.otlp.codec import decode_proto
from cegraph.daemon.ingest.normalize import EVENT_KEYS, RESOURCE_KEYS, SPAN_KEYS, TextPolicy
from cegraph.daemon.ingest.pipeline import IngestPipeline, InMessage, batch_nodes, message_nodes
from cegraph.daemon.settings import IngestSettings
from cegraph.daemon.spans import Node
from cegraph.daemon.store import EventStore

MESSAGE_KEYS = [
    f"llm.{side}_messages.{i}.message.{field}"
    for side in ("input", "output")
    for i in (0, 1, 10)
    for field in ("content", "role", "tool_calls.0.tool_call.function.name")
]
KEYS = sorted(SPAN_KEYS) + MESSAGE_KEYS + ["http.method", "llm.token_count.total", "x"]
TEXTS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "",
            "ask me at a@b.com",
            "call +1 555 123 4567",
            "sk-" + "a" * 20,
            "a" * 90,
            '{"model": "m-2"}',
            '{"choices": [{"message": {"refusal": "no"}}]}',
            "<class 'openai.RateLimitError'>",
            "length",
            "stop",
            "tool",
            "LLM",
            "evaluator",
            "EVALUATOR",
            "chat",
            "fail",
            "١٢٣ ٤٥٦",
        ]
    ),
)
SCALARS = st.one_of(
    TEXTS, st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True)
)
VALUES = st.one_of(
    SCALARS,
    st.lists(TEXTS, max_size=3),
    st.lists(st.integers(-5, 5), max_size=3),
    st.lists(st.booleans(), max_size=2),
)
INT_KEYS = ["gen_ai.usage.input_tokens", "llm.token_count.completion", "cegraph.seed"]
FINISH_KEYS = ["gen_ai.response.finish_reasons", "llm.finish_reason"]
TEXT_KEYS = sorted(SPAN_KEYS - {*INT_KEYS, *FINISH_KEYS})
# Half the spans with the types the conventions use (settled on columns), half with anything.
TYPED = st.builds(
    lambda *parts: {k: v for part in parts for k, v in part.items()},
    st.dictionaries(st.sampled_from(TEXT_KEYS), TEXTS, max_size=5),
    st.dictionaries(st.sampled_from(INT_KEYS), st.integers(-(2**63), 2**63 - 1), max_size=2),
    st.dictionaries(st.sampled_from(FINISH_KEYS), st.one_of(TEXTS, st.lists(TEXTS, max_size=2)), max_size=1),
)
ATTRIBUTES = st.one_of(TYPED, st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["exception", "gen_ai.evaluation.result", "log"]),
        st.dictionaries(st.sampled_from([*sorted(EVENT_KEYS), "other"]), VALUES, max_size=4),
    ),
    max_size=3,
)
STATUS = st.sampled_from(
    [None, (StatusCode.OK, None), (StatusCode.ERROR, None), (StatusCode.ERROR, "x@y.org")]
)


@st.composite
def span_trees(draw: Any, depth: int = 0) -> dict[str, Any]:
    children = draw(st.lists(span_trees(depth + 1), max_size=2)) if depth < 2 else []
    return {
        "name": draw(st.sampled_from(["chat", "chat", "tool", "invoke_workflow"])),
        "attributes": draw(ATTRIBUTES),
        "events": draw(EVENTS),
        "status": draw(STATUS),
        "children": children,
    }


def record(tree: dict[str, Any], resource: dict[str, Any]) -> list:
    def emit(tracer: Tracer, node: dict[str, Any]) -> None:
        with tracer.start_as_current_span(node["name"], attributes=node["attributes"]) as span:
            for name, attributes in node["events"]:
                span.add_event(name, attributes)
            if node["status"] is not None:
                span.set_status(Status(*node["status"]))
            for child in node["children"]:
                emit(tracer, child)

    return record_spans(lambda tracer: emit(tracer, tree), resource=resource)


RESOURCES = st.dictionaries(st.sampled_from([*sorted(RESOURCE_KEYS), "host.name"]), SCALARS, max_size=3)
BROKEN = [b"\x0a\xff\xff", b"not protobuf at all", b""]


@st.composite
def batches(draw: Any) -> tuple[list[bytes], TextPolicy]:
    """Several exports (a trace each, or one split over two messages) and maybe a broken message."""
    payloads = []
    for _ in range(draw(st.integers(1, 3))):
        spans = record(draw(span_trees()), draw(RESOURCES))
        cut = draw(st.integers(0, len(spans) - 1))
        payloads += [encode(part, "otlp_proto") for part in (spans[:cut], spans[cut:]) if part]
    if draw(st.booleans()):
        payloads.insert(draw(st.integers(0, len(payloads))), draw(st.sampled_from(BROKEN)))
    policy = TextPolicy(max_chars=draw(st.sampled_from([24, 4_000])), redact=draw(st.booleans()))
    return payloads, policy


def outcome(result: Sequence[Node] | Exception) -> list[Node] | str:
    return f"{type(result).__name__}: {result}" if isinstance(result, Exception) else list(result)


def reference(payload: bytes, policy: TextPolicy) -> list[Node] | str:
    try:
        return message_nodes(payload, decode_proto, policy)
    except Exception as error:
        return outcome(error)


# The SDK draws span ids from `random`, which hypothesis seeds: deterministic, as it wants.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_the_columnar_path_makes_the_reference_nodes(batch):
    payloads, policy = batch
    columnar = [outcome(result) for result in batch_nodes(payloads, decode_proto, policy)]
    assert columnar == [reference(payload, policy) for payload in payloads]


def stored(store: EventStore) -> tuple[list, list, list, dict]:
    """What is stored, and what the detector is handed (from memory: the nodes ingest just carried)."""
    seqs = [seq for (seq,) in store.query("SELECT seq FROM events WHERE type = 'ExecutionCompleted'")]
    carried = len(store.carried)
    handed = store.execution_nodes(seqs)
    assert len(store.carried) == 0 and carried == sum(map(len, handed.values())), "all from memory"
    return (
        store.query("SELECT * FROM nodes ORDER BY seq, trace_id, span_id"),
        store.query("SELECT * FROM executions ORDER BY seq"),
        store.query("SELECT type, key, payload FROM events ORDER BY seq"),
        handed,
    )


def ingest(path, decode, payloads: list[bytes]) -> tuple[list, list, list, dict]:
    store = EventStore(path)
    clock = Clock()
    pipeline = IngestPipeline(
        store, decode, IngestSettings(idle_timeout_s=1), spans_topic="spans", feedback_topic="fb", clock=clock
    )
    pipeline.handle([InMessage("spans", 0, offset, payload) for offset, payload in enumerate(payloads)])
    clock.advance(100)
    pipeline.flush()
    try:
        return stored(store)
    finally:
        store.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batches())
def test_the_columnar_path_stores_the_reference_spans_and_executions(tmp_path_factory, batch):
    payloads, _ = batch
    folder = tmp_path_factory.mktemp("columnar")
    columnar = ingest(folder / "columnar.duckdb", decode_proto, payloads)
    assert columnar[0], "some spans are stored"
    assert columnar == ingest(folder / "reference.duckdb", reference_decode, payloads)
