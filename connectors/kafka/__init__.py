"""Kafka: the ingest source, the outbox publishers, the decision consumer, the OTLP exporter."""
