"""Storage faults at the DuckDB boundary: a COMMIT that is durable and still raises, one that fails.

DuckDB reports "COMMIT succeeded and is durable, but the autocheckpoint failed" when the disk fills
during the checkpoint after a commit: the batch is stored although `append` raised. These tests inject
both kinds of failure at random flushes and recover the way the Kafka source does (reopen, reset the
pipeline, re-read from the stored offsets): every execution must be stored exactly once and no two
events may share a seq. (The same promise over Kafka on a really full disk: test_disk_full_kafka.py.)
"""

from __future__ import annotations

import random

import duckdb
import pytest
from otel_traces import make_traces, to_messages
from pipeline_fixtures import (
    Clock,
    Topics,
    build_stream,
    expected_stats_hold,
    pipeline_on,
    settle,
    unstored_messages,
)
from pydantic import ValidationError

from cegraph.daemon.events import Event
from cegraph.daemon.ingest.pipeline import PipelineNeedsReset
from cegraph.daemon.settings import StoreSettings
from cegraph.daemon.store import EventStore, StoreError

DURABLE = "COMMIT succeeded and is durable, but the autocheckpoint failed"


class FaultyStore(EventStore):
    """Fails chosen COMMITs: `durable` ones after committing (as a failed checkpoint), others before."""

    def __init__(self, path, faults: dict[int, str]) -> None:
        self.faults = faults  # commit number -> "durable" | "lost"
        self.commits = 0
        super().__init__(path)

    def _run(self, sql: str) -> None:
        if sql != "COMMIT":
            return super()._run(sql)
        self.commits += 1
        fault = self.faults.get(self.commits)
        if fault == "lost":
            raise duckdb.IOException("Could not write file: No space left on device")
        super()._run(sql)
        if fault == "durable":
            raise duckdb.IOException(DURABLE)
        return None


def duplicate_seqs(store: EventStore) -> list:
    return store.query("SELECT seq, count(*) FROM events GROUP BY seq HAVING count(*) > 1")


def test_a_durable_commit_that_raises_does_not_reuse_its_seqs(tmp_path):
    store = FaultyStore(tmp_path / "cegraph.duckdb", {2: "durable"})
    store.append([Event("Test", "a", {"n": 1})])
    with pytest.raises(duckdb.IOException, match="durable"):
        store.append([Event("Test", "b", {"n": 2}), Event("Test", "c", {"n": 3})])
    assert store.last_seq() == 3, "the next seq comes from the file, which holds the batch"
    store.append([Event("Test", "d", {"n": 4})])
    assert duplicate_seqs(store) == []
    assert store.query("SELECT key FROM events ORDER BY seq") == [("a",), ("b",), ("c",), ("d",)]
    store.close()


def test_a_lost_commit_leaves_the_seqs_free(tmp_path):
    store = FaultyStore(tmp_path / "cegraph.duckdb", {2: "lost"})
    store.append([Event("Test", "a", {})])
    with pytest.raises(duckdb.IOException):
        store.append([Event("Test", "b", {})])
    store.append([Event("Test", "c", {})])
    assert store.query("SELECT seq, key FROM events ORDER BY seq") == [(1, "a"), (2, "c")]
    store.close()


def test_a_store_that_cannot_say_its_last_seq_refuses_writes_until_reopened(tmp_path, monkeypatch):
    store = FaultyStore(tmp_path / "cegraph.duckdb", {1: "lost"})
    monkeypatch.setattr(store, "_scalar", lambda *_: (_ for _ in ()).throw(duckdb.FatalException("gone")))
    with pytest.raises(duckdb.IOException):
        store.append([Event("Test", "a", {})])
    monkeypatch.undo()
    with pytest.raises(StoreError, match="until it is reopened"):
        store.append([Event("Test", "b", {})])
    store.reopen()
    store.append([Event("Test", "b", {})])
    assert store.query("SELECT seq, key FROM events") == [(1, "b")]
    store.close()


def test_after_a_failed_flush_the_pipeline_refuses_work_until_reset(tmp_path):
    store = FaultyStore(tmp_path / "cegraph.duckdb", {1: "lost"})
    clock = Clock()
    pipeline = pipeline_on(store, clock)
    stream = build_stream("otlp_proto")
    pipeline.handle(stream.messages[:10])
    with pytest.raises(duckdb.IOException):
        settle(pipeline, clock)
    with pytest.raises(PipelineNeedsReset):
        pipeline.handle(stream.messages[10:12])
    with pytest.raises(PipelineNeedsReset):
        pipeline.flush()
    assert store.offsets() == {}, "nothing of the failed flush is stored, offsets included"
    pipeline.reset()
    pipeline.handle(stream.messages)
    settle(pipeline, clock)
    expected_stats_hold(store, stream)
    store.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_storage_faults_lose_nothing_and_double_nothing(tmp_path, seed):
    """Batches of six messages, a flush after each; some commits fail, durable or not. After each
    failure: reopen, reset, re-read from the stored offsets (what the Kafka source does)."""
    rng = random.Random(seed)
    faults = {n: rng.choice(["durable", "lost"]) for n in rng.sample(range(1, 30), 6)}
    store = FaultyStore(tmp_path / "cegraph.duckdb", faults)
    clock = Clock()
    stream = build_stream("otlp_json" if seed % 2 else "otlp_proto", seed=seed)
    pipeline = pipeline_on(store, clock, encoding="otlp_json" if seed % 2 else "otlp_proto")
    pending, failures = stream.messages, 0
    while pending:
        batch, pending = pending[:6], pending[6:]
        try:
            pipeline.handle(batch)
            clock.advance(0.5)
            if not pending:
                clock.advance(1_000)
            pipeline.flush()
        except duckdb.IOException:
            failures += 1
            store.reopen()
            pipeline.reset()
            pending = unstored_messages(stream, store.offsets())
    assert failures > 0
    expected_stats_hold(store, stream)
    assert duplicate_seqs(store) == []
    store.close()


def test_a_durable_failure_does_not_double_an_executions_spans(tmp_path):
    """The issue's symptom: a reused seq joined one execution's spans twice (span_count 40,000 of 20,000)."""
    (big,) = make_traces(1, seed=9)
    store = FaultyStore(tmp_path / "cegraph.duckdb", {1: "durable"})
    clock = Clock()
    pipeline = pipeline_on(store, clock)
    topics = Topics()
    messages = [topics.message(m.value) for m in to_messages([big])]
    pipeline.handle(messages)
    with pytest.raises(duckdb.IOException):
        settle(pipeline, clock)
    store.reopen()
    pipeline.reset()
    pipeline.handle([m for m in messages if m.offset >= store.offsets().get((m.topic, m.partition), 0)])
    settle(pipeline, clock)
    pipeline.handle([topics.message(to_messages(make_traces(1, seed=10))[0].value)])
    settle(pipeline, clock)
    assert duplicate_seqs(store) == []
    rows = store.query("SELECT span_count FROM executions WHERE trace_id = ?", big.trace_id)
    assert rows == [(big.span_count,)]
    store.close()


def test_the_store_settings_reach_duckdb(tmp_path):
    """DuckDB's own memory default (80% of RAM) lets its block cache grow with the store, and its
    checkpoint threshold decides how often a commit pays for a checkpoint."""
    settings = StoreSettings(
        path=tmp_path / "limited.duckdb", memory_limit="96MiB", checkpoint_threshold="48MiB"
    )
    store = EventStore.configured(settings)
    try:
        query = "SELECT current_setting('memory_limit'), current_setting('checkpoint_threshold')"
        assert store.query(query) == [("96.0 MiB", "48.0 MiB")]
    finally:
        store.close()


def test_a_bad_store_size_names_its_setting(tmp_path):
    with pytest.raises(ValidationError, match="checkpoint_threshold"):
        StoreSettings(path=tmp_path / "x.duckdb", checkpoint_threshold="lots")
