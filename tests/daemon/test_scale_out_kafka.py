"""Scale-out against a real broker, as separate `cegraph run` processes: three `--stages ingest`
members in one consumer group (one SIGKILLed mid-stream, one more added after), one `--stages detect`
member reading the failures topic. Every execution is stored exactly once across the members' stores
(a killed member's unconfirmed tail aside: its next owner stores it again), and the modes, mass and
triggers per workflow equal those of a single `cegraph run` on the same spans topic."""

from __future__ import annotations

import uuid
from collections import Counter

from daemon_proc import Daemon
from kafka import KafkaProducer
from scale_cases import detected, workload

from cegraph.connectors.kafka.client import ensure_topics
from cegraph.daemon.settings import KafkaSettings
from cegraph.daemon.store import CONFIRMED, EventStore

EXECUTIONS = 2_400
SPANS_PARTITIONS, FAILURES_PARTITIONS = 4, 2


def stored_executions(path) -> dict[str, bool]:
    """The trace ids a member's store holds, each with whether it lies below the member's last
    confirmed Kafka commit (below: no other member reads it again)."""
    store = EventStore(path, read_only=True)
    try:
        cursor = store.cursor(CONFIRMED)
        until = cursor.position if cursor is not None else 0
        rows = store.query("SELECT key, seq < ? FROM events WHERE type = 'ExecutionCompleted'", until)
        return dict(rows)
    finally:
        store.close()


def settled(stats: dict, *, executions: int) -> bool:
    """Everything read, released by the sequencer and through the detector."""
    stored = stats["executions"]["total"] if "ingest" in stats["runs"] else stats["received"]
    return (
        stored == executions
        and stats["sequenced"]["pending"] == 0
        and stats["stages"].get("detect", 0) == stats["events"] + 1
    )


def test_three_ingest_members_and_a_detect_member_equal_one_process(kafka_bootstrap, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    spans, failures = f"spans-{suffix}", f"failures-{suffix}"
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    ensure_topics(kafka, [spans], partitions=SPANS_PARTITIONS)
    ensure_topics(kafka, [failures], partitions=FAILURES_PARTITIONS)
    messages = workload(EXECUTIONS)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    for key, value in messages:  # all of it first: nobody catches up before the end
        producer.send(spans, key=key, value=value)
    producer.flush()
    producer.close()

    def process(name: str, group: str, **extra: str) -> Daemon:
        home = tmp_path / name
        home.mkdir()
        env = {
            "CEGRAPH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            "CEGRAPH_KAFKA__SPANS_TOPIC": spans,
            "CEGRAPH_KAFKA__FAILURES_TOPIC": failures,
            "CEGRAPH_KAFKA__FEEDBACK_TOPIC": f"feedback-{suffix}",
            "CEGRAPH_KAFKA__DLQ_TOPIC": f"dlq-{suffix}",
            "CEGRAPH_KAFKA__PATCHES_TOPIC": f"patches-{suffix}-{name}",
            "CEGRAPH_KAFKA__ROLLOUTS_TOPIC": f"rollouts-{suffix}-{name}",
            "CEGRAPH_KAFKA__GROUP_ID": f"{group}-{suffix}",
            "CEGRAPH_KAFKA__SESSION_TIMEOUT_MS": "2000",
            "CEGRAPH_STORE__PATH": str(home / "cegraph.duckdb"),
            "CEGRAPH_INGEST__IDLE_TIMEOUT_S": "0.5",
            "CEGRAPH_REFINER__ENABLED": "false",
            **extra,
        }
        return Daemon(env, home / "daemon.log")

    # the reference: one process, every stage
    single = process("single", "single")
    single.start()
    try:
        single.wait_for(lambda s: settled(s, executions=EXECUTIONS), timeout=600)
    finally:
        single.stop()

    detect = process("detect", "scaled", CEGRAPH_STAGES="detect")
    # small batches (a flush and a commit each) keep the members busy long enough to share the work
    ingest = [
        process(name, "scaled", CEGRAPH_STAGES="ingest", CEGRAPH_INGEST__BATCH_SIZE="2") for name in "abcd"
    ]
    a, b, c, d = ingest
    detect.start()
    try:
        # booted side by side, so the group shares the partitions before one member has read them
        # all; from this thread: a child dies with the thread that started it
        for member in (a, b, c):
            member.launch()
        for member in (a, b, c):
            member.wait_ready()
        # kill one while it is busy: once every member has stored some and much is left
        a.wait_for(lambda _: all(m.stats()["executions"]["total"] > 0 for m in (a, b, c)), timeout=300)
        stored_before_kill = sum(m.stats()["executions"]["total"] for m in (a, b, c))
        a.kill()
        assert stored_before_kill < EXECUTIONS, "everything was stored before the kill: make the input bigger"
        d.start()
        detect.wait_for(lambda s: settled(s, executions=EXECUTIONS), timeout=600)
        late = detect.stats()["sequenced"]["late"]
        for member in (b, c, d):  # each commits to Kafka what it sent on, at its next flush
            member.wait_for(lambda s: s["unconfirmed"] == 0, timeout=60)
    finally:
        for member in (b, c, d, detect):
            member.stop()

    stores = {m: stored_executions(tmp_path / m.log_path.parent.name / "cegraph.duckdb") for m in ingest}
    stored = Counter(t for executions in stores.values() for t in executions)
    assert len(stored) == EXECUTIONS, "an execution was lost"
    # stored twice only when the killed member stored it after its last confirmed commit (the
    # partition's next owner then reads it again): its in-doubt tail, counted as `unconfirmed`
    twice = {t for t, count in stored.items() if count > 1}
    assert max(stored.values()) <= 2
    assert all(t in stores[a] and not stores[a][t] for t in twice), "stored twice by members that lived"
    assert late == 0

    store = EventStore(tmp_path / "single" / "cegraph.duckdb", read_only=True)
    reference = detected(store)
    store.close()
    store = EventStore(tmp_path / "detect" / "cegraph.duckdb", read_only=True)
    scaled = detected(store)
    store.close()
    assert set(reference) == {"support-bot", "qa-bot"}
    for workflow in reference:
        assert any(kind == "ModeEmerged" for kind, _, _ in reference[workflow]), workflow
        assert scaled[workflow] == reference[workflow], workflow
