"""The Kafka edge of the ingest stage: a faststream batch subscriber on the spans and feedback topics.

Commit semantics (as in arroyo): the source of truth for offsets is DuckDB, written by the pipeline's
`flush()` together with the events; afterwards the same offsets are committed to Kafka too, so that
lag tooling and the group's other members see them (with the stages apart, only once the failures
publisher has sent on what they cover: `handed_on`). A rebalance hands partitions over: the member
losing them stores what is complete, commits, forgets the rest and handles nothing until its next
assignment; the member getting one seeks to the further of its stored offset and the group's
committed one.
With the stages apart, a member's store is one of several: what the group reads again elsewhere must
leave it. So a member losing partitions (at a rebalance, or by a crash, found when it starts again)
gives up what it stored from its last commit of each on (`give_up`, `reread_from`).
Dead letters are published (and acknowledged by the broker) before the flush that moves past them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import IllegalStateError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.prometheus import KafkaPrometheusMiddleware

from cegraph.connectors.kafka.client import group_offsets, make_broker, raw_body
from cegraph.daemon.ingest.pipeline import (
    DeadLetter,
    FlushResult,
    IngestPipeline,
    InMessage,
    PartitionsRead,
)
from cegraph.daemon.settings import Settings
from cegraph.daemon.stage import Checkpoint
from cegraph.daemon.store import COMMITTING, CONFIRMED

log = logging.getLogger("cegraph.ingest")

DLQ_REASON = "cegraph.dlq.reason"
LAG_INTERVAL_S = 5.0
UNKNOWN_END = 2**62  # a partition not fetched from yet: not caught up
HAND_OVER_WAIT_S = 30.0  # how long a rebalance waits for stored events to be sent on
HANDED_KEPT = 8  # members whose hand-over of a partition each commit's metadata passes on
Partition = tuple[str, int]  # topic, partition


def keyed(offsets: Mapping[Partition, int]) -> dict[str, int]:
    """Offsets as a cursor's snapshot keeps them: "topic/partition" -> offset."""
    return {f"{topic}/{partition}": at for (topic, partition), at in sorted(offsets.items())}


def unkeyed(checkpoint: Checkpoint | None) -> dict[Partition, int]:
    """The "group" offsets of a CONFIRMED or COMMITTING cursor (none in stores from before them)."""
    group = checkpoint.snapshot.get("group", {}) if checkpoint is not None else {}
    return {(key.rsplit("/", 1)[0], int(key.rsplit("/", 1)[1])): at for key, at in group.items()}


def handed_over(found: tuple[int, str] | None) -> dict[str, int]:
    """Per member, the offset at which a later owner of the partition found that member's last commit:
    what the metadata of the commit `found` passes on, and its own committer's at its offset (the
    most recent last, `HANDED_KEPT` of them). Metadata another client wrote says nothing."""
    if found is None:
        return {}
    offset, metadata = found
    try:
        said = orjson.loads(metadata) if metadata else {}
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(said, dict) or not isinstance(said.get("handed", {}), dict):
        return {}
    by = said.get("by")
    handed = {m: at for m, at in said.get("handed", {}).items() if m != by and isinstance(at, int)}
    if isinstance(by, str):
        handed[by] = offset
    return dict(list(handed.items())[-HANDED_KEPT:])


def commit_metadata(member: str, handed: dict[str, int]) -> str:
    """What a commit says besides its offset: who made it, and the hand-overs it passes on."""
    return orjson.dumps({"by": member, "handed": {m: at for m, at in handed.items() if m != member}}).decode()


def reread_from(
    known: int | None, committing: int | None, group: int | None, first: int, handed: int | None = None
) -> int | None:
    """Where the consumer group reads a partition again from once this member stopped reading it: the
    group's offset at that moment, which is this member's last commit that took, or the offset it
    found at assignment when none did.

    `handed`, the offset at which the group's metadata says a later owner found this member's last
    commit (or its commit is the group's offset still), is exact; `known`, the last offset the member
    noted the group held, is behind it only when the member was killed after a commit took and
    before it noted it. Without `handed` (a hand-over passed on too long ago, a store from before
    these were recorded), the commit it was making (`committing`) is taken as having taken when the
    group holds at least as much now (had it not, and others moved past it since, what lies between
    is kept here and stored there too: twice, never lost); a store from before `known` was recorded
    takes the group's offset now, likewise. Never below `first`, the partition's first offset (nobody
    reads again what retention deleted). None when nothing says: nothing is given up.
    """
    if handed is not None:
        return max(handed, known if known is not None else handed, first)
    at = known if known is not None else group
    if at is None:
        return None
    if committing is not None and committing > at and group is not None and group >= committing:
        at = committing
    return max(at, first)


def dead_letter_headers(letter: DeadLetter) -> dict[str, str]:
    message = letter.message
    headers = {k: v.decode(errors="replace") for k, v in message.headers.items()}
    return {
        **headers,
        DLQ_REASON: letter.reason[:1000],
        "cegraph.dlq.topic": message.topic,
        "cegraph.dlq.partition": str(message.partition),
        "cegraph.dlq.offset": str(message.offset),
    }


class _HandOver(ConsumerRebalanceListener):
    def __init__(self, source: KafkaIngestSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.source.hand_over(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.source.seek_to_stored(assigned)


class KafkaIngestSource:
    def __init__(
        self,
        settings: Settings,
        pipeline: IngestPipeline,
        broker: KafkaBroker | None = None,
        after_flush: Callable[[], object] | None = None,
        backpressure: Callable[[], object] | None = None,
        handed_on: Callable[[], int] | None = None,
    ) -> None:
        """`after_flush` is called after each flush that stored events (it tells the next stage there
        is work: it must return at once); `backpressure` blocks (in a worker thread) before each batch
        while a later stage is too far behind. `handed_on` is the store position below which a later
        stage has sent every event on (the failures publisher of an ingest-only member): offsets are
        committed to Kafka only once what they cover has left, so a member killed before that leaves
        it to the partition's next owner. Without it, the store is where events stay."""
        self.after_flush = after_flush
        self.backpressure = backpressure
        self.handed_on = handed_on
        # the store is not where executions stay but one of the members' (the stages apart): what the
        # group reads again elsewhere must leave it (`give_up`)
        self.gives_up = handed_on is not None
        self._group: dict[Partition, int] = {}  # the group's offsets as this member last knew them
        self._member = uuid.uuid4().hex[:16]  # the store's, once it is read (its commits say it)
        self._handed: dict[Partition, dict[str, int]] = {}  # what the commit found at assignment passed on
        self._starts: dict[int, int] = {}  # spans partition -> the offset reading it began at
        # the partitions handed to this member and sought to their stored offsets: between a revoke
        # and the next assignment, none (a batch fetched before the revoke is not this member's)
        self._reading: set[TopicPartition] = set()
        # (store position stored below, the offsets that makes committable), oldest first
        self._uncommitted: list[tuple[int, dict[tuple[str, int], int]]] = []
        self.settings = settings
        self.pipeline = pipeline
        self.broker = broker or make_broker(
            settings.kafka, middlewares=[KafkaPrometheusMiddleware(registry=pipeline.metrics.registry)]
        )
        self._lock = asyncio.Lock()
        self._failures = 0  # consecutive failed flushes or recoveries: the backoff's exponent
        self._set_ready(True)
        self._flusher: asyncio.Task[None] | None = None
        self._lag: asyncio.Task[None] | None = None
        kafka, ingest = settings.kafka, settings.ingest
        # With a logs topic, the range assignor gives partition i of every topic to the same member:
        # keyed by trace id alike (and as many partitions), a trace's logs meet its spans there.
        logs = {"partition_assignment_strategy": (RangePartitionAssignor,)} if kafka.logs_topic else {}
        self.subscriber = self.broker.subscriber(
            kafka.spans_topic,
            kafka.feedback_topic,
            *([kafka.logs_topic] if kafka.logs_topic else []),
            **logs,
            batch=True,
            group_id=kafka.group_id,
            auto_offset_reset="earliest",
            max_records=ingest.batch_size,
            max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
            batch_timeout_ms=ingest.batch_timeout_ms,
            listener=_HandOver(self),
            decoder=raw_body,
            ack_policy=AckPolicy.MANUAL,
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=max(kafka.session_timeout_ms // 3, 100),
        )
        self.subscriber(self._handle)

    async def hand_over(self, revoked: Any) -> None:
        """Before a rebalance moves partitions: store what is complete, commit to Kafka how far that
        is, and forget everything not stored. Its messages are read again from the committed offsets,
        by this member or by the partition's next owner, which starts where this one stopped."""
        if not revoked:
            return
        async with self._lock:
            self._reading.clear()
            try:
                await self._flush_locked()
                await self._wait_handed_on(HAND_OVER_WAIT_S)
                if self.gives_up:
                    await self.give_up({(tp.topic, tp.partition) for tp in revoked}, reason="hand-over")
            except Exception as error:  # not stored, not committed: read again from the stored offsets
                log.warning("hand-over before a rebalance failed: %s: %s", type(error).__name__, error)
            self.pipeline.reset()
            self._uncommitted.clear()
            self._starts = {}
        log.info("handed over %d partition(s) for a rebalance", len(revoked))

    async def seek_to_stored(self, assigned: Any) -> None:
        """Each assigned partition from where its messages stop being stored: the offset this store
        holds or the group's committed one (another member's progress), whichever is further; from the
        beginning when there is neither."""
        consumer = self.subscriber.consumer
        if consumer is None:
            return
        stored = await asyncio.to_thread(self.pipeline.stored_offsets)
        kafka = self.settings.kafka
        wanted = [(tp.topic, tp.partition) for tp in assigned]
        found, firsts = await asyncio.to_thread(group_offsets, kafka, kafka.group_id, wanted)
        committed = {tp: at[0] if (at := found.get(tp)) else None for tp in wanted}
        known = {tp: [o for o in (stored.get(tp), committed[tp]) if o is not None] for tp in wanted}
        if wanted:  # where the group reads these again should this member stop reading them
            self._group.update({tp: at or 0 for tp, at in committed.items()})
            self._handed.update({tp: handed_over(found.get(tp)) for tp in wanted})
            await asyncio.to_thread(self._confirm, None)
        # From the first seek until they are read, nothing awaits: a batch handled in between would
        # be of positions from before the seeks, dropped as stale, and then skipped for good.
        for topic, partition in wanted:
            tp = (topic, partition)
            if topic == kafka.spans_topic:
                self._starts[partition] = max(known[tp], default=0)
            at = max(known[tp]) if known[tp] else firsts[tp]
            consumer.seek(TopicPartition(topic, partition), at)
            log.info("seek %s[%d] to offset %d (stored %s, committed %s)", topic, partition, at,
                     stored.get(tp), committed[tp])  # fmt: skip
        self._reading.update(assigned)

    async def _handle(self, bodies: list[bytes], message: KafkaMessage) -> None:
        records = message.raw_message if isinstance(message.raw_message, tuple) else (message.raw_message,)
        if self.backpressure is not None:
            await asyncio.to_thread(self.backpressure)
        async with self._lock:
            batch = [
                InMessage(r.topic, r.partition, r.offset, r.value or b"", r.key, dict(r.headers or ()))
                for r in await self._current(records)
            ]
            try:
                # off the event loop, which meanwhile takes in the fetches of the next batches
                dead = await asyncio.to_thread(self.pipeline.handle, batch)
                for letter in dead:
                    await self.broker.publish(
                        letter.message.value,
                        topic=self.settings.kafka.dlq_topic,
                        key=letter.message.key,
                        headers=dead_letter_headers(letter),
                    )
                await self._flush_locked()
            except Exception as error:
                # Never let faststream skip the batch: what is not stored is read again after recovery.
                await self._recover(error)

    async def _current(self, records: tuple[Any, ...]) -> list[Any]:
        """The records of partitions this consumer still reads from where they were fetched.

        A batch is fetched before its handler waits for the lock; meanwhile the periodic flush may
        have failed and seeked every partition back to its stored offset, or a rebalance begun:
        from the revoke to the next assignment this member reads nothing (the consumer still
        answers for the old assignment then). Such records lie ahead of where reading resumes: they
        are read again in order, and handling them now would store offsets past the messages in
        between, so that a commit would skip those messages for good.
        """
        consumer = self.subscriber.consumer
        if consumer is None or not records:
            return list(records)
        ends: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            ends[tp] = max(ends.get(tp, -1), record.offset + 1)
        stale = {tp for tp in ends if tp not in self._reading}
        for tp, end in ends.items():
            try:
                position = await consumer.position(tp)
            except IllegalStateError:  # revoked since the fetch
                position = -1
            if end > position:
                stale.add(tp)
        if stale:
            log.info("dropping records fetched before a seek or rebalance: %s", sorted(stale))
        return [r for r in records if TopicPartition(r.topic, r.partition) not in stale]

    async def flush(self) -> FlushResult:
        async with self._lock:
            try:
                return await self._flush_locked()
            except Exception as error:
                await self._recover(error)
                return FlushResult()

    async def _flush_locked(self) -> FlushResult:
        result = await asyncio.to_thread(self.pipeline.flush, read=self._partitions_read())
        self._failures = 0
        if result.events:
            self._uncommitted.append(
                (self.pipeline.store.last_seq() + 1, self.pipeline.pending.committable())
            )
            if self.after_flush is not None:
                self.after_flush()
        await self._commit_to_kafka()
        return result

    async def _wait_handed_on(self, timeout_s: float) -> None:
        """Commit what a later stage sends on meanwhile, until everything stored is committed or
        `timeout_s` passed, or the group refused a commit (the rest is read again by the partitions'
        next owners)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._uncommitted and loop.time() < deadline:
            await asyncio.sleep(0.05)
            if not await self._commit_to_kafka():
                return

    def assigned(self) -> list[int]:
        """The spans partitions this member reads now: the part of the deployment its store covers."""
        return sorted(self._partitions_read().ends)

    def _partitions_read(self) -> PartitionsRead:
        """The spans partitions this member reads: each one's end offset as the last fetch saw it
        (not fetched yet: unknown, so not caught up), where reading began, and how many there are."""
        consumer = self.subscriber.consumer
        topic = self.settings.kafka.spans_topic
        if consumer is None:
            return PartitionsRead({}, {}, None)
        ends = {
            tp.partition: consumer.highwater(tp) if consumer.highwater(tp) is not None else UNKNOWN_END
            for tp in consumer.assignment()
            if tp.topic == topic
        }
        known = consumer.partitions_for_topic(topic)
        return PartitionsRead(ends, dict(self._starts), len(known) if known else None)

    async def _recover(self, error: Exception) -> None:
        """What was not stored is forgotten and read again from the offsets DuckDB holds.

        Holds the lock until the store takes a write again, so nothing more is consumed meanwhile
        (the consumer's lag grows, visibly); `/readyz` answers 503 from the first failure until then.
        Attempts back off exponentially, across failed flushes too (a disk that is still full).
        """
        self._set_ready(False)
        self.pipeline.metrics.store_failures.inc()
        log.error("ingest stopped: %s: %s; reopening the store", type(error).__name__, error)
        while True:
            self._failures += 1
            ingest = self.settings.ingest
            delay = ingest.recovery_initial_s * 2 ** min(self._failures - 1, 30)
            await asyncio.sleep(min(ingest.recovery_max_s, delay))
            try:
                await asyncio.to_thread(self._reload)
                await self._seek_after_reset()
            except Exception as cause:
                self.pipeline.metrics.recoveries.labels("failed").inc()
                log.warning("recovery attempt %d failed: %s: %s", self._failures, type(cause).__name__, cause)
                continue
            self.pipeline.metrics.recoveries.labels("succeeded").inc()
            log.warning("ingest resumed from the stored offsets after %d attempt(s)", self._failures)
            self._set_ready(True)
            return

    def _reload(self) -> None:
        """Reopen the store, prove it takes a write, and reload the pipeline's state from it."""
        store = self.pipeline.store
        store.reopen()
        store.append([], store.offsets())
        self.pipeline.reset()

    async def _seek_after_reset(self) -> None:
        consumer = self.subscriber.consumer
        if consumer is not None:
            await self.seek_to_stored(consumer.assignment())

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.pipeline.metrics.ingest_ready.set(1 if ready else 0)

    async def _commit_to_kafka(self) -> bool:
        """Commit the offsets of the latest flush whose events have all been sent on, and note in
        the store how far the group knows this member stored: what it stored after that is in doubt
        until the next commit (`stats` counts it as unconfirmed; a member killed in between gives it
        up when it starts again). A member that gives up notes the commit first (COMMITTING): after
        a crash, it may have taken. False when the commit failed."""
        consumer = self.subscriber.consumer
        handed_on = self.handed_on() if self.handed_on is not None else float("inf")
        ready = [entry for entry in self._uncommitted if entry[0] <= handed_on]
        if consumer is None or not ready:
            return True
        stored_until, committable = ready[-1]
        assigned = consumer.assignment()
        offsets = {
            (topic, partition): offset
            for (topic, partition), offset in committable.items()
            if TopicPartition(topic, partition) in assigned
        }
        try:
            if offsets:
                if self.gives_up:
                    cursors = {COMMITTING: Checkpoint(stored_until, {"group": keyed(offsets)})}
                    await asyncio.to_thread(self.pipeline.store.append, [], cursors=cursors)
                await consumer.commit(
                    {
                        TopicPartition(*tp): (offset, commit_metadata(self._member, self._handed.get(tp, {})))
                        for tp, offset in offsets.items()
                    }
                )
                self._group.update(offsets)
            await asyncio.to_thread(self._confirm, stored_until)
        except Exception as error:  # best effort: DuckDB holds the offsets that matter; next time
            log.debug("kafka offset commit skipped: %s", error)
            return False
        del self._uncommitted[: len(ready)]
        return True

    def _confirm(self, position: int | None, committing: dict[Partition, int] | None = None) -> None:
        """Note in the store how far the group knows this member stored (`position`; None: as noted
        before) and the group's offsets as it knows them; `committing`: the commit still in doubt."""
        store = self.pipeline.store
        if position is None:
            noted = store.cursor(CONFIRMED)
            position = noted.position if noted is not None else store.last_seq() + 1
        cursors = {CONFIRMED: Checkpoint(position, {"member": self._member, "group": keyed(self._group)})}
        if committing is not None:
            cursors[COMMITTING] = Checkpoint(position, {"group": keyed(committing)})
        store.append([], cursors=cursors)

    async def give_up(self, partitions: Iterable[Partition], *, reason: str) -> list[str]:
        """Leave to the consumer group what it reads again once this member does not read these
        partitions: the pipeline retracts what this store holds of them from `reread_from` on. Then
        nothing stored is in doubt any more. Returns the trace ids retracted."""
        wanted = sorted(set(partitions))
        if not wanted:
            return []
        kafka, store = self.settings.kafka, self.pipeline.store
        group, firsts = await asyncio.to_thread(group_offsets, kafka, kafka.group_id, wanted)
        committing = unkeyed(await asyncio.to_thread(store.cursor, COMMITTING))
        cut = {}
        for tp in wanted:
            found = group.get(tp)
            at = reread_from(
                self._group.get(tp), committing.get(tp), found[0] if found else None, firsts.get(tp, 0),
                handed_over(found).get(self._member),
            )  # fmt: skip
            if at is not None:
                cut[tp] = at
        retracted = await asyncio.to_thread(self.pipeline.give_up, cut, reason=reason)
        self._group.update(cut)
        still = {tp: at for tp, at in committing.items() if tp not in cut}
        await asyncio.to_thread(self._confirm, store.last_seq() + 1, still)
        log.info(
            "gave up %d execution(s) at a %s; the group reads again from %s",
            len(retracted),
            reason,
            keyed(cut),
        )
        return retracted

    async def give_up_after_a_crash(self) -> list[str]:
        """Before joining the group: what a crash may have left in the store past the member's last
        commit, the group has read again elsewhere since, or will (with the stages apart)."""
        confirmed = await asyncio.to_thread(self.pipeline.store.cursor, CONFIRMED)
        self._group = unkeyed(confirmed)
        if confirmed is not None:
            self._member = confirmed.snapshot.get("member", self._member)
        if not self.gives_up:
            return []
        kafka = self.settings.kafka
        read = {kafka.spans_topic, kafka.feedback_topic, kafka.logs_topic} - {""}
        stored = await asyncio.to_thread(self.pipeline.stored_offsets)
        return await self.give_up([tp for tp in stored if tp[0] in read], reason="restart")

    async def start(self) -> None:
        await self.give_up_after_a_crash()
        await self.broker.start()
        self._flusher = asyncio.create_task(self._flush_periodically())
        self._lag = asyncio.create_task(self._measure_lag_periodically())

    async def stop(self) -> None:
        for task in (self._flusher, self._lag):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.broker.stop()
        async with self._lock:
            try:  # one last try; what it cannot store is read again at the next start
                await self._flush_locked()
            except Exception as error:
                log.error("the last flush failed (%r); the next start re-reads it", error)

    async def _flush_periodically(self) -> None:
        """Idle traces complete on time even when no message arrives; `flush()` never raises."""
        interval = self.settings.ingest.batch_timeout_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self.flush()

    async def measure_lag(self) -> dict[str, int]:
        """Per topic, messages of this consumer's partitions that are not stored yet: the latest offset
        minus the offset DuckDB holds (or the earliest offset, before anything was stored)."""
        consumer = self.subscriber.consumer
        assigned = list(consumer.assignment()) if consumer is not None else []
        if consumer is None or not assigned:
            return {}
        ends = await consumer.end_offsets(assigned)
        starts = await consumer.beginning_offsets(assigned)
        stored = await asyncio.to_thread(self.pipeline.stored_offsets)
        lag: dict[str, int] = {}
        for tp in assigned:
            position = stored.get((tp.topic, tp.partition), starts[tp])
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, ends[tp] - position)
        for topic, behind in lag.items():
            self.pipeline.metrics.consumer_lag.labels(topic).set(behind)
        return lag

    async def _measure_lag_periodically(self) -> None:
        while True:
            try:
                await self.measure_lag()
            except Exception as error:  # a metric only: the next round tries again
                log.debug("measuring the consumer lag failed: %s", error)
            await asyncio.sleep(LAG_INTERVAL_S)
