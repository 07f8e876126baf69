"""The first test through the real broker: raw bytes and headers survive a faststream round trip."""

from __future__ import annotations

import asyncio

from faststream.kafka import KafkaMessage
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cegraph.connectors.kafka.client import make_broker, raw_body
from cegraph.daemon.settings import KafkaSettings


def otlp_payload() -> bytes:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("root"):
        pass
    return encode_spans(exporter.get_finished_spans()).SerializeToString()


async def test_raw_bytes_and_headers_round_trip(kafka_broker, topic_name):
    bodies = [otlp_payload(), b"42", b"\x00\xff\x10garbage"]
    settings = KafkaSettings(bootstrap_servers=kafka_broker.bootstrap_servers)
    broker = make_broker(settings)
    received: list[tuple[bytes, dict, str]] = []
    done = asyncio.Event()

    @broker.subscriber(topic_name, group_id=topic_name, auto_offset_reset="earliest", decoder=raw_body)
    async def handle(body: bytes, message: KafkaMessage) -> None:
        received.append((body, message.headers, message.raw_message.key))
        if len(received) == len(bodies):
            done.set()

    async with broker:
        await broker.start()
        for index, body in enumerate(bodies):
            await broker.publish(
                body,
                topic=topic_name,
                key=f"k{index}".encode(),
                headers={"content-type": "application/x-protobuf", "x-index": str(index)},
            )
        await asyncio.wait_for(done.wait(), timeout=60)

    print(f"round trip through {kafka_broker.kind} at {kafka_broker.bootstrap_servers}")
    assert [body for body, _, _ in received] == bodies
    assert all(isinstance(body, bytes) for body, _, _ in received)
    assert [headers["x-index"] for _, headers, _ in received] == ["0", "1", "2"]
    assert [key for _, _, key in received] == [b"k0", b"k1", b"k2"]
