"""A span exporter that writes `otlp_proto` messages to the spans topic, as the collector would.

The runtime (or any OTel-instrumented service) can then feed the daemon without a collector in
between. `export` waits until the broker has acknowledged every message, so the SDK learns of a
failure instead of losing spans silently.
"""

from __future__ import annotations

from kafka import KafkaProducer

from cegraph.connectors.kafka.client import kafka_python_options
from cegraph.connectors.otlp.span_export import DEFAULT_MAX_MESSAGE_BYTES, OtlpPayloadExporter
from cegraph.daemon.settings import KafkaSettings


class OtlpKafkaSpanExporter(OtlpPayloadExporter):
    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topic: str | None = None,
        partition_by_trace: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout_s: float = 30.0,
    ) -> None:
        super().__init__(partition_by_trace=partition_by_trace, max_message_bytes=max_message_bytes)
        self.topic = topic or settings.spans_topic
        self._timeout_s = timeout_s
        self._producer = KafkaProducer(
            **kafka_python_options(settings),
            acks="all",
            linger_ms=5,
            max_request_size=max_message_bytes + 65_536,
        )

    def deliver(self, messages: list[tuple[bytes | None, bytes]]) -> None:
        sent = [self._producer.send(self.topic, key=key, value=payload) for key, payload in messages]
        self._producer.flush(timeout=self._timeout_s)
        for future in sent:
            future.get(timeout=self._timeout_s)  # raises the delivery error, if any

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        self._producer.flush(timeout=timeout_millis / 1000)
        return True

    def shutdown(self) -> None:
        self._producer.close(timeout=self._timeout_s)
