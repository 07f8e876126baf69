"""Ingest acceptance against a real Kafka broker, with `cegraph run` as a real child process.

Payloads come from the OpenTelemetry SDK (tests/fixtures/otel_traces.py), encoded as the Collector's
kafkaexporter writes them. After each scenario the DuckDB file is read back and every execution is
checked: exactly once, right span count, right parent/child edges, right failure flags.
"""

from __future__ import annotations

import random
import threading
import time

import orjson
import pytest
from daemon_proc import Scenario, assert_stored_exactly_once
from kafka import KafkaConsumer, KafkaProducer
from otel_traces import ExpectedTrace, Message, make_traces, to_messages
from poison import malformed_payloads

from cegraph.connectors.kafka.client import ensure_topics
from cegraph.daemon.settings import KafkaSettings
from cegraph.daemon.store import EventStore

pytestmark = pytest.mark.long(minutes=4.5)


@pytest.fixture(scope="module")
def ten_thousand() -> list[ExpectedTrace]:
    traces = make_traces(10_000, seed=7)
    assert sum(t.span_count for t in traces) >= 50_000
    return traces


@pytest.mark.parametrize("one_trace_per_message", [True, False], ids=["trace-per-message", "mixed-messages"])
def test_ten_thousand_executions_land_exactly_once(
    kafka_bootstrap, tmp_path, ten_thousand, one_trace_per_message
):
    scenario = Scenario(kafka_bootstrap, tmp_path)
    messages = to_messages(
        ten_thousand, one_trace_per_message=one_trace_per_message, spans_per_message=9, seed=3
    )
    scenario.produce(messages)
    scenario.daemon.start()
    try:
        stats = scenario.daemon.wait_for(
            lambda s: scenario.all_consumed(s) and s["executions"]["total"] >= len(ten_thousand)
        )
        assert stats["dead_letters"] == 0
    finally:
        scenario.daemon.stop()
    assert_stored_exactly_once(scenario.store_path, ten_thousand)


def test_sigkill_at_random_moments_loses_and_doubles_nothing(kafka_broker, tmp_path, ten_thousand):
    kafka_bootstrap = kafka_broker.bootstrap_servers
    scenario = Scenario(kafka_bootstrap, tmp_path, local_broker=kafka_broker.kind == "apache-kafka-local")
    messages = to_messages(ten_thousand, one_trace_per_message=False, spans_per_message=9, seed=5)
    rng = random.Random(11)
    chunks = [messages[i : i + 250] for i in range(0, len(messages), 250)]

    def produce_slowly() -> None:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        for chunk in chunks:
            scenario.produce(chunk, producer=producer)
            time.sleep(0.15)
        producer.close()

    scenario.daemon.start()
    producer = threading.Thread(target=produce_slowly)
    producer.start()
    kills = 0
    try:
        while kills < 5:
            time.sleep(rng.uniform(0.3, 2.0))
            scenario.daemon.kill()
            kills += 1
            scenario.daemon.start()
        producer.join()
        scenario.daemon.wait_for(
            lambda s: scenario.all_consumed(s) and s["executions"]["total"] >= len(ten_thousand), timeout=180
        )
    finally:
        producer.join()
        scenario.daemon.stop()
    assert scenario.daemon.starts == 6
    assert_stored_exactly_once(scenario.store_path, ten_thousand)


def test_broker_restart_mid_stream(tmp_path):
    from conftest import IN_CI

    from local_kafka import KafkaStartError, LocalKafka

    broker = LocalKafka()
    try:
        broker.start()
    except KafkaStartError as error:
        if IN_CI:
            pytest.fail(f"a broker of its own is needed: {error}", pytrace=False)
        pytest.skip(str(error))
    try:
        traces = make_traces(1_000, seed=21)
        messages = to_messages(traces, one_trace_per_message=True, seed=2)
        scenario = Scenario(broker.bootstrap_servers, tmp_path)
        scenario.daemon.start()
        scenario.produce(messages[:500])
        scenario.daemon.wait_for(lambda s: s["executions"]["total"] >= 500)
        broker.restart()
        scenario.produce(messages[500:])
        scenario.daemon.wait_for(lambda s: s["executions"]["total"] >= 1_000 and scenario.all_consumed(s))
        assert scenario.daemon.alive()
        scenario.daemon.stop()
        assert_stored_exactly_once(scenario.store_path, traces)
    finally:
        broker.stop()


def test_the_same_message_delivered_twice_changes_nothing(kafka_bootstrap, tmp_path):
    traces = make_traces(300, seed=31)
    messages = to_messages(traces, one_trace_per_message=False, spans_per_message=4, seed=4)
    scenario = Scenario(kafka_bootstrap, tmp_path)
    scenario.daemon.start()
    try:
        scenario.produce(messages + messages[:40])  # a redelivery while the traces are still open
        first = scenario.daemon.wait_for(
            lambda s: scenario.all_consumed(s) and s["executions"]["total"] >= 300
        )
        scenario.produce(messages)  # and again, long after they were stored
        second = scenario.daemon.wait_for(scenario.all_consumed)
        time.sleep(1.5)  # past the idle timeout: anything the redelivery started would be stored by now
        final = scenario.daemon.stats()
    finally:
        scenario.daemon.stop()
    for stats in (second, final):
        assert stats["spans"] == first["spans"] == sum(t.span_count for t in traces)
        assert stats["executions"] == first["executions"]
        assert stats["amendments"] == 0
    assert_stored_exactly_once(scenario.store_path, traces, amendments=0)


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_malformed_payloads_go_to_the_dead_letter_topic(kafka_bootstrap, tmp_path, encoding):
    """Issue 13's mix: 1,000 malformed messages of every kind (over OTLP/JSON also fields of the wrong
    type and attributes nested past what JSON writers go) among 1,000 good executions."""
    traces = make_traces(1_000, seed=41)
    good = to_messages(traces, encoding=encoding, one_trace_per_message=True, seed=6)
    bad = malformed_payloads([m.value for m in good], encoding, 1_000, seed=encoding == "otlp_json")
    stream = [(m, True) for m in good] + [(Message(None, payload), False) for payload in bad]
    random.Random(8).shuffle(stream)
    scenario = Scenario(kafka_bootstrap, tmp_path, encoding=encoding)
    scenario.daemon.start()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    bad_refs: set[tuple[int, int]] = set()
    try:
        for index, (message, is_good) in enumerate(stream):
            future = producer.send(
                scenario.spans_topic, key=message.key, value=message.value, partition=index % 4
            )
            if not is_good:
                future.add_callback(lambda md: bad_refs.add((md.partition, md.offset)))
            future.add_callback(scenario.record)
        producer.flush()
        stats = scenario.daemon.wait_for(
            lambda s: scenario.all_consumed(s) and s["executions"]["total"] >= 1_000
        )
        assert scenario.daemon.alive()
    finally:
        producer.close()
        scenario.daemon.stop()
    assert stats["dead_letters"] == 1_000
    consumer = KafkaConsumer(
        scenario.dlq_topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
        consumer_timeout_ms=10_000, group_id=None,
    )  # fmt: skip
    letters = []
    for record in consumer:
        letters.append(record)
        if len(letters) >= 1_000:
            break
    consumer.close()
    headers = [dict(record.headers) for record in letters]
    assert len(letters) == 1_000
    assert all(h["cegraph.dlq.reason"] for h in headers)
    assert {(int(h["cegraph.dlq.partition"]), int(h["cegraph.dlq.offset"])) for h in headers} == bad_refs
    assert_stored_exactly_once(scenario.store_path, traces)


def test_feedback_sent_again_through_other_partitions_is_counted_once(kafka_bootstrap, tmp_path):
    """Issue 13, finding 4: the same 100 feedback messages re-sent (to another partition) are still 100."""
    traces = make_traces(100, seed=43)
    scenario = Scenario(kafka_bootstrap, tmp_path)
    ensure_topics(KafkaSettings(bootstrap_servers=kafka_bootstrap), [scenario.feedback_topic], partitions=3)
    bodies = [
        orjson.dumps({"trace_id": t.trace_id, "outcome": "failed", "source": "user", "critique": f"no {i}"})
        for i, t in enumerate(traces)
    ]
    scenario.daemon.start()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    try:
        scenario.produce(to_messages(traces, seed=9), producer=producer)
        for partition in (0, 1, 2, 0):
            for body in bodies:
                producer.send(scenario.feedback_topic, value=body, partition=partition)
        producer.flush()
        ends = {p: 100 * (2 if p == 0 else 1) for p in (0, 1, 2)}

        def consumed(stats: dict) -> bool:
            stored = {k: v for k, v in stats["offsets"].items() if k.startswith(scenario.feedback_topic)}
            done = all(stored.get(f"{scenario.feedback_topic}/{p}", 0) >= end for p, end in ends.items())
            return done and scenario.all_consumed(stats)

        stats = scenario.daemon.wait_for(consumed)
    finally:
        producer.close()
        scenario.daemon.stop()
    assert stats["feedback"] == 100
    store = EventStore(scenario.store_path, read_only=True)
    try:
        assert store.query("SELECT count(*), count(DISTINCT trace_id) FROM feedback")[0] == (100, 100)
    finally:
        store.close()
