"""Kafka connection options from `KafkaSettings`, for faststream (aiokafka) and for kafka-python.

One place turns the security settings into client options, so the daemon, the traffic generator and
the admin calls all connect the same way.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

from faststream.kafka import KafkaBroker
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from cegraph.daemon.settings import KafkaSettings

_SASL = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    if not settings.security_protocol.endswith("SSL"):
        return None
    context = ssl.create_default_context(cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None)
    if settings.ssl_certfile:
        context.load_cert_chain(
            str(settings.ssl_certfile),
            str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
            settings.ssl_password.get_secret_value() if settings.ssl_password else None,
        )
    return context


def faststream_security(settings: KafkaSettings) -> BaseSecurity | None:
    context = ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        assert settings.sasl_mechanism and settings.sasl_username and settings.sasl_password
        return _SASL[settings.sasl_mechanism](
            settings.sasl_username,
            settings.sasl_password.get_secret_value(),
            ssl_context=context,
            use_ssl=context is not None,
        )
    if context is not None:
        return BaseSecurity(ssl_context=context, use_ssl=True)
    return None


def make_broker(settings: KafkaSettings, **options: Any) -> KafkaBroker:
    """A faststream broker for the configured cluster (not yet connected)."""
    return KafkaBroker(
        settings.bootstrap_servers.split(","),
        client_id=settings.client_id,
        security=faststream_security(settings),
        **options,
    )


def kafka_python_options(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for kafka-python's clients (admin calls, the span exporter)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.security_protocol.startswith("SASL"):
        assert settings.sasl_username and settings.sasl_password
        options.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password.get_secret_value(),
        )
    return options


async def raw_body(message: Any) -> bytes:
    """faststream decoder that hands handlers the message bytes untouched.

    Without it faststream tries `json.loads` on a body with no content type, and an OTLP protobuf
    can come out as garbage or an int.
    """
    return message.body


def ensure_topics(
    settings: KafkaSettings, topics: list[str], partitions: int = 1, configs: dict[str, str] | None = None
) -> list[str]:
    """Create the topics that don't exist yet (a fresh cluster may not auto-create), with `partitions`
    and the topic `configs`; returns those created."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    configs = configs or {}
    admin = KafkaAdminClient(**kafka_python_options(settings))
    try:
        existing = set(admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(
                    [
                        NewTopic(t, num_partitions=partitions, replication_factor=1, topic_configs=configs)
                        for t in missing
                    ]
                )
        return missing
    finally:
        admin.close()


def read_topic(settings: KafkaSettings, topic: str) -> list[Any]:
    """Every record a topic holds now, from its first offset to its current end, on every partition."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**kafka_python_options(settings), enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        records: list[Any] = []
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            for batch in consumer.poll(timeout_ms=1_000).values():
                records += batch
        return records
    finally:
        consumer.close()


def group_offsets(
    settings: KafkaSettings, group_id: str, partitions: list[tuple[str, int]]
) -> tuple[dict[tuple[str, int], tuple[int, str] | None], dict[tuple[str, int], int]]:
    """The offset and metadata `group_id` committed for each partition (None: never) and each
    partition's first offset (what retention has not deleted), read by a client outside the group."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**kafka_python_options(settings), group_id=group_id, enable_auto_commit=False)
    try:
        wanted = [TopicPartition(topic, partition) for topic, partition in partitions]
        committed: dict[tuple[str, int], tuple[int, str] | None] = {}
        for tp in wanted:
            found = consumer.committed(tp, metadata=True)
            committed[(tp.topic, tp.partition)] = (found.offset, found.metadata or "") if found else None
        firsts = consumer.beginning_offsets(wanted) if wanted else {}
        return committed, {(tp.topic, tp.partition): at for tp, at in firsts.items()}
    finally:
        consumer.close()
