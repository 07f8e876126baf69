"""Ingest throughput: spans/s end to end beside the raw ceiling, on the same payloads, in one run.

- ceiling: protobuf decode and a walk over every span and attribute, nothing else;
- decode and normalize: the messages of each batch into nodes (`batch_nodes`), on the columnar path
  (ptars, `normalize_columns`) and on the per-span reference path (protobuf objects, `normalize`);
- stage 1: decode, normalize, assemble, DuckDB commit (events, spans, projections, offsets),
  flushed every batch of `--batch` messages as the Kafka source does, on either path;
- end to end: stage 1, then the detector stage (failure labels, signatures, clustering, mass and its
  own commit) after each flush, as the daemon.
Both in-process, and with `--kafka` also from a real broker (the local Apache Kafka of ops/kafka):
a plain consumer that decodes (ceiling) beside the daemon's own Kafka source (end to end). Every
in-process part is the best of `--repeat` runs, in wall time (`us_per_span`) and in CPU time of all
the process's threads (`cpu_us_per_span`: less moved by other work on a shared machine, but it
counts DuckDB's worker threads too).

    python bench/bench_ingest.py [--traces N] [--kafka] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import threading
import time
import uuid
from math import inf
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "fixtures"), str(ROOT / "ops" / "kafka")]

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from otel_traces import make_traces, to_messages  # noqa: E402
from pipeline_fixtures import reference_decode  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from results_file import report  # noqa: E402

from cegraph.connectors.otlp.codec import decode_proto  # noqa: E402
from cegraph.daemon import gc_policy  # noqa: E402
from cegraph.daemon.app import build_detector_stage  # noqa: E402
from cegraph.daemon.ingest.normalize import TextPolicy  # noqa: E402
from cegraph.daemon.ingest.pipeline import IngestPipeline, InMessage, batch_nodes  # noqa: E402
from cegraph.daemon.runner import Backpressure, StageRunner  # noqa: E402
from cegraph.daemon.settings import IngestSettings, KafkaSettings, Settings  # noqa: E402
from cegraph.daemon.store import EventStore  # noqa: E402


def ceiling(payloads: list[bytes]) -> int:
    """Decode and walk: the least any consumer of these payloads has to do."""
    spans = 0
    for payload in payloads:
        request = ExportTraceServiceRequest()
        request.ParseFromString(payload)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    for kv in span.attributes:
                        kv.value.WhichOneof("value")
                    spans += 1
    return spans


def decode_and_normalize(payloads: list[bytes], batch: int, decode) -> int:
    """What ingest does to each batch of messages before assembly: the messages into nodes."""
    policy = TextPolicy()
    spans = 0
    for start in range(0, len(payloads), batch):
        spans += sum(len(nodes) for nodes in batch_nodes(payloads[start : start + batch], decode, policy))
    return spans


def ingest(
    payloads: list[bytes], batch: int, store_path: Path, decode=decode_proto, detector: bool = True
) -> int:
    """Stage 1 (with `detector`, the detector stage after each flush too), into a fresh store."""
    store = EventStore(store_path)
    clock = [0.0]
    settings = IngestSettings(idle_timeout_s=0.05)
    pipeline = IngestPipeline(
        store, decode, settings, spans_topic="spans", feedback_topic="feedback", clock=lambda: clock[0]
    )
    detect = StageRunner(store, build_detector_stage(Settings(), store, CollectorRegistry()))
    for start in range(0, len(payloads), batch):
        pipeline.handle(
            [InMessage("spans", 0, i, payloads[i]) for i in range(start, min(start + batch, len(payloads)))]
        )
        clock[0] += 0.1
        pipeline.flush()
        if detector:
            detect.drain()
    clock[0] += 1.0
    pipeline.flush()
    if detector:
        detect.drain()
    spans = store.stats()["spans"]
    store.close()
    return spans


Timing = tuple[int, float, float]  # spans, wall seconds, CPU seconds (of all threads, DuckDB's too)
UNTIMED: Timing = (0, inf, inf)


def timed(function, *args, **options) -> Timing:
    started, cpu = time.perf_counter(), time.process_time()
    spans = function(*args, **options)
    return spans, time.perf_counter() - started, time.process_time() - cpu


def best(one: Timing, other: Timing) -> Timing:
    """The shorter wall time and the smaller CPU time of two runs (other work only slows a run down)."""
    assert one[0] in (0, other[0]), (one[0], other[0])  # every run of a part counts the same spans
    return other[0], min(one[1], other[1]), min(one[2], other[2])


# What every consumer of the broker part is given, as cegraph's source has it: a consumer group of
# its own to join (the plain consumers too, so each clock covers a join), the same fetch size.
FETCH = {
    "auto_offset_reset": "earliest",
    "max_partition_fetch_bytes": KafkaSettings().max_partition_fetch_bytes,
}
QUIET_S = 5.0  # a plain consumer that fetched nothing for this long has lost spans: an error, not a figure


def plain_kafka_python(bootstrap_servers: str, topic: str, expected: int) -> Timing:
    """kafka-python's `poll`, from before the consumer connects until it decoded all `expected` spans."""
    from kafka import KafkaConsumer

    started, cpu, seen = time.perf_counter(), time.process_time(), 0
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap_servers, group_id=uuid.uuid4().hex, **FETCH)
    try:
        quiet_since = time.perf_counter()
        while seen < expected:
            fetched = consumer.poll(timeout_ms=1_000)
            seen += sum(ceiling([r.value for r in records]) for records in fetched.values())
            if fetched:
                quiet_since = time.perf_counter()
            elif time.perf_counter() - quiet_since > QUIET_S:
                raise RuntimeError(f"kafka-python fetched nothing for {QUIET_S} s at {seen} of {expected}")
        assert seen == expected, (seen, expected)
        return seen, time.perf_counter() - started, time.process_time() - cpu
    finally:
        consumer.close()


async def plain_aiokafka(bootstrap_servers: str, topic: str, expected: int, batch: int) -> Timing:
    """aiokafka's batched `getmany` (the client under cegraph's source), from before the consumer
    starts until it decoded all `expected` spans."""
    from aiokafka import AIOKafkaConsumer

    started, cpu, seen = time.perf_counter(), time.process_time(), 0
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap_servers, group_id=uuid.uuid4().hex,
                                **FETCH)  # fmt: skip
    await consumer.start()
    try:
        while seen < expected:
            fetched = await consumer.getmany(timeout_ms=int(QUIET_S * 1000), max_records=batch)
            if not fetched:
                raise RuntimeError(f"aiokafka fetched nothing for {QUIET_S} s at {seen} of {expected} spans")
            seen += sum(ceiling([r.value for r in records]) for records in fetched.values())
        assert seen == expected, (seen, expected)
        return seen, time.perf_counter() - started, time.process_time() - cpu
    finally:
        await consumer.stop()


def cegraph_source(bootstrap_servers: str, topic: str, messages: int, batch: int, store_path: Path) -> Timing:
    """The daemon's own Kafka source with the detector behind it, as `cegraph run` has them (the
    detector on a thread of its own, ingest held back by it), from before the source starts until
    every message is stored and the detector has caught up."""
    from cegraph.connectors.kafka.source import KafkaIngestSource

    settings = Settings(
        kafka={"bootstrap_servers": bootstrap_servers, "spans_topic": topic,
               "feedback_topic": f"{topic}-feedback", "group_id": uuid.uuid4().hex},
        store={"path": store_path},
        ingest={"idle_timeout_s": 0.05, "batch_size": batch},
    )  # fmt: skip
    store = EventStore.configured(settings.store)
    pipeline = IngestPipeline(store, decode_proto, settings.ingest, spans_topic=topic,
                              feedback_topic=f"{topic}-feedback")  # fmt: skip
    detect = StageRunner(store, build_detector_stage(settings, store, CollectorRegistry()))
    backpressure = Backpressure([detect], settings.ingest.max_detector_lag)

    async def run() -> Timing:
        source = KafkaIngestSource(settings, pipeline, after_flush=detect.wake,
                                   backpressure=backpressure.wait)  # fmt: skip
        detect.open()
        detect.start()
        started, cpu = time.perf_counter(), time.process_time()
        await source.start()
        # done when the stored offset reaches the topic's end (it passes a message only once its
        # trace is stored); read in a worker thread, as the source reads the store, not on its loop
        while (await asyncio.to_thread(pipeline.stored_offsets)).get((topic, 0), 0) < messages:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(detect.wait_until_within, 0, threading.Event())
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        backpressure.release()
        await source.stop()
        detect.stop()
        return store.stats()["spans"], elapsed, cpu

    try:
        return asyncio.run(run())
    finally:
        store.close()


def kafka_part(payloads: list[bytes], batch: int, workdir: Path, repeat: int) -> dict:
    """The three consumers of one topic in turn, `repeat` times (the best of each kept): each reads
    all of it from the start in a consumer group of its own."""
    from kafka import KafkaProducer

    from local_kafka import LocalKafka

    broker = LocalKafka()
    broker.start()
    try:
        topic = f"bench-{uuid.uuid4().hex[:6]}"
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=20, batch_size=1 << 20,
                                 max_request_size=8 << 20)  # fmt: skip
        for payload in payloads:
            producer.send(topic, payload)
        producer.flush()
        producer.close()
        expected = ceiling(payloads)
        runs: dict[str, Timing] = {}
        for run in range(repeat):
            for name, measure in {
                "kafka-python": lambda: plain_kafka_python(broker.bootstrap_servers, topic, expected),
                "aiokafka": lambda: asyncio.run(
                    plain_aiokafka(broker.bootstrap_servers, topic, expected, batch)
                ),
                "cegraph": lambda run=run: cegraph_source(
                    broker.bootstrap_servers, topic, len(payloads), batch, workdir / f"kafka-{run}.duckdb"
                ),
            }.items():
                runs[name] = best(runs.get(name, UNTIMED), measure())
        assert {spans for spans, _, _ in runs.values()} == {expected}, (runs, expected)
        plain = {name: expected / runs[name][1] for name in ("kafka-python", "aiokafka")}
        return {
            "spans": expected,
            "plain_consumer_spans_per_s": plain,
            "ceiling_client": max(plain, key=plain.__getitem__),
            "ceiling_spans_per_s": max(plain.values()),
            "end_to_end_spans_per_s": expected / runs["cegraph"][1],
            "cpu_us_per_span": {name: cpu / expected * 1e6 for name, (_, _, cpu) in runs.items()},
        }
    finally:
        broker.stop()


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500, help="messages per flush, as ingest.batch_size")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each in-process part (the best kept)")
    parser.add_argument("--kafka", action="store_true", help="also measure through a real local broker")
    parser.add_argument("--out", type=Path, help="merge the figures into this JSON file")
    args = parser.parse_args()

    traces = make_traces(args.traces, seed=1)
    payloads = [m.value for m in to_messages(traces, one_trace_per_message=True, seed=1)]
    spans = sum(t.span_count for t in traces)
    # The SDK's spans are millions of objects the daemon never holds: kept alive, every collection of
    # the garbage collector's oldest generation would walk them on the daemon's time. Then the
    # collector is set as `cegraph run` sets it once started (`daemon/gc_policy.py`).
    del traces
    gc_policy.settle()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"columnar": decode_proto, "reference": reference_decode}
        for decode in paths.values():  # warm up: the first batch of each path pays its set-up
            decode_and_normalize(payloads[: args.batch], args.batch, decode)
        ceiling_run = UNTIMED
        decoded: dict[str, Timing] = {}
        stage_1: dict[str, Timing] = {}
        end_to_end: dict[str, Timing] = {}
        # the best of `--repeat` runs of each, in turn: the machine is shared
        for run in range(args.repeat):
            ceiling_run = best(ceiling_run, timed(ceiling, payloads))
            for name, decode in paths.items():
                store = Path(tmp) / f"stage-1-{name}-{run}.duckdb"
                decoded[name] = best(
                    decoded.get(name, UNTIMED), timed(decode_and_normalize, payloads, args.batch, decode)
                )
                stage_1[name] = best(
                    stage_1.get(name, UNTIMED),
                    timed(ingest, payloads, args.batch, store, decode, detector=False),
                )
                end_to_end[name] = best(
                    end_to_end.get(name, UNTIMED),
                    timed(ingest, payloads, args.batch, Path(tmp) / f"e2e-{name}-{run}.duckdb", decode),
                )
        e2e, e2e_reference = end_to_end["columnar"], end_to_end["reference"]
        counts = {
            ceiling_run[0],
            *(r[0] for r in decoded.values()),
            *(r[0] for r in stage_1.values()),
            *(r[0] for r in end_to_end.values()),
        }
        assert counts == {spans}, (counts, spans)

        def per_span(clock: int) -> dict[str, float]:
            """us per span of each part, from the runs above (`clock` 1: wall time, 2: CPU time)."""
            seconds = {
                "ceiling": ceiling_run[clock],
                **{f"decode_normalize_{name}": run[clock] for name, run in decoded.items()},
                **{f"assemble_commit_{name}": stage_1[name][clock] - decoded[name][clock] for name in paths},
                "detector": e2e[clock] - stage_1["columnar"][clock],
            }
            return {part: value / spans * 1e6 for part, value in seconds.items()}

        result = {
            "command": "make bench BENCH=ingest",
            "machine": f"{platform.processor() or platform.machine()}, {platform.python_implementation()} "
            f"{platform.python_version()}",
            "in_process": {
                "spans": spans,
                "messages": len(payloads),
                "ceiling_spans_per_s": spans / ceiling_run[1],
                "stage_1_spans_per_s": spans / stage_1["columnar"][1],
                "stage_1_reference_spans_per_s": spans / stage_1["reference"][1],
                "stage_1_ratio_to_ceiling": ceiling_run[1] / stage_1["columnar"][1],
                "stage_1_reference_ratio_to_ceiling": ceiling_run[1] / stage_1["reference"][1],
                "stage_1_cpu_ratio_to_ceiling": ceiling_run[2] / stage_1["columnar"][2],
                "end_to_end_spans_per_s": spans / e2e[1],
                "end_to_end_reference_spans_per_s": spans / e2e_reference[1],
                "us_per_span": per_span(1),
                "cpu_us_per_span": per_span(2),
            },
        }
        result["in_process"]["ratio_to_ceiling"] = (
            result["in_process"]["end_to_end_spans_per_s"] / result["in_process"]["ceiling_spans_per_s"]
        )
        if args.kafka:
            result["kafka"] = kafka_part(payloads, args.batch, Path(tmp), args.repeat)
            result["kafka"]["ratio_to_ceiling"] = (
                result["kafka"]["end_to_end_spans_per_s"] / result["kafka"]["ceiling_spans_per_s"]
            )
    report(result, "ingest", args.out)
    return result


if __name__ == "__main__":
    main()
