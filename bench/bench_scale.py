"""Scale-out: spans/s of `cegraph run --stages ingest` with 1 and with 2 members of one consumer group,
a `--stages detect` member behind them, on the same pre-filled spans topic of the local Apache Kafka
(ops/kafka), in one run.

Per deployment: ingest spans/s (the spans stored between every member being ready and the last
execution stored, over that time), the time until the detect member has learnt everything, and each
process's CPU seconds (from /proc) with the broker's: their sum over the wall time is how many of the
machine's cores the deployment kept busy, which says what limits it.

    python bench/bench_scale.py [--traces N] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "fixtures"), str(ROOT / "ops" / "kafka")]

from kafka import KafkaProducer  # noqa: E402
from results_file import report  # noqa: E402
from scale_cases import workload  # noqa: E402

from cegraph.connectors.kafka.client import ensure_topics  # noqa: E402
from cegraph.daemon.demo.process import DaemonProcess  # noqa: E402
from cegraph.daemon.settings import KafkaSettings  # noqa: E402
from local_kafka import LocalKafka  # noqa: E402

SPANS_PARTITIONS = 4
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def stats(process: DaemonProcess) -> dict:
    return process.get("/stats")


def wait_until(condition, what: str, cap_s: float = 1_800.0) -> None:
    """Poll `condition()`; a deployment that stops making progress ends the run with `what`."""
    deadline = time.monotonic() + cap_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_scale: {what} did not happen within {cap_s:.0f} s")
        time.sleep(0.2)


def stored(members: list[DaemonProcess]) -> int:
    return sum(stats(m)["executions"]["total"] for m in members)


def learnt(detect: dict, traces: int) -> bool:
    """The detect member has every execution and released all of it to its detector."""
    return detect["received"] >= traces and detect["sequenced"]["pending"] == 0


def deployment(members: int, broker: LocalKafka, spans_topic: str, traces: int, workdir: Path) -> dict:
    suffix = uuid.uuid4().hex[:6]
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    failures_topic = f"failures-{suffix}"
    ensure_topics(kafka, [failures_topic], partitions=2)

    def process(name: str, stages: str) -> DaemonProcess:
        home = workdir / f"{members}-{name}"
        home.mkdir()
        return DaemonProcess(
            {
                "CEGRAPH_STAGES": stages,
                "CEGRAPH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                "CEGRAPH_KAFKA__SPANS_TOPIC": spans_topic,
                "CEGRAPH_KAFKA__FAILURES_TOPIC": failures_topic,
                "CEGRAPH_KAFKA__FEEDBACK_TOPIC": f"feedback-{suffix}",
                "CEGRAPH_KAFKA__DLQ_TOPIC": f"dlq-{suffix}",
                "CEGRAPH_KAFKA__PATCHES_TOPIC": f"patches-{suffix}",
                "CEGRAPH_KAFKA__ROLLOUTS_TOPIC": f"rollouts-{suffix}",
                "CEGRAPH_KAFKA__GROUP_ID": f"bench-{suffix}",
                "CEGRAPH_STORE__PATH": str(home / "cegraph.duckdb"),
                "CEGRAPH_REFINER__ENABLED": "false",
            },
            home / "daemon.log",
        )

    detect = process("detect", "detect")
    ingest = [process(f"ingest{i}", "ingest") for i in range(members)]
    detect.start()
    try:
        broker_cpu = cpu_seconds(broker.process.pid)
        for member in ingest:
            member.launch()
        for member in ingest:
            member.wait_ready()
        started = time.monotonic()
        spans_before = sum(stats(m)["spans"] for m in ingest)
        wait_until(
            lambda: sum(stats(m)["executions"]["total"] for m in ingest) >= traces, "every execution stored"
        )
        stored_s = time.monotonic() - started
        spans = sum(stats(m)["spans"] for m in ingest) - spans_before
        wait_until(lambda: learnt(stats(detect), traces), "the detect member learning everything")
        learnt_s = time.monotonic() - started
        cpu = {f"ingest{i}": cpu_seconds(m.process.pid) for i, m in enumerate(ingest)}
        cpu["detect"] = cpu_seconds(detect.process.pid)
        cpu["broker"] = cpu_seconds(broker.process.pid) - broker_cpu
    finally:
        for member in [*ingest, detect]:
            member.stop()
    return {
        "ingest_members": members,
        "spans_timed": spans,
        "ingest_spans_per_s": spans / stored_s,
        "detect_settled_s": learnt_s,
        "cpu_s": cpu,
        "cores_busy": sum(cpu.values()) / learnt_s,
    }


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces", type=int, default=20_000)
    parser.add_argument("--out", type=Path, help="merge the figures into this JSON file")
    args = parser.parse_args()

    broker = LocalKafka()
    broker.start()
    try:
        spans_topic = f"bench-spans-{uuid.uuid4().hex[:6]}"
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        ensure_topics(kafka, [spans_topic], partitions=SPANS_PARTITIONS)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=20, batch_size=1 << 20)
        for key, value in workload(args.traces, seed=1):
            producer.send(spans_topic, key=key, value=value)
        producer.flush()
        producer.close()
        with tempfile.TemporaryDirectory() as tmp:
            runs = [deployment(n, broker, spans_topic, args.traces, Path(tmp)) for n in (1, 2)]
    finally:
        broker.stop()
    one, two = runs
    result = {
        "command": "make bench BENCH=scale",
        "machine_cores": os.cpu_count(),
        "traces": args.traces,
        "deployments": runs,
        "speedup_2_over_1": two["ingest_spans_per_s"] / one["ingest_spans_per_s"],
    }
    report(result, "scale", args.out)
    return result


if __name__ == "__main__":
    main()
