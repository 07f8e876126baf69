"""The ingest stage: messages in, executions and feedback out, exactly once in effect.

Transport-neutral: the Kafka source and the embedded (in-process) transport both hand it `InMessage`s
and publish the `DeadLetter`s it returns. Nothing is stored per message; `flush()` writes the events
of everything that became final, together with the offsets that are safe to restart from, in one
DuckDB transaction. After a crash the consumer re-reads from those offsets; spans that were already
stored are recognised and dropped, so nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import orjson
from pydantic import ValidationError

from cegraph.connectors.otlp.codec import COLUMNAR_DECODERS
from cegraph.daemon.events import (
    EXECUTION_AMENDED,
    EXECUTION_COMPLETED,
    FEEDBACK_RECEIVED,
    INGEST_ADVANCED,
    MESSAGE_DEAD_LETTERED,
    Event,
    ExecutionsRetractedPayload,
    IngestAdvancedPayload,
)
from cegraph.daemon.ingest.assembly import Assembled, MessageRef, PendingOffsets, TraceAssembler
from cegraph.daemon.ingest.normalize import (
    TextPolicy,
    log_details,
    normalize,
    normalize_columns,
    with_log_details,
)
from cegraph.daemon.metrics import IngestMetrics
from cegraph.daemon.settings import IngestSettings
from cegraph.daemon.spans import InvalidMessage, Node, SpanLog, SpanRecord
from cegraph.daemon.store import MESSAGE_EVENTS, EventStore
from cegraph.daemon.stored_keys import StoredKeys
from cegraph.schemas.feedback import Feedback

Decoder = Callable[[bytes], list[SpanRecord]]
LogDecoder = Callable[[bytes], list[SpanLog]]
# Late spans of the traces stored last go straight to the next flush's amendment; an older trace's late
# span waits out an idle timeout in the assembler and is then recognised by the stored-trace check.
# Both amend; the window only decides which path, so it stays small (ids cost ~180 bytes each).
RECENT_TRACES = 20_000


@dataclass(slots=True)
class InMessage:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: dict[str, bytes] = field(default_factory=dict)

    @property
    def ref(self) -> MessageRef:
        return (self.topic, self.partition, self.offset)


@dataclass(slots=True)
class DeadLetter:
    message: InMessage
    reason: str


@dataclass(frozen=True, slots=True)
class PartitionsRead:
    """The spans partitions a consumer reads now, as its progress report needs them."""

    ends: dict[int, int]  # each one's end offset as the last fetch saw it
    starts: dict[int, int]  # where reading it began: every message below was stored, here or before
    count: int | None  # how many partitions the topic has (None: not known yet)


@dataclass(slots=True)
class FlushResult:
    completed: int = 0
    incomplete: int = 0
    amended: int = 0
    events: int = 0


def message_nodes(payload: bytes, decode: Decoder, policy: TextPolicy) -> list[Node]:
    """One spans message as nodes, or an exception that sends it to the dead-letter topic.

    The nodes are typed as the store's span table wants them (by construction in the decoders and
    `normalize`), so nothing in a message that gets past this can fail a later batch.
    """
    return [normalize(record, policy) for record in decode(payload)]


def batch_nodes(payloads: list[bytes], decode: Decoder, policy: TextPolicy) -> list[list[Node] | Exception]:
    """`message_nodes` of each payload, or the exception it raises; decoded and normalized as one batch
    of columns when the decoder has a columnar twin. A message the columns leave out (or a batch they
    fail on) goes through `message_nodes`, so each still fails alone and with its own reason."""
    out: list[list[Node] | Exception] = [[] for _ in payloads]
    suspect = list(range(len(payloads)))
    columnar = COLUMNAR_DECODERS.get(decode)
    if columnar is not None and payloads:
        try:
            batch = columnar(payloads)
            nodes = normalize_columns(batch, policy)
        except Exception:  # then each message on its own says what is wrong with it
            pass
        else:
            bounds = np.searchsorted(batch.message, np.arange(len(payloads) + 1)).tolist()
            out = [nodes[bounds[i] : bounds[i + 1]] for i in range(len(payloads))]
            suspect = batch.suspect
    for index in suspect:
        try:
            out[index] = message_nodes(payloads[index], decode, policy)
        except Exception as error:  # whatever one message makes fail stays with that message
            out[index] = error
    return out


def dead_letter_reason(error: Exception) -> str:
    """A decoder's own errors say what is wrong; anything else also names its type."""
    if isinstance(error, InvalidMessage):
        return str(error)
    return f"{type(error).__name__}: {error}"[:1000]


def dead_letter_key(message: InMessage) -> str:
    """A message's coordinates and a digest of its bytes: the same message read again has the same key,
    another message at the same coordinates (a recreated topic) does not."""
    digest = hashlib.blake2b(message.value, digest_size=8).hexdigest()
    return f"{message.topic}/{message.partition}/{message.offset}/{digest}"


def feedback_key(feedback: Feedback) -> str:
    """What makes two feedback messages the same signal, wherever and however often they arrive: the
    execution, the span, who said it, the verdict, and digests of the critique and the expected output
    (a corrected expected output is a new signal)."""
    said = orjson.dumps([feedback.critique, feedback.expected], option=orjson.OPT_SORT_KEYS)
    digest = hashlib.blake2b(said, digest_size=8).hexdigest()
    span = feedback.span_id or ""
    return f"feedback/{feedback.trace_id}/{span}/{feedback.source}/{feedback.outcome}/{digest}"


class PipelineNeedsReset(RuntimeError):
    """A flush failed: what is in memory may disagree with the store until `reset()` succeeds."""


@dataclass(slots=True)
class _Late:
    nodes: dict[str, Node] = field(default_factory=dict)
    messages: set[MessageRef] = field(default_factory=set)


class IngestPipeline:
    def __init__(
        self,
        store: EventStore,
        decode: Decoder,
        settings: IngestSettings,
        *,
        spans_topic: str,
        feedback_topic: str,
        metrics: IngestMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        logs_topic: str = "",
        decode_logs: LogDecoder | None = None,
    ) -> None:
        """`logs_topic` (with `decode_logs`): log records to join to their spans; "" reads none."""
        self.store = store
        self.decode = decode
        self.spans_topic = spans_topic
        self.feedback_topic = feedback_topic
        self.logs_topic = logs_topic
        self.decode_logs = decode_logs
        self.metrics = metrics or IngestMetrics()
        self.clock = clock
        self.settings = settings
        self.policy = TextPolicy(max_chars=settings.max_text_chars, redact=settings.redact)
        self.reset()

    def reset(self) -> None:
        """Forget everything not yet stored; the consumer must then seek to `stored_offsets()`."""
        self._needs_reset = True  # until the store has answered below
        self.assembler = TraceAssembler(
            idle_timeout_s=self.settings.idle_timeout_s,
            max_age_s=self.settings.max_trace_age_s,
            max_open=self.settings.max_open_traces,
            join_logs=with_log_details,
        )
        self.pending = PendingOffsets()
        self._stored = self.store.offsets()  # below these, every message is already fully stored
        self._events: list[Event] = []
        self._forced_out: list[Assembled] = []
        self._late: dict[str, _Late] = {}
        self._reported = self._last_report()  # per spans partition, what the last report said
        # traces already stored: their re-read spans go straight to the duplicate check
        self._recent: OrderedDict[str, None] = OrderedDict.fromkeys(
            self.store.recent_trace_ids(RECENT_TRACES)
        )
        self._stored_traces = StoredKeys(self.store.trace_ids, self.store.execution_count)
        self._recorded_messages = StoredKeys(self.store.message_keys, self.store.message_key_count)
        self._needs_reset = False

    def _check_usable(self) -> None:
        if self._needs_reset:
            raise PipelineNeedsReset("a flush failed; reset() and seek to the stored offsets first")

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        """Where to seek on start: the offsets written with the last committed events."""
        return self.store.offsets()

    # ---------------------------------------------------------------- consume

    def handle(self, messages: list[InMessage]) -> list[DeadLetter]:
        """Take a batch of messages; returns those to send to the dead-letter topic.

        Feedback and dead letters are one event per message, keyed by what they are (a feedback's
        content, a dead letter's coordinates and bytes): a message delivered again (a replay after a
        crash, a re-read from offset 0, the same feedback re-sent to any partition) whose event is
        already recorded adds nothing, and is not dead-lettered again.
        """
        self._check_usable()
        now = self.clock()
        dead: list[DeadLetter] = []
        per_message: list[tuple[InMessage, Event, str | None]] = []
        taken: Counter[str] = Counter()  # messages per topic, counted once per batch
        fresh = [m for m in messages if m.offset >= self._stored.get((m.topic, m.partition), 0)]
        spans = [
            m
            for m in fresh
            if m.topic != self.feedback_topic and not (self.logs_topic and m.topic == self.logs_topic)
        ]
        decoded = iter(batch_nodes([m.value for m in spans], self.decode, self.policy))
        try:
            for message in fresh:  # the rest: redeliveries of what is stored (e.g. after a rebalance)
                taken[message.topic] += 1
                if message.topic == self.feedback_topic:
                    event, reason = self._feedback(message)
                elif self.logs_topic and message.topic == self.logs_topic:
                    event, reason = None, self._logs(message, now)
                else:
                    event, reason = None, self._spans(message, next(decoded), now)
                if reason is not None:
                    event = Event(
                        MESSAGE_DEAD_LETTERED, dead_letter_key(message),
                        {"topic": message.topic, "partition": message.partition, "offset": message.offset,
                         "reason": reason},
                    )  # fmt: skip
                if event is not None:
                    per_message.append((message, event, reason))
        finally:  # as if each message were counted when taken
            for topic, count in taken.items():
                self.metrics.messages.labels(topic).inc(count)
        recorded = self._recorded([event for _, event, _ in per_message]) if per_message else set()
        for message, event, reason in per_message:
            self.pending.consumed(message.ref, 0)
            if (event.type, event.key) in recorded:
                self.metrics.duplicate_messages.labels(message.topic).inc()
                continue
            recorded.add((event.type, event.key))
            self._events.append(event)
            if reason is None:
                self.metrics.feedback.labels(event.payload["outcome"]).inc()
            else:
                dead.append(DeadLetter(message, reason))
                self.metrics.dead_letters.labels(message.topic).inc()
        self.metrics.open_traces.set(len(self.assembler))
        return dead

    def _recorded(self, events: list[Event]) -> set[tuple[str, str]]:
        """(type, key) of those events already stored or waiting for the next flush."""
        maybe = self._recorded_messages.maybe(sorted({event.key for event in events}))
        rows = self.store.query(
            "SELECT type, key FROM events WHERE key IN (SELECT unnest(?::VARCHAR[]))", maybe
        ) if maybe else []  # fmt: skip
        recorded = {(kind, key) for kind, key in rows}
        recorded.update((event.type, event.key) for event in self._events)
        return recorded

    def _spans(self, message: InMessage, nodes: list[Node] | Exception, now: float) -> str | None:
        """Take one spans message (its nodes, or why it has none); returns the reason when it must go to
        the dead-letter topic."""
        if isinstance(nodes, Exception):
            return dead_letter_reason(nodes)
        self.metrics.spans.inc(len(nodes))
        fresh: list[Node] = []
        holds = 0
        for node in nodes:
            if node.trace_id in self._recent and not self.assembler.is_open(node.trace_id):
                late = self._late.setdefault(node.trace_id, _Late())
                late.nodes[node.span_id] = node
                if message.ref not in late.messages:
                    late.messages.add(message.ref)
                    holds += 1
            else:
                fresh.append(node)
        if fresh:
            new_holds, evicted = self.assembler.add(fresh, message.ref, now)
            holds += new_holds
            if evicted:
                self._forced_out.extend(evicted)
                self.metrics.evicted.inc(len(evicted))
        self.pending.consumed(message.ref, holds)
        return None

    def _logs(self, message: InMessage, now: float) -> str | None:
        """Log records wait in their trace's assembly; those of a trace already stored are too late to
        change its nodes (counted as `late`: raise the idle timeout if there are many)."""
        assert self.decode_logs is not None, "a logs topic needs a log decoder"
        try:
            logs = [(log.trace_id, log.span_id, log_details(log.event, self.policy))
                    for log in self.decode_logs(message.value)]  # fmt: skip
        except Exception as error:  # whatever one message makes fail stays with that message
            return dead_letter_reason(error)
        waiting = []
        for log in logs:
            if log[0] in self._recent and not self.assembler.is_open(log[0]):
                self.metrics.log_records.labels("late").inc()
            else:
                waiting.append(log)
        holds = 0
        if waiting:
            holds, evicted = self.assembler.add_logs(waiting, message.ref, now)
            self._forced_out.extend(evicted)
            self.metrics.evicted.inc(len(evicted))
        self.pending.consumed(message.ref, holds)
        return None

    def _feedback(self, message: InMessage) -> tuple[Event | None, str | None]:
        try:
            feedback = Feedback.model_validate_json(message.value)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in error.errors()[:5]
            )
            return None, f"invalid feedback: {problems}"
        except Exception as error:
            return None, dead_letter_reason(error)
        return Event(FEEDBACK_RECEIVED, feedback_key(feedback), feedback.model_dump(mode="json")), None

    # ---------------------------------------------------------------- persist

    def flush(self, *, drain: bool = False, read: PartitionsRead | None = None) -> FlushResult:
        """Persist what became final since the last flush, with the offsets it makes safe.

        `read` (the spans partitions the consumer reads now) goes into the progress report the
        detector sequences by (`daemon/detect/sequencer.py`); without it every partition stored is
        taken as caught up, as for an in-process transport that hands over everything it has.

        When it raises, nothing of it may be trusted: the events may or may not be durable (DuckDB can
        commit and then fail its checkpoint), and the offsets in memory have moved past them. So the
        pipeline refuses work until `reset()` has reloaded its state from the store, and the consumer
        re-reads from the stored offsets: what was stored is recognised, the rest is stored again.
        """
        self._check_usable()
        try:
            return self._flush(drain, read)
        except BaseException:
            self._needs_reset = True
            raise

    def _flush(self, drain: bool, read: PartitionsRead | None) -> FlushResult:
        done = self._forced_out + (self.assembler.drain() if drain else self.assembler.poll(self.clock()))
        self._forced_out = []
        late, self._late = self._late, {}
        result = FlushResult()
        if not done and not late and not self._events:
            report = self._progress(self.pending.committable(), read)
            if report is not None:
                self.store.append([report])
            return result
        candidates = [a.trace_id for a in done] + list(late)
        stored = self.store.stored_spans(self._stored_traces.maybe(candidates))
        events = self._events
        self._events = []
        for assembled in done:
            if not assembled.nodes:  # only log records came, never a span: nothing to store
                self.pending.released(assembled.messages)
                continue
            known = stored.get(assembled.trace_id)
            if known is None:
                # Evicted, reopened by later spans and out again before this flush: the second
                # one must amend the first, not become a second execution.
                stored[assembled.trace_id] = {node.span_id for node in assembled.nodes}
                spans = [(o, p) for topic, p, o in assembled.messages if topic == self.spans_topic]
                offset, partition = max(spans, default=(-1, 0))
                first = min((o for o, p in spans if p == partition), default=-1)
                events.append(
                    Event(
                        EXECUTION_COMPLETED,
                        assembled.trace_id,
                        {"trace_id": assembled.trace_id, "complete": assembled.complete,
                         "reason": assembled.reason, "partition": partition, "offset": offset,
                         "first_offset": first, "nodes": assembled.nodes},
                    )
                )  # fmt: skip
                if assembled.complete:
                    result.completed += 1
                else:
                    result.incomplete += 1
            else:
                result.amended += self._amend(events, assembled.trace_id, assembled.nodes, known)
            self.pending.released(assembled.messages)
        for trace_id, pending in late.items():
            result.amended += self._amend(
                events, trace_id, list(pending.nodes.values()), stored.setdefault(trace_id, set())
            )
            self.pending.released(pending.messages)
        offsets = self.pending.committable()
        report = self._progress(offsets, read)
        if report is not None:
            events.append(report)
        with self.metrics.commit_seconds.time():
            self.store.append(events, offsets)
        self._stored.update(offsets)
        self._stored_traces.add(a.trace_id for a in done if a.nodes)
        self._recorded_messages.add(event.key for event in events if event.type in MESSAGE_EVENTS)
        for assembled in done:
            if assembled.nodes:
                self._remember(assembled.trace_id)
        # once per flush, not per trace: a labelled counter costs microseconds a call
        self.metrics.log_records.labels("joined").inc(sum(a.joined_logs for a in done))
        self.metrics.log_records.labels("unmatched").inc(sum(a.unmatched_logs for a in done))
        result.events = len(events)
        self.metrics.executions.labels("complete").inc(result.completed)
        self.metrics.executions.labels("incomplete").inc(result.incomplete)
        self.metrics.amendments.inc(result.amended)
        self.metrics.open_traces.set(len(self.assembler))
        return result

    def give_up(self, cut: dict[tuple[str, int], int], *, reason: str) -> list[str]:
        """Leave to the partitions' next owners what the consumer group reads again: per partition,
        everything from `cut` on (the offset the group reads it from once this member does not).

        The executions whose first spans message lies there are retracted (their next owner reads
        them whole); one that began below is kept, since nobody reads its start again. `cut` becomes
        the stored offset where that is further, so this member, given a partition back, reads the
        retracted ones again. Returns their trace ids.
        """
        self._check_usable()
        stored = self.store.offsets()
        lowered = {tp: at for tp, at in cut.items() if stored.get(tp, at) > at}
        spans = {partition: at for (topic, partition), at in cut.items() if topic == self.spans_topic}
        retracted = self.store.executions_from(spans)
        events = []
        if retracted:
            payload = ExecutionsRetractedPayload(
                self.spans_topic, {str(p): at for p, at in sorted(spans.items())}, retracted, reason
            )
            events.append(payload.event(self.spans_topic))
        if events or lowered:
            try:
                self.store.append(events, lowered)
            except BaseException:  # stored or not: as after a failed flush
                self._needs_reset = True
                raise
            self.reset()
        self.metrics.retracted.labels(reason).inc(len(retracted))
        return retracted

    def _progress(self, offsets: dict[tuple[str, int], int], read: PartitionsRead | None) -> Event | None:
        """How far each spans partition the consumer reads is stored, if that changed since the last
        report: every execution whose messages all lie below a partition's position is in the log
        before the report (or was sent on by the partition's previous owner). Only the partitions
        read now: one this member lost is its new owner's to report."""
        stored = {p: o for (topic, p), o in {**self._stored, **offsets}.items() if topic == self.spans_topic}
        if read is None:
            progress = {p: (at, True) for p, at in sorted(stored.items())}
            count = max(stored, default=-1) + 1
        else:
            positions = {p: max(stored.get(p, 0), read.starts.get(p, 0)) for p in sorted(read.ends)}
            progress = {p: (at, at >= read.ends[p]) for p, at in positions.items()}
            count = read.count if read.count is not None else max(read.ends, default=-1) + 1
        if all(self._reported.get(p) == value for p, value in progress.items()):
            return None
        self._reported.update(progress)
        report = IngestAdvancedPayload(
            topic=self.spans_topic,
            partitions=count,
            progress={str(p): list(value) for p, value in progress.items()},
        )
        return report.event(self.spans_topic)

    def _last_report(self) -> dict[int, tuple[int, bool]]:
        rows = self.store.query(
            "SELECT payload FROM events WHERE type = ? ORDER BY seq DESC LIMIT 1", INGEST_ADVANCED
        )
        if not rows:
            return {}
        return {int(p): (at, done) for p, (at, done) in orjson.loads(rows[0][0])["progress"].items()}

    def _amend(self, events: list[Event], trace_id: str, nodes: list[Node], known: set[str]) -> int:
        """Append the spans not `known` yet as an amendment; they are `known` afterwards."""
        new = [node for node in nodes if node.span_id not in known]
        self.metrics.duplicate_spans.inc(len(nodes) - len(new))
        if not new:
            return 0
        known.update(node.span_id for node in new)
        events.append(Event(EXECUTION_AMENDED, trace_id, {"trace_id": trace_id, "nodes": new}))
        return 1

    def _remember(self, trace_id: str) -> None:
        self._recent[trace_id] = None
        if len(self._recent) > RECENT_TRACES:
            self._recent.popitem(last=False)
