"""Scale-out against a real broker, as separate `cegraph run` processes: three `--stages ingest`
members in one consumer group (one SIGKILLed mid-stream, one more added after, the killed one started
again on its own store), one `--stages detect` member reading the failures topic, and two
`--stages refine` workers running its refinement jobs from the jobs topic. Every execution is
stored exactly once across the members' stores (the killed member gives up its unconfirmed tail,
which the partitions' next owners stored), and the modes, mass and triggers per workflow equal those
of a single `cegraph run` on the same spans topic."""

from __future__ import annotations

import re
import uuid
from collections import Counter

import httpx
import pytest
from daemon_proc import Daemon
from kafka import KafkaProducer
from scale_cases import detected, workload

from cegraph.connectors.kafka.client import ensure_topics
from cegraph.daemon.settings import KafkaSettings
from cegraph.daemon.store import CONFIRMED, EventStore

pytestmark = pytest.mark.long(minutes=1)

EXECUTIONS = 2_400
SPANS_PARTITIONS, FAILURES_PARTITIONS = 4, 2


def stored(path, *, after_confirmed: bool = False, retracted: bool = False) -> set[str]:
    """The trace ids of the executions a member's store holds (retracted ones are not); only those
    stored after its last confirmed Kafka commit (its unconfirmed tail); or those it retracted."""
    store = EventStore(path, read_only=True)
    try:
        if retracted:
            return {t for (t,) in store.query("SELECT trace_id FROM retracted")}
        cursor = store.cursor(CONFIRMED)
        since = cursor.position if after_confirmed and cursor is not None else 0
        return {t for (t,) in store.query("SELECT trace_id FROM executions WHERE seq >= ?", since)}
    finally:
        store.close()


def jobs_running(detect: Daemon) -> float:
    metrics = httpx.get(f"{detect.url}/metrics", timeout=10).text
    return float(re.search(r"^cegraph_refinement_jobs_running (\S+)$", metrics, re.M).group(1))


def answered(worker: Daemon) -> int:
    return worker.stats()["jobs"]["done"]


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
            "CEGRAPH_KAFKA__JOBS_TOPIC": f"jobs-{suffix}",
            "CEGRAPH_KAFKA__JOB_RESULTS_TOPIC": f"ends-{suffix}",
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

    detect = process("detect", "scaled", CEGRAPH_STAGES="detect")  # its jobs go to the refine workers
    workers = [process(name, "scaled", CEGRAPH_STAGES="refine") for name in ("r1", "r2")]
    # small batches (a flush and a commit each) keep the members busy long enough to share the work
    ingest = [
        process(name, "scaled", CEGRAPH_STAGES="ingest", CEGRAPH_INGEST__BATCH_SIZE="2") for name in "abcd"
    ]
    a, b, c, d = ingest
    store_of = {m: tmp_path / m.log_path.parent.name / "cegraph.duckdb" for m in ingest}
    for worker in workers:
        worker.launch()
    for worker in workers:
        worker.wait_ready()
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
        tail = stored(store_of[a], after_confirmed=True)  # in doubt: the group reads it again elsewhere
        d.start()
        # the group has taken the killed member's partitions from it before it comes back
        every = set(range(SPANS_PARTITIONS))
        d.wait_for(lambda _: set().union(*(m.stats()["assigned"] for m in (b, c, d))) == every, timeout=120)
        a.start()  # a pod restarting with its volume: the same store
        detect.wait_for(lambda s: settled(s, executions=EXECUTIONS), timeout=600)
        for member in ingest:  # each commits to Kafka what it sent on, at its next flush
            member.wait_for(lambda s: s["unconfirmed"] == 0, timeout=120)
        a.wait_for(lambda _: sum(m.stats()["executions"]["total"] for m in ingest) == EXECUTIONS, timeout=120)
        late = detect.stats()["sequenced"]["late"]
        # the triggers' jobs went to the refine workers and came back
        detect.wait_for(lambda _: jobs_running(detect) == 0 and sum(answered(w) for w in workers) > 0)
        answers = sum(answered(w) for w in workers)
    finally:
        for member in (*ingest, detect, *workers):
            member.stop()

    held = {m: stored(store_of[m]) for m in ingest}
    counted = Counter(t for executions in held.values() for t in executions)
    assert set(counted) == {key.decode() for key, _ in messages}, "an execution was lost"
    assert max(counted.values()) == 1, "an execution stored by two members"
    # what the killed member gave up is what it had not confirmed: nothing below its last commit
    assert stored(store_of[a], retracted=True) <= tail
    assert late == 0
    store = EventStore(store_of[a])
    live = store.projection_digest()
    store.rebuild()
    assert store.projection_digest() == live
    store.close()

    store = EventStore(tmp_path / "single" / "cegraph.duckdb", read_only=True)
    reference = detected(store)
    store.close()
    store = EventStore(tmp_path / "detect" / "cegraph.duckdb", read_only=True)
    scaled = detected(store)
    jobs = store.query(
        "SELECT s.payload->>'job_id', f.payload->>'outcome', f.payload->>'reason' FROM events s "
        "LEFT JOIN events f ON f.type = 'RefinementFinished' AND f.payload->>'job_id' = s.payload->>'job_id' "
        "WHERE s.type = 'RefinementStarted'"
    )
    store.close()
    # each job ended once, by a worker: the workload's workflows have no registered spec to refine
    assert jobs and len({job for job, _, _ in jobs}) == len(jobs) <= answers
    assert all(outcome == "skipped" and "register the spec" in reason for _, outcome, reason in jobs), jobs
    assert set(reference) == {"support-bot", "qa-bot"}
    for workflow in reference:
        assert any(kind == "ModeEmerged" for kind, _, _ in reference[workflow]), workflow
        assert scaled[workflow] == reference[workflow], workflow
