"""A member's restart gives up what the group reads again, from the group's offsets in the real broker.

The store is left as a SIGKILL in the middle of a commit leaves it: the cursor confirms an older
commit (offset 4) and notes the one being made (offset 8). Whether that commit took is only in
Kafka: had it taken, retracting from the confirmed offset would drop executions nobody reads again;
had it not, keeping them would store them twice. Also when another member took the partition and
moved the group's offset on (to 12) since: its commit's metadata passes on where it found this
member's last commit.
"""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from otel_traces import encode
from pipeline_fixtures import TRACES, Clock, Topics, feed, pipeline_on, settle

from cegraph.connectors.kafka.client import ensure_topics, kafka_python_options
from cegraph.connectors.kafka.source import KafkaIngestSource, commit_metadata, handed_over, keyed, unkeyed
from cegraph.daemon.settings import KafkaSettings, Settings, StoreSettings
from cegraph.daemon.stage import Checkpoint
from cegraph.daemon.store import COMMITTING, CONFIRMED, EventStore

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("moved_on", [False, True], ids=["alone", "another-member-moved-on"])
@pytest.mark.parametrize("took", [True, False], ids=["the-commit-took", "the-commit-was-lost"])
async def test_a_restart_gives_up_from_the_commit_that_took(kafka_bootstrap, tmp_path, took, moved_on):
    suffix = uuid.uuid4().hex[:8]
    kafka = KafkaSettings(
        bootstrap_servers=kafka_bootstrap, spans_topic=f"spans-{suffix}", feedback_topic=f"fb-{suffix}",
        group_id=f"group-{suffix}",
    )  # fmt: skip
    ensure_topics(kafka, [kafka.spans_topic, kafka.feedback_topic])
    tp = (kafka.spans_topic, 0)
    clock, topics = Clock(), Topics()
    messages = [topics.message(encode(t.spans, "otlp_proto"), topic=kafka.spans_topic) for t in TRACES[:12]]
    store = EventStore(tmp_path / "cegraph.duckdb")
    pipeline = pipeline_on(store, clock, spans_topic=kafka.spans_topic)
    for part in (messages[:4], messages[4:8], messages[8:]):
        feed(pipeline, clock, part)
        settle(pipeline, clock)
    store.append(
        [],
        cursors={
            CONFIRMED: Checkpoint(5, {"member": "killed", "group": keyed({tp: 4})}),
            COMMITTING: Checkpoint(9, {"group": keyed({tp: 8})}),
        },
    )
    committer = KafkaConsumer(
        **kafka_python_options(kafka), group_id=kafka.group_id, enable_auto_commit=False
    )
    try:
        committer.assign([TopicPartition(*tp)])
        last = (8 if took else 4, commit_metadata("killed", {}))  # as the killed member committed it
        committer.commit({TopicPartition(*tp): OffsetAndMetadata(*last, -1)})
        if moved_on:  # the next owner found `last` at its assignment, read on and committed
            later = commit_metadata("next-owner", handed_over(last))
            committer.commit({TopicPartition(*tp): OffsetAndMetadata(12, later, -1)})
    finally:
        committer.close()

    settings = Settings(kafka=kafka, store=StoreSettings(path=tmp_path / "cegraph.duckdb"))
    restarted = pipeline_on(store, clock, spans_topic=kafka.spans_topic)
    source = KafkaIngestSource(settings, restarted, handed_on=lambda: 0)
    try:
        retracted = await source.give_up_after_a_crash()
        cut = 8 if took else 4
        assert retracted == [t.trace_id for t in TRACES[cut:12]]
        assert store.offsets() == {tp: cut}
        assert store.stats()["unconfirmed"] == 0, "nothing stored is in doubt any more"
        assert unkeyed(store.cursor(CONFIRMED)) == {tp: cut}
        assert unkeyed(store.cursor(COMMITTING)) == {}
        assert await source.give_up_after_a_crash() == [], "a second restart gives up nothing more"
    finally:
        store.close()
