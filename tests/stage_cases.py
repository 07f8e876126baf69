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

sys.path.insert(0, str(Path(__file__).parent))

from otel_traces import make_traces, to_messages
from pipeline_fixtures import ingest

from cegraph.daemon.detect.detector import FailureDetector
from cegraph.daemon.detect.stage import DetectorStage
from cegraph.daemon.events import FAILURE_OBSERVED, MASS_OBSERVED, MODE_EMERGED
from cegraph.daemon.ingest.pipeline import InMessage
from cegraph.daemon.runner import StageRunner
from cegraph.daemon.settings import DetectorSettings
from cegraph.daemon.stage import Stage
from cegraph.daemon.store import EventStore


@dataclass(frozen=True)
class StageCase:
    name: str
    prepare: Callable[[EventStore], None]  # the log before the stage first runs
    build: Callable[[EventStore], Stage]
    more: Callable[[EventStore, int], None]  # input appended in round i (1, 2, ...) while it runs
    emits: tuple[str, ...]  # the event types the stage writes
    at_least: int  # of them in an uninterrupted run: the comparisons have something to compare
    rounds: int = 2


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

CASES = {case.name: case for case in (DETECT,)}


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
