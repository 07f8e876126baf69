"""Scale-out in one process: three ingest members (one of them replaced after a crash, so part of its
input is sent twice) publish the detector's inputs to a two-partition topic, one detect member reads
them in whatever order the topic gives; its modes, mass and triggers equal those of a single ingest
feeding its own detector."""

from __future__ import annotations

from failures_topic import MemoryTopic, Reader
from pipeline_fixtures import Clock
from prometheus_client import CollectorRegistry
from scale_cases import PARTITIONS, detected, partition_of, workload

from cegraph.connectors.otlp.codec import decode_proto
from cegraph.daemon.detect.detector import FailureDetector
from cegraph.daemon.detect.failures_feed import FailuresPublisher, FailuresReceiver
from cegraph.daemon.detect.stage import DetectorStage
from cegraph.daemon.ingest.pipeline import IngestPipeline, InMessage, PartitionsRead
from cegraph.daemon.metrics import StageMetrics
from cegraph.daemon.runner import StageRunner
from cegraph.daemon.settings import DetectorSettings, IngestSettings
from cegraph.daemon.store import EventStore

SPANS = "otlp_spans"


def member(store: EventStore, clock: Clock) -> IngestPipeline:
    settings = IngestSettings(idle_timeout_s=1, max_trace_age_s=30)
    return IngestPipeline(store, decode_proto, settings, spans_topic=SPANS, feedback_topic="fb", clock=clock)


def by_partition(messages: list[tuple[bytes, bytes]]) -> list[list[InMessage]]:
    partitions: list[list[InMessage]] = [[] for _ in range(PARTITIONS)]
    for key, value in messages:
        p = partition_of(key, PARTITIONS)
        partitions[p].append(InMessage(SPANS, p, len(partitions[p]), value, key))
    return partitions


def consume(pipeline: IngestPipeline, clock: Clock, messages: list[InMessage], read: PartitionsRead) -> None:
    """Hand the messages over in batches, as a consumer would, flushing after each."""
    for start in range(0, len(messages), 25):
        pipeline.handle(messages[start : start + 25])
        clock.advance(2)
        pipeline.flush(read=read)


def detector_stage(store: EventStore, metrics: StageMetrics | None = None) -> StageRunner:
    stage = DetectorStage(store, lambda: FailureDetector(DetectorSettings()), batch=40)
    return StageRunner(store, stage, metrics=metrics)


def test_scaled_out_detection_equals_one_process(tmp_path):
    partitions = by_partition(workload())
    ends = {p: len(messages) for p, messages in enumerate(partitions)}
    everything = PartitionsRead(ends, {}, PARTITIONS)

    # one process: one ingest reading every partition (round robin), its detector on the same log
    single = EventStore(tmp_path / "single.duckdb")
    clock, pipeline, detect = Clock(), member(single, Clock()), detector_stage(single)
    pipeline.clock = clock
    rounds = max(len(m) for m in partitions)
    for start in range(0, rounds, 25):
        batch = [m for messages in partitions for m in messages[start : start + 25]]
        pipeline.handle(batch)
        clock.advance(2)
        pipeline.flush(read=everything)
        detect.drain()
    clock.advance(60)
    pipeline.flush(read=everything)
    detect.drain()

    # scaled out: a member per partition; member 0 crashes after half of its partition and a new
    # member takes over from an earlier offset (what it committed to Kafka), reading some again
    topic = MemoryTopic(2)
    detect_store = EventStore(tmp_path / "detect.duckdb")
    registry = CollectorRegistry()
    metrics = StageMetrics(registry)
    receive = StageRunner(
        detect_store, FailuresReceiver(detect_store, Reader(topic, seed=3), batch=30), metrics=metrics
    )
    detect_scaled = detector_stage(detect_store, metrics)
    members = []
    for p, messages in enumerate(partitions):
        store, member_clock = EventStore(tmp_path / f"ingest{p}.duckdb"), Clock()
        members.append(
            (
                member(store, member_clock),
                member_clock,
                StageRunner(store, FailuresPublisher(store, topic)),
                messages,
            )
        )
    half = len(partitions[0]) // 2
    crashed, crashed_clock, crashed_publisher, _ = members[0]
    consume(crashed, crashed_clock, partitions[0][:half], PartitionsRead({0: ends[0]}, {}, PARTITIONS))
    crashed_publisher.drain()
    replacement = EventStore(tmp_path / "ingest0b.duckdb")
    again = Clock()
    members[0] = (
        member(replacement, again),
        again,
        StageRunner(replacement, FailuresPublisher(replacement, topic)),
        partitions[0][half - 30 :],
    )
    for pipeline_, member_clock, publisher, messages in members:
        p, start = messages[0].partition, messages[0].offset
        read = PartitionsRead({p: ends[p]}, {p: start}, PARTITIONS)
        consume(pipeline_, member_clock, messages, read)
        member_clock.advance(60)
        pipeline_.flush(read=read)
        publisher.drain()
        for _ in range(5):  # the detect member reads part of what is there, at its own pace
            receive.step()
            detect_scaled.drain()
    receive.drain()
    detect_scaled.drain()

    sent = sum(1 for log in topic.logs for value in log if b'"place"' in value)
    [(received,)] = detect_store.query("SELECT count(*) FROM events WHERE type = 'FailureInputReceived'")
    assert received == sum(len(m) for m in partitions) < sent  # the replacement's repeats dropped
    # the receiver reads a topic, not the log: no log lag for it (it would only grow), the detector's 0
    lags = {
        sample.labels["stage"]: sample.value
        for family in registry.collect()
        if family.name == "cegraph_stage_lag_events"
        for sample in family.samples
    }
    assert lags == {"detect": 0.0}

    reference, scaled = detected(single), detected(detect_store)
    assert set(reference) == {"support-bot", "qa-bot"}
    for workflow in reference:
        assert any(kind == "ModeEmerged" for kind, _, _ in reference[workflow])
        assert scaled[workflow] == reference[workflow], workflow

    # what refinement and the canary judge read is there too: the executions, the roots' inputs and
    # seeds (replay), the failing spans (counterexamples), rebuilt from the log as they were made live
    for query in (
        "SELECT * EXCLUDE (seq) FROM executions",
        "SELECT trace_id, workflow_id, workflow_version, seed, input_text FROM event_spans "
        "WHERE parent_span_id = '' AND operation = 'invoke_workflow'",
        "SELECT * EXCLUDE (seq) FROM event_spans WHERE hard_failed OR eval_failed",
    ):
        expected = sorted(single.query(query), key=repr)
        assert sorted(detect_store.query(query), key=repr) == expected, query
    assert len(expected) > 0
    live = detect_store.projection_digest()
    detect_store.rebuild()
    assert detect_store.projection_digest() == live
