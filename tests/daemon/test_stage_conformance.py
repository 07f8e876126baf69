"""Every stage keeps the `Stage` contract (daemon/stage.py), as arroyo's test_all.py holds every
strategy to its: abandoned between two steps, killed inside a commit, or failing a commit, a stage
reopened from its checkpoint goes on to write exactly the log an uninterrupted run writes, no event
twice and none missing."""

from __future__ import annotations

import subprocess
import sys
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


def finish(case: StageCase, store: EventStore, runner: StageRunner | None = None) -> tuple:
    """Drain the stage (a fresh one unless given), feed it the later rounds; the whole log, and what
    the stage sent outside the store."""
    runner = runner or StageRunner(store, case.build(store))
    runner.drain()
    for round_ in range(1, case.rounds + 1):
        case.more(store, round_)
        runner.drain()
    return the_log(store), case.on_topic(store)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each case's log from an uninterrupted run."""
    logs = {}
    for name, case in CASES.items():
        store = EventStore(tmp_path_factory.mktemp(name) / "reference.duckdb")
        case.prepare(store)
        logs[name] = finish(case, store)
        emitted = store.query("SELECT count(*) FROM events")[0][0]
        assert StageRunner(store, case.build(store)).drain() == 0  # caught up: a reopened stage adds nothing
        assert store.query("SELECT count(*) FROM events")[0][0] == emitted
        store.close()
    return logs


def prepared(case: StageCase, path: Path) -> EventStore:
    store = EventStore(path)
    case.prepare(store)
    return store


@cases
def test_the_reference_run_has_stage_output_to_compare(case, reference):
    log, _ = reference[case.name]
    emitted = [type_ for type_, _, _ in log if type_ in case.emits]
    assert len(emitted) >= case.at_least


@cases
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_abandoned_between_steps_it_resumes_from_its_checkpoint(case, steps, reference, tmp_path):
    store = prepared(case, tmp_path / "s.duckdb")
    first = StageRunner(store, case.build(store))
    for _ in range(steps):
        first.step()
    del first  # no close: the process ended here
    assert finish(case, store) == reference[case.name]


@cases
@pytest.mark.parametrize("steps", [0, 1])
def test_killed_inside_a_commit_it_resumes_from_its_checkpoint(case, steps, reference, tmp_path):
    path = tmp_path / "s.duckdb"
    prepared(case, path).close()
    command = [sys.executable, CASE_SCRIPT, case.name, str(path), str(steps)]
    killed = subprocess.run(command, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    store = EventStore(path)
    assert finish(case, store) == reference[case.name]


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
    assert finish(case, store, runner) == reference[case.name]
