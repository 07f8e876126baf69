"""Log records of the logs topic joined to their spans, through the ingest stage with an explicit clock.

Spans and log records are made by the real SDK (a record emitted inside a span carries its trace and
span id, as the GenAI instrumentations' are) and encoded as the Collector's kafkaexporter writes them.
"""

from __future__ import annotations

import base64
import json

import orjson
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pipeline_fixtures import FEEDBACK, SPANS, Clock, Topics

from cegraph.connectors.otlp.codec import decode_logs_json, decode_logs_proto, decoder_for, logs_decoder_for
from cegraph.daemon.detect.failures import label_failures
from cegraph.daemon.ingest.pipeline import IngestPipeline
from cegraph.daemon.metrics import IngestMetrics
from cegraph.daemon.settings import IngestSettings
from cegraph.daemon.store import EventStore, node_from_row

LOGS = "otlp_logs"
IDLE = 2.0
DETAILS = "gen_ai.client.inference.operation.details"


def message(role: str, text: str) -> dict:
    return {"role": role, "parts": [{"type": "text", "content": text}]}


def recorded(*, evaluate: bool = True, lost_span: bool = False):
    """One execution: a root and a chat span whose content and verdict went to log records; with
    `lost_span`, also a record of a span that is not among the spans sent."""
    spans, logs = InMemorySpanExporter(), InMemoryLogRecordExporter()
    tracer_provider = TracerProvider(resource=Resource.create({"service.name": "support-bot"}))
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    tracer, logger = tracer_provider.get_tracer("app"), logger_provider.get_logger("app")
    with tracer.start_as_current_span("support-bot", attributes={"gen_ai.operation.name": "invoke_workflow"}):
        with tracer.start_as_current_span("chat stub-model", attributes={"gen_ai.operation.name": "chat"}):
            logger.emit(
                event_name=DETAILS,
                attributes={
                    "gen_ai.request.model": "stub-model",
                    "gen_ai.input.messages": [message("user", "2+2?")],
                    "gen_ai.output.messages": [message("assistant", "5")],
                },
            )  # fmt: skip
        if lost_span:
            with tracer.start_as_current_span("lost"):
                logger.emit(event_name=DETAILS, attributes={"gen_ai.request.model": "stub-model"})
        if evaluate:
            logger.emit(
                event_name="gen_ai.evaluation.result",
                attributes={"gen_ai.evaluation.name": "exact", "gen_ai.evaluation.score.label": "fail",
                            "gen_ai.evaluation.explanation": "2+2 is 4"},
            )  # fmt: skip
    return [s for s in spans.get_finished_spans() if s.name != "lost"], list(logs.get_finished_logs())


def logs_json(records) -> bytes:
    """OTLP/JSON as the kafkaexporter's otlp_json writes it: the protobuf JSON mapping, ids in hex."""
    document = MessageToDict(encode_logs(records))
    for resource_logs in document.get("resourceLogs", []):
        for scope_logs in resource_logs.get("scopeLogs", []):
            for record in scope_logs.get("logRecords", []):
                for key in ("traceId", "spanId"):
                    if record.get(key):
                        record[key] = base64.b64decode(record[key]).hex()
    return orjson.dumps(document)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def pipeline(tmp_path, clock: Clock, metrics: IngestMetrics | None = None) -> IngestPipeline:
    settings = IngestSettings(idle_timeout_s=IDLE, max_trace_age_s=60.0)
    return IngestPipeline(
        EventStore(tmp_path / "cegraph.duckdb"), decoder_for("otlp_proto"), settings, spans_topic=SPANS,
        feedback_topic=FEEDBACK, clock=clock, metrics=metrics, logs_topic=LOGS,
        decode_logs=logs_decoder_for("otlp_proto"),
    )  # fmt: skip


def outcomes(metrics: IngestMetrics) -> dict[str, float]:
    sample = metrics.registry.get_sample_value
    return {
        o: sample("cegraph_ingest_log_records_total", {"outcome": o}) or 0
        for o in ("joined", "late", "unmatched")
    }


def test_records_decode_alike_from_proto_and_json():
    _, records = recorded()
    proto, json = (
        decode_logs_proto(encode_logs(records).SerializeToString()),
        decode_logs_json(logs_json(records)),
    )
    assert [(r.trace_id, r.span_id, r.event.name) for r in proto] == [
        (r.trace_id, r.span_id, r.event.name) for r in json
    ]
    assert [r.event.name for r in proto] == [DETAILS, "gen_ai.evaluation.result"]
    assert proto[0].event.attributes == json[0].event.attributes
    assert proto[0].event.attributes["gen_ai.input.messages"][0]["parts"][0]["content"] == "2+2?"


def test_log_records_before_their_spans_are_joined_when_the_trace_completes(tmp_path, clock):
    spans, records = recorded()
    metrics, topics = IngestMetrics(), Topics()
    ingest = pipeline(tmp_path, clock, metrics)
    assert ingest.handle([topics.message(encode_logs(records).SerializeToString(), topic=LOGS)]) == []
    clock.advance(1.0)
    ingest.handle([topics.message(encode_spans(spans).SerializeToString())])
    clock.advance(IDLE)
    assert ingest.flush().completed == 1
    chat = next(n for n in ingest.store.query_dicts("SELECT * FROM nodes") if n["name"] == "chat stub-model")
    assert '"2+2?"' in chat["input_text"] and '"5"' in chat["output_text"] and chat["model"] == "stub-model"
    assert outcomes(metrics) == {"joined": 2, "late": 0, "unmatched": 0}
    assert ingest.store.stats()["failures"]["executions_failed"] == 1  # the verdict counts
    assert ingest.store.offsets() == {(LOGS, 0): 1, (SPANS, 0): 1}


def test_log_records_after_their_trace_was_stored_are_counted_late(tmp_path, clock):
    spans, records = recorded()
    metrics, topics = IngestMetrics(), Topics()
    ingest = pipeline(tmp_path, clock, metrics)
    ingest.handle([topics.message(encode_spans(spans).SerializeToString())])
    clock.advance(IDLE)
    ingest.flush()
    ingest.handle([topics.message(encode_logs(records).SerializeToString(), topic=LOGS)])
    clock.advance(IDLE)
    ingest.flush()
    assert outcomes(metrics) == {"joined": 0, "late": 2, "unmatched": 0}
    assert ingest.store.stats()["failures"]["executions_failed"] == 0
    other, _ = recorded()
    ingest.handle([topics.message(encode_spans(other).SerializeToString())])
    clock.advance(IDLE)
    ingest.flush()
    assert ingest.store.offsets()[(LOGS, 0)] == 1  # stored with the next events: not read again


def test_log_records_whose_spans_never_come_store_nothing_and_free_their_offset(tmp_path, clock):
    _, records = recorded()
    metrics, topics = IngestMetrics(), Topics()
    ingest = pipeline(tmp_path, clock, metrics)
    ingest.handle([topics.message(encode_logs(records).SerializeToString(), topic=LOGS)])
    clock.advance(IDLE)
    assert ingest.flush().events == 0 and ingest.store.offsets().get((LOGS, 0), 0) == 0  # still waiting
    clock.advance(60.0)
    ingest.flush()
    assert ingest.store.stats()["executions"]["total"] == 0
    assert ingest.store.offsets()[(LOGS, 0)] == 1
    assert outcomes(metrics)["unmatched"] == 2


def test_a_record_naming_a_span_its_trace_never_had_is_unmatched(tmp_path, clock):
    spans, records = recorded(evaluate=False, lost_span=True)
    metrics, topics = IngestMetrics(), Topics()
    ingest = pipeline(tmp_path, clock, metrics)
    ingest.handle([topics.message(encode_logs(records).SerializeToString(), topic=LOGS),
                   topics.message(encode_spans(spans).SerializeToString())])  # fmt: skip
    clock.advance(IDLE)
    ingest.flush()
    assert outcomes(metrics) == {"joined": 1, "late": 0, "unmatched": 1}


def test_a_message_of_the_logs_topic_that_is_not_a_log_export_is_dead_lettered(tmp_path, clock):
    topics = Topics()
    ingest = pipeline(tmp_path, clock)
    [dead] = ingest.handle([topics.message(b"\x00not protobuf\xff", topic=LOGS)])
    assert dead.reason.startswith("not an OTLP ExportLogsServiceRequest")
    [dead] = ingest.handle([topics.message(b"", topic=LOGS)])
    assert dead.reason == "the export holds no log records"
    assert ingest.store.stats()["dead_letters"] == 0  # recorded at the next flush
    ingest.flush()
    assert ingest.store.stats()["dead_letters"] == 2


def test_joined_verdicts_and_content_change_the_failure_labels(tmp_path, clock):
    spans, records = recorded()
    topics = Topics()
    ingest = pipeline(tmp_path, clock)
    ingest.handle([topics.message(encode_logs(records).SerializeToString(), topic=LOGS),
                   topics.message(encode_spans(spans).SerializeToString())])  # fmt: skip
    clock.advance(IDLE)
    ingest.flush()
    nodes = [node_from_row(row) for row in ingest.store.query_dicts("SELECT * FROM nodes")]
    [failure] = label_failures(nodes)
    assert (failure.source, failure.node.name, failure.critique) == (
        "evaluation",
        "chat stub-model",
        "2+2 is 4",
    )


def test_a_log_record_that_cannot_become_text_is_dead_lettered_and_its_trace_still_lands(tmp_path, clock):
    """Per-message isolation on the logs topic: the record's content is normalized at its message, so
    a flush never meets it (content nested deeper than JSON writers go used to fail the flush)."""
    spans, _ = recorded(evaluate=False)
    chat = next(s for s in spans if s.name == "chat stub-model")
    trace_id, span_id = format(chat.context.trace_id, "032x"), format(chat.context.span_id, "016x")
    deep: list = ["bottom"]
    for _ in range(300):
        deep = [deep]
    export = {"resourceLogs": [{"scopeLogs": [{"logRecords": [{
        "traceId": trace_id, "spanId": span_id, "eventName": DETAILS, "timeUnixNano": "1",
        "attributes": [{"key": "gen_ai.input.messages", "value": _any(deep)}],
    }]}]}]}  # fmt: skip
    topics = Topics()
    json_ingest = IngestPipeline(
        EventStore(tmp_path / "cegraph.duckdb"), decoder_for("otlp_proto"),
        IngestSettings(idle_timeout_s=IDLE, max_trace_age_s=60.0), spans_topic=SPANS,
        feedback_topic=FEEDBACK, clock=clock, logs_topic=LOGS, decode_logs=logs_decoder_for("otlp_json"),
    )  # fmt: skip
    logs_message = topics.message(json.dumps(export).encode(), topic=LOGS)  # deeper than orjson writes
    dead = json_ingest.handle([logs_message, topics.message(encode_spans(spans).SerializeToString())])
    assert [letter.message.topic for letter in dead] == [LOGS] and dead[0].reason
    clock.advance(IDLE)
    assert json_ingest.flush().completed == 1
    assert json_ingest.store.stats()["executions"]["total"] == 1


def _any(value) -> dict:
    """A Python value as an OTLP/JSON AnyValue."""
    if isinstance(value, list):
        return {"arrayValue": {"values": [_any(item) for item in value]}}
    return {"stringValue": str(value)}
