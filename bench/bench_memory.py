"""Memory and storage: the daemon's RSS and the DuckDB file after 100,000 and 1,000,000 executions.

Executions go through ingest and the detector stage in one process, as `cegraph run` processes them
(decode, normalize, assemble, DuckDB commit, failure labels, signatures, clustering, mass), in
batches of `--batch` messages with a flush and a detector catch-up after each. The payloads are
`--pool` distinct OTLP traces from the SDK (tests/fixtures/otel_traces.py: a support-bot workflow, about a
third failing), each sent again with a fresh trace id written over its id bytes, so a million
executions cost no SDK time. The garbage collector is set as `cegraph run` sets it
(`daemon/gc_policy.py`). RSS is the resident set now (not the peak), after a garbage
collection; `duckdb_buffers_mb` is what DuckDB itself holds of it (`duckdb_memory()`: cached blocks,
buffers), with its parts by tag.

    python bench/bench_memory.py [--executions 1000000] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "fixtures")]

from otel_traces import make_traces, to_messages  # noqa: E402
from results_file import report  # noqa: E402

from cegraph.connectors.otlp.codec import decode_proto  # noqa: E402
from cegraph.daemon import gc_policy  # noqa: E402
from cegraph.daemon.app import build_detector_stage  # noqa: E402
from cegraph.daemon.ingest.pipeline import IngestPipeline, InMessage  # noqa: E402
from cegraph.daemon.metrics import IngestMetrics  # noqa: E402
from cegraph.daemon.runner import StageRunner  # noqa: E402
from cegraph.daemon.settings import IngestSettings, load_settings  # noqa: E402
from cegraph.daemon.store import EventStore  # noqa: E402


def rss_mb() -> float:
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def duckdb_buffers(store: EventStore) -> dict:
    """What DuckDB holds (`duckdb_memory()`), in all and by tag."""
    used = dict(store.query("SELECT tag, memory_usage_bytes FROM duckdb_memory() WHERE memory_usage_bytes"))
    return {
        "duckdb_buffers_mb": round(sum(used.values()) / 2**20, 1),
        "duckdb_buffers_by_tag_mb": {tag: round(size / 2**20, 1) for tag, size in used.items()},
    }


def store_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--executions", type=int, default=1_000_000)
    parser.add_argument("--pool", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    traces = make_traces(args.pool, seed=3)
    templates = [
        (bytes.fromhex(t.trace_id), m.value) for t, m in zip(traces, to_messages(traces), strict=True)
    ]
    checkpoints = sorted({args.executions // 10, args.executions})
    rows = []
    with tempfile.TemporaryDirectory(prefix="cegraph-bench-memory-") as folder:
        path = Path(folder) / "cegraph.duckdb"
        settings = load_settings(store={"path": str(path)})
        store = EventStore.configured(settings.store)  # as the daemon opens it
        metrics = IngestMetrics()
        clock = [0.0]
        pipeline = IngestPipeline(
            store,
            decode_proto,
            IngestSettings(idle_timeout_s=0.05),
            spans_topic="spans",
            feedback_topic="feedback",
            metrics=metrics,
            clock=lambda: clock[0],
        )
        stage = build_detector_stage(settings, store, metrics.registry)
        detect = StageRunner(store, stage)
        gc_policy.settle()  # the collector as `cegraph run` sets it once started
        started = time.perf_counter()
        sent, done = 0, set()
        try:
            while sent < args.executions:
                messages = []
                for offset in range(sent, min(sent + args.batch, args.executions)):
                    old, payload = templates[offset % len(templates)]
                    new = offset.to_bytes(8, "big") + old[8:]  # unique per execution, same length
                    messages.append(InMessage("spans", 0, offset, payload.replace(old, new)))
                pipeline.handle(messages)
                clock[0] += 1.0
                pipeline.flush()
                detect.drain()
                sent += len(messages)
                if due := [c for c in checkpoints if c <= sent and c not in done]:
                    done.update(due)
                    pipeline.flush(drain=True)
                    detect.drain()
                    rows.append(
                        {
                            "executions": sent,
                            "rss_mb": round(rss_mb(), 1),
                            "duckdb_mb": round(store_mb(path), 1),
                            "executions_per_s": round(sent / (time.perf_counter() - started)),
                            "micro_clusters": stage.detector.state()["micro_clusters"],
                            **duckdb_buffers(store),
                        }
                    )
                    print(rows[-1], flush=True)
        finally:
            store.close()
    small, large = rows[0], rows[-1]
    growth = large["rss_mb"] / small["rss_mb"] - 1
    result = {
        "command": "make bench BENCH=memory",
        "checkpoints": rows,
        "rss_growth": growth,
        "target": "RSS flat within 10% between 100,000 and 1,000,000 executions, and below 500 MB",
        "met": growth <= 0.10 and large["rss_mb"] < 500,
    }
    report(result, "memory", args.out)
    return result


if __name__ == "__main__":
    main()
