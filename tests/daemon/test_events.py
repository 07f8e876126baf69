"""Typed event payloads: one declaration of each payload's fields serves the Python that writes it and
the SQL that reads it."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from cegraph.daemon import events
from cegraph.daemon.events import (
    CanaryDecidedPayload,
    ExecutionCompletedPayload,
    FailureInputReceivedPayload,
    FeedbackReceivedPayload,
    MassObservedPayload,
    PatchPublishedPayload,
    Payload,
)
from cegraph.daemon.store import EventStore

ROOT = Path(events.__file__).resolve().parents[1]
# every payload type but those whose spans the store keeps apart (`event_spans`): an execution's, here
# or received (tests/daemon/detect/test_failures_feed.py reads those back through the projections)
SPAN_CARRYING = (ExecutionCompletedPayload, FailureInputReceivedPayload)
PAYLOADS = [
    t
    for t in vars(events).values()
    if isinstance(t, type) and issubclass(t, Payload) and t not in (Payload, *SPAN_CARRYING)
]


def test_a_field_the_payload_does_not_have_fails_when_the_sql_is_built():
    with pytest.raises(AttributeError, match="MassObserved payloads have no field 'masss'"):
        MassObservedPayload.sql("masss", "DOUBLE")
    with pytest.raises(AttributeError, match="FeedbackReceived payloads have no field 'verdict'"):
        FeedbackReceivedPayload.sql("verdict")


@pytest.mark.parametrize("payload_type", PAYLOADS, ids=[t.__name__ for t in PAYLOADS])
def test_every_field_written_is_read_back_by_its_own_sql(payload_type, tmp_path):
    values = {f.name: f"{f.name}-value" for f in fields(payload_type)}
    store = EventStore(tmp_path / "s.duckdb")
    try:
        store.append([payload_type(**values).event("key")])
        read = store.query(
            "SELECT " + ", ".join(payload_type.sql(name) for name in values) + " FROM events WHERE type = ?",
            payload_type.TYPE,
        )
    finally:
        store.close()
    assert read == [tuple(values.values())]


def test_typed_values_keep_their_types_through_a_cast(tmp_path):
    store = EventStore(tmp_path / "s.duckdb")
    try:
        store.append([PatchPublishedPayload("cegraph.patches", 3, 41, "wf@1.1.0#abc").event("wf")])
        decided = CanaryDecidedPayload("wf", "1.1.0", "1.0.0", "promote", "better", 12.5, {"alpha": 0.05})
        store.append([decided.event("wf@1.1.0")])
        [(partition, offset)] = store.query(
            f"SELECT {PatchPublishedPayload.sql('partition', 'INTEGER')}, "
            f"{PatchPublishedPayload.sql('offset', 'BIGINT')} FROM events WHERE type = ?",
            PatchPublishedPayload.TYPE,
        )
        [(alpha, decided_at)] = store.query(
            f"SELECT ({CanaryDecidedPayload.json('statistics')}->>'alpha')::DOUBLE, "
            f"{CanaryDecidedPayload.sql('decided_at', 'DOUBLE')} FROM events WHERE type = ?",
            CanaryDecidedPayload.TYPE,
        )
    finally:
        store.close()
    assert (partition, offset, alpha, decided_at) == (3, 41, 0.05, 12.5)


def test_no_sql_in_the_daemon_spells_a_payload_path_by_hand():
    """The one place that writes `payload->>'...'` is the payload types' own helper."""
    spelled = re.compile(r"payload->>?'")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("daemon", "connectors")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "events.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if spelled.search(line)
    ]
    assert found == []
