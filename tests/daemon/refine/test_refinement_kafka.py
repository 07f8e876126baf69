"""Patches through the real broker: the daemon publishes a verified patch to the patches topic
exactly once, also when it is SIGKILLed between verification and publication."""

from __future__ import annotations

import time

import orjson
from daemon_proc import Scenario, patches_of, topic_messages, wait_until
from kafka import KafkaProducer
from refinement_fixtures import ARITHMETIC_SLIP, register_and_send

from cegraph.connectors.kafka.client import ensure_topics
from cegraph.connectors.kafka.outbox_transport import KafkaTransport
from cegraph.daemon.outbox import OutboxPublisher
from cegraph.daemon.refine.operators import Edit, apply_edit
from cegraph.daemon.refine.patch_outbox import PatchOutbox, created
from cegraph.daemon.refine.signing import sign, verify_signature
from cegraph.daemon.runner import StageRunner
from cegraph.daemon.settings import KafkaSettings
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import apply_patch
from cegraph.schemas.patch import WorkflowPatch

KEY = "kafka-test-key"


def test_a_sigkill_between_verification_and_publication_still_publishes_exactly_one_patch(
    kafka_bootstrap, tmp_path
):
    scenario = Scenario(
        kafka_bootstrap, tmp_path, CEGRAPH_PUBLISHER__SIGNING_KEY=KEY, CEGRAPH_PUBLISHER__HOLD_S="3600"
    )
    daemon = scenario.daemon
    patches_topic = daemon.env["CEGRAPH_KAFKA__PATCHES_TOPIC"]
    daemon.start()
    try:
        register_and_send(daemon.url, kafka_bootstrap, scenario.spans_topic, ARITHMETIC_SLIP, range(600))
        # verified, signed and in the outbox, held: the daemon dies before it publishes
        [held] = wait_until(lambda: patches_of(daemon), daemon)
        assert held["state"].startswith("held for")
        daemon.kill()
        assert topic_messages(kafka_bootstrap, patches_topic) == []

        daemon.env["CEGRAPH_PUBLISHER__HOLD_S"] = "0"
        daemon.start()
        [published] = wait_until(
            lambda: [p for p in patches_of(daemon) if p["state"] == "published"], daemon, timeout=60
        )
        daemon.kill()  # and once more, with nothing left to publish
        daemon.start()
        time.sleep(3)
        assert [p["state"] for p in patches_of(daemon)] == ["published"]
    finally:
        daemon.stop()
    [message] = topic_messages(kafka_bootstrap, patches_topic)
    assert message.key == b"arithmetic-slip"
    patch = WorkflowPatch.model_validate(orjson.loads(message.value))
    assert patch.model_dump(mode="json", by_alias=True) == published["patch"] == held["patch"]
    assert verify_signature(patch, KEY)
    assert apply_patch(ARITHMETIC_SLIP, patch).nodes["solve"].kind == "programmer"


def test_a_patch_sent_before_a_crash_is_recorded_from_the_topic_not_sent_again(kafka_bootstrap, tmp_path):
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, patches_topic=f"patches-{tmp_path.name}")
    ensure_topics(settings, [settings.patches_topic])
    spec, ops = apply_edit(ARITHMETIC_SLIP, Edit(operator="programmer", node="solve"), "1.1.0")
    patch = sign(
        WorkflowPatch(workflow_id=spec.id, base_version="1.0.0", new_version="1.1.0", operations=ops,
                      content_hash=spec.content_hash),
        KEY,
    )  # fmt: skip
    store = EventStore(tmp_path / "cegraph.duckdb")
    try:
        store.append([created("job-1", patch)])
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        producer.send(
            settings.patches_topic, key=b"x", value=orjson.dumps(patch.model_dump(mode="json", by_alias=True))
        )
        producer.flush()
        producer.close()  # ... and the process died before it recorded PatchPublished
        outbox = PatchOutbox(store)
        publisher = StageRunner(
            store, OutboxPublisher(outbox, KafkaTransport(settings, settings.patches_topic))
        )
        assert publisher.drain() == 1  # its PatchPublished, from the topic
        publisher.stop()
        [row] = outbox.patches()
        assert (row["state"], row["offset"]) == ("published", 0)
    finally:
        store.close()
    assert len(topic_messages(kafka_bootstrap, settings.patches_topic)) == 1
