"""Rebalances hand partitions over without loss or doubles, against a real broker: two `cegraph run`
members in one consumer group, each with its own store; the second joins mid-stream and later leaves.
Across both stores every execution is stored exactly once."""

from __future__ import annotations

from daemon_proc import Daemon, Scenario
from otel_traces import make_traces, to_messages

from cegraph.daemon.store import EventStore


def stored(path) -> list[tuple[str, int]]:
    store = EventStore(path, read_only=True)
    try:
        return store.query("SELECT trace_id, span_count FROM executions")
    finally:
        store.close()


def test_a_member_joining_and_leaving_hands_partitions_over_exactly_once(kafka_bootstrap, tmp_path):
    traces = make_traces(2_400, seed=31)
    messages = to_messages(traces)  # one trace per message, keyed by trace id
    first, second, third = messages[:800], messages[800:1_600], messages[1_600:]
    scenario = Scenario(kafka_bootstrap, tmp_path)
    a = scenario.daemon
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = Daemon(
        {**{k: v for k, v in a.env.items() if k.startswith("CEGRAPH_") and k != "CEGRAPH_HTTP__PORT"},
         "CEGRAPH_STORE__PATH": str(b_dir / "cegraph.duckdb")},
        b_dir / "daemon.log",
    )  # fmt: skip

    def total(*members) -> int:
        return sum(m.stats()["executions"]["total"] for m in members)

    a.start()
    try:
        scenario.produce(first)
        a.wait_for(lambda s: s["executions"]["total"] == len(first))
        b.start()
        # B takes partitions once the group has rebalanced: send in chunks, each stored before the next,
        # until B has stored some
        sent = len(first)
        for chunk in range(0, len(second), 100):
            scenario.produce(second[chunk : chunk + 100])
            sent += len(second[chunk : chunk + 100])
            a.wait_for(lambda _, sent=sent: total(a, b) >= sent)
            if b.stats()["executions"]["total"] > 0:
                break
        scenario.produce(second[sent - len(first) :])
        a.wait_for(lambda _: total(a, b) >= len(first) + len(second))
        assert b.stats()["executions"]["total"] > 0, "the second member never got a partition"
        b.stop()  # leaves the group: A gets every partition back, from where B stopped
        by_b = len(stored(b_dir / "cegraph.duckdb"))
        scenario.produce(third)
        a.wait_for(lambda s: s["executions"]["total"] + by_b >= len(messages))
    finally:
        b.stop()
        a.stop()
    rows = stored(scenario.store_path) + stored(b_dir / "cegraph.duckdb")
    expected = {t.trace_id: t.span_count for t in traces}
    assert len(rows) == len(expected), "an execution is missing, or stored by both members"
    assert dict(rows) == expected
