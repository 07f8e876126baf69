"""Every stage after ingest as the conformance suite runs it: the log it reads, how it is built, and
more input arriving while it runs. Also a process entry point, so a stage can be killed for real:

    python tests/stage_cases.py CASE STORE STEPS

opens the stage over STORE, commits STEPS steps, then SIGKILLs itself inside the next commit (after
the step's events are written, before COMMIT).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).parent))

from otel_traces import make_traces, to_messages
from pipeline_fixtures import ingest
from refinement_fixtures import ARITHMETIC_SLIP, EndsAtOnce

from cegraph.daemon.detect.detector import FailureDetector
from cegraph.daemon.detect.naming import ModeNamer
from cegraph.daemon.detect.stage import DetectorStage
from cegraph.daemon.events import (
    CANARY_DECIDED,
    FAILURE_OBSERVED,
    MASS_OBSERVED,
    MODE_EMERGED,
    MODE_MASS_CROSSED,
    MODE_NAMED,
    PATCH_PUBLISHED,
    REFINEMENT_FINISHED,
    REFINEMENT_STARTED,
    ROLLOUT_PUBLISHED,
    Event,
)
from cegraph.daemon.ingest.pipeline import InMessage
from cegraph.daemon.outbox import ID_HEADER, Location, OutboxEntry, OutboxPublisher
from cegraph.daemon.refine.jobs import RefinementScheduler, RefinementStage
from cegraph.daemon.refine.operators import Edit, apply_edit
from cegraph.daemon.refine.patch_outbox import PatchOutbox, created
from cegraph.daemon.refine.signing import sign
from cegraph.daemon.rollout.canary import RolloutOutbox, canary_key
from cegraph.daemon.runner import StageRunner
from cegraph.daemon.settings import DetectorSettings
from cegraph.daemon.stage import Stage
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.llm import Completion
from cegraph.schemas.patch import Cost, Rationale, Verification, WorkflowPatch


@dataclass(frozen=True)
class StageCase:
    name: str
    prepare: Callable[[EventStore], None]  # the log before the stage first runs
    build: Callable[[EventStore], Stage]
    more: Callable[[EventStore, int], None]  # input appended in round i (1, 2, ...) while it runs
    emits: tuple[str, ...]  # the event types the stage writes
    at_least: int  # of them in an uninterrupted run: the comparisons have something to compare
    rounds: int = 2
    on_topic: Callable[[EventStore], object] = lambda store: None  # what the stage sent outside the store


@functools.cache
def _payloads(count: int, seed: int) -> tuple[bytes, ...]:
    """Recorded once per process: the SDK draws random trace ids, and every store must get the same."""
    return tuple(m.value for m in to_messages(make_traces(count, seed=seed)))


def _spans(store: EventStore, count: int, seed: int, first_offset: int) -> None:
    payloads = _payloads(count, seed)
    ingest(store, [InMessage("spans", 0, first_offset + i, value) for i, value in enumerate(payloads)])


DETECT = StageCase(
    "detect",
    prepare=lambda store: _spans(store, 200, seed=21, first_offset=0),
    build=lambda store: DetectorStage(store, lambda: FailureDetector(DetectorSettings()), batch=60),
    more=lambda store, round_: _spans(store, 80, seed=21 + round_, first_offset=1_000 * round_),
    emits=(FAILURE_OBSERVED, MASS_OBSERVED, MODE_EMERGED),
    at_least=50,
)


@dataclass
class FileTopic:
    """A durable topic in a JSONL file beside the store: what the outbox publisher's exactly-once
    promise rests on (a Kafka topic in production; `tests/test_refinement_kafka.py` has that)."""

    path: Path

    def send(self, entry: OutboxEntry) -> Location:
        offset = len(self._lines())
        with self.path.open("ab") as topic:
            record = {"headers": {ID_HEADER: entry.id}, "value": entry.value.decode()}
            topic.write(orjson.dumps(record) + b"\n")
            topic.flush()
            os.fsync(topic.fileno())
        return Location("topic", 0, offset)

    def on_topic(self):
        for offset, line in enumerate(self._lines()):
            record = orjson.loads(line)
            yield record["headers"], record["value"].encode(), Location("topic", 0, offset)

    def ids(self) -> list[str]:
        return [headers[ID_HEADER] for headers, _, _ in self.on_topic()]

    def _lines(self) -> list[bytes]:
        return self.path.read_bytes().splitlines() if self.path.exists() else []

    def close(self) -> None:
        return None


def _topic(store: EventStore) -> FileTopic:
    return FileTopic(Path(store.path).with_suffix(".topic"))


def _patch(version: str, *, free_text: bool = False) -> WorkflowPatch:
    """A signed patch; one that writes free text (an instruction) awaits a human's approval."""
    edit = Edit(operator="edit_prompt", node="solve", instruction="Show the working.") if free_text else (
        Edit(operator="programmer", node="solve"))  # fmt: skip
    spec, ops = apply_edit(ARITHMETIC_SLIP, edit, version)
    verification = Verification(
        pairs=10, counterexamples=5, target_before=0.5, target_after=0.1, target_p=0.01,
        efm_before=0.5, efm_after=0.1, efm_change_low=-0.5, efm_change_high=-0.2,
    )  # fmt: skip
    rationale = Rationale(
        job_id=f"job-{version}", mode="m1", counterexamples=[], verification=verification,
        edits=[{**edit.model_dump(), "proposer": "rules"}], cost=Cost(llm_calls=0, tokens=0, wall_s=0),
    )  # fmt: skip
    patch = WorkflowPatch(workflow_id=spec.id, base_version="1.0.0", new_version=version, operations=ops,
                          content_hash=spec.content_hash, rationale=rationale)  # fmt: skip
    return sign(patch, "conformance-key")


def _patches_outbox(store: EventStore) -> PatchOutbox:
    return PatchOutbox(store, approve_free_text=True, clock=lambda: 0.0)


def _more_patches(store: EventStore, round_: int) -> None:
    if round_ == 1:
        _patches_outbox(store).approve("arithmetic-slip", "1.2.0", "conformance")
    store.append([created(f"job-{round_}", _patch(f"1.{2 + round_}.0"), now=0.0)])


PUBLISH_PATCHES = StageCase(
    "publish.patches",
    prepare=lambda store: store.append(
        [created(f"job-{v}", _patch(v, free_text=v == "1.2.0"), now=0.0) for v in ("1.1.0", "1.2.0", "1.9.0")]
    ),
    build=lambda store: OutboxPublisher(_patches_outbox(store), _topic(store), batch=1),
    more=_more_patches,
    emits=(PATCH_PUBLISHED,),
    at_least=4,
    on_topic=lambda store: _topic(store).ids(),
)


def _decided(version: str) -> Event:
    arm = {"executions": 100, "failures": 10, "failure_rate": 0.1}
    payload = {
        "workflow_id": "arithmetic", "version": version, "decision": "promote", "reason": "better",
        "stable_version": "1.0.0", "decided_at": 0.0,
        "statistics": {"alpha": 0.05, "canary": arm, "stable": arm, "difference": [-0.1, 0.1]},
    }  # fmt: skip
    return Event(CANARY_DECIDED, canary_key("arithmetic", version), payload)


PUBLISH_ROLLOUTS = StageCase(
    "publish.rollouts",
    prepare=lambda store: store.append([_decided("1.1.0"), _decided("1.2.0"), _decided("1.3.0")]),
    build=lambda store: OutboxPublisher(RolloutOutbox(store), _topic(store), batch=1),
    more=lambda store, round_: store.append([_decided(f"1.{3 + round_}.0")]),
    emits=(ROLLOUT_PUBLISHED,),
    at_least=5,
    on_topic=lambda store: _topic(store).ids(),
)


class _Describer:
    """An LLM for the namer that names a mode after the words it is shown (the namer's own tests run
    it against a real model server and an OpenAI-compatible stub)."""

    provider = "conformance"

    async def complete(self, messages, *, model, temperature, max_tokens, seed, context) -> Completion:
        words = " ".join(messages[-1].content.split()[-6:-3])
        return Completion(text=f"{context.node_id}: {words}", input_tokens=1, output_tokens=1)


def _named(store: EventStore) -> None:
    """The log a namer reads: what the detector stage wrote over some traffic."""
    DETECT.prepare(store)
    StageRunner(store, DETECT.build(store)).drain()


def _more_named(store: EventStore, round_: int) -> None:
    DETECT.more(store, round_)
    StageRunner(store, DETECT.build(store)).drain()


NAME = StageCase(
    "name",
    prepare=_named,
    build=lambda store: ModeNamer(store, _Describer(), batch=150),
    more=_more_named,
    emits=(MODE_NAMED,),
    at_least=3,
)


def _crossed(workflow: str, mode: str, mass: float) -> Event:
    payload = {"workflow_id": workflow, "workflow_version": "1.0.0", "mode": mode, "mass": mass}
    return Event(MODE_MASS_CROSSED, mode, payload)


TRIGGERS = [("a", "m1", 0.2), ("b", "m2", 0.2), ("a", "m1", 0.3), ("c", "m4", 0.2)]
REFINE = StageCase(
    "refine",
    prepare=lambda store: store.append([_crossed(workflow, mode, mass) for workflow, mode, mass in TRIGGERS]),
    build=lambda store: RefinementStage(
        RefinementScheduler(store, cooldown_s=0, clock=lambda: 0.0), EndsAtOnce([0.0]), lambda: None
    ),
    more=lambda store, round_: store.append([_crossed("d", f"m{round_}", 0.2), _crossed("a", "m9", 0.5)]),
    emits=(REFINEMENT_STARTED, REFINEMENT_FINISHED),
    at_least=10,
)

CASES = {case.name: case for case in (DETECT, NAME, REFINE, PUBLISH_PATCHES, PUBLISH_ROLLOUTS)}


def _kill_inside_the_next_commit(store: EventStore) -> None:
    """SIGKILL this process once a step's events are written and before its COMMIT."""
    store_cursors = store._store_cursors

    def kill(cursors):
        store_cursors(cursors)
        os.kill(os.getpid(), signal.SIGKILL)

    store._store_cursors = kill


if __name__ == "__main__":
    case, path, steps = CASES[sys.argv[1]], sys.argv[2], int(sys.argv[3])
    store = EventStore(path)
    runner = StageRunner(store, case.build(store))
    for _ in range(steps):
        if runner.step() is None:
            break
    _kill_inside_the_next_commit(store)
    runner.drain()
    sys.exit(3)  # nothing was left to commit: the caller asked for more steps than there are
