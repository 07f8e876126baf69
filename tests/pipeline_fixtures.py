"""Ingest by hand: messages through a real `IngestPipeline` into a store, on a clock the test moves."""

from __future__ import annotations

from cegraph.connectors.otlp.codec import decode_proto
from cegraph.daemon.ingest.pipeline import IngestPipeline, InMessage
from cegraph.daemon.settings import IngestSettings
from cegraph.daemon.store import EventStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ingest(store: EventStore, messages: list[InMessage], decode=decode_proto) -> None:
    clock = Clock()
    pipeline = IngestPipeline(
        store, decode, IngestSettings(idle_timeout_s=1), spans_topic="spans", feedback_topic="feedback",
        clock=clock,
    )  # fmt: skip
    pipeline.handle(messages)
    clock.now += 10
    pipeline.flush()
