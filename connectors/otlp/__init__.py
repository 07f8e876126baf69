"""OTLP: the codecs of what the Collector's kafkaexporter writes, and the SDK exporters."""
