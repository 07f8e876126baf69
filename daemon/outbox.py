"""Outboxes, and the one stage that publishes them all with one promise: every entry reaches its topic
exactly once.

What one stage decides and another party must hear (a signed patch, a canary decision) waits in the
event log as an outbox entry. The `OutboxPublisher` stage sends the due entries in log order through a
`Transport` (Kafka, or in-process for the embedded daemon), each acknowledged before the next, and
records each as sent (`PatchPublished`, `RolloutPublished`) in the transaction that moves its
checkpoint: the position is the first entry not sent yet (a held one: unsigned, awaiting approval),
the snapshot the entries after it that were sent. A crash between a send and its commit would send
again, so on open the publisher reads what the topic already holds (the `cegraph.outbox.id` header,
or the outbox's own reading of an older message) and records those entries as sent instead. One
publisher per outbox and store: nothing else sends from it meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cegraph.daemon.events import Event
from cegraph.daemon.stage import Checkpoint, Step

ID_HEADER = "cegraph.outbox.id"


@dataclass(frozen=True, slots=True)
class Location:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    seq: int  # of the event that put it in the outbox
    id: str  # what identifies it on the topic
    key: str  # the message key: the workflow id, so one workflow's messages stay in order
    value: bytes
    due: bool  # False while it is held
    headers: dict[str, str] = field(default_factory=dict)


class Outbox(Protocol):
    name: str  # "patches", "rollouts": the publisher's stage is `publish.<name>`

    def entries(self, since: int) -> list[OutboxEntry]:
        """The entries recorded at or after seq `since`, in log order, held ones included."""
        ...

    def sent(self, entry: OutboxEntry, location: Location) -> Event:
        """The event that records `entry` as sent to `location`."""
        ...

    def identify(self, value: bytes) -> str | None:
        """The id of a message on the topic that carries no id header (sent by an older cegraph)."""
        ...


class Transport(Protocol):
    def send(self, entry: OutboxEntry) -> Location:
        """Send and wait for the acknowledgement."""
        ...

    def on_topic(self) -> Iterable[tuple[dict[str, str], bytes, Location]]:
        """Every message the topic holds now: headers, value, where."""
        ...

    def close(self) -> None: ...


class OutboxPublisher:
    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        *,
        batch: int = 100,
        on_sent: Callable[[OutboxEntry], object] | None = None,
    ) -> None:
        """`batch`: the most entries one step sends (a step is one commit)."""
        self.name = f"publish.{outbox.name}"
        self.batch = batch
        self.outbox = outbox
        self.transport = transport
        self.on_sent = on_sent
        self.position = 1
        self.sent: dict[str, int] = {}  # id -> seq of the entries at or after `position` already sent
        self.found: dict[str, Location] = {}  # on the topic, not recorded as sent

    def open(self, checkpoint: Checkpoint) -> None:
        self.position = checkpoint.position
        self.sent = dict(checkpoint.snapshot.get("sent", {}))
        unsent = {entry.id for entry in self.outbox.entries(self.position) if entry.id not in self.sent}
        self.found = {}
        if unsent:
            for headers, value, location in self.transport.on_topic():
                found = headers.get(ID_HEADER) or self.outbox.identify(value)
                if found in unsent:
                    self.found.setdefault(found, location)

    def poll(self) -> Step | None:
        """Send the due entries (at most `batch`), record each as sent, hold the rest."""
        entries = [entry for entry in self.outbox.entries(self.position) if entry.id not in self.sent]
        events: list[Event] = []
        waiting: list[int] = []  # seqs of the entries still to send
        sends = 0
        for entry in entries:
            if sends == self.batch:
                waiting.append(entry.seq)
                continue
            location = self.found.pop(entry.id, None)
            if location is None and entry.due:
                location = self.transport.send(entry)
                sends += 1
                if self.on_sent is not None:
                    self.on_sent(entry)
            if location is None:
                waiting.append(entry.seq)
            else:
                events.append(self.outbox.sent(entry, location))
                self.sent[entry.id] = entry.seq
        position = min(waiting, default=max((entry.seq + 1 for entry in entries), default=self.position))
        if not events and position == self.position:
            return None
        self.position = position
        self.sent = {id_: seq for id_, seq in self.sent.items() if seq >= position}
        return Step(events, Checkpoint(position, {"sent": self.sent}))

    def close(self) -> None:
        self.transport.close()


@dataclass
class InProcessTransport:
    """The embedded daemon's topic: delivers to callables, numbers the messages, keeps nothing."""

    topic: str
    deliver: list[Callable[[OutboxEntry], object]] = field(default_factory=list)
    offset: int = 0

    def send(self, entry: OutboxEntry) -> Location:
        for deliver in self.deliver:
            deliver(entry)
        self.offset += 1
        return Location(self.topic, 0, self.offset - 1)

    def on_topic(self) -> Iterable[tuple[dict[str, str], bytes, Location]]:
        return ()

    def close(self) -> None:
        return None
