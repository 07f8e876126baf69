"""Every stage keeps the `Stage` contract (daemon/stage.py), as arroyo's test_all.py holds every
strategy to its: abandoned between two steps, killed inside a commit, or failing a commit, a stage
reopened from its checkpoint goes on to write exactly the log an uninterrupted run writes, no event
twice and none missing. What it sends outside the store is held to its case's delivery: exactly once,
the uninterrupted run's messages; at least once, those too, with only what the interrupted step had
sent sent again."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import stage_cases
from stage_cases import CASES, StageCase

from cegraph.daemon.runner import StageRunner
from cegraph.daemon.store import EventStore

CASE_SCRIPT = Path(stage_cases.__file__)
cases = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


def the_log(store: EventStore) -> list[tuple[str, str, dict]]:
    rows = store.query("SELECT type, key, payload FROM events ORDER BY seq")
    return [(type_, key, orjson.loads(payload)) for type_, key, payload in rows]


def finish(case: StageCase, store: EventStore, runner: StageRunner | None = None) -> tuple[list, list]:
    """Drain the stage (a fresh one unless given), feed it the later rounds; the whole log, and what
    the stage sent outside the store."""
    runner = runner or StageRunner(store, case.build(store))
    runner.drain()
    for round_ in range(1, case.rounds + 1):
        case.more(store, round_)
        runner.drain()
    return the_log(store), case.on_topic(store)


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: its log, what it sent, and how much of that its first steps had sent."""

    log: list[tuple[str, str, dict]]
    topic: list
    sent: list[int]  # [i]: messages on the topic once the first drain's first i steps were committed


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Reference]:
    """Each case's uninterrupted run."""
    runs = {}
    for name, case in CASES.items():
        store = EventStore(tmp_path_factory.mktemp(name) / "reference.duckdb")
        case.prepare(store)
        runner, sent = StageRunner(store, case.build(store)), [len(case.on_topic(store))]
        while runner.step() is not None:
            sent.append(len(case.on_topic(store)))
        runs[name] = Reference(*finish(case, store, runner), sent)
        emitted = store.query("SELECT count(*) FROM events")[0][0]
        assert StageRunner(store, case.build(store)).drain() == 0  # caught up: a reopened stage adds nothing
        assert store.query("SELECT count(*) FROM events")[0][0] == emitted
        assert case.on_topic(store) == runs[name].topic  # and sends nothing
        store.close()
    return runs


def prepared(case: StageCase, path: Path) -> EventStore:
    store = EventStore(path)
    case.prepare(store)
    return store


def resumes(
    case: StageCase,
    reference: Reference,
    store: EventStore,
    committed: int,
    runner: StageRunner | None = None,
) -> None:
    """Resumed after a crash once `committed` steps of its first drain were committed, the stage writes
    the reference log, and its topic holds what its delivery promises: exactly once, the reference's
    messages; at least once, those with what the interrupted step had sent (on the topic at the crash,
    past the committed steps' messages) in them twice, and resumed from right after the commit."""
    at_crash = case.on_topic(store)
    log, topic = finish(case, store, runner)
    assert log == reference.log
    if case.delivery == "exactly_once":
        assert topic == reference.topic
        return
    done = reference.sent[committed]
    again = at_crash[done:]
    assert len(again) <= reference.sent[min(committed + 1, len(reference.sent) - 1)] - done  # one step's
    assert again == reference.topic[done : done + len(again)]
    assert topic == reference.topic[:done] + again + reference.topic[done:]


@cases
def test_the_reference_run_has_stage_output_to_compare(case, reference):
    run = reference[case.name]
    emitted = [type_ for type_, _, _ in run.log if type_ in case.emits]
    assert len(emitted) + len(run.topic) >= case.at_least
    assert len(run.sent) >= 3, "the first drain is at least two steps: the kill test kills the second"


@cases
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_abandoned_between_steps_it_resumes_from_its_checkpoint(case, steps, reference, tmp_path):
    store = prepared(case, tmp_path / "s.duckdb")
    first = StageRunner(store, case.build(store))
    committed = sum(first.step() is not None for _ in range(steps))
    del first  # no close: the process ended here
    resumes(case, reference[case.name], store, committed)


@cases
@pytest.mark.parametrize("steps", [0, 1])
def test_killed_inside_a_commit_it_resumes_from_its_checkpoint(case, steps, reference, tmp_path):
    path = tmp_path / "s.duckdb"
    prepared(case, path).close()
    command = [sys.executable, CASE_SCRIPT, case.name, str(path), str(steps)]
    killed = subprocess.run(command, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    resumes(case, reference[case.name], EventStore(path), steps)


@cases
def test_a_failed_commit_reopens_the_stage_from_its_checkpoint(case, reference, tmp_path):
    store = prepared(case, tmp_path / "s.duckdb")
    runner = StageRunner(store, case.build(store))
    runner.step()
    append, failed = store.append, []

    def fails_once(events, offsets=None, cursors=None):
        if not failed:
            failed.append(cursors)
            raise OSError("No space left on device")
        return append(events, offsets, cursors)

    store.append = fails_once
    with pytest.raises(OSError):
        runner.step()
    runner.reset()  # what the runner's thread does after a failed step
    resumes(case, reference[case.name], store, 1, runner)
